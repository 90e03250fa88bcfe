"""Pattern files: round trip, validation against the model, every load error."""

import json
import pickle
import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import captum_pattern.patterns as patterns_module
from captum_pattern import PatternFileError, PatternFitter, PatternMismatchError, Patterns
from models import Residual


def _cnn(channels: int = 4) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, channels, 3),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(channels * 4 * 4, 3),
    ).eval()


@pytest.fixture
def fitted(tmp_path):
    model = _cnn()
    patterns = PatternFitter(model).fit([torch.randn(8, 1, 6, 6) for _ in range(2)])
    path = tmp_path / "model.patterns.safetensors"
    patterns.save(path)
    return model, patterns, path


def test_round_trip_keeps_everything(fitted):
    model, patterns, path = fitted
    loaded = Patterns.load(path, model=model)
    assert list(loaded) == list(patterns)
    assert loaded.fingerprint == patterns.fingerprint
    assert loaded.settings == json.loads(json.dumps(patterns.settings))
    for name in patterns:
        a, b = patterns[name], loaded[name]
        for attr in ("a_plus", "a_minus", "a_linear", "positive_fraction"):
            assert torch.equal(getattr(a, attr), getattr(b, attr))
        assert a.n_samples == b.n_samples and a.folded_batchnorm == b.folded_batchnorm
        assert a.zero.keys() == b.zero.keys()
        for k in a.zero:
            assert torch.equal(a.zero[k], b.zero[k])


def test_partial_pattern_types_round_trip(tmp_path):
    model = _cnn()
    patterns = PatternFitter(model, pattern_types=["relu"]).fit([torch.randn(4, 1, 6, 6)])
    patterns.save(tmp_path / "p.safetensors")
    loaded = Patterns.load(tmp_path / "p.safetensors")
    assert loaded["0"].a_linear is None and loaded["0"].a_plus is not None
    with pytest.raises(PatternMismatchError, match="'linear' pattern was not fitted"):
        loaded["0"].pattern("linear")


