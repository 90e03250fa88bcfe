"""Image loading: every Pillow mode to RGB floats without losing range; the weights' transforms.

The expectations are computed from the raw pixel arrays the test wrote, not
through Pillow's conversions: ``k/255`` for 8-bit data, ``k/65535`` for 16-bit,
the palette looked up by hand, CMYK as ``(1 − c)(1 − k)``.
"""

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from captum_pattern.images import (
    Preprocessing,
    UnreadableImageError,
    image_paths,
    load_images,
    load_state_dict,
    preprocessing_for,
    read_image,
)

IDENTITY = Preprocessing(resize=None, crop=None, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
MODES = ("1", "L", "P", "RGB", "RGBA", "CMYK", "LA", "I;16", "I", "F")


def _write(mode: str, size: tuple[int, int], rng: np.random.Generator, wide: bool, folder: Path):
    """Write an image of ``mode`` and return (path, expected (3, H, W) float64 in [0, 1])."""
    h, w = size
    if mode == "1":
        bits = rng.random((h, w)) < 0.5
        image, expected = Image.fromarray(bits), np.repeat(bits[None] * 1.0, 3, 0)
    elif mode == "L":
        v = rng.integers(0, 256, (h, w), dtype=np.uint8)
        image, expected = Image.fromarray(v), np.repeat(v[None] / 255, 3, 0)
    elif mode == "P":
        palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
        index = rng.integers(0, 256, (h, w), dtype=np.uint8)
        image = Image.new("P", (w, h))
        image.putdata(index.ravel().tolist())
        image.putpalette(palette.ravel().tolist())
        expected = palette[index].transpose(2, 0, 1) / 255
    elif mode in ("RGB", "RGBA", "LA", "CMYK"):
        bands = len(mode)
        v = rng.integers(0, 256, (h, w, bands), dtype=np.uint8)
        image = Image.frombytes(mode, (w, h), v.tobytes())
        if mode == "CMYK":
            c, k = v[..., :3] / 255, v[..., 3:] / 255
            expected = ((1 - c) * (1 - k)).transpose(2, 0, 1)
        elif mode == "LA":
            expected = np.repeat(v[None, ..., 0] / 255, 3, 0)
        else:
            expected = v[..., :3].transpose(2, 0, 1) / 255
    elif mode == "I;16":
        v = rng.integers(0, 65536, (h, w), dtype=np.uint16)
        image, expected = Image.fromarray(v), np.repeat(v[None] / 65535, 3, 0)
    elif mode == "I":
        high = 2**31 - 1 if wide else 65535
        v = rng.integers(-high if wide else 0, high, (h, w), dtype=np.int64).astype(np.int32)
        image = Image.fromarray(v)
        if wide and (v.min() < 0 or v.max() > 65535):
            span = float(v.max()) - float(v.min())
            scaled = (v - float(v.min())) / span if span else np.clip(v, 0, 1) * 1.0
        else:
            scaled = v / 65535
        expected = np.repeat(scaled[None], 3, 0)
    else:  # "F"
        v = (rng.normal(0, 1000, (h, w)) if wide else rng.random((h, w))).astype(np.float32)
        image = Image.fromarray(v)
        v64 = v.astype(np.float64)
        if v64.min() < 0 or v64.max() > 1:
            span = v64.max() - v64.min()
            v64 = (v64 - v64.min()) / span if span else np.clip(v64, 0, 1)
        expected = np.repeat(v64[None], 3, 0)
    assert image.mode == mode
    path = folder / f"image.{'tiff' if mode in ('CMYK', 'I', 'F') else 'png'}"
    image.save(path)
    return path, expected


@settings(max_examples=80, deadline=None)
@given(
    mode=st.sampled_from(MODES),
    size=st.tuples(st.integers(1, 7), st.integers(1, 7)),
    seed=st.integers(0, 2**32 - 1),
    wide=st.booleans(),
)
def test_every_mode_becomes_rgb_floats_with_its_full_range(mode, size, seed, wide):
    with tempfile.TemporaryDirectory() as folder:
        path, expected = _write(mode, size, np.random.default_rng(seed), wide, Path(folder))
        normalised, shown = load_images([path], preprocessing=IDENTITY)
    assert shown.shape == (1, 3, *size) and shown.dtype == torch.float32
    assert torch.equal(normalised, shown)  # mean 0, std 1
    # 8-bit data: exact up to float32; CMYK: Pillow rounds each channel to a byte
    tolerance = 1 / 255 + 1e-6 if mode == "CMYK" else 1e-6
    np.testing.assert_allclose(shown[0].double().numpy(), expected, rtol=0, atol=tolerance)


def test_a_16_bit_png_keeps_its_range(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    x = read_image(tmp_path / "ramp.png")
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert len(torch.unique(x)) > 256  # more levels than 8 bits could hold
    assert float((x == 1.0).float().mean()) < 0.01  # not white (Pillow's convert("RGB") clips)


def test_a_float_tiff_is_scaled_from_min_to_max_unless_already_in_unit_range(tmp_path):
    unit = np.array([[0.1, 0.6]], dtype=np.float32)
    Image.fromarray(unit).save(tmp_path / "unit.tiff")
    np.testing.assert_allclose(read_image(tmp_path / "unit.tiff")[0].numpy(), unit)
    raw = np.array([[-20.0, 30.0, 80.0]], dtype=np.float32)
    Image.fromarray(raw).save(tmp_path / "raw.tiff")
    np.testing.assert_allclose(read_image(tmp_path / "raw.tiff")[1].numpy(), [[0.0, 0.5, 1.0]])
    Image.fromarray(np.array([[np.nan, 1.0]], dtype=np.float32)).save(tmp_path / "nan.tiff")
    with pytest.raises(UnreadableImageError, match="nan.tiff.*NaN"):
        read_image(tmp_path / "nan.tiff")


def test_truncated_and_fake_images_name_the_file(tmp_path):
    Image.new("RGB", (64, 64), (10, 200, 30)).save(tmp_path / "good.jpg", quality=95)
    data = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("not an image")
    for name in ("cut.jpg", "text.png", "missing.png"):
        with pytest.raises(UnreadableImageError, match=name) as caught:
            read_image(tmp_path / name)
        assert caught.value.path == tmp_path / name


def test_a_folder_named_like_an_image_is_searched_not_opened(tmp_path):
    (tmp_path / "album.png").mkdir()
    Image.new("L", (4, 4)).save(tmp_path / "album.png" / "inside.png")
    Image.new("L", (4, 4)).save(tmp_path / "top.png")
    assert image_paths([tmp_path]) == [tmp_path / "album.png" / "inside.png", tmp_path / "top.png"]


@pytest.mark.parametrize("name", ["resnet50", "efficientnet_b3", "vit_b_16"])
def test_torchvision_weights_bring_their_own_transforms(name):
    """Our steps with the weights' parameters give exactly what the weights' transforms give."""
    entry = torchvision.models.get_model_weights(name).DEFAULT
    ours = preprocessing_for(name)
    assert ours == Preprocessing.from_weights(entry)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 410, 3), np.uint8))
    assert torch.equal(ours(image), entry.transforms()(image))
    assert str(entry) in ours.source


