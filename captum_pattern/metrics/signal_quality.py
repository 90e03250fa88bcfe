r"""ρ, the quality of a signal estimator (Kindermans et al. 2018, Eq. 1), in closed form.

For a neuron with filter ``w``, output ``y = wᵀx`` (no bias) and gate
``g = (wᵀx + b > 0)``, every estimator here has the form

    S(x) = a₊·y·g + a₋·y·(1 − g),        d = x − S(x),

(S_a+-: the fitted ``a₊``, ``a₋``; S_a: ``a₊ = a₋ = a``; the filter-based
S_w: ``a = w / wᵀw``; the random baseline: ``a = r / wᵀr``) and

    ρ(S) = 1 − corr(y, vᵀd),    v = Cov₂[d]⁻¹ Cov₂[d, y],

with ``v`` the least-squares regression of ``y`` on ``d`` over the second data
split and the correlation taken on the third (the paper's protocol; the
patterns come from the first).  ``ρ = 1`` means the residual holds no linear
trace of ``y``; ``ρ ≈ 0`` means ``y`` can be read off the residual.

With ``u = y·g`` and ``t = y·(1 − g)`` (so ``u·t = 0``),

    Cov[d]    = Cov[x] + U M Uᵀ,   U = [a₊, a₋, Cov[x, u], Cov[x, t]]
    Cov[d, y] = U β,               β = (−Cov[u, y], −Cov[t, y], 1, 1)

where ``M`` holds ``Var u``, ``Var t``, ``Cov[u, t]`` and ``−1``s.  With
``A = Cov[x] + λI`` (one Cholesky per layer and group, shared by every
neuron), ``G = A⁻¹U`` and ``K = UᵀG``, Woodbury's identity gives

    v = G (I + M K)⁻¹ β,

a 4×4 solve per neuron.  Split 2 needs ``Σ x``, ``Σ x xᵀ``, ``Σ x u``,
``Σ x t`` and scalar sums; split 3 only ``vᵀd = (v − (vᵀa₋)·w)ᵀx − α·u``
with ``α = vᵀa₊ − vᵀa₋`` (one convolution with the stacked maps of all neurons
and estimators, or one matmul on sampled patches) and scalar sums.

Cost and memory per layer with patch size ``D`` (``C_in/groups · kernel``) and
``O`` neurons: the split-2 pass builds the patches (in chunks of 8 MiB) and
adds ``PᵀP``: ``D/O`` times the layer's forward cost per position used, and
the split-3 pass convolves with ``4·O`` maps for the four estimators, hence
``max_positions``.  The accumulators take
``8·D²`` bytes per group (float64) plus ``16·D·O``; the solve another
``8·D²`` (the factor) and ``7·8·D`` per neuron in chunks: seven right-hand
sides per neuron for the four estimators (``c_u``, ``c_t``, the random, filter
and linear ``a``, and ``a₊``, ``a₋``), i.e. ``14·D²·O`` flops in triangular
solves — the largest cost for wide dense layers (about 1 TFLOP for VGG-16's
``fc7``: a minute on two CPU cores, well under a second on a GPU).  For VGG-16 at
224 px: ``D ≤ 4608`` in the convolutions (≤ 170 MiB each, 1.1 GiB for all
13), 25088 in ``fc6`` (5 GiB accumulator, ~11 GiB at the solve; pass
``layers`` to treat it alone), 4096 in ``fc7``/``fc8`` (134 MiB).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..canonize import folded_parameters, model_state_guard
from ..errors import InvalidDataError
from ..layers import LayerGeometry, layer_weight
from ..patterns import LayerPatterns, Patterns
from ..runner import StreamRunner
from ..tap import explained_layers, layer_tap

__all__ = ["ESTIMATORS", "SignalQuality", "estimator_patterns", "rho_means", "signal_quality"]

#: The estimators of Fig. 3: random directions, the filter S_w, S_a, S_a+-.
ESTIMATORS: tuple[str, ...] = ("random", "filter", "linear", "two_component")

# elements per patch/score chunk: 8 MiB in float32 stays below glibc's mmap threshold,
# so the buffers are reused instead of page-faulted in afresh (4× faster than 128 MiB)
_CHUNK_ELEMENTS = 1 << 21


def estimator_patterns(
    weight: Tensor,
    layer: LayerPatterns | None,
    estimator: str,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """``(a₊, a₋)`` of ``estimator`` for a layer with flattened ``weight`` ``(O, D)``.

    ``"random"``: ``r / wᵀr`` with ``r ~ N(0, I)``; ``"filter"``: ``w / wᵀw``
    (zero for an all-zero filter); ``"linear"``: the fitted ``a``;
    ``"two_component"``: the fitted ``a₊`` and ``a₋``.  Every row satisfies
    ``wᵀa = 1`` (or is zero).

    >>> w = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    >>> estimator_patterns(w, None, "filter")[0]
    tensor([[ 0.5000, -0.5000]], dtype=torch.float64)
    """
    w = weight.reshape(weight.shape[0], -1)
    if estimator == "random":
        r = torch.randn(w.shape, generator=generator, dtype=torch.float64).to(w)
        a = r / (w * r).sum(1, keepdim=True)
        return a, a
    if estimator == "filter":
        norm = (w * w).sum(1, keepdim=True)
        a = torch.where(norm > 0, w / norm.clamp_min(torch.finfo(w.dtype).tiny), 0.0)
        return a, a
    if estimator not in ("linear", "two_component"):
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {ESTIMATORS}")
    if layer is None:
        raise ValueError(f"the {estimator!r} estimator needs fitted patterns")
    if estimator == "linear":
        a = layer.pattern("linear").reshape(w.shape).to(w)
        return a, a
    a_plus = layer.pattern("relu").reshape(w.shape).to(w)
    a_minus = layer.pattern("relu_negative").reshape(w.shape).to(w)
    return a_plus, a_minus


def rho_means(result: Mapping[str, Mapping[str, Tensor]]) -> dict[str, dict[str, float]]:
    """The mean ρ over each layer's neurons (undefined neurons left out), per estimator.

    >>> rho_means({"fc": {"filter": torch.tensor([0.5, float("nan"), 1.0])}})
    {'fc': {'filter': 0.75}}
    """
    return {
        layer: {est: float(rho[~rho.isnan()].mean()) for est, rho in by_est.items()}
        for layer, by_est in result.items()
    }


class SignalQuality(dict):
    """ρ per layer and estimator, ``{layer: {estimator: (O,) tensor}}``, and how it went.

    Attributes
    ----------
    seconds:
        Wall time of the ``v_pass`` (split 2), the ``solve`` and the
        ``eval_pass`` (split 3).
    ridge:
        Per layer, the relative ridge finally used (it grows tenfold from the
        one asked for while ``Cov[x] + λI`` is not positive definite).
    """

    def __init__(
        self,
        rho: Mapping[str, Mapping[str, Tensor]],
        seconds: Mapping[str, float],
        ridge: Mapping[str, float],
    ) -> None:
        super().__init__({layer: dict(by_est) for layer, by_est in rho.items()})
        self.seconds = dict(seconds)
        self.ridge = dict(ridge)


class _LayerSamples:
    """How one layer's samples are read: its geometry, folded weight and patches."""

    def __init__(
        self,
        name: str,
        module: nn.Module,
        bn: nn.Module | None,
        max_positions: int | None,
        generator: torch.Generator,
    ) -> None:
        self.name = name
        self.geometry = LayerGeometry.from_module(module)
        weight, bias = folded_parameters(module, bn, dtype=torch.float64)
        self.weight = weight.reshape(weight.shape[0], -1)
        self.bias = torch.zeros(weight.shape[0], dtype=torch.float64) if bias is None else bias
        self.max_positions = max_positions
        self.generator = generator
        self.device = layer_weight(module).device
        self.groups = self.geometry.groups
        self.out_per_group = self.geometry.out_channels // self.groups
        self.dim = self.weight.shape[1]

    def _columns(
        self, x: Tensor, z: Tensor, subsample: bool, reference: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Patches as columns ``(K, C, S)`` and pre-activations ``(O, S)`` of one chunk.

        Rows are ordered (kernel offset, channel), not the weight's (channel,
        kernel offset): :meth:`solve` reorders the sums once.  With
        ``reference`` ``(K, C, 1)``, the patches come out centred on it (one
        pass: the copy and the subtraction are the same operation).
        """
        geo = self.geometry
        if geo.spatial_dims == 0:
            columns = x.reshape(-1, x.shape[-1]).T.unsqueeze(0)
            if reference is not None:
                columns = columns - reference
            return columns, z.reshape(-1, z.shape[-1]).T
        out_shape = tuple(z.shape[2:])
        positions = math.prod(out_shape)
        n, c = x.shape[:2]
        padded = geo.padded(x).transpose(0, 1)  # (C, N, *padded)
        offsets = list(itertools.product(*(range(k) for k in geo.weight_shape[2:])))
        outputs = z.transpose(0, 1).reshape(z.shape[1], -1)
        if subsample and self.max_positions is not None and self.max_positions < positions:
            # a random subset of positions per image: gather only those patches
            count = self.max_positions
            pick = (
                torch.rand(n, positions, generator=self.generator)
                .topk(count, 1, largest=False)
                .indices
            )
            pick = pick.to(x.device)
            keep = (pick + positions * torch.arange(n, device=x.device)[:, None]).flatten()
            padded = padded.contiguous()
            steps = padded.stride()[1:]  # of (N, *padded) inside one channel
            where = torch.unravel_index(pick.flatten(), out_shape)
            base = steps[0] * keep.div(positions, rounding_mode="floor")
            for d, coord in enumerate(where):
                base = base + coord * geo.stride[d] * steps[1 + d]
            flat = padded.reshape(c, -1)
            columns = x.new_empty(len(offsets), c, len(keep))
            for k, offset in enumerate(offsets):
                shift = sum(o * dl * st for o, dl, st in zip(offset, geo.dilation, steps[1:]))
                torch.index_select(flat, 1, base + shift, out=columns[k])
            if reference is not None:
                columns.sub_(reference)
            return columns, outputs.index_select(1, keep)
        # every position: one strided slice of the padded input per kernel offset
        columns = x.new_empty(len(offsets), c, n * positions)
        for k, offset in enumerate(offsets):
            index = [slice(None), slice(None)]
            for o, d, s, size in zip(offset, geo.dilation, geo.stride, out_shape):
                index.append(slice(o * d, o * d + s * (size - 1) + 1, s))
            target = columns[k].view(c, n, *out_shape)
            if reference is None:
                target.copy_(padded[tuple(index)])
            else:
                ref = reference[k].reshape(c, *(1,) * (1 + len(out_shape)))
                torch.sub(padded[tuple(index)], ref, out=target)
        return columns, outputs

    def _image_chunks(self, x: Tensor, per_item: int) -> int:
        if self.geometry.spatial_dims == 0:
            return max(1, x.shape[0])
        return max(1, _CHUNK_ELEMENTS // max(1, per_item))

    def split_u_t(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``y = z − b`` split by the gate ``z > 0``: ``(u, y)`` with ``u = y·g``."""
        y = z - self.bias.to(z.device, z.dtype)[:, None]
        return torch.where(z > 0, y, 0.0), y


