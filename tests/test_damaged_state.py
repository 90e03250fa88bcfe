"""Damaged and hostile state: pattern files and fit checkpoints, fuzzed.

Hypothesis edits the metadata of an intact pattern file and of an intact fit
checkpoint (deep nesting, overflowing numbers, NaN and Infinity literals,
wrong types at every key, impossible values, missing and extra keys, bytes
that are not UTF-8) and stores their tensors in every dtype safetensors can
hold.  An independent reference (the documented format, written out below)
decides whether each file is intact; the property is that an intact file
loads (its tensors bit for bit, its metadata as written) and any other is a
:class:`PatternFileError` naming the file: never a raw ``RecursionError``,
``OverflowError``, ``KeyError``, ``JSONDecodeError``, ``TypeError`` or
``RuntimeError``, and never a silently different result.

``HYPOTHESIS_PROFILE=thorough`` (tests/conftest.py) runs 300 examples each.
"""

from __future__ import annotations

import json
import math
import struct
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from hypothesis import event, given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from captum_pattern import PatternError, PatternFileError, PatternFitter, PatternNet, Patterns

#: Every dtype safetensors stores (``test_the_dtype_list_is_complete`` keeps it so).
DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.float8_e4m3fn,
    torch.float8_e4m3fnuz,
    torch.float8_e5m2,
    torch.float8_e5m2fnuz,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.complex64,
]
KEPT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # documented: as stored
PATTERN_ATTRS = {"relu": "a_plus", "relu_negative": "a_minus", "linear": "a_linear"}
ATTRS = tuple(PATTERN_ATTRS)
PATTERN_KEYS = {"format", "format_version", "layers", "settings"}  # metadata read on load
CHECKPOINT_KEYS = {"format", "format_version", "batches_done", "settings"}


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()


# ------------------------------------------------------------------ hostile JSON
@dataclass(frozen=True)
class Deep:
    """A JSON value nested ``depth`` levels deep (spliced in as text: ``json.dumps`` recurses)."""

    depth: int
    bracket: str

    def text(self) -> str:
        if self.bracket == "[":
            return "[" * self.depth + "]" * self.depth
        return '{"a":' * self.depth + "0" + "}" * self.depth


HOSTILE_NUMBERS = (10**400, -(10**400), 2**63, 2**63 - 1, 2**64, -1, 0, 1, 7, 0.5, -0.0, 1e308)
HOSTILE_OTHERS = (math.nan, math.inf, -math.inf, True, False, None, "", "1", "relu", "gradient")
SPECIAL = st.sampled_from([*HOSTILE_NUMBERS, *HOSTILE_OTHERS])
LEAVES = st.one_of(SPECIAL, st.integers(), st.floats(), st.text(max_size=6))
# parsed (far from the recursion limit, whatever the stack) or refused (far beyond it)
DEEP = st.builds(Deep, st.sampled_from([2, 60, 500, 5000, 100_000]), st.sampled_from("[{"))
JSON_VALUES = st.one_of(
    DEEP,
    st.recursive(
        LEAVES,
        lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=4), kids),
        max_leaves=6,
    ),
)
RAW_TEXT = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "9" * 5000, "{", "null", "{}", "[]"]),
    st.sampled_from([" 1", "+1", "01", "1.0", "2", "0", "-1", "3", "1_0", str(2**64)]),
    DEEP.map(Deep.text),
)


def _dumps(value: Any) -> str:
    """JSON text of ``value`` with NaN/Infinity literals and :class:`Deep` values spliced in."""
    deep: list[Deep] = []

    def placeholder(obj: Any) -> str:
        deep.append(obj)
        return f"\x00deep{len(deep) - 1}\x00"

    text = json.dumps(value, default=placeholder)
    for i, d in enumerate(deep):
        text = text.replace(json.dumps(f"\x00deep{i}\x00"), d.text())
    return text


def _loads(text: str | None) -> Any:
    """``json.loads``, or :data:`BAD` for text that is missing or not JSON."""
    if text is None:
        return BAD
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return BAD


