"""BatchNorm folding, without touching the user's model.

A BatchNorm that directly follows a Linear or Conv layer (its input *is* that
layer's output, and nothing else reads that output) is an affine map per
channel in eval mode, so the pair is one linear layer with

    w' = w · s,   b' = (b − μ) · s + β,   s = γ / sqrt(σ² + ε).

The patterns are fitted for ``w'`` with the gate of the BatchNorm's output
(the real pre-activation), and explained with ``w'``.  The pairs are found by
running the model once and watching which tensor each module receives; the
folded weights are computed on the fly and never written into the model.
"""

from __future__ import annotations

import inspect
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import ModelChangedError, UnsupportedModelError, caller_stacklevel
from .layers import layer_bias, layer_weight
from .tap import check_batchnorm, explained_layers, module_hooks

__all__ = [
    "check_batchnorms",
    "explained_layers",
    "find_batchnorm_folds",
    "folded_parameters",
    "model_lock",
    "model_state_guard",
    "reads_training_mode",
]


def find_batchnorm_folds(model: nn.Module, run_forward: Callable[[], Any]) -> dict[str, str]:
    """Which BatchNorm to fold into which layer: ``{layer_name: batchnorm_name}``.

    ``run_forward`` runs the model once (any batch).  A BatchNorm is folded into
    a layer when, in every call, it reads that layer's output *unchanged* (the
    same tensor at the same version: an in-place operation in between, such as
    ``ReLU(inplace=True)`` or ``out += skip``, changes the values and breaks the
    pair), every call of the layer is followed by it, and the autograd graph
    shows no other reader of the layer's output.  Hooks are removed before
    returning.

    Examples
    --------
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    >>> find_batchnorm_folds(net.eval(), lambda: net(torch.randn(1, 1, 5, 5)))
    {'0': '1'}
    >>> net = torch.nn.Sequential(
    ...     torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(inplace=True), torch.nn.BatchNorm2d(2))
    >>> find_batchnorm_folds(net.eval(), lambda: net(torch.randn(1, 1, 5, 5)))
    {}
    """
    layers = explained_layers(model)
    names = {m: n for n, m in model.named_modules()}
    # id(output) -> (layer name, output, its version when the layer returned it)
    last_output: dict[int, tuple[str, Tensor, int]] = {}
    layer_calls: dict[str, int] = {}
    bn_sources: dict[str, list[str | None]] = {}
    grad_fns: dict[str, list[Any]] = {}

    def layer_hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        name = names[module]
        layer_calls[name] = layer_calls.get(name, 0) + 1
        if isinstance(output, Tensor):
            last_output[id(output)] = (name, output, output._version)

    def bn_hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        read = inputs[0] if inputs else None
        source = last_output.get(id(read))
        if source is not None and source[1] is read and read._version == source[2]:
            bn_sources.setdefault(names[module], []).append(source[0])
            grad_fns.setdefault(source[0], []).append(source[1].grad_fn)
        else:
            bn_sources.setdefault(names[module], []).append(None)

    hooks: dict[nn.Module, Any] = dict.fromkeys(layers.values(), layer_hook)
    hooks.update((m, bn_hook) for m in model.modules() if isinstance(m, _BatchNorm))
    with module_hooks(hooks), torch.enable_grad():
        output = run_forward()
    pairs: dict[str, str] = {}
    followed_by: dict[str, list[str]] = {}
    for bn_name, sources in bn_sources.items():
        for source in sources:
            if source is not None:
                followed_by.setdefault(source, []).append(bn_name)
    for bn_name, sources in bn_sources.items():
        if len(set(sources)) != 1 or sources[0] is None:
            continue  # the BatchNorm also reads something else: not foldable
        layer_name = sources[0]
        if followed_by[layer_name] != [bn_name] * layer_calls[layer_name]:
            continue  # the layer is not always followed by this BatchNorm
        pairs[layer_name] = bn_name
    _drop_shared_outputs(pairs, grad_fns, output)
    for layer_name, bn_name in pairs.items():
        check_batchnorm(bn_name, model.get_submodule(bn_name), layer_name, layers[layer_name])
    return dict(sorted(pairs.items()))


def _drop_shared_outputs(
    pairs: dict[str, str], grad_fns: dict[str, list[Any]], output: Any
) -> None:
    """Unfold a pair whose layer output is also read by something besides its BatchNorm."""
    if not grad_fns:
        return
    roots = [t.grad_fn for t in _tensors(output) if t.grad_fn is not None]
    readers: dict[Any, int] = {}
    seen: set[Any] = set()
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is not None:
                readers[child] = readers.get(child, 0) + 1
                stack.append(child)
    for layer_name, fns in grad_fns.items():
        if layer_name in pairs and any(readers.get(fn, 0) > 1 for fn in fns if fn is not None):
            del pairs[layer_name]


def _tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def batchnorm_scale(bn: nn.Module) -> Tensor:
    """``s = γ / sqrt(σ² + ε)`` of a BatchNorm in eval mode (detached): its diagonal weight.

    >>> bn = torch.nn.BatchNorm1d(2).eval()
    >>> batchnorm_scale(bn)
    tensor([1.0000, 1.0000])
    """
    assert isinstance(bn, _BatchNorm) and bn.running_var is not None
    scale = torch.rsqrt(bn.running_var.detach() + bn.eps)
    return scale if bn.weight is None else scale * bn.weight.detach()


