"""Patterns: the learned signal directions of every explained layer.

A :class:`Patterns` maps layer names (``model.named_modules()``) to
:class:`LayerPatterns` and reads and writes them as safetensors files with JSON
metadata: no pickle, so loading a file never runs code.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .canonize import explained_layers, folded_parameters
from .errors import PatternFileError, PatternMismatchError
from .layers import layer_weight
from .statistics import PATTERN_TYPES

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LayerPatterns",
    "Patterns",
    "attached_patterns",
    "unwrap_model",
    "weights_fingerprint",
]

FORMAT_NAME = "captum-pattern"
FORMAT_VERSION = 1


@dataclass
class LayerPatterns:
    """Patterns of one layer and what the fit saw.

    Attributes
    ----------
    a_plus, a_minus, a_linear:
        Weight-shaped patterns ``a₊``, ``a₋`` (two-component estimator S_a+-)
        and ``a`` (linear estimator S_a); ``None`` when not fitted.
    n_samples:
        Number of samples (output positions) the layer saw.
    positive_fraction:
        Per neuron, the fraction of samples with an open gate ``wᵀx + b > 0``.
    zero:
        Per pattern type, a bool mask of the neurons whose pattern is undefined
        (dead in that regime, or constant output) and was set to zero.
    folded_batchnorm:
        Name of the BatchNorm folded into this layer before fitting, if any.
    """

    a_plus: Tensor | None
    a_minus: Tensor | None
    a_linear: Tensor | None
    n_samples: int
    positive_fraction: Tensor
    zero: dict[str, Tensor] = field(default_factory=dict)
    folded_batchnorm: str | None = None

    def pattern(self, pattern_type: str) -> Tensor:
        """The pattern of ``pattern_type`` (``"relu"``, ``"relu_negative"``, ``"linear"``)."""
        if pattern_type not in PATTERN_TYPES:
            raise ValueError(
                f"unknown pattern type {pattern_type!r}; expected one of {sorted(PATTERN_TYPES)}"
            )
        value = getattr(self, PATTERN_TYPES[pattern_type])
        if value is None:
            raise PatternMismatchError(
                f"the {pattern_type!r} pattern was not fitted; fit with "
                f"PatternFitter(model, pattern_types=[..., {pattern_type!r}])"
            )
        return value

    @property
    def weight_shape(self) -> tuple[int, ...]:
        for kind in PATTERN_TYPES.values():
            value = getattr(self, kind)
            if value is not None:
                return tuple(value.shape)
        raise ValueError("layer has no pattern")

    @property
    def pattern_types(self) -> tuple[str, ...]:
        return tuple(t for t, attr in PATTERN_TYPES.items() if getattr(self, attr) is not None)


def save_atomically(
    tensors: Mapping[str, Tensor], path: str | os.PathLike[str], metadata: Mapping[str, str]
) -> None:
    """Write a safetensors file through a temporary file and a rename.

    An interruption (``KeyboardInterrupt`` included) leaves the old file intact
    and no temporary file behind.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(dict(tensors), tmp, metadata=dict(metadata))
        os.chmod(tmp, 0o666 & ~_umask())  # as open() would create it, not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------- wrapped models
