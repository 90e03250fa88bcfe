"""The paper's measurements on our models: ρ per layer (Fig. 3) and patch degradation (Fig. 4).

Two networks, both trained here from a fixed seed: the small CNN on scikit-learn's digits
(real data, 8×8) and a VGG-16-layout network (13 convolutions, 3 dense layers, 1/8 of the
channels) on 64×64 crops of scikit-learn's two bundled photographs (10 region classes).
The protocol is the paper's: patterns on the first part of the training data, ``v`` on the
second, every score on held-out test data.  Each test asserts the claims its section
prints; the ρ timing table and the example figures, which have nothing to assert, are
made by ``python benchmarks/report.py``.
"""

from __future__ import annotations

import pytest
import torch
from results import markdown_table
from suite import ALL_METHODS, Config, Setup, explain_all, paper_setups, plot_degradation, plot_rho
from torch import Tensor

from captum_pattern.compare import METHODS
from captum_pattern.metrics import (
    ESTIMATORS,
    Degradation,
    patch_degradation,
    rho_means,
    signal_quality,
)

#: paper, Sec. 5.1: "random directions remove almost no correlation" (seen: at most 0.014)
RANDOM_RHO = 0.05


@pytest.fixture(scope="module")
def setups(config: Config) -> dict[str, Setup]:
    return paper_setups(config)


def test_signal_quality_per_layer(setups, results):
    tables, data, lines = {}, {}, []
    for name, s in setups.items():
        rho = signal_quality(s.model, s.patterns, s.split2.split(s.batch), s.test_x.split(s.batch))
        means = rho_means(rho)
        tables[f"{name} (test accuracy {s.accuracy:.2f})"] = means
        data[name] = {"mean_rho": means, "seconds": rho.seconds, "ridge": rho.ridge}
        rows = [[layer, *[m[e] for e in ESTIMATORS]] for layer, m in means.items()]
        lines.append(f"**{name}** (test accuracy {s.accuracy:.2f}), mean ρ over neurons:\n")
        lines.append(markdown_table(["layer", *ESTIMATORS], rows))
        lines.append("")
        # by construction S_a and S_a+- leave no covariance between y and the residual on
        # the data they were fitted on; S_w and random directions are not built to
        for layer, m in means.items():
            for fitted in ("linear", "two_component"):
                for baseline in ("filter", "random"):
                    assert m[fitted] > m[baseline], (name, layer, fitted, baseline, m)
            assert abs(m["random"]) < RANDOM_RHO, (name, layer, m)
    plot_rho(tables, str(results.figure("signal_quality.png")))
    lines.append(
        "Asserted: on every layer the mean held-out ρ of S_a and S_a+- is above that of "
        f"S_w and of random directions, and |ρ| of random directions is below {RANDOM_RHO} "
        "(the paper: they remove almost no correlation). Figure: `signal_quality.png`."
    )
    results.add("signal_quality", "ρ per layer and estimator (Fig. 3)", "\n".join(lines), data)


def test_patch_degradation(setups, config, results):
    panels, rows, data = {}, [], {}
    for name, s in setups.items():
        images = s.test_x[: config.degradation_images if name == "VGG-style" else 200]
        with torch.no_grad():
            probabilities = s.model(images).softmax(1)
        predicted = probabilities.argmax(1)
        explanations = explain_all(s.model, images, predicted, s.patterns)
        for method, heat in explanations.items():
            assert heat.shape == images.shape and bool(torch.isfinite(heat).all()), method
        runs, baseline = _degrade(s, images, explanations)
        intact = probabilities.gather(1, predicted[:, None])[:, 0]
        _check_curves(name, s, images, intact, runs, baseline)
        curves = {m: r.mean_curve for m, r in runs.items()} | {"random order": baseline.mean(0)}
        areas = {m: r.area for m, r in runs.items()} | {"random order": float(baseline.mean())}
        panels[f"{name}: {len(images)} test images, {s.patch}×{s.patch} patches"] = curves
        data[name] = {"areas": areas, "curves": curves}
        ranked = sorted(areas, key=areas.get)
        for m in areas:
            group = METHODS[m].group if m in METHODS else "baseline"
            rows.append([name, m, group, areas[m], ranked.index(m) + 1])
    plot_degradation(panels, str(results.figure("degradation.png")))
    table = markdown_table(["model", "method", "group", "area (lower is better)", "rank"], rows)
    results.add(
        "degradation",
        "Patch degradation (Fig. 4)",
        table + "\n\nArea: the mean probability of the originally predicted class over "
        "n = 0..steps replaced patches (image-mean fill). Figure: `degradation.png`.\n\n"
        "Asserted: every explanation is finite and shaped like the input; every curve starts "
        "at the intact image's probability of its predicted class (and, when all patches are "
        "replaced, ends at the same value for every order); the random attribution and the "
        f"random order agree within {SAME_RANDOM} standard errors (paired over images); the "
        "best method and PatternAttribution fall faster than the random order.",
        data,
    )


#: standard errors within which two random patch orders must agree (two-sided p < 1e-4)
SAME_RANDOM = 4.0


def _degrade(s: Setup, images: Tensor, explanations: dict[str, Tensor]):
    """Every method's degradation run, and the random-order curves (from the first run)."""
    runs: dict[str, Degradation] = {}
    for method in ALL_METHODS:
        runs[method] = patch_degradation(
            s.model,
            images,
            explanations[method],
            patch_size=s.patch,
            steps=s.steps,
            random_baseline=not runs,
        )
    baseline = runs[ALL_METHODS[0]].random_curves
    assert baseline is not None
    return runs, baseline


def _check_curves(name, s, images, intact, runs, baseline) -> None:
    """What must hold of the curves, whatever wins (see the section's 'Asserted')."""
    every = {m: r.curves for m, r in runs.items()} | {"random order": baseline}
    height, width = images.shape[-2:]
    divides = height % s.patch == 0 and width % s.patch == 0
    all_replaced = divides and s.steps == (height // s.patch) * (width // s.patch)
    for method, curves in every.items():
        assert curves.shape == (len(images), s.steps + 1), (name, method)
        where = f"{name}, {method}"
        torch.testing.assert_close(curves[:, 0], intact, rtol=1e-4, atol=1e-6, msg=where)
        if all_replaced:  # every order ends at the same image, the image mean
            end = baseline[:, -1]
            torch.testing.assert_close(curves[:, -1], end, rtol=1e-4, atol=1e-6, msg=where)
    # two random orders: the same expected curve
    diff = runs["Random"].curves.mean(1) - baseline.mean(1)
    standard_error = float(diff.std() / len(diff) ** 0.5)
    assert abs(float(diff.mean())) <= SAME_RANDOM * standard_error, (name, float(diff.mean()))
    random_area = float(baseline.mean())
    best = min(runs, key=lambda m: runs[m].area)
    assert runs[best].area < random_area, (name, best, runs[best].area, random_area)
    pattern_area = runs["PatternAttribution"].area
    assert pattern_area < random_area, (name, pattern_area, random_area)
