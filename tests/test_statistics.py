"""Pattern statistics against an explicit-patch float64 NumPy reference."""

import hypothesis
import numpy as np
import pytest
import torch
from hypothesis import strategies as st
from torch import nn

from captum_pattern import PatternFitter
from captum_pattern.statistics import EMPTY_RTOL, PatternStatistics, required_stats
from reference import (
    add_dense_samples,
    copy_statistics,
    explicit_patches,
    layer_samples,
    merge_statistics,
    reference_layer_patterns,
)

KINDS = {"relu": "a_plus", "relu_negative": "a_minus", "linear": "a_linear"}

CONVS = {
    "conv1d-stride2-pad1": lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1),
    "conv1d-dil2-groups": lambda: nn.Conv1d(4, 6, 3, dilation=2, groups=2),
    "conv1d-same-even": lambda: nn.Conv1d(2, 3, 4, padding="same"),
    "conv2d-plain": lambda: nn.Conv2d(2, 5, 3),
    "conv2d-stride-pad-tuple": lambda: nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 2)),
    "conv2d-same-dilated": lambda: nn.Conv2d(2, 4, 3, padding="same", dilation=2),
    "conv2d-valid-nobias": lambda: nn.Conv2d(2, 3, 2, padding="valid", bias=False),
    "conv2d-depthwise": lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4),
    "conv2d-groups3": lambda: nn.Conv2d(6, 9, 3, padding=1, groups=3, stride=2),
    "conv2d-reflect": lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),
    "conv2d-replicate": lambda: nn.Conv2d(2, 3, 3, padding=2, padding_mode="replicate"),
    "conv2d-circular": lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"),
    "conv2d-same-reflect-even": lambda: nn.Conv2d(
        2, 3, (2, 4), padding="same", padding_mode="reflect"
    ),
    "conv3d": lambda: nn.Conv3d(2, 3, (2, 3, 2), stride=(1, 2, 1), padding=(1, 0, 1)),
    "conv3d-groups-dilated": lambda: nn.Conv3d(4, 4, 2, groups=2, dilation=(2, 1, 1)),
}
SHAPES = {1: (4, None, 9), 2: (3, None, 7, 6), 3: (2, None, 5, 6, 4)}


def _input_for(layer: nn.Module, n: int, offset: float = 0.0, dtype=torch.float64):
    if isinstance(layer, nn.Linear):
        return torch.randn(n, layer.in_features, dtype=dtype) + offset
    dims = len(layer.kernel_size)
    shape = list(SHAPES[dims])
    shape[0], shape[1] = n, layer.in_channels
    return torch.randn(*shape, dtype=dtype) + offset


def _compare(patterns, layer, batches, rtol):
    ref = reference_layer_patterns(layer, batches)
    name = next(iter(patterns))
    for kind, attr in KINDS.items():
        got = getattr(patterns[name], attr).detach().double().numpy().reshape(ref[kind].shape)
        scale = np.abs(ref[kind]).max(axis=1, keepdims=True) + 1e-30
        err = np.abs(got - ref[kind]) / scale
        assert err.max() < rtol, (kind, err.max())


@pytest.mark.parametrize("make", CONVS.values(), ids=CONVS.keys())
def test_conv_reference_patches_match_the_layer(make):
    """The reference itself: explicit patches times w plus b is the conv output."""
    layer = make().double()
    x = _input_for(layer, 2)
    _, Z = layer_samples(layer, x)
    out = layer(x).detach().numpy()
    out = np.moveaxis(out, 1, -1).reshape(-1, out.shape[1])
    assert np.allclose(Z, out)


@pytest.mark.parametrize("make", CONVS.values(), ids=CONVS.keys())
def test_conv_patterns_match_explicit_reference(make):
    layer = make().double()
    batches = [_input_for(layer, 3) for _ in range(3)]
    patterns = PatternFitter(layer).fit(batches)
    _compare(patterns, layer, batches, rtol=1e-9)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_patterns_match_explicit_reference(bias):
    layer = nn.Linear(7, 5, bias=bias).double()
    batches = [_input_for(layer, 40) for _ in range(3)]
    _compare(PatternFitter(layer).fit(batches), layer, batches, rtol=1e-9)


