"""The theory carried through (issue 13): folds by data flow, activation regimes, refusals.

References here decide from first principles: which BatchNorm may be folded is
written out per model by hand, and the per-regime patterns are computed from
explicit samples with the formula of ``docs/method.md``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import Saliency
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from captum_pattern import (
    PatternAttribution,
    PatternFitter,
    PatternMismatchError,
    PatternNet,
    UnsupportedModelError,
)
from captum_pattern.activations import Regimes, inspect_forward
from captum_pattern.canonize import find_batchnorm_folds
from captum_pattern.tap import explained_layers


def _bn(n: int, dims: int = 2) -> nn.Module:
    bn = (nn.BatchNorm1d, nn.BatchNorm2d)[dims - 1](n)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.3, 0.3)
    return bn


class PreActivationResidual(nn.Module):
    """``out = conv(h); out += skip; bn(out)`` (or ``out = conv(h) + skip``)."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.inplace = inplace
        self.conv0, self.conv1 = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.bn, self.fc = _bn(4), nn.Linear(4 * 36, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = F.relu(self.conv0(x))
        out = self.conv1(skip)
        if self.inplace:
            out += skip
        else:
            out = out + skip
        return self.fc(F.relu(self.bn(out)).flatten(1))


def _chain(between: str, inplace: bool) -> nn.Module:
    """Conv → (between) → BatchNorm → ReLU → Linear; ``between`` may be nothing."""
    ops = {
        "": [],
        "relu": [nn.ReLU(inplace=inplace)],
        "leaky": [nn.LeakyReLU(0.1, inplace=inplace)],
        "hardtanh": [nn.Hardtanh(-0.5, 0.5, inplace=inplace)],
        "dropout": [nn.Dropout(0.3, inplace=inplace)],
    }[between]
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3), *ops, _bn(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 3)
    ).eval()


# by hand: a BatchNorm may be folded only when it reads the conv's output unchanged
# (an eval-mode dropout changes nothing, in place or not)
FOLD_CASES = [
    ("", {"0": "1"}),
    ("relu", {}),
    ("leaky", {}),
    ("hardtanh", {}),
    ("dropout", {"0": "2"}),
]


@pytest.mark.parametrize(
    ("between", "expected"), FOLD_CASES, ids=[c[0] or "nothing" for c in FOLD_CASES]
)
@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "in-place"])
def test_folds_follow_data_flow_not_object_identity(between, expected, inplace):
    model = _chain(between, inplace)
    x = torch.randn(2, 2, 6, 6)
    assert find_batchnorm_folds(model, lambda: model(x.clone())) == expected


@pytest.mark.parametrize("inplace", [False, True])
def test_pre_activation_residual_is_never_folded(inplace):
    model = PreActivationResidual(inplace).eval()
    x = torch.randn(2, 2, 6, 6)
    assert find_batchnorm_folds(model, lambda: model(x.clone())) == {}


def _same_function_pair(between: str, seed: int) -> tuple[nn.Module, nn.Module]:
    a, b = _chain(between, False), _chain(between, True)
    b.load_state_dict(a.state_dict())
    return a, b


@settings(max_examples=10, deadline=None)
@given(
    between=st.sampled_from([c[0] for c in FOLD_CASES]),
    seed=st.integers(0, 2**16),
)
def test_in_place_and_out_of_place_give_the_same_patterns_and_explanations(between, seed):
    out_of_place, in_place = _same_function_pair(between, seed)
    gen = torch.Generator().manual_seed(seed)
    data = [torch.randn(16, 2, 6, 6, generator=gen, dtype=torch.float64) for _ in range(2)]
    out_of_place, in_place = out_of_place.double(), in_place.double()
    p, q = PatternFitter(out_of_place).fit(data), PatternFitter(in_place).fit(data)
    assert p.folds == q.folds
    for name in p:
        for attr in ("a_plus", "a_minus", "a_linear"):
            torch.testing.assert_close(getattr(p[name], attr), getattr(q[name], attr))
    x = torch.randn(3, 2, 6, 6, generator=gen, dtype=torch.float64)
    e = PatternNet(out_of_place, p).attribute(x, target=1)
    f = PatternNet(in_place, q).attribute(x.clone(), target=1)
    torch.testing.assert_close(e, f)


