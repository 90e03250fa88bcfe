"""Sanity checks (Adebayo et al. 2018): do the explanations depend on the model's weights?

Model-parameter randomisation on the digits CNN: layer by layer from the top
(cascading: every layer above stays random too) and one layer at a time
(independent), each layer re-initialised with its own ``reset_parameters()``
(PyTorch's default initialisation, as Quantus's MPRT does).  Similarity of
each explanation with the trained model's: the Spearman rank correlation of
the absolute attributions, averaged over test images (1: the same ranking).

Pattern methods under two protocols: the patterns fitted on the trained model
kept fixed (what Quantus's MPRT does with an ``explain_func`` that holds
patterns), and patterns refitted on each randomised model from the same data
(how the method is used: patterns belong to the weights they were fitted on).
"""

from __future__ import annotations

import copy

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from evaluation_nets import explain_any, mean_spearman, predicted, trained_net
from results import markdown_table
from suite import ALL_METHODS, Config, fit_patterns
from torch import nn

from captum_pattern.compare import METHODS

IMAGES = 64


def _explained(model: nn.Module) -> list[str]:
    """Linear and conv layers, top (output) first."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return names[::-1]


def _randomised(model: nn.Module, layers: list[str], seed: int = 0) -> nn.Module:
    """A copy of ``model`` with ``layers`` re-initialised (seeded per layer)."""
    clone = copy.deepcopy(model).eval()
    order = _explained(model)
    for name in layers:
        torch.manual_seed(seed + order.index(name))
        clone.get_submodule(name).reset_parameters()
    return clone


def _rows(methods: list[str]) -> list[tuple[str, str, str | None]]:
    """(row label, method, protocol) for every method and both pattern protocols."""
    rows = []
    for method in methods:
        if METHODS[method].needs_patterns:
            rows.append((f"{method}, patterns fixed", method, "fixed"))
            rows.append((f"{method}, patterns refitted", method, "refit"))
        else:
            rows.append((method, method, None))
    return rows


def _plot(similarity: dict, layers: list[str], rows: list, path: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.4), sharey=True)
    colours = plt.get_cmap("tab10").colors
    methods = list(dict.fromkeys(m for _, m, _ in rows))
    for ax, protocol in zip(axes, similarity):
        for label, method, patterns in rows:
            values = [1.0] + [similarity[protocol][label][layer][0] for layer in layers]
            ax.plot(
                range(len(values)),
                values,
                "--" if patterns == "fixed" else "-",
                marker="o",
                ms=3,
                color="black" if method == "Random" else colours[methods.index(method) % 10],
                label=label,
            )
        ax.set_xticks(range(len(layers) + 1))
        ax.set_xticklabels(["trained", *layers], rotation=30)
        ax.axhline(0, color="black", lw=0.5)
        ax.set_title(f"{protocol} randomisation (from the top)", fontsize=10)
        ax.set_xlabel("layer randomised")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Spearman rank corr. of |explanation|")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center right")
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def test_model_parameter_randomisation(config: Config, results):
    net = trained_net(config, "digits CNN")
    images = net.test_x[:IMAGES]
    x = images.numpy()
    target = predicted(net.model, images).numpy()  # the trained model's class, kept fixed
    layers = _explained(net.model)
    rows = _rows(list(ALL_METHODS))
    original = {m: explain_any(net.model, x, target, m, net.patterns) for m in ALL_METHODS}

    similarity: dict[str, dict[str, dict[str, tuple[float, int]]]] = {}
    for protocol in ("cascading", "independent"):
        similarity[protocol] = {label: {} for label, _, _ in rows}
        for i, layer in enumerate(layers):
            randomised = layers[: i + 1] if protocol == "cascading" else [layer]
            model = _randomised(net.model, randomised)
            refitted = fit_patterns(model, net.fit_x, batch_size=64)
            for label, method, patterns in rows:
                use = refitted if patterns == "refit" else net.patterns
                heat = explain_any(model, x, target, method, use)
                similarity[protocol][label][layer] = mean_spearman(original[method], heat)

    _plot(similarity, layers, rows, str(results.figure("sanity_checks.png")))

    def cell(value: tuple[float, int]) -> str:
        mean, constant = value
        text = "—" if np.isnan(mean) else f"{mean:.2f}"
        return text + (f" ({constant}∅)" if constant else "")

    tables = []
    for protocol, table in similarity.items():
        tables.append(f"**{protocol} randomisation**, layer(s) re-initialised from the top:\n")
        body = [[label, *[cell(table[label][layer]) for layer in layers]] for label, _, _ in rows]
        tables.append(markdown_table(["method", *layers], body))
        tables.append("")
    results.add(
        "sanity_checks",
        "Sanity checks: model-parameter randomisation (digits CNN)",
        f"Mean Spearman rank correlation of |explanation| with the trained model's, over "
        f"{IMAGES} test images (target: the trained model's predicted class); `(n∅)`: n "
        "images whose randomised explanation is constant (all zero), left out of the mean. "
        "Figure: `sanity_checks.png`.\n\n" + "\n".join(tables),
        {p: {label: dict(t) for label, t in table.items()} for p, table in similarity.items()},
    )

    top = layers[0]
    cascade = similarity["cascading"]
    independent = similarity["independent"]
    # PatternNet's backward pass never reads the top layer's weight, only its pattern: with
    # the patterns fixed, randomising the top layer only rescales the map by the new output
    # (start_from="output"), so the ranking of |explanation| cannot change
    for variant in ("PatternNet", "PatternNet (linear)"):
        assert cascade[f"{variant}, patterns fixed"][top][0] > 1 - 1e-6
    # with refitted patterns the top layer's pattern follows its new weights
    assert cascade["PatternNet, patterns refitted"][top][0] < 0.99
    # the gradient reads every weight: it changes when the top layer does
    assert cascade["Gradient"][top][0] < 0.99
    # PatternAttribution uses w ⊙ a at the top layer: fixed patterns still see the new w
    assert cascade["PatternAttribution, patterns fixed"][top][0] < 0.99
    # randomising the top layer alone is the first step of both protocols
    for label, _, _ in rows:
        np.testing.assert_allclose(
            cascade[label][top][0], independent[label][top][0], equal_nan=True
        )