def test_linear_with_extra_leading_dims_pools_all_positions():
    layer = nn.Linear(6, 4).double()
    batches = [torch.randn(5, 7, 6, dtype=torch.float64) for _ in range(2)]
    patterns = PatternFitter(layer).fit(batches)
    assert patterns[""].n_samples == 2 * 5 * 7
    _compare(patterns, layer, batches, rtol=1e-9)


@pytest.mark.parametrize(
    "make", [CONVS["conv2d-groups3"], CONVS["conv1d-same-even"], lambda: nn.Linear(6, 5)]
)
def test_float32_layers_match_reference(make):
    layer = make()
    batches = [_input_for(layer, 16, dtype=torch.float32) for _ in range(4)]
    patterns = PatternFitter(layer).fit(batches)
    # float32 GEMMs per batch, float64 across batches: ~1e-7 seen, 10x margin
    _compare(patterns, layer, batches, rtol=2e-6)


@pytest.mark.parametrize("make", [CONVS["conv2d-stride-pad-tuple"], lambda: nn.Linear(6, 5)])
def test_large_offset_inputs_stay_accurate(make):
    """Inputs around 1000 (raw-pixel-like offsets): float32 fit vs float64 reference."""
    layer = make()
    batches = [_input_for(layer, 32, offset=1000.0, dtype=torch.float32) for _ in range(3)]
    _center_gates(layer, batches[0])
    patterns = PatternFitter(layer).fit(batches)
    # the reference sees the same float32 layer output (the real gate) in float64
    ref = reference_layer_patterns(layer, batches, z_from_layer=True)
    name = ""
    for kind, attr in KINDS.items():
        got = getattr(patterns[name], attr).double().numpy().reshape(ref[kind].shape)
        err = np.linalg.norm(got - ref[kind], axis=1) / np.linalg.norm(ref[kind], axis=1)
        # seen: <= 2e-6 for conv, 1.5e-5 for a_linear of the Linear layer, where the
        # float32 output differs from wᵀx by ~1e-4·σ_y at this offset and Eq. 4's σ²_y
        # and our wᵀ·cov[x, y] denominator weigh that rounding differently
        assert err.max() < 1e-4, (kind, err.max())


def _center_gates(layer, x):
    """Shift the bias so that every neuron fires on about half the samples."""
    with torch.no_grad():
        out = layer(x)
        per_neuron = out.movedim(1, -1) if out.dim() > 2 else out
        layer.bias -= per_neuron.reshape(-1, per_neuron.shape[-1]).median(0).values


def _naive_float32_plus(layer, batches):
    """What an uncentred float32 implementation gets (for contrast)."""
    X, Z = zip(*(layer_samples(layer, x) for x in batches))
    X = np.concatenate(X).astype(np.float32)
    Z = np.concatenate(Z).astype(np.float32)
    b = layer.bias.detach().numpy()
    Y = Z - b
    g = (Z > 0).astype(np.float32)
    exy = (X * (g * Y)[..., None]).sum(0) / g.sum(0)[:, None]
    ex = (X * g[..., None]).sum(0) / g.sum(0)[:, None]
    num = exy - ex * Y.mean(0)[:, None]
    return num / (layer.weight.detach().numpy().reshape(len(b), -1) * num).sum(1, keepdims=True)


