"""Run Captum's methods and ours on the same inputs, through the Captum API.

The paper sorts explanation methods into three groups (Fig. 1): *functions*
(the gradient), *signals* (DeConvNet, Guided BackProp, PatternNet: shown in
input space) and *attributions* (LRP, PatternAttribution, ...: heat maps).
:data:`METHODS` records each method's group so figures and scores treat them
accordingly.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from captum.attr import (
    LRP,
    Deconvolution,
    GuidedBackprop,
    InputXGradient,
    IntegratedGradients,
    Saliency,
)
from torch import Tensor, nn

from .attribution import PatternAttribution, PatternNet, select_targets
from .canonize import model_state_guard
from .patterns import Patterns

__all__ = ["FIGURE_METHODS", "METHODS", "Method", "explain", "explain_in_batches", "method_names"]

#: the methods of the paper's Fig. 1 and 6, in their order: the demo's and the CLI's default
FIGURE_METHODS = (
    "Gradient",
    "DeConvNet",
    "Guided BackProp",
    "PatternNet",
    "LRP",
    "PatternAttribution",
)


@dataclass(frozen=True)
class Method:
    """An explanation method: its display name, group and how to run it."""

    name: str
    group: str  # "function", "signal", "attribution" or "baseline"
    run: Callable[[nn.Module, Patterns | None, Tensor, Any], Tensor]
    needs_patterns: bool = False


def _captum(
    cls: type, **kwargs: Any
) -> Callable[[nn.Module, Patterns | None, Tensor, Any], Tensor]:
    def run(model: nn.Module, patterns: Patterns | None, x: Tensor, target: Any) -> Tensor:
        return cls(model).attribute(x.clone().requires_grad_(True), target=target, **kwargs)

    return run


def _lrp(model: nn.Module, patterns: Patterns | None, x: Tensor, target: Any) -> Tensor:
    # Captum's LRP writes rules onto the modules it visits: give it a copy
    clone = copy.deepcopy(model).eval()
    return LRP(clone).attribute(x.clone().requires_grad_(True), target=target)


def _ours(
    cls: type, pattern_type: str
) -> Callable[[nn.Module, Patterns | None, Tensor, Any], Tensor]:
    def run(model: nn.Module, patterns: Patterns | None, x: Tensor, target: Any) -> Tensor:
        if patterns is None:
            raise ValueError(f"{cls.__name__} needs patterns")
        return cls(model, patterns, pattern_type=pattern_type).attribute(x, target=target)

    return run


def _random(model: nn.Module, patterns: Patterns | None, x: Tensor, target: Any) -> Tensor:
    # seeded by the inputs' bytes: reproducible, yet a different map for other inputs
    digest = hashlib.blake2b(x.detach().cpu().numpy().tobytes(), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
    return torch.randn(x.shape, generator=generator).to(x)


def _gradient_start_from_output(
    cls: type,
) -> Callable[[nn.Module, Patterns | None, Tensor, Any], Tensor]:
    """Captum's method scaled by the selected output, the paper's initialisation (App. A)."""

    def run(model: nn.Module, patterns: Patterns | None, x: Tensor, target: Any) -> Tensor:
        result = cls(model).attribute(x.clone().requires_grad_(True), target=target)
        with torch.no_grad():
            y = select_targets(model(x), target)
        return result * y.reshape(-1, *[1] * (result.dim() - 1))

    return run


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("Gradient", "function", _captum(Saliency, abs=False)),
        Method("DeConvNet", "signal", _gradient_start_from_output(Deconvolution)),
        Method("Guided BackProp", "signal", _gradient_start_from_output(GuidedBackprop)),
        Method("PatternNet", "signal", _ours(PatternNet, "relu"), needs_patterns=True),
        Method("PatternNet (linear)", "signal", _ours(PatternNet, "linear"), needs_patterns=True),
        Method("LRP", "attribution", _lrp),
        Method("Input × Gradient", "attribution", _captum(InputXGradient)),
        Method("Integrated Gradients", "attribution", _captum(IntegratedGradients)),
        Method("PatternAttribution", "attribution", _ours(PatternAttribution, "relu"), True),
        Method(
            "PatternAttribution (linear)",
            "attribution",
            _ours(PatternAttribution, "linear"),
            True,
        ),
        Method("Random", "baseline", _random),
    )
}


def method_names(groups: Sequence[str] | None = None) -> list[str]:
    """Names of the methods in ``groups`` (all if None), in a stable order."""
    return [name for name, m in METHODS.items() if groups is None or m.group in groups]


def explain(
    model: nn.Module,
    inputs: Tensor,
    target: Any,
    patterns: Patterns | None = None,
    methods: Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """Explanations of ``model`` for ``inputs`` and ``target``, by method name.

    Methods that need patterns are skipped when ``patterns`` is None.

    >>> from captum_pattern import PatternFitter
    >>> from captum_pattern.zoo import SmallCNN
    >>> model = SmallCNN().eval()
    >>> x = torch.rand(2, 1, 8, 8)
    >>> patterns = PatternFitter(model).fit([torch.rand(32, 1, 8, 8)])
    >>> out = explain(model, x, target=3, patterns=patterns, methods=["Gradient", "PatternNet"])
    >>> sorted(out), out["PatternNet"].shape
    (['Gradient', 'PatternNet'], torch.Size([2, 1, 8, 8]))
    """
    names = list(methods) if methods is not None else list(METHODS)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {list(METHODS)}")
    results = {}
    with model_state_guard(model):
        for name in names:
            method = METHODS[name]
            if method.needs_patterns and patterns is None:
                continue
            results[name] = method.run(model, patterns, inputs, target).detach()
    return results


def explain_in_batches(
    model: nn.Module,
    inputs: Tensor,
    target: Tensor,
    patterns: Patterns | None = None,
    methods: Sequence[str] | None = None,
    batch_size: int = 64,
) -> dict[str, Tensor]:
    """:func:`explain` over ``inputs`` in batches; ``target`` holds one class per input.

    Keeps the memory of Integrated Gradients (50 copies of a batch) bounded.

    >>> from captum_pattern.zoo import SmallCNN
    >>> model = SmallCNN().eval()
    >>> x, t = torch.rand(5, 1, 8, 8), torch.tensor([0, 1, 2, 3, 4])
    >>> out = explain_in_batches(model, x, t, methods=["Gradient", "LRP"], batch_size=2)
    >>> out["LRP"].shape
    torch.Size([5, 1, 8, 8])
    """
    parts: dict[str, list[Tensor]] = {}
    for i in range(0, len(inputs), batch_size):
        chunk = explain(
            model, inputs[i : i + batch_size], target[i : i + batch_size], patterns, methods
        )
        for name, value in chunk.items():
            parts.setdefault(name, []).append(value)
    return {name: torch.cat(values) for name, values in parts.items()}
