"""What the model really runs after each explained layer, and what the method cannot explain.

The paper's estimators need the *linear regimes* of the activation that reads
a layer's pre-activation ``z``: for ReLU the open regime ``z > 0`` (slope 1)
and the closed one (slope 0).  :func:`inspect_forward` runs the model once
under a :class:`~torch.overrides.TorchFunctionMode` and records, for each
explained layer, the function that reads its pre-activation (modules and
functional calls alike: ``nn.ReLU6``, ``F.leaky_relu``, ``x.clamp(0, 6)``...).
It also records every call of a function that has no linear regimes (GELU,
SiLU, sigmoid, tanh, softmax, LayerNorm, ...) with the module it was called
in, so that callers can refuse the model by default.

Piecewise-linear activations and their :class:`Regimes`:

============================  ========================  =====================
activation                    open regime (slope 1)     other regimes
============================  ========================  =====================
ReLU                          ``z > 0``                 ``z ≤ 0``: slope 0
LeakyReLU(α), PReLU(α)        ``z > 0``                 ``z ≤ 0``: slope α
ReLU6, Hardtanh(lo, hi)       ``lo < z < hi``           saturated: slope 0
none found (e.g. ``+ skip``)  ``z > 0`` (as ReLU)       ``z ≤ 0``
============================  ========================  =====================
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .errors import UnsupportedModelError
from .tap import module_hooks

__all__ = [
    "ForwardFacts",
    "Regimes",
    "SmoothCall",
    "check_approximate",
    "check_supported",
    "inspect_forward",
]


@dataclass(frozen=True)
class Regimes:
    """The linear regimes of the activation after one layer.

    The open regime ``lower < z < upper`` has slope 1 and its own pattern
    ``a₊``; with ``negative_slope``, the regime ``z ≤ lower`` has a non-zero
    slope (LeakyReLU, PReLU: the slope is the activation's own) and uses
    ``a₋``; every other regime has slope 0 and contributes nothing.

    >>> Regimes().gate(torch.tensor([-1.0, 0.5, 7.0]))
    tensor([False,  True,  True])
    >>> Regimes("relu6", upper=6.0).gate(torch.tensor([-1.0, 0.5, 7.0]))
    tensor([False,  True, False])
    """

    activation: str = "relu"
    lower: float = 0.0
    upper: float = math.inf
    negative_slope: bool = False

    def gate(self, z: Tensor) -> Tensor:
        """The open regime's mask ``lower < z < upper``."""
        open_ = z > self.lower
        if math.isfinite(self.upper):
            open_ &= z < self.upper
        return open_

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe form (``upper = inf`` as ``None``) for pattern files."""
        data = asdict(self)
        data["upper"] = None if math.isinf(self.upper) else self.upper
        return data

    @classmethod
    def from_json(cls, data: Any) -> Regimes:
        """Inverse of :meth:`to_json`; raises ``ValueError`` on anything else."""
        if not isinstance(data, dict) or set(data) != {
            "activation",
            "lower",
            "upper",
            "negative_slope",
        }:
            raise ValueError(f"not a regimes record: {data!r}")
        upper = math.inf if data["upper"] is None else data["upper"]
        fields = (data["activation"], data["lower"], upper, data["negative_slope"])
        if not (
            isinstance(fields[0], str)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in fields[1:3])
            and isinstance(fields[3], bool)
            and fields[1] < fields[2]
        ):
            raise ValueError(f"not a regimes record: {data!r}")
        return cls(fields[0], float(fields[1]), float(fields[2]), fields[3])


@dataclass(frozen=True)
class SmoothCall:
    """A call of a function without linear regimes: what, and in which module."""

    function: str
    module: str
    step: int = field(default=0, compare=False)  # its place in the forward pass

    def __str__(self) -> str:
        where = f"module {self.module!r}" if self.module else "the model's own forward"
        return f"{self.function} (called in {where})"


RELU = Regimes()


def _relu(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Regimes:
    return RELU


def _leaky(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Regimes:
    slope = kwargs.get("negative_slope", args[1] if len(args) > 1 else 0.01)
    return Regimes("leaky_relu", negative_slope=slope != 0)


def _prelu(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Regimes:
    return Regimes("prelu", negative_slope=True)


def _hardtanh(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Regimes:
    lower = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
    upper = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
    return Regimes("hardtanh", float(lower), float(upper))


def _relu6(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Regimes:
    return Regimes("relu6", 0.0, 6.0)


def _clamp(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Regimes | None:
    lower = kwargs.get("min", args[1] if len(args) > 1 else None)
    upper = kwargs.get("max", args[2] if len(args) > 2 else None)
    if isinstance(lower, Tensor) or isinstance(upper, Tensor) or lower is None:
        return None  # not a fixed piecewise-linear map of z
    return Regimes("clamp", float(lower), math.inf if upper is None else float(upper))


# functions that read a pre-activation as a piecewise-linear activation
_PIECEWISE: dict[Any, Callable[[tuple[Any, ...], dict[str, Any]], Regimes | None]] = {
    F.relu: _relu,
    F.relu_: _relu,
    torch.relu: _relu,
    torch.relu_: _relu,
    Tensor.relu: _relu,
    Tensor.relu_: _relu,
    F.leaky_relu: _leaky,
    F.leaky_relu_: _leaky,
    F.prelu: _prelu,
    torch.prelu: _prelu,
    F.hardtanh: _hardtanh,
    F.hardtanh_: _hardtanh,
    F.relu6: _relu6,
    torch.clamp: _clamp,
    torch.clip: _clamp,
    Tensor.clamp: _clamp,
    Tensor.clamp_: _clamp,
    Tensor.clip: _clamp,
}

# functions without linear regimes: the paper's estimators do not apply
_SMOOTH: dict[Any, str] = {
    F.gelu: "gelu",
    F.silu: "silu",
    F.mish: "mish",
    F.elu: "elu",
    F.selu: "selu",
    F.celu: "celu",
    F.softplus: "softplus",
    F.hardswish: "hardswish",
    F.hardsigmoid: "hardsigmoid",
    F.logsigmoid: "logsigmoid",
    F.softmax: "softmax",
    F.log_softmax: "log_softmax",
    F.layer_norm: "layer_norm",
    F.group_norm: "group_norm",
    F.instance_norm: "instance_norm",
    F.local_response_norm: "local_response_norm",
    F.scaled_dot_product_attention: "scaled_dot_product_attention",
    F.multi_head_attention_forward: "multi_head_attention_forward",
    torch.sigmoid: "sigmoid",
    torch.tanh: "tanh",
    torch.softmax: "softmax",
    torch.exp: "exp",
    Tensor.sigmoid: "sigmoid",
    Tensor.tanh: "tanh",
    Tensor.softmax: "softmax",
    Tensor.exp: "exp",
}
_SMOOTH.update(
    {getattr(torch, n): n for n in ("erf", "layer_norm", "group_norm") if hasattr(torch, n)}
)

# functions that only look at a tensor's metadata: not readers of its values
_METADATA = {"size", "dim", "numel", "is_floating_point", "is_complex", "__get__", "__len__"}


@dataclass
class ForwardFacts:
    """What :func:`inspect_forward` saw: regimes per layer, smooth calls, output layers."""

    regimes: dict[str, Regimes]
    smooth: list[SmoothCall]
    outputs: list[str]  # layers whose pre-activation the model returns (e.g. the logits)
    starts: dict[str, int] = field(default_factory=dict)  # module -> step it last started at
    ends: dict[str, int] = field(default_factory=dict)  # module -> step it last ended at

    def around(self, module: str, inside: bool, before: bool) -> ForwardFacts:
        """Only the smooth calls before (``before``) or after ``module``; ``inside``
        counts the module's own calls in.

        The neuron variants explain through what runs before their layer, the
        layer variants through what runs after it.
        """
        start, end = self.starts.get(module, 0), self.ends.get(module, 0)
        if before:
            keep = [c for c in self.smooth if c.step <= (end if inside else start)]
        else:
            keep = [c for c in self.smooth if c.step > (start if inside else end)]
        return ForwardFacts(self.regimes, keep, self.outputs, self.starts, self.ends)


class _Recorder(TorchFunctionMode):
    """Records readers of the watched pre-activations and calls of smooth functions."""

    def __init__(self, watched: dict[int, tuple[str, Tensor, int]], stack: list[str]) -> None:
        super().__init__()
        self.watched = watched
        self.stack = stack
        self.readers: dict[str, list[Regimes | None]] = {}
        self.smooth: dict[tuple[str, str], int] = {}  # (function, module) -> last step
        self.step = 0  # calls seen so far: the order of events in the forward pass

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        self.step += 1
        if func in _SMOOTH:
            self.smooth[(_SMOOTH[func], self.stack[-1] if self.stack else "")] = self.step
        elif name not in _METADATA:
            self._note_reader(func, args, kwargs)
        return func(*args, **kwargs)

    def _note_reader(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        for arg in (*args, *kwargs.values()):
            if not isinstance(arg, Tensor):
                continue
            seen = self.watched.get(id(arg))
            if seen is None or seen[1] is not arg or arg._version != seen[2]:
                continue
            parse = _PIECEWISE.get(func)
            first = bool(args) and args[0] is arg
            self.readers.setdefault(seen[0], []).append(
                parse(args, kwargs) if parse is not None and first else None
            )


@contextmanager
def _module_stack(
    model: nn.Module,
    stack: list[str],
    recorder: _Recorder,
    starts: dict[str, int],
    ends: dict[str, int],
) -> Iterator[None]:
    names = {m: n for n, m in model.named_modules()}

    def push(module: nn.Module, args: tuple[Any, ...]) -> None:
        starts[names[module]] = recorder.step
        stack.append(names[module])

    def pop(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        ends[names[module]] = recorder.step  # where in the forward pass it ended (last call)
        if stack:
            stack.pop()

    modules = list(names)
    with module_hooks(dict.fromkeys(modules, pop), dict.fromkeys(modules, push)):
        yield


def inspect_forward(
    model: nn.Module,
    run_forward: Callable[[], Any],
    layers: dict[str, nn.Module],
    folds: dict[str, str],
) -> ForwardFacts:
    """Run the model once; the regimes after each layer and the smooth calls.

    A layer's pre-activation is its output, or its folded BatchNorm's.  When
    that tensor is read by exactly one piecewise-linear activation (in every
    call), the layer gets that activation's :class:`Regimes`; otherwise (no
    activation, a residual addition first, several readers) the ReLU default.

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU6(), nn.Linear(4, 2), nn.GELU())
    >>> facts = inspect_forward(net, lambda: net(torch.randn(2, 3)), {"0": net[0], "2": net[2]}, {})
    >>> facts.regimes["0"].activation, facts.regimes["0"].upper
    ('hardtanh', 6.0)
    >>> [str(call) for call in facts.smooth]
    ["gelu (called in module '3')"]
    """
    watched: dict[int, tuple[str, Tensor, int]] = {}
    stack: list[str] = []
    recorder = _Recorder(watched, stack)
    producers = {model.get_submodule(folds.get(name, name)): name for name in layers}

    def watch(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if isinstance(output, Tensor):
            watched[id(output)] = (producers[module], output, output._version)

    starts: dict[str, int] = {}
    ends: dict[str, int] = {}
    with (
        _module_stack(model, stack, recorder, starts, ends),
        module_hooks(dict.fromkeys(producers, watch)),
    ):
        with recorder, torch.no_grad():
            result = run_forward()
    returned = {id(t) for t in _tensors(result)}
    outputs = sorted({name for key, (name, _, _) in watched.items() if key in returned})
    regimes = {}
    for name in layers:
        readers = recorder.readers.get(name, [])
        found = readers[0] if readers and all(r == readers[0] for r in readers) else None
        regimes[name] = found or RELU
    smooth = [SmoothCall(f, m, step) for (f, m), step in recorder.smooth.items()]
    return ForwardFacts(regimes, smooth, outputs, starts, ends)


def _tensors(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


# modules with weights that get no pattern (their ordinary gradient would be used)
_UNEXPLAINED_WEIGHTS: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvTransposeNd,
    nn.Bilinear,
    nn.MultiheadAttention,
    nn.RNNBase,
)
APPROXIMATIONS = (None, "gradient")
# the call sites already announced, per model: one warning each
_WARNED: weakref.WeakKeyDictionary[nn.Module, set[tuple[str, SmoothCall]]] = (
    weakref.WeakKeyDictionary()
)


def unexplained_calls(model: nn.Module, facts: ForwardFacts) -> list[SmoothCall]:
    """The smooth calls, and the weight modules that get no pattern, of ``model``."""
    calls = list(facts.smooth)
    for name, module in model.named_modules():
        if isinstance(module, _UNEXPLAINED_WEIGHTS):
            kind = type(module).__name__ + " (a weight layer without a pattern)"
            calls.append(SmoothCall(kind, name))
    return calls


def check_supported(
    model: nn.Module, facts: ForwardFacts, approximate: str | None, what: str
) -> None:
    """Refuse a model with functions outside the method, or warn once per call site.

    With ``approximate=None`` (the default) an :class:`UnsupportedModelError`
    names every such function and the module it is called in; with
    ``approximate="gradient"`` their ordinary gradient is used, announced by
    one warning per call site.
    """
    calls = unexplained_calls(model, facts)
    if not calls:
        return
    if approximate is None:
        listed = _grouped(calls)
        raise UnsupportedModelError(
            f"{what}: {type(model).__name__} runs functions without linear regimes ({listed}). "
            "PatternNet and PatternAttribution are defined for piecewise-linear networks "
            "(ReLU, LeakyReLU, PReLU, ReLU6, Hardtanh, max pooling, linear and convolutional "
            "layers, per-channel BatchNorm); pass approximate='gradient' to use the ordinary "
            "gradient through these functions (not the paper's method), or explain the logits "
            "of a model without them"
        )
    warned = _WARNED.setdefault(model, set())
    for call in calls:
        if (what, call) in warned:
            continue
        warned.add((what, call))
        warnings.warn(
            f"{what}: approximate='gradient': the ordinary gradient is used through {call} "
            "(not the paper's method there)",
            UserWarning,
            stacklevel=3,
        )


def _grouped(calls: list[SmoothCall]) -> str:
    """``gelu in 3 places (modules 'a', 'b', 'c'); ...`` for an error message."""
    by_function: dict[str, list[str]] = {}
    for call in calls:
        by_function.setdefault(call.function, []).append(call.module)
    parts = []
    for function, modules in by_function.items():
        shown = ", ".join(repr(m) if m else "the model's own forward" for m in modules[:3])
        more = f", ... ({len(modules)} places)" if len(modules) > 3 else ""
        parts.append(f"{function} in {shown}{more}")
    return "; ".join(parts)


def check_approximate(approximate: str | None) -> str | None:
    """Validate the ``approximate`` option."""
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be None or 'gradient', got {approximate!r}")
    return approximate
