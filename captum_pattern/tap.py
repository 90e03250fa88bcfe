"""The layer tap: the one place that hooks a user's modules.

Everything in the package that needs what a layer reads and computes (the
fitter, the backward pass, ρ, fold discovery) asks :func:`layer_tap` (or, for
other modules, :func:`module_hooks`) for it, in the manner of Zennit's hooks:
a context manager whose handles are removed when the block ends, also on an
exception.  The tap owns

* which modules are explained (:data:`captum_pattern.layers.LAYER_TYPES`),
* the pairing of a layer with the BatchNorm folded into it, and its
  validation: the BatchNorm must read the layer's output *unchanged* (same
  tensor, same version: an in-place operation in between breaks the pair),
* the thread filter: only forward passes of the thread that entered the block
  are seen, so other threads using the same model are left alone,
* cleanup: hooks removed and pending tensors dropped on the way out.

A callback receives ``(name, x, z)``: the layer's name, its input and its
pre-activation (the layer's output, or the folded BatchNorm's output).  What
it returns, if not ``None``, replaces that pre-activation in the forward pass.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.hooks import RemovableHandle

from .errors import UnsupportedModelError
from .layers import is_explained_layer, layer_weight

__all__ = ["LayerTap", "check_batchnorm", "explained_layers", "layer_tap", "module_hooks"]

ForwardHook = Callable[[nn.Module, tuple[Any, ...], Any], Any]
PreHook = Callable[[nn.Module, tuple[Any, ...]], Any]
LayerCallback = Callable[[str, Tensor, Tensor], Tensor | None]


def explained_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every module of ``model`` that gets a pattern, by qualified name.

    >>> explained_layers(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)))
    {'0': Linear(in_features=2, out_features=3, bias=True), '2': Linear(in_features=3, out_features=1, bias=True)}
    """  # noqa: E501
    return {name: m for name, m in model.named_modules() if is_explained_layer(m)}


def check_batchnorm(name: str, bn: nn.Module, layer_name: str, layer: nn.Module) -> None:
    """Refuse a BatchNorm that cannot be folded into ``layer`` (batch statistics, size)."""
    if not isinstance(bn, _BatchNorm):  # the pairing comes from a file: check what it names
        raise UnsupportedModelError(
            f"module {name!r} was to be folded into layer {layer_name!r}, but it is a "
            f"{type(bn).__name__}, not a BatchNorm; refit the patterns on this model"
        )
    if not bn.track_running_stats or bn.running_mean is None:
        raise UnsupportedModelError(
            f"BatchNorm {name!r} after layer {layer_name!r} has no running statistics "
            "(track_running_stats=False), so it normalises with batch statistics even in "
            "eval mode and cannot be folded into the layer; use running statistics"
        )
    outputs = layer_weight(layer).shape[0]
    if bn.num_features != outputs:
        raise UnsupportedModelError(
            f"BatchNorm {name!r} has {bn.num_features} features but follows layer "
            f"{layer_name!r} with {outputs} outputs"
        )


@contextmanager
def module_hooks(
    forward: Mapping[nn.Module, ForwardHook] | None = None,
    pre: Mapping[nn.Module, PreHook] | None = None,
) -> Iterator[list[RemovableHandle]]:
    """Register forward (and forward-pre) hooks seen only by the calling thread.

    The hooks are removed when the block ends, also on an exception.

    >>> import torch
    >>> lin, seen = nn.Linear(2, 2), []
    >>> with module_hooks({lin: lambda m, i, o: seen.append(o.shape)}):
    ...     _ = lin(torch.ones(1, 2))
    >>> _ = lin(torch.ones(1, 2))  # no longer hooked
    >>> seen
    [torch.Size([1, 2])]
    """
    owner = threading.get_ident()
    handles: list[RemovableHandle] = []

    def only_owner(hook: Callable[..., Any]) -> Any:
        def filtered(*args: Any) -> Any:
            if threading.get_ident() != owner:
                return None
            return hook(*args)

        return filtered

    try:
        for module, pre_hook in (pre or {}).items():
            handles.append(module.register_forward_pre_hook(only_owner(pre_hook)))
        for module, hook in (forward or {}).items():
            handles.append(module.register_forward_hook(only_owner(hook)))
        yield handles
    finally:
        for handle in handles:
            handle.remove()


