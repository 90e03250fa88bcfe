"""PatternNet and PatternAttribution as an ``explain_func`` for evaluation libraries.

Quantus (and libraries that copy its contract) call an explanation function as
``explain_func(model=..., inputs=..., targets=..., **explain_func_kwargs)``
with numpy arrays (or tensors) and want a numpy array back, shaped like the
inputs with the channel axis summed (kept as size 1).  :func:`explain` is such
a function for every method of this package, chosen by ``method``;
:class:`PatternExplainer` is the same as a callable object that can also fit
patterns for whatever model it is handed (the refitting protocol of the
model-randomisation sanity check).  Neither imports Quantus.

:func:`replace_by_fill` and :func:`image_mean_fill` are the perturbation
settings under which Quantus's ``RegionPerturbation`` reproduces
:func:`captum_pattern.metrics.patch_degradation` (see ``docs/benchmarks.md``).

>>> import numpy as np, torch
>>> from captum_pattern import PatternFitter
>>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(),
...                             torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
>>> patterns = PatternFitter(model).fit([torch.randn(64, 1, 8, 8)])
>>> x, y = np.random.rand(5, 1, 8, 8).astype("float32"), np.array([0, 1, 2, 0, 1])
>>> a = explain(model=model, inputs=x, targets=y, method="pattern_net", patterns=patterns)
>>> type(a).__name__, a.shape
('ndarray', (5, 1, 8, 8))
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attribution import (
    LayerPatternAttribution,
    LayerPatternNet,
    NeuronPatternAttribution,
    NeuronPatternNet,
    PatternAttribution,
    PatternNet,
)
from .errors import InvalidInputError
from .fitter import PatternFitter
from .patterns import Patterns

__all__ = ["METHODS", "PatternExplainer", "explain", "image_mean_fill", "replace_by_fill"]

#: ``method`` names and the class each one runs
METHODS: dict[str, type] = {
    "pattern_net": PatternNet,
    "pattern_attribution": PatternAttribution,
    "neuron_pattern_net": NeuronPatternNet,
    "neuron_pattern_attribution": NeuronPatternAttribution,
    "layer_pattern_net": LayerPatternNet,
    "layer_pattern_attribution": LayerPatternAttribution,
}

# keywords Quantus may pass that need no action here (the model's own device is used)
_QUANTUS_KEYWORDS = frozenset({"device", "softmax", "xai_lib"})


def explain(
    model: nn.Module,
    inputs: np.ndarray | Tensor,
    targets: np.ndarray | Tensor | int | Sequence[int] | None,
    *,
    method: str = "pattern_attribution",
    patterns: Patterns | None = None,
    pattern_type: str = "relu",
    start_from: str = "output",
    layer: str | None = None,
    neuron_selector: Any = None,
    reduce_axes: Sequence[int] = (1,),
    keepdims: bool = True,
    batch_size: int | None = None,
    channel_first: bool | None = None,
    **kwargs: Any,
) -> np.ndarray:
    """Explain ``model`` on ``inputs`` for ``targets`` with a method of this package.

    Usable directly as Quantus's ``explain_func`` (its keyword call), with the
    other arguments in ``explain_func_kwargs``.

    Parameters
    ----------
    model:
        The network; it stays on its device and inputs are moved there.
    inputs:
        ``(N, C, ...)`` numpy array or tensor on any device, channels first;
        cast to the model's floating dtype.
    targets:
        One class per example (numpy, tensor or list), one class for all, or
        ``None`` for a model with one output (Captum's ``target`` forms).
        Ignored by the neuron methods, which explain ``neuron_selector``.
    method:
        A key of :data:`METHODS`: ``"pattern_net"``, ``"pattern_attribution"``
        (default), their ``"neuron_"`` variants (a hidden neuron's explanation
        in input space) or ``"layer_"`` variants (read at ``layer``, summed
        over its channels and resized bilinearly to the input, as Quantus
        does for Grad-CAM; images only; one channel).
    patterns:
        :class:`~captum_pattern.Patterns` for ``model`` (required here; use
        :class:`PatternExplainer` to fit them on the model it is given).
    pattern_type, start_from:
        As for :class:`~captum_pattern.PatternNet`.
    layer:
        Dotted name of the submodule for the neuron and layer methods (a
        name, not a module, so that it also finds the layer in the copies of
        the model that Quantus's randomisation metrics make).
    neuron_selector:
        Captum's neuron selector, for the neuron methods.
    reduce_axes, keepdims:
        Axes summed in the result, as Quantus's own ``explain`` (default: the
        channel axis, kept as size 1).  ``()`` keeps the input's shape.
        Inputs with fewer than three dimensions are never reduced.
    batch_size:
        Examples per backward pass (default: all at once).
    channel_first:
        Only ``None`` or ``True``: channel-last inputs are not supported.
    **kwargs:
        ``device``, ``softmax`` and ``xai_lib`` (sent by Quantus) are accepted
        and need nothing: the model's own device is used and the explanation
        starts from the selected output (logit).  Anything else is an error.

    Returns
    -------
    numpy.ndarray
        ``(N, ...)``, on the CPU, finite.

    Examples
    --------
    >>> import torch
    >>> from captum_pattern import PatternFitter
    >>> model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> patterns = PatternFitter(model).fit([torch.randn(64, 6)])
    >>> explain(model=model, inputs=np.ones((3, 6), "float32"), targets=np.array([0, 1, 1]),
    ...         patterns=patterns).shape
    (3, 6)
    """
    x = _checked_call(model, inputs, method, patterns, channel_first, kwargs)
    assert patterns is not None  # checked above
    target = _targets(targets, len(x), x.device)

    attribute = _attribute_function(model, method, patterns, pattern_type, start_from, layer)
    step = batch_size or len(x)
    parts = []
    for start in range(0, len(x), step):
        chunk = x[start : start + step]
        chunk_target = target
        if isinstance(target, Tensor) and target.dim() > 0:
            chunk_target = target[start : start + step]
        if method.startswith("neuron_"):
            if neuron_selector is None:
                raise ValueError(f"method {method!r} needs neuron_selector (Captum's form)")
            result = attribute(chunk, neuron_selector=neuron_selector)
        else:
            result = attribute(chunk, target=chunk_target)
        if method.startswith("layer_"):
            result = _to_input_grid(result, chunk, layer)
        parts.append(result.detach())
    explanation = torch.cat(parts)
    axes = tuple(reduce_axes) if x.dim() > 2 else ()
    if axes:
        explanation = explanation.sum(dim=axes, keepdim=keepdims)
    return explanation.cpu().numpy()


def _checked_call(
    model: nn.Module,
    inputs: np.ndarray | Tensor,
    method: str,
    patterns: Patterns | None,
    channel_first: bool | None,
    kwargs: dict[str, Any],
) -> Tensor:
    """Refuse what :func:`explain` cannot do; the inputs on the model's device and dtype."""
    unknown = sorted(set(kwargs) - _QUANTUS_KEYWORDS)
    if unknown:
        raise TypeError(
            f"explain() got unexpected keyword arguments {unknown}; known: method, patterns, "
            "pattern_type, start_from, layer, neuron_selector, reduce_axes, keepdims, "
            f"batch_size, channel_first and {sorted(_QUANTUS_KEYWORDS)}"
        )
    if channel_first is False:
        raise InvalidInputError(
            "explain() takes channel-first inputs (N, C, ...); got channel_first=False: "
            "move the channel axis to position 1 (numpy.moveaxis(x, -1, 1))"
        )
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {sorted(METHODS)}")
    if patterns is None:
        raise ValueError(
            f"method {method!r} needs patterns: pass patterns=PatternFitter(model).fit(data), "
            "or use PatternExplainer(fit_data=...) to fit them on the model it is given"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    parameter = next(iter(model.parameters()), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None else torch.get_default_dtype()
    x = _as_tensor(inputs, "inputs").to(device=device, dtype=dtype)
    if x.dim() < 2 or x.shape[0] == 0:
        raise InvalidInputError(
            f"inputs must be a non-empty batch (N, C, ...), got shape {tuple(x.shape)}"
        )
    return x


class PatternExplainer:
    """:func:`explain` with its settings bound, as one callable ``explain_func``.

    With ``fit_data`` instead of ``patterns``, patterns are fitted on each model
    the explainer is called with (and reused while that model's weights stay
    the same): the refitting protocol for model-randomisation sanity checks,
    where Quantus hands over copies of the model with randomised layers.

    Parameters
    ----------
    method:
        As for :func:`explain`.
    patterns:
        Fixed patterns, used for every model (the fixed-patterns protocol).
    fit_data:
        Batches for :meth:`PatternFitter.fit` (an iterable that can be
        iterated more than once, e.g. a list of tensors or a DataLoader).
    **settings:
        Further keyword arguments of :func:`explain`.

    Examples
    --------
    >>> model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> explainer = PatternExplainer("pattern_net", fit_data=[torch.randn(64, 6)])
    >>> explainer(model=model, inputs=np.ones((2, 6), "float32"), targets=[1, 0]).shape
    (2, 6)
    """

    def __init__(
        self,
        method: str = "pattern_attribution",
        patterns: Patterns | None = None,
        fit_data: Iterable[Any] | None = None,
        **settings: Any,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {sorted(METHODS)}")
        if (patterns is None) == (fit_data is None):
            raise ValueError("give exactly one of patterns (fixed) and fit_data (fit per model)")
        self.method = method
        self.patterns = patterns
        self.fit_data = fit_data
        self.settings = settings
        self._fitted: dict[str, Patterns] = {}

    def patterns_for(self, model: nn.Module) -> Patterns:
        """The fixed patterns, or those fitted on ``model`` as its weights are now."""
        if self.patterns is not None:
            return self.patterns
        assert self.fit_data is not None  # one of the two, checked in __init__
        key = _state_key(model)
        if key not in self._fitted:
            self._fitted = {key: PatternFitter(model).fit(self.fit_data)}  # keep the latest only
        return self._fitted[key]

    def __call__(
        self,
        model: nn.Module,
        inputs: np.ndarray | Tensor,
        targets: np.ndarray | Tensor | int | Sequence[int] | None,
        **kwargs: Any,
    ) -> np.ndarray:
        """Quantus's call: ``explainer(model=..., inputs=..., targets=..., **kwargs)``."""
        options = {**self.settings, **kwargs, "method": self.method}
        return explain(model, inputs, targets, patterns=self.patterns_for(model), **options)


# ------------------------------------------------------ RegionPerturbation settings
def image_mean_fill(images: np.ndarray) -> np.ndarray:
    """Each image's per-channel mean at every pixel, flattened per image: ``(N, C·H·W)``.

    The ``fill`` of :func:`replace_by_fill` that reproduces
    :func:`~captum_pattern.metrics.patch_degradation`'s default ``fill="image_mean"``.

    >>> image_mean_fill(np.arange(8.0).reshape(1, 2, 2, 2))
    array([[1.5, 1.5, 1.5, 1.5, 5.5, 5.5, 5.5, 5.5]])
    """
    images = np.asarray(images)
    means = images.mean(axis=tuple(range(2, images.ndim)), keepdims=True)
    return np.broadcast_to(means, images.shape).reshape(len(images), -1).copy()


def replace_by_fill(
    arr: np.ndarray, indices: np.ndarray, fill: np.ndarray, **kwargs: Any
) -> np.ndarray:
    """Quantus ``perturb_func``: ``arr[i, indices[i]] = fill[i, indices[i]]`` for each row ``i``.

    Quantus's region metrics call it with ``arr`` ``(N, C·H·W)`` (the images so
    far perturbed) and ``indices`` ``(N, k)``; ``fill`` comes from
    ``perturb_func_kwargs`` and holds the value each pixel is replaced by,
    taken from the *original* images (:func:`image_mean_fill`), so it needs
    the whole set in one batch (``batch_size`` of the metric ``>= N``).

    >>> replace_by_fill(np.zeros((1, 4)), np.array([[1, 3]]), np.array([[9.0, 8, 7, 6]]))
    array([[0., 8., 0., 6.]])
    """
    if fill.shape != arr.shape:
        raise InvalidInputError(
            f"fill of shape {fill.shape} does not match the perturbed batch of shape "
            f"{arr.shape}: build it with image_mean_fill(x_batch) and give the metric "
            "batch_size >= len(x_batch), so that one call sees the whole set"
        )
    rows = np.arange(len(arr))[:, None]
    perturbed = arr.copy()
    perturbed[rows, indices] = fill[rows, indices]
    return perturbed


# ----------------------------------------------------------------- helpers
def _state_key(model: nn.Module) -> str:
    """A hash of every parameter and buffer of ``model`` (BatchNorm statistics included)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(
            tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()


def _as_tensor(value: Any, what: str) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach()
    try:
        return torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InvalidInputError(
            f"{what} must be a numpy array or a tensor, got {type(value).__name__}: {exc}"
        ) from exc


def _targets(targets: Any, n: int, device: torch.device) -> Any:
    """Quantus's targets in Captum's form: an int, or a long tensor with one per example."""
    if targets is None or isinstance(targets, int):
        return targets
    if isinstance(targets, tuple):
        return targets
    target = _as_tensor(targets, "targets")
    if target.is_floating_point():
        if not bool((target == target.round()).all()):
            raise InvalidInputError(f"targets must be class indices, got values {target[:5]}")
    target = target.long().to(device)
    if target.dim() == 0:
        return int(target)
    if target.dim() == 1 and len(target) != n:
        raise InvalidInputError(
            f"targets hold {len(target)} classes for {n} inputs; give one per input or one int"
        )
    return target


def _attribute_function(
    model: nn.Module,
    method: str,
    patterns: Patterns,
    pattern_type: str,
    start_from: str,
    layer: str | None,
) -> Any:
    cls = METHODS[method]
    if method.startswith(("neuron_", "layer_")):
        if layer is None:
            raise ValueError(f"method {method!r} needs layer=<dotted submodule name>")
        try:
            module = model.get_submodule(layer)
        except AttributeError as exc:
            names = [name for name, _ in model.named_modules() if name]
            raise ValueError(
                f"the model has no submodule {layer!r}; its submodules: {names[:20]}"
            ) from exc
        return cls(model, module, patterns, pattern_type, start_from).attribute
    return cls(model, patterns, pattern_type, start_from).attribute


def _to_input_grid(result: Any, inputs: Tensor, layer: str | None) -> Tensor:
    """A layer's explanation summed over its channels and resized to the input's grid."""
    if isinstance(result, tuple) or result.dim() != 4 or inputs.dim() != 4:
        shape = [tuple(r.shape) for r in result] if isinstance(result, tuple) else result.shape
        raise InvalidInputError(
            f"layer {layer!r} gives explanations of shape {tuple(shape)} for inputs of shape "
            f"{tuple(inputs.shape)}; the layer methods map (N, C, h, w) layer outputs onto "
            "(N, C, H, W) images only: choose a convolutional layer or a pattern_* method"
        )
    summed = result.sum(1, keepdim=True)
    resized = F.interpolate(summed, size=inputs.shape[-2:], mode="bilinear", align_corners=False)
    return resized
