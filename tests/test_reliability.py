"""Bad input, faults and concurrency: a clear error or a correct answer, never a NaN."""

from __future__ import annotations

import threading
import time
import warnings

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch import nn

from captum_pattern import (
    InvalidDataError,
    InvalidInputError,
    ModelChangedError,
    PatternAttribution,
    PatternFitter,
    PatternNet,
    Patterns,
    UnsupportedModelError,
)
from captum_pattern.canonize import reads_training_mode
from models import (
    Residual,
    SequentialCNN,
    assert_same_state,
    hook_counts,
    model_state,
    random_patterns,
)
from reference import reference_layer_patterns

ATTRS = {"relu": "a_plus", "relu_negative": "a_minus", "linear": "a_linear"}


# ------------------------------------------------------------------ bad input
def test_attribution_of_a_model_without_linear_layers_is_refused():
    with pytest.raises(UnsupportedModelError, match="no nn.Linear"):
        PatternNet(nn.Sequential(nn.ReLU()), Patterns({}))


def test_nan_or_inf_in_the_first_batch_is_named():
    model = nn.Sequential(nn.Linear(3, 2))
    for bad in (float("nan"), float("inf")):
        x = torch.randn(4, 3)
        x[1, 1] = bad
        with pytest.raises(InvalidDataError, match=r"batch 0: layer '0'"):
            PatternFitter(model).fit([x, torch.randn(4, 3)])


def test_overflow_inside_the_model_names_the_layer():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.fill_(1e38)  # finite weights, infinite outputs for large inputs
    batches = [torch.randn(4, 3), torch.full((4, 3), 10.0)]
    with pytest.raises(InvalidDataError, match=r"batch 1: layer '0'"):
        PatternFitter(model).fit(batches)


def test_a_failing_forward_names_the_batch_and_the_shapes():
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(InvalidDataError, match=r"batch 1: the model's forward.*\(4, 5\)"):
        PatternFitter(model).fit([torch.randn(4, 3), torch.randn(4, 5)])
    with pytest.raises(InvalidDataError, match=r"batch 0: the model's forward.*\(4, 5\)"):
        PatternFitter(model).fit([torch.randn(4, 5)])


@pytest.fixture
def cnn():
    model = SequentialCNN()
    (x,) = model.example(2)
    return model, random_patterns(model, (x,)), x


def test_inputs_of_the_wrong_shape_dtype_or_device(cnn):
    model, patterns, x = cnn
    pn = PatternNet(model, patterns)
    with pytest.raises(InvalidInputError, match=r"forward pass failed on inputs of shape \[\(2, 3"):
        pn.attribute(torch.randn(2, 3, 12, 12), target=0)
    with pytest.raises(InvalidInputError, match="dtype torch.float64 but the model's weights"):
        pn.attribute(x.double(), target=0)
    with pytest.raises(InvalidInputError, match="dtype torch.int64"):
        pn.attribute(x.long(), target=0)
    with pytest.raises(InvalidInputError, match="is on meta but the model is on cpu"):
        pn.attribute(torch.empty(2, 2, 12, 12, device="meta"), target=0)
    with pytest.raises(InvalidInputError, match="need a batch dimension"):
        pn.attribute(torch.tensor(1.0), target=0)
    with pytest.raises(InvalidInputError, match="NaN or Inf"):
        pn.attribute(x.clone().fill_(float("nan")), target=0)
    with pytest.raises(InvalidInputError, match=r"no example \(shape \(0, 2, 12, 12\)\)"):
        pn.attribute(x[:0], target=0)  # Captum's own methods end in an IndexError here


@pytest.mark.parametrize(
    "target,message",
    [
        (5, "out of range"),
        (-6, "out of range"),
        ([0, 7], "out of range"),
        (torch.tensor([0, 9]), "out of range"),
        ([0], "1 entries for 2 examples"),
        ((1, 2), "too many indices"),
        ("cat", "not a Captum target form"),
    ],
)
def test_targets_out_of_range_or_malformed(cnn, target, message):
    model, patterns, x = cnn
    snap = model_state(model)
    with pytest.raises(InvalidInputError, match=message):
        PatternAttribution(model, patterns).attribute(x, target=target)
    assert_same_state(model, snap)


def test_training_mode_is_switched_to_eval_for_the_call_and_restored(cnn):
    model, patterns, x = cnn
    pa = PatternAttribution(model, patterns)
    model.eval()
    expected = pa.attribute(x, target=1)
    model.train()  # dropout would make the result random; the call uses eval mode
    got = pa.attribute(x, target=1)
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(got, expected)


