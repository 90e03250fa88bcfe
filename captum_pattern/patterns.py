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

from .activations import APPROXIMATIONS, Regimes
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

    def __post_init__(self) -> None:
        """Refuse tensors that would be used as something else than they are.

        An integer, bool or complex pattern would be cast at use (truncated,
        0/1 or its real part): a wrong explanation without a word.
        """
        for attr in (*PATTERN_TYPES.values(), "positive_fraction"):
            value = getattr(self, attr)
            if value is not None and (value.is_complex() or not value.is_floating_point()):
                raise PatternMismatchError(
                    f"LayerPatterns.{attr} has dtype {value.dtype}; patterns and fractions "
                    "are real floating point (e.g. patterns.to(dtype=torch.float32))"
                )
        for kind, mask in self.zero.items():
            if mask.dtype != torch.bool:
                raise PatternMismatchError(
                    f"LayerPatterns.zero[{kind!r}] has dtype {mask.dtype}; zero masks are bool"
                )

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
    if path.is_dir():
        raise IsADirectoryError(
            f"{path} is a folder; give a file name, e.g. {path / 'model.patterns.safetensors'}"
        )
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: the folder {path.parent} does not exist; create it first")
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
        >>> x = torch.randn(2, 4)
        >>> PatternAttribution(net).attribute(x, target=1).shape
        torch.Size([2, 4])
        >>> wrapped = torch.nn.DataParallel(net)  # found through the wrapper too
        >>> torch.equal(PatternAttribution(wrapped).attribute(x, target=1),
        ...             PatternAttribution(net, patterns).attribute(x, target=1))
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
    def load(
        cls,
        path: str | os.PathLike[str],
        model: nn.Module | None = None,
        device: torch.device | str | None = None,
    ) -> Patterns:
        """Read a file written by :meth:`save`; validate against ``model`` and attach, if given.

        Patterns and open-gate fractions stored in float16, bfloat16, float32
        or float64 are kept as stored; the float8 kinds are read as float32
        (exactly).  Raises :class:`PatternFileError`, naming the layer, the
        key or tensor and what was expected, for a file that is not an intact
        pattern file: any other dtype, NaN or Inf, a shape or a count that
        does not fit, a metadata record of the wrong type, a missing or stray
        tensor.  Raises :class:`PatternMismatchError` when the patterns do not
        fit ``model``.
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
        _check_tensor_names(path, layers_meta, tensors)
        layers = {
            name: _read_layer(path, name, meta, tensors) for name, meta in layers_meta.items()
        }
        loaded = cls(layers, metadata.get("fingerprint") or None, _parse_settings(path, metadata))
        if model is None:
            return loaded
        loaded = loaded.for_model(model)
        loaded.validate(model, check_fingerprint=True)
        return loaded.attach(model)


def _parse_settings(path: Path, metadata: Mapping[str, str]) -> dict[str, Any]:
    """The fit settings stored in a file's metadata (a JSON object), or a clear error.

    The settings the methods read back (``approximate``, ``activations``) are
    checked here; the others are a record of the fit and kept as they are.
    """
    try:
        settings = json.loads(metadata.get("settings", "{}"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise PatternFileError(f"{path}: metadata 'settings' is not JSON") from exc
    if not isinstance(settings, dict):
        raise PatternFileError(f"{path}: metadata 'settings' is not a JSON object")
    approximate = settings.get("approximate")
    if approximate not in APPROXIMATIONS:
        raise PatternFileError(
            f"{path}: metadata 'settings' entry 'approximate' is {_describe(approximate)}, "
            f"expected one of {list(APPROXIMATIONS)}; the file is corrupted"
        )
    activations = settings.get("activations", {})
    if not isinstance(activations, dict):
        raise PatternFileError(
            f"{path}: metadata 'settings' entry 'activations' is {_describe(activations)}, "
            "expected an object of activation records by layer; the file is corrupted"
        )
    for name, record in activations.items():
        try:
            Regimes.from_json(record)
        except (ValueError, TypeError, OverflowError) as exc:
            raise PatternFileError(
                f"{path}: metadata 'settings' entry 'activations' of layer {name!r} is "
                f"{_describe(record)}, expected a record of the activation after the layer "
                "(activation, lower, upper, negative_slope); the file is corrupted"
            ) from exc
    return settings


#: Floating-point dtypes patterns are kept in as stored; other floating-point ones
#: (the float8 kinds, all exact in float32) are converted to float32 on load.
_KEPT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MAX_COUNT = 2**63 - 1  # counts are int64 in torch
_TENSOR_SUFFIXES = (
    *PATTERN_TYPES.values(),
    "positive_fraction",
    *(f"zero.{kind}" for kind in PATTERN_TYPES),
)


def _describe(value: Any) -> str:
    """A short description of a JSON value for messages (never a huge or deep ``repr``)."""
    if isinstance(value, list):
        return f"a JSON array of {len(value)} items"
    if isinstance(value, dict):
        return f"a JSON object of {len(value)} keys"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_count(value: Any) -> bool:
    """A JSON integer (not a bool, not a float) from 0 to 2**63 - 1."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_COUNT