class LayerTap:
    """Handle of an active :func:`layer_tap`; :meth:`check` after each forward."""

    def __init__(self, folds: Mapping[str, str], context: Callable[[], str]) -> None:
        self.folds = dict(folds)
        self.context = context
        # per folded layer: (input, output, output version) waiting for the BatchNorm
        self.pending: dict[str, list[tuple[Tensor, Tensor, int]]] = {n: [] for n in folds}

    def check(self) -> None:
        """Raise if a folded layer's output never reached its BatchNorm in the last forward."""
        for name, items in self.pending.items():
            if items:
                self.clear()
                raise UnsupportedModelError(
                    f"{self.context()}layer {name!r} was fitted with BatchNorm "
                    f"{self.folds[name]!r} folded in, but in this forward pass its output did "
                    "not reach that BatchNorm; refit the patterns on this model"
                )

    def clear(self) -> None:
        for items in self.pending.values():
            items.clear()


@contextmanager
def layer_tap(
    model: nn.Module,
    layers: Mapping[str, nn.Module] | list[str],
    folds: Mapping[str, str],
    callback: LayerCallback,
    context: Callable[[], str] = str,
) -> Iterator[LayerTap]:
    """Call ``callback(name, x, z)`` for each call of each layer in ``layers``.

    ``folds`` maps a layer to the BatchNorm folded into it: then ``z`` is the
    BatchNorm's output and the callback runs when the BatchNorm runs.
    ``context()`` prefixes error messages (e.g. ``"batch 3: "``).

    Examples
    --------
    >>> import torch
    >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).eval()
    >>> seen = []
    >>> with layer_tap(net, ["0"], {"0": "1"}, lambda n, x, z: seen.append((n, z.shape))):
    ...     _ = net(torch.randn(1, 1, 5, 5))
    >>> seen
    [('0', torch.Size([1, 2, 3, 3]))]
    """
    names = list(layers)
    tap = LayerTap({n: b for n, b in folds.items() if n in names}, context)
    forward: dict[nn.Module, ForwardHook] = {}
    for name in names:
        module = model.get_submodule(name)
        if name not in tap.folds:
            forward[module] = _direct_hook(name, callback)
            continue
        bn_name = tap.folds[name]
        bn = model.get_submodule(bn_name)
        check_batchnorm(bn_name, bn, name, module)
        queue = tap.pending[name]
        forward[module] = _pending_hook(queue)
        forward[bn] = _batchnorm_hook(name, bn_name, queue, callback, context)
    try:
        with module_hooks(forward):
            yield tap
    finally:
        tap.clear()


def _direct_hook(name: str, callback: LayerCallback) -> ForwardHook:
    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
        return callback(name, inputs[0], output)

    return hook


def _pending_hook(queue: list[tuple[Tensor, Tensor, int]]) -> ForwardHook:
    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        queue.append((inputs[0], output, output._version))

    return hook


def _batchnorm_hook(
    name: str,
    bn_name: str,
    queue: list[tuple[Tensor, Tensor, int]],
    callback: LayerCallback,
    context: Callable[[], str],
) -> ForwardHook:
    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
        read = inputs[0] if inputs else None
        if not queue or read is not queue[-1][1] or read._version != queue[-1][2]:
            queue.clear()
            raise UnsupportedModelError(
                f"{context()}BatchNorm {bn_name!r} was folded into layer {name!r}, but now it "
                "reads a tensor that is not that layer's unchanged output (the model's "
                "structure differs from the one the patterns were fitted on, or an in-place "
                "operation sits between them); refit the patterns on this model"
            )
        x = queue.pop()[0]
        return callback(name, x, output)

    return hook