def test_batch_statistics_batchnorm_is_refused_everywhere():
    model = nn.Sequential(
        nn.Linear(4, 4), nn.ReLU(), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 2)
    )
    with pytest.raises(UnsupportedModelError, match=r"BatchNorm '2'.*rest of the batch"):
        PatternFitter(model)


class _FunctionalSigmoid(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(torch.sigmoid(self.fc1(x)))


def test_functions_outside_the_method_are_refused_by_default():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    with pytest.raises(UnsupportedModelError, match=r"tanh in '1'.*approximate='gradient'"):
        PatternFitter(model).fit([torch.randn(8, 4)])
    # written functionally, found as surely as a module
    with pytest.raises(UnsupportedModelError, match=r"sigmoid in the model's own forward"):
        PatternFitter(_FunctionalSigmoid()).fit([torch.randn(8, 4)])


def test_approximate_gradient_is_announced_once_per_call_site():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    fitter = PatternFitter(model, approximate="gradient")
    with pytest.warns(UserWarning, match=r"ordinary gradient is used through tanh") as seen:
        fitter.fit([torch.randn(8, 4)])
        fitter.fit([torch.randn(8, 4)])
    assert len([w for w in seen if "tanh" in str(w.message)]) == 1


def test_overflowing_explanation_is_an_error_not_a_nan():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    x = torch.ones(1, 2)
    patterns = random_patterns(model, (x,))
    for name in patterns:
        patterns[name].a_plus = torch.full_like(patterns[name].a_plus, 1e30)
    with torch.no_grad():
        model[0].bias.fill_(1.0)
        model[2].weight.fill_(1.0)
    with pytest.raises(InvalidInputError, match="overflowed"):
        PatternNet(model, patterns).attribute(x, target=0)


# ------------------------------------------------------------ degenerate data
def _layer_data(draw, n):
    cols = draw(st.integers(2, 5))
    kind = draw(st.sampled_from(["normal", "constant", "constant_column", "binary", "offset"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    x = rng.normal(size=(n, cols))
    if kind == "constant":
        x[:] = draw(st.floats(-5, 5))
    elif kind == "constant_column":
        x[:, 0] = 3.0
    elif kind == "binary":
        x = (x > 0).astype(float)
    elif kind == "offset":
        x += 1e3
    return torch.from_numpy(x)


@st.composite
def degenerate_cases(draw):
    n = draw(st.integers(1, 12))
    x = _layer_data(draw, n)
    out = draw(st.integers(1, 4))
    bias_mode = draw(st.sampled_from(["random", "never", "always", "zero_weight"]))
    batch = draw(st.integers(1, max(1, n)))
    seed = draw(st.integers(0, 2**31 - 1))  # the layer's weights: a failure replays
    return x, out, bias_mode, batch, seed


@given(degenerate_cases())
@example(  # a neuron whose open gate only sees x = 0 (so y = 0): once solved from residue
    (
        torch.tensor(
            [[1.0, 0], [1, 1], [0, 1], [1, 1], [0, 0], [0, 1], [0, 0], [0, 0], [0, 0]]
        ).double(),
        2,
        "random",
        9,
        0,
    )
)
def test_degenerate_data_gives_finite_patterns_with_zeros_reported(case):
    x, out, bias_mode, batch, seed = case
    torch.manual_seed(seed)
    layer = nn.Linear(x.shape[1], out).double()
    with torch.no_grad():
        if bias_mode == "never":
            layer.bias.fill_(-1e9)
        elif bias_mode == "always":
            layer.bias.fill_(1e9)
        elif bias_mode == "zero_weight":
            layer.weight[0] = 0.0
    lp = PatternFitter(layer).fit(x.split(batch))[""]
    for kind, attr in ATTRS.items():
        pattern = getattr(lp, attr)
        assert torch.isfinite(pattern).all()
        zero = lp.zero[kind]
        assert torch.all(pattern[zero] == 0)
    # a regime without samples has a zero pattern, and is reported
    assert torch.all(lp.zero["relu"][lp.positive_fraction == 0])
    assert torch.all(lp.zero["relu_negative"][lp.positive_fraction == 1])
    if bias_mode == "zero_weight":
        assert lp.zero["linear"][0] and lp.zero["relu"][0]
    # where a pattern is defined and well conditioned, it is the paper's formula.  Well
    # conditioned: a moderate pattern, and outputs whose spread is far above their own
    # float64 rounding (with a bias of ±1e9, y is known to ~1e-7 only: a spread of 1e-2
    # leaves five digits, and the pattern, a ratio of such spreads, no more)
    ref = reference_layer_patterns(layer, [x])
    with torch.no_grad():
        y = layer(x)
    rounding = torch.finfo(torch.float64).eps * y.abs().amax(0)
    spread = y.std(0, correction=0) if len(y) > 1 else torch.zeros(out, dtype=y.dtype)
    for kind, attr in ATTRS.items():
        got = getattr(lp, attr).numpy()
        for j in range(out):
            conditioned = bool(spread[j] > 1e7 * rounding[j])
            if not lp.zero[kind][j] and np.abs(ref[kind][j]).max() < 1e6 and conditioned:
                assert np.allclose(got[j], ref[kind][j], rtol=1e-5, atol=1e-8), (kind, j)


def test_batch_of_one_and_single_sample_fit():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))
    patterns = PatternFitter(model).fit([torch.randn(1, 1, 4, 6)])
    assert patterns["3"].n_samples == 1
    for lp in patterns.values():
        for attr in ATTRS.values():
            assert torch.isfinite(getattr(lp, attr)).all()
    # one sample: no variance anywhere in the dense layer, so every pattern is zero
    assert torch.all(patterns["3"].zero["linear"])


# --------------------------------------------------------------------- faults
class _Interrupt:
    """A forward hook that raises KeyboardInterrupt on its n-th call."""

    def __init__(self, module: nn.Module, at: int) -> None:
        self.calls, self.at = 0, at
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt


def test_keyboard_interrupt_mid_fit_leaves_model_and_checkpoint_consistent(tmp_path):
    model = Residual().train()
    (x,) = model.example(4)
    batches = [x + i for i in range(6)]
    snap_before = model_state(model)
    fitter = PatternFitter(model, method="weight_grad")
    ckpt = tmp_path / "fit.ckpt"
    interrupt = _Interrupt(model.conv2, at=6)  # probe + batches 0..3, then batch 4 mid-forward
    snap = model_state(model)
    with pytest.raises(KeyboardInterrupt):
        fitter.fit(batches, checkpoint=ckpt, checkpoint_every=2)
    assert_same_state(model, snap)
    interrupt.handle.remove()
    assert_same_state(model, snap_before)
    resumed = fitter.fit(batches, checkpoint=ckpt, checkpoint_every=2, resume=True)
    whole = fitter.fit(batches, checkpoint=tmp_path / "other.ckpt", checkpoint_every=2)
    for name in whole:
        for attr in ATTRS.values():
            assert torch.equal(getattr(whole[name], attr), getattr(resumed[name], attr))


def test_keyboard_interrupt_while_saving_a_checkpoint_keeps_the_old_one(tmp_path, monkeypatch):
    import captum_pattern.patterns as patterns_module

    model = nn.Sequential(nn.Linear(3, 2))
    batches = [torch.randn(4, 3) for _ in range(4)]
    ckpt = tmp_path / "fit.ckpt"

    def stop_after_two():
        yield from batches[:2]
        raise KeyboardInterrupt  # a completed fit deletes its checkpoint: leave one behind

    with pytest.raises(KeyboardInterrupt):
        PatternFitter(model).fit(stop_after_two(), checkpoint=ckpt, checkpoint_every=2)
    before = ckpt.read_bytes()
    original = patterns_module.save_file

    def interrupted_save(tensors, path, metadata=None):
        original(tensors, path, metadata=metadata)
        raise KeyboardInterrupt  # after writing the temporary file, before the rename

    monkeypatch.setattr(patterns_module, "save_file", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        PatternFitter(model).fit(batches, checkpoint=ckpt, checkpoint_every=4)
    assert ckpt.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fit.ckpt"]


def test_keyboard_interrupt_mid_attribution_leaves_model_exactly_as_it_was(cnn):
    model, patterns, x = cnn
    model.train()
    snap = model_state(model)
    pa = PatternAttribution(model, patterns)
    interrupt = _Interrupt(model[11], at=1)
    with pytest.raises(KeyboardInterrupt):
        pa.attribute(x, target=0)
    interrupt.handle.remove()
    assert_same_state(model, snap)
    assert torch.isfinite(pa.attribute(x, target=0)).all()  # and it still works


# ---------------------------------------------------------------- concurrency
class _Slow(nn.Module):
    """Sleeps in forward, so that two threads' forward passes overlap."""

    def forward(self, x):
        time.sleep(0.02)
        return x


def test_two_threads_attributing_on_one_model_get_correct_results():
    model = nn.Sequential(nn.Linear(4, 6), _Slow(), nn.ReLU(), nn.Dropout(), nn.Linear(6, 3))
    x = torch.randn(5, 4)
    patterns = random_patterns(model.eval(), (x,))
    model.train()  # each call must run in eval mode and give the mode back at the end
    expected = {
        "net": PatternNet(model, patterns).attribute(x, target=1),
        "attr": PatternAttribution(model, patterns).attribute(x, target=2),
    }
    results: dict[str, list[torch.Tensor]] = {"net": [], "attr": []}

    def worker(kind):
        cls = PatternNet if kind == "net" else PatternAttribution
        method = cls(model, patterns)
        for _ in range(3):
            results[kind].append(method.attribute(x, target=1 if kind == "net" else 2))

    threads = [threading.Thread(target=worker, args=(k,)) for k in ("net", "attr", "net")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results["net"]) == 6 and len(results["attr"]) == 3
    for kind, values in results.items():
        for value in values:
            assert torch.equal(value, expected[kind])
    assert all(n == 0 for h in hook_counts(model) for n in h[1:])
    assert all(m.training for m in model.modules())


def test_other_threads_forward_passes_are_not_affected_by_our_hooks():
    model = nn.Sequential(nn.Linear(4, 6), _Slow(), nn.ReLU(), nn.Linear(6, 3))
    x = torch.randn(5, 4)
    patterns = random_patterns(model, (x,))
    plain = torch.autograd.grad(model(x.requires_grad_())[:, 0].sum(), x)[0]
    seen = []
    stop = threading.Event()

    def saliency_loop():
        while not stop.is_set():
            xi = x.detach().requires_grad_()
            seen.append(torch.autograd.grad(model(xi)[:, 0].sum(), xi)[0])

    thread = threading.Thread(target=saliency_loop)
    thread.start()
    try:
        for _ in range(5):
            PatternNet(model, patterns).attribute(x.detach(), target=0)
    finally:
        stop.set()
        thread.join()
    assert seen and all(torch.equal(g, plain) for g in seen)


class _Gate(nn.Module):
    """Lets another thread act once while the model is in the middle of a forward pass."""

    def __init__(self, act) -> None:
        super().__init__()
        self.act, self.armed = act, False

    def forward(self, x):
        if self.armed:
            self.armed = False
            thread = threading.Thread(target=self.act)
            thread.start()
            thread.join()
        return x


def test_a_model_in_eval_mode_is_not_touched_while_another_thread_uses_it():
    seen = []
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Dropout(), nn.Linear(6, 3))
    model.insert(1, _Gate(lambda: seen.append([m.training for m in model.modules()])))
    model.eval()
    x = torch.randn(5, 4)
    patterns = random_patterns(model, (x,))
    model[1].armed = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: nothing is switched
        PatternNet(model, patterns).attribute(x, target=0)
    assert seen == [[False] * 6]
    assert not any(m.training for m in model.modules())


def test_another_threads_switch_to_training_mode_is_kept_and_the_mixed_result_refused():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Dropout(), nn.Linear(6, 3))
    model.insert(1, _Gate(lambda: model.train()))
    model.eval()
    x = torch.randn(5, 4)
    patterns = random_patterns(model, (x,))
    model[1].armed = True
    with pytest.raises(ModelChangedError, match=r"training mode .*'1', '3'.*another thread"):
        PatternAttribution(model, patterns).attribute(x, target=0)
    assert all(m.training for m in model.modules())  # the other thread's train() stands
    model.eval()
    assert torch.isfinite(PatternAttribution(model, patterns).attribute(x, target=0)).all()


def test_a_model_in_training_mode_is_explained_in_eval_mode_with_one_warning():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Dropout(0.9), nn.Linear(6, 3))
    x = torch.randn(5, 4)
    patterns = random_patterns(model.eval(), (x,))
    expected = PatternNet(model, patterns).attribute(x, target=1)
    model.train()
    with pytest.warns(UserWarning, match=r"training mode \(modules '2'\).*model\.eval\(\)"):
        first = PatternNet(model, patterns).attribute(x, target=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per model
        second = PatternNet(model, patterns).attribute(x, target=1)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert all(m.training for m in model.modules())


def test_modes_depend_on_the_class_reading_its_training_flag():
    class Custom(nn.Module):
        def forward(self, x):
            return x

    plain = [nn.Conv2d(1, 1, 1), nn.Linear(1, 1), nn.ReLU(), nn.Sequential(), nn.MaxPool2d(2)]
    plain.append(nn.DataParallel(nn.Linear(1, 1)))  # a generic class: typing.Generic is no module
    dependent = [nn.BatchNorm2d(1), nn.Dropout(), nn.InstanceNorm2d(1), nn.LSTM(1, 1), Custom()]
    assert [reads_training_mode(m) for m in plain] == [False] * len(plain)
    assert [reads_training_mode(m) for m in dependent] == [True] * len(dependent)