BAD = object()


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside dicts and lists, up to three levels down."""
    found = [prefix] if prefix else []
    if len(prefix) < 3 and isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif len(prefix) < 3 and isinstance(value, list):
        for i, item in enumerate(value):
            found += _paths(item, (*prefix, i))
    return found


def _edit_json(data: st.DataObject, value: Any) -> tuple[Any, tuple[Any, ...]]:
    """``value`` with one item replaced, deleted, or a new key added; and the path edited."""
    action = data.draw(st.sampled_from(["replace", "delete", "add"]))
    paths = _paths(value)
    path = data.draw(st.sampled_from(paths)) if paths else ()
    if action == "add" or not path:
        holders = [p for p in [(), *paths] if isinstance(_at(value, p), dict)]
        path = data.draw(st.sampled_from(holders))
        key = data.draw(st.text(max_size=6).filter(lambda k: k not in _at(value, path)))
        return _set(value, (*path, key), data.draw(JSON_VALUES)), (*path, key)
    if action == "delete":
        return _set(value, path, _DELETE), path
    return _set(value, path, data.draw(JSON_VALUES)), path


_DELETE = object()


def _at(value: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        value = value[key]
    return value


def _set(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    """A copy of ``value`` with the item at ``path`` set to ``new`` (or deleted)."""
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    head, rest = path[0], path[1:]
    if rest:
        copy[head] = _set(copy[head], rest, new)
    elif new is _DELETE:
        del copy[head]
    else:
        copy[head] = new
    return copy


@dataclass
class Damage:
    """What was done to a file's metadata: for the messages' checks and for failures."""

    metadata: dict[str, str]
    edits: list[tuple[str, tuple[Any, ...]]]  # (metadata key, path inside its JSON)
    bad_bytes: bool = False


def _damage(data: st.DataObject, metadata: dict[str, str], json_keys: tuple[str, ...]) -> Damage:
    """One to three edits of ``metadata``: raw text, a deleted or added key, a JSON edit."""
    metadata = dict(metadata)
    edits = []
    for _ in range(data.draw(st.integers(1, 3))):
        kind = data.draw(st.sampled_from(["text", "delete", "add", "json", "json"]))
        if kind == "add" or not metadata:
            key = data.draw(st.text(min_size=1, max_size=8).filter(lambda k: k not in metadata))
            metadata[key] = data.draw(RAW_TEXT)
            edits.append((key, ()))
            continue
        targets = [k for k in json_keys if k in metadata] if kind == "json" else []
        key = data.draw(st.sampled_from(targets or sorted(metadata)))
        parsed = _loads(metadata[key]) if key in json_keys else BAD
        if kind == "json" and isinstance(parsed, dict):
            new, path = _edit_json(data, parsed)
            metadata[key] = _dumps(new)
            edits.append((key, path))
        elif kind == "delete":
            del metadata[key]
            edits.append((key, ()))
        else:
            metadata[key] = data.draw(RAW_TEXT)
            edits.append((key, ()))
    return Damage(metadata, edits, bad_bytes=data.draw(st.integers(0, 9)) == 0)


def _write(path: Path, tensors: dict[str, torch.Tensor], damage: Damage) -> None:
    """Save, then (for ``bad_bytes``) put a byte that is not UTF-8 into the header's metadata."""
    save_file(tensors, str(path), metadata=damage.metadata)
    if not damage.bad_bytes:
        return
    raw = bytearray(path.read_bytes())
    (size,) = struct.unpack("<Q", raw[:8])
    header = raw[8 : 8 + size]
    at = header.find(b'"__metadata__"')
    # inside the first metadata string after the key: a lone continuation byte, never UTF-8
    start = header.index(b'"', header.index(b":", at) + 2) + 1
    header[start:start] = b"\x80"
    path.write_bytes(struct.pack("<Q", len(header)) + bytes(header) + raw[8 + size :])


# -------------------------------------------------------- the format, as documented
def _count(value: Any) -> bool:
    return type(value) is int and 0 <= value <= 2**63 - 1


