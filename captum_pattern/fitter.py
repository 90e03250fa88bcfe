"""PatternFitter: learn the patterns of every explained layer in one pass.

The fitter asks the :func:`~captum_pattern.tap.layer_tap` for each explained
layer's input and pre-activation, feeds them to one
:class:`~captum_pattern.collector.LayerCollector` per layer, and lets the
:class:`~captum_pattern.runner.StreamRunner` run the model over the data
(device moves, precision, checkpoints, the distributed reduce).  At the end
each layer's float64 sums are solved for the patterns
(:mod:`captum_pattern.statistics`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .activations import (
    ForwardFacts,
    Regimes,
    check_approximate,
    check_supported,
    inspect_forward,
)
from .canonize import (
    check_batchnorms,
    find_batchnorm_folds,
    folded_parameters,
    model_state_guard,
)
from .collector import LayerCollector
from .errors import InvalidDataError, UnsupportedModelError, forward_errors
from .layers import layer_weight
from .patterns import LayerPatterns, Patterns, unwrap_model, weights_fingerprint
from .runner import Checkpoint, Precision, StreamRunner, batch_inputs, distributed
from .statistics import PATTERN_TYPES, required_stats
from .tap import explained_layers, layer_tap

__all__ = ["PatternFitter", "batch_inputs"]

CHECKPOINT_FORMAT = "captum-pattern-checkpoint"
CHECKPOINT_VERSION = 2


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
        a time, then one product), ``"auto"`` (a fixed rule from the layer's
        and its input's shape, :meth:`~captum_pattern.layers.LayerGeometry.kernel_for`)
        or ``"autotune"`` (time each on the layer's first buffer and keep the
        fastest).  The kernels chosen are recorded in the patterns'
        ``fit_settings["kernels"]``.  The choice changes the sums only by
        float32 rounding.  Other layers always use the weight gradient.
    approximate:
        ``None`` (default): refuse a model that runs functions without linear
        regimes (GELU, SiLU, sigmoid, tanh, softmax, LayerNorm, ...), naming
        each and where it is called.  ``"gradient"``: use their ordinary
        gradient (not the paper's method), announced once per call site.

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
        approximate: str | None = None,
    ) -> None:
        self.approximate = check_approximate(approximate)
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
        # DataParallel, DistributedDataParallel, torch.compile: the fit runs the module
        # inside (one device, the batches as given; hooks do not work under compile and
        # DataParallel's replicas would run them in other threads); names are the
        # inner module's, which patterns of either form use (Patterns.for_model)
        self.model = unwrap_model(model)
        self.layers = explained_layers(self.model)
        if not self.layers:
            raise UnsupportedModelError(
                f"{type(self.model).__name__} has no nn.Linear or nn.Conv1d/2d/3d layer, so "
                "it has nothing to learn patterns for"
            )
        check_batchnorms(self.model)

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
        if (checkpoint_every or resume) and checkpoint is None:
            raise ValueError("checkpoint_every and resume need a checkpoint path")
        runner = StreamRunner(
            self.model,
            device,
            additional_forward_args,
            max_batches,
            Precision(autocast, tf32),
            callback,
        )
        with model_state_guard(self.model), torch.no_grad():
            first, data = runner.first_batch(data, "data")
            folds, facts = self._probe(first, runner.extra)
            regimes = facts.regimes
            state = _FitState(self._collectors(folds, regimes))
            fingerprint = weights_fingerprint(self.model, folds)  # once per fit
            saved = None
            if checkpoint is not None:
                saved = Checkpoint(
                    checkpoint,
                    checkpoint_every,
                    resume,
                    self._settings(folds, fingerprint),
                    CHECKPOINT_FORMAT,
                    CHECKPOINT_VERSION,
                )

            def observe(name: str, x: Tensor, z: Tensor) -> None:
                state.collectors[name].observe(x, z, runner.batch)

            with layer_tap(self.model, self.layers, folds, observe, runner.where) as tap:
                done = runner.run(data, lambda _: tap.check(), state, saved)
            patterns = self._patterns(state.collectors, folds, done, fingerprint)
        patterns.settings["outputs"] = facts.outputs
        _report_zeros(patterns, facts.outputs)
        return patterns.attach(self.model)  # PatternNet(model) finds them (a weak link)

    def _probe(
        self, inputs: tuple[Tensor, ...], extra: tuple[Any, ...]
    ) -> tuple[dict[str, str], ForwardFacts]:
        """The BatchNorm folds and what runs after each layer, from one probe forward.

        Fold discovery records inside the activation inspection's forward.  That
        inspection watches the layers' own outputs; where a BatchNorm is folded,
        the pre-activation is the BatchNorm's output, so a model with folds is
        inspected once more with them (a second probe forward).
        """
        batch = inputs  # named in errors: the probe's one sample is not what the user gave
        if not extra:  # one sample is enough to see the structure
            inputs = tuple(t[:1] for t in inputs)
        probe = tuple(
            t.detach().requires_grad_(True) if t.is_floating_point() else t for t in inputs
        )
        seen: dict[str, Any] = {}

        def run() -> Any:
            with forward_errors(InvalidDataError, "batch 0: ", batch):
                seen["output"] = self.model(*probe, *extra)
            return seen["output"]

        def run_finding_folds() -> Any:
            seen["folds"] = find_batchnorm_folds(self.model, run)
            return seen["output"]

        facts = inspect_forward(self.model, run_finding_folds, self.layers, {})
        folds: dict[str, str] = seen["folds"]
        if folds:
            facts = inspect_forward(self.model, run, self.layers, folds)
        check_supported(self.model, facts, self.approximate, "PatternFitter")
        return folds, facts

    def _collectors(
        self, folds: Mapping[str, str], regimes: Mapping[str, Regimes]
    ) -> dict[str, LayerCollector]:
        collectors = {}
        for name, module in self.layers.items():
            bn_name = folds.get(name)
            collectors[name] = LayerCollector(
                name,
                module,
                self.model.get_submodule(bn_name) if bn_name else None,
                bn_name,
                self.stat_keys,
                layer_weight(module).device,
                flush_samples=self.flush_samples,
                method=self.method,
                regimes=regimes[name],
            )
        return collectors

    def _settings(self, folds: Mapping[str, str], fingerprint: str) -> dict[str, Any]:
        """What a checkpoint must share with this fit to be resumed by it."""
        return {
            "pattern_types": list(self.pattern_types),
            "folds": dict(folds),
            "layers": sorted(self.layers),
            "weights": fingerprint,
            "method": self.method,
            "flush_samples": self.flush_samples,
        }

    def _patterns(
        self,
        collectors: Mapping[str, LayerCollector],
        folds: Mapping[str, str],
        batches: int,
        fingerprint: str,
    ) -> Patterns:
        layers = {}
        for name, c in collectors.items():
            # a folded weight in float64; a plain one as it is (solved block by block)
            weight, _ = folded_parameters(c.module, c.bn, torch.float64 if c.bn else None)
            dtype = layer_weight(c.module).dtype
            solved = c.statistics.solve(weight, self.pattern_types, consume=True, out_dtype=dtype)
            patterns: dict[str, Tensor | None] = dict.fromkeys(PATTERN_TYPES.values())
            for kind, (pattern, _) in solved.items():
                patterns[PATTERN_TYPES[kind]] = pattern
            n = float(c.statistics.n)
            fraction = (c.statistics.scalars["n_pos"] / max(n, 1.0)).float()
            c.release()  # the sums were used as scratch space: free them now
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
            "folds": dict(folds),
            "kernels": {name: c.method for name, c in collectors.items()},
            "activations": {name: c.regimes.to_json() for name, c in collectors.items()},
            "approximate": self.approximate,
            "world_size": dist.get_world_size() if distributed() else 1,
            "torch": torch.__version__,
        }
        return Patterns(layers, fingerprint, settings)


def _report_zeros(patterns: Patterns, outputs: Sequence[str]) -> None:
    """Warn about zero patterns: per layer the count, for output layers the classes.

    A zero pattern (no sample in the regime, or a zero denominator) makes a
    neuron's explanation zero; for a layer whose output the model returns, a
    zero row means that output (class) is explained by zeros.
    """
    lines = []
    activations = patterns.settings.get("activations", {})
    for name, layer in patterns.items():
        sloped = activations.get(name, {}).get("negative_slope", False)
        for kind, mask in layer.zero.items():
            count = int(mask.sum())
            if count == 0 or (kind == "relu_negative" and not sloped):
                continue  # a₋ of a ReLU layer is not used to explain
            line = f"layer {name!r} ({kind}): {count} of {mask.numel()} neurons"
            if name in outputs:
                indices = mask.nonzero().flatten().tolist()
                listed = ", ".join(map(str, indices[:10])) + (" ..." if len(indices) > 10 else "")
                line += f" — outputs {listed} are explained by zeros with this pattern type"
            lines.append(line)
    if lines:
        lines.sort(key=lambda line: "are explained by zeros" not in line)  # output layers first
        shown = lines[:5] + ([f"and {len(lines) - 5} more layers"] if len(lines) > 5 else [])
        warnings.warn(
            "PatternFitter: some patterns are zero (no sample of the data fell in that regime, "
            "e.g. a class whose output was never positive, or the output did not vary): "
            + "; ".join(shown)
            + ". Fit on more varied data, or use pattern_type='linear' for those outputs "
            "(Patterns.summary() lists every layer)",
            UserWarning,
            stacklevel=3,
        )


class _FitState:
    """The collectors of every layer, as one :class:`~captum_pattern.runner.Accumulator`."""

    def __init__(self, collectors: dict[str, LayerCollector]) -> None:
        self.collectors = collectors

    def flush(self) -> None:
        """Empty every buffer into the sums; stop on a non-finite batch."""
        try:
            for c in self.collectors.values():
                c.flush()
        finally:
            for c in self.collectors.values():
                c.clear()
        flagged = [
            (int(c.bad_batch), name)
            for name, c in self.collectors.items()
            if c.bad_batch is not None and int(c.bad_batch) >= 0
        ]
        if flagged:
            batch, name = min(flagged)
            raise InvalidDataError(
                f"batch {batch}: layer {name!r} received NaN or Inf (in its input or output); "
                "the fit was stopped and nothing was saved from that batch on. Clean the data"
            )

    def state_dict(self) -> dict[str, Tensor]:
        return {
            f"{name}/{key}": value
            for name, c in self.collectors.items()
            for key, value in c.statistics.state_dict().items()
        }

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        for name, c in self.collectors.items():
            prefix = f"{name}/"
            own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            try:
                c.statistics.load_state_dict(own)
            except ValueError as exc:
                raise ValueError(f"layer {name!r}: {exc}") from exc

    def reduce(self, all_reduce: Callable[[Tensor], None]) -> None:
        for c in self.collectors.values():
            c.statistics.reduce(all_reduce)
