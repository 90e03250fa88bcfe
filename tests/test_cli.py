"""The command line end to end on tiny stand-ins: an image folder in tmp_path, a tiny model."""

import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from cli_helpers import read_normally, stop_reading_at
from PIL import Image
from torch.utils.data import DataLoader

from captum_pattern import PatternFitter, Patterns
from captum_pattern.cli import main, method_name
from captum_pattern.images import ImageFiles, image_transform, load_model

ROOT = Path(__file__).resolve().parents[1]
MODEL = "cli_models:tiny_resnet"
MODEL_FILE = str(ROOT / "tests" / "cli_models.py") + ":tiny_resnet"


@pytest.fixture
def folder(tmp_path):
    """An ImageFolder layout: two classes, ten images of different sizes."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for label, count in (("cat", 6), ("dog", 4)):
        (root / label).mkdir(parents=True)
        for i in range(count):
            size = (40 + 2 * i, 36 + i)
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    return root


def _api_patterns(folder, batch_size=4, max_batches=None):
    model = load_model(MODEL)
    loader = DataLoader(ImageFiles([folder], image_transform(32)), batch_size=batch_size)
    return PatternFitter(model).fit(loader, max_batches=max_batches)


def _assert_same_patterns(a, b):
    assert set(a) == set(b)
    assert a.folds == b.folds
    for name in a:
        for kind in ("relu", "relu_negative", "linear"):
            assert torch.allclose(a[name].pattern(kind), b[name].pattern(kind), atol=1e-5), name


def _fit_args(folder, out, *extra):
    return [
        "fit",
        MODEL,
        str(folder),
        "--image-size",
        "32",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


def test_fit_writes_the_patterns_the_api_learns(folder, tmp_path, capsys):
    out = tmp_path / "tiny.patterns.safetensors"
    assert main(_fit_args(folder, out)) == 0
    assert f"wrote {out.resolve()}" in capsys.readouterr().out
    model = load_model(MODEL)
    patterns = Patterns.load(out, model=model)
    assert patterns.folds == {
        "block_conv1": "block_bn1",
        "block_conv2": "block_bn2",
        "conv1": "bn1",
    }
    assert patterns["fc"].n_samples == 10
    _assert_same_patterns(patterns, _api_patterns(folder))
    assert not Path(f"{out}.checkpoint").exists()


def test_fit_max_batches(folder, tmp_path):
    out = tmp_path / "p.safetensors"
    assert main(_fit_args(folder, out, "--max-batches", "2")) == 0
    patterns = Patterns.load(out)
    assert patterns["fc"].n_samples == 8
    _assert_same_patterns(patterns, _api_patterns(folder, max_batches=2))


def test_interrupted_fit_resumes_without_rereading_done_batches(folder, tmp_path, monkeypatch):
    out = tmp_path / "p.safetensors"
    checkpoint = tmp_path / "fit.ckpt"
    read: list[int] = []
    stop_reading_at(monkeypatch, 8, read)  # in batch 2
    args = _fit_args(folder, out, "--checkpoint", str(checkpoint), "--checkpoint-every", "1")
    assert main(args) == 130
    assert checkpoint.exists() and not out.exists()
    read.clear()
    stop_reading_at(monkeypatch, 10**9, read)  # count the reads of the resumed fit
    assert main([*args, "--resume"]) == 0
    # the first batch (read to find the model's structure) and the batches not done yet
    assert sorted(read) == [0, 1, 2, 3, 8, 9]
    _assert_same_patterns(Patterns.load(out), _api_patterns(folder))
    assert not checkpoint.exists()


@pytest.fixture
def fitted(folder, tmp_path):
    out = tmp_path / "tiny.patterns.safetensors"
    assert main(_fit_args(folder, out)) == 0
    return out


def test_explain_one_figure_per_image_and_a_grid(folder, fitted, tmp_path, capsys):
    images = [str(folder / "cat" / "0.png"), str(folder / "dog")]
    base = ["explain", MODEL, *images, "--patterns", str(fitted), "--image-size", "32"]
    assert main([*base, "--out", str(tmp_path / "each")]) == 0
    captured = capsys.readouterr()
    assert "left out LRP" in captured.err  # Captum's LRP does not support nn.Flatten
    figures = sorted((tmp_path / "each").glob("*.png"))
    assert [f.name for f in figures] == [
        "000_0.png",
        "001_0.png",
        "002_1.png",
        "003_2.png",
        "004_3.png",
    ]
    for f in figures:
        assert f"wrote {f.resolve()}" in captured.out
    one_row = matplotlib.image.imread(figures[0])
    methods = ["PatternNet", "pattern-attribution", "Saliency", "--target", "1"]
    assert main([*base, "--out", str(tmp_path / "grid"), "--grid", "--methods", *methods]) == 0
    grid = matplotlib.image.imread(tmp_path / "grid" / "explanations.png")
    assert grid.shape[0] > 4 * one_row.shape[0]  # five rows
    assert grid.shape[1] < one_row.shape[1]  # four columns instead of seven (LRP left out)


def test_method_names():
    assert method_name("PatternNet") == "PatternNet"
    assert method_name("guided_backprop") == "Guided BackProp"
    assert method_name("Deconvolution") == "DeConvNet"
    assert method_name("PATTERN ATTRIBUTION (linear)") == "PatternAttribution (linear)"
    with pytest.raises(SystemExit):
        main(["explain", MODEL, "x.png", "--patterns", "p", "--methods", "Occlusion"])


def test_demo_command_writes_figure_and_summary(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--epochs", "1", "--size", "8", "--images", "2"]
    assert main([*args, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"figure: {(out / 'comparison.png').resolve()}" in printed
    assert f"page: {(out / 'index.html').resolve()}" in printed
    assert "test accuracy" in printed and "PatternAttribution" in printed
    assert matplotlib.image.imread(out / "comparison.png").ndim == 3
    assert (out / "summary.txt").read_text().startswith("captum-pattern demo")


def test_console_script_end_to_end(folder, fitted, tmp_path):
    script = Path(sys.executable).with_name("captum-pattern")
    if not script.exists():
        pytest.skip("the console script is not installed (pip install -e .)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "sub"
    args = [
        str(script),
        "explain",
        MODEL_FILE,
        str(folder / "dog" / "1.png"),
        "--patterns",
        str(fitted),
        "--image-size",
        "32",
        "--out",
        str(out),
        "--methods",
        "PatternNet",
    ]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (out / "000_1.png").exists()
    assert str((out / "000_1.png").resolve()) in done.stdout


def test_resume_refuses_other_batches(folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "p.safetensors"
    checkpoint = tmp_path / "fit.ckpt"
    stop_reading_at(monkeypatch, 8)  # in batch 2
    args = _fit_args(folder, out, "--checkpoint", str(checkpoint), "--checkpoint-every", "1")
    assert main(args) == 130
    read_normally(monkeypatch)
    assert main([*args, "--resume", "--batch-size", "2"]) == 2
    assert "batch_size changed" in capsys.readouterr().err
    assert not out.exists() and checkpoint.exists()


def test_explain_refuses_a_target_the_model_does_not_have(folder, fitted, capsys):
    argv = ["explain", MODEL, str(folder / "cat"), "--patterns", str(fitted), "--image-size", "32"]
    assert main([*argv, "--target", "3"]) == 2
    assert "not a class of this model (it has 3 outputs)" in capsys.readouterr().err


def test_explain_with_unusable_patterns_is_one_error_line_and_leaves_nothing(
    folder, fitted, tmp_path, capsys
):
    other = tmp_path / "other.patterns.safetensors"  # patterns of another model (3×3 fc)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3, 3))
    PatternFitter(model).fit([torch.randn(16, 3)]).save(other)
    for patterns, message in (
        (folder / "cat" / "0.png", "not a readable safetensors file"),
        (other, "layer"),
    ):
        out = tmp_path / f"figures-{patterns.stem}"
        argv = ["explain", MODEL, str(folder / "cat"), "--patterns", str(patterns)]
        assert main([*argv, "--image-size", "32", "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err
        assert not out.exists()  # the folder it created for the figures is gone again
