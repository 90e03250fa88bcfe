"""The one mechanism: a backward pass with substituted weights.

Inside :func:`substituted_backward`, every explained layer's output is routed
through :class:`_SubstitutedBackward`, whose forward returns the real output
unchanged (no copy, no recomputation) and whose backward applies the layer's
transposed operation with another tensor in place of the weight.  Activation
gates, max-pool routing and everything else keep their ordinary gradients,
taken from the real forward pass.  For a layer with a folded BatchNorm the
pair is one layer: the substitution sits on the BatchNorm's output and the
gradient skips both modules.

Two generalisations of the paper's ReLU case (``docs/method.md``):

* a layer followed by an activation with a second sloped regime (LeakyReLU,
  PReLU) back-projects, per sample and neuron, with the substitute of the
  regime its pre-activation was in (``a₊`` in the open regime, ``a₋`` below);
  the regime's slope comes from the activation's own gradient;
* a standalone per-channel affine map (a BatchNorm that is not folded) is a
  linear layer with a diagonal weight ``s``: its gradient factor ``s`` is
  replaced by a per-channel factor (``1/s`` for PatternNet, ``s · 1/s`` for
  PatternAttribution).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .activations import Regimes
from .layers import LayerGeometry
from .tap import LayerTap, layer_tap, module_hooks

__all__ = ["Substitute", "substituted_backward"]


@dataclass(frozen=True)
class Substitute:
    """What replaces one layer's weight: ``open`` in the open regime, and, for an
    activation with a sloped lower regime, ``lower`` there (``regimes`` tells which)."""

    open: Tensor
    lower: Tensor | None = None
    regimes: Regimes | None = None


class _SubstitutedBackward(torch.autograd.Function):
    """Identity on ``out``; gradient to ``x`` through the substitute instead of the weight."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, out: Tensor, geometry: LayerGeometry, substitute: Substitute
    ) -> Tensor:
        ctx.geometry = geometry
        ctx.substitute = substitute
        ctx.input_shape = x.shape
        ctx.open = None
        if substitute.lower is not None and substitute.regimes is not None:
            ctx.open = substitute.regimes.gate(out.detach())
        return out.detach()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        sub, geometry = ctx.substitute, ctx.geometry
        weight = sub.open.to(grad.dtype)
        if ctx.open is None:
            return geometry.input_vjp(grad, weight, ctx.input_shape), None, None, None
        open_grad = grad * ctx.open
        result = geometry.input_vjp(open_grad, weight, ctx.input_shape)
        result += geometry.input_vjp(grad - open_grad, sub.lower.to(grad.dtype), ctx.input_shape)
        return result, None, None, None


class _ScaledBackward(torch.autograd.Function):
    """Identity on ``out``; gradient to ``x`` scaled per channel (dimension 1) by ``factor``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, out: Tensor, factor: Tensor) -> Tensor:  # type: ignore[override]
        ctx.factor = factor.reshape(-1, *[1] * (x.dim() - 2)) if x.dim() > 1 else factor
        return out.detach()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return grad * ctx.factor.to(grad.dtype), None, None


def _needs_substitution(x: Any) -> bool:
    return torch.is_grad_enabled() and isinstance(x, Tensor) and x.requires_grad


@contextmanager
def substituted_backward(
    model: nn.Module,
    weights: Mapping[str, Tensor | Substitute],
    folds: Mapping[str, str],
    affine: Mapping[str, Tensor] | None = None,
) -> Iterator[LayerTap]:
    """Substitute ``weights[name]`` for layer ``name``'s weight in the backward pass.

    ``folds`` maps a layer to the BatchNorm folded into it.  ``affine`` maps a
    standalone per-channel affine module (a BatchNorm that is not folded) to
    the factor that replaces its per-channel gradient.  The layers are hooked
    through :func:`captum_pattern.tap.layer_tap`: only forward passes run by
    the thread that entered the block are affected, and the hooks are removed
    when the block ends, also on an exception.  Call ``check()`` on the
    returned handle after a forward pass.

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
    substitutes = {
        name: w if isinstance(w, Substitute) else Substitute(w) for name, w in weights.items()
    }

    def substitute(name: str, x: Tensor, z: Tensor) -> Tensor | None:
        if not _needs_substitution(x):
            return None
        return _SubstitutedBackward.apply(x, z, geometries[name], substitutes[name])

    scaled = {
        model.get_submodule(name): _scaling_hook(factor) for name, factor in (affine or {}).items()
    }
    with module_hooks(scaled), layer_tap(model, list(weights), folds, substitute) as tap:
        yield tap


def _scaling_hook(factor: Tensor) -> Any:
    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
        if not (inputs and _needs_substitution(inputs[0]) and isinstance(output, Tensor)):
            return None
        return _ScaledBackward.apply(inputs[0], output, factor.to(output.device))

    return hook