def test_offset_accuracy_beats_naive_float32():
    layer = nn.Linear(6, 5)
    batches = [_input_for(layer, 64, offset=1000.0, dtype=torch.float32) for _ in range(3)]
    _center_gates(layer, batches[0])
    ref = reference_layer_patterns(layer, batches, z_from_layer=True)["relu"]
    ours = PatternFitter(layer, pattern_types=["relu"]).fit(batches)[""].a_plus.double().numpy()
    naive = _naive_float32_plus(layer, batches)
    err = lambda a: np.abs(a - ref).max() / np.abs(ref).max()  # noqa: E731
    assert err(ours) < 1e-4
    assert err(ours) < err(naive) / 10


@pytest.mark.parametrize("make", [CONVS["conv2d-groups3"], lambda: nn.Linear(5, 4)])
def test_batch_size_and_order_independence(make):
    layer = make().double()
    data = _input_for(layer, 24)
    whole = PatternFitter(layer).fit([data])
    small = PatternFitter(layer).fit(data.split(5))
    shuffled = PatternFitter(layer).fit(data[torch.randperm(24)].split(7))
    for other in (small, shuffled):
        for attr in KINDS.values():
            assert torch.allclose(
                getattr(whole[""], attr), getattr(other[""], attr), rtol=1e-10, atol=1e-12
            )


def test_module_called_twice_pools_both_calls():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(torch.relu(self.fc(x)))

    model = Twice().double()
    x = torch.randn(50, 4, dtype=torch.float64)
    patterns = PatternFitter(model).fit([x])
    hidden = torch.relu(model.fc(x)).detach()
    ref = reference_layer_patterns(model.fc, [x, hidden])
    assert patterns["fc"].n_samples == 100
    for kind, attr in KINDS.items():
        assert np.allclose(getattr(patterns["fc"], attr).numpy(), ref[kind], rtol=1e-9, atol=1e-12)


def test_statistics_merge_equals_union_and_rebase_is_exact():
    w = torch.randn(3, 5, dtype=torch.float64)
    x = torch.randn(200, 5, dtype=torch.float64) * 3 + 7
    y = x @ w.T
    bias = torch.randn(3, dtype=torch.float64)
    keys = required_stats(["relu", "relu_negative", "linear"])
    whole = PatternStatistics(w.shape, 1, keys)
    add_dense_samples(whole, x, y, bias)
    first, second = PatternStatistics(w.shape, 1, keys), PatternStatistics(w.shape, 1, keys)
    add_dense_samples(first, x[:80], y[:80], bias)
    add_dense_samples(second, x[80:], y[80:], bias)  # other references
    assert not torch.allclose(first.x_ref, second.x_ref)
    merge_statistics(first, second)
    a, b = whole.solve(w), first.solve(w)
    for kind in a:
        assert torch.allclose(a[kind][0], b[kind][0], rtol=1e-10)
    # rebasing to any reference changes nothing
    moved = copy_statistics(whole)
    moved.rebase(torch.randn(1, 5) * 10, torch.randn(3) * 10)
    for kind, (pattern, _) in moved.solve(w).items():
        assert torch.allclose(pattern, a[kind][0], rtol=1e-9)


def test_dead_neuron_gets_zero_pattern_and_is_reported():
    layer = nn.Linear(4, 3).double()
    with torch.no_grad():
        layer.bias[1] = -1e6  # never fires
        layer.weight[2] = 0.0  # constant output
    patterns = PatternFitter(layer).fit([torch.randn(100, 4, dtype=torch.float64)])
    lp = patterns[""]
    assert lp.zero["relu"].tolist() == [False, True, True]
    assert lp.zero["linear"].tolist() == [False, False, True]
    assert torch.all(lp.a_plus[1:] == 0) and torch.all(lp.a_linear[2] == 0)
    assert lp.positive_fraction[1] == 0
    for attr in KINDS.values():
        assert torch.isfinite(getattr(lp, attr)).all()


def test_explicit_patches_cover_every_position():
    conv = nn.Conv2d(1, 1, 2, stride=2)
    x = np.arange(16, dtype=np.float64).reshape(1, 1, 4, 4)
    patches = explicit_patches(x, conv)
    assert patches.shape == (4, 1, 4)
    assert patches[0, 0].tolist() == [0, 1, 4, 5]