class _VSums:
    """Split 2: the sums that fit ``v`` (``Σx``, ``Σxxᵀ``, ``Σxu``, ``Σxt``, scalars)."""

    def __init__(self, layer: _LayerSamples) -> None:
        self.layer = layer
        G, Og, D = layer.groups, layer.out_per_group, layer.dim
        self.n = 0
        self.reference: Tensor | None = None  # (K, C, 1): patches are centred on it
        f64, device = torch.float64, layer.device
        self.sum_x = torch.zeros(G, D, dtype=f64, device=device)
        self.sum_xx = torch.zeros(G, D, D, dtype=f64, device=device)
        self.sum_xut = torch.zeros(G, D, 2 * Og, dtype=f64, device=device)
        self.scalars = torch.zeros(4, G * Og, dtype=f64, device=device)  # Σu, Σt, Σu², Σt²

    def observe_v(self, x: Tensor, z: Tensor) -> None:
        layer = self.layer
        geo = layer.geometry
        dtype = x.dtype if x.dtype == torch.float64 else torch.float32
        x, z = x.to(dtype), z.to(dtype)
        if geo.spatial_dims:
            positions = z[0, 0].numel()
            step = layer._image_chunks(x, positions * layer.dim * layer.groups)
        else:
            x, z = x.reshape(-1, x.shape[-1]), z.reshape(-1, z.shape[-1])
            step = max(1, _CHUNK_ELEMENTS // max(1, layer.dim))
        for i in range(0, x.shape[0], step):
            chunk_x, chunk_z = x[i : i + step], z[i : i + step]
            reference = None if self.reference is None else self.reference.to(dtype)
            columns, outputs = layer._columns(chunk_x, chunk_z, True, reference)
            if self.reference is None:
                # centre on the first chunk's means: accurate float32 products for offset inputs
                self.reference = columns.mean(2, keepdim=True)
                columns = columns - self.reference
            self._add_v(columns, outputs)

    def _add_v(self, columns: Tensor, z: Tensor) -> None:
        """Add the sums of centred patch columns ``(K, C, S)`` and outputs ``(O, S)``."""
        G, Og = self.layer.groups, self.layer.out_per_group
        _, c, count = columns.shape
        u, y = self.layer.split_u_t(z)
        t = y - u
        self.n += count
        for g in range(G):
            xg = columns[:, g * (c // G) : (g + 1) * (c // G)].reshape(-1, count)
            block = slice(g * Og, (g + 1) * Og)
            self.sum_x[g] += xg.sum(1).double()
            self.sum_xx[g] += (xg @ xg.T).double()
            self.sum_xut[g] += (xg @ torch.cat([u[block], t[block]]).T).double()
        self.scalars += torch.stack([u.sum(1), t.sum(1), (u * u).sum(1), (t * t).sum(1)]).double()

    def _weight_order(self) -> None:
        """Reorder the sums from (kernel offset, channel) to the weight's (channel, offset)."""
        k = math.prod(self.layer.geometry.weight_shape[2:])
        if k == 1:
            return
        per_group = self.layer.dim // k
        perm = (
            torch.arange(self.layer.dim, device=self.sum_x.device).reshape(k, per_group).T.flatten()
        )
        self.sum_x = self.sum_x[:, perm]
        self.sum_xx = self.sum_xx[:, perm][:, :, perm]
        self.sum_xut = self.sum_xut[:, perm]

    def covariances(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per group ``mean (G, D)``, ``Cov[x] (G, D, D)``, ``Cov[x, u]`` and ``Cov[x, t]``
        ``(G, D, O/G)``, in the weight's (channel, offset) order."""
        self._weight_order()
        n, Og = float(self.n), self.layer.out_per_group
        mu, mt = self.scalars[0] / n, self.scalars[1] / n
        mean = self.sum_x / n
        cov = self.sum_xx / n - mean.unsqueeze(2) * mean.unsqueeze(1)
        cov = (cov + cov.transpose(1, 2)) / 2
        G = self.layer.groups
        c_u = self.sum_xut[:, :, :Og] / n - mean.unsqueeze(2) * mu.reshape(G, 1, Og)
        c_t = self.sum_xut[:, :, Og:] / n - mean.unsqueeze(2) * mt.reshape(G, 1, Og)
        return mean, cov, c_u, c_t


class _Solution:
    """``v`` of every neuron and estimator, folded into the linear map split 3 needs."""

    def __init__(
        self,
        layer: _LayerSamples,
        sums: _VSums,
        patterns: LayerPatterns | None,
        estimators: Sequence[str],
        ridge: float,
    ) -> None:
        self.layer = layer
        self.name = layer.name
        self.ridge_used = 0.0
        self.estimators = list(estimators)
        if sums.n == 0:
            raise ValueError(f"layer {self.name!r} saw no sample in v_data")
        v, mu, mt, weight, by_est = self._solve(sums, patterns, ridge)
        a_plus = torch.stack([by_est[e][0] for e in estimators])
        a_minus = torch.stack([by_est[e][1] for e in estimators])
        self._prepare_eval(sums, v, (v * a_plus).sum(-1), (v * a_minus).sum(-1), weight, mu, mt)

    def _solve(
        self, sums: _VSums, patterns: LayerPatterns | None, ridge: float
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, dict[str, tuple[Tensor, Tensor]]]:
        """``v (E, O, D)`` by Woodbury, one Cholesky per group (see the module's text)."""
        layer, estimators = self.layer, self.estimators
        G, Og, D = layer.groups, layer.out_per_group, layer.dim
        means, covs, c_us, c_ts = sums.covariances()
        device = means.device
        weight = layer.weight.to(device)
        by_est = {e: estimator_patterns(weight, patterns, e, layer.generator) for e in estimators}
        E = len(estimators)
        v = torch.zeros(E, G * Og, D, dtype=torch.float64, device=device)
        n = float(sums.n)
        mu, mt, muu, mtt = (s / n for s in sums.scalars)
        var_u, var_t, cov_ut = muu - mu * mu, mtt - mt * mt, -mu * mt
        for g in range(G):
            block = slice(g * Og, (g + 1) * Og)
            c_u, c_t = c_us[g], c_ts[g]
            factor = self._factor(covs[g], ridge)
            M = _woodbury_m(var_u[block], var_t[block], cov_ut[block])
            beta = torch.stack(
                [
                    -(var_u[block] + cov_ut[block]),
                    -(cov_ut[block] + var_t[block]),
                    torch.ones_like(mu[block]),
                    torch.ones_like(mu[block]),
                ],
                1,
            )
            # the distinct right-hand sides: c_u, c_t, then a₊ (and a₋ when it differs)
            slots: list[tuple[int, int]] = []
            sources: list[Tensor] = []
            for e in estimators:
                a_plus, a_minus = by_est[e]
                slots.append((len(sources) + 2, len(sources) + 2 + (a_minus is not a_plus)))
                sources += [a_plus] if a_minus is a_plus else [a_plus, a_minus]
            width = 2 + len(sources)
            # neurons in chunks: the right-hand sides take 8·D·width bytes per neuron
            step = max(1, _CHUNK_ELEMENTS // (D * width))
            eye = torch.eye(4, dtype=torch.float64, device=device)
            for lo in range(0, Og, step):
                hi = min(Og, lo + step)
                # (width, k, D) row-major is the column-major (D, width·k) LAPACK wants
                rhs = torch.empty(width, hi - lo, D, dtype=torch.float64, device=device)
                rhs[0], rhs[1] = c_u.T[lo:hi], c_t.T[lo:hi]
                for j, a in enumerate(sources):
                    rhs[2 + j] = a[block][lo:hi]
                solved = torch.cholesky_solve(rhs.view(-1, D).T, factor).T.reshape(rhs.shape)
                rhs, solved = rhs.transpose(0, 1).contiguous(), solved.transpose(0, 1).contiguous()
                gram = torch.bmm(rhs, solved.transpose(1, 2))  # (k, width, width): uᵢᵀ A⁻¹ uⱼ
                for i, (plus, minus) in enumerate(slots):
                    index = torch.tensor([plus, minus, 0, 1], device=device)
                    K = gram.index_select(1, index).index_select(2, index)
                    w = torch.linalg.solve(eye + M[lo:hi] @ K, beta[lo:hi].unsqueeze(-1))
                    # v = A⁻¹U·w: weights on the solved right-hand sides (a₊ twice if a₋ = a₊)
                    weights = torch.zeros(hi - lo, 1, width, dtype=torch.float64, device=device)
                    weights[:, 0].index_add_(1, index, w[..., 0])
                    v[i, g * Og + lo : g * Og + hi] = torch.bmm(weights, solved)[:, 0]
        return v, mu, mt, weight, by_est

    def _prepare_eval(
        self,
        sums: _VSums,
        v: Tensor,
        v_a_plus: Tensor,
        v_a_minus: Tensor,
        weight: Tensor,
        mu: Tensor,
        mt: Tensor,
    ) -> None:
        """Fold what split 3 needs into one linear map per neuron and estimator.

        ``vᵀd = vᵀx − (vᵀa₊)·u − (vᵀa₋)·t`` with ``t = y − u`` and ``y = wᵀx`` is
        ``(v − (vᵀa₋)·w)ᵀx − α·u`` with ``α = vᵀa₊ − vᵀa₋``: one convolution (or
        matmul) and one ``addcmul``.  The split-2 means of ``x`` and ``u`` give
        an offset that centres it, so float32 sums of split 3 stay accurate.
        """
        G, Og, D = self.layer.groups, self.layer.out_per_group, self.layer.dim
        self.alpha = v_a_plus - v_a_minus  # (E, O)
        self.v_eval = v - v_a_minus.unsqueeze(-1) * weight  # (E, O, D), weight order
        k = math.prod(self.layer.geometry.weight_shape[2:])
        # the split-2 mean of x in the weight's (channel, offset) order
        assert sums.reference is not None
        reference = sums.reference.double().reshape(k, G, D // k).transpose(0, 1)
        mean = sums.sum_x / sums.n + reference.transpose(1, 2).reshape(G, D).to(sums.sum_x)
        per_neuron = mean.repeat_interleave(Og, 0)  # (O, D)
        self.eval_offset = (self.v_eval * per_neuron).sum(-1) - self.alpha * mu  # (E, O)
        self.mean_y = mu + mt

    def _factor(self, cov: Tensor, ridge: float) -> Tensor:
        """Cholesky factor of ``Cov[x] + λI``; λ grows tenfold until it is positive definite.

        ``Cov[x]`` is often singular (dead inputs, fewer samples than ``D``) and
        its float32 batch sums can leave eigenvalues slightly below zero.
        """
        scale = float(cov.diagonal().mean()) or 1.0
        eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
        while True:
            factor, info = torch.linalg.cholesky_ex(cov + (ridge * scale) * eye)
            if int(info) == 0:
                self.ridge_used = max(self.ridge_used, ridge)
                return factor
            if ridge >= 1.0:
                raise ValueError(f"layer {self.name!r}: Cov[x] is not a covariance matrix")
            ridge = max(ridge * 10, 1e-12)


class _EvalSums:
    """Split 3: the sums of ``y`` and ``vᵀd`` that give the correlation, then ρ."""

    def __init__(self, solution: _Solution) -> None:
        self.layer = solution.layer
        self.solution = solution
        self.name = solution.name
        self.estimators = solution.estimators
        shape = (5, len(self.estimators), self.layer.weight.shape[0])
        self.eval_n = 0
        # Σy, Σy², Σr, Σr², Σry per estimator and neuron, r = vᵀd
        self.eval_sums = torch.zeros(shape, dtype=torch.float64, device=self.layer.device)

    def observe_eval(self, x: Tensor, z: Tensor) -> None:
        layer = self.layer
        geo = layer.geometry
        dtype = x.dtype if x.dtype == torch.float64 else torch.float32
        x, z = x.to(dtype), z.to(dtype)
        E, neurons = self.solution.v_eval.shape[:2]
        if geo.spatial_dims and layer.max_positions is None:
            step = layer._image_chunks(x, E * z[0].numel())
            for i in range(0, x.shape[0], step):
                self._eval_convolved(x[i : i + step], z[i : i + step], dtype)
            return
        if geo.spatial_dims:
            assert layer.max_positions is not None
            per_image = min(layer.max_positions, z[0, 0].numel()) * max(E * neurons, layer.dim)
            step = layer._image_chunks(x, per_image)
        else:
            x, z = x.reshape(-1, x.shape[-1]), z.reshape(-1, z.shape[-1])
            step = max(1, _CHUNK_ELEMENTS // max(1, E * neurons, layer.dim))
        for i in range(0, x.shape[0], step):
            columns, outputs = layer._columns(x[i : i + step], z[i : i + step], True, None)
            self._eval_columns(columns, outputs, dtype)

    def _eval_convolved(self, x: Tensor, z: Tensor, dtype: torch.dtype) -> None:
        """Split-3 sums over every output position: one convolution for all ``v``."""
        geo, sol = self.layer.geometry, self.solution
        E, G, Og = len(self.estimators), self.layer.groups, self.layer.out_per_group
        v = sol.v_eval.to(x.device, dtype)
        kernel = v.reshape(E, G, Og, -1).transpose(0, 1).reshape(G, E, Og, *geo.weight_shape[1:])
        bias = sol.eval_offset.to(x.device, dtype).reshape(E, G, Og).transpose(0, 1)
        conv = (F.conv1d, F.conv2d, F.conv3d)[geo.spatial_dims - 1]
        out = conv(
            geo.padded(x), kernel.flatten(0, 2), -bias.flatten(), geo.stride, 0, geo.dilation, G
        )
        out = out.reshape(x.shape[0], G, E, Og, -1).transpose(1, 2).flatten(2, 3)
        self._add_eval(out, z.reshape(*z.shape[:2], -1), dims=(0, 3))

    def _eval_columns(self, columns: Tensor, z: Tensor, dtype: torch.dtype) -> None:
        """Split-3 sums over patch columns ``(K, C, S)`` and outputs ``(O, S)``."""
        sol = self.solution
        E, G, Og = len(self.estimators), self.layer.groups, self.layer.out_per_group
        k, c, count = columns.shape
        v = sol.v_eval.to(columns.device, dtype)
        # the weight's (channel, offset) order to the columns' (offset, channel)
        v = v.reshape(E, G, Og, c // G, k).transpose(-1, -2).reshape(E, G, Og, -1)
        out = columns.new_empty(G, E * Og, count)
        for g in range(G):
            xg = columns[:, g * (c // G) : (g + 1) * (c // G)].reshape(-1, count)
            torch.mm(v[:, g].reshape(E * Og, -1), xg, out=out[g])
        out = out.reshape(G, E, Og, count).transpose(0, 1).reshape(E, G * Og, count)
        out.sub_(sol.eval_offset.to(out).unsqueeze(-1))
        self._add_eval(out.unsqueeze(0), z.unsqueeze(0), dims=(0, 3))

    def _add_eval(self, residual: Tensor, z: Tensor, dims: tuple[int, ...]) -> None:
        """Add the sums of ``vᵀd`` (``residual``: ``(N, E, O, P)``, offset-centred
        ``(v − (vᵀa₋)·w)ᵀx``) and ``y`` (from ``z``: ``(N, O, P)``)."""
        sol = self.solution
        u, y = self.layer.split_u_t(z)
        u = u.unsqueeze(1)
        residual.addcmul_(sol.alpha.to(u)[..., None], u, value=-1.0)  # vᵀd, centred
        y = (y - sol.mean_y.to(y)[:, None]).unsqueeze(1)
        self.eval_n += y.numel() // y.shape[2]
        # float32 sums of centred values per chunk, accumulated in float64
        self.eval_sums += torch.stack(
            [
                y.sum(dims).expand_as(self.eval_sums[0]),
                (y * y).sum(dims).expand_as(self.eval_sums[0]),
                residual.sum(dims),
                (residual * residual).sum(dims),
                (residual * y).sum(dims),
            ]
        ).double()

    def rho(self) -> dict[str, Tensor]:
        """ρ per neuron and estimator from the split-3 sums (NaN where undefined)."""
        if self.eval_n == 0:
            raise ValueError(f"layer {self.name!r} saw no sample in eval_data")
        n = float(self.eval_n)
        sy, syy, sr, srr, syr = (s / n for s in self.eval_sums)
        cov = syr - sy * sr
        var_y = (syy - sy * sy).clamp_min(0.0)
        var_r = (srr - sr * sr).clamp_min(0.0)
        denominator = (var_y * var_r).sqrt()
        corr = torch.where(denominator > 0, cov / denominator, torch.nan)
        rho = (1.0 - corr).cpu()
        return {e: rho[i] for i, e in enumerate(self.estimators)}


def _woodbury_m(var_u: Tensor, var_t: Tensor, cov_ut: Tensor) -> Tensor:
    """The 4×4 ``M`` of ``Cov[d] = Cov[x] + U M Uᵀ`` per neuron, ``U = [a₊, a₋, c_u, c_t]``."""
    M = torch.zeros(var_u.shape[0], 4, 4, dtype=var_u.dtype, device=var_u.device)
    M[:, 0, 0], M[:, 1, 1] = var_u, var_t
    M[:, 0, 1] = M[:, 1, 0] = cov_ut
    M[:, 0, 2] = M[:, 2, 0] = -1.0
    M[:, 1, 3] = M[:, 3, 1] = -1.0
    return M


# ------------------------------------------------------------------ passes
def _run_pass(
    runner: StreamRunner,
    folds: Mapping[str, str],
    data: Iterable[Any],
    observers: Mapping[str, Callable[[Tensor, Tensor], None]],
    what: str,
) -> int:
    """Run the model over ``data``, feeding each layer's ``(x, z)`` to its observer.

    A NaN or Inf in a layer's input reaches its output ``z``: each batch's
    outputs are summed per layer on the device and checked once per batch.
    """
    sums: dict[str, Tensor] = {}

    def observe(name: str, x: Tensor, z: Tensor) -> None:
        total = z.detach().sum()
        sums[name] = total if name not in sums else sums[name] + total
        observers[name](x.detach(), z.detach())

    def after_batch(done: int) -> None:
        tap.check()
        if sums and not bool(torch.isfinite(torch.stack(list(sums.values()))).all()):
            bad = next(n for n, t in sums.items() if not bool(torch.isfinite(t)))
            raise InvalidDataError(
                f"{what}, batch {done - 1}: layer {bad!r} receives NaN or Inf (from the data, "
                "or an overflow in the model); clean or rescale the data"
            )
        sums.clear()

    with layer_tap(runner.model, list(observers), folds, observe, runner.where) as tap:
        return runner.run(data, after_batch, what=what)


def signal_quality(
    model: nn.Module,
    patterns: Patterns,
    v_data: Iterable[Any],
    eval_data: Iterable[Any],
    estimators: Sequence[str] = ESTIMATORS,
    layers: Sequence[str] | None = None,
    max_positions: int | None = None,
    ridge: float = 1e-5,
    seed: int = 0,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    additional_forward_args: Any = None,
) -> SignalQuality:
    """ρ of Eq. 1 per layer, estimator and neuron: ``{layer: {estimator: (O,) tensor}}``.

    Parameters
    ----------
    model, patterns:
        The network and its patterns, fitted on a first data split.
    v_data, eval_data:
        Iterables of batches (as for :meth:`PatternFitter.fit`): ``v`` is fitted
        on ``v_data`` (split 2) and the correlation measured on ``eval_data``
        (split 3).  Each is read once.
    estimators:
        Any of :data:`ESTIMATORS`.
    layers:
        The layers to evaluate (default: all with patterns).
    max_positions:
        For convolutions, use at most this many randomly chosen output
        positions per image, in both passes: to fit ``v`` (whose ``Σ x xᵀ``
        costs ``D/O`` forward passes per position) and to measure the
        correlation (four maps per neuron).  ``None``: every position.  The
        positions of one image are strongly correlated, so a few per image
        over many images estimate the same ρ for a fraction of the cost.
    ridge:
        ``λ = ridge · mean(diag Cov[x])`` is added to ``Cov[x]`` (made tenfold
        larger until the Cholesky factorisation succeeds; see
        :attr:`SignalQuality.ridge`).
    seed:
        Seeds the random estimator and the position sampling.

    The result (a :class:`SignalQuality`, a dict) holds float64 tensors on the
    CPU; a neuron whose output or residual does not vary on ``eval_data``
    gets NaN.

    Examples
    --------
    >>> from captum_pattern import PatternFitter
    >>> model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> x = torch.randn(600, 6) @ torch.randn(6, 6)
    >>> patterns = PatternFitter(model).fit([x[:200]])
    >>> rho = signal_quality(model, patterns, [x[200:400]], [x[400:]])
    >>> sorted(rho), sorted(rho["0"]), rho["0"]["linear"].shape
    (['0', '2'], ['filter', 'linear', 'random', 'two_component'], torch.Size([4]))
    """
    if max_positions is not None and (
        isinstance(max_positions, bool) or not isinstance(max_positions, int) or max_positions < 1
    ):
        raise ValueError(
            f"max_positions must be a whole number >= 1 (or None: every position), "
            f"got {max_positions!r}"
        )
    estimators = tuple(dict.fromkeys(estimators))
    for e in estimators:
        if e not in ESTIMATORS:
            raise ValueError(f"unknown estimator {e!r}; expected one of {ESTIMATORS}")
    patterns.validate(model)
    available = explained_layers(model)
    names = list(patterns) if layers is None else list(layers)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"no Linear/Conv layer named {unknown[0]!r}; layers: {list(available)}")
    folds = {n: b for n, b in patterns.folds.items() if n in names}
    runner = StreamRunner(model, device, additional_forward_args, max_batches)
    generator = torch.Generator().manual_seed(seed)
    samples = {
        name: _LayerSamples(
            name,
            available[name],
            model.get_submodule(folds[name]) if name in folds else None,
            max_positions,
            generator,
        )
        for name in names
    }
    seconds = {}
    with model_state_guard(model), torch.no_grad():
        start = time.perf_counter()
        v_sums = {name: _VSums(layer) for name, layer in samples.items()}
        observers = {name: sums.observe_v for name, sums in v_sums.items()}
        _run_pass(runner, folds, v_data, observers, "the data for the v pass (v_data)")
        seconds["v_pass"] = time.perf_counter() - start
        start = time.perf_counter()
        solutions = {
            name: _Solution(samples[name], sums, patterns[name], estimators, ridge)
            for name, sums in v_sums.items()
        }
        del v_sums, observers  # the split-2 sums are no longer needed
        seconds["solve"] = time.perf_counter() - start
        start = time.perf_counter()
        eval_sums = {name: _EvalSums(solution) for name, solution in solutions.items()}
        observers = {name: sums.observe_eval for name, sums in eval_sums.items()}
        _run_pass(runner, folds, eval_data, observers, "the data for the eval pass (eval_data)")
        seconds["eval_pass"] = time.perf_counter() - start
    return SignalQuality(
        {name: sums.rho() for name, sums in eval_sums.items()},
        seconds,
        {name: solution.ridge_used for name, solution in solutions.items()},
    )