# ------------------------------------------------------------ activation regimes
class Functional(nn.Module):
    """Layers whose activations are written as functions and tensor methods."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.d, self.e = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.a(x), 0.2)
        x = self.b(x).clamp(0, 6)
        x = F.hardtanh(self.c(x), -2.0, 3.0)
        x = self.d(x).relu()
        return self.e(x)


REGIME_CASES = {
    "ReLU": (nn.ReLU(), Regimes()),
    "LeakyReLU": (nn.LeakyReLU(0.1), Regimes("leaky_relu", negative_slope=True)),
    "PReLU": (nn.PReLU(4), Regimes("prelu", negative_slope=True)),
    "ReLU6": (nn.ReLU6(), Regimes("hardtanh", 0.0, 6.0)),
    "Hardtanh": (nn.Hardtanh(-1.0, 2.0), Regimes("hardtanh", -1.0, 2.0)),
}


@pytest.mark.parametrize("kind", list(REGIME_CASES))
def test_the_activation_after_each_layer_is_found_from_what_runs(kind):
    act, expected = REGIME_CASES[kind]
    model = nn.Sequential(nn.Linear(3, 4), act, nn.Linear(4, 2))
    facts = inspect_forward(model, lambda: model(torch.randn(2, 3)), explained_layers(model), {})
    assert facts.regimes == {"0": expected, "2": Regimes()}  # no activation after '2'
    assert facts.smooth == []


def test_functional_activations_are_found_as_surely_as_modules():
    model = Functional()
    facts = inspect_forward(model, lambda: model(torch.randn(2, 3)), explained_layers(model), {})
    assert facts.regimes == {
        "a": Regimes("leaky_relu", negative_slope=True),
        "b": Regimes("clamp", 0.0, 6.0),
        "c": Regimes("hardtanh", -2.0, 3.0),
        "d": Regimes(),
        "e": Regimes(),
    }


def _regime_pattern(x: np.ndarray, w: np.ndarray, b: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``a_r = (E_r[xy] − E_r[x]E[y]) / wᵀ(...)`` from explicit samples, one neuron a row."""
    y = x @ w.T  # without the bias, as in the paper
    out = np.zeros_like(w)
    n = len(x)
    for j in range(w.shape[0]):
        m = mask[:, j]
        cov = (x[m] * y[m, j : j + 1]).sum(0) / n - x[m].sum(0) / n * y[:, j].mean()
        out[j] = cov / (w[j] @ cov)
    return out


@pytest.mark.parametrize("kind", ["ReLU6", "Hardtanh", "LeakyReLU"])
def test_each_regime_gets_the_pattern_of_its_own_samples(kind):
    act, regimes = REGIME_CASES[kind]
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), act, nn.Linear(4, 2)).double()
    x = torch.randn(4000, 3, dtype=torch.float64) * 4  # every regime well populated
    patterns = PatternFitter(model).fit(x.split(500))
    assert patterns.settings["activations"]["0"] == regimes.to_json()
    w, b = model[0].weight.detach().numpy(), model[0].bias.detach().numpy()
    z = x.numpy() @ w.T + b
    gate = regimes.gate(torch.from_numpy(z)).numpy()
    assert 0 < gate.mean() < 1 and (regimes.upper == math.inf or (z >= regimes.upper).any())
    a_plus = _regime_pattern(x.numpy(), w, b, gate)
    a_minus = _regime_pattern(x.numpy(), w, b, ~gate)
    np.testing.assert_allclose(patterns["0"].a_plus.numpy(), a_plus, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(patterns["0"].a_minus.numpy(), a_minus, rtol=1e-8, atol=1e-10)


# ------------------------------------------------------------ silent zeros
@pytest.mark.parametrize(
    "types",
    [("linear",), ("relu",), ("relu_negative",), ("linear", "relu_negative"), ("relu", "linear")],
)
def test_every_subset_of_pattern_types_fits_and_equals_the_full_fit(types):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 2))
    data = [torch.randn(8, 1, 4, 4, dtype=torch.float64) for _ in range(3)]
    model = model.double()
    full, part = PatternFitter(model).fit(data), PatternFitter(model, pattern_types=types).fit(data)
    for name in full:
        for kind in types:
            torch.testing.assert_close(part[name].pattern(kind), full[name].pattern(kind))
        torch.testing.assert_close(part[name].positive_fraction, full[name].positive_fraction)


def test_zero_patterns_are_reported_at_fit_with_the_output_classes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():
        model[2].bias[1] = -1e3  # class 1's logit is never positive on the data
    with pytest.warns(UserWarning, match=r"layer '2' \(relu\): 1 of 3 neurons — outputs 1 are"):
        patterns = PatternFitter(model).fit([torch.randn(100, 3)])
    assert patterns.settings["outputs"] == ["2"]
    assert patterns["2"].zero["relu"].tolist() == [False, True, False]


