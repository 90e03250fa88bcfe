r"""Streamed, mergeable moments of one linear layer and the patterns they give.

A layer has ``O`` neurons in ``G`` groups; every neuron of group ``k`` sees
input vectors ``x`` (its patch, ``D`` values) and has the pre-activation
``y = wᵀx`` (without bias) and the gate ``g = (wᵀx + b > 0)``.  For the
patterns of Kindermans et al. (2018), Eq. 4 and Eq. 8, a layer needs the sums

====== =====================  ==============================
key    sum over samples        used by
====== =====================  ==============================
``y``  ``x̃ · ỹ``               linear, relu_negative
``gy`` ``x̃ · g·ỹ``             relu, relu_negative
``g``  ``x̃ · g``               relu, relu_negative
``x``  ``x̃`` (per group)       linear, relu_negative
====== =====================  ==============================

and a few per-neuron scalars, where ``x̃ = x − c·m`` and ``ỹ = y − r`` are
centred on fixed references (``c`` per input channel, ``r`` per neuron, both
taken from the first batch) and ``m`` is 1 for a patch entry inside the input
and 0 for zero padding (padding stays zero).  Centring keeps the float32
products of each batch accurate for inputs with a large offset;
:meth:`PatternStatistics.solve` undoes it exactly in float64.  Layers with
zero padding also keep the *mask sums* ``Σ m·f`` (one value per kernel
position); for the others ``m ≡ 1`` and these are the scalar sums.

This module knows nothing of ``torch.nn``: the caller computes the batch sums
(see :mod:`captum_pattern.layers`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor

__all__ = [
    "PATTERN_TYPES",
    "STATS_FOR",
    "PatternStatistics",
    "required_stats",
]

#: pattern type -> attribute name of :class:`~captum_pattern.LayerPatterns`
PATTERN_TYPES: dict[str, str] = {
    "relu": "a_plus",
    "relu_negative": "a_minus",
    "linear": "a_linear",
}

#: the sums each pattern type needs
STATS_FOR: dict[str, tuple[str, ...]] = {
    "relu": ("gy", "g"),
    "relu_negative": ("y", "gy", "g", "x"),
    "linear": ("y", "x"),
}

_STAT_ORDER = ("gy", "g", "y")  # neuron-wise sums, in the order they are stacked
_SCALARS = ("n_pos", "s_y", "s_gy")  # Σ g, Σ ỹ, Σ g·ỹ per neuron
_SCALAR_OF = {"gy": "s_gy", "g": "n_pos", "y": "s_y"}  # Σ f for each signal f

#: A regime with fewer samples has a zero pattern: Eq. 8 from one sample ``xᵢ`` is
#: ``xᵢ / yᵢ``, that sample rescaled, not a statistic of the regime.
MIN_REGIME_SAMPLES = 2
#: ``a₋`` is zero when ``|wᵀN₋| ≤ EMPTY_RTOL · Σ (y − ȳ)²`` (the linear denominator):
#: ``N₋`` is the sums of all samples minus those of the open gate, whose float32
#: rounding leaves about ``1e-8`` of the linear denominator (measured) where the
#: closed regime is empty; ``2⁻¹³ ≈ 1.2e-4`` leaves a margin of 10⁴ for cancellation.
EMPTY_RTOL = 2.0**-13


def required_stats(pattern_types: Iterable[str]) -> tuple[str, ...]:
    """The sums needed for ``pattern_types``, in stacking order.

    >>> required_stats(["relu"])
    ('gy', 'g')
    >>> required_stats(["linear", "relu"])
    ('gy', 'g', 'y', 'x')
    """
    wanted: set[str] = set()
    for kind in pattern_types:
        if kind not in STATS_FOR:
            raise ValueError(f"unknown pattern type {kind!r}; expected one of {sorted(STATS_FOR)}")
        wanted.update(STATS_FOR[kind])
    return tuple(k for k in (*_STAT_ORDER, "x") if k in wanted)


class PatternStatistics:
    """Float64 sums of one layer, updated batch by batch.

    Parameters
    ----------
    weight_shape:
        Shape of the layer's weight, ``(O, *patch_shape)``.
    groups:
        Number of input groups (``groups`` of a convolution, 1 for a linear
        layer); neuron ``j`` belongs to group ``j // (O // groups)``.
    stats:
        Which sums to keep, see :func:`required_stats`.
    device:
        Where the accumulators live.
    masked:
        Whether the layer zero-pads its input, so that mask sums are kept.

    Examples
    --------
    A dense layer with references left at zero (so ``x̃ = x``, ``ỹ = y``):

    >>> import torch
    >>> w = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    >>> x = torch.randn(100, 2, dtype=torch.float64)
    >>> y = x @ w.T  # (samples, neurons), without the bias
    >>> st = PatternStatistics(w.shape, 1, required_stats(["linear"]))
    >>> st.add(len(x), {"y": y.T @ x, "x": x.sum(0, keepdim=True)}, {"s_y": y.sum(0)})
    >>> a = st.solve(w)["linear"][0]
    >>> xc, yc = x - x.mean(0), y - y.mean(0)
    >>> bool(torch.allclose(a, (yc.T @ xc) / (yc.T @ yc)))  # Eq. 4: cov[x, y] / σ²_y
    True
    """

    def __init__(
        self,
        weight_shape: Iterable[int],
        groups: int,
        stats: Iterable[str],
        device: torch.device | str | None = None,
        masked: bool = False,
    ) -> None:
        self.weight_shape = tuple(int(s) for s in weight_shape)
        self.groups = int(groups)
        self.stats = tuple(stats)
        self.masked = bool(masked)
        out = self.weight_shape[0]
        if out % self.groups:
            raise ValueError(f"{out} neurons cannot form {self.groups} groups")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        patch = self.weight_shape[1:]
        f64 = {"dtype": torch.float64, "device": self.device}
        self.n = torch.zeros((), **f64)
        self.sums: dict[str, Tensor] = {}
        for key in self.stats:
            shape = (self.groups, *patch) if key == "x" else self.weight_shape
            # allocated but not written: the first add copies (one pass less)
            self.sums[key] = torch.empty(shape, **f64)
        self._sums_empty = True
        self.scalars: dict[str, Tensor] = {k: torch.zeros(out, **f64) for k in _SCALARS}
        # mask sums Σ m·f, (O, 1, *kernel); key "x" holds Σ m, (1, 1, *kernel)
        self.masks: dict[str, Tensor] = {}
        if self.masked:
            for key in self.stats:
                lead = 1 if key == "x" else out
                self.masks[key] = torch.zeros((lead, 1, *patch[1:]), **f64)
        # references: x_ref broadcasts over a group's patch, y_ref is per neuron
        self.x_ref = torch.zeros((self.groups, patch[0], *[1] * (len(patch) - 1)), **f64)
        self.y_ref = torch.zeros(out, **f64)
        self.has_reference = False

    # ------------------------------------------------------------------ update
    @property
    def num_neurons(self) -> int:
        return self.weight_shape[0]

    def set_reference(self, x_ref: Tensor, y_ref: Tensor) -> None:
        """Fix the centring references (before the first :meth:`add`).

        ``x_ref`` has one value per input channel of the layer (``G * C``
        values), ``y_ref`` one per neuron.
        """
        self.x_ref = x_ref.detach().to(self.device, torch.float64).reshape(self.x_ref.shape)
        self.y_ref = y_ref.detach().to(self.device, torch.float64).reshape(self.num_neurons)
        self.has_reference = True

    def add(
        self,
        n: int,
        sums: Mapping[str, Tensor],
        scalars: Mapping[str, Tensor],
        masks: Mapping[str, Tensor] | None = None,
    ) -> None:
        """Add one batch: ``n`` samples, its sums, per-neuron scalars and mask sums.

        The batch values must have been centred on this object's references.
        ``masks`` is required for a masked layer and ignored otherwise.
        """
        self.add_counts(n, scalars)
        self.add_sums(sums, masks)

    def add_counts(self, n: int | Tensor, scalars: Mapping[str, Tensor]) -> None:
        """Add ``n`` samples and their per-neuron scalar sums."""
        self.n += n
        for key, value in scalars.items():
            self.scalars[key].add_(value)

    def add_sums(self, sums: Mapping[str, Tensor], masks: Mapping[str, Tensor] | None) -> None:
        """Add patch sums (and, for a zero-padded layer, mask sums) of some samples."""
        if self.masked and masks is None:
            raise ValueError("a zero-padded layer needs its mask sums")
        if self._sums_empty and set(sums) == set(self.sums):
            for key, value in sums.items():
                self.sums[key].copy_(value.reshape(self.sums[key].shape))
            self._sums_empty = False
        else:
            self._materialize()
            for key, value in sums.items():
                self.sums[key].add_(value.reshape(self.sums[key].shape))
        if self.masked:
            for key, value in masks.items():
                self.masks[key].add_(value.reshape(self.masks[key].shape))

    def _materialize(self) -> None:
        """Zero the sums if nothing was added yet."""
        if self._sums_empty:
            for value in self.sums.values():
                value.zero_()
            self._sums_empty = False

    def _mask_sum(self, key: str) -> Tensor:
        """``Σ m·f`` for signal ``key`` (``"x"``: ``Σ m``), broadcastable to the weight."""
        if self.masked:
            return self.masks[key]
        trailing = (1,) * (len(self.weight_shape) - 1)
        if key == "x":
            return self.n.reshape((1,) * len(self.weight_shape))
        return self.scalars[_SCALAR_OF[key]].reshape(-1, *trailing)

    # ------------------------------------------------------------- reduce/rebase
    def reduce(self, all_reduce: Callable[[Tensor], None]) -> None:
        """Sum these statistics with other processes' through ``all_reduce`` (in place).

        The processes first agree on common references (the mean of those that
        saw samples), re-express their sums around them exactly
        (:meth:`rebase`), then add the sums.  A layer that no process saw stays
        empty.
        """
        has = torch.tensor(float(self.has_reference), dtype=torch.float64, device=self.device)
        x_ref, y_ref = self.x_ref * has, self.y_ref * has
        for t in (has, x_ref, y_ref):
            all_reduce(t)
        if float(has) == 0:
            return  # no process saw this layer
        x_ref, y_ref = x_ref / has, y_ref / has
        if self.has_reference:
            self.rebase(x_ref, y_ref)
        else:
            self.set_reference(x_ref, y_ref)
        for key, value in self.state_dict().items():
            if key.startswith(("sum.", "scalar.", "mask.")) or key == "n":
                all_reduce(value)

    def rebase(self, x_ref: Tensor, y_ref: Tensor) -> None:
        """Re-express every sum around new references, exactly (float64 algebra)."""
        self._materialize()
        x_ref = x_ref.to(self.device, torch.float64).reshape(self.x_ref.shape)
        y_ref = y_ref.to(self.device, torch.float64).reshape(self.num_neurons)
        dc = self.x_ref - x_ref  # x̃_new = x̃ + dc·m
        dr = self.y_ref - y_ref  # ỹ_new = ỹ + dr
        dcn = self._per_neuron(dc)
        drw = dr.reshape(-1, *[1] * (len(self.weight_shape) - 1))
        m = {key: self._mask_sum(key) for key in ("gy", "g", "y", "x") if key in self.sums}
        new: dict[str, Tensor] = {}
        if "y" in self.sums:
            b = self._per_neuron(self.sums["x"])
            new["y"] = self.sums["y"] + drw * b + dcn * m["y"] + drw * dcn * m["x"]
        if "gy" in self.sums:
            new["gy"] = self.sums["gy"] + drw * self.sums["g"] + dcn * m["gy"] + drw * dcn * m["g"]
        if "g" in self.sums:
            new["g"] = self.sums["g"] + dcn * m["g"]
        if "x" in self.sums:
            new["x"] = self.sums["x"] + dc * m["x"]
        if self.masked:
            if "y" in self.masks:
                self.masks["y"] = self.masks["y"] + drw * self.masks["x"]
            if "gy" in self.masks:
                self.masks["gy"] = self.masks["gy"] + drw * self.masks["g"]
        self.sums.update(new)
        n, sc = self.n, self.scalars
        sc["s_y"] = sc["s_y"] + n * dr
        sc["s_gy"] = sc["s_gy"] + sc["n_pos"] * dr
        self.x_ref, self.y_ref = x_ref, y_ref

    # --------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Tensor]:
        """All tensors of the state (float64), for checkpoints and all-reduce."""
        self._materialize()
        state = {"n": self.n, "x_ref": self.x_ref, "y_ref": self.y_ref}
        state["has_reference"] = torch.tensor(float(self.has_reference), device=self.device)
        state.update({f"sum.{k}": v for k, v in self.sums.items()})
        state.update({f"scalar.{k}": v for k, v in self.scalars.items()})
        state.update({f"mask.{k}": v for k, v in self.masks.items()})
        return state

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        expected = set(self.state_dict())
        if set(state) != expected:
            raise ValueError(
                f"statistics state has keys {sorted(state)}, expected {sorted(expected)}"
            )
        for key, value in state.items():
            current = self.state_dict()[key]
            if tuple(value.shape) != tuple(current.shape):
                raise ValueError(
                    f"statistics state {key!r} has shape {tuple(value.shape)}, "
                    f"expected {tuple(current.shape)}"
                )
        f64 = {"dtype": torch.float64, "device": self.device}
        self.n = state["n"].to(**f64).clone()
        self.x_ref = state["x_ref"].to(**f64).clone()
        self.y_ref = state["y_ref"].to(**f64).clone()
        self.has_reference = bool(state["has_reference"].item())
        self.sums = {k: state[f"sum.{k}"].to(**f64).clone() for k in self.sums}
        self._sums_empty = False
        self.scalars = {k: state[f"scalar.{k}"].to(**f64).clone() for k in _SCALARS}
        self.masks = {k: state[f"mask.{k}"].to(**f64).clone() for k in self.masks}

    # --------------------------------------------------------------- solve
    def _per_neuron(self, per_group: Tensor) -> Tensor:
        """Repeat a per-group tensor ``(G, ...)`` for every neuron ``(O, ...)``."""
        return per_group.repeat_interleave(self.num_neurons // self.groups, dim=0)

    def solve(
        self,
        weight: Tensor,
        pattern_types: Iterable[str] | None = None,
        rtol: float | None = None,
        consume: bool = False,
        out_dtype: torch.dtype = torch.float64,
        chunk_bytes: int = 2**26,
        min_samples: int = MIN_REGIME_SAMPLES,
        empty_rtol: float = EMPTY_RTOL,
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """Patterns of the layer with weight ``weight`` (the weight the sums saw).

        Returns, per pattern type, ``(pattern, zero)``: the pattern shaped like
        ``weight`` (in ``out_dtype``, computed in float64) and a bool mask of the
        neurons whose pattern is undefined and was set to exactly zero:

        - the regime (all samples, ``g = 1``, ``g = 0``) holds fewer than
          ``min_samples`` samples (counts are exact);
        - the regime's denominator ``wᵀ(Σ x·y − Σ x·ȳ)`` is at most ``rtol``
          times its ``Σ y²`` (default ``(64 eps)²`` of float32: the output does
          not vary there);
        - for ``"relu_negative"``, whose sums are those of all samples minus
          those of the open gate, the denominator is at most ``empty_rtol``
          times the linear denominator ``Σ (y − ȳ)²``: what is left is
          rounding residue of the difference, not data (see
          :data:`EMPTY_RTOL`).

        Neurons are solved in blocks of about ``chunk_bytes`` of float64, so a
        large dense layer needs little memory beyond its sums.  With ``consume``
        the accumulators are used as scratch space (no copy) and the object
        must not be used afterwards.
        """
        self._materialize()
        if pattern_types is None:
            pattern_types = [t for t, need in STATS_FOR.items() if set(need) <= set(self.sums)]
        pattern_types = list(pattern_types)
        for kind in pattern_types:
            missing = set(STATS_FOR[kind]) - set(self.sums)
            if missing:
                raise ValueError(
                    f"pattern type {kind!r} needs the sums {sorted(missing)}, "
                    "which were not collected; fit with this pattern type"
                )
        if rtol is None:
            rtol = (64 * torch.finfo(torch.float32).eps) ** 2
        if tuple(weight.shape) != self.weight_shape:
            raise ValueError(f"weight shape {tuple(weight.shape)} != {self.weight_shape}")
        out, groups = self.num_neurons, self.groups
        per_group = out // groups
        patch = self.weight_shape[1:]
        kernel_ones = (1,) * (len(patch) - 1)
        # every per-neuron tensor is viewed as (G, O/G, C, *kernel): per-group
        # tensors broadcast over the neurons of their group, per-neuron scalars
        # over the patch, so no full-size temporary is made for them
        grouped = (groups, per_group, *patch)
        n, sc = self.n, self.scalars
        delta = sc["s_y"] / torch.clamp(n, min=1.0)  # mean(y) - y_ref
        mean_y = self.y_ref + delta
        # Σ y over each regime, for the "does the output vary" test
        sums_y = {
            "relu": sc["s_gy"] + self.y_ref * sc["n_pos"],
            "linear": sc["s_y"] + self.y_ref * n,
        }
        c = self.x_ref.reshape(groups, 1, patch[0], *kernel_ones)
        weight = weight.detach().to(self.device).reshape(grouped)
        results = {
            kind: torch.empty(self.weight_shape, dtype=out_dtype, device=self.device)
            for kind in pattern_types
        }
        zeros = {kind: torch.empty(out, dtype=torch.bool, device=self.device) for kind in results}

        def per_neuron(t: Tensor, rows: slice) -> Tensor:
            return t.reshape(groups, per_group, *[1] * len(patch))[:, rows]

        def mask_sum(key: str, rows: slice) -> Tensor:
            m = self._mask_sum(key)
            if m.shape[0] == 1:  # the same for every neuron
                return m.reshape(1, 1, 1, *m.shape[2:])
            return m.reshape(groups, per_group, 1, *m.shape[2:])[:, rows]

        def numerator(key_f: str, key_g: str, rows: slice) -> Tensor:
            """Σ x·(ỹ − δ) over a regime: sums[f] − δ·sums[g] + c·(Σm·f − δ·Σm·g)."""
            num = self.sums[key_f].reshape(grouped)[:, rows]
            num = num if consume else num.clone()
            if key_g == "x":
                g_view = self.sums["x"].reshape(groups, 1, *patch)
            else:
                g_view = self.sums[key_g].reshape(grouped)[:, rows]
            d = per_neuron(delta, rows)
            num.addcmul_(d, g_view, value=-1)
            num.addcmul_(c, mask_sum(key_f, rows) - d * mask_sum(key_g, rows))
            return num

        def dot(a: Tensor, b: Tensor) -> Tensor:
            """``Σ a·b`` over the patch, per neuron: one batched product, no temporary."""
            return torch.einsum("gnd,gnd->gn", a.flatten(2), b.flatten(2))

        patch_size = max(1, weight[0, 0].numel())
        block = max(1, chunk_bytes // (8 * groups * patch_size))
        # scratch blocks, allocated once: large fresh allocations are page-faulted anew
        scratch = (groups, min(block, per_group), *patch)
        f64, device = torch.float64, self.device
        w_block = None if weight.dtype == f64 else torch.empty(scratch, dtype=f64, device=device)
        negative = None
        if "relu_negative" in results:
            negative = torch.empty(scratch, dtype=f64, device=device)
        for start in range(0, per_group, block):
            rows = slice(start, min(per_group, start + block))
            count = rows.stop - rows.start
            numerators: dict[str, Tensor] = {}
            if "gy" in self.sums:
                numerators["relu"] = numerator("gy", "g", rows)
            if "y" in self.sums:
                numerators["linear"] = numerator("y", "x", rows)
            w = weight[:, rows] if w_block is None else w_block[:, :count].copy_(weight[:, rows])
            denominators = {k: dot(w, num) for k, num in numerators.items()}
            if negative is not None:
                # the closed gate's sums are those of all samples minus the open gate's
                numerators["relu_negative"] = torch.sub(
                    numerators["linear"], numerators["relu"], out=negative[:, :count]
                )
                denominators["relu_negative"] = denominators["linear"] - denominators["relu"]
            # wᵀN = Σ y·(y − ȳ) in the regime, so Σ y² = wᵀN + ȳ·Σ y there
            my = mean_y.reshape(groups, per_group)[:, rows]
            scales: dict[str, Tensor] = {}
            if "relu" in denominators:
                sy = sums_y["relu"].reshape(groups, per_group)[:, rows]
                scales["relu"] = denominators["relu"] + my * sy
            if "linear" in denominators:
                sy = sums_y["linear"].reshape(groups, per_group)[:, rows]
                scales["linear"] = denominators["linear"] + my * sy
            n_pos = sc["n_pos"].reshape(groups, per_group)[:, rows]
            counts = {"relu": n_pos, "linear": n.expand_as(n_pos), "relu_negative": n - n_pos}
            for kind in results:
                num, denom = numerators[kind], denominators[kind]
                if kind == "relu_negative":  # a difference of sums: its own Σ y² is one too
                    linear = denominators["linear"]
                    varies = linear > rtol * scales["linear"]
                    ok = varies & (denom.abs() > empty_rtol * linear)
                else:
                    ok = (denom.abs() > rtol * scales[kind]) & (scales[kind] > 0)
                ok &= (counts[kind] >= min_samples) & torch.isfinite(denom)
                safe = torch.where(ok, denom, torch.ones_like(denom))
                expand = (*ok.shape, *[1] * len(patch))
                pattern = results[kind].reshape(grouped)[:, rows]
                pattern.copy_(num.div_(safe.reshape(expand)))
                pattern[~ok] = 0.0  # only the rows of undefined patterns are written
                zeros[kind].reshape(groups, per_group)[:, rows].copy_(~ok)
        return {kind: (results[kind], zeros[kind]) for kind in results}