def _check_tensor_names(
    path: Path, layers: Mapping[str, Any], tensors: Mapping[str, Tensor]
) -> None:
    """Every tensor in the file belongs to a layer of the metadata, under a known name."""
    known = {f"{name}/{suffix}" for name in layers for suffix in _TENSOR_SUFFIXES}
    stray = sorted(set(tensors) - known)
    if stray:
        raise PatternFileError(
            f"{path}: tensor {stray[0]!r} is not one of the tensors of the layers the file's "
            f"metadata names ({len(stray)} such tensors); the file is corrupted"
        )


def _read_layer(
    path: Path, name: str, record: Mapping[str, Any], tensors: Mapping[str, Tensor]
) -> LayerPatterns:
    """One layer's patterns from its metadata record and tensors, every part checked.

    Raises :class:`PatternFileError` naming the layer, the key or tensor, and
    what was expected, for anything an intact file cannot hold.
    """
    stored = [kind for kind, attr in PATTERN_TYPES.items() if f"{name}/{attr}" in tensors]
    shape, n_samples, folded = _layer_record(path, name, record, stored)
    outputs = shape[:1]
    patterns = {
        attr: _real_tensor(path, name, f"pattern {kind!r}", tensors, f"{name}/{attr}", shape)
        if kind in stored
        else None
        for kind, attr in PATTERN_TYPES.items()
    }
    key = f"{name}/positive_fraction"
    fraction = _real_tensor(path, name, "positive_fraction", tensors, key, outputs)
    if not bool(((fraction >= 0) & (fraction <= 1)).all()):
        raise _refuse(path, name, "positive_fraction", "is outside [0, 1]", "fractions")
    zero = {}
    for kind in PATTERN_TYPES:
        mask = tensors.get(f"{name}/zero.{kind}")
        what = f"zero mask {kind!r}"
        if mask is None:
            continue
        if kind not in stored:
            raise _refuse(path, name, what, "is present", f"masks only for the patterns {stored}")
        if mask.dtype != torch.bool or tuple(mask.shape) != outputs:
            found = f"is stored as {mask.dtype} of shape {tuple(mask.shape)}"
            raise _refuse(path, name, what, found, f"torch.bool of shape {outputs}")
        zero[kind] = mask
    return LayerPatterns(
        **patterns,
        n_samples=n_samples,
        positive_fraction=fraction,
        zero=zero,
        folded_batchnorm=folded,
    )


def _refuse(path: Path, name: str, what: str, found: str, expected: str) -> PatternFileError:
    return PatternFileError(
        f"{path}: layer {name!r} {what} {found}, expected {expected}; "
        "the file is corrupted or was not written by captum-pattern"
    )