# ------------------------------------------------------------ explanations
def _weights_as_patterns(model: nn.Module, patterns) -> None:
    """Every pattern the weight itself (BatchNorm-folded), standalone BatchNorms their scale."""
    from captum_pattern.canonize import batchnorm_scale, folded_parameters

    for name in patterns:
        bn = patterns.folds.get(name)
        weight, _ = folded_parameters(
            model.get_submodule(name), model.get_submodule(bn) if bn else None
        )
        patterns[name].a_plus = weight.clone()
        patterns[name].a_minus = weight.clone()
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.modules.batchnorm._BatchNorm)
            and name not in patterns.folds.values()
        ):
            patterns.affine[name] = batchnorm_scale(module)


BLOCKS = {
    "relu": lambda c: [nn.ReLU()],
    "relu-inplace": lambda c: [nn.ReLU(inplace=True)],
    "leaky": lambda c: [nn.LeakyReLU(0.2)],
    "leaky-inplace": lambda c: [nn.LeakyReLU(0.2, inplace=True)],
    "prelu": lambda c: [nn.PReLU(c, init=0.3)],
    "relu6": lambda c: [nn.ReLU6()],
    "hardtanh": lambda c: [nn.Hardtanh(-1.0, 1.5)],
    "bn-relu": lambda c: [_bn(c), nn.ReLU()],  # folded
    "relu-bn": lambda c: [nn.ReLU(), _bn(c)],  # standalone
    "inplace-relu-bn": lambda c: [nn.ReLU(inplace=True), _bn(c)],  # standalone
    "leaky-bn-pool": lambda c: [nn.LeakyReLU(0.1), _bn(c), nn.MaxPool2d(2, ceil_mode=True)],
}


@settings(max_examples=15, deadline=None)
@given(
    blocks=st.lists(st.sampled_from(sorted(BLOCKS)), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_weights_as_patterns_give_the_gradient_through_every_supported_block(blocks, seed):
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    channels = 2
    for block in blocks:
        layers += [nn.Conv2d(channels, 3, 3, padding=1), *BLOCKS[block](3)]
        channels = 3
    model = nn.Sequential(*layers, nn.Flatten(), nn.LazyLinear(4)).double()
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    model(x)  # materialise the lazy layer
    model.eval()
    patterns = PatternFitter(model).fit([torch.randn(16, 2, 6, 6, dtype=torch.float64)])
    _weights_as_patterns(model, patterns)
    ours = PatternNet(model, patterns, start_from="one").attribute(x, target=[0, 3, 1])
    grad = Saliency(model).attribute(x.clone().requires_grad_(), target=[0, 3, 1], abs=False)
    torch.testing.assert_close(ours, grad, rtol=1e-9, atol=1e-12)


def test_leaky_relu_layers_back_project_with_the_pattern_of_each_samples_regime():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 5), nn.LeakyReLU(0.2), nn.Linear(5, 2)).double()
    data = torch.randn(2000, 3, dtype=torch.float64) * 2
    patterns = PatternFitter(model).fit(data.split(500))
    x = torch.randn(4, 3, dtype=torch.float64)
    signal = PatternNet(model, patterns).attribute(x, target=1).numpy()
    # by hand: y_c · a₂₊[c] through the LeakyReLU's slope, then a₁₊ or a₁₋ per neuron
    a1p, a1m = patterns["0"].a_plus.numpy(), patterns["0"].a_minus.numpy()
    a2 = patterns["2"].a_plus.numpy()
    with torch.no_grad():
        z1 = model[0](x).numpy()
        y = model(x)[:, 1].numpy()
    expected = np.zeros_like(signal)
    for i in range(len(x)):
        grad_h = y[i] * a2[1] * np.where(z1[i] > 0, 1.0, 0.2)
        for j in range(5):
            expected[i] += grad_h[j] * (a1p[j] if z1[i, j] > 0 else a1m[j])
    np.testing.assert_allclose(signal, expected, rtol=1e-10, atol=1e-12)
    assert not np.allclose(a1p, a1m)  # the two regimes' patterns do differ


def _merged(model: nn.Sequential, bn_index: int) -> nn.Sequential:
    """The same function with the BatchNorm at ``bn_index`` merged into the next Linear."""
    bn, nxt = model[bn_index], model[bn_index + 1]
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    merged = nn.Linear(nxt.in_features, nxt.out_features).double()
    with torch.no_grad():
        merged.weight.copy_(nxt.weight * scale)
        merged.bias.copy_(nxt.bias + nxt.weight @ shift)
    parts = list(model)
    return nn.Sequential(*parts[:bn_index], merged, *parts[bn_index + 2 :]).eval()


