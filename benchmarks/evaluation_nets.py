"""The two trained networks the Quantus and sanity-check benchmarks share.

The digits CNN and the VGG-style net of ``test_paper_figures.py`` (same data,
seeds and protocol: patterns from the first half of the training data, scores
on test images), trained once per process and reused by the fast Quantus and
sanity-check benchmarks.  Outside ``--large`` both train for half the epochs
there and the VGG-style net on 1000 images, to keep these benchmarks within a
few minutes on 2 cores.  The slow Quantus metrics table
(``test_quantus_metrics_table``) scores the page's own networks instead
(``suite.paper_setups``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from suite import Config, fit_patterns, train, vgg_style
from torch import Tensor, nn

from captum_pattern import Patterns
from captum_pattern.compare import METHODS
from captum_pattern.evaluation import explain
from captum_pattern.zoo import SmallCNN, digits, photo_crops


@dataclass
class Net:
    """A trained network, its patterns, the data they came from and test images."""

    name: str
    model: nn.Module
    accuracy: float
    patterns: Patterns
    fit_x: Tensor  # split 1: the patterns' data (refitting uses it too)
    test_x: Tensor
    test_y: Tensor
    patch: int  # patch size of region perturbation / patch degradation
    steps: int


#: the networks, by name, in table order
NET_NAMES = ("digits CNN", "VGG-style")


@functools.cache
def trained_net(config: Config, name: str) -> Net:
    """``"digits CNN"`` or ``"VGG-style"``, trained from fixed seeds (once per process)."""
    if name == "digits CNN":
        d = digits(seed=0)
        epochs = config.digits_epochs if config.large else config.digits_epochs // 2
        trained = train(SmallCNN, d.x_train, d.y_train, d.x_test, d.y_test, epochs, lr=2e-3)
        fit_x = d.x_train[: len(d.x_train) // 2]
        test_x, test_y, patch, steps = d.x_test, d.y_test, 2, 16
    elif name == "VGG-style":
        n_train = config.vgg_train if config.large else 1000
        photos = photo_crops(n_train, 256, size=config.vgg_size, seed=0)
        epochs = config.vgg_epochs if config.large else config.vgg_epochs // 2
        trained = train(
            lambda: vgg_style(config),
            photos.x_train,
            photos.y_train,
            photos.x_test,
            photos.y_test,
            epochs,
        )
        fit_x = photos.x_train[:512]
        test_x, test_y = photos.x_test, photos.y_test
        patch, steps = config.degradation_patch, config.degradation_steps
    else:
        raise ValueError(f"unknown network {name!r}; expected one of {NET_NAMES}")
    patterns = fit_patterns(trained.model, fit_x, batch_size=64)
    return Net(name, trained.model, trained.accuracy, patterns, fit_x, test_x, test_y, patch, steps)


def explain_any(
    model: nn.Module,
    inputs: np.ndarray | Tensor,
    targets: np.ndarray | Tensor,
    method: str,
    patterns: Patterns | None = None,
    **kwargs: object,
) -> np.ndarray:
    """A Quantus ``explain_func`` for every method of the comparison, channels summed, float64.

    The pattern methods go through :func:`captum_pattern.evaluation.explain` (the
    adapter under test); the others through :data:`captum_pattern.compare.METHODS`,
    the same runs as in every other benchmark.
    """
    ours = {
        "PatternNet": ("pattern_net", "relu"),
        "PatternAttribution": ("pattern_attribution", "relu"),
    }
    ours |= {f"{k} (linear)": (v[0], "linear") for k, v in ours.items()}
    if method in ours:
        name, pattern_type = ours[method]
        result = explain(
            model,
            inputs,
            targets,
            method=name,
            patterns=patterns,
            pattern_type=pattern_type,
            **kwargs,
        )
    else:
        x = torch.as_tensor(np.asarray(inputs), dtype=torch.float32)
        target = torch.as_tensor(np.asarray(targets)).long()
        heat = METHODS[method].run(model, patterns, x, target).detach()
        result = heat.sum(1, keepdim=True).numpy()
    # float64: PatternNet's values on the 16-layer VGG-style net (products of pattern norms,
    # starting from the logit) overflow the float32 squares in Quantus's norms (NaN)
    return result.astype(np.float64)


def predicted(model: nn.Module, x: Tensor) -> Tensor:
    """The class the model predicts for each image."""
    with torch.no_grad():
        return model(x).argmax(1)


def mean_spearman(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    """Mean over images of the Spearman correlation of ``|a|`` and ``|b|`` (flattened).

    Rows where either map is constant (e.g. all zero) have no correlation: they
    are left out of the mean and counted.

    >>> mean_spearman(np.array([[1.0, 2, 3]]), np.array([[-1.0, 5, 9]]))
    (1.0, 0)
    """
    from scipy.stats import rankdata

    ra = rankdata(np.abs(a).reshape(len(a), -1), axis=1)
    rb = rankdata(np.abs(b).reshape(len(b), -1), axis=1)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    norm = np.sqrt((ra**2).sum(1) * (rb**2).sum(1))
    valid = norm > 0
    if not valid.any():
        return float("nan"), len(a)
    values = (ra * rb).sum(1)[valid] / norm[valid]
    return float(values.mean()), int((~valid).sum())


def names_with_patterns(methods: Sequence[str]) -> list[str]:
    """The methods of ``methods`` that need patterns."""
    return [m for m in methods if METHODS[m].needs_patterns]