def _unwrap(model: nn.Module) -> tuple[nn.Module, str]:
    """The model inside its wrappers and the prefix the wrappers add to its module names."""
    prefix = ""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model, prefix = model.module, prefix + "module."
            continue
        inner = getattr(model, "_orig_mod", None)
        if type(model).__name__ == "OptimizedModule" and isinstance(inner, nn.Module):
            model, prefix = inner, prefix + "_orig_mod."  # torch.compile
        else:
            return model, prefix


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside ``nn.DataParallel``, ``DistributedDataParallel`` and ``torch.compile``.

    Patterns are named after the unwrapped model's modules, so patterns fitted
    on the bare or on the wrapped model serve both.

    >>> net = torch.nn.Linear(2, 1)
    >>> unwrap_model(torch.nn.DataParallel(net)) is net
    True
    """
    return _unwrap(model)[0]


_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _wrapper_prefix(names: Iterable[str], wanted: Iterable[str]) -> str:
    """The wrapper prefix to remove from every name so that ``names`` become ``wanted``.

    As ``torch.nn.modules.utils.consume_prefix_in_state_dict_if_present``: a
    prefix is removed only when every name has it; ``""`` when no sequence of
    wrapper prefixes makes the names match.
    """
    names, wanted = list(names), set(wanted)
    prefix = ""
    while {n[len(prefix) :] for n in names} != wanted:
        rest = [n[len(prefix) :] for n in names]
        step = next(
            (p for p in _WRAPPER_PREFIXES if rest and all(r.startswith(p) for r in rest)), None
        )
        if step is None:
            return ""
        prefix += step
    return prefix


def _strip(name: str, prefix: str) -> str:
    return name[len(prefix) :] if name.startswith(prefix) else name


def _umask() -> int:
    """The process's umask, read without changing it (Linux), else the common 022."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def weights_fingerprint(model: nn.Module, folds: Mapping[str, str]) -> str:
    """A short hash of the (folded) weights and biases of every explained layer.

    Wrappers (``DataParallel``, ``torch.compile``) do not change it.
    """
    model, prefix = _unwrap(model)
    folds = {_strip(k, prefix): _strip(v, prefix) for k, v in folds.items()}
    digest = hashlib.blake2b(digest_size=16)
    for name, layer in explained_layers(model).items():
        bn = model.get_submodule(folds[name]) if name in folds else None
        weight, bias = folded_parameters(layer, bn)
        digest.update(name.encode())
        for tensor in (weight, bias):
            if tensor is not None:
                digest.update(
                    tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
                )
    return digest.hexdigest()