def _bn_model(where: str, shift: bool) -> tuple[nn.Sequential, int]:
    torch.manual_seed(4)
    if where == "after-relu":
        model = nn.Sequential(
            nn.Linear(4, 6), nn.ReLU(), _bn(6, 1), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)
        )
        bn_index = 2
    else:
        model = nn.Sequential(_bn(4, 1), nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
        bn_index = 0
    if not shift:  # z = s·x: running mean and bias zero
        with torch.no_grad():
            model[bn_index].running_mean.zero_()
            model[bn_index].bias.zero_()
    return model.double().eval(), bn_index


@pytest.mark.parametrize(
    ("where", "pattern_type", "shift"),
    [
        ("after-relu", "linear", True),
        ("at-the-input", "linear", True),
        ("after-relu", "relu", False),
        ("at-the-input", "relu", False),
    ],
)
def test_a_standalone_batchnorm_explains_as_if_merged_by_hand(where, pattern_type, shift):
    """Exact for S_a at every place; for S_a+- when the BatchNorm has no shift (below)."""
    model, bn_index = _bn_model(where, shift)
    merged = _merged(model, bn_index)
    data = [torch.randn(400, 4, dtype=torch.float64) * 2 for _ in range(2)]
    x = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(model(x), merged(x))  # the same function
    p, q = PatternFitter(model).fit(data), PatternFitter(merged).fit(data)
    target = int(p["5" if where == "after-relu" else "3"].positive_fraction.argmax())
    for method in (PatternNet, PatternAttribution):
        ours = method(model, p, pattern_type=pattern_type).attribute(x, target=target)
        by_hand = method(merged, q, pattern_type=pattern_type).attribute(x, target=target)
        assert ours.abs().sum() > 0
        torch.testing.assert_close(ours, by_hand, rtol=1e-8, atol=1e-10)


def test_a_shift_before_a_layer_changes_its_two_component_pattern():
    """The paper's S_a+- uses E[y] over all samples: a shift t of the layer's input adds
    t·(E₊[y] − P₊·E[y]) to the numerator, so merging a shifted BatchNorm by hand changes
    a₊ (S_a, a covariance, does not change: see the test above)."""
    model, bn_index = _bn_model("at-the-input", shift=True)
    merged = _merged(model, bn_index)
    data = [torch.randn(400, 4, dtype=torch.float64) * 2]
    p, q = PatternFitter(model).fit(data), PatternFitter(merged).fit(data)
    scale = (model[0].weight / torch.sqrt(model[0].running_var + model[0].eps)).detach()
    torch.testing.assert_close(p["1"].a_linear, q["0"].a_linear * scale)
    assert not torch.allclose(p["1"].a_plus, q["0"].a_plus * scale, rtol=1e-3)


def test_attribution_refuses_what_the_fit_refuses_unless_approximated():
    model = nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2))
    patterns = PatternFitter(model, approximate="gradient").fit([torch.randn(64, 3)])
    x = torch.randn(2, 3)
    # the fit's choice carries over: announced, not refused
    assert PatternNet(model, patterns).attribute(x, target=0).shape == x.shape
    patterns.settings.pop("approximate")  # e.g. patterns made by hand
    with pytest.raises(UnsupportedModelError, match=r"gelu in '1'"):
        PatternNet(model, patterns).attribute(x, target=0)
    explained = PatternNet(model, patterns, approximate="gradient").attribute(x, target=0)
    assert explained.shape == x.shape


def test_an_activation_changed_since_the_fit_is_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    patterns = PatternFitter(model).fit([torch.randn(64, 3)])
    model[1] = nn.LeakyReLU(0.1)
    with pytest.raises(PatternMismatchError, match="fitted with relu .* now runs leaky_relu"):
        PatternNet(model, patterns).attribute(torch.randn(2, 3), target=0)


def test_a_class_explained_by_zeros_warns_once():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():
        model[2].bias[1] = -1e3
    with pytest.warns(UserWarning, match="outputs 1 are"):
        patterns = PatternFitter(model).fit([torch.randn(100, 3)])
    with torch.no_grad():
        model[2].bias[1] = 0.0  # now class 1 is positive, but its pattern is zero
    pn = PatternNet(model, patterns)
    with pytest.warns(UserWarning, match=r"explanation of example \d is all zeros") as seen:
        pn.attribute(torch.randn(2, 3), target=1)
        pn.attribute(torch.randn(2, 3), target=1)
    assert len([w for w in seen if "all zeros" in str(w.message)]) == 1
