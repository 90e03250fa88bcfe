"""PatternNet and PatternAttribution as Captum attribution methods.

Both are the gradient of the selected output with every explained layer's
weight replaced in the backward pass (:mod:`captum_pattern.backward`): by the
pattern ``a`` for PatternNet (the signal, Sec. 4.3 and Appendix A.2.3 of the
paper) and by ``w ⊙ a`` for PatternAttribution (Deep Taylor with the learned
root point ``x₀ = x − a wᵀx``, Appendix A.3.3); the tensor is chosen by a
rule of :mod:`captum_pattern.rules`.  The backward pass starts from the
selected output's value ``y``, as in the paper; ``start_from="one"`` starts
it from 1, as Captum's gradient methods do.

Every class is a thin shell over one driver, :class:`_SubstitutedGradient`,
and sets only its rule (as Captum's ``GuidedBackprop``/``Deconvolution``).
Without ``patterns=`` a method uses the patterns attached to the model
(:meth:`Patterns.attach`, done by :class:`PatternFitter` and
:meth:`Patterns.load` with ``model=``).  Errors about an impossible target or
neuron are :class:`~captum_pattern.errors.InvalidTargetError`, which is also
the ``AssertionError`` Captum raises.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from captum.attr import GradientAttribution, LayerAttribution, NeuronAttribution
from captum.log import log_usage
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .activations import Regimes, check_approximate, check_supported, inspect_forward
from .backward import Substitute, substituted_backward
from .canonize import (
    batchnorm_scale,
    check_batchnorms,
    explained_layers,
    folded_parameters,
    model_state_guard,
)
from .errors import (
    InvalidInputError,
    InvalidTargetError,
    PatternMismatchError,
    UnsupportedModelError,
    forward_errors,
)
from .patterns import Patterns, attached_patterns, unwrap_model
from .rules import PatternRule, PatternTimesWeightRule, SubstitutionRule
from .tap import module_hooks

__all__ = [
    "LayerPatternAttribution",
    "LayerPatternNet",
    "NeuronPatternAttribution",
    "NeuronPatternNet",
    "PatternAttribution",
    "PatternNet",
    "select_neuron",
    "select_targets",
]

TargetType = int | tuple | Tensor | list | np.ndarray | None
StartFrom = Literal["output", "one"]
NeuronSelector = int | tuple[int | slice, ...] | Callable[[Any], Tensor]
Select = Callable[[Any, "tuple[Tensor, ...] | None"], Tensor]


# ---------------------------------------------------------------- the driver
class _SubstitutedGradient:
    """The one driver: forward, select, backward with the rule's tensors in place of weights.

    Parameters
    ----------
    method:
        The calling class's name, for messages.
    model:
        The network (an ``nn.Module``, possibly wrapped in ``DataParallel``,
        ``DistributedDataParallel`` or ``torch.compile``; the forward pass
        runs on the unwrapped module).
    patterns:
        Explicit :class:`Patterns`, or ``None`` for those attached to ``model``
        (looked up at every call, so a later fit or attach is used).
    rule:
        What replaces each weight (:mod:`captum_pattern.rules`).
    pattern_type, start_from:
        As documented on :class:`PatternNet`.
    """

    def __init__(
        self,
        method: str,
        model: nn.Module,
        patterns: Patterns | None,
        rule: SubstitutionRule,
        pattern_type: str,
        start_from: StartFrom,
        approximate: str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{method} needs the nn.Module the patterns were fitted on, "
                f"not a {type(model).__name__}"
            )
        if patterns is not None and not isinstance(patterns, Patterns):
            raise TypeError(f"patterns must be a Patterns object, not {type(patterns).__name__}")
        if pattern_type not in ("relu", "linear"):
            raise ValueError(f"pattern_type must be 'relu' or 'linear', got {pattern_type!r}")
        if start_from not in ("output", "one"):
            raise ValueError(f"start_from must be 'output' or 'one', got {start_from!r}")
        self.method = method
        self.model = model
        self.inner = unwrap_model(model)
        if not explained_layers(self.inner):
            raise UnsupportedModelError(
                f"{type(self.inner).__name__} has no nn.Linear or nn.Conv1d/2d/3d layer to explain"
            )
        self.explicit = None if patterns is None else patterns.for_model(model)
        self.rule = rule
        self.pattern_type = pattern_type
        self.start_from = start_from
        self._in_use: Patterns | None = None
        self._layers: dict[str, nn.Module] = {}
        self._pattern_cache: dict[tuple[str, torch.device, torch.dtype], Tensor] = {}
        self._substitute_cache: dict[str, tuple[_Key, Substitute]] = {}
        self._warned = False
        self._warned_zero = False
        self.approximate = check_approximate(approximate)
        # what the model runs after each layer, from a probe on the first call
        self._structure: tuple[Patterns, tuple[Any, ...], dict[str, Regimes]] | None = None
        self.patterns()  # fail now, not at the first attribute
        check_batchnorms(self.inner)

    def patterns(self) -> Patterns:
        """The patterns in use, checked again when they or the model's layers changed."""
        patterns = self.explicit if self.explicit is not None else attached_patterns(self.inner)
        if patterns is None:
            raise PatternMismatchError(
                f"{self.method}: no patterns for this {type(self.inner).__name__}. Fit them "
                "with PatternFitter(model).fit(data), load a file with "
                "Patterns.load(path, model=model), or attach patterns you have with "
                f"patterns.attach(model); or pass them: {self.method}(model, patterns)"
            )
        layers = explained_layers(self.inner)
        if patterns is not self._in_use or _changed(layers, self._layers):
            patterns.validate(self.inner)
            for lp in patterns.values():
                lp.pattern(self.pattern_type)  # raises if this type was not fitted
            if patterns is not self._in_use:
                self._warned = self._warned_zero = False
            self._in_use, self._layers = patterns, layers
            self._structure = None
            self._pattern_cache.clear()
            self._substitute_cache.clear()
        return patterns

    def module_name(self, layer: nn.Module) -> str:
        if not isinstance(layer, nn.Module):
            raise TypeError(f"layer must be an nn.Module, not {type(layer).__name__}")
        for name, module in self.inner.named_modules():
            if module is layer:
                return name
        raise ValueError(f"layer {type(layer).__name__} is not a submodule of the model")

    def _pattern(self, patterns: Patterns, name: str, like: Tensor) -> Tensor:
        key = (name, like.device, like.dtype)
        if key not in self._pattern_cache:
            pattern = patterns[name].pattern(self.pattern_type)
            self._pattern_cache[key] = pattern.to(device=like.device, dtype=like.dtype)
        return self._pattern_cache[key]

    def substitutes(self, patterns: Patterns, regimes: dict[str, Regimes]) -> dict[str, Substitute]:
        """The rule's tensors for each layer, recomputed when the layer's (or its
        BatchNorm's) tensors changed, also through ``.data``.

        A layer followed by an activation with a sloped lower regime (LeakyReLU,
        PReLU) gets the rule's tensor of ``a₋`` for that regime too.
        """
        substitutes = {}
        folds = patterns.folds
        for name, layer in self._layers.items():
            bn = self.inner.get_submodule(folds[name]) if name in folds else None
            key = _weights_key(layer, bn)
            cached = self._substitute_cache.get(name)
            if cached is None or not _same_key(cached[0], key):
                weight, _ = folded_parameters(layer, bn)
                pattern = self._pattern(patterns, name, weight)
                self._check_fitted_on(patterns, name, weight, pattern)
                substitute = Substitute(self.rule.substitute(weight, pattern))
                if self.pattern_type == "relu" and regimes[name].negative_slope:
                    lower = self._lower_pattern(patterns, name, weight, regimes[name])
                    substitute = Substitute(
                        substitute.open, self.rule.substitute(weight, lower), regimes[name]
                    )
                cached = (key, substitute)
                self._substitute_cache[name] = cached
            substitutes[name] = cached[1]
        return substitutes

    def _lower_pattern(
        self, patterns: Patterns, name: str, weight: Tensor, regimes: Regimes
    ) -> Tensor:
        """``a₋`` of a layer whose activation has a sloped lower regime."""
        layer = patterns[name]
        if layer.a_minus is None:
            raise PatternMismatchError(
                f"layer {name!r} is followed by {regimes.activation}, whose regime z ≤ 0 has a "
                "slope of its own and needs the pattern a₋; fit with PatternFitter(model, "
                "pattern_types=['relu', 'relu_negative'])"
            )
        return layer.a_minus.to(device=weight.device, dtype=weight.dtype)

    def affine_factors(self, patterns: Patterns) -> dict[str, Tensor]:
        """Per standalone BatchNorm (not folded), the rule's per-channel factor.

        Such a BatchNorm is the linear layer ``z = s·x + t``: its pattern is
        ``1/s`` (zero where ``s = 0``) unless ``patterns.affine`` gives another.
        """
        folded = set(patterns.folds.values())
        factors = {}
        for name, module in self.inner.named_modules():
            if isinstance(module, _BatchNorm) and name not in folded:
                scale = batchnorm_scale(module)
                pattern = patterns.affine.get(name)
                if pattern is None:
                    pattern = torch.where(scale != 0, 1 / scale.where(scale != 0, 1.0), 0.0)
                factors[name] = self.rule.substitute(scale, pattern.to(scale))
        return factors

    def regimes(
        self, patterns: Patterns, probe: Callable[[], Any], scope: tuple[str, bool, bool] | None
    ) -> dict[str, Regimes]:
        """What runs after each layer (from one probe forward, on the first call).

        Refuses functions without linear regimes on the explained path (all of
        it; with ``scope = (module, inside, before)`` only before or after that
        module) unless ``approximate`` (or the fit's) allows them, and an
        activation other than the one the patterns were fitted for.
        """
        key = _module_structure(self.inner)
        if (
            self._structure is not None
            and self._structure[0] is patterns
            and self._structure[1] == key
        ):
            return self._structure[2]
        facts = inspect_forward(self.inner, probe, self._layers, patterns.folds)
        approximate = self.approximate or patterns.settings.get("approximate")
        checked = facts if scope is None else facts.around(*scope)
        check_supported(self.inner, checked, approximate, self.method)
        fitted = _fitted_regimes(patterns)
        for name, found in facts.regimes.items():
            if name in fitted and fitted[name] != found:
                raise PatternMismatchError(
                    f"{self.method}: layer {name!r} was fitted with {fitted[name].activation} "
                    f"after it, but the model now runs {found.activation} there; refit the "
                    "patterns with PatternFitter(model).fit(data)"
                )
        self._structure = (patterns, key, facts.regimes)
        return facts.regimes

    def _check_fitted_on(
        self, patterns: Patterns, name: str, weight: Tensor, pattern: Tensor
    ) -> None:
        """Warn (once per patterns) when ``pattern`` was not fitted on ``weight``.

        Every estimator normalises a fitted pattern to ``wᵀa = 1`` for each
        neuron with a non-zero pattern (Eq. 4 and 8 of the paper), so other
        weights (another model's patterns, or weights changed since the fit)
        show at the cost of one product.  Patterns not made by a fit (no
        fingerprint) are not checked.
        """
        if patterns.fingerprint is None or self._warned:
            return
        norms = (weight * pattern).flatten(1).sum(1)
        live = pattern.flatten(1).abs().sum(1) > 0
        if not live.any() or float((norms[live] - 1).abs().max()) <= 1e-2:
            return
        self._warned = True
        warnings.warn(
            f"{self.method}: the patterns of layer {name!r} were not fitted on its current "
            f"weights (wᵀa is {float(norms[live].median()):.3g} where a fit gives 1): they "
            "belong to another model, or the weights changed since the fit; refit with "
            "PatternFitter(model).fit(data)",
            UserWarning,
            stacklevel=6,
        )

    def run(
        self,
        inputs: tuple[Tensor, ...],
        additional_forward_args: Any,
        select: Select,
        layers: Sequence[nn.Module] = (),
        to_input: bool = False,
        to_layer: bool = False,
    ) -> list[tuple[Tensor, ...]]:
        """Gradient of ``select(output, first layer's tensors)``, seeded by its value (or 1).

        With ``layers``, the tensors each layer receives (``to_input``) or
        returns are recorded; ``to_layer`` returns the gradient with respect to
        them (one tuple per layer; the inputs then need no gradient and may be
        integers) instead of one tuple for the inputs.
        """
        if torch.is_inference_mode_enabled():
            raise InvalidInputError(
                f"{self.method}.attribute was called inside torch.inference_mode(), where no "
                "backward pass is possible; call it outside that block (inside torch.no_grad() "
                "is fine: the method turns gradients on for itself)"
            )
        extra = _as_tuple(additional_forward_args)
        # inside the model's lock: another thread using this object waits, so the caches
        # patterns() refreshes are not changed under a running call
        with model_state_guard(self.model), torch.enable_grad(), ExitStack() as stack:
            patterns = self.patterns()
            weight = _weight(next(iter(self._layers.values())))
            _check_inputs(inputs, weight, floating=not to_layer)
            probe = tuple(x.detach() for x in inputs)

            def probe_forward() -> Any:
                with forward_errors(InvalidInputError, "", probe):
                    return self.inner(*probe, *extra)

            scope = None
            if layers:  # layer variants: what runs after the layer; neuron: before it
                inside = to_input if to_layer else not to_input  # the layer on the path?
                scope = (self.module_name(layers[0]), inside, not to_layer)
            regimes = self.regimes(patterns, probe_forward, scope)
            session = stack.enter_context(
                substituted_backward(
                    self.inner,
                    self.substitutes(patterns, regimes),
                    patterns.folds,
                    self.affine_factors(patterns),
                )
            )
            captures = [
                (layer, stack.enter_context(_capture_layer(layer, to_input, to_layer)))
                for layer in layers
            ]
            leaves = tuple(_leaf(x, requires_grad=not to_layer) for x in inputs)
            with forward_errors(InvalidInputError, "", leaves):
                output = self.inner(*leaves, *extra)
            session.check()
            recorded = [self._single_call(layer, calls) for layer, calls in captures]
            selected = select(output, recorded[0] if recorded else None)
            _check_selected(selected, leaves[0].shape[0], to_layer)
            seed = selected.detach() if self.start_from == "output" else torch.ones_like(selected)
            groups = recorded if to_layer else [leaves]
            wrt = tuple(t for group in groups for t in group)
            grads = torch.autograd.grad(selected, wrt, grad_outputs=seed, allow_unused=True)
        result = [torch.zeros_like(x) if g is None else g for x, g in zip(wrt, grads)]
        self._warn_if_zero(result, selected)
        if not all(bool(torch.isfinite(r).all()) for r in result):
            raise InvalidInputError(
                "the explanation overflowed (NaN or Inf) for these inputs: the product of the "
                "patterns along the network exceeds the floating-point range; explain in "
                "float64 (model.double() and double inputs)"
            )
        out, start = [], 0
        for group in groups:
            out.append(tuple(result[start : start + len(group)]))
            start += len(group)
        return out

    def _warn_if_zero(self, result: list[Tensor], selected: Tensor) -> None:
        """Warn once when an example's explanation is all zeros though its output is not."""
        if self._warned_zero or not result or result[0].dim() == 0:
            return
        flat = torch.cat([r.detach().reshape(r.shape[0], -1) for r in result], 1)
        if selected.numel() % flat.shape[0]:
            return
        live = (selected.detach().reshape(flat.shape[0], -1) != 0).any(1)
        silent = (flat == 0).all(1) & live
        if bool(silent.any()):
            self._warned_zero = True
            warnings.warn(
                f"{self.method}: the explanation of example {int(silent.nonzero()[0])} is all "
                "zeros although its selected output is not: a pattern on its path is zero "
                "(no fitting sample fell in that regime, e.g. a class whose output was never "
                "positive on the fitting data; see the fit's report or Patterns.summary()). "
                "Fit on more varied data, or use pattern_type='linear'",
                UserWarning,
                stacklevel=6,
            )

    def _single_call(self, layer: nn.Module, calls: list[tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
        if len(calls) != 1:
            raise UnsupportedModelError(
                f"layer {self.module_name(layer)!r} ran {len(calls)} times in one forward "
                "pass; choose a module that runs exactly once"
            )
        return calls[0]

    def check_on_path(self, layer_name: str, to_input: bool) -> None:
        """A folded pair is one layer: the tensor between its two modules is not explained."""
        folds = self.patterns().folds
        if not to_input and layer_name in folds:
            raise UnsupportedModelError(
                f"BatchNorm {folds[layer_name]!r} is folded into layer {layer_name!r}, so the "
                f"output of {layer_name!r} is inside one explained layer; use the BatchNorm "
                "module (the folded layer's output) instead"
            )
        if to_input and layer_name in folds.values():
            conv = next(k for k, v in folds.items() if v == layer_name)
            raise UnsupportedModelError(
                f"BatchNorm {layer_name!r} is folded into layer {conv!r}, so its input is "
                f"inside one explained layer; use the input of {conv!r} or the output of "
                f"{layer_name!r} instead"
            )


def _fitted_regimes(patterns: Patterns) -> dict[str, Regimes]:
    """The regimes a fit recorded, by the patterns' layer names (wrapper prefixes removed)."""
    recorded = patterns.settings.get("activations")
    if not isinstance(recorded, dict):
        return {}
    fitted = {}
    for key, value in recorded.items():
        name = next(
            (
                key[len(p) :]
                for p in ("", "module.", "_orig_mod.")
                if key[len(p) :] in patterns and key.startswith(p)
            ),
            None,
        )
        if name is not None:
            try:
                fitted[name] = Regimes.from_json(value)
            except ValueError as exc:
                raise PatternMismatchError(
                    f"the patterns' record of the activation after layer {name!r} is damaged "
                    f"({exc}); refit the patterns"
                ) from exc
    return fitted


def _changed(layers: dict[str, nn.Module], before: dict[str, nn.Module]) -> bool:
    """Whether a layer was added, removed or replaced by another module."""
    return layers.keys() != before.keys() or any(m is not before[n] for n, m in layers.items())


def _module_structure(model: nn.Module) -> tuple[Any, ...]:
    """What identifies the modules the model runs: a replaced or reconfigured one changes it.

    Each module's object and class, and for leaves without parameters (the
    activations) their settings, so that a ReLU swapped for another function
    after the first call is inspected again (a few microseconds per module).
    """
    key: list[Any] = []
    for module in model.modules():
        key.append(module)
        if not module._modules and not module._parameters:
            key.append(module.extra_repr())
    return tuple(key)


def _leaf(x: Tensor, requires_grad: bool) -> Tensor:
    """A leaf copy of an input (a real copy only for an inference-mode tensor)."""
    x = x.clone() if x.is_inference() else x.detach()
    return x.requires_grad_(requires_grad and x.is_floating_point())


def _check_selected(selected: Tensor, batch: int, to_layer: bool) -> None:
    if selected.dim() == 0 or selected.shape[0] != batch:
        raise InvalidTargetError(
            f"the selected value has shape {tuple(selected.shape)}, not one value (or one set "
            f"of neurons) for each of the {batch} examples; select per example"
        )
    if not selected.requires_grad:
        source = "layer" if to_layer else "inputs"
        raise InvalidInputError(
            f"the selected value does not depend on the {source} through a differentiable "
            "path, so there is nothing to explain"
        )
    if not torch.isfinite(selected).all():
        raise InvalidInputError(
            "the selected value holds NaN or Inf for these inputs; there is no finite "
            "explanation of it"
        )


# ------------------------------------------------------------ the main methods
class _PatternGradient(GradientAttribution):
    """Shell of :class:`PatternNet` and :class:`PatternAttribution`: sets ``rule`` only.

    Parameters
    ----------
    model:
        The network (an ``nn.Module``) the patterns were fitted on; it may be
        wrapped in ``nn.DataParallel``, ``DistributedDataParallel`` or
        ``torch.compile``.
    patterns:
        :class:`~captum_pattern.Patterns`, checked against ``model``.  Default:
        the model's own, from :class:`~captum_pattern.PatternFitter`,
        :meth:`Patterns.load` with ``model=`` or :meth:`Patterns.attach`.
    pattern_type:
        ``"relu"`` (``a₊``, the two-component estimator S_a+-, default) or
        ``"linear"`` (``a``, the linear estimator S_a).
    start_from:
        ``"output"`` (default, as in the paper): the backward pass starts from
        the selected output's value.  ``"one"``: from 1, Captum's gradient
        convention (the result is then divided by ``y`` per example).
    approximate:
        ``None`` (default: the fit's choice): refuse a model that runs
        functions without linear regimes (GELU, sigmoid, LayerNorm, ...).
        ``"gradient"``: use their ordinary gradient, announced once per call
        site (``docs/method.md``).
    """

    rule: ClassVar[SubstitutionRule]

    def __init__(
        self,
        model: nn.Module,
        patterns: Patterns | None = None,
        pattern_type: str = "relu",
        start_from: StartFrom = "output",
        approximate: str | None = None,
    ) -> None:
        self._driver = _SubstitutedGradient(
            type(self).__name__, model, patterns, self.rule, pattern_type, start_from, approximate
        )
        GradientAttribution.__init__(self, model)

    @property
    def patterns(self) -> Patterns:
        """The patterns this method uses now."""
        return self._driver.patterns()

    @log_usage()
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        target: TargetType = None,
        additional_forward_args: Any = None,
    ) -> Tensor | tuple[Tensor, ...]:
        """Explain the model's output ``target`` for ``inputs``.

        Parameters
        ----------
        inputs:
            A tensor or a tuple of tensors, the model's inputs; dimension 0 is
            the batch.
        target:
            Which output to explain, in any of Captum's forms (see
            :func:`select_targets`); it must name one value per example.
        additional_forward_args:
            Further positional arguments of the model's forward, after the
            inputs (not explained).

        Returns
        -------
        Tensor or tuple of Tensors
            Shaped like ``inputs``, in the same form (tensor or tuple).
        """
        is_tuple = isinstance(inputs, tuple)
        (result,) = self._driver.run(
            _input_tuple(inputs),
            additional_forward_args,
            lambda output, _: select_targets(output, target),
        )
        return result if is_tuple else result[0]


class PatternNet(_PatternGradient):
    """PatternNet: the signal the network detected, projected back to input space.

    The gradient of the selected output with every Linear/Conv weight replaced by
    its pattern (``a₊`` by default) in the backward pass; ReLU gates and max-pool
    routing are those of the forward pass.  ``PatternNet(model, patterns=None,
    pattern_type="relu", start_from="output")``; see :class:`_PatternGradient`.

    Examples
    --------
    >>> import torch
    >>> from captum_pattern import PatternFitter, PatternNet
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> patterns = PatternFitter(model).fit([torch.randn(256, 4)])
    >>> signal = PatternNet(model).attribute(torch.randn(2, 4), target=1)
    >>> signal.shape
    torch.Size([2, 4])
    """

    rule = PatternRule()


class PatternAttribution(_PatternGradient):
    """PatternAttribution: how much each input dimension of the signal contributed.

    The same backward pass as :class:`PatternNet` with ``w ⊙ a₊`` in place of
    each weight: Deep Taylor decomposition with the root point learned from
    data.  See :class:`_PatternGradient` for the parameters.

    Examples
    --------
    >>> import torch
    >>> from captum_pattern import PatternFitter, PatternAttribution
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> patterns = PatternFitter(model).fit([torch.randn(256, 4)])
    >>> heat = PatternAttribution(model, patterns).attribute(torch.randn(2, 4), target=0)
    >>> heat.shape
    torch.Size([2, 4])
    """

    rule = PatternTimesWeightRule()


# ---------------------------------------------------------------- helpers
def _weight(layer: nn.Module) -> Tensor:
    weight = layer.weight
    assert isinstance(weight, Tensor)  # an explained layer (Linear/Conv) has a weight
    return weight


_Key = tuple[tuple[Any, ...], Tensor]
_SAMPLE = 256  # weight entries compared per layer and call to notice edits through .data


def _weights_key(layer: nn.Module, bn: nn.Module | None) -> _Key:
    """What the folded weight depends on: each tensor's identity and version, and a sample.

    An in-place edit through ``.data`` does not move the version counter, so a
    fixed sample of up to 256 entries of each tensor (the first and last
    included) is compared too: a constant cost per layer, however large.
    """
    tensors = [_weight(layer)]
    if bn is not None:
        tensors += [t for t in (bn.weight, bn.running_var) if isinstance(t, Tensor)]
    ids = tuple((t.data_ptr(), t._version, t.device, t.dtype, t.shape) for t in tensors)
    samples = []
    for t in tensors:
        flat = t.detach().reshape(-1)
        step = max(1, -(-flat.numel() // _SAMPLE))
        samples += [flat[::step], flat[-1:]]
    return ids, torch.cat(samples)


def _same_key(a: _Key, b: _Key) -> bool:
    return a[0] == b[0] and torch.equal(a[1], b[1])


def _input_tuple(inputs: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return inputs if isinstance(inputs, tuple) else (inputs,)


def _as_tuple(args: Any) -> tuple[Any, ...]:
    if args is None:
        return ()
    return tuple(args) if isinstance(args, tuple) else (args,)


def _check_inputs(inputs: tuple[Any, ...], weight: Tensor, floating: bool = True) -> None:
    """Refuse inputs that cannot be explained, saying what to do instead.

    ``floating=False`` (layer variants: the backward pass stops at the layer)
    lets integer inputs such as token ids through.
    """
    if not inputs:
        raise InvalidInputError("inputs is an empty tuple; give at least one input tensor")
    for i, x in enumerate(inputs):
        if not isinstance(x, Tensor):
            raise InvalidInputError(
                f"input {i} is a {type(x).__name__}; inputs must be tensors (pass other "
                "arguments through additional_forward_args)"
            )
        if floating and not x.is_floating_point():
            raise InvalidInputError(
                f"input {i} has dtype {x.dtype}; attributions need floating-point inputs "
                "(pass integer arguments such as token ids through additional_forward_args, "
                "or explain at a layer with LayerPatternNet/LayerPatternAttribution)"
            )
        if x.dim() == 0:
            raise InvalidInputError(f"input {i} is a scalar; inputs need a batch dimension")
        if x.shape[0] == 0:
            raise InvalidInputError(
                f"input {i} has no example (shape {tuple(x.shape)}): there is nothing to explain"
            )
        if x.device != weight.device:
            raise InvalidInputError(
                f"input {i} is on {x.device} but the model is on {weight.device}; move the "
                f"inputs with .to({str(weight.device)!r})"
            )
        if x.is_floating_point() and x.dtype != weight.dtype:
            raise InvalidInputError(
                f"input {i} has dtype {x.dtype} but the model's weights are {weight.dtype}; "
                f"convert the inputs with .to({weight.dtype})"
            )
        if x.shape[0] != inputs[0].shape[0]:
            raise InvalidInputError(
                f"input {i} has {x.shape[0]} examples but input 0 has {inputs[0].shape[0]}; "
                "every input needs the same batch size"
            )
        if x.is_floating_point() and not torch.isfinite(x).all():
            raise InvalidInputError(f"input {i} holds NaN or Inf; clean the inputs first")


def _check_index(index: int, size: int, what: str, shape: tuple[int, ...], dim: int = 1) -> None:
    if not -size <= index < size:
        where = "" if what == "target class" else f": index {index} along dimension {dim}"
        value = f" {index}" if what == "target class" else ""
        of = "the layer's output" if what.startswith("neuron_selector") else "the model output"
        raise InvalidTargetError(f"{what}{value}{where} is out of range for {of} of shape {shape}")


def _is_integer(value: Any) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _integer_target(target: Tensor | np.ndarray) -> Tensor:
    """An integer tensor from a tensor or array target; float, bool or complex refused."""
    tensor = torch.as_tensor(target)
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise InvalidTargetError(
            f"target of dtype {tensor.dtype} is not a class index: give integers "
            f"(a float target such as 6.9 would silently name class 6; use .long() if meant)"
        )
    return tensor


def _one_per_example(selected: Tensor, what: str, shape: tuple[int, ...]) -> Tensor:
    """``selected`` as one value per example, or refused (as Captum refuses)."""
    per_example = selected[0].numel() if selected.dim() > 0 and selected.shape[0] else 1
    if per_example != 1:
        raise InvalidTargetError(
            f"{what} leaves {per_example} values per example of the output of shape {shape} "
            "(target not provided when necessary): name one value per example, e.g. "
            "target=<class index>"
        )
    return selected.reshape(selected.shape[0]) if selected.dim() > 1 else selected


def select_targets(output: Any, target: TargetType) -> Tensor:
    """The output named by ``target`` for each example, read as Captum reads every target form.

    ``None`` (the output is one value per example), an int or a tuple of ints
    (the same index for every example), a tensor, array or list with one
    index per example, or a list of tuples.  NumPy integers count as ints;
    bool, float and complex targets are refused, and so is a target that
    leaves several values per example, with :class:`InvalidTargetError`.

    >>> out = torch.arange(6.0).reshape(2, 3)
    >>> select_targets(out, 2), select_targets(out, [0, 1])
    (tensor([2., 5.]), tensor([0., 4.]))
    """
    if not isinstance(output, Tensor):
        raise InvalidInputError(
            f"the model returned a {type(output).__name__}; attribution needs a tensor output"
        )
    shape = tuple(output.shape)
    if output.dim() == 0:
        raise InvalidInputError("the model output is a scalar; it needs a batch dimension")
    if target is None:
        return _one_per_example(output, "target=None", shape)
    if isinstance(target, (Tensor, np.ndarray)):
        tensor = _integer_target(target)
        if tensor.numel() == 1:
            target = int(tensor.item())
        elif tensor.dim() == 1 and tensor.numel() == shape[0]:
            target = tensor.tolist()
        else:
            raise InvalidTargetError(
                f"target tensor of shape {tuple(tensor.shape)} does not fit the output of "
                f"shape {shape}: give one index, or one per example"
            )
    if isinstance(target, numbers.Integral) and _is_integer(target):
        target = (int(target),)
    if isinstance(target, tuple):
        return _one_per_example(_select_column(output, target), f"target {target}", shape)
    if isinstance(target, list):
        return _one_per_example(_select_per_example(output, target), "target list", shape)
    raise InvalidTargetError(
        f"target of type {type(target).__name__} is not a Captum target form "
        "(None, int, tuple, tensor, list of ints or list of tuples)"
    )


def _select_column(output: Tensor, target: tuple[Any, ...]) -> Tensor:
    shape = tuple(output.shape)
    if not all(_is_integer(i) for i in target):
        raise InvalidTargetError(f"target {target!r} must hold integer indices only")
    if len(target) > output.dim() - 1:
        raise InvalidTargetError(f"target {target} has too many indices for output {shape}")
    for dim, index in enumerate(target, start=1):
        _check_index(int(index), shape[dim], f"target {target}", shape, dim)
    key: tuple[slice | int, ...] = (slice(None), *[int(i) for i in target])
    return output[key]


def _select_per_example(output: Tensor, target: list[Any]) -> Tensor:
    shape = tuple(output.shape)
    if len(target) != shape[0]:
        raise InvalidTargetError(f"target list has {len(target)} entries for {shape[0]} examples")
    if all(_is_integer(t) for t in target):
        if output.dim() != 2:
            raise InvalidTargetError(f"a list of int targets needs a 2-D output, got {shape}")
        for t in target:
            _check_index(int(t), shape[1], "target class", shape)
            if t < 0:
                raise InvalidTargetError(
                    f"per-example target {int(t)} is negative; give classes 0 to {shape[1] - 1} "
                    "(as Captum, negative indices count from the end only in an int or tuple)"
                )
        index = torch.tensor([int(t) for t in target], device=output.device).reshape(-1, 1)
        return output.gather(1, index).squeeze(1)
    if all(isinstance(t, tuple) for t in target):
        rows = [_select_column(output[i : i + 1], t) for i, t in enumerate(target)]
        return torch.cat(rows)
    raise InvalidTargetError(
        "a target list must hold one int per example or one tuple of ints per example, got "
        f"{sorted({type(t).__name__ for t in target})}"
    )


# ------------------------------------------------- neuron and layer variants
def select_neuron(layer_tensors: tuple[Tensor, ...], selector: NeuronSelector) -> Tensor:
    """The neurons named by ``selector`` in a layer's tensors, as Captum's neuron methods read it.

    An int or a tuple of ints and slices indexes the single tensor after the
    batch dimension; without a slice it must name one neuron (a slice keeps a
    range of neurons, whose explanations add up).  A callable receives the
    tensor (or the tuple, for several) and returns one value per example.

    >>> h = torch.arange(12.0).reshape(2, 3, 2)
    >>> select_neuron((h,), (1, 0)), select_neuron((h,), (1, slice(None))).shape
    (tensor([2., 8.]), torch.Size([2, 2]))
    """
    if callable(selector):
        selected = selector(layer_tensors[0] if len(layer_tensors) == 1 else layer_tensors)
        if not isinstance(selected, Tensor):
            raise InvalidTargetError(
                f"the neuron selector returned a {type(selected).__name__}, not a tensor"
            )
        batch = layer_tensors[0].shape[0]
        if selected.dim() == 0 or selected.shape[0] != batch:
            raise InvalidTargetError(
                f"the neuron selector returned shape {tuple(selected.shape)}, not one value "
                f"for each of the {batch} examples"
            )
        return _one_per_example(selected, "the neuron selector", tuple(layer_tensors[0].shape))
    if len(layer_tensors) != 1:
        raise InvalidTargetError(
            f"the layer has {len(layer_tensors)} tensors; select a neuron with a callable"
        )
    (tensor,) = layer_tensors
    index = (selector,) if isinstance(selector, (numbers.Integral, slice)) else selector
    if not isinstance(index, tuple) or not all(
        _is_integer(i) or isinstance(i, slice) for i in index
    ):
        raise InvalidTargetError(
            f"neuron_selector must be an int, a tuple of ints and slices, or a callable; "
            f"got {selector!r}"
        )
    shape = tuple(tensor.shape)
    if len(index) > tensor.dim() - 1:
        raise InvalidTargetError(f"neuron_selector {selector!r} has too many indices for {shape}")
    for dim, i in enumerate(index, start=1):
        if not isinstance(i, slice):
            _check_index(int(i), shape[dim], f"neuron_selector {selector!r}", shape, dim)
    where: list[slice | int] = [slice(None)]
    where += [i if isinstance(i, slice) else int(i) for i in index]
    selected = tensor[tuple(where)]
    if any(isinstance(i, slice) for i in index):
        return selected
    return _one_per_example(selected, f"neuron_selector {selector!r}", shape)


def _tensors_of(value: Any, what: str) -> tuple[Tensor, ...]:
    if isinstance(value, Tensor):
        return (value,)
    if isinstance(value, tuple) and value and all(isinstance(v, Tensor) for v in value):
        return value
    raise UnsupportedModelError(f"the layer's {what} is a {type(value).__name__}, not tensors")


def _as_layer_leaf(t: Tensor) -> Tensor:
    """``t`` itself when it is in the graph; otherwise a leaf to take the gradient at."""
    if t.requires_grad:
        return t
    if not t.is_floating_point():
        raise UnsupportedModelError(
            f"the layer's tensor has dtype {t.dtype}; choose a layer whose tensors are "
            "floating point (e.g. the embedding's output, not the token ids)"
        )
    return t.detach().requires_grad_(True)


@contextmanager
def _capture_layer(
    layer: nn.Module, to_input: bool, as_leaf: bool
) -> Iterator[list[tuple[Tensor, ...]]]:
    """Record the tensors ``layer`` receives (or returns) in each call.

    The rest of the forward pass gets clones (as in Captum's layer methods),
    so a later in-place operation such as ``ReLU(inplace=True)`` cannot
    overwrite a recorded tensor.  ``as_leaf`` makes a recorded tensor that
    does not depend on anything differentiable (integer inputs) a leaf.
    Register inside :func:`substituted_backward` so that an output is
    recorded after its substitution.
    """
    calls: list[tuple[Tensor, ...]] = []

    def record(tensors: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        recorded = tuple(_as_layer_leaf(t) for t in tensors) if as_leaf else tensors
        calls.append(recorded)
        return tuple(t.clone() for t in recorded)

    def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        cloned = iter(record(_tensors_of(tuple(a for a in args if isinstance(a, Tensor)), "input")))
        return tuple(next(cloned) if isinstance(a, Tensor) else a for a in args)

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        cloned = record(_tensors_of(output, "output"))
        return cloned[0] if isinstance(output, Tensor) else cloned

    hooks = module_hooks(pre={layer: pre_hook}) if to_input else module_hooks({layer: hook})
    with hooks:
        yield calls


class _NeuronPatternGradient(NeuronAttribution, GradientAttribution):
    """Shell of the neuron variants: the backward pass starts at a neuron of ``layer``.

    ``(model, layer, patterns=None, pattern_type="relu", start_from="output")``;
    ``layer`` is a submodule of ``model`` that runs once per forward pass, the
    rest as for :class:`PatternNet`.
    """

    rule: ClassVar[SubstitutionRule]

    def __init__(
        self,
        model: nn.Module,
        layer: nn.Module,
        patterns: Patterns | None = None,
        pattern_type: str = "relu",
        start_from: StartFrom = "output",
        approximate: str | None = None,
    ) -> None:
        self._driver = _SubstitutedGradient(
            type(self).__name__, model, patterns, self.rule, pattern_type, start_from, approximate
        )
        self._layer_name = self._driver.module_name(layer)
        NeuronAttribution.__init__(self, model, layer)
        GradientAttribution.__init__(self, model)

    @property
    def patterns(self) -> Patterns:
        """The patterns this method uses now."""
        return self._driver.patterns()

    @log_usage()
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        neuron_selector: NeuronSelector,
        additional_forward_args: Any = None,
        attribute_to_neuron_input: bool = False,
    ) -> Tensor | tuple[Tensor, ...]:
        """Explain the neuron(s) ``neuron_selector`` of the layer for ``inputs``.

        Parameters
        ----------
        inputs, additional_forward_args:
            As for :meth:`PatternNet.attribute`.
        neuron_selector:
            Captum's neuron selector (see :func:`select_neuron`): an int, a
            tuple of ints and slices indexing the layer's output (input)
            without the batch dimension, or a callable.  Each selected neuron
            starts the backward pass from its own value, so a slice gives the
            sum of the selected neurons' explanations.
        attribute_to_neuron_input:
            Select the neuron in the layer's input instead of its output.

        Returns
        -------
        Tensor or tuple of Tensors
            Shaped like ``inputs``, in the same form.
        """
        self._driver.check_on_path(self._layer_name, attribute_to_neuron_input)
        is_tuple = isinstance(inputs, tuple)
        (result,) = self._driver.run(
            _input_tuple(inputs),
            additional_forward_args,
            lambda output, tensors: select_neuron(tensors or (), neuron_selector),
            layers=[self.layer],
            to_input=attribute_to_neuron_input,
        )
        return result if is_tuple else result[0]


class NeuronPatternNet(_NeuronPatternGradient):
    """PatternNet from a hidden neuron: the input signal that made it fire.

    ``NeuronPatternNet(model, layer, patterns=None, pattern_type="relu",
    start_from="output")``, with :meth:`attribute` taking Captum's
    ``neuron_selector`` (as ``captum.attr.NeuronGradient``).  Only the layers
    below the neuron take part.

    Examples
    --------
    >>> import torch
    >>> from captum_pattern import NeuronPatternNet, PatternFitter
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(),
    ...                             torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
    >>> patterns = PatternFitter(model).fit([torch.randn(32, 1, 8, 8)])
    >>> method = NeuronPatternNet(model, model[1])
    >>> method.attribute(torch.randn(2, 1, 8, 8), neuron_selector=(2, 3, 3)).shape
    torch.Size([2, 1, 8, 8])
    """

    rule = PatternRule()


class NeuronPatternAttribution(_NeuronPatternGradient):
    """PatternAttribution from a hidden neuron: how much each input contributed to it.

    As :class:`NeuronPatternNet`, with ``w ⊙ a₊`` in place of each weight.

    Examples
    --------
    >>> import torch
    >>> from captum_pattern import NeuronPatternAttribution, PatternFitter
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> patterns = PatternFitter(model).fit([torch.randn(64, 4)])
    >>> NeuronPatternAttribution(model, model[0], patterns).attribute(
    ...     torch.randn(2, 4), neuron_selector=5).shape
    torch.Size([2, 4])
    """

    rule = PatternTimesWeightRule()


class _LayerPatternGradient(LayerAttribution, GradientAttribution):
    """Shell of the layer variants: the backward pass from the output stops at ``layer``.

    ``(model, layer, patterns=None, pattern_type="relu", start_from="output")``;
    ``layer`` is a submodule of ``model`` that runs once per forward pass, or a
    list of them (then :meth:`attribute` returns a list, as Captum's layer
    methods do).  The inputs may be integers (token ids): the backward pass
    stops at the layer.
    """

    rule: ClassVar[SubstitutionRule]

    def __init__(
        self,
        model: nn.Module,
        layer: nn.Module | list[nn.Module],
        patterns: Patterns | None = None,
        pattern_type: str = "relu",
        start_from: StartFrom = "output",
        approximate: str | None = None,
    ) -> None:
        self._driver = _SubstitutedGradient(
            type(self).__name__, model, patterns, self.rule, pattern_type, start_from, approximate
        )
        self._layers = layer if isinstance(layer, list) else [layer]
        if not self._layers:
            raise ValueError("layer is an empty list; give at least one layer")
        self._layer_names = [self._driver.module_name(m) for m in self._layers]
        LayerAttribution.__init__(self, model, layer)
        GradientAttribution.__init__(self, model)

    @property
    def patterns(self) -> Patterns:
        """The patterns this method uses now."""
        return self._driver.patterns()

    @log_usage()
    def attribute(
        self,
        inputs: Tensor | tuple[Tensor, ...],
        target: TargetType = None,
        additional_forward_args: Any = None,
        attribute_to_layer_input: bool = False,
    ) -> Tensor | tuple[Tensor, ...] | list[Tensor | tuple[Tensor, ...]]:
        """The backward pass of the model's output ``target``, read at the layer.

        Parameters
        ----------
        inputs, target, additional_forward_args:
            As for :meth:`PatternNet.attribute`.
        attribute_to_layer_input:
            Read it at the layer's input (after the layer's own substituted
            backward) instead of its output.

        Returns
        -------
        Tensor, tuple of Tensors, or a list of them
            Shaped like the layer's output (input): a tensor, or a tuple when
            the layer has several; a list with one entry per layer when
            ``layer`` was a list.
        """
        for name in self._layer_names:
            self._driver.check_on_path(name, attribute_to_layer_input)
        groups = self._driver.run(
            _input_tuple(inputs),
            additional_forward_args,
            lambda output, _: select_targets(output, target),
            layers=self._layers,
            to_input=attribute_to_layer_input,
            to_layer=True,
        )
        results = [group if len(group) > 1 else group[0] for group in groups]
        return results if isinstance(self.layer, list) else results[0]


class LayerPatternNet(_LayerPatternGradient):
    """PatternNet read at an inner layer: the signal at that layer's output (or input).

    Examples
    --------
    >>> import torch
    >>> from captum_pattern import LayerPatternNet, PatternFitter
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> patterns = PatternFitter(model).fit([torch.randn(64, 4)])
    >>> LayerPatternNet(model, model[1]).attribute(torch.randn(2, 4), target=0).shape
    torch.Size([2, 8])
    """

    rule = PatternRule()


class LayerPatternAttribution(_LayerPatternGradient):
    """PatternAttribution read at an inner layer: the relevance of each of its units.

    ``LayerPatternAttribution(model, layer, patterns=None, pattern_type="relu",
    start_from="output")``; :meth:`attribute` has the signature of
    ``captum.attr.LayerGradientXActivation.attribute``.  Only the layers
    above ``layer`` take part (and ``layer`` itself with
    ``attribute_to_layer_input=True``).

    Examples
    --------
    >>> import torch
    >>> from captum_pattern import LayerPatternAttribution, PatternFitter
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(),
    ...                             torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
    >>> patterns = PatternFitter(model).fit([torch.randn(32, 1, 8, 8)])
    >>> method = LayerPatternAttribution(model, [model[1], model[3]], patterns)
    >>> [a.shape for a in method.attribute(torch.randn(2, 1, 8, 8), target=2)]
    [torch.Size([2, 4, 6, 6]), torch.Size([2, 3])]
    """

    rule = PatternTimesWeightRule()