class Patterns(Mapping[str, LayerPatterns]):
    """The patterns of a model, by layer name.

    Parameters
    ----------
    layers:
        ``{layer_name: LayerPatterns}``.
    fingerprint:
        :func:`weights_fingerprint` of the model the patterns were fitted on.
    settings:
        What the fit used (pattern types, batches, samples, ...), kept in files.

    Examples
    --------
    >>> import torch
    >>> from captum_pattern import PatternFitter, Patterns
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    >>> patterns = PatternFitter(model).fit([torch.randn(64, 4)])
    >>> sorted(patterns), tuple(patterns["0"].a_plus.shape)
    (['0', '2'], (3, 4))
    """

    def __init__(
        self,
        layers: Mapping[str, LayerPatterns],
        fingerprint: str | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        self._layers = dict(layers)
        self.fingerprint = fingerprint
        self.settings = dict(settings or {})
        #: Patterns of standalone per-channel affine modules (BatchNorms that are not
        #: folded), by module name; absent ones are ``1/s``, what every estimator gives
        #: for ``z = s·x + t``.  In memory only (for checks such as weights as patterns).
        self.affine: dict[str, Tensor] = {}

    def __getitem__(self, name: str) -> LayerPatterns:
        try:
            return self._layers[name]
        except KeyError:
            raise KeyError(
                f"no patterns for layer {name!r}; layers with patterns: {sorted(self._layers)}"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __repr__(self) -> str:
        kinds = sorted({t for lp in self._layers.values() for t in lp.pattern_types})
        return f"Patterns({len(self)} layers, pattern types {kinds})"

    @property
    def folds(self) -> dict[str, str]:
        """``{layer_name: batchnorm_name}`` for the folded pairs."""
        return {n: lp.folded_batchnorm for n, lp in self._layers.items() if lp.folded_batchnorm}

    def summary(self) -> str:
        """One line per layer: samples, open-gate fraction and zeroed patterns."""
        lines = []
        for name, lp in self._layers.items():
            zeros = ", ".join(f"{k}: {int(v.sum())}" for k, v in lp.zero.items())
            lines.append(
                f"{name}: {lp.n_samples} samples, mean open fraction "
                f"{float(lp.positive_fraction.float().mean()):.3f}, zero patterns ({zeros})"
            )
        return "\n".join(lines)

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Patterns:
        """A copy with every pattern moved/cast (masks and counts unchanged)."""

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)

        layers = {
            name: LayerPatterns(
                a_plus=move(lp.a_plus),
                a_minus=move(lp.a_minus),
                a_linear=move(lp.a_linear),
                n_samples=lp.n_samples,
                positive_fraction=lp.positive_fraction,
                zero=dict(lp.zero),
                folded_batchnorm=lp.folded_batchnorm,
            )
            for name, lp in self._layers.items()
        }
        return Patterns(layers, self.fingerprint, self.settings)

    # ------------------------------------------------------- models and names
    def for_model(self, model: nn.Module) -> Patterns:
        """These patterns named after ``model``'s unwrapped modules (see :func:`unwrap_model`).

        Patterns fitted on (or saved from) ``nn.DataParallel(net)``,
        ``DistributedDataParallel(net)`` or ``torch.compile(net)`` carry the
        wrapper's prefix (``module.``, ``_orig_mod.``); it is removed when that
        makes the names those of ``net``.  Returns ``self`` when nothing changes.
        """
        inner = unwrap_model(model)
        prefix = _wrapper_prefix(self._layers, explained_layers(inner))
        if not prefix:
            return self
        layers = {
            name[len(prefix) :]: replace(
                lp, folded_batchnorm=lp.folded_batchnorm and _strip(lp.folded_batchnorm, prefix)
            )
            for name, lp in self._layers.items()
        }
        return Patterns(layers, self.fingerprint, self.settings)

    def attach(self, model: nn.Module) -> Patterns:
        """Make these the patterns of ``model``: ``PatternNet(model)`` then uses them.

        Nothing is written on the model (its modules, parameters, buffers and
        ``state_dict`` are unchanged) and the model is not kept alive: the link
        is a weak reference, dropped with the model.  :class:`PatternFitter`
        and :meth:`load` with ``model=`` attach on their own.  Raises
        :class:`PatternMismatchError` when the patterns do not fit ``model``.

        >>> import torch
        >>> from captum_pattern import PatternAttribution, PatternFitter
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
        >>> patterns = PatternFitter(net).fit([torch.randn(64, 4)])  # attaches them
        >>> PatternAttribution(net).attribute(torch.randn(2, 4), target=1).shape
        torch.Size([2, 4])
        >>> attached_patterns(torch.nn.DataParallel(net)) is patterns
        True
        """
        self.validate(model)
        _ATTACHED[unwrap_model(model)] = self.for_model(model)
        return self

    # ---------------------------------------------------------------- validate
    def validate(self, model: nn.Module, check_fingerprint: bool = False) -> None:
        """Raise :class:`PatternMismatchError` unless these patterns fit ``model``.

        Checks that every Linear/Conv layer of the model has patterns, that no
        pattern belongs to a layer the model lacks, that the shapes agree and
        that the folded BatchNorms exist.  With ``check_fingerprint``, warns
        when the model's weights differ from those the patterns were fitted on.
        Wrapped models are checked by their unwrapped names (:meth:`for_model`).
        """
        renamed = self.for_model(model)
        if renamed is not self:
            renamed.validate(model, check_fingerprint)
            return
        model = unwrap_model(model)
        layers = explained_layers(model)
        missing = sorted(set(layers) - set(self._layers))
        extra = sorted(set(self._layers) - set(layers))
        if missing:
            raise PatternMismatchError(
                f"the model's layer {missing[0]!r} ({type(layers[missing[0]]).__name__}) has no "
                f"patterns ({len(missing)} missing: {missing[:5]}); were these patterns "
                "fitted on another architecture? Fit them on this model with PatternFitter"
            )
        if extra:
            raise PatternMismatchError(
                f"patterns for layer {extra[0]!r} but the model has no Linear/Conv layer of "
                f"that name ({len(extra)} extra: {extra[:5]}); were these patterns fitted on "
                "another architecture?"
            )
        modules = dict(model.named_modules())
        for name, layer in layers.items():
            lp = self._layers[name]
            shape = tuple(layer_weight(layer).shape)
            if lp.weight_shape != shape:
                raise PatternMismatchError(
                    f"layer {name!r}: patterns have shape {lp.weight_shape} but the layer's "
                    f"weight has shape {shape}"
                )
            bn = lp.folded_batchnorm
            if bn is not None and not isinstance(modules.get(bn), nn.modules.batchnorm._BatchNorm):
                raise PatternMismatchError(
                    f"layer {name!r}: patterns were fitted with BatchNorm {bn!r} folded in, "
                    "but the model has no BatchNorm of that name"
                )
        if check_fingerprint and self.fingerprint is not None:
            current = weights_fingerprint(model, self.folds)
            if current != self.fingerprint:
                warnings.warn(
                    "the model's weights differ from those the patterns were fitted on "
                    f"(fingerprint {current} != {self.fingerprint}); refit the patterns "
                    "if the model was trained or changed since",
                    stacklevel=3,
                )

    # -------------------------------------------------------------------- files
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a safetensors file; atomically (a temporary file, then a rename)."""
        tensors: dict[str, Tensor] = {}
        layer_meta: dict[str, Any] = {}
        for name, lp in self._layers.items():
            for attr in PATTERN_TYPES.values():
                value = getattr(lp, attr)
                if value is not None:
                    tensors[f"{name}/{attr}"] = value.detach().cpu().contiguous()
            tensors[f"{name}/positive_fraction"] = lp.positive_fraction.detach().cpu().contiguous()
            for kind, mask in lp.zero.items():
                tensors[f"{name}/zero.{kind}"] = mask.detach().cpu().contiguous()
            layer_meta[name] = {
                "weight_shape": list(lp.weight_shape),
                "n_samples": int(lp.n_samples),
                "folded_batchnorm": lp.folded_batchnorm,
                "pattern_types": list(lp.pattern_types),
            }
        metadata = {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "layers": json.dumps(layer_meta),
            "fingerprint": self.fingerprint or "",
            "settings": json.dumps(self.settings, default=str),
        }
        save_atomically(tensors, path, metadata)

    @classmethod
    def load(  # long: reads, checks and names every layer's tensors and metadata
        cls,
        path: str | os.PathLike[str],
        model: nn.Module | None = None,
        device: torch.device | str | None = None,
    ) -> Patterns:
        """Read a file written by :meth:`save`; validate against ``model`` and attach, if given.

        Raises :class:`PatternFileError` for a file that is not a readable
        pattern file and :class:`PatternMismatchError` when it does not fit
        ``model``.
        """
        path = Path(path)
        if not path.is_file():
            raise PatternFileError(f"{path}: no such pattern file")
        try:
            with safe_open(str(path), framework="pt", device=str(device or "cpu")) as handle:
                metadata = handle.metadata() or {}
                keys = list(handle.keys())
                tensors = {k: handle.get_tensor(k) for k in keys}
        except PatternFileError:
            raise
        except Exception as exc:  # safetensors raises several types for bad bytes
            raise PatternFileError(
                f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc}); "
                "the file is truncated, corrupted or not a pattern file"
            ) from exc
        layers_meta = _parse_metadata(path, metadata)
        layers: dict[str, LayerPatterns] = {}
        for name, meta in layers_meta.items():
            try:
                patterns = {attr: tensors.get(f"{name}/{attr}") for attr in PATTERN_TYPES.values()}
                zero = {
                    k[len(name) + 6 :]: v
                    for k, v in tensors.items()
                    if k.startswith(f"{name}/zero.")
                }
                lp = LayerPatterns(
                    **patterns,
                    n_samples=int(meta["n_samples"]),
                    positive_fraction=tensors[f"{name}/positive_fraction"],
                    zero=zero,
                    folded_batchnorm=meta.get("folded_batchnorm"),
                )
                shape = tuple(int(s) for s in meta["weight_shape"])
            except (KeyError, TypeError, ValueError, OverflowError) as exc:
                raise PatternFileError(
                    f"{path}: layer {name!r} is incomplete in the file ({exc!r}); "
                    "the file is corrupted"
                ) from exc
            _check_dtypes(path, name, lp)
            for kind in lp.pattern_types:
                value = lp.pattern(kind)
                if tuple(value.shape) != shape:
                    raise PatternFileError(
                        f"{path}: layer {name!r} pattern {kind!r} has shape "
                        f"{tuple(value.shape)}, the file says {shape}; the file is corrupted"
                    )
                if not torch.isfinite(value).all():
                    raise PatternFileError(
                        f"{path}: layer {name!r} pattern {kind!r} holds NaN or Inf; "
                        "the file is corrupted"
                    )
            if not lp.pattern_types:
                raise PatternFileError(f"{path}: layer {name!r} has no pattern in the file")
            layers[name] = lp
        loaded = cls(layers, metadata.get("fingerprint") or None, _parse_settings(path, metadata))
        if model is None:
            return loaded
        loaded = loaded.for_model(model)
        loaded.validate(model, check_fingerprint=True)
        return loaded.attach(model)


def _parse_settings(path: Path, metadata: Mapping[str, str]) -> dict[str, Any]:
    """The fit settings stored in a file's metadata (a JSON object), or a clear error."""
    try:
        settings = json.loads(metadata.get("settings", "{}"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise PatternFileError(f"{path}: metadata 'settings' is not JSON") from exc
    if not isinstance(settings, dict):
        raise PatternFileError(f"{path}: metadata 'settings' is not a JSON object")
    return settings


def _check_dtypes(path: Path, name: str, lp: LayerPatterns) -> None:
    """Patterns and fractions are real floating point, zero masks bool; else damaged."""
    tensors = {f"pattern {kind!r}": lp.pattern(kind) for kind in lp.pattern_types}
    tensors["positive_fraction"] = lp.positive_fraction
    for what, value in tensors.items():
        if not value.is_floating_point():
            raise PatternFileError(
                f"{path}: layer {name!r} {what} is stored as {value.dtype}, not a real "
                "floating-point tensor; the file is corrupted or was not written by captum-pattern"
            )
    for kind, mask in lp.zero.items():
        if mask.dtype != torch.bool:
            raise PatternFileError(
                f"{path}: layer {name!r} zero mask {kind!r} is stored as {mask.dtype}, not "
                "bool; the file is corrupted"
            )


# Patterns attached to models (Patterns.attach); weak keys, so a model is not kept alive.
_ATTACHED: weakref.WeakKeyDictionary[nn.Module, Patterns] = weakref.WeakKeyDictionary()


def attached_patterns(model: nn.Module) -> Patterns | None:
    """The patterns attached to ``model`` (or to the model it wraps), or ``None``.

    Named after the unwrapped model's modules.  See :meth:`Patterns.attach`.
    """
    return _ATTACHED.get(unwrap_model(model))


def _parse_metadata(path: Path, metadata: Mapping[str, str]) -> dict[str, Any]:
    if metadata.get("format") != FORMAT_NAME:
        raise PatternFileError(
            f"{path}: not a captum-pattern file (safetensors metadata 'format' is "
            f"{metadata.get('format')!r}, expected {FORMAT_NAME!r})"
        )
    try:
        version = int(metadata.get("format_version", ""))
    except ValueError:
        raise PatternFileError(f"{path}: format_version is missing or not a number") from None
    if version > FORMAT_VERSION:
        raise PatternFileError(
            f"{path}: written by a newer captum-pattern (format version {version}; this "
            f"version reads up to {FORMAT_VERSION}); upgrade captum-pattern to read it"
        )
    if version < 1:
        raise PatternFileError(f"{path}: unknown format version {version}")
    try:
        layers = json.loads(metadata["layers"])
        if not isinstance(layers, dict) or not all(isinstance(v, dict) for v in layers.values()):
            raise TypeError("layers is not a mapping of layer records")
    except (KeyError, TypeError, ValueError, RecursionError) as exc:  # JSONDecodeError: ValueError
        raise PatternFileError(f"{path}: metadata 'layers' is missing or invalid") from exc
    return layers
