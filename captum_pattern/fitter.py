"""PatternFitter: learn the patterns of every Linear/Conv layer in one pass.

The fitter hooks every explained layer, and for each batch adds to float64
accumulators the sums that the requested pattern types need
(:mod:`captum_pattern.statistics`), computed with one weight-gradient call per
layer (:meth:`captum_pattern.layers.LayerGeometry.patch_sums`): no patch tensor
is ever built.  The sums merge across processes with ``all_reduce`` and can
be checkpointed and resumed.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import Tensor, nn

from .canonize import (
    explained_layers,
    find_batchnorm_folds,
    folded_parameters,
    model_state_guard,
    warn_outside_method,
)
from .errors import InvalidDataError, PatternFileError, UnsupportedModelError, forward_errors
from .layers import LayerGeometry
from .patterns import LayerPatterns, Patterns, save_atomically, weights_fingerprint
from .statistics import PATTERN_TYPES, PatternStatistics, required_stats

__all__ = ["PatternFitter", "batch_inputs"]

CHECKPOINT_FORMAT = "captum-pattern-checkpoint"
CHECKPOINT_VERSION = 1


def batch_inputs(batch: Any, index: int) -> tuple[Tensor, ...]:
    """The model inputs of a batch: a tensor, or the first item of a tuple/list."""
    if isinstance(batch, Tensor):
        return (batch,)
    if isinstance(batch, (tuple, list)) and batch:
        first = batch[0]
        if isinstance(first, Tensor):
            return (first,)
        if isinstance(first, (tuple, list)) and first and all(isinstance(t, Tensor) for t in first):
            return tuple(first)
    raise InvalidDataError(
        f"batch {index} is a {type(batch).__name__}; expected a tensor or a tuple/list "
        "whose first item is the input tensor (or a tuple of input tensors)"
    )


def _to_device(
    inputs: tuple[Tensor, ...], device: torch.device, non_blocking: bool = False
) -> tuple[Tensor, ...]:
    return tuple(t.to(device, non_blocking=non_blocking) for t in inputs)


class _LayerCollector:
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
        flush_bytes: int = 2**26,
    ) -> None:
        self.name = name
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
        _, bias = folded_parameters(module, bn, dtype=torch.float64)
        self.bias64 = bias
        self.flush_samples = flush_samples
        self.flush_bytes = flush_bytes
        candidates = self.geometry.methods
        if method not in ("auto", "weight_grad", "weight_grad_cl", "unfold"):
            raise ValueError(
                "method must be 'auto', 'weight_grad', 'weight_grad_cl' or 'unfold', "
                f"got {method!r}"
            )
        if (method not in candidates and method != "auto") or len(candidates) == 1:
            method = "weight_grad"  # the only way for this layer type
        self.method = method
        self.pending: list[tuple[Tensor, Tensor]] = []  # (input, output) waiting for a BatchNorm
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
        channels_last = self.method == "weight_grad_cl"
        xc = geo.centred_input(x, x_ref, channels_last)
        signals, signal_sums, y_sum = self._signals(out, shift, channels_last)
        if self.buffer and (
            self.buffer[-1].xc.shape[1:] != xc.shape[1:]
            or self.buffer[-1].signals.shape[1:] != signals.shape[1:]
        ):
            self.flush()  # another input size: flush what has that size first
        samples = geo.samples_per_item(out)
        self.buffer.append(_Buffered(batch_index, xc, signals, samples, signal_sums, y_sum))
        self.buffered += samples
        self.buffered_bytes += (xc.numel() + signals.numel()) * xc.element_size()
        if self.buffered >= self.flush_samples or self.buffered_bytes >= self.flush_bytes:
            self.flush()

    def _signals(
        self, out: Tensor, shift: Tensor, channels_last: bool = False
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Stack the per-neuron signals by input group, and sum them over the batch.

        Returns the stack ``(N, G * (K * O/G + ones), *sp)`` (group ``k``'s
        block holds the K signals of its neurons, then, with ``ones``, a
        channel of 1), its sum over the batch ``(G * (...), *sp)`` and, when
        ``ỹ`` itself is not stacked, ``Σ ỹ`` per neuron.
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
        yc = slot["y"] if "y" in slot else torch.empty_like(grouped)
        torch.sub(grouped, shift, out=yc)
        torch.gt(grouped, 0, out=slot["g"])
        torch.mul(yc, slot["g"], out=slot["gy"])
        if self.ones:
            stacked[:, :, -1].fill_(1)
        # sums over the batch, reduced in memory order (channels-last reductions
        # over N are slow in PyTorch)
        if channels_last:
            batch_sum = memory.sum(0).permute(2, 3, 0, 1)  # (G, depth, H, W)
        else:
            batch_sum = memory.sum(0)
        y_sum = None
        if "y" not in slot:
            y_sum = yc.sum((0, *range(3, 3 + len(spatial)))).reshape(-1)
        return stacked.reshape(n, -1, *spatial), batch_sum.reshape(-1, *spatial), y_sum

    def flush(self) -> None:
        """Turn the buffered samples into sums and add them to the accumulators."""
        if not self.buffer:
            return
        geo = self.geometry
        signal_sums = self.buffer[0].signal_sums.double()
        for item in self.buffer[1:]:
            signal_sums += item.signal_sums
        y_sum = None
        if self.buffer[0].y_sum is not None:
            y_sum = sum(item.y_sum.double() for item in self.buffer)
        # a NaN or Inf in a layer's input reaches its output, hence these sums
        check = signal_sums.sum() + (0.0 if y_sum is None else y_sum.sum())
        self._check_finite(check, self.buffer[0].batch)
        if len(self.buffer) == 1:
            xc, signals = self.buffer[0].xc, self.buffer[0].signals
        else:
            xc = torch.cat([b.xc for b in self.buffer])
            signals = torch.cat([b.signals for b in self.buffer])
        result = self._patch_sums(xc, signals)
        self.statistics.add_counts(
            sum(item.samples for item in self.buffer), self._scalars(signal_sums, y_sum)
        )
        masks = None
        if geo.zero_padded:
            shape = self._unpadded_shape(self.buffer[0].xc.shape)
            masks = self._unstack(geo.mask_sums(signal_sums, shape), first_group_ones=True)
        self.statistics.add_sums(self._unstack(result), masks)
        self.buffer.clear()
        self.buffered = 0
        self.buffered_bytes = 0

    def _scalars(self, signal_sums: Tensor, y_sum: Tensor | None) -> dict[str, Tensor]:
        """Per-neuron ``Σ g``, ``Σ g·ỹ``, ``Σ ỹ`` from the batch-summed signals."""
        geo = self.geometry
        size = geo.out_channels // geo.groups
        per_group = signal_sums.reshape(geo.groups, len(self.neuron_keys) * size + self.ones, -1)
        totals = per_group.sum(2)
        by_key = {
            key: totals[:, i * size : (i + 1) * size].reshape(-1)
            for i, key in enumerate(self.neuron_keys)
        }
        return {
            "n_pos": by_key["g"],
            "s_gy": by_key["gy"],
            "s_y": by_key["y"] if "y" in by_key else y_sum,
        }

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
        if self.method != "auto":
            return self.geometry.patch_sums(xc, signals, self.method)
        key = (self.geometry, tuple(xc.shape[1:]), xc.dtype, str(xc.device), self.stat_keys)
        if key not in _METHOD_CACHE:
            # first flush of this layer shape: time every way twice, keep the fastest
            timings: dict[str, float] = {}
            for method in self.geometry.methods:
                args = (xc, signals)
                if method == "weight_grad_cl":  # later batches are made channels-last
                    args = tuple(t.contiguous(memory_format=torch.channels_last) for t in args)
                for _ in range(2):
                    _synchronize(xc.device)
                    start = time.perf_counter()
                    self.geometry.patch_sums(*args, method)
                    _synchronize(xc.device)
                    elapsed = time.perf_counter() - start
                    timings[method] = min(timings.get(method, elapsed), elapsed)
            _METHOD_CACHE[key] = min(timings, key=timings.__getitem__)
        self.method = _METHOD_CACHE[key]
        return self.geometry.patch_sums(xc, signals, self.method)

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


class _Precision:
    """Optional reduced precision for the forward pass (autocast, TF32)."""

    def __init__(self, device: torch.device, autocast: torch.dtype | None, tf32: bool) -> None:
        self.device, self.autocast, self.tf32 = device, autocast, tf32

    def forward(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    @contextlib.contextmanager
    def tf32_flags(self) -> Iterator[None]:
        if not (self.tf32 and self.device.type == "cuda"):
            yield
            return
        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# the fastest way found for a layer geometry, input shape, dtype and device
_METHOD_CACHE: dict[tuple[Any, ...], str] = {}


@dataclass
class _Buffered:
    """One call's centred input and signals, waiting for the next flush."""

    batch: int
    xc: Tensor
    signals: Tensor
    samples: int
    signal_sums: Tensor  # over the batch, (G * depth, *out_spatial)
    y_sum: Tensor | None  # Σ ỹ per neuron when ỹ is not stacked


