"""Every torchvision classification family, at small size with random weights (issue 13).

Each row of the "supported architectures" table in ``docs/method.md`` is one
case here: the model is fitted (or refused, naming what it runs), the
activation regimes the fitter found are checked against what the
architecture is known to use, and for the supported ones the weights-as-patterns
invariant holds: PatternNet with ``a = w`` (and ``start_from="one"``) is
Captum's gradient.  The large models are marked slow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torchvision.models as tvm
from captum.attr import Saliency
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from captum_pattern import PatternFitter, PatternNet, UnsupportedModelError
from captum_pattern.canonize import batchnorm_scale, folded_parameters


@dataclass(frozen=True)
class Case:
    build: Callable[[], nn.Module]
    size: int
    status: str  # "exact", "per-regime" or "refused"
    activations: frozenset[str] = frozenset({"relu"})  # the regimes the fitter must find
    refused_for: tuple[str, ...] = ()  # the functions a refusal must name
    slow: bool = False


def _vit() -> nn.Module:
    return tvm.VisionTransformer(
        image_size=32,
        patch_size=16,
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=32,
        num_classes=10,
    )


def _swin() -> nn.Module:
    return tvm.SwinTransformer(
        patch_size=[4, 4],
        embed_dim=8,
        depths=[1, 1],
        num_heads=[1, 1],
        window_size=[2, 2],
        num_classes=10,
    )


def _maxvit() -> nn.Module:
    from torchvision.models.maxvit import MaxVit

    return MaxVit(
        input_size=(32, 32),
        stem_channels=8,
        partition_size=2,
        block_channels=[8],
        block_layers=[1],
        head_dim=4,
        stochastic_depth_prob=0.0,
        num_classes=10,
    )


CASES: dict[str, Case] = {
    "AlexNet": Case(lambda: tvm.alexnet(num_classes=10), 64, "exact", slow=True),
    "VGG-11-BN": Case(lambda: tvm.vgg11_bn(num_classes=10), 32, "exact", slow=True),
    "ResNet-18": Case(lambda: tvm.resnet18(num_classes=10), 32, "exact"),
    "ResNeXt-50": Case(lambda: tvm.resnext50_32x4d(num_classes=10), 32, "exact", slow=True),
    "Wide ResNet-50": Case(lambda: tvm.wide_resnet50_2(num_classes=10), 32, "exact", slow=True),
    "DenseNet-121": Case(lambda: tvm.densenet121(num_classes=10), 32, "exact", slow=True),
    "GoogLeNet": Case(
        lambda: tvm.googlenet(num_classes=10, aux_logits=False, init_weights=True),
        32,
        "exact",
        slow=True,
    ),
    "Inception-v3": Case(
        lambda: tvm.inception_v3(num_classes=10, aux_logits=False, init_weights=True),
        75,
        "exact",
        slow=True,
    ),
    "MobileNetV2": Case(
        lambda: tvm.mobilenet_v2(num_classes=10),
        32,
        "per-regime",
        frozenset({"relu", "hardtanh"}),
    ),
    "MNASNet": Case(lambda: tvm.mnasnet0_5(num_classes=10), 32, "exact"),
    "ShuffleNetV2": Case(lambda: tvm.shufflenet_v2_x0_5(num_classes=10), 32, "exact"),
    "SqueezeNet": Case(lambda: tvm.squeezenet1_1(num_classes=10), 32, "exact"),
    "RegNetX": Case(lambda: tvm.regnet_x_400mf(num_classes=10), 32, "exact", slow=True),
    "MobileNetV3": Case(
        lambda: tvm.mobilenet_v3_small(num_classes=10),
        32,
        "refused",
        refused_for=("hardswish", "hardsigmoid"),
    ),
    "RegNetY": Case(
        lambda: tvm.regnet_y_400mf(num_classes=10),
        32,
        "refused",
        refused_for=("sigmoid",),
        slow=True,
    ),
    "EfficientNet": Case(
        lambda: tvm.efficientnet_b0(num_classes=10),
        32,
        "refused",
        refused_for=("silu",),
    ),
    "ConvNeXt": Case(
        lambda: tvm.convnext_tiny(num_classes=10),
        32,
        "refused",
        refused_for=("layer_norm", "gelu"),
        slow=True,
    ),
    "ViT": Case(_vit, 32, "refused", refused_for=("layer_norm", "gelu")),
    "Swin": Case(_swin, 32, "refused", refused_for=("layer_norm", "gelu", "softmax")),
    "MaxViT": Case(_maxvit, 32, "refused", refused_for=("gelu", "layer_norm", "softmax")),
}


def _params() -> list:
    return [
        pytest.param(name, marks=[pytest.mark.slow] if case.slow else [], id=name)
        for name, case in CASES.items()
    ]


def _model(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    case = CASES[name]
    model = case.build().eval().double()
    for m in model.modules():  # BatchNorm statistics that are not the identity
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model, torch.randn(2, 3, case.size, case.size, dtype=torch.float64)


@pytest.mark.parametrize("name", _params())
def test_every_family_is_fitted_as_the_table_says_or_refused_naming_why(name):
    case = CASES[name]
    model, x = _model(name)
    if case.status == "refused":
        with pytest.raises(UnsupportedModelError) as info:
            PatternFitter(model, ["relu"]).fit([x])
        for function in case.refused_for:
            assert function in str(info.value)
        assert "approximate='gradient'" in str(info.value)
        return
    patterns = PatternFitter(model, ["relu"]).fit([x])
    found = {r["activation"] for r in patterns.settings["activations"].values()}
    assert found == case.activations
    weights = patterns  # the weights themselves as patterns; standalone BatchNorms their scale
    for layer_name in weights:
        bn = patterns.folds.get(layer_name)
        layer = model.get_submodule(layer_name)
        weight, _ = folded_parameters(layer, model.get_submodule(bn) if bn else None)
        weights[layer_name].a_plus = weight.clone()
    for module_name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and module_name not in patterns.folds.values():
            weights.affine[module_name] = batchnorm_scale(module)
    ours = PatternNet(model, weights, start_from="one").attribute(x, target=[3, 7])
    grad = Saliency(model).attribute(x.clone().requires_grad_(), target=[3, 7], abs=False)
    torch.testing.assert_close(ours, grad, rtol=1e-8, atol=1e-10)