def _layer_record(
    path: Path, name: str, record: Mapping[str, Any], stored: list[str]
) -> tuple[tuple[int, ...], int, str | None]:
    """The weight shape, sample count and folded BatchNorm of a layer's metadata record.

    ``stored``: the pattern types whose tensors the file holds for the layer;
    the record's ``pattern_types`` must name the same ones.
    """
    missing = [k for k in ("weight_shape", "n_samples", "folded_batchnorm", "pattern_types")]
    missing = [k for k in missing if k not in record]
    if missing:
        raise _refuse(path, name, f"metadata {missing[0]!r}", "is missing", "it in every record")
    shape, n_samples = record["weight_shape"], record["n_samples"]
    folded, kinds = record["folded_batchnorm"], record["pattern_types"]
    if not (isinstance(shape, list) and shape and all(_is_count(s) for s in shape)):
        found = "is " + _describe(shape)
        raise _refuse(path, name, "metadata 'weight_shape'", found, "a list of sizes (integers)")
    if not _is_count(n_samples):
        expected = f"an integer from 0 to {_MAX_COUNT}"
        raise _refuse(path, name, "metadata 'n_samples'", "is " + _describe(n_samples), expected)
    if not (folded is None or (isinstance(folded, str) and folded)):
        found = "is " + _describe(folded)
        raise _refuse(path, name, "metadata 'folded_batchnorm'", found, "null or a module name")
    if not stored:
        expected = f"at least one of the tensors {name}/{{{', '.join(PATTERN_TYPES.values())}}}"
        raise _refuse(path, name, "patterns", "are missing", expected)
    if not (
        isinstance(kinds, list)
        and all(isinstance(k, str) for k in kinds)
        and sorted(kinds) == sorted(stored)
    ):
        expected = f"the pattern types whose tensors the file holds, {stored}"
        raise _refuse(path, name, "metadata 'pattern_types'", "is " + _describe(kinds), expected)
    return tuple(shape), n_samples, folded


def _real_tensor(
    path: Path,
    name: str,
    what: str,
    tensors: Mapping[str, Tensor],
    key: str,
    shape: tuple[int, ...],
) -> Tensor:
    """``tensors[key]``: finite, real floating point (float8 converted to float32), ``shape``."""
    if key not in tensors:
        raise _refuse(path, name, what, "is missing", "a tensor in the file")
    value = tensors[key]
    if not value.is_floating_point():
        found = f"is stored as {value.dtype}"
        raise _refuse(path, name, what, found, "a real floating-point tensor")
    if value.dtype not in _KEPT_DTYPES:
        value = value.to(torch.float32)
    if tuple(value.shape) != shape:
        expected = f"shape {shape} (from the metadata's 'weight_shape')"
        raise _refuse(path, name, what, f"has shape {tuple(value.shape)}", expected)
    if not torch.isfinite(value).all():
        raise _refuse(path, name, what, "holds NaN or Inf", "finite values")
    return value


# Patterns attached to models (Patterns.attach); weak keys, so a model is not kept alive.
_ATTACHED: weakref.WeakKeyDictionary[nn.Module, Patterns] = weakref.WeakKeyDictionary()


def attached_patterns(model: nn.Module) -> Patterns | None:
    """The patterns attached to ``model`` (or to the model it wraps), or ``None``.

    Named after the unwrapped model's modules.  See :meth:`Patterns.attach`.
    """
    return _ATTACHED.get(unwrap_model(model))


def _parse_metadata(path: Path, metadata: Mapping[str, str]) -> dict[str, Any]:
    """The layer records of a file's metadata, after its format and version are checked."""
    if metadata.get("format") != FORMAT_NAME:
        raise PatternFileError(
            f"{path}: not a captum-pattern file (safetensors metadata 'format' is "
            f"{_describe(metadata.get('format'))}, expected {FORMAT_NAME!r})"
        )
    try:
        version = int(metadata.get("format_version", ""))
    except ValueError:
        raise PatternFileError(
            f"{path}: metadata 'format_version' is {_describe(metadata.get('format_version'))}, "
            f"expected a number from 1 to {FORMAT_VERSION}; the file is corrupted"
        ) from None
    if version > FORMAT_VERSION:
        raise PatternFileError(
            f"{path}: written by a newer captum-pattern (format version {version}; this "
            f"version reads up to {FORMAT_VERSION}); upgrade captum-pattern to read it"
        )
    if version < 1:
        raise PatternFileError(f"{path}: unknown format version {version}")
    expected = "a JSON object of layer records by layer name"
    if "layers" not in metadata:
        raise PatternFileError(f"{path}: metadata 'layers' is missing, expected {expected}")
    try:
        layers = json.loads(metadata["layers"])
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise PatternFileError(
            f"{path}: metadata 'layers' is not JSON ({type(exc).__name__}), expected {expected}; "
            "the file is corrupted"
        ) from exc
    if isinstance(layers, dict):
        odd = ((k, v) for k, v in layers.items() if not isinstance(v, dict))
        found = next((f"{_describe(v)} for layer {k!r}" for k, v in odd), None)
    else:
        found = _describe(layers)
    if found is not None:
        raise PatternFileError(
            f"{path}: metadata 'layers' is {found}, expected {expected}; the file is corrupted"
        )
    return layers