@pytest.mark.parametrize("make", [CONVS["conv2d-groups3"], CONVS["conv1d-same-even"]])
def test_zero_padded_layer_merge_and_rebase_are_exact(make):
    """Mask sums (zero padding) must follow merges and rebases too."""
    from captum_pattern.collector import LayerCollector as _LayerCollector

    layer = make().double()
    keys = required_stats(["relu", "relu_negative", "linear"])
    x1, x2 = _input_for(layer, 3), _input_for(layer, 4) * 2 + 5

    def collect(*xs):
        c = _LayerCollector("layer", layer, None, None, keys, torch.device("cpu"))
        for x in xs:
            c.observe(x, layer(x).detach(), 0)
        return c.statistics

    assert collect(x1).masked
    union = collect(x1, x2)
    first, second = collect(x1), collect(x2)
    merge_statistics(first, second)
    w = layer.weight.detach()
    expected = union.solve(w)
    for kind, (pattern, _) in first.solve(w).items():
        assert torch.allclose(pattern, expected[kind][0], rtol=1e-9, atol=1e-12)
    union.rebase(torch.randn(union.x_ref.shape) * 3, torch.randn(union.num_neurons) * 3)
    for kind, (pattern, _) in union.solve(w).items():
        assert torch.allclose(pattern, expected[kind][0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["weight_grad", "weight_grad_cl", "unfold"])
@pytest.mark.parametrize(
    "make", [CONVS["conv2d-groups3"], CONVS["conv2d-same-reflect-even"], CONVS["conv2d-plain"]]
)
def test_every_sum_method_matches_reference(make, method):
    layer = make().double()
    batches = [_input_for(layer, 3) for _ in range(2)]
    patterns = PatternFitter(layer, method=method, flush_samples=1).fit(batches)
    _compare(patterns, layer, batches, rtol=1e-9)


def test_buffered_flushes_equal_per_batch_flushes():
    layer = nn.Linear(6, 4).double()
    batches = [torch.randn(5, 6, dtype=torch.float64) for _ in range(7)]
    a = PatternFitter(layer, flush_samples=1).fit(batches)
    b = PatternFitter(layer, flush_samples=12).fit(batches)
    for attr in KINDS.values():
        assert torch.allclose(getattr(a[""], attr), getattr(b[""], attr), rtol=1e-12)


@pytest.mark.parametrize("make", [CONVS["conv2d-groups3"], CONVS["conv1d-same-even"]])
def test_solving_in_blocks_of_neurons_changes_nothing(make):
    from captum_pattern.collector import LayerCollector as _LayerCollector

    layer = make().double()
    keys = required_stats(["relu", "relu_negative", "linear"])
    c = _LayerCollector("layer", layer, None, None, keys, torch.device("cpu"))
    for _ in range(2):
        x = _input_for(layer, 3)
        c.observe(x, layer(x).detach(), 0)
    c.flush()
    w = layer.weight.detach()
    whole = c.statistics.solve(w)
    blocks = c.statistics.solve(w, chunk_bytes=1, out_dtype=torch.float32)  # one neuron a block
    for kind, (pattern, zero) in whole.items():
        assert blocks[kind][0].dtype == torch.float32
        assert torch.allclose(blocks[kind][0].double(), pattern, rtol=1e-6, atol=1e-7)
        assert torch.equal(blocks[kind][1], zero)


# ------------------------------------------------- empty and nearly empty regimes
# Each neuron is put in one situation by its bias, placed from its float64 outputs.
# "empty" lists the regimes the documented rule calls empty: no sample, or fewer
# than MIN_REGIME_SAMPLES (2) samples.
REGIMES = {
    "normal": (),
    "always_open": ("relu_negative",),
    "dead": ("relu",),
    "one_closed": ("relu_negative",),
    "one_open": ("relu",),
    "two_closed": (),
}
EMPTY_LAYERS = {
    "linear": (lambda: nn.Linear(5, len(REGIMES)), "auto"),
    "conv-weight_grad": (lambda: nn.Conv2d(3, len(REGIMES), 2), "weight_grad"),
    "conv-unfold": (lambda: nn.Conv2d(3, len(REGIMES), 2), "unfold"),
}


def _place_biases(layer: nn.Module, x: torch.Tensor) -> None:
    """Biases that put neuron j in situation ``list(REGIMES)[j]``; rejects ties."""
    _, Z = layer_samples(layer, x)  # float64, with the current bias
    y = Z - (0.0 if layer.bias is None else layer.bias.detach().double().numpy())
    biases = []
    for j, situation in enumerate(REGIMES):
        v = np.sort(y[:, j])
        margin = 0.1 * v.std()
        # a sample within 1e-3 σ of the gate could flip with float32 rounding
        for a, b in ((v[0], v[1]), (v[1], v[2]), (v[-2], v[-1])):
            hypothesis.assume(b - a > 1e-3 * v.std())
        bias = {
            "normal": -np.median(v),
            "always_open": -v[0] + margin,
            "dead": -v[-1] - margin,
            "one_closed": -(v[0] + v[1]) / 2,
            "one_open": -(v[-2] + v[-1]) / 2,
            "two_closed": -(v[1] + v[2]) / 2,
        }[situation]
        biases.append(bias)
    with torch.no_grad():
        layer.bias.copy_(torch.tensor(biases))


@hypothesis.given(
    seed=st.integers(0, 2**31 - 1),
    case=st.sampled_from(sorted(EMPTY_LAYERS)),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    offset=st.sampled_from([0.0, 3.0, 30.0]),
)
def test_empty_and_single_sample_regimes_give_exact_zeros(seed, case, dtype, offset):
    make, method = EMPTY_LAYERS[case]
    generator = torch.Generator().manual_seed(seed)
    layer = make().double()
    with torch.no_grad():
        layer.weight.normal_(0.0, 1.0, generator=generator)
    if isinstance(layer, nn.Linear):
        shape = (3000, 5)
    else:
        shape = (12, 3, 17, 17)  # 12 · 16 · 16 = 3072 positions
    mix = torch.randn(shape[1], shape[1], dtype=torch.float64, generator=generator)
    x = torch.randn(shape, dtype=torch.float64, generator=generator)
    x = torch.einsum("ij,nj...->ni...", mix, x) + offset  # correlated inputs with an offset
    x = x.to(dtype).double()  # the data the float32 fit sees, exactly
    _place_biases(layer, x)
    layer = layer.to(dtype)
    batches = [b.to(dtype) for b in x.chunk(3)]
    fitted = PatternFitter(layer, method=method).fit(batches)[""]
    expected = reference_layer_patterns(layer.double(), [b.double() for b in batches])
    # the documented rule also calls a₋ empty when |wᵀN₋| ≤ EMPTY_RTOL · Σ(y − ȳ)²: two
    # closed samples can fall below it; decide from the float64 samples, away from the edge
    _, Z = layer_samples(layer.double(), x)
    j = list(REGIMES).index("two_closed")
    y = Z[:, j] - float(layer.bias[j])
    closed = Z[:, j] <= 0
    ratio = abs((y[closed] * (y[closed] - y.mean())).sum()) / ((y - y.mean()) ** 2).sum()
    hypothesis.assume(abs(np.log(ratio / EMPTY_RTOL)) > 0.5)
    regimes = dict(REGIMES, two_closed=("relu_negative",) if ratio <= EMPTY_RTOL else ())
    # float32 sums: a₋ of two closed samples out of 3000, a difference of sums,
    # is off by up to 1e-4 (measured); every other pattern by a few 1e-6
    close = {torch.float64: 1e-9, torch.float32: 1e-3}[dtype]
    for j, (situation, empty) in enumerate(regimes.items()):
        for kind, attr in KINDS.items():
            got = getattr(fitted, attr)[j].double().reshape(-1)
            where = f"{situation} neuron {j}, {kind}"
            if kind in empty:
                assert fitted.zero[kind][j], where
                assert torch.count_nonzero(got) == 0, where  # exact zeros
            else:
                assert not fitted.zero[kind][j], where
                ref = torch.from_numpy(expected[kind][j])
                assert torch.count_nonzero(ref) > 0, where  # the reference too sees data
                err = float((got - ref).abs().max() / ref.abs().max())
                assert err < close, (where, err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_always_open_wide_layer_has_no_residue_in_a_minus(dtype):
    """The issue's case: a₋ = (all − open) sums of a wide layer left residue up to 1e4 × a."""
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        layer = nn.Linear(37, 50).to(dtype)
        x = torch.randn(2000, 37, generator=generator, dtype=dtype) * 2
        x += torch.randn(37, generator=generator, dtype=dtype)
        with torch.no_grad():
            y = x @ layer.weight.T
            always_open = torch.arange(50) % 2 == 0
            low, high = y.min(0).values, y.max(0).values
            layer.bias.copy_(torch.where(always_open, 1e-3 - low, -1e-3 - high))
        fitted = PatternFitter(layer).fit(list(x.split(700)))[""]
        assert fitted.zero["relu_negative"].tolist() == always_open.tolist()
        assert fitted.zero["relu"].tolist() == (~always_open).tolist()
        assert torch.count_nonzero(fitted.a_minus[always_open]) == 0
        assert torch.count_nonzero(fitted.a_plus[~always_open]) == 0
        assert not fitted.zero["linear"].any()


@pytest.mark.parametrize("method", ["weight_grad", "weight_grad_cl"])
@pytest.mark.parametrize("make", [CONVS["conv2d-groups3"], CONVS["conv2d-plain"]])
def test_sums_in_pieces_equal_one_weight_gradient(make, method, monkeypatch):
    """On the CPU a batch's weight gradient runs in pieces of whole images: same sums."""
    from captum_pattern import layers

    layer = make().double()
    geo = layers.LayerGeometry.from_module(layer)
    x = geo.centred_input(_input_for(layer, 7), torch.zeros(layer.in_channels, dtype=torch.float64))
    signals = torch.randn(7, 2 * layer.out_channels, *layer(_input_for(layer, 1)).shape[2:])
    signals = signals.double()
    whole = geo.patch_sums(x, signals, method)
    monkeypatch.setattr(layers, "SUM_POSITIONS", signals[0, 0].numel() * 2)  # 2 images a piece
    pieces = geo.patch_sums(x, signals, method)
    torch.testing.assert_close(pieces, whole, rtol=1e-12, atol=1e-12)


def test_float32_sums_over_a_large_batch_stay_accurate():
    """oneDNN adds a weight gradient's positions one after the other in float32: over 16
    images at 224 px (800 000 positions) in one call its sums were off by 1e-5 (relative,
    measured); in pieces of at most ``SUM_POSITIONS`` positions they stay near the error
    of one image's sum (7e-7 – 1e-6)."""
    from captum_pattern import layers

    torch.manual_seed(0)
    layer = nn.Conv2d(3, 4, 3, padding=1)
    x = (torch.randn(16, 3, 224, 224) + 0.5).relu()
    geo = layers.LayerGeometry.from_module(layer)
    centred = geo.centred_input(x, x.mean((0, 2, 3)))
    with torch.no_grad():
        signals = layer(x).relu()
    exact = geo.patch_sums(centred.double(), signals.double(), "weight_grad")
    for method in ("weight_grad", "weight_grad_cl"):
        sums = geo.patch_sums(centred, signals, method).double()
        error = float((sums - exact).abs().max() / exact.abs().max())
        assert error < 3e-6, (method, error)
