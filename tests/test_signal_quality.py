"""ρ (Eq. 1) in closed form against brute-force least squares on explicit residuals."""

import numpy as np
import pytest
import torch
from torch import nn

from captum_pattern import InvalidDataError, PatternFitter
from captum_pattern.datasets import linear_toy
from captum_pattern.metrics import ESTIMATORS, estimator_patterns, rho_means, signal_quality
from reference import layer_samples

LAYERS = {
    "linear": lambda: nn.Linear(5, 3),
    "conv2d": lambda: nn.Conv2d(2, 3, 3, padding=1),
    "conv2d-stride-groups-reflect": lambda: nn.Conv2d(
        4, 4, 3, stride=2, padding=1, groups=2, padding_mode="reflect"
    ),
    "conv1d-dilation": lambda: nn.Conv1d(2, 3, 3, dilation=2, padding=2),
    "conv2d-no-bias-valid": lambda: nn.Conv2d(2, 2, (2, 3), bias=False),
}


def _inputs(layer: nn.Module, n: int, generator: torch.Generator) -> torch.Tensor:
    """Correlated inputs with an offset, shaped for ``layer``."""
    if isinstance(layer, nn.Linear):
        shape = (n, layer.in_features)
    elif isinstance(layer, nn.Conv1d):
        shape = (n, layer.in_channels, 9)
    else:
        shape = (n, layer.in_channels, 5, 6)
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    mix = torch.randn(shape[1], shape[1], generator=generator, dtype=torch.float64)
    return torch.einsum("nc...,cd->nd...", x, mix) + 0.5


def brute_force_rho(
    layer: nn.Module, a_plus: np.ndarray, a_minus: np.ndarray, x2: torch.Tensor, x3: torch.Tensor
) -> np.ndarray:
    """Explicit residuals per sample, least squares for v on split 2, correlation on split 3."""
    bias = np.zeros(a_plus.shape[0]) if layer.bias is None else layer.bias.detach().numpy()
    out = []
    split = [layer_samples(layer, x) for x in (x2, x3)]
    for j in range(a_plus.shape[0]):
        residuals, targets = [], []
        for X, Z in split:
            x, z = X[:, j], Z[:, j]
            y = z - bias[j]
            g = (z > 0).astype(float)
            residuals.append(x - np.outer(y * g, a_plus[j]) - np.outer(y * (1 - g), a_minus[j]))
            targets.append(y)
        d2, d3 = residuals
        y2, y3 = targets
        v, *_ = np.linalg.lstsq(d2 - d2.mean(0), y2 - y2.mean(), rcond=None)
        out.append(1 - np.corrcoef(d3 @ v, y3)[0, 1])
    return np.array(out)


@pytest.mark.parametrize("positions", [None, 10**6], ids=["convolved", "gathered"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_closed_form_matches_brute_force(kind, positions):
    """Both split-3 paths: one convolution over every position, or gathered patch columns
    (``max_positions`` at least the number of positions: every patch, in another order)."""
    torch.manual_seed(0)
    layer = LAYERS[kind]().double()
    generator = torch.Generator().manual_seed(1)
    x1, x2, x3 = (_inputs(layer, n, generator) for n in (40, 30, 30))
    patterns = PatternFitter(layer).fit([x1])
    result = signal_quality(
        layer, patterns, [x2], [x3], ridge=1e-11, seed=5, max_positions=positions
    )
    weight = layer.weight.detach().reshape(layer.weight.shape[0], -1)
    draws = torch.Generator().manual_seed(5)  # the random estimator's draws, in order
    for estimator in ESTIMATORS:
        a_plus, a_minus = estimator_patterns(weight, patterns[""], estimator, draws)
        expected = brute_force_rho(layer, a_plus.numpy(), a_minus.numpy(), x2, x3)
        np.testing.assert_allclose(result[""][estimator].numpy(), expected, rtol=0, atol=1e-7)


def test_folded_batchnorm_uses_the_folded_layer():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(-2, 2)
        bn.bias.uniform_(-1, 1)
    model = nn.Sequential(conv, bn, nn.ReLU()).double().eval()
    generator = torch.Generator().manual_seed(1)
    x1, x2, x3 = (_inputs(conv, n, generator) for n in (40, 30, 30))
    patterns = PatternFitter(model).fit([x1])
    assert patterns.folds == {"0": "1"}
    result = signal_quality(model, patterns, [x2], [x3], estimators=["two_component"], ridge=1e-11)
    folded = nn.Conv2d(2, 3, 3, padding=1).double()  # bn(conv(x)), written out
    with torch.no_grad():
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        folded.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        folded.bias.copy_((conv.bias - bn.running_mean) * scale + bn.bias)
        assert torch.allclose(folded(x1), bn(conv(x1)), rtol=1e-12, atol=1e-12)
    lp = patterns["0"]
    a_plus, a_minus = (lp.pattern(k).reshape(3, -1).numpy() for k in ("relu", "relu_negative"))
    expected = brute_force_rho(folded, a_plus, a_minus, x2, x3)
    np.testing.assert_allclose(result["0"]["two_component"].numpy(), expected, atol=1e-7)


def test_batches_and_float32_agree_with_one_float64_pass():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    data = torch.randn(1000, 3, 4, 4) + 3.0  # an offset, for the float32 sums
    v_data, eval_data = data[200:600], data[600:]
    patterns = PatternFitter(model).fit([data[:200]])
    one = signal_quality(
        model.double(), patterns.to(dtype=torch.float64), [v_data.double()], [eval_data.double()]
    )
    model.float()
    batched = signal_quality(model, patterns, v_data.split(7), eval_data.split(13))
    for layer in one:
        for est in ESTIMATORS:
            np.testing.assert_allclose(batched[layer][est], one[layer][est], atol=1e-4)


def test_subsampled_positions_estimate_the_same_rho():
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 4, 3, padding=1)
    smooth = torch.nn.functional.avg_pool2d(torch.randn(600, 1, 14, 14), 3, 1, 1)
    patterns = PatternFitter(conv).fit([smooth[:200]])
    full = signal_quality(conv, patterns, [smooth[200:400]], [smooth[400:]])
    sampled = signal_quality(conv, patterns, [smooth[200:400]], [smooth[400:]], max_positions=40)
    for est in ("filter", "linear", "two_component"):
        np.testing.assert_allclose(sampled[""][est], full[""][est], atol=0.03)
    # a quarter of the positions is still a different sample: not bit-identical
    assert not torch.equal(sampled[""]["filter"], full[""]["filter"])


def test_toy_case_linear_pattern_removes_all_correlation():
    """On the paper's toy data S_a leaves no trace of y (ρ≈1); S_w leaves the known amount."""
    data = linear_toy(6000, noise_std=1.0, seed=3)
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -1.0]]))
    x = data.x
    patterns = PatternFitter(model).fit([x[:2000]])
    rho = rho_means(signal_quality(model, patterns, [x[2000:4000]], [x[4000:]]))[""]
    assert rho["linear"] > 0.97 and rho["two_component"] > 0.97
    # S_w: d = (y/2 + ε)(1, 1), corr(y, y/2 + ε) = (1/6) / sqrt(1/3 · (1/12 + 1)) ≈ 0.277
    assert rho["filter"] == pytest.approx(1 - 0.277, abs=0.03)