def test_missing_layer_is_named(fitted):
    _, _, path = fitted
    model = nn.Sequential(*_cnn(), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(PatternMismatchError, match="'6'.*has no patterns"):
        Patterns.load(path, model=model)


def test_extra_layer_is_named(fitted):
    _, _, path = fitted
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
    with pytest.raises(PatternMismatchError, match="'4'.*no Linear/Conv layer"):
        Patterns.load(path, model=model)


def test_misshaped_layer_is_named(fitted):
    _, _, path = fitted
    with pytest.raises(PatternMismatchError, match=r"layer '0'.*\(4, 1, 3, 3\).*\(5, 1, 3, 3\)"):
        Patterns.load(path, model=_cnn(channels=5))


def test_missing_batchnorm_of_a_fold_is_named(fitted):
    _, _, path = fitted
    model = _cnn()
    model[1] = nn.Identity()
    with pytest.raises(PatternMismatchError, match="BatchNorm '1'"):
        Patterns.load(path, model=model)


def test_changed_weights_warn_once_per_load(fitted):
    model, _, path = fitted
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Patterns.load(path, model=model)  # same weights: no warning
    with torch.no_grad():
        model[0].weight.add_(0.1)
    with pytest.warns(UserWarning, match="weights differ"):
        Patterns.load(path, model=model)


def test_not_a_pattern_file(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(PatternFileError, match="not a captum-pattern file"):
        Patterns.load(path)


def test_random_bytes_and_pickle_are_refused_without_running_code(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(PatternFileError, match="not a readable safetensors file"):
        Patterns.load(garbage)

    class Payload:
        def __reduce__(self):
            return (print, ("pickle code ran",))

    pickled = tmp_path / "evil.pt"
    pickled.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(PatternFileError):
        Patterns.load(pickled)
    torch_file = tmp_path / "torch.pt"
    torch.save({"a": torch.zeros(3)}, torch_file)
    with pytest.raises(PatternFileError):
        Patterns.load(torch_file)


def test_truncated_file(fitted, tmp_path):
    _, _, path = fitted
    data = path.read_bytes()
    for cut in (4, 20, len(data) // 2, len(data) - 3):
        short = tmp_path / f"short{cut}.safetensors"
        short.write_bytes(data[:cut])
        with pytest.raises(PatternFileError):
            Patterns.load(short)


def test_newer_format_version_is_refused(fitted, tmp_path, monkeypatch):
    model, patterns, _ = fitted
    monkeypatch.setattr(patterns_module, "FORMAT_VERSION", 99)
    newer = tmp_path / "newer.safetensors"
    patterns.save(newer)
    monkeypatch.undo()
    with pytest.raises(PatternFileError, match="newer captum-pattern.*version 99"):
        Patterns.load(newer)


def test_missing_file():
    with pytest.raises(PatternFileError, match="no such pattern file"):
        Patterns.load("/nonexistent/p.safetensors")


def test_failed_save_leaves_old_file_intact(fitted, monkeypatch):
    model, patterns, path = fitted
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(patterns_module, "save_file", broken)
    with pytest.raises(KeyboardInterrupt):
        patterns.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left


def test_attribution_validates_structure():
    from captum_pattern import PatternNet

    model = Residual()
    (x,) = model.example()
    patterns = PatternFitter(model).fit([x])
    other = nn.Sequential(nn.Conv2d(3, 8, 3))
    with pytest.raises(PatternMismatchError):
        PatternNet(other, patterns)


# ------------------------------------------------------------ damaged and shared files
def _saved(tmp_path):
    from safetensors import safe_open

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    path = tmp_path / "p.safetensors"
    PatternFitter(model).fit([torch.randn(64, 3)]).save(path)
    with safe_open(str(path), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        metadata = handle.metadata()
    return model, path, tensors, metadata


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.complex64, torch.int64])
def test_pattern_tensors_of_other_dtypes_are_refused(tmp_path, dtype):
    from safetensors.torch import save_file

    model, path, tensors, metadata = _saved(tmp_path)
    tensors["0/a_plus"] = tensors["0/a_plus"].to(dtype)
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(PatternFileError, match=r"layer '0' pattern 'relu' is stored as torch\.\w+"):
        Patterns.load(path)


@pytest.mark.parametrize("settings", ["[" * 100000, "[1, 2]", "{not json"])
def test_damaged_settings_are_a_pattern_file_error(tmp_path, settings):
    from safetensors.torch import save_file

    model, path, tensors, metadata = _saved(tmp_path)
    save_file(tensors, str(path), metadata={**metadata, "settings": settings})
    with pytest.raises(PatternFileError, match="metadata 'settings'"):
        Patterns.load(path)


def test_pattern_files_follow_the_umask(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        _, path, _, _ = _saved(tmp_path)
        assert path.stat().st_mode & 0o777 == 0o644  # readable by others, as open() makes it
    finally:
        os.umask(old)


@pytest.mark.parametrize(
    "layers",
    ["[" * 100000, '{"0": {"n_samples": 1e400, "weight_shape": [4, 3]}}', '{"0": 5}', '"x"'],
    ids=["deep", "overflow", "not-a-record", "not-a-mapping"],
)
def test_damaged_layer_metadata_is_a_pattern_file_error(tmp_path, layers):
    model, path, tensors, metadata = _saved(tmp_path)
    save_file(tensors, str(path), metadata={**metadata, "layers": layers})
    with pytest.raises(PatternFileError):
        Patterns.load(path, model=model)


def _record_edit(key, value):
    def edit(layers):
        layers["0"][key] = value

    return edit


def _drop(key):
    def edit(layers):
        del layers["0"][key]

    return edit


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (_record_edit("n_samples", -5), "'n_samples' is -5, expected an integer from 0"),
        (_record_edit("n_samples", 3.5), "'n_samples' is 3.5"),
        (_record_edit("n_samples", True), "'n_samples' is True"),
        (_record_edit("n_samples", "64"), "'n_samples' is '64'"),
        (_record_edit("n_samples", 2**64), "'n_samples' is an integer of 65 bits"),
        (_record_edit("weight_shape", ["4", "3"]), "'weight_shape' is a JSON array of 2 items"),
        (_record_edit("weight_shape", [3, 4]), r"has shape \(4, 3\), expected shape \(3, 4\)"),
        (_record_edit("folded_batchnorm", 5), "'folded_batchnorm' is 5, expected null or a"),
        (_record_edit("pattern_types", ["relu"]), "'pattern_types' is a JSON array of 1 items"),
        (_drop("n_samples"), "metadata 'n_samples' is missing"),
        (lambda layers: layers.pop("2"), "tensor '2/a_linear' is not one of the tensors"),
        (lambda layers: layers.update(x=layers["2"]), "layer 'x' patterns are missing"),
    ],
    ids=[
        "negative-count",
        "float-count",
        "bool-count",
        "string-count",
        "huge-count",
        "shape-of-strings",
        "other-shape",
        "fold-not-a-name",
        "other-pattern-types",
        "missing-key",
        "layer-dropped",
        "layer-added",
    ],
)
def test_impossible_layer_records_are_named(tmp_path, edit, named):
    _, path, tensors, metadata = _saved(tmp_path)
    layers = json.loads(metadata["layers"])
    edit(layers)
    save_file(tensors, str(path), metadata={**metadata, "layers": json.dumps(layers)})
    with pytest.raises(PatternFileError, match=named) as info:
        Patterns.load(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("0/positive_fraction", torch.full((4,), 1.5), "positive_fraction is outside"),
        ("0/positive_fraction", torch.full((4,), float("nan")), "positive_fraction holds NaN"),
        ("0/positive_fraction", torch.zeros(5), r"positive_fraction has shape \(5,\)"),
        ("0/zero.relu", torch.zeros(5, dtype=torch.bool), "zero mask 'relu' is stored as"),
        ("0/zero.bogus", torch.zeros(4, dtype=torch.bool), "tensor '0/zero.bogus' is not one"),
    ],
    ids=["fraction-above-1", "fraction-nan", "fraction-shape", "mask-shape", "unknown-mask"],
)
def test_impossible_tensors_beside_the_patterns_are_named(tmp_path, key, value, named):
    _, path, tensors, metadata = _saved(tmp_path)
    save_file({**tensors, key: value}, str(path), metadata=metadata)
    with pytest.raises(PatternFileError, match=named):
        Patterns.load(path)


def test_float8_patterns_load_as_float32_and_others_as_stored(tmp_path):
    _, path, tensors, metadata = _saved(tmp_path)
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.float16, torch.bfloat16):
        stored = tensors["0/a_plus"].to(dtype)
        save_file({**tensors, "0/a_plus": stored}, str(path), metadata=metadata)
        loaded = Patterns.load(path)["0"].a_plus
        expected = stored.float() if dtype.itemsize == 1 else stored
        assert loaded.dtype == expected.dtype and torch.equal(loaded, expected)


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"approximate": "everything"}, "'approximate' is 'everything', expected one of"),
        ({"activations": [1]}, "'activations' is a JSON array of 1 items"),
        (
            {
                "activations": {
                    "0": {
                        "activation": "relu",
                        "lower": 10**400,
                        "upper": None,
                        "negative_slope": False,
                    }
                }
            },
            "'activations' of layer '0' is a JSON object of 4 keys",
        ),
    ],
    ids=["approximate", "activations-not-an-object", "overflowing-record"],
)
def test_settings_the_methods_read_are_checked_on_load(tmp_path, settings, named):
    _, path, tensors, metadata = _saved(tmp_path)
    save_file(tensors, str(path), metadata={**metadata, "settings": json.dumps(settings)})
    with pytest.raises(PatternFileError, match=named):
        Patterns.load(path)


def test_saving_into_a_missing_folder_or_onto_a_folder_names_the_users_path(tmp_path):
    patterns = PatternFitter(nn.Linear(3, 2)).fit([torch.randn(8, 3)])
    missing = tmp_path / "nope" / "p.safetensors"
    with pytest.raises(FileNotFoundError, match=rf"{missing}: the folder .*nope does not exist"):
        patterns.save(missing)
    with pytest.raises(IsADirectoryError, match=rf"{tmp_path} is a folder; give a file name"):
        patterns.save(tmp_path)
    assert list(tmp_path.iterdir()) == []  # no temporary file left