def _all_finite(*tensors: Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PatternFitter:
    """Learns the patterns of a model from data, in one streamed pass.

    Parameters
    ----------
    model:
        The network.  Every ``nn.Linear`` and ``nn.Conv1d/2d/3d`` gets patterns;
        a BatchNorm directly after one of them is folded into it (the model is
        not changed).  The model runs in eval mode during the fit; every
        module's mode is restored afterwards.
    pattern_types:
        Which patterns to learn: ``"relu"`` (``a₊``, Eq. 8), ``"relu_negative"``
        (``a₋``) and ``"linear"`` (``a``, Eq. 4).  Fewer types need fewer sums
        (``"relu"`` alone: two per layer instead of three).
    flush_samples:
        A layer's inputs and signals are buffered until they hold this many
        samples (positions × images), then turned into sums by one GEMM: dense
        layers see few samples per batch, and one large product is cheaper
        than many small ones followed by float64 additions.
    method:
        How the sums of a Conv2d layer are computed: ``"weight_grad"`` (the
        convolution's weight gradient), ``"weight_grad_cl"`` (the same in
        channels-last memory format), ``"unfold"`` (patches of a few images at
        a time, then one product) or ``"auto"`` (time each on the layer's first
        buffer, keep the fastest; remembered per layer shape for the process).
        The choice changes the sums only by float32 rounding.  Other layers
        always use the weight gradient.

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(),
    ...                             torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
    >>> data = [torch.randn(16, 1, 8, 8) for _ in range(4)]
    >>> patterns = PatternFitter(model).fit(data)
    >>> patterns["0"].a_plus.shape, patterns["3"].n_samples
    (torch.Size([4, 1, 3, 3]), 64)
    """

    def __init__(
        self,
        model: nn.Module,
        pattern_types: Sequence[str] = ("relu", "relu_negative", "linear"),
        flush_samples: int = 4096,
        method: str = "auto",
    ) -> None:
        if flush_samples < 1:
            raise ValueError(f"flush_samples must be at least 1, got {flush_samples}")
        self.flush_samples = int(flush_samples)
        self.method = method
        if isinstance(pattern_types, str):
            pattern_types = (pattern_types,)
        self.pattern_types = tuple(dict.fromkeys(pattern_types))
        self.stat_keys = required_stats(self.pattern_types)  # validates the names
        if not self.pattern_types:
            raise ValueError(
                f"pattern_types is empty; ask for at least one of {sorted(PATTERN_TYPES)}"
            )
        self.model = model
        self.layers = explained_layers(model)
        if not self.layers:
            raise UnsupportedModelError(
                f"{type(model).__name__} has no nn.Linear or nn.Conv1d/2d/3d layer, so it "
                "has nothing to learn patterns for"
            )
        warn_outside_method(model, "PatternFitter")

    # ---------------------------------------------------------------------- fit
    def fit(
        self,
        data: Iterable[Any],
        max_batches: int | None = None,
        device: torch.device | str | None = None,
        additional_forward_args: Any = None,
        checkpoint: str | os.PathLike[str] | None = None,
        checkpoint_every: int = 0,
        resume: bool = False,
        callback: Callable[[int, int], None] | None = None,
        autocast: torch.dtype | None = None,
        tf32: bool = False,
    ) -> Patterns:
        """Run the model over ``data`` once and return the :class:`Patterns`.

        Parameters
        ----------
        data:
            Any iterable of batches: a tensor, or a tuple/list whose first item
            is the input (a tensor, or a tuple of tensors for several inputs).
            A ``DataLoader`` works as is.
        max_batches:
            Stop after this many batches.
        device:
            Where batches are moved (default: the model's device).  On CUDA,
            batches are copied from pinned memory on a side stream while the
            previous batch computes.
        additional_forward_args:
            Extra positional arguments for the model's forward, after the inputs.
        checkpoint, checkpoint_every:
            Save the fitter's state to ``checkpoint`` every ``checkpoint_every``
            batches (atomically).  With ``torch.distributed``, each rank writes
            ``<checkpoint>.rank<r>``.
        resume:
            Load ``checkpoint`` and skip the batches it already holds; ``data``
            must yield the same batches in the same order as before.
        callback:
            Called after each batch with ``(batches_done, batch_size)``.
        autocast:
            Run the model's forward pass under ``torch.autocast`` with this
            dtype (``torch.bfloat16`` or ``torch.float16``): faster on
            accelerators, at the price of gates and outputs rounded to that
            precision.  The statistics are still computed in float32 and
            accumulated in float64.  ``docs/performance.md`` gives the cost in
            pattern accuracy.
        tf32:
            Allow TF32 matrix products and convolutions on CUDA during the fit
            (the global flags are restored afterwards).
        """
        if max_batches is not None and max_batches < 1:
            raise ValueError(f"max_batches must be at least 1, got {max_batches}")
        if (checkpoint_every or resume) and checkpoint is None:
            raise ValueError("checkpoint_every and resume need a checkpoint path")
        device = torch.device(device) if device is not None else self._model_device()
        extra = _as_tuple(additional_forward_args)
        checkpoint_path = _rank_path(checkpoint) if checkpoint is not None else None
        if autocast not in (None, torch.bfloat16, torch.float16):
            raise ValueError(
                f"autocast must be None, torch.bfloat16 or torch.float16, got {autocast}"
            )
        precision = _Precision(device, autocast, tf32)
        with model_state_guard(self.model), torch.no_grad(), precision.tf32_flags():
            batches = enumerate(data)
            first = next(batches, None)
            if first is None:
                raise InvalidDataError("data yielded no batch; give at least one batch to fit on")
            first_inputs = _to_device(batch_inputs(first[1], 0), device)
            folds = self._find_folds(first_inputs, extra)
            collectors = self._collectors(folds, device)
            start = 0
            if resume:
                start = self._load_checkpoint(checkpoint_path, collectors, folds)
            todo = itertools.islice(_chain_first(first, batches), start, max_batches)
            done = self._run(
                _prefetch(todo, device),
                collectors,
                extra,
                precision,
                start,
                checkpoint_path,
                checkpoint_every,
                folds,
                callback,
            )
            _all_reduce(collectors)
            patterns = self._patterns(collectors, folds, done)
        return patterns.attach(self.model)  # PatternNet(model) finds them (a weak link)

    def _model_device(self) -> torch.device:
        for tensor in list(self.model.parameters()) + list(self.model.buffers()):
            return tensor.device
        return torch.device("cpu")

    def _find_folds(self, inputs: tuple[Tensor, ...], extra: tuple[Any, ...]) -> dict[str, str]:
        if not extra:  # one sample is enough to see the structure
            inputs = tuple(t[:1] for t in inputs)
        probe = tuple(
            t.detach().requires_grad_(True) if t.is_floating_point() else t for t in inputs
        )

        def run() -> Any:
            with forward_errors(InvalidDataError, "batch 0: ", probe):
                return self.model(*probe, *extra)

        return find_batchnorm_folds(self.model, run)

    def _collectors(
        self, folds: dict[str, str], device: torch.device
    ) -> dict[str, _LayerCollector]:
        collectors = {}
        for name, module in self.layers.items():
            bn_name = folds.get(name)
            bn = self.model.get_submodule(bn_name) if bn_name else None
            acc_device = module.weight.device
            collectors[name] = _LayerCollector(
                name,
                module,
                bn,
                bn_name,
                self.stat_keys,
                acc_device,
                flush_samples=self.flush_samples,
                method=self.method,
            )
        return collectors

    def _run(
        self,
        stream: Iterator[tuple[int, tuple[Tensor, ...]]],
        collectors: dict[str, _LayerCollector],
        extra: tuple[Any, ...],
        precision: _Precision,
        start: int,
        checkpoint: Path | None,
        checkpoint_every: int,
        folds: dict[str, str],
        callback: Callable[[int, int], None] | None,
    ) -> int:
        state = {"batch": -1}
        handles = self._install_hooks(collectors, folds, state)
        done = start
        try:
            for index, inputs in stream:
                state["batch"] = index
                with (
                    precision.forward(),
                    forward_errors(InvalidDataError, f"batch {index}: ", inputs),
                ):
                    self.model(*inputs, *extra)
                pending = [n for n, c in collectors.items() if c.bn is not None and c.pending]
                if pending:
                    raise UnsupportedModelError(
                        f"layer {pending[0]!r} was followed by BatchNorm "
                        f"{folds[pending[0]]!r} when the fold was found, but in batch "
                        f"{index} its output did not reach that BatchNorm"
                    )
                done = index + 1
                if callback is not None:
                    callback(done, int(inputs[0].shape[0]) if inputs[0].dim() else 1)
                if checkpoint is not None and checkpoint_every and done % checkpoint_every == 0:
                    self._flush(collectors)
                    self._save_checkpoint(checkpoint, collectors, folds, done)
            self._flush(collectors)
        finally:
            for h in handles:
                h.remove()
            for c in collectors.values():
                c.pending.clear()
                c.buffer.clear()
        return done

    def _flush(self, collectors: dict[str, _LayerCollector]) -> None:
        """Empty every buffer into the accumulators and stop on a non-finite batch."""
        for c in collectors.values():
            c.flush()
        self._raise_if_bad(collectors)

    def _install_hooks(
        self, collectors: dict[str, _LayerCollector], folds: dict[str, str], state: dict[str, int]
    ) -> list[Any]:
        handles = []
        owner = threading.get_ident()  # other threads' forward passes are left alone
        for collector in collectors.values():
            if collector.bn is None:

                def hook(module, inputs, output, c=collector):
                    if threading.get_ident() == owner:
                        c.observe(inputs[0], output, state["batch"])
            else:

                def hook(module, inputs, output, c=collector):
                    if threading.get_ident() == owner:
                        c.pending.append((inputs[0], output))

                def bn_hook(module, inputs, output, c=collector):
                    if threading.get_ident() != owner:
                        return
                    if not c.pending or inputs[0] is not c.pending[-1][1]:
                        raise UnsupportedModelError(
                            f"BatchNorm {c.bn_name!r} was folded into layer {c.name!r}, but in "
                            f"batch {state['batch']} it read a tensor that is not that layer's "
                            "output; the model's structure changes between calls"
                        )
                    x, _ = c.pending.pop()
                    c.observe(x, output, state["batch"])

                handles.append(collector.bn.register_forward_hook(bn_hook))
            handles.append(collector.module.register_forward_hook(hook))
        return handles

    @staticmethod
    def _raise_if_bad(collectors: dict[str, _LayerCollector]) -> None:
        flagged = [
            (int(c.bad_batch), name)
            for name, c in collectors.items()
            if c.bad_batch is not None and int(c.bad_batch) >= 0
        ]
        if flagged:
            batch, name = min(flagged)
            raise InvalidDataError(
                f"batch {batch}: layer {name!r} received NaN or Inf (in its input or output); "
                "the fit was stopped and nothing was saved from that batch on. Clean the data"
            )

    def _patterns(
        self, collectors: dict[str, _LayerCollector], folds: dict[str, str], batches: int
    ) -> Patterns:
        layers = {}
        for name, c in collectors.items():
            # a folded weight in float64; a plain one as it is (solved block by block)
            weight, _ = folded_parameters(c.module, c.bn, torch.float64 if c.bn else None)
            dtype = c.module.weight.dtype
            solved = c.statistics.solve(weight, self.pattern_types, consume=True, out_dtype=dtype)
            patterns = {attr: None for attr in PATTERN_TYPES.values()}
            for kind, (pattern, _) in solved.items():
                patterns[PATTERN_TYPES[kind]] = pattern
            n = float(c.statistics.n)
            fraction = (c.statistics.scalars["n_pos"] / max(n, 1.0)).float()
            c.statistics = None  # the sums were used as scratch space: free them now
            layers[name] = LayerPatterns(
                **patterns,
                n_samples=int(n),
                positive_fraction=fraction,
                zero={kind: zero for kind, (_, zero) in solved.items()},
                folded_batchnorm=c.bn_name,
            )
        settings = {
            "pattern_types": list(self.pattern_types),
            "batches": batches,
            "folds": folds,
            "world_size": dist.get_world_size() if _distributed() else 1,
            "torch": torch.__version__,
        }
        return Patterns(layers, weights_fingerprint(self.model, folds), settings)

    # --------------------------------------------------------------- checkpoint
    def _save_checkpoint(
        self, path: Path, collectors: dict[str, _LayerCollector], folds: dict[str, str], done: int
    ) -> None:
        tensors = {}
        for name, c in collectors.items():
            for key, value in c.statistics.state_dict().items():
                tensors[f"{name}/{key}"] = value.detach().cpu().contiguous()
        metadata = {
            "format": CHECKPOINT_FORMAT,
            "format_version": str(CHECKPOINT_VERSION),
            "batches_done": str(done),
            "pattern_types": json.dumps(list(self.pattern_types)),
            "folds": json.dumps(folds),
            "layers": json.dumps(sorted(collectors)),
            "fingerprint": weights_fingerprint(self.model, folds),
            "methods": json.dumps({name: c.method for name, c in collectors.items()}),
        }
        save_atomically(tensors, path, metadata)

    def _load_checkpoint(
        self, path: Path, collectors: dict[str, _LayerCollector], folds: dict[str, str]
    ) -> int:
        if not path.is_file():
            return 0  # nothing saved yet: start from the beginning
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        except Exception as exc:
            raise PatternFileError(f"{path}: not a readable fitter checkpoint ({exc})") from exc
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise PatternFileError(f"{path}: not a captum-pattern fitter checkpoint")
        if int(meta.get("format_version", "0")) > CHECKPOINT_VERSION:
            raise PatternFileError(f"{path}: written by a newer captum-pattern; upgrade to resume")
        checks = {
            "pattern_types": list(self.pattern_types),
            "folds": folds,
            "layers": sorted(collectors),
        }
        for key, expected in checks.items():
            if json.loads(meta.get(key, "null")) != expected:
                raise PatternFileError(
                    f"{path}: the checkpoint's {key} differ from this fit's; resume with the "
                    "same model and pattern types, or delete the checkpoint"
                )
        if meta.get("fingerprint") != weights_fingerprint(self.model, folds):
            raise PatternFileError(
                f"{path}: the model's weights changed since the checkpoint was written; "
                "delete the checkpoint to start over"
            )
        methods = json.loads(meta.get("methods", "{}"))
        for name, c in collectors.items():
            if c.method == "auto" and methods.get(name) in ("weight_grad", "unfold"):
                c.method = methods[name]  # keep the sums grouped as before the interruption
            prefix = f"{name}/"
            state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            try:
                c.statistics.load_state_dict(state)
            except ValueError as exc:
                raise PatternFileError(f"{path}: layer {name!r}: {exc}") from exc
        return int(meta["batches_done"])


# ------------------------------------------------------------------- helpers
def _as_tuple(args: Any) -> tuple[Any, ...]:
    if args is None:
        return ()
    return tuple(args) if isinstance(args, tuple) else (args,)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank_path(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if _distributed():
        path = path.with_name(f"{path.name}.rank{dist.get_rank()}")
    return path


def _chain_first(
    first: tuple[int, Any], rest: Iterator[tuple[int, Any]]
) -> Iterator[tuple[int, Any]]:
    yield first
    yield from rest


def _prefetch(
    batches: Iterator[tuple[int, Any]], device: torch.device
) -> Iterator[tuple[int, tuple[Tensor, ...]]]:
    """Move batches to ``device``; on CUDA, the next batch's copy overlaps compute."""
    if device.type != "cuda":
        for index, batch in batches:
            yield index, _to_device(batch_inputs(batch, index), device)
        return
    side = torch.cuda.Stream(device)

    def load(index: int, batch: Any) -> tuple[int, tuple[Tensor, ...]]:
        inputs = batch_inputs(batch, index)
        with torch.cuda.stream(side):
            pinned = tuple(t.pin_memory() if t.device.type == "cpu" else t for t in inputs)
            return index, _to_device(pinned, device, non_blocking=True)

    current = None
    for index, batch in batches:
        upcoming = load(index, batch)
        if current is not None:
            yield current
        torch.cuda.current_stream(device).wait_stream(side)
        for t in upcoming[1]:
            t.record_stream(torch.cuda.current_stream(device))
        current = upcoming
    if current is not None:
        yield current


def _all_reduce(collectors: dict[str, _LayerCollector]) -> None:
    """Sum every rank's statistics (after agreeing on common references)."""
    if not _distributed():
        return
    for c in collectors.values():
        st = c.statistics
        has = torch.tensor(float(st.has_reference), dtype=torch.float64, device=st.device)
        x_ref, y_ref = st.x_ref * has, st.y_ref * has
        for t in (has, x_ref, y_ref):
            dist.all_reduce(t)
        if float(has) == 0:
            continue  # no rank saw this layer
        x_ref, y_ref = x_ref / has, y_ref / has
        if st.has_reference:
            st.rebase(x_ref, y_ref)
        else:
            st.set_reference(x_ref, y_ref)
        for key, value in st.state_dict().items():
            if key.startswith(("sum.", "scalar.", "mask.")) or key == "n":
                dist.all_reduce(value)
