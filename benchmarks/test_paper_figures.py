"""The paper's measurements on our models: ρ per layer (Fig. 3), the ρ evaluation time
against a fitting pass, patch degradation (Fig. 4) and example explanations (Fig. 1/6).

Two networks, both trained here from a fixed seed: the small CNN on scikit-learn's digits
(real data, 8×8) and a VGG-16-layout network (13 convolutions, 3 dense layers, 1/8 of the
channels) on 64×64 crops of scikit-learn's two bundled photographs (10 region classes).
The protocol is the paper's: patterns on the first part of the training data, ``v`` on the
second, every score on held-out test data.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from results import markdown_table
from suite import (
    ALL_METHODS,
    Config,
    explain_all,
    fit_patterns,
    plot_degradation,
    plot_rho,
    timed,
    train,
    vgg_style,
)
from torch import Tensor, nn

from captum_pattern import PatternFitter, Patterns
from captum_pattern.compare import METHODS
from captum_pattern.metrics import ESTIMATORS, patch_degradation, rho_means, signal_quality
from captum_pattern.visualization import comparison_grid
from captum_pattern.zoo import PHOTO_REGIONS, SmallCNN, digits, photo_crops


@dataclass
class Setup:
    """A trained network with the paper's three splits and its patterns (from split 1)."""

    name: str
    model: nn.Module
    accuracy: float
    train_seconds: float
    split1: Tensor  # patterns
    split2: Tensor  # v
    test_x: Tensor  # scores
    test_y: Tensor
    patterns: Patterns
    patch: int
    steps: int
    batch: int


@pytest.fixture(scope="module")
def setups(config: Config) -> dict[str, Setup]:
    d = digits(seed=0)
    small = train(SmallCNN, d.x_train, d.y_train, d.x_test, d.y_test, config.digits_epochs, lr=2e-3)
    half = len(d.x_train) // 2
    n = config.rho_split
    photos = photo_crops(max(config.vgg_train, 2 * n), n, size=config.vgg_size, seed=0)
    x, y = photos.x_train[: config.vgg_train], photos.y_train[: config.vgg_train]
    vgg = train(lambda: vgg_style(config), x, y, photos.x_test, photos.y_test, config.vgg_epochs)
    return {
        "digits CNN": _setup(
            "digits CNN",
            small,
            d.x_train[:half],
            d.x_train[half:],
            d.x_test,
            d.y_test,
            patch=2,
            steps=16,
        ),
        "VGG-style": _setup(
            "VGG-style",
            vgg,
            photos.x_train[:n],
            photos.x_train[n : 2 * n],
            photos.x_test,
            photos.y_test,
            patch=config.degradation_patch,
            steps=config.degradation_steps,
        ),
    }


def _setup(name, trained, split1, split2, test_x, test_y, patch, steps) -> Setup:
    patterns = fit_patterns(trained.model, split1, batch_size=64)
    return Setup(
        name=name,
        model=trained.model,
        accuracy=trained.accuracy,
        train_seconds=trained.seconds,
        split1=split1,
        split2=split2,
        test_x=test_x,
        test_y=test_y,
        patterns=patterns,
        patch=patch,
        steps=steps,
        batch=64,
    )


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
    plot_rho(tables, str(results.figure("signal_quality.png")))
    lines.append(
        "Asserted: on every layer the mean held-out ρ of S_a and S_a+- is above that of "
        "S_w and of random directions. Figure: `signal_quality.png`."
    )
    results.add("signal_quality", "ρ per layer and estimator (Fig. 3)", "\n".join(lines), data)


def test_speed_rho_against_a_fitting_pass(setups, config, results):
    """ρ (v pass + solve + evaluation pass) against one fitting pass over the same images."""
    rows, data = [], {}
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
    ]
    table = markdown_table(header, rows, digits=2)
    note = (
        "The same images for every pass. forward: one `no_grad` pass; fit: `PatternFitter` "
        "with all three pattern types; ρ: every estimator, v pass + solve + evaluation pass "
        "(each pass over those images, so ρ reads them twice); positions: every output "
        "position of a convolution, or `max_positions=16` per image in both passes. Fastest of "
        f"{config.speed_repeats} runs on a shared 2-core machine; the last three columns "
        "split the fastest ρ run into its phases."
    )
    results.add("speed", "ρ evaluation time against a fitting pass", table + "\n\n" + note, data)


