"""Pictures of explanations, drawn through ``captum.attr.visualization``.

Following the paper (Fig. 1 and 6): functions and signals (gradient,
DeConvNet, Guided BackProp, PatternNet) are back-projections to input space,
shown in the input's own colour channels after the normalisation
``x / (2 max|x|) + 0.5``; attributions (LRP, PatternAttribution, ...) are heat
maps of per-pixel contributions, red positive and blue negative.

Figures are built as :class:`matplotlib.figure.Figure` objects, without pyplot:
nothing here chooses or changes the matplotlib backend (a notebook keeps its
own), and ``Figure.savefig`` renders a file with the writer its extension asks
for.  A returned figure needs no ``plt.close``; show it in a notebook by
leaving it as the cell's value, or with ``IPython.display.display(fig)``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from captum.attr import visualization as viz
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

__all__ = ["comparison_grid", "heat_map", "normalize_signal", "show_explanation"]


def normalize_signal(signal: Tensor) -> Tensor:
    """The paper's display normalisation, per example: ``x / (2 max|x|) + 0.5``.

    Maps each example to ``[0, 1]`` with zero at 0.5 (grey).

    >>> normalize_signal(torch.tensor([[-2.0, 0.0, 1.0]]))
    tensor([[0.0000, 0.5000, 0.7500]])
    """
    flat = signal.detach().reshape(signal.shape[0], -1)
    scale = flat.abs().max(dim=1).values.clamp_min(torch.finfo(flat.dtype).tiny)
    return (flat / (2 * scale[:, None]) + 0.5).reshape(signal.shape)


def heat_map(attribution: Tensor) -> Tensor:
    """Per-pixel relevance: the sum over channels, scaled to ``[-1, 1]`` per example.

    >>> heat_map(torch.tensor([[[[1.0, -3.0]], [[1.0, 0.0]]]]))
    tensor([[[ 0.6667, -1.0000]]])
    """
    summed = attribution.detach().sum(dim=1)
    scale = summed.reshape(summed.shape[0], -1).abs().max(dim=1).values
    scale = scale.clamp_min(torch.finfo(summed.dtype).tiny)
    return summed / scale.reshape(-1, *[1] * (summed.dim() - 1))


def _hwc(image: Tensor, rgb: bool = False) -> np.ndarray:
    """``(C, H, W)`` tensor to an ``(H, W, C)`` float array (grey as RGB with ``rgb``)."""
    image = image.detach().float().cpu()
    if rgb and image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    return image.permute(1, 2, 0).numpy()


def show_explanation(
    explanation: Tensor,
    group: str,
    axis: tuple[Figure, Axes],
    title: str | None = None,
) -> None:
    """Draw one ``(C, H, W)`` explanation on ``axis`` the way its group is read.

    ``group`` is ``"input"`` (the image itself), ``"function"`` or ``"signal"``
    (input space, normalised) or ``"attribution"``/``"baseline"`` (heat map).
    An explanation with NaN or Inf values is drawn as a grey panel saying so.
    """
    if explanation.dim() != 3:
        raise ValueError(f"expected a (C, H, W) tensor, got shape {tuple(explanation.shape)}")
    if not bool(torch.isfinite(explanation).all()):
        # nothing honest to draw: say so in the panel instead of failing the whole figure
        axis[1].imshow(np.full((*explanation.shape[1:], 3), 0.85), vmin=0, vmax=1)
        axis[1].text(0.5, 0.5, "not finite", ha="center", va="center", transform=axis[1].transAxes)
        axis[1].set_title(title or "", fontsize=8)
        return
    hwc = _hwc(explanation)
    if group in ("input", "function", "signal"):
        if group == "input":
            image = explanation - explanation.min()
            image = image / image.max().clamp_min(1e-12)
        else:
            image = normalize_signal(explanation[None])[0]
        image_hwc = _hwc(image, rgb=True)
        viz.visualize_image_attr(
            image_hwc, image_hwc, method="original_image", plt_fig_axis=axis, use_pyplot=False
        )
    else:
        if not np.any(hwc):
            hwc = hwc + 1e-12  # captum refuses an all-zero map
        viz.visualize_image_attr(
            hwc,
            method="heat_map",
            sign="all",
            cmap="bwr",
            outlier_perc=1,
            plt_fig_axis=axis,
            use_pyplot=False,
        )
    axis[1].set_title(title or "", fontsize=8)


def comparison_grid(
    images: Tensor,
    explanations: Mapping[str, Tensor],
    groups: Mapping[str, str],
    row_titles: Sequence[str] | None = None,
    path: str | os.PathLike[str] | None = None,
    cell_size: float = 1.6,
) -> Figure:
    """One row per image, one column per method (the paper's Fig. 1/6 layout).

    ``explanations`` maps method names to ``(N, C, H, W)`` tensors, ``groups``
    maps them to their group (see :func:`show_explanation`).  Saves to ``path``
    when given.

    >>> import torch
    >>> x = torch.rand(2, 1, 8, 8)
    >>> fig = comparison_grid(x, {"Gradient": x - 0.5}, {"Gradient": "function"})
    >>> len(fig.axes)
    4
    """
    names = list(explanations)
    rows, cols = images.shape[0], len(names) + 1
    fig = Figure(figsize=(cell_size * cols, cell_size * rows + 0.4))
    axes = fig.subplots(rows, cols, squeeze=False)
    for i in range(rows):
        label = row_titles[i] if row_titles is not None else None
        show_explanation(images[i], "input", (fig, axes[i, 0]), label)
        if i == 0 and label is None:
            axes[i, 0].set_title("input", fontsize=8)
        for j, name in enumerate(names, start=1):
            title = name if i == 0 else None
            show_explanation(explanations[name][i], groups[name], (fig, axes[i, j]), title)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig
