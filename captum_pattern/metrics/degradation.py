"""Patch degradation (the paper's Fig. 4, after Samek et al. 2017).

Split each image into non-overlapping ``p×p`` patches (the last row and column
of patches are cut short when ``p`` does not divide the image), rank them by
their summed attribution (all channels), and for ``n = 1..steps`` replace the
``n`` highest-ranked patches by the per-channel mean of the image.  Record the
softmax probability of the class the model predicted for the intact image.
The faster the curve falls, the better the attribution ranks what the model
uses; a random patch order is the baseline.  All perturbed images of a step go
through the model in one batched forward.
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..canonize import model_state_guard
from ..errors import InvalidInputError

__all__ = ["Degradation", "patch_degradation", "patch_scores"]

AttributionSource = Tensor | Callable[[Tensor, Tensor], Tensor] | Any


@dataclass
class Degradation:
    """Curves of one patch-degradation run.

    Attributes
    ----------
    curves:
        ``(N, steps + 1)``: the probability of the originally predicted class
        after replacing ``n = 0..steps`` patches in attribution order.
    random_curves:
        The same in a random patch order (``None`` when not asked for).
    predicted:
        ``(N,)``: the class predicted for each intact image.
    patch_size:
        ``p``.
    """

    curves: Tensor
    random_curves: Tensor | None
    predicted: Tensor
    patch_size: int

    @property
    def mean_curve(self) -> Tensor:
        """The curve averaged over images."""
        return self.curves.mean(0)

    @property
    def area(self) -> float:
        """Mean of the averaged curve over ``n = 0..steps``: smaller is better."""
        return float(self.curves.mean())

    @property
    def random_area(self) -> float | None:
        """:attr:`area` of the random order."""
        return None if self.random_curves is None else float(self.random_curves.mean())


def patch_scores(attributions: Tensor, patch_size: int) -> Tensor:
    """Summed attribution per ``p×p`` patch: ``(N, rows · cols)``, row-major.

    >>> patch_scores(torch.arange(9.0).reshape(1, 1, 3, 3), 2)
    tensor([[ 8.,  7., 13.,  8.]])
    """
    summed = attributions.sum(1) if attributions.dim() == 4 else attributions
    n, h, w = summed.shape
    rows, cols = math.ceil(h / patch_size), math.ceil(w / patch_size)
    padded = F.pad(summed, (0, cols * patch_size - w, 0, rows * patch_size - h))
    blocks = padded.reshape(n, rows, patch_size, cols, patch_size)
    return blocks.sum((2, 4)).reshape(n, rows * cols)


def _patch_index(h: int, w: int, patch_size: int, device: torch.device) -> Tensor:
    """``(H, W)``: the row-major index of the patch each pixel belongs to."""
    cols = math.ceil(w / patch_size)
    rows = torch.arange(h, device=device) // patch_size
    columns = torch.arange(w, device=device) // patch_size
    return rows[:, None] * cols + columns[None, :]


def _ranks(order: Tensor) -> Tensor:
    """``ranks[i, order[i, r]] = r``."""
    ranks = torch.empty_like(order)
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return ranks.scatter_(1, order, positions)


def _attributions(source: AttributionSource, images: Tensor, target: Tensor) -> Tensor:
    if isinstance(source, Tensor):
        return source
    if hasattr(source, "attribute"):
        return source.attribute(images, target=target)
    if callable(source):
        return source(images, target)
    raise TypeError(
        f"attributions is a {type(source).__name__}; expected a tensor, a Captum attribution "
        "object or a callable (images, target) -> tensor"
    )


def patch_degradation(
    model: nn.Module,
    images: Tensor,
    attributions: AttributionSource,
    patch_size: int | None = None,
    steps: int | None = None,
    random_baseline: bool = True,
    fill: str = "image_mean",
    seed: int = 0,
    batch_size: int | None = None,
) -> Degradation:
    """Degradation curves of ``model`` on ``images`` in the patch order of ``attributions``.

    Parameters
    ----------
    model:
        A classifier returning logits ``(N, classes)``.
    images:
        ``(N, C, H, W)``.
    attributions:
        A tensor shaped like ``images`` (or ``(N, H, W)``), a Captum attribution
        object (its ``attribute(images, target=predicted)`` is called) or a
        callable ``(images, predicted) -> attributions``.
    patch_size:
        ``p``.  Default: the paper's 9 pixels at 224, scaled with the image,
        ``max(1, round(9 · min(H, W) / 224))`` (9 at 224 px, 1 at 32 px or
        less), so that small images get many patches rather than one.  A patch
        that does not fit in the image is an error.
    steps:
        The number of steps ``N``.  Default: 100, or the number of patches
        when there are fewer.  A larger number than there are patches is cut
        to the number of patches, with a warning.
    random_baseline:
        Also run the random patch order (seeded by ``seed``).
    fill:
        ``"image_mean"`` (each channel's mean over the whole image, default) or
        ``"patch_mean"`` (each channel's mean over the patch itself; the
        paper's "their mean per color channel" can be read either way).
    batch_size:
        Images per forward.  Default: every perturbed image of a step (both
        orders) in one forward; set it when they do not fit in memory.

    Examples
    --------
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    >>> images = torch.rand(5, 1, 4, 4)
    >>> result = patch_degradation(model, images, images, patch_size=2, steps=3)
    >>> result.curves.shape, result.random_curves.shape
    (torch.Size([5, 4]), torch.Size([5, 4]))
    """
    if images.dim() != 4:
        raise InvalidInputError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if fill not in ("image_mean", "patch_mean"):
        raise InvalidInputError(f"fill must be 'image_mean' or 'patch_mean', got {fill!r}")
    patch_size, steps = _checked_sizes(images.shape[-2:], patch_size, steps)

    def forward(x: Tensor) -> Tensor:
        if batch_size is None or len(x) <= batch_size:
            return model(x)
        return torch.cat([model(part) for part in x.split(batch_size)])

    with model_state_guard(model):
        with torch.no_grad():
            logits = forward(images)
            predicted = logits.argmax(1)
            first = logits.softmax(1).gather(1, predicted[:, None])[:, 0]
        heat = _attributions(attributions, images, predicted).detach().to(images.device)
        if heat.shape[0] != images.shape[0] or heat.shape[-2:] != images.shape[-2:]:
            raise InvalidInputError(
                f"attributions of shape {tuple(heat.shape)} do not match images of shape "
                f"{tuple(images.shape)}"
            )
        if heat.is_complex():
            raise InvalidInputError(f"attributions have dtype {heat.dtype}; give real values")
        finite = torch.isfinite(heat).flatten(1).all(1)
        if not bool(finite.all()):
            bad = (~finite).nonzero()[:, 0].tolist()
            raise InvalidInputError(
                f"the attributions of image(s) {bad[:10]} hold NaN or Inf: their patches have "
                "no order; explain those images in float64, or leave them out"
            )
        n, _, h, w = images.shape
        scores = patch_scores(heat.float(), patch_size)
        count = scores.shape[1]
        orders = [scores.argsort(dim=1, descending=True, stable=True)]
        if random_baseline:
            generator = torch.Generator().manual_seed(seed)
            random = torch.stack([torch.randperm(count, generator=generator) for _ in range(n)])
            orders.append(random.to(images.device))
        ranks = torch.cat([_ranks(o) for o in orders])  # (R·N, patches)
        batch = images.repeat(len(orders), 1, 1, 1)
        filler = _filler(batch, patch_size, fill)
        pixel_patch = _patch_index(h, w, patch_size, images.device)
        pixel_rank = ranks[:, pixel_patch.reshape(-1)].reshape(-1, 1, h, w)
        target = predicted.repeat(len(orders))
        columns = [first.repeat(len(orders))]
        with torch.no_grad():
            for step in range(1, steps + 1):
                perturbed = torch.where(pixel_rank < step, filler, batch)
                probs = forward(perturbed).softmax(1)
                columns.append(probs.gather(1, target[:, None])[:, 0])
        curves = torch.stack(columns, 1).cpu().reshape(len(orders), n, steps + 1)
    return Degradation(
        curves[0], curves[1] if random_baseline else None, predicted.cpu(), patch_size
    )


def _whole(value: Any, name: str) -> int:
    """``value`` as an ``int`` of at least 1, or an :class:`InvalidInputError` naming ``name``."""
    try:
        number = operator.index(value) if not isinstance(value, bool) else None
    except TypeError:
        number = None
    if number is None or number < 1:
        raise InvalidInputError(f"{name} must be a whole number >= 1, got {value!r}")
    return number


def _checked_sizes(
    size: tuple[int, ...], patch_size: int | None, steps: int | None
) -> tuple[int, int]:
    """``patch_size`` and ``steps`` checked against the image size, defaults filled in."""
    h, w = size
    if patch_size is None:
        patch_size = max(1, round(9 * min(h, w) / 224))
    patch_size = _whole(patch_size, "patch_size")
    if patch_size > min(h, w):
        raise InvalidInputError(
            f"patch_size {patch_size} does not fit in {h}×{w} images (it would leave one row "
            f"or one patch); use at most {min(h, w)}, or leave patch_size out: the default "
            "scales the paper's 9 px at 224 px with the image"
        )
    count = math.ceil(h / patch_size) * math.ceil(w / patch_size)
    if steps is None:
        return patch_size, min(100, count)
    steps = _whole(steps, "steps")
    if steps > count:
        warnings.warn(
            f"steps={steps} but {h}×{w} images have only {count} patches of {patch_size}×"
            f"{patch_size}: the curves stop after {count} steps",
            stacklevel=3,
        )
    return patch_size, min(steps, count)


def _filler(images: Tensor, patch_size: int, fill: str) -> Tensor:
    """What replaced pixels become: the image's or the patch's per-channel mean."""
    if fill == "image_mean":
        return images.mean((2, 3), keepdim=True).expand_as(images)
    n, c, h, w = images.shape
    rows, cols = math.ceil(h / patch_size), math.ceil(w / patch_size)
    pad = (0, cols * patch_size - w, 0, rows * patch_size - h)
    sums = F.pad(images, pad).reshape(n, c, rows, patch_size, cols, patch_size).sum((3, 5))
    counts = F.pad(images.new_ones(1, 1, h, w), pad)
    counts = counts.reshape(1, 1, rows, patch_size, cols, patch_size).sum((3, 5))
    means = sums / counts
    return means.repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)[..., :h, :w]