def test_efficientnet_b3_is_bicubic_320_to_300_and_a_file_picks_its_entry(tmp_path):
    b3 = preprocessing_for("efficientnet_b3")
    assert (b3.resize, b3.crop, b3.interpolation) == (320, 300, "bicubic")
    v1 = preprocessing_for("resnet50", tmp_path / "resnet50-0676ba61.pth")  # the V1 file
    v2 = preprocessing_for("resnet50")
    assert (v1.resize, v2.resize) == (256, 232)
    unknown = preprocessing_for("resnet50", tmp_path / "my-finetune.pth")
    assert unknown == Preprocessing.default(224) and "default" in unknown.source
    factory = preprocessing_for("cli_models:tiny_resnet", crop=32)
    assert (factory.resize, factory.crop) == (37, 32)
    flags = preprocessing_for("resnet50", resize=300, crop=256, interpolation="bicubic")
    assert (flags.resize, flags.crop, flags.interpolation) == (300, 256, "bicubic")


def test_state_dict_prefixes_are_stripped_in_any_nesting(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    state = model.state_dict()
    for prefix in ("module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."):
        torch.save({prefix + k: v for k, v in state.items()}, tmp_path / "w.pth")
        assert list(load_state_dict(tmp_path / "w.pth")) == ["0.weight", "0.bias"]
    # a model whose own submodule is called "module" keeps its keys when not every key has it
    mixed = {"module.weight": state["0.weight"], "head.bias": state["0.bias"]}
    torch.save(mixed, tmp_path / "mixed.pth")
    assert list(load_state_dict(tmp_path / "mixed.pth")) == ["module.weight", "head.bias"]
