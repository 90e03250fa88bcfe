"""torchvision's VGG and ResNet models, random weights, small images: fit and explain end to end."""

import matplotlib.image
import numpy as np
import pytest
import torch
from captum.attr import Saliency
from PIL import Image

from captum_pattern import PatternAttribution, PatternFitter, PatternNet, Patterns
from captum_pattern.canonize import find_batchnorm_folds
from captum_pattern.cli import main
from captum_pattern.images import load_model, load_state_dict, torchvision_cache_file
from models import folded_weight, random_patterns


def _resnet18_folds():
    folds = {"conv1": "bn1"}
    for layer in range(1, 5):
        for block in range(2):
            prefix = f"layer{layer}.{block}"
            folds[f"{prefix}.conv1"] = f"{prefix}.bn1"
            folds[f"{prefix}.conv2"] = f"{prefix}.bn2"
        if layer > 1:
            folds[f"layer{layer}.0.downsample.0"] = f"layer{layer}.0.downsample.1"
    return folds


def test_resnet18_batchnorm_folded_and_residuals_followed():
    """With the folded weights as patterns, PatternNet is exactly the gradient (start from 1)."""
    model = load_model("resnet18", weights="random", num_classes=10).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert find_batchnorm_folds(model, lambda: model(x)) == _resnet18_folds()
    patterns = random_patterns(model, (x,), _resnet18_folds()).to(dtype=torch.float64)
    for name in patterns:
        patterns[name].a_plus = folded_weight(model, name, patterns.folds).clone()
    ours = PatternNet(model, patterns, start_from="one").attribute(x, target=[3, 7])
    grad = Saliency(model).attribute(x.clone().requires_grad_(), target=[3, 7], abs=False)
    assert torch.allclose(ours, grad, rtol=1e-9, atol=1e-12)


def test_resnet18_fit_and_attribute_leave_the_model_as_it_was():
    model = load_model("resnet18", weights="random", num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    patterns = PatternFitter(model, ["relu"]).fit([torch.randn(4, 3, 32, 32)])
    assert patterns.folds == _resnet18_folds()
    x = torch.randn(2, 3, 32, 32)
    # a class whose random logit was positive on the fitting images (others get zero a₊)
    target = int(patterns["fc"].positive_fraction.argmax())
    heat = PatternAttribution(model, patterns).attribute(x, target=target)
    assert heat.shape == x.shape and torch.isfinite(heat).all() and heat.abs().sum() > 0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_weights_from_torchvision_cache_and_files(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_model("resnet18")
    with pytest.raises(ValueError, match="did you mean resnet18"):
        load_model("resnet81")
    reference = load_model("resnet18", weights="random", seed=3)
    cached = torchvision_cache_file("resnet18")
    assert cached.parent == tmp_path / "hub" / "checkpoints"
    cached.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), cached)
    from_cache = load_model("resnet18")
    assert torch.equal(from_cache.fc.weight, reference.fc.weight)
    assert not torch.equal(load_model("resnet18", weights="random").fc.weight, reference.fc.weight)
    wrapped = tmp_path / "checkpoint.pth"
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, wrapped
    )
    assert load_state_dict(wrapped).keys() == reference.state_dict().keys()
    assert torch.equal(load_model("resnet18", weights=wrapped).conv1.weight, reference.conv1.weight)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg16", "vgg19", "resnet18", "resnet50"])
def test_command_line_end_to_end(name, tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images" / "class_a"
    folder.mkdir(parents=True)
    for i in range(3):
        pixels = rng.integers(0, 256, (40, 44, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.jpg")
    model_args = [name, "--weights", "random", "--num-classes", "10", "--image-size", "32"]
    out = tmp_path / f"{name}.patterns.safetensors"
    fit = ["fit", *model_args, str(tmp_path / "images"), "--out", str(out), "--batch-size", "2"]
    assert main([*fit, "--workers", "0", "--pattern-types", "relu", "--no-progress"]) == 0
    model = load_model(name, weights="random", num_classes=10)
    patterns = Patterns.load(out, model=model)
    assert patterns["fc" if name.startswith("resnet") else "classifier.6"].n_samples == 3
    if name.startswith("resnet"):
        assert len(patterns.folds) == sum(
            isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()
        )
    methods = ["PatternNet", "PatternAttribution", "Saliency", "Guided BackProp"]
    explain = ["explain", *model_args, str(folder), "--patterns", str(out), "--methods", *methods]
    assert main([*explain, "--out", str(tmp_path / "figures"), "--precision", "float64"]) == 0
    figures = sorted((tmp_path / "figures").glob("*.png"))
    assert len(figures) == 3
    assert matplotlib.image.imread(figures[0]).ndim == 3
    # 3 images: explain a class whose output was positive for one of them (a₊ is not zero)
    last = patterns["fc" if name.startswith("resnet") else "classifier.6"]
    target = int(last.positive_fraction.argmax())
    assert last.positive_fraction[target] > 0
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    signal = PatternNet(model.double(), patterns.to(dtype=torch.float64)).attribute(x, target)
    assert torch.isfinite(signal).all() and signal.abs().sum() > 0
