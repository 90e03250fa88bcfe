"""Slow, explicit reference implementations the package is tested against.

The references use none of captum_pattern's code paths: patches are cut out
one by one in NumPy, the pattern formulas are written from the paper (Eq. 4,
Eq. 8) in float64, and the substituted backward pass is the explicit Jacobian
of a copy of the model whose layers compute their real value forward but
differentiate through the substitute (``real.detach() + alt(x) - alt(x).detach()``).

The statistics helpers are not references: they drive the code under test
(:class:`~captum_pattern.statistics.PatternStatistics`) the way the tests need,
feeding it dense samples, copying it and merging two of them.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from captum_pattern.statistics import PatternStatistics

_NP_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def conv_padding(conv: nn.Module) -> list[tuple[int, int]]:
    """(left, right) padding per spatial dimension, from PyTorch's definition."""
    dims = len(conv.kernel_size)
    if conv.padding == "valid":
        return [(0, 0)] * dims
    if conv.padding == "same":
        out = []
        for k, d in zip(conv.kernel_size, conv.dilation):
            total = d * (k - 1)
            out.append((total // 2, total - total // 2))
        return out
    return [(p, p) for p in conv.padding]


def explicit_patches(x: np.ndarray, conv: nn.Module) -> np.ndarray:
    """All input patches of a Conv1d/2d/3d: ``(samples, groups, C_in/groups * prod(k))``.

    Samples are ordered (batch, output position).
    """
    dims = len(conv.kernel_size)
    pads = [(0, 0), (0, 0), *conv_padding(conv)]
    xp = np.pad(x, pads, mode=_NP_MODES[conv.padding_mode])
    n, c = x.shape[:2]
    groups = conv.groups
    k, s, d = conv.kernel_size, conv.stride, conv.dilation
    out_size = [(xp.shape[2 + i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(dims)]
    rows = []
    for b in range(n):
        for pos in itertools.product(*[range(o) for o in out_size]):
            index = [b, slice(None)]
            for i in range(dims):
                start = pos[i] * s[i]
                index.append(slice(start, start + d[i] * (k[i] - 1) + 1, d[i]))
            patch = xp[tuple(index)]  # (C, *k)
            rows.append(patch.reshape(groups, c // groups, -1).reshape(groups, -1))
    return np.stack(rows)


def layer_samples(
    layer: nn.Module, x: torch.Tensor, z_from_layer: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Per-neuron input samples and pre-activations (with bias) of a layer, float64.

    Returns ``X (S, O, D)`` (the patch each neuron sees) and ``Z (S, O)``.
    With ``z_from_layer``, ``Z`` is the layer's own output (e.g. float32) cast
    to float64 instead of the float64 product.
    """
    w = layer.weight.detach().double().numpy()
    b = np.zeros(w.shape[0]) if layer.bias is None else layer.bias.detach().double().numpy()
    xn = x.detach().double().numpy()
    if isinstance(layer, nn.Linear):
        flat = xn.reshape(-1, xn.shape[-1])
        X = np.repeat(flat[:, None, :], w.shape[0], axis=1)
    else:
        patches = explicit_patches(xn, layer)  # (S, G, D)
        per_group = w.shape[0] // layer.groups
        X = np.repeat(patches, per_group, axis=1)
    W = w.reshape(w.shape[0], -1)
    Z = np.einsum("sod,od->so", X, W) + b
    if z_from_layer:
        out = layer(x).detach().double()
        Z = (out.movedim(1, -1) if out.dim() > 2 else out).reshape(Z.shape).numpy()
    return X, Z


def patterns_from_samples(
    X: np.ndarray, Y: np.ndarray, gate: np.ndarray, W: np.ndarray
) -> dict[str, np.ndarray]:
    """Eq. 4 and Eq. 8 literally, per neuron, float64; zero where undefined.

    ``X (S, O, D)`` inputs, ``Y (S, O)`` outputs without bias, ``gate (S, O)``.
    """
    out = {"relu": [], "relu_negative": [], "linear": []}
    for j in range(W.shape[0]):
        x, y, g, w = X[:, j], Y[:, j], gate[:, j].astype(bool), W[j]
        ey = y.mean()
        for kind, mask in (("relu", g), ("relu_negative", ~g), ("linear", np.ones_like(g))):
            if mask.sum() == 0:
                out[kind].append(np.zeros_like(w))
                continue
            if kind == "linear":
                num = ((x - x.mean(0)) * (y - ey)[:, None]).mean(0)  # cov[x, y]
                den = ((y - ey) ** 2).mean()  # σ²_y
            else:
                exy = (x[mask] * y[mask, None]).mean(0)
                ex = x[mask].mean(0)
                num = exy - ex * ey
                den = w @ num
            out[kind].append(num / den if abs(den) > 1e-12 else np.zeros_like(w))
    return {k: np.stack(v) for k, v in out.items()}


def reference_layer_patterns(
    layer: nn.Module, batches: list[torch.Tensor], z_from_layer: bool = False
) -> dict[str, np.ndarray]:
    """Patterns of one layer from explicit patches over all ``batches``."""
    Xs, Zs = zip(*(layer_samples(layer, x, z_from_layer) for x in batches))
    X, Z = np.concatenate(Xs), np.concatenate(Zs)
    b = np.zeros(Z.shape[1]) if layer.bias is None else layer.bias.detach().double().numpy()
    W = layer.weight.detach().double().numpy().reshape(Z.shape[1], -1)
    return patterns_from_samples(X, Z - b, Z > 0, W)


# ------------------------------------------------------- statistics helpers
def add_dense_samples(
    stats: PatternStatistics, x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None
) -> None:
    """Add dense samples to ``stats`` by plain matrix products (one group only).

    ``x`` is ``(S, D)``, ``y = x wᵀ`` is ``(S, O)`` without the bias; the gate is
    ``y + bias > 0``.  The first call fixes the references at the sample means.
    """
    if stats.groups != 1:
        raise ValueError("add_dense_samples supports groups == 1 only")
    x = x.to(stats.device, torch.float64)
    y = y.to(stats.device, torch.float64)
    if not stats.has_reference:
        stats.set_reference(x.mean(0), y.mean(0))
    xc = x - stats.x_ref.reshape(1, -1)
    gate = (y + (0.0 if bias is None else bias.to(y)) > 0).to(y.dtype)
    yc = y - stats.y_ref
    parts = {"gy": gate * yc, "g": gate, "y": yc}
    sums = {k: parts[k].T @ xc for k in stats.stats if k != "x"}
    if "x" in stats.stats:
        sums["x"] = xc.sum(0, keepdim=True)
    scalars = {"n_pos": gate.sum(0), "s_y": yc.sum(0), "s_gy": (gate * yc).sum(0)}
    stats.add(x.shape[0], sums, scalars)


def copy_statistics(stats: PatternStatistics) -> PatternStatistics:
    """An independent copy of ``stats`` (through its state dict)."""
    new = PatternStatistics(
        stats.weight_shape, stats.groups, stats.stats, stats.device, stats.masked
    )
    new.load_state_dict(stats.state_dict())
    return new


def merge_statistics(into: PatternStatistics, other: PatternStatistics) -> None:
    """Add the samples of ``other`` (same layer, any references) to ``into``."""
    same = (other.weight_shape, other.groups, other.stats, other.masked)
    assert same == (into.weight_shape, into.groups, into.stats, into.masked)
    if not other.has_reference:
        return
    other = copy_statistics(other)
    if not into.has_reference:
        into.set_reference(other.x_ref, other.y_ref)
    other.rebase(into.x_ref, into.y_ref)
    into.add(0, other.sums, other.scalars, other.masks)
    into.n += other.n.to(into.device)


# ------------------------------------------------------------ backward pass
class _Swapped(nn.Module):
    """Real value forward, ``alt`` in the derivative."""

    def __init__(self, real: nn.Module, layer: nn.Module, alt: torch.Tensor) -> None:
        super().__init__()
        self.real, self.layer, self.alt = real, layer, alt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = self.real(x)
        if isinstance(self.layer, nn.Linear):
            fake = F.linear(x, self.alt)
        else:
            fake = self.layer._conv_forward(x, self.alt, None)
        return value.detach() + fake - fake.detach()


def _set_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    if name == "":
        return module
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
    return model


def swapped_copy(
    model: nn.Module, substitutes: dict[str, torch.Tensor], folds: dict[str, str]
) -> nn.Module:
    """A deep copy of ``model``; layer ``name`` differentiates through ``substitutes[name]``."""
    clone = copy.deepcopy(model).eval()
    for name, alt in substitutes.items():
        layer = clone.get_submodule(name)
        if name in folds:
            bn = clone.get_submodule(folds[name])
            real = nn.Sequential(layer, bn)
            clone = _set_module(clone, folds[name], nn.Identity())
        else:
            real = layer
        clone = _set_module(clone, name, _Swapped(real, copy.deepcopy(layer), alt.detach()))
    return clone


def reference_backward(
    model: nn.Module,
    substitutes: dict[str, torch.Tensor],
    folds: dict[str, str],
    inputs: tuple[torch.Tensor, ...],
    select: Callable[[torch.Tensor], torch.Tensor],
    start_from_output: bool = True,
    additional_args: tuple = (),
) -> tuple[torch.Tensor, ...]:
    """The explicit Jacobian of ``select(copy(inputs))``, one example at a time, times ``y``."""
    clone = swapped_copy(model, substitutes, folds)
    n = inputs[0].shape[0]
    rows: list[list[torch.Tensor]] = [[] for _ in inputs]
    for i in range(n):

        def f(*xs: torch.Tensor, i: int = i) -> torch.Tensor:
            full = [x.clone() for x in inputs]
            for k, xi in enumerate(xs):
                full[k] = torch.cat([full[k][:i], xi, full[k][i + 1 :]])
            return select(clone(*full, *additional_args))[i]

        xi = tuple(x[i : i + 1].detach() for x in inputs)
        jac = torch.autograd.functional.jacobian(f, xi)
        value = f(*xi).detach()
        scale = value if start_from_output else torch.ones_like(value)
        for k in range(len(inputs)):
            # jac[k] has shape value.shape + (1, *input.shape[1:]); contract over value
            contracted = torch.tensordot(scale, jac[k], dims=value.dim())
            rows[k].append(contracted)
    return tuple(torch.cat(r) for r in rows)