def test_unknown_estimator_and_layer_are_refused():
    model = nn.Linear(3, 2)
    patterns = PatternFitter(model).fit([torch.randn(20, 3)])
    with pytest.raises(ValueError, match="estimator"):
        signal_quality(model, patterns, [torch.randn(9, 3)], [torch.randn(9, 3)], ["gradient"])
    with pytest.raises(ValueError, match="no Linear/Conv layer"):
        signal_quality(model, patterns, [torch.randn(9, 3)], [torch.randn(9, 3)], layers=["x"])


@pytest.mark.parametrize("bad", [0, -3, 2.5, True], ids=["zero", "negative", "float", "bool"])
def test_impossible_position_counts_are_refused_before_any_work(bad):
    model = nn.Sequential(nn.Conv2d(1, 2, 3))
    patterns = PatternFitter(model).fit([torch.randn(8, 1, 6, 6)])
    x = [torch.randn(4, 1, 6, 6)]
    with pytest.raises(ValueError, match=r"max_positions must be a whole number >= 1"):
        signal_quality(model, patterns, x, x, max_positions=bad)


@pytest.mark.parametrize("where", ["v_data", "eval_data"])
def test_nan_in_either_pass_names_the_pass_batch_and_layer(where):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    patterns = PatternFitter(model).fit([torch.randn(64, 3)])
    good = [torch.randn(16, 3), torch.randn(16, 3)]
    bad = [good[0], torch.full((16, 3), float("nan"))]
    data = {"v_data": good, "eval_data": good} | {where: bad}
    with pytest.raises(InvalidDataError, match=rf"\({where}\), batch 1: layer '0' receives NaN"):
        signal_quality(model, patterns, data["v_data"], data["eval_data"])


def test_result_reports_time_and_the_ridge_used():
    """A singular Cov[x] (a constant input) needs a larger ridge than asked for; it is reported."""
    model = nn.Linear(3, 2)
    x = torch.randn(300, 3)
    x[:, 2] = 1.0  # no variance: Cov[x] is singular
    patterns = PatternFitter(model).fit([x[:100]])
    result = signal_quality(model, patterns, [x[100:200]], [x[200:]], ridge=0.0)
    assert set(result.seconds) == {"v_pass", "solve", "eval_pass"}
    assert result.ridge[""] > 0.0
    assert all(bool(torch.isfinite(r).all()) for r in result[""].values())


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 4, 3, padding=1, stride=2, dilation=2),
        nn.Conv1d(2, 3, 3, padding=2, dilation=2),
        nn.Conv3d(2, 2, (2, 3, 2), padding=1, stride=(1, 2, 1)),
    ],
    ids=["conv2d", "conv1d", "conv3d"],
)
def test_position_subsample_gathers_the_same_patches(conv):
    """The gather path (max_positions) picks exactly the strided-slice patches it names."""
    from captum_pattern.metrics.signal_quality import _LayerSamples

    x = torch.randn(4, conv.in_channels, *([9] * (conv.weight.dim() - 2)))
    z = conv(x).detach()
    layer = _LayerSamples("layer", conv, None, 5, torch.Generator().manual_seed(3))
    full, outputs = layer._columns(x, z, False, None)
    sampled, sampled_outputs = layer._columns(x, z, True, None)
    positions = z[0, 0].numel()
    pick = torch.rand(4, positions, generator=torch.Generator().manual_seed(3)).argsort(1)[:, :5]
    keep = (pick + positions * torch.arange(4)[:, None]).flatten()
    assert torch.equal(sampled, full[:, :, keep])
    assert torch.equal(sampled_outputs, outputs[:, keep])