def _regimes_record(record: Any) -> bool:
    """An activation record: activation, lower < upper (``null`` = ∞), negative_slope."""
    if not isinstance(record, dict) or set(record) != {
        "activation",
        "lower",
        "upper",
        "negative_slope",
    }:
        return False
    lower, upper = record["lower"], record["upper"]
    upper = math.inf if upper is None else upper
    numbers = all(type(v) in (int, float) for v in (lower, upper))
    if not (numbers and isinstance(record["activation"], str)):
        return False
    if type(record["negative_slope"]) is not bool:
        return False
    try:
        return float(lower) < float(upper)
    except OverflowError:
        return False


def _intact_pattern_metadata(metadata: dict[str, str], original: dict[str, Any]) -> bool:
    """Whether a pattern file with the original tensors and this metadata is intact.

    ``original``: the intact file's layer records.  The tensors fix each layer's
    name, weight shape and pattern types; the count, the folded BatchNorm, the
    fingerprint and the settings the methods do not read may be anything of
    their type.
    """
    if metadata.get("format") != "captum-pattern":
        return False
    try:
        if int(metadata.get("format_version", "x")) != 1:
            return False
    except ValueError:
        return False
    layers = _loads(metadata.get("layers"))
    if not isinstance(layers, dict) or layers.keys() != original.keys():
        return False
    for name, record in layers.items():
        if not isinstance(record, dict):
            return False
        keys = ("weight_shape", "n_samples", "folded_batchnorm", "pattern_types")
        if any(k not in record for k in keys):
            return False
        shape, kinds, folded = record["weight_shape"], record["pattern_types"], record[keys[2]]
        if not (isinstance(shape, list) and all(type(s) is int for s in shape)):
            return False
        if shape != original[name]["weight_shape"] or not _count(record["n_samples"]):
            return False
        if not (folded is None or (isinstance(folded, str) and folded != "")):
            return False
        if not (isinstance(kinds, list) and all(isinstance(k, str) for k in kinds)):
            return False
        if sorted(kinds) != sorted(original[name]["pattern_types"]):
            return False
    settings = _loads(metadata.get("settings", "{}"))
    if not isinstance(settings, dict) or settings.get("approximate") not in (None, "gradient"):
        return False
    activations = settings.get("activations", {})
    return isinstance(activations, dict) and all(map(_regimes_record, activations.values()))


# ------------------------------------------------------------------ pattern files
def _bn_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2)
    ).eval()


@pytest.fixture(scope="module")
def pattern_file(tmp_path_factory):
    """A model with a folded BatchNorm, its intact file's tensors and metadata, a folder."""
    model = _bn_model()
    folder = tmp_path_factory.mktemp("patterns")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zero patterns of a small fit
        PatternFitter(model).fit([torch.randn(16, 1, 4, 4)]).save(folder / "intact.safetensors")
    tensors, metadata = _read(folder / "intact.safetensors")
    return model, tensors, metadata, folder


@given(data=st.data())
def test_damaged_pattern_metadata_loads_as_written_or_is_a_pattern_file_error(data, pattern_file):
    model, tensors, metadata, folder = pattern_file
    damage = _damage(data, metadata, json_keys=("layers", "settings"))
    path = folder / "damaged.safetensors"
    _write(path, tensors, damage)
    intact = not damage.bad_bytes and _intact_pattern_metadata(
        damage.metadata, json.loads(metadata["layers"])
    )
    event("intact file" if intact else "damaged file")
    try:
        loaded = Patterns.load(path)
    except PatternFileError as exc:
        assert not intact, f"an intact file was refused: {exc}"
        _assert_names_the_damage(str(exc), path, damage, PATTERN_KEYS)
        return
    assert intact, f"a damaged file loaded: {damage.edits}"
    _assert_loaded_as_written(loaded, tensors, damage.metadata)
    # the settings the methods read back are usable (or refused with a typed error)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            explanation = PatternNet(model, Patterns.load(path, model=model)).attribute(
                torch.randn(2, 1, 4, 4), target=1
            )
        except PatternError:
            return  # e.g. a folded BatchNorm renamed to one the model lacks
    assert torch.isfinite(explanation).all()


