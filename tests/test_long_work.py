"""Long command-line work: bad images, resumed fits, outputs checked first, bad numbers.

Each test is one case of docs/reliability.md's "Long work" table.
"""

import warnings
from pathlib import Path

import pytest
import torch
from cli_helpers import read_normally, stop_reading_at, write_images
from PIL import Image

from captum_pattern import InvalidInputError, PatternFitter, Patterns
from captum_pattern import images as images_module
from captum_pattern.cli import main
from captum_pattern.images import (
    ImageFiles,
    Preprocessing,
    ResumableBatches,
    UnreadableImageError,
    load_model,
)
from captum_pattern.metrics import patch_degradation

MODEL = "cli_models:tiny_resnet"


@pytest.fixture
def folder(tmp_path):
    """Ten RGB images in a flat folder, 0.png .. 9.png."""
    return write_images(tmp_path / "images", 10, seed=1)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _fit(folder, out, *extra):
    return [
        "fit", MODEL, str(folder), "--image-size", "32", "--batch-size", "4", "--workers", "0",
        "--out", str(out), "--no-progress", *extra,
    ]  # fmt: skip


def _reference(paths_per_batch):
    """The API fit on exactly these batches of files (the CLI's preprocessing at 32 px)."""
    model = load_model(MODEL)
    batches = [
        ImageFiles(paths, Preprocessing.default(32), search=False) for paths in paths_per_batch
    ]
    data = [torch.stack([b[i][0] for i in range(len(b))]) for b in batches]
    return PatternFitter(model).fit(data)


def _same(a, b):
    assert set(a) == set(b)
    for name in a:
        assert a[name].n_samples == b[name].n_samples
        assert torch.allclose(a[name].pattern("relu"), b[name].pattern("relu"), atol=1e-5), name


def test_fit_skips_a_truncated_image_with_a_warning_naming_it(folder, tmp_path, capsys):
    _truncate(folder / "5.png")
    out = tmp_path / "p.safetensors"
    with pytest.warns(UserWarning, match=r"skipped .*5\.png: cannot read this image"):
        assert main(_fit(folder, out)) == 0
    assert "skipped 1 unreadable image(s)" in capsys.readouterr().err
    files = [folder / f"{i}.png" for i in range(10)]
    expected = _reference([files[0:4], [files[4], *files[6:8]], files[8:10]])
    _same(Patterns.load(out), expected)


def test_on_bad_image_error_names_the_file_before_the_fit(folder, tmp_path, capsys, monkeypatch):
    (folder / "3.png").write_text("not an image")
    loaded = []
    monkeypatch.setattr(images_module, "load_model", lambda *a: loaded.append(a))
    out = tmp_path / "p.safetensors"
    assert main(_fit(folder, out, "--on-bad-image", "error")) == 2
    err = capsys.readouterr().err
    assert "3.png: cannot read this image" in err and "--on-bad-image skip" in err
    assert not loaded and not out.exists()  # before the model is even loaded


def test_on_bad_image_error_finds_a_truncated_jpeg_before_the_fit(folder, tmp_path, capsys):
    Image.new("RGB", (40, 40), (200, 10, 10)).save(folder / "9.jpg", quality=90)
    _truncate(folder / "9.jpg")
    out = tmp_path / "p.safetensors"
    assert main(_fit(folder, out, "--on-bad-image", "error")) == 2
    assert "9.jpg: cannot read this image" in capsys.readouterr().err
    assert not out.exists() and not Path(f"{out}.checkpoint").exists()


def test_on_bad_image_error_during_the_fit_keeps_the_checkpoint_and_resume_continues(
    folder, tmp_path, capsys, monkeypatch
):
    # damage that only decoding shows (the header check passed): the fit stops and names it
    original = images_module.read_image

    def damaged_9(path):
        if path.name == "9.png" and path.exists():
            raise UnreadableImageError(path, "OSError: broken data stream")
        return original(path)

    monkeypatch.setattr(images_module, "read_image", damaged_9)
    out, checkpoint = tmp_path / "p.safetensors", tmp_path / "fit.ckpt"
    args = _fit(folder, out, "--on-bad-image", "error", "--checkpoint", str(checkpoint),
                "--checkpoint-every", "1")  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "9.png: cannot read this image" in err and "--resume" in err
    assert checkpoint.exists() and not out.exists()
    (folder / "9.png").unlink()  # the user removes it and continues
    assert main([*args, "--resume"]) == 0
    assert "1 image(s) removed since the checkpoint are left out (9.png)" in capsys.readouterr().out
    files = [folder / f"{i}.png" for i in range(9)]
    _same(Patterns.load(out), _reference([files[0:4], files[4:8], files[8:9]]))


