"""The one mechanism: a backward pass with substituted weights.

Inside :func:`substituted_backward`, every explained layer's output is routed
through :class:`_SubstitutedBackward`, whose forward returns the real output
unchanged (no copy, no recomputation) and whose backward applies the layer's
transposed operation with another tensor in place of the weight.  ReLU gates,
max-pool routing and everything else keep their ordinary gradients, taken
from the real forward pass.  For a layer with a folded BatchNorm the pair is
one layer: the substitution sits on the BatchNorm's output and the gradient
skips both modules.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .layers import LayerGeometry
from .tap import LayerTap, layer_tap

__all__ = ["substituted_backward"]


class _SubstitutedBackward(torch.autograd.Function):
    """Identity on ``out``; gradient to ``x`` through ``weight`` instead of the layer's."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, out: Tensor, geometry: LayerGeometry, weight: Tensor
    ) -> Tensor:
        ctx.geometry = geometry
        ctx.weight = weight
        ctx.input_shape = x.shape
        return out.detach()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        weight = ctx.weight if ctx.weight.dtype == grad.dtype else ctx.weight.to(grad.dtype)
        return ctx.geometry.input_vjp(grad, weight, ctx.input_shape), None, None, None


def _needs_substitution(x: Any) -> bool:
    return torch.is_grad_enabled() and isinstance(x, Tensor) and x.requires_grad


@contextmanager
def substituted_backward(
    model: nn.Module, weights: Mapping[str, Tensor], folds: Mapping[str, str]
) -> Iterator[LayerTap]:
    """Substitute ``weights[name]`` for layer ``name``'s weight in the backward pass.

    ``folds`` maps a layer to the BatchNorm folded into it.  The layers are
    hooked through :func:`captum_pattern.tap.layer_tap`: only forward passes
    run by the thread that entered the block are affected, and the hooks are
    removed when the block ends, also on an exception.  Call ``check()`` on
    the returned handle after a forward pass.

    Examples
    --------
    >>> lin = torch.nn.Linear(2, 1, bias=False)
    >>> alt = torch.tensor([[3.0, 5.0]])
    >>> x = torch.ones(1, 2, requires_grad=True)
    >>> with substituted_backward(lin, {"": alt}, {}):
    ...     torch.autograd.grad(lin(x).sum(), x)[0]
    tensor([[3., 5.]])
    """
    geometries = {name: LayerGeometry.from_module(model.get_submodule(name)) for name in weights}

    def substitute(name: str, x: Tensor, z: Tensor) -> Tensor | None:
        if not _needs_substitution(x):
            return None
        return _SubstitutedBackward.apply(x, z, geometries[name], weights[name])

    with layer_tap(model, list(weights), folds, substitute) as tap:
        yield tap