def _assert_names_the_damage(message: str, path: Path, damage: Damage, known: set[str]) -> None:
    """The message names the file and, for a single edit of a known key, what was edited.

    An edit inside a JSON entry that still parses is named by its inner key (a
    layer's name or a record's key) or the entry's; any other by the entry's key.
    """
    assert str(path) in message
    if damage.bad_bytes or len(damage.edits) != 1 or damage.edits[0][0] not in known:
        return
    key, inner = damage.edits[0]
    named = [key, key.replace("_", " ")]
    if inner and isinstance(_loads(damage.metadata.get(key)), dict):
        named += [repr(part) for part in inner[:2] if isinstance(part, str)]
    assert any(name in message for name in named), (message, named)


def _assert_loaded_as_written(
    loaded: Patterns, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    """Every tensor bit for bit as stored, every record as the metadata says, typed right."""
    layers = json.loads(metadata["layers"])
    assert sorted(loaded) == sorted(layers)
    for name, lp in loaded.items():
        for attr in (*PATTERN_ATTRS.values(), "positive_fraction"):
            stored = tensors.get(f"{name}/{attr}")
            value = getattr(lp, attr)
            assert (value is None) == (stored is None)
            if stored is not None:
                assert value.dtype == stored.dtype and torch.equal(value, stored)
        masks = {k: v for k, v in tensors.items() if k.startswith(f"{name}/zero.")}
        assert {f"{name}/zero.{k}": v for k, v in lp.zero.items()}.keys() == masks.keys()
        assert all(torch.equal(lp.zero[k.split("zero.")[1]], v) for k, v in masks.items())
        assert type(lp.n_samples) is int and lp.n_samples == layers[name]["n_samples"]
        assert lp.folded_batchnorm == layers[name]["folded_batchnorm"]
    assert loaded.fingerprint == (metadata.get("fingerprint") or None)
    settings = json.loads(metadata.get("settings", "{}"))
    assert json.dumps(loaded.settings, sort_keys=True) == json.dumps(settings, sort_keys=True)


@given(dtype=st.sampled_from(DTYPES), data=st.data())
def test_pattern_file_tensors_of_every_dtype(dtype, data, pattern_file):
    """Floating point loads (float8 as float32, the others as stored); the rest is refused."""
    _, tensors, metadata, folder = pattern_file
    key = data.draw(st.sampled_from(sorted(tensors)))
    stored = tensors[key].to(dtype)
    path = folder / "dtype.safetensors"
    save_file({**tensors, key: stored}, str(path), metadata=metadata)
    layer, attr = key.split("/")
    is_mask = attr.startswith("zero.")
    if (is_mask and dtype != torch.bool) or (not is_mask and not stored.is_floating_point()):
        kind = {v: k for k, v in PATTERN_ATTRS.items()}.get(attr, attr.removeprefix("zero."))
        with pytest.raises(PatternFileError) as info:
            Patterns.load(path)
        message = str(info.value)
        assert str(path) in message and f"layer {layer!r}" in message and str(dtype) in message
        assert repr(kind) in message or attr in message, message
        return
    expected = stored if is_mask or dtype in KEPT else stored.to(torch.float32)
    if not is_mask and not torch.isfinite(expected).all():  # e.g. overflow in float16
        with pytest.raises(PatternFileError, match="holds NaN or Inf"):
            Patterns.load(path)
        return
    loaded = Patterns.load(path)[layer]
    value = loaded.zero[attr.removeprefix("zero.")] if is_mask else getattr(loaded, attr)
    assert value.dtype == expected.dtype and torch.equal(value, expected)


def test_the_dtype_list_is_complete():
    """``DTYPES`` holds every dtype this safetensors stores (its own table, where it has one)."""
    table = getattr(safetensors.torch, "_TYPES", None)
    if table is None:
        pytest.skip("this safetensors has no dtype table to compare with")
    assert set(table.values()) <= set(DTYPES)


# -------------------------------------------------------------------- checkpoints
def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)).double()


def _interrupted(batches, at):
    for i, batch in enumerate(batches):
        if i == at:
            raise KeyboardInterrupt
        yield batch