def test_resume_tolerates_images_removed_since(folder, tmp_path, monkeypatch, capsys):
    out, checkpoint = tmp_path / "p.safetensors", tmp_path / "fit.ckpt"
    stop_reading_at(monkeypatch, 8)  # in batch 2
    args = _fit(folder, out, "--checkpoint", str(checkpoint), "--checkpoint-every", "1")
    assert main(args) == 130
    read_normally(monkeypatch)
    files = [folder / f"{i}.png" for i in range(10)]
    expected = _reference([files[0:4], files[4:8], files[8:9]])
    (folder / "2.png").unlink()  # already counted in the checkpoint
    (folder / "9.png").unlink()  # not read yet
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main([*args, "--resume"]) == 0
    assert "2 image(s) removed since the checkpoint are left out (2.png, 9.png)" in (
        capsys.readouterr().out
    )
    assert any("9.png" in str(w.message) for w in caught)
    _same(Patterns.load(out), expected)


def test_resume_refuses_images_added_since(folder, tmp_path, monkeypatch, capsys):
    out, checkpoint = tmp_path / "p.safetensors", tmp_path / "fit.ckpt"
    original = ImageFiles.__getitem__
    monkeypatch.setattr(
        ImageFiles,
        "__getitem__",
        lambda self, i: (_ for _ in ()).throw(KeyboardInterrupt) if i >= 8 else original(self, i),
    )
    args = _fit(folder, out, "--checkpoint", str(checkpoint), "--checkpoint-every", "1")
    assert main(args) == 130
    Image.new("RGB", (40, 40)).save(folder / "new.png")
    assert main([*args, "--resume"]) == 2
    assert "1 image(s) were added since the checkpoint" in capsys.readouterr().err
    assert checkpoint.exists()


@pytest.mark.parametrize(
    "damage",
    [
        "[" * 100_000 + "]" * 100_000,
        "[1, 2]",
        '{"images": 7}',
        '{"images": [], "dropped_batches": [-1]}',
    ],
    ids=["deep", "not-an-object", "images-not-a-list", "negative-batch"],
)
def test_a_damaged_resume_record_is_refused_by_name(folder, tmp_path, monkeypatch, capsys, damage):
    out, checkpoint = tmp_path / "p.safetensors", tmp_path / "fit.ckpt"
    stop_reading_at(monkeypatch, 8)
    args = _fit(folder, out, "--checkpoint", str(checkpoint), "--checkpoint-every", "1")
    assert main(args) == 130
    read_normally(monkeypatch)
    record = tmp_path / "fit.ckpt.json"
    assert record.exists()  # the batch plan beside the checkpoint
    record.write_text(damage)
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"cannot resume: {record} is damaged" in err and "Traceback" not in err


def test_an_all_bad_batch_is_dropped_and_a_resume_finds_the_right_batch(
    folder, tmp_path, monkeypatch
):
    for i in range(4, 8):  # the whole second batch
        _truncate(folder / f"{i}.png")
    out, checkpoint = tmp_path / "p.safetensors", tmp_path / "fit.ckpt"
    stop_reading_at(monkeypatch, 8)  # in the last batch
    args = _fit(folder, out, "--checkpoint", str(checkpoint), "--checkpoint-every", "1")
    with pytest.warns(UserWarning):
        assert main(args) == 130
    read_normally(monkeypatch)
    assert main([*args, "--resume"]) == 0  # one batch done, then the dropped one: go on at 8
    files = [folder / f"{i}.png" for i in range(10)]
    _same(Patterns.load(out), _reference([files[0:4], files[8:10]]))


def test_explain_writes_every_good_figure_each_as_soon_as_it_is_done(
    folder, tmp_path, capsys, monkeypatch
):
    fitted = tmp_path / "p.safetensors"
    assert main(_fit(folder, fitted)) == 0
    _truncate(folder / "4.png")
    out = tmp_path / "figures"
    original = images_module.read_image
    seen_before: dict[str, int] = {}

    def read_image(path):
        seen_before[path.name] = len(list(out.glob("*.png")))
        return original(path)

    monkeypatch.setattr(images_module, "read_image", read_image)
    args = ["explain", MODEL, str(folder), "--patterns", str(fitted), "--image-size", "32",
            "--batch-size", "3", "--methods", "PatternNet", "--out", str(out)]  # fmt: skip
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "4.png: cannot read this image" in err and "the 9 figure(s) of the others" in err
    assert len(list(out.glob("*.png"))) == 9
    assert seen_before["3.png"] == 3 and seen_before["9.png"] == 8  # earlier chunks already drawn