def folded_parameters(
    layer: nn.Module, bn: nn.Module | None, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor | None]:
    """Weight and bias of ``layer`` with ``bn`` folded in (detached, in ``dtype``).

    >>> conv, bn = torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2).eval()
    >>> w, b = folded_parameters(conv, bn)
    >>> x = torch.randn(1, 1, 5, 5)
    >>> bool(torch.allclose(bn(conv(x)), torch.nn.functional.conv2d(x, w, b), atol=1e-6))
    True
    """
    layer_w, layer_b = layer_weight(layer), layer_bias(layer)
    dtype = dtype or layer_w.dtype
    weight = layer_w.detach().to(dtype)
    bias = None if layer_b is None else layer_b.detach().to(dtype)
    if bn is None:
        return weight, bias
    assert isinstance(bn, _BatchNorm) and bn.running_var is not None
    assert bn.running_mean is not None
    var = bn.running_var.detach().to(dtype)
    mean = bn.running_mean.detach().to(dtype)
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().to(dtype)
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().to(dtype)
    view = (-1,) + (1,) * (weight.dim() - 1)
    new_weight = weight * scale.reshape(view)
    new_bias = shift if bias is None else bias * scale + shift
    return new_weight, new_bias


@contextmanager
def model_state_guard(model: nn.Module) -> Iterator[None]:
    """Hold ``model``'s lock and run the block with the model in eval mode.

    A model already in eval mode is not touched at all: other threads using it
    meanwhile see nothing.  Modules in training mode whose computation depends
    on it (BatchNorm, dropout, and any class outside ``torch.nn``, which may
    read ``self.training``) are switched to eval mode for the block, with a
    warning (once per model) that other threads see the switch, and switched
    back after, also on an exception (``KeyboardInterrupt`` included), unless
    something else put them back in training mode meanwhile.  A module put in
    training mode during the block (another thread's ``model.train()``) is
    left as it is and, when the block ends normally, the result mixed two
    modes: :class:`~captum_pattern.errors.ModelChangedError`.  Parameters'
    ``requires_grad`` flags are never touched.  The lock (re-entrant, one per
    model) serialises captum-pattern calls on the same model from several
    threads: each gets a correct result.

    >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
    >>> with model_state_guard(net.eval()):
    ...     net[1].training
    False
    """
    with model_lock(model):
        switched = [m for m in model.modules() if m.training and reads_training_mode(m)]
        if switched:
            _warn_switching(model, switched)
            for module in switched:
                module.training = False
        finished = False
        try:
            yield
            finished = True
        finally:
            changed = [n for n, m in model.named_modules() if m.training and reads_training_mode(m)]
            for module in switched:
                module.training = True
        if finished and changed:
            raise ModelChangedError(
                f"the model was switched to training mode while captum-pattern was running on it "
                f"(modules {_names(changed)}), probably by another thread: the result would mix "
                "training and eval mode and is discarded; keep the model in eval mode while it is "
                "explained or fitted, or give captum-pattern its own copy (copy.deepcopy(model))"
            )


def reads_training_mode(module: nn.Module) -> bool:
    """Whether ``module``'s own computation may depend on its training flag.

    ``torch.nn``'s own classes are read once (does their source mention
    ``self.training`` outside ``nn.Module``?): BatchNorm and dropout do, Conv2d,
    ReLU and Sequential do not.  Any other class may.

    >>> reads_training_mode(nn.Dropout()), reads_training_mode(nn.Conv2d(1, 1, 1))
    (True, False)
    """
    cls = type(module)
    known = _READS_TRAINING.get(cls)
    if known is None:
        known = _READS_TRAINING[cls] = _class_reads_training(cls)
    return known


_READS_TRAINING: dict[type, bool] = {}


def _class_reads_training(cls: type) -> bool:
    for klass in cls.__mro__:
        if klass is nn.Module or not issubclass(klass, nn.Module):
            continue  # nn.Module's own train()/eval(), and mixins such as typing.Generic
        if not klass.__module__.startswith("torch.nn."):
            return True
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            return True
        if "self.training" in source:
            return True
    return False


_WARNED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _warn_switching(model: nn.Module, switched: list[nn.Module]) -> None:
    if model in _WARNED:
        return
    _WARNED.add(model)
    names = {id(m): n for n, m in model.named_modules()}
    warnings.warn(
        f"captum-pattern: the model is in training mode (modules "
        f"{_names([names[id(m)] or '<model>' for m in switched])}); it is explained and "
        "fitted in eval mode (running BatchNorm statistics, no dropout), so these modules are "
        "switched to eval mode during each call and back after, and another thread using the "
        "model meanwhile sees eval mode; call model.eval() first to leave the model untouched, "
        "or give captum-pattern its own copy (copy.deepcopy(model).eval()) if another thread "
        "trains it",
        UserWarning,
        stacklevel=caller_stacklevel(),
    )


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """The re-entrant lock captum-pattern holds while it has hooks on ``model``."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


def check_batchnorms(model: nn.Module) -> None:
    """Refuse a BatchNorm that normalises with batch statistics even in eval mode.

    The explanation of one example would then depend on the rest of the batch.
    """
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and (
            not module.track_running_stats or module.running_mean is None
        ):
            raise UnsupportedModelError(
                f"BatchNorm {name!r} has no running statistics (track_running_stats=False), "
                "so even in eval mode it normalises each batch with its own statistics and "
                "the explanation of one example would depend on the rest of the batch; "
                "use running statistics"
            )
