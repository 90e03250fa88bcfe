"""Fuzzing: random small architectures and data, random and damaged pattern files.

The fast part runs in CI (hypothesis' default profile here: a dozen examples
each); ``HYPOTHESIS_PROFILE=thorough pytest tests/test_fuzz.py`` runs hundreds.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from captum_pattern import (
    PatternAttribution,
    PatternError,
    PatternFileError,
    PatternFitter,
    PatternNet,
    Patterns,
)
from models import folded_weight, linear_layers
from reference import reference_backward, reference_layer_patterns

THOROUGH = os.environ.get("HYPOTHESIS_PROFILE") == "thorough"
FUZZ = settings(
    max_examples=300 if THOROUGH else 12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ATTRS = {"relu": "a_plus", "relu_negative": "a_minus", "linear": "a_linear"}


class ConvBlock(nn.Module):
    def __init__(self, conv, bn, act, pool):
        super().__init__()
        self.conv, self.bn, self.act, self.pool = conv, bn, act, pool

    def forward(self, x):
        y = self.conv(x)
        if self.bn is not None:
            y = self.bn(y)
        y = F.relu(y) if self.act == "functional" else self.act(y)
        return y if self.pool is None else self.pool(y)


class Branch(nn.Module):
    def __init__(self, a, b, mode):
        super().__init__()
        self.a, self.b, self.mode, self.relu = a, b, mode, nn.ReLU()

    def forward(self, x):
        u, v = self.a(x), self.b(x)
        return self.relu(u + v) if self.mode == "add" else torch.cat([self.relu(u), v], dim=1)


class FuzzNet(nn.Module):
    def __init__(self, blocks, head):
        super().__init__()
        self.blocks, self.head = nn.Sequential(*blocks), head

    def forward(self, x):
        return self.head(torch.flatten(self.blocks(x), 1))


@st.composite
def architectures(draw):
    channels = draw(st.integers(1, 3))
    size = draw(st.integers(4, 8))
    input_shape = (channels, size)
    blocks = []
    for _ in range(draw(st.integers(1, 2))):
        kind = draw(st.sampled_from(["conv", "conv", "branch"]))
        out = draw(st.integers(1, 4))
        if kind == "conv":
            k = draw(st.integers(1, 3))
            stride = draw(st.integers(1, 2))
            padding = draw(st.sampled_from([0, 1] + (["same"] if stride == 1 else [])))
            groups = draw(st.sampled_from([g for g in (1, 2) if channels % g == 0]))
            out = out * groups
            mode = draw(st.sampled_from(["zeros", "zeros", "reflect"])) if padding else "zeros"
            if mode == "reflect" and (padding == "same" or size <= 1):
                mode = "zeros"
            conv = nn.Conv2d(channels, out, k, stride, padding, groups=groups, padding_mode=mode)
            bn = nn.BatchNorm2d(out) if draw(st.booleans()) else None
            act = draw(st.sampled_from(["functional", "module", "inplace"]))
            act = {"module": nn.ReLU(), "inplace": nn.ReLU(inplace=True)}.get(act, act)
            pool = draw(st.sampled_from([None, nn.MaxPool2d(2), nn.AvgPool2d(2)]))
            block = ConvBlock(conv, bn, act, pool)
        else:
            a = ConvBlock(nn.Conv2d(channels, out, 3, padding=1), None, "functional", None)
            b_conv = nn.Conv2d(channels, out, 1)
            b = nn.Sequential(b_conv, nn.BatchNorm2d(out)) if draw(st.booleans()) else b_conv
            block = Branch(a, b, draw(st.sampled_from(["add", "cat"])))
        try:
            with torch.no_grad():
                shape = block.eval()(torch.zeros(1, channels, size, size)).shape
        except RuntimeError:  # e.g. pooling a 1x1 map: this block does not fit, stop here
            break
        blocks.append(block)
        channels, size = shape[1], shape[-1]
    hidden = draw(st.integers(2, 6))
    features = channels * size * size
    head = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, 3))
    model = FuzzNet(blocks, head).double().eval()
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5, generator=generator)
            m.running_var.uniform_(0.5, 2.0, generator=generator)
            m.weight.data.uniform_(0.5, 1.5, generator=generator)
    return model, input_shape


def _expected_folds(model: FuzzNet) -> dict[str, str]:
    """The folds read off the architecture: a BatchNorm applied straight to a conv's output.

    A ``ConvBlock`` computes ``bn(conv(x))``; a ``Branch`` side ``b`` may be
    ``Sequential(conv, bn)``.  Nothing else has a BatchNorm.
    """
    folds = {}
    for name, m in model.named_modules():
        if isinstance(m, ConvBlock) and m.bn is not None:
            folds[f"{name}.conv"] = f"{name}.bn"
        elif isinstance(m, nn.Sequential) and len(m) == 2 and isinstance(m[1], nn.BatchNorm2d):
            folds[f"{name}.0"] = f"{name}.1"
    return folds


def _recorded_inputs(model, batches, names):
    """Each layer's inputs over the batches, recorded with plain hooks."""
    seen = {n: [] for n in names}
    handles = [
        model.get_submodule(n).register_forward_hook(
            lambda m, i, o, n=n: seen[n].append(i[0].detach())
        )
        for n in names
    ]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in handles:
        h.remove()
    return seen


