"""LayerCollector: the per-batch work that feeds one layer's pattern statistics.

For each call of a layer, :class:`LayerCollector` stacks the per-neuron
signals the requested pattern types need (``y·g``, ``g``, ``y``, a channel
of ones) along the channel axis, buffers them with the centred input until
enough samples wait, and turns the buffer into sums with one weight-gradient
call (:meth:`captum_pattern.layers.LayerGeometry.patch_sums`), added to the
float64 accumulators of :class:`~captum_pattern.statistics.PatternStatistics`.
Non-finite inputs are detected from the batch sums, without a host sync on
accelerators.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .activations import RELU, Regimes
from .canonize import folded_parameters
from .errors import InvalidDataError
from .layers import KERNELS, LayerGeometry, layer_bias
from .statistics import PatternStatistics

__all__ = ["LayerCollector"]

# the per-neuron totals every fit needs (sample counts per regime, Σ g·ỹ, Σ ỹ)
_SCALAR_KEYS = ("y", "g", "gy")

# a buffer is turned into sums once it holds this many bytes, whatever its sample count
_FLUSH_BYTES = 2**26


class LayerCollector:
    """The accumulators of one layer and the per-batch work that feeds them.

    Each call adds its sample counts at once; the centred inputs and stacked
    signals wait in a small buffer until it holds ``flush_samples`` samples
    (dense layers see few samples per batch), then one GEMM turns the whole
    buffer into sums, added to the float64 accumulators.
    """

    def __init__(
        self,
        name: str,
        module: nn.Module,
        bn: nn.Module | None,
        bn_name: str | None,
        stats: tuple[str, ...],
        device: torch.device,
        flush_samples: int = 4096,
        method: str = "auto",
        regimes: Regimes = RELU,
    ) -> None:
        self.name = name
        self.regimes = regimes
        self.module = module
        self.bn = bn
        self.bn_name = bn_name
        self.geometry = LayerGeometry.from_module(module)
        self.stat_keys = stats
        self.neuron_keys = tuple(k for k in stats if k != "x")
        self.ones = "x" in stats
        self.statistics = PatternStatistics(
            self.geometry.weight_shape,
            self.geometry.groups,
            stats,
            device,
            masked=self.geometry.zero_padded,
        )
        if bn is None:  # the bias alone: converting the weight would copy it for nothing
            bias = layer_bias(module)
            self.bias64 = None if bias is None else bias.detach().to(torch.float64)
        else:
            self.bias64 = folded_parameters(module, bn, dtype=torch.float64)[1]
        self.flush_samples = flush_samples
        if method not in ("auto", "autotune", *KERNELS):
            raise ValueError(
                f"method must be 'auto', 'autotune' or one of {KERNELS}, got {method!r}"
            )
        candidates = self.geometry.methods
        if (method in KERNELS and method not in candidates) or len(candidates) == 1:
            method = "weight_grad"  # the only way for this layer type
        self.method = method
        self.buffer: list[_Buffered] = []
        self.buffered = 0
        self.buffered_bytes = 0
        self._cache: dict[torch.dtype, tuple[Tensor, Tensor]] = {}
        self.bad_batch: Tensor | None = None  # device flag, accelerators only

    # reference values in the compute dtype, chosen so that they are exact there
    def _references(self, x: Tensor, out: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        if dtype in self._cache:
            return self._cache[dtype]
        st = self.statistics
        bias = (
            torch.zeros(st.num_neurons, dtype=torch.float64, device=out.device)
            if self.bias64 is None
            else self.bias64.to(out.device)
        )
        bias_c = bias.to(dtype)
        if not st.has_reference:
            dims = [d for d in range(x.dim()) if d != 1]
            x_ref = x.mean(dims)
            shift = out.mean(dims)  # = bias + mean(y): centres y
            st.set_reference(x_ref.double(), shift.double() - bias_c.double())
        x_ref = st.x_ref.reshape(-1).to(out.device, dtype)
        shift = (st.y_ref.to(out.device) + bias_c.double()).to(dtype)
        self._cache[dtype] = (x_ref, shift)
        return x_ref, shift

    def observe(self, x: Tensor, out: Tensor, batch_index: int) -> None:
        """Add one call's samples: ``x`` the layer input, ``out`` its pre-activation."""
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):  # statistics in float32
                return self.observe(x, out, batch_index)
        geo = self.geometry
        x, out = geo.as_samples(x.detach(), out.detach())
        dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        x, out = x.to(dtype), out.to(dtype)
        x_ref, shift = self._references(x, out, dtype)
        if self.method == "auto":  # a fixed rule from the layer and its input's shape
            self.method = geo.kernel_for(x.shape, x.device)
        channels_last = self.method == "weight_grad_cl"
        xc = geo.centred_input(x, x_ref, channels_last)
        signals, signal_sums, direct = self._signals(out, shift, channels_last)
        if self.buffer and (
            self.buffer[-1].xc.shape[1:] != xc.shape[1:]
            or self.buffer[-1].signals.shape[1:] != signals.shape[1:]
        ):
            self.flush()  # another input size: flush what has that size first
        samples = geo.samples_per_item(out)
        self.buffer.append(_Buffered(batch_index, xc, signals, samples, signal_sums, direct))
        self.buffered += samples
        self.buffered_bytes += (xc.numel() + signals.numel()) * xc.element_size()
        if self.buffered >= self.flush_samples or self.buffered_bytes >= _FLUSH_BYTES:
            self.flush()

    def _signals(
        self, out: Tensor, shift: Tensor, channels_last: bool = False
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Stack the per-neuron signals by input group, and sum them over the batch.

        Returns the stack ``(N, G * (K * O/G + ones), *sp)`` (group ``k``'s
        block holds the K signals of its neurons, then, with ``ones``, a
        channel of 1), its sum over the batch ``(G * (...), *sp)`` and, for
        each of ``ỹ``, ``g``, ``g·ỹ`` that is not stacked (the pattern types do
        not need its sums), its total per neuron.
        """
        geo = self.geometry
        n, channels, *spatial = out.shape
        groups, size = geo.groups, channels // geo.groups
        keys = self.neuron_keys
        depth = len(keys) * size + self.ones
        if channels_last:  # (N, G, K, H, W) laid out as channels-last (N, G*K, H, W)
            out = out.contiguous(memory_format=torch.channels_last)
            memory = out.new_empty(n, *spatial, groups, depth)
            stacked = memory.permute(0, 3, 4, 1, 2)
        else:
            memory = stacked = out.new_empty(n, groups, depth, *spatial)
        slot = {key: stacked[:, :, i * size : (i + 1) * size] for i, key in enumerate(keys)}
        grouped = out.reshape(n, groups, size, *spatial)  # a view in both layouts
        shift = shift.reshape(1, groups, size, *[1] * len(spatial))
        own = {key: slot[key] if key in slot else torch.empty_like(grouped) for key in _SCALAR_KEYS}
        torch.sub(grouped, shift, out=own["y"])
        if self.regimes.lower == 0 and self.regimes.upper == math.inf:
            torch.gt(grouped, 0, out=own["g"])  # ReLU, LeakyReLU, PReLU: the open regime z > 0
        else:
            own["g"].copy_(self.regimes.gate(grouped))
        torch.mul(own["y"], own["g"], out=own["gy"])
        if self.ones:
            stacked[:, :, -1].fill_(1)
        # sums over the batch, reduced in memory order (channels-last reductions
        # over N are slow in PyTorch)
        if channels_last:
            batch_sum = memory.sum(0).permute(2, 3, 0, 1)  # (G, depth, H, W)
        else:
            batch_sum = memory.sum(0)
        dims = (0, *range(3, 3 + len(spatial)))
        direct = {k: own[k].sum(dims).reshape(-1) for k in _SCALAR_KEYS if k not in slot}
        return stacked.reshape(n, -1, *spatial), batch_sum.reshape(-1, *spatial), direct

    def release(self) -> None:
        """Free the accumulators (after they were solved)."""
        del self.statistics

    def clear(self) -> None:
        """Drop the buffered samples (after an error: nothing half-added)."""
        self.buffer.clear()
        self.buffered = 0
        self.buffered_bytes = 0

    def flush(self) -> None:
        """Turn the buffered samples into sums and add them to the accumulators."""
        if not self.buffer:
            return
        geo = self.geometry
        signal_sums = self.buffer[0].signal_sums.double()
        for item in self.buffer[1:]:
            signal_sums += item.signal_sums
        direct: dict[str, Tensor] = {}
        for item in self.buffer:
            for key, total in item.direct.items():
                direct[key] = total.double() if key not in direct else direct[key] + total
        # a NaN or Inf in a layer's input reaches its output, hence these sums
        check = signal_sums.sum()
        for total in direct.values():
            check = check + total.sum()
        self._check_finite(check, self.buffer[0].batch)
        if len(self.buffer) == 1:
            xc, signals = self.buffer[0].xc, self.buffer[0].signals
        else:
            xc = torch.cat([b.xc for b in self.buffer])
            signals = torch.cat([b.signals for b in self.buffer])
        result = self._patch_sums(xc, signals)
        self.statistics.add_counts(
            sum(item.samples for item in self.buffer), self._scalars(signal_sums, direct)
        )
        masks = None
        if geo.zero_padded:
            shape = self._unpadded_shape(self.buffer[0].xc.shape)
            masks = self._unstack(geo.mask_sums(signal_sums, shape), first_group_ones=True)
        self.statistics.add_sums(self._unstack(result), masks)
        self.buffer.clear()
        self.buffered = 0
        self.buffered_bytes = 0

    def _scalars(self, signal_sums: Tensor, direct: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per-neuron ``Σ g``, ``Σ g·ỹ``, ``Σ ỹ``: from the batch-summed stack, or ``direct``."""
        geo = self.geometry
        size = geo.out_channels // geo.groups
        per_group = signal_sums.reshape(geo.groups, len(self.neuron_keys) * size + self.ones, -1)
        totals = per_group.sum(2)
        by_key = dict(direct)
        for i, key in enumerate(self.neuron_keys):
            by_key[key] = totals[:, i * size : (i + 1) * size].reshape(-1)
        return {"n_pos": by_key["g"], "s_gy": by_key["gy"], "s_y": by_key["y"]}

    def _unpadded_shape(self, shape: torch.Size) -> torch.Size:
        """The input shape before the explicit padding of :meth:`centred_input`."""
        geo = self.geometry
        if not any(geo.pad) or geo._gemm_padding != [0] * geo.spatial_dims:
            return shape
        dims = list(shape)
        for i in range(geo.spatial_dims):
            dims[-1 - i] -= geo.pad[2 * i] + geo.pad[2 * i + 1]
        return torch.Size(dims)

    def _patch_sums(self, xc: Tensor, signals: Tensor) -> Tensor:
        if self.method == "autotune":
            self.method = self._fastest_kernel(xc, signals)
        return self.geometry.patch_sums(xc, signals, self.method)

    def _fastest_kernel(self, xc: Tensor, signals: Tensor) -> str:
        """Time every kernel twice on this buffer and return the fastest (opt-in).

        The choice is made once per fit and layer and recorded in the pattern
        file's fit settings, so a run can be repeated with the same kernels.
        """
        timings: dict[str, float] = {}
        for method in self.geometry.methods:
            args = (xc, signals)
            if method == "weight_grad_cl":  # later batches are made channels-last
                cl = torch.channels_last
                args = (xc.contiguous(memory_format=cl), signals.contiguous(memory_format=cl))
            for _ in range(2):
                _synchronize(xc.device)
                start = time.perf_counter()
                self.geometry.patch_sums(*args, method)
                _synchronize(xc.device)
                elapsed = time.perf_counter() - start
                timings[method] = min(timings.get(method, elapsed), elapsed)
        return min(timings, key=timings.__getitem__)

    def _unstack(self, stacked: Tensor, first_group_ones: bool = False) -> dict[str, Tensor]:
        """Split a group-blocked result of :meth:`_signals` by signal."""
        geo = self.geometry
        per_group = stacked.reshape(geo.groups, -1, *stacked.shape[1:])
        size = geo.out_channels // geo.groups
        parts = {}
        for i, key in enumerate(self.neuron_keys):
            block = per_group[:, i * size : (i + 1) * size]
            parts[key] = block.reshape(geo.out_channels, *stacked.shape[1:])
        if self.ones:
            # Σ m is the same for every group: keep one copy
            parts["x"] = per_group[:1, -1] if first_group_ones else per_group[:, -1]
        return parts

    def _check_finite(self, total: Tensor, first_batch: int) -> None:
        """Stop on a NaN or Inf in the buffered inputs or outputs (``total`` is their sum)."""
        finite = torch.isfinite(total)
        if total.device.type == "cpu":
            if not bool(finite):
                bad = next(
                    (b.batch for b in self.buffer if not _all_finite(b.xc, b.signals)),
                    first_batch,
                )
                self.buffer.clear()
                self.buffered = 0
                raise InvalidDataError(
                    f"batch {bad}: layer {self.name!r} received NaN or Inf (in its input or "
                    "output); nothing from this batch was accumulated. Clean the data (or "
                    "check the model's weights)"
                )
            return
        # on an accelerator: remember the first bad batch without a host sync
        if self.bad_batch is None:
            self.bad_batch = torch.full((), -1, dtype=torch.int64, device=total.device)
        index = torch.full((), first_batch, dtype=torch.int64, device=total.device)
        self.bad_batch = torch.where((~finite) & (self.bad_batch < 0), index, self.bad_batch)


@dataclass
class _Buffered:
    """One call's centred input and signals, waiting for the next flush."""

    batch: int
    xc: Tensor
    signals: Tensor
    samples: int
    signal_sums: Tensor  # over the batch, (G * depth, *out_spatial)
    direct: dict[str, Tensor]  # per-neuron totals of the signals that are not stacked


def _all_finite(*tensors: Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