def test_fit_refuses_unusable_outputs_before_any_work(folder, tmp_path, capsys, monkeypatch):
    loaded = []
    monkeypatch.setattr(images_module, "load_model", lambda *a: loaded.append(a))
    (tmp_path / "existing").mkdir()
    assert main(_fit(folder, tmp_path / "existing")) == 2
    assert "is a folder" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    assert main(_fit(folder, tmp_path / "a_file" / "p.safetensors")) == 2
    assert "cannot write --out" in capsys.readouterr().err
    checkpoint = tmp_path / "a_file" / "c.ckpt"
    assert main(_fit(folder, tmp_path / "p.safetensors", "--checkpoint", str(checkpoint))) == 2
    assert "cannot write --checkpoint" in capsys.readouterr().err
    args = ["explain", MODEL, str(folder), "--patterns", "x", "--out", str(tmp_path / "a_file")]
    assert main(args) == 2
    assert "is a file; give a folder" in capsys.readouterr().err
    assert not loaded


@pytest.mark.parametrize(
    "argv",
    [
        ["fit", MODEL, "imgs", "--batch-size", "0"],
        ["fit", MODEL, "imgs", "--batch-size", "-3"],
        ["fit", MODEL, "imgs", "--batch-size", "2.5"],
        ["fit", MODEL, "imgs", "--max-batches", "0"],
        ["fit", MODEL, "imgs", "--workers", "-1"],
        ["fit", MODEL, "imgs", "--checkpoint-every", "-1"],
        ["fit", MODEL, "imgs", "--image-size", "0"],
        ["fit", MODEL, "imgs", "--resize", "0"],
        ["fit", MODEL, "imgs", "--num-classes", "0"],
        ["explain", MODEL, "a.png", "--patterns", "p", "--batch-size", "0"],
        ["explain", MODEL, "a.png", "--patterns", "p", "--target", "-1"],
        ["demo", "--epochs", "0"],
        ["demo", "--images", "0"],
        ["demo", "--size", "4"],
        ["demo", "--threads", "-2"],
    ],
    ids=lambda argv: " ".join(argv[3:] if argv[0] != "demo" else argv[1:]),
)
def test_bad_numbers_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "must be at least" in err or "is not a whole number" in err


def _classifier():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"steps": 0}, "steps must be a whole number >= 1"),
        ({"steps": -1}, "steps must be a whole number >= 1"),
        ({"patch_size": 0}, "patch_size must be a whole number >= 1"),
        ({"patch_size": 2.5}, "patch_size must be a whole number >= 1"),
        ({"patch_size": 9}, "patch_size 9 does not fit in 8×8 images"),
    ],
)
def test_patch_degradation_refuses_impossible_sizes(kwargs, match):
    images = torch.rand(2, 1, 8, 8)
    with pytest.raises(InvalidInputError, match=match):
        patch_degradation(_classifier(), images, images, **kwargs)


@pytest.mark.parametrize(
    "heat,match",
    [
        (lambda h: h.index_fill(0, torch.tensor([1]), float("nan")), r"image\(s\) \[1\] hold NaN"),
        (lambda h: h.index_fill(0, torch.tensor([0]), float("inf")), r"image\(s\) \[0\] hold NaN"),
        (lambda h: h[:1], r"attributions of shape \(1, 1, 8, 8\) do not match"),
        (lambda h: h.to(torch.complex64), "give real values"),
    ],
    ids=["nan", "inf", "one-image", "complex"],
)
def test_patch_degradation_refuses_attributions_without_an_order(heat, match):
    images = torch.rand(2, 1, 8, 8)
    with pytest.raises(InvalidInputError, match=match):
        patch_degradation(_classifier(), images, heat(images.clone()), patch_size=2, steps=3)


def test_patch_degradation_defaults_scale_with_the_image():
    images = torch.rand(2, 1, 8, 8)
    result = patch_degradation(_classifier(), images, images)
    assert result.patch_size == 1 and result.curves.shape == (2, 65)  # 64 patches, not one
    big = patch_degradation(
        _classifier_224(), torch.rand(1, 1, 224, 224), torch.rand(1, 1, 224, 224)
    )
    assert big.patch_size == 9 and big.curves.shape == (1, 101)  # the paper's setting
    with pytest.warns(UserWarning, match="only 16 patches"):
        cut = patch_degradation(_classifier(), images, images, patch_size=2, steps=50)
    assert cut.curves.shape == (2, 17)


def _classifier_224():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(16, 3)
    )


def test_interpolation_is_checked_without_importing_torchvision_otherwise(capsys):
    from captum_pattern.cli import build_parser

    args = build_parser().parse_args(["fit", MODEL, "imgs", "--interpolation", "BICUBIC"])
    assert args.interpolation == "bicubic"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["fit", MODEL, "imgs", "--interpolation", "cubic"])
    assert "choose from nearest, bilinear, bicubic" in capsys.readouterr().err


def test_a_huge_resume_count_ends_instead_of_running_for_ever():
    data = torch.utils.data.TensorDataset(torch.arange(10.0))
    batches = list(ResumableBatches(data, batch_size=4, skip=10**12))  # a damaged count
    assert len(batches) == 3  # at most the data's own batches: the fitter then refuses the count
