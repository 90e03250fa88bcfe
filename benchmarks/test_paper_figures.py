"""The paper's measurements on our models: ρ per layer (Fig. 3) and patch degradation (Fig. 4).

Two networks, both trained here from a fixed seed: the small CNN on scikit-learn's digits
(real data, 8×8) and a VGG-16-layout network (13 convolutions, 3 dense layers, 1/8 of the
channels) on 64×64 crops of scikit-learn's two bundled photographs (10 region classes).
The protocol is the paper's: patterns on the first part of the training data, ``v`` on the
second, every score on held-out test data.  Each test asserts the claims its section
prints; the example figures, which have nothing to assert, are made by
``python benchmarks/report.py``.  ``pytest benchmarks -k speed_rho`` times ρ against a
fitting pass on the same networks.
"""

from __future__ import annotations

import pytest
import torch
from results import markdown_table
from suite import (
    ALL_METHODS,
    Config,
    Setup,
    explain_all,
    paper_setups,
    plot_degradation,
    plot_rho,
    timed,
)
from torch import Tensor, nn

from captum_pattern import PatternFitter
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


#: the share of a ρ call that its three timed phases (v pass, solve, eval pass) must cover
PHASES_COVER = 0.8


def test_speed_rho(setups, config, results):
    """ρ (v pass + solve + evaluation pass) against one fitting pass over the same images,
    with every position and with ``max_positions=16``."""
    rows: list[list] = []
    data: dict[str, dict] = {}
    for name, s in setups.items():
        counts = [min(config.speed_images, len(s.split1))]
        if name == "VGG-style" and len(s.split1) > counts[0]:
            counts.append(len(s.split1))  # the solve is a fixed cost: also on the whole split
        for count in counts:
            _rho_against_fit(name, s, s.split1[:count], config, rows, data)
    header = [
        "model",
        "images",
        "positions",
        "forward s",
        "fit s",
        "ρ s",
        "ρ / fit",
        "ρ / fit (CPU time)",
        "v pass",
        "solve",
        "eval pass",
        "max |Δ mean ρ|",
    ]
    table = markdown_table(header, rows, digits=2)
    note = (
        "The same images for every pass. forward: one `no_grad` pass; fit: `PatternFitter` "
        "with all three pattern types; ρ: every estimator, v pass + solve + evaluation pass "
        "(each pass over those images, so ρ reads them twice); positions: every output "
        "position of a convolution, or `max_positions=16` per image in both passes. Fastest of "
        f"{config.speed_repeats} runs on a shared 2-core machine; v pass, solve and eval pass "
        "split the fastest ρ run into its phases (asserted: they cover at least "
        f"{PHASES_COVER:.0%} of its wall time). max |Δ mean ρ|: the largest difference of a "
        "layer's mean ρ between the two position settings (in-sample: v, ρ and the patterns "
        "all on these images, so this is no estimate of held-out ρ)."
    )
    results.add(
        "speed_rho", "ρ evaluation time against a fitting pass", table + "\n\n" + note, data
    )


def _rho_against_fit(name: str, s: Setup, images: Tensor, config: Config, rows, data) -> None:
    """One forward, one fit and ρ over ``images`` with every position and with 16 per image."""
    batches = images.split(s.batch)
    forward = timed(lambda: _forward_all(s.model, batches), config.speed_repeats)
    fit = timed(lambda: PatternFitter(s.model).fit(batches), config.speed_repeats)
    means = {}
    for positions in (None, 16):
        rho = timed(
            lambda p=positions: signal_quality(
                s.model, s.patterns, batches, batches, max_positions=p
            ),
            config.speed_repeats,
        )
        means[positions] = rho_means(rho.result)
        parts = rho.result.seconds  # of the fastest run
        assert PHASES_COVER * rho.wall <= sum(parts.values()) <= rho.wall, (name, parts)
        shares = [parts[k] / sum(parts.values()) for k in ("v_pass", "solve", "eval_pass")]
        label = "all" if positions is None else f"{positions} per image"
        ratio, ratio_cpu = rho.wall / fit.wall, rho.cpu / fit.cpu
        gap = max(
            abs(means[positions][layer][e] - means[None][layer][e])
            for layer in means[None]
            for e in ESTIMATORS
        )
        timings = [forward.wall, fit.wall, rho.wall, ratio, ratio_cpu, *shares]
        rows.append([name, len(images), label, *timings, gap])
        data[f"{name} / {len(images)} images / {label}"] = {
            "images": len(images),
            "forward": forward.wall,
            "fit": fit.wall,
            "rho": rho.wall,
            "ratio_wall": ratio,
            "ratio_cpu": ratio_cpu,
            "parts": parts,
            "max_mean_rho_gap": gap,
        }


def _forward_all(model: nn.Module, batches: tuple[Tensor, ...]) -> None:
    with torch.no_grad():
        for b in batches:
            model(b)