def _folded_copy(model, name, folds):
    layer = model.get_submodule(name)
    if name not in folds:
        return layer
    bn = model.get_submodule(folds[name])
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = type(layer)(
        layer.in_channels,
        layer.out_channels,
        layer.kernel_size,
        layer.stride,
        layer.padding,
        layer.dilation,
        layer.groups,
        padding_mode=layer.padding_mode,
    ).double()
    with torch.no_grad():
        fused.weight.copy_(folded_weight(model, name, folds))
        bias = layer.bias if layer.bias is not None else torch.zeros_like(scale)
        fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return fused


@FUZZ
@given(arch=architectures(), seed=st.integers(0, 2**16))
def test_random_architectures_fit_and_attribute_like_the_reference(arch, seed):
    model, (channels, size) = arch
    generator = torch.Generator().manual_seed(seed)
    batches = [
        torch.randn(3, channels, size, size, generator=generator, dtype=torch.float64)
        for _ in range(2)
    ]
    patterns = PatternFitter(model).fit(batches)
    folds = _expected_folds(model)
    assert patterns.folds == folds
    assert set(patterns) == set(linear_layers(model))
    recorded = _recorded_inputs(model, batches, list(patterns))
    for name, lp in patterns.items():
        ref = reference_layer_patterns(_folded_copy(model, name, folds), recorded[name])
        for kind, attr in ATTRS.items():
            got = getattr(lp, attr).reshape(ref[kind].shape[0], -1).numpy()
            assert np.isfinite(got).all()
            for j in range(got.shape[0]):
                scale = np.abs(ref[kind][j]).max()
                if lp.zero[kind][j] or not 0 < scale < 1e6:
                    continue  # undefined (or ill-conditioned) neuron
                assert np.allclose(got[j], ref[kind][j], rtol=1e-6, atol=1e-9 * scale), (
                    name,
                    kind,
                    j,
                )
    x = batches[0]
    for method, weighted in ((PatternNet, False), (PatternAttribution, True)):
        got = method(model, patterns).attribute(x, target=[0, 1, 2])
        assert torch.isfinite(got).all()
        subs = {
            n: (folded_weight(model, n, folds) * lp.a_plus if weighted else lp.a_plus)
            for n, lp in patterns.items()
        }
        (ref,) = reference_backward(model, subs, folds, (x,), lambda o: o[range(3), range(3)])
        assert torch.allclose(got, ref, rtol=1e-8, atol=1e-10 * ref.abs().max())


@pytest.fixture(scope="module")
def valid_file(tmp_path_factory):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))
    path = tmp_path_factory.mktemp("files") / "p.safetensors"
    PatternFitter(model).fit([torch.randn(4, 1, 4, 4)]).save(path)
    return model, path.read_bytes()


@FUZZ
@given(data=st.binary(min_size=0, max_size=512))
def test_random_bytes_are_a_clean_error(data, tmp_path_factory):
    path = tmp_path_factory.mktemp("bytes") / "random.safetensors"
    path.write_bytes(data)
    with pytest.raises(PatternFileError):
        Patterns.load(path)


@settings(FUZZ, max_examples=600 if THOROUGH else 40)
@given(
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4)
)
def test_damaged_files_load_correctly_or_fail_cleanly(valid_file, flips, tmp_path_factory):
    model, original = valid_file
    data = bytearray(original)
    for position, xor in flips:
        data[position % len(data)] ^= xor
    path = tmp_path_factory.mktemp("damaged") / "p.safetensors"
    path.write_bytes(bytes(data))
    try:
        patterns = Patterns.load(path, model=model)
    except PatternError:
        return  # a clear, typed error
    for lp in patterns.values():
        for attr in ATTRS.values():
            value = getattr(lp, attr)
            assert value is None or torch.isfinite(value).all()
