"""Quantus metrics for every method of the comparison, and Quantus's RegionPerturbation
against our patch degradation (they agree to float rounding with matched settings).

Needs the ``quantus`` extra (``pip install -e .[quantus]``); skipped without it.
The metric table runs on the two networks of ``test_paper_figures.py`` (the ρ and
degradation tables of ``docs/benchmarks.md``), with small Quantus sample sizes: about
ten minutes on 2 shared cores, about six of them training the two networks.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from evaluation_nets import Net, explain_any, predicted, trained_net
from results import markdown_table
from suite import ALL_METHODS, Config, Setup, paper_setups

from captum_pattern.compare import METHODS
from captum_pattern.evaluation import image_mean_fill, replace_by_fill
from captum_pattern.metrics import patch_degradation
from captum_pattern.metrics.degradation import patch_scores

quantus = pytest.importorskip("quantus")

#: (column, metric, which way is better)
COLUMNS = (
    ("faithfulness corr.", "↑"),
    ("pixel flipping", "↓"),
    ("region perturbation", "↑"),
    ("sparseness", "↑"),
    ("max-sensitivity", "↓"),
    ("local Lipschitz", "↓"),
    ("random logit", "↓"),
)


def _metrics(net: Net | Setup, x: np.ndarray) -> dict[str, object]:
    """The seven Quantus metrics with small sample sizes for ``net`` and the images ``x``."""
    _, channels, h, w = net.test_x.shape
    pixels = h * w
    common = {"disable_warnings": True, "display_progressbar": False}
    return {
        "faithfulness corr.": quantus.FaithfulnessCorrelation(
            nr_runs=10,
            subset_size=max(4, pixels // 16),
            perturb_baseline="mean",
            return_aggregate=False,
            **common,
        ),
        "pixel flipping": quantus.PixelFlipping(
            features_in_step=pixels // 16, perturb_baseline="mean", **common
        ),
        "region perturbation": quantus.RegionPerturbation(
            patch_size=net.patch,
            regions_evaluation=net.steps,
            abs=False,
            normalise=False,
            perturb_func=replace_by_fill,
            perturb_func_kwargs={"fill": image_mean_fill(x)},
            **common,
        ),
        "sparseness": quantus.Sparseness(**common),
        "max-sensitivity": quantus.MaxSensitivity(nr_samples=3, lower_bound=0.05, **common),
        "local Lipschitz": quantus.LocalLipschitzEstimate(nr_samples=4, perturb_std=0.05, **common),
        "random logit": quantus.RandomLogit(num_classes=10, seed=0, **common),
    }


def _score(
    name: str, metric: object, net: Net | Setup, x: np.ndarray, y: np.ndarray, method: str
) -> tuple[float, int]:
    """The mean score of ``method`` and the number of NaN scores left out of it."""
    kwargs = {"method": method, "patterns": net.patterns}
    # region perturbation's fill holds the whole set: one batch
    extra = {"batch_size": len(x)} if name == "region perturbation" else {}
    scores = metric(
        model=net.model,
        x_batch=x,
        y_batch=y,
        explain_func=explain_any,
        explain_func_kwargs=kwargs,
        device="cpu",
        **extra,
    )
    # pixel flipping: the mean of the probability curves; region perturbation: the mean
    # drop of the probability (AOPC); the others: the mean score over images
    values = np.asarray(scores, dtype=float)
    nans = int(np.isnan(values).sum())
    return (float(np.nanmean(values)) if nans < values.size else float("nan")), nans


def test_region_perturbation_reproduces_patch_degradation(config: Config, results):
    """With image-mean fill, predicted class, no normalisation and the same grid,
    Quantus's RegionPerturbation gives our patch-degradation curve for every image
    whose patch scores have no ties (tie order: ours is stable, numpy's argsort is not)."""
    net = trained_net(config, "digits CNN")
    images = net.test_x[:64]
    x = images.numpy()
    y = predicted(net.model, images).numpy()
    rows, data = [], {}
    for method in ALL_METHODS:
        heat = torch.from_numpy(explain_any(net.model, x, y, method, net.patterns)).float()
        ours = patch_degradation(
            net.model, images, heat, patch_size=net.patch, steps=net.steps, random_baseline=False
        )
        metric = quantus.RegionPerturbation(
            patch_size=net.patch,
            regions_evaluation=net.steps,
            order="morf",
            abs=False,
            normalise=False,
            perturb_func=replace_by_fill,
            perturb_func_kwargs={"fill": image_mean_fill(x)},
            disable_warnings=True,
        )
        drops = metric(
            model=net.model,
            x_batch=x,
            y_batch=y,
            a_batch=heat.numpy(),
            batch_size=len(x),
            softmax=True,
        )
        theirs = ours.curves[:, :1].numpy() - np.asarray(drops)
        gaps = np.abs(theirs - ours.curves[:, 1:].numpy()).max(1)
        scores = patch_scores(heat, net.patch)
        tied = np.array([len(torch.unique(row)) < len(row) for row in scores])
        untied_gap = float(gaps[~tied].max()) if (~tied).any() else float("nan")
        rows.append([method, int(tied.sum()), f"{untied_gap:.1e}", f"{float(gaps.max()):.1e}"])
        data[method] = {"tied_images": int(tied.sum()), "max_gap_untied": untied_gap}
        data[method]["max_gap"] = float(gaps.max())
        assert (~tied).any(), f"{method}: every image has tied patch scores"
        assert untied_gap < 2e-7, f"{method}: Quantus and patch_degradation differ by {untied_gap}"
    results.add(
        "quantus_region_perturbation",
        "Quantus RegionPerturbation = patch_degradation (digits CNN)",
        "64 test images, patch 2, 16 steps, image-mean fill, predicted class. Max abs difference "
        "of the probability curves over images without tied patch scores, and over all "
        "images (tied patches are replaced in another order: numpy's argsort is not stable):"
        "\n\n"
        + markdown_table(
            ["method", "images with ties", "max abs diff, no ties", "max abs diff, all"], rows
        ),
        data,
    )


# ~10 min on 2 shared cores; both nets' rows in docs/benchmarks.md are from this test (2026-12-03)
@pytest.mark.slow
def test_quantus_metrics_table(config: Config, results):
    # the networks of the page's ρ and degradation tables (digits CNN 0.99, VGG-style 0.82)
    nets = paper_setups(config)
    images_per_net = 24
    lines, data = [], {}
    for net_name, net in nets.items():
        images = net.test_x[:images_per_net]
        x = images.numpy()
        y = predicted(net.model, images).numpy()
        metrics = _metrics(net, x)
        rows = []
        data[net_name] = {}
        for method in ALL_METHODS:
            start = time.perf_counter()
            torch.manual_seed(0)
            np.random.seed(0)  # Quantus draws its perturbations from numpy's global generator
            scored = {
                name: _score(name, metric, net, x, y, method) for name, metric in metrics.items()
            }
            values = {name: value for name, (value, _) in scored.items()}
            nans = {name: n for name, (_, n) in scored.items() if n}
            data[net_name][method] = values | {
                "nan_scores": nans,
                "seconds": time.perf_counter() - start,
            }
            # a NaN score (e.g. a map that is zero everywhere) is left out of the mean: say so
            cells = [
                f"{values[c]:.3f} ({nans[c]} NaN)" if c in nans else values[c] for c, _ in COLUMNS
            ]
            rows.append([method, *cells])
            print(f"{net_name} / {method}: {time.perf_counter() - start:.1f} s", flush=True)
            assert all(np.isfinite(v) for v in values.values()), (method, values)
        header = ["method", *[f"{c} {arrow}" for c, arrow in COLUMNS]]
        lines += [
            f"**{net_name}** (test accuracy {net.accuracy:.2f}, {len(x)} test images, "
            "targets: the predicted class)\n",
            markdown_table(header, rows),
            "",
        ]
        # written per network: a later failure keeps this one
        results.add(f"quantus_metrics_{net_name}", f"Quantus metrics: {net_name}", lines[-2], data)
    # the random map is the floor of the faithfulness scores on both nets: each pattern
    # method must rank pixels better than chance on at least one of them
    for method in (m for m in ALL_METHODS if METHODS[m].needs_patterns):
        assert any(
            data[n][method]["faithfulness corr."] > data[n]["Random"]["faithfulness corr."]
            or data[n][method]["region perturbation"] > data[n]["Random"]["region perturbation"]
            for n in nets
        ), method
    results.add(
        "quantus_metrics",
        "Quantus metrics",
        "Quantus 0.6 with small sample sizes (see `benchmarks/test_quantus.py`); ↑/↓: which "
        "way is better. Faithfulness correlation (10 random subsets of 1/16 of the pixels, "
        "mean fill), pixel flipping (mean probability over 16 steps of 1/16 of the pixels, "
        "mean fill), region perturbation (mean probability drop, image-mean fill, as "
        "`patch_degradation`), sparseness (Gini of |a|), max-sensitivity (3 copies with "
        "uniform noise in ±0.05) and local Lipschitz (4 copies with Gaussian noise, σ 0.05), "
        "random logit (SSIM with a random other class' map).\n\n" + "\n".join(lines),
        data,
    )