def _rho_against_fit(name: str, s, images: Tensor, config: Config, rows: list, data: dict) -> None:
    """One forward, one fit and ρ over ``images``, with every position and with 16 per image."""
    batches = images.split(s.batch)
    forward = timed(lambda m=s.model, b=batches: _forward_all(m, b), config.speed_repeats)
    fit = timed(lambda m=s.model, b=batches: PatternFitter(m).fit(b), config.speed_repeats)
    for positions in (None, 16):
        rho = timed(
            lambda s=s, b=batches, p=positions: signal_quality(
                s.model, s.patterns, b, b, max_positions=p
            ),
            config.speed_repeats,
        )
        parts = rho.result.seconds  # of the fastest run
        shares = [parts[k] / sum(parts.values()) for k in ("v_pass", "solve", "eval_pass")]
        label = "all" if positions is None else f"{positions} per image"
        ratio, ratio_cpu = rho.wall / fit.wall, rho.cpu / fit.cpu
        rows.append(
            [name, len(images), label, forward.wall, fit.wall, rho.wall, ratio, ratio_cpu, *shares]
        )
        data[f"{name} / {len(images)} images / {label}"] = {
            "images": len(images),
            "forward": forward.wall,
            "fit": fit.wall,
            "rho": rho.wall,
            "ratio_wall": ratio,
            "ratio_cpu": ratio_cpu,
            "parts": parts,
        }


def _forward_all(model: nn.Module, batches) -> None:
    with torch.no_grad():
        for b in batches:
            model(b)


def test_patch_degradation(setups, config, results):
    panels, rows, data = {}, [], {}
    for name, s in setups.items():
        images = s.test_x[: config.degradation_images if name == "VGG-style" else 200]
        with torch.no_grad():
            predicted = s.model(images).argmax(1)
        explanations = explain_all(s.model, images, predicted, s.patterns)
        curves, areas = {}, {}
        baseline = None
        for method in ALL_METHODS:
            result = patch_degradation(
                s.model,
                images,
                explanations[method],
                patch_size=s.patch,
                steps=s.steps,
                random_baseline=baseline is None,
            )
            if baseline is None:
                baseline = result.random_curves
            curves[method] = result.mean_curve
            areas[method] = result.area
        curves["random order"] = baseline.mean(0)
        areas["random order"] = float(baseline.mean())
        panels[f"{name}: {len(images)} test images, {s.patch}×{s.patch} patches"] = curves
        data[name] = {"areas": areas, "curves": curves}
        ranked = sorted(areas, key=areas.get)
        rows += [
            [
                name,
                m,
                METHODS[m].group if m in METHODS else "baseline",
                areas[m],
                ranked.index(m) + 1,
            ]
            for m in areas
        ]
    plot_degradation(panels, str(results.figure("degradation.png")))
    table = markdown_table(["model", "method", "group", "area (lower is better)", "rank"], rows)
    results.add(
        "degradation",
        "Patch degradation (Fig. 4)",
        table + "\n\nArea: the mean probability of the originally predicted class over "
        "n = 0..steps replaced patches (image-mean fill). Figure: `degradation.png`.",
        data,
    )


def test_example_explanations(setups, results):
    names = {}
    for name, s in setups.items():
        images, labels = s.test_x[:4], s.test_y[:4]
        with torch.no_grad():
            predicted = s.model(images).argmax(1)
        explanations = explain_all(s.model, images, predicted, s.patterns)
        groups = {m: METHODS[m].group for m in explanations}
        if name == "VGG-style":
            titles = [list(PHOTO_REGIONS)[int(p)] for p in predicted]
        else:
            titles = [f"{int(t)} → {int(p)}" for t, p in zip(labels, predicted)]
        path = results.figure(f"examples_{name.split()[0].lower().replace('-', '_')}.png")
        fig = comparison_grid(images, explanations, groups, row_titles=titles, path=path)
        import matplotlib.pyplot as plt

        plt.close(fig)
        names[name] = path.name
    results.add(
        "examples",
        "Example explanations (Fig. 1/6 layout)",
        "Functions and signals in input space (normalised as in the paper), attributions as "
        "heat maps (red positive, blue negative). Figures: "
        + ", ".join(f"`{v}` ({k})" for k, v in names.items())
        + ".",
        names,
    )