DONE, BATCHES = 3, 5  # the checkpoint holds 3 of the 5 batches


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An interrupted fit's checkpoint (tensors, metadata), the data and the whole fit."""
    torch.manual_seed(1)
    model = _mlp()
    batches = [torch.randn(8, 5, dtype=torch.float64) for _ in range(BATCHES)]
    folder = tmp_path_factory.mktemp("checkpoint")
    fitter = PatternFitter(model, method="weight_grad")  # the same kernels in every fit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = fitter.fit(batches, checkpoint=folder / "whole.ckpt", checkpoint_every=1)
        with pytest.raises(KeyboardInterrupt):
            fitter.fit(
                _interrupted(batches, DONE), checkpoint=folder / "a.ckpt", checkpoint_every=1
            )
    tensors, metadata = _read(folder / "a.ckpt")
    assert metadata["batches_done"] == str(DONE)
    return fitter, batches, whole, tensors, metadata, folder


def _resume(fitter: PatternFitter, batches: list[torch.Tensor], path: Path) -> Patterns:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fitter.fit(batches, checkpoint=path, checkpoint_every=1, resume=True)


def _equal(p: Patterns, q: Patterns) -> bool:
    return all(
        torch.equal(getattr(p[name], attr), getattr(q[name], attr))
        for name in p
        for attr in PATTERN_ATTRS.values()
    )


def _resumable(metadata: dict[str, str], original: dict[str, Any]) -> bool:
    """Whether a checkpoint with this metadata may be resumed over the fixture's data.

    The documented rules: this format, version 2, a count of batches done that
    the data holds, and settings with every item this fit has, equal.
    """
    if metadata.get("format") != "captum-pattern-checkpoint":
        return False
    try:
        if int(metadata.get("format_version", "x")) != 2:
            return False
        if not 0 <= int(metadata.get("batches_done", "x")) <= BATCHES:
            return False
    except ValueError:
        return False
    settings = _loads(metadata.get("settings"))
    return isinstance(settings, dict) and all(settings.get(k) == v for k, v in original.items())


@given(data=st.data())
def test_damaged_checkpoint_metadata_resumes_as_written_or_is_a_pattern_file_error(
    data, checkpoint
):
    fitter, batches, whole, tensors, metadata, folder = checkpoint
    damage = _damage(data, metadata, json_keys=("settings",))
    path = folder / "damaged.ckpt"
    _write(path, tensors, damage)
    resumable = not damage.bad_bytes and _resumable(
        damage.metadata, json.loads(metadata["settings"])
    )
    event("resumable checkpoint" if resumable else "damaged checkpoint")
    try:
        resumed = _resume(fitter, batches, path)
    except PatternFileError as exc:
        assert not resumable, f"an intact checkpoint was refused: {exc}"
        _assert_names_the_damage(str(exc), path, damage, CHECKPOINT_KEYS)
        return
    assert resumable, f"a damaged checkpoint was resumed: {damage.edits}"
    if int(damage.metadata["batches_done"]) == DONE:
        assert _equal(resumed, whole)  # bit for bit: nothing meaningful was changed
    else:  # another count the data holds: not detectable (see docs/reliability.md)
        assert all(torch.isfinite(lp.pattern(k)).all() for lp in resumed.values() for k in ATTRS)


@given(dtype=st.sampled_from(DTYPES), data=st.data())
def test_checkpoint_tensors_of_every_dtype(dtype, data, checkpoint):
    """Floating point is resumed (converted to float64); any other dtype is refused, named."""
    fitter, batches, whole, tensors, metadata, folder = checkpoint
    key = data.draw(st.sampled_from(sorted(tensors)))
    stored = tensors[key].to(dtype)
    path = folder / "dtype.ckpt"
    save_file({**tensors, key: stored}, str(path), metadata=metadata)
    if not stored.is_floating_point():
        with pytest.raises(PatternFileError) as info:
            _resume(fitter, batches, path)
        assert str(path) in str(info.value) and repr(key) in str(info.value)
        assert str(dtype) in str(info.value)
        return
    if not torch.isfinite(stored.double()).all():  # overflow in a narrow float type
        with pytest.raises(PatternFileError, match=f"{key!r} holds NaN or Inf"):
            _resume(fitter, batches, path)
        return
    resumed = _resume(fitter, batches, path)
    if torch.equal(stored.to(tensors[key].dtype), tensors[key]):  # the conversion was exact
        assert _equal(resumed, whole)
    else:
        assert all(torch.isfinite(lp.pattern(k)).all() for lp in resumed.values() for k in ATTRS)


def test_a_version_1_checkpoint_is_refused_with_what_to_do(checkpoint):
    """The metadata a version-1 checkpoint had (before 0.1: no settings, a methods entry)."""
    fitter, batches, _, tensors, metadata, folder = checkpoint
    version_1 = {
        "format": "captum-pattern-checkpoint",
        "format_version": "1",
        "batches_done": str(DONE),
        "pattern_types": json.dumps(["relu", "relu_negative", "linear"]),
        "folds": "{}",
        "layers": json.dumps(["0", "2"]),
        "fingerprint": json.loads(metadata["settings"])["weights"],
        "methods": json.dumps({"0": "weight_grad", "2": "weight_grad"}),
    }
    path = folder / "v1.ckpt"
    save_file(tensors, str(path), metadata=version_1)
    with pytest.raises(PatternFileError) as info:
        _resume(fitter, batches, path)
    message = str(info.value)
    assert str(path) in message and "older captum-pattern" in message
    assert "version 1" in message and "delete the file to start the fit over" in message
    assert path.exists()  # the user decides: nothing is deleted for them


def test_a_newer_checkpoint_is_refused_with_what_to_do(checkpoint):
    fitter, batches, _, tensors, metadata, folder = checkpoint
    path = folder / "v3.ckpt"
    save_file(tensors, str(path), metadata={**metadata, "format_version": "3"})
    with pytest.raises(PatternFileError, match=r"newer captum-pattern.*version 3.*upgrade"):
        _resume(fitter, batches, path)


def test_a_checkpoint_holding_more_batches_than_the_data_is_refused(checkpoint):
    """A count of batches done beyond the data's end would return the checkpoint as it is."""
    fitter, batches, _, tensors, metadata, folder = checkpoint
    path = folder / "long.ckpt"
    for done in (str(BATCHES + 1), str(sys.maxsize)):
        save_file(tensors, str(path), metadata={**metadata, "batches_done": done})
        with pytest.raises(
            PatternFileError, match=f"holds {done} batches .*'batches_done'.* the data has only 5"
        ):
            _resume(fitter, batches, path)
    save_file(tensors, str(path), metadata={**metadata, "batches_done": str(sys.maxsize + 1)})
    with pytest.raises(PatternFileError, match="'batches_done' is .*expected a whole number"):
        _resume(fitter, batches, path)


@pytest.mark.parametrize(
    "key,change,match",
    [
        ("n", lambda t: -t, r"'n' is -\d+\.0, expected a whole number >= 0"),
        ("n", lambda t: t + 0.5, r"'n' is \d+\.5, expected a whole number"),
        ("scalar.n_pos", lambda t: t.index_fill(0, torch.tensor([0]), -1.0), "holds -1.0"),
        ("scalar.n_pos", lambda t: t + 1e6, r"expected whole numbers from 0 to n"),
    ],
    ids=["negative-n", "fractional-n", "negative-count", "count-above-n"],
)
def test_impossible_counts_in_a_checkpoints_tensors_are_refused(checkpoint, key, change, match):
    """Counts that no fit can produce (a damaged or hand-edited file) are not solved."""
    fitter, batches, _, tensors, metadata, folder = checkpoint
    names = [k for k in tensors if k.endswith(f"/{key}") or k == key or k.endswith(f".{key}")]
    assert names, sorted(tensors)[:8]
    edited = dict(tensors) | {names[0]: change(tensors[names[0]].clone())}
    path = folder / "counts.ckpt"
    save_file(edited, str(path), metadata=metadata)
    with pytest.raises(PatternFileError, match=match):
        _resume(fitter, batches, path)
