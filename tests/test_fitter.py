"""PatternFitter behaviour: inputs, errors, hooks, checkpoint/resume, torch.distributed."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from captum_pattern import (
    InvalidDataError,
    PatternFitter,
    Patterns,
    UnsupportedModelError,
)
from captum_pattern.metrics import signal_quality
from reference import reference_layer_patterns

ATTRS = ("a_plus", "a_minus", "a_linear")


def _mlp():
    return nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)).double()


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _equal(p, q, exact=False):
    for name in p:
        for attr in ATTRS:
            a, b = getattr(p[name], attr), getattr(q[name], attr)
            ok = torch.equal(a, b) if exact else torch.allclose(a, b, rtol=1e-10, atol=1e-12)
            assert ok, (name, attr, (a - b).abs().max())


def test_batch_forms_give_the_same_patterns():
    model = _mlp()
    x = torch.randn(40, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    ref = PatternFitter(model).fit([x])
    _equal(ref, PatternFitter(model).fit(x.split(8)))
    _equal(ref, PatternFitter(model).fit([(x[:20], y[:20]), [x[20:], y[20:]]]))
    _equal(ref, PatternFitter(model).fit(DataLoader(TensorDataset(x, y), batch_size=16)))


def test_multi_input_batches_and_forward_args():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(2, 4)

        def forward(self, u, v, shift=0.0):
            return self.a(u) + self.b(v) + shift

    model = Two().double()
    u, v = torch.randn(30, 3, dtype=torch.float64), torch.randn(30, 2, dtype=torch.float64)
    patterns = PatternFitter(model).fit([((u, v), None)], additional_forward_args=(0.0,))
    ref = reference_layer_patterns(model.a, [u])
    assert torch.allclose(patterns["a"].a_linear, torch.from_numpy(ref["linear"]))


def test_max_batches_stops_early():
    model = _mlp()
    batches = [torch.randn(4, 5, dtype=torch.float64) for _ in range(5)]
    seen = []
    patterns = PatternFitter(model).fit(
        batches, max_batches=2, callback=lambda n, b: seen.append(n)
    )
    assert patterns["0"].n_samples == 8 and seen == [1, 2]
    _equal(patterns, PatternFitter(model).fit(batches[:2]))


def test_empty_data_is_an_error():
    with pytest.raises(InvalidDataError, match="no batch"):
        PatternFitter(_mlp()).fit([])


def test_one_tensor_instead_of_batches_is_an_error_not_a_row_by_row_fit():
    # Conv2d takes unbatched (C, H, W) inputs: iterating one tensor would fit row by row
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3))
    x = torch.randn(8, 1, 6, 6)
    for data in (x, x.numpy()):
        with pytest.raises(InvalidDataError, match=r"one \w+ of shape \(8, 1, 6, 6\).*\[x\]"):
            PatternFitter(model).fit(data)
    with pytest.raises(InvalidDataError, match=r"TensorDataset, whose items.*DataLoader"):
        PatternFitter(model).fit(TensorDataset(x))
    with pytest.raises(InvalidDataError, match=r"v_data\) is one Tensor"):
        signal_quality(model, PatternFitter(model).fit([x]), x, [x])


def test_bad_batch_type_is_an_error():
    with pytest.raises(InvalidDataError, match="batch 0 is a dict"):
        PatternFitter(_mlp()).fit([{"x": torch.randn(2, 5)}])


def test_nan_batch_names_batch_and_layer_and_removes_hooks():
    model = _mlp()
    batches = [torch.randn(4, 5, dtype=torch.float64) for _ in range(3)]
    batches[1][2, 3] = float("nan")
    with pytest.raises(InvalidDataError, match=r"batch 1: layer '0'"):
        PatternFitter(model).fit(batches)
    assert _hook_count(model) == 0
    assert model.training  # restored


def test_no_linear_layer_is_an_error():
    with pytest.raises(UnsupportedModelError, match="no nn.Linear"):
        PatternFitter(nn.Sequential(nn.ReLU(), nn.MaxPool2d(2)))


def test_unknown_pattern_type():
    with pytest.raises(ValueError, match="unknown pattern type 'relu_plus'"):
        PatternFitter(_mlp(), pattern_types=["relu_plus"])


def test_batchnorm_without_running_stats_is_refused():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False))
    with pytest.raises(UnsupportedModelError, match="track_running_stats=False"):
        PatternFitter(model).fit([torch.randn(2, 1, 5, 5)])


def test_batchnorm_sharing_its_input_is_not_folded():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.bn = nn.BatchNorm2d(2)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # the conv output is read twice

    model = Shared().double().eval()
    x = torch.randn(4, 1, 5, 5, dtype=torch.float64)
    patterns = PatternFitter(model).fit([x])
    assert patterns.folds == {}
    ref = reference_layer_patterns(model.conv, [x])
    assert torch.allclose(patterns["conv"].a_plus.reshape(2, -1), torch.from_numpy(ref["relu"]))


def test_folded_batchnorm_equals_fitting_the_folded_conv():
    torch.manual_seed(1)
    conv, bn = nn.Conv2d(2, 3, 3, padding=1).double(), nn.BatchNorm2d(3).double().eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(-1, 1)
    model = nn.Sequential(conv, bn)
    fused = nn.Conv2d(2, 3, 3, padding=1).double()
    with torch.no_grad():
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        fused.bias.copy_((conv.bias - bn.running_mean) * scale + bn.bias)
    data = [torch.randn(4, 2, 6, 6, dtype=torch.float64) for _ in range(2)]
    p, q = PatternFitter(model).fit(data), PatternFitter(fused).fit(data)
    assert p.folds == {"0": "1"}
    for attr in ATTRS:
        assert torch.allclose(getattr(p["0"], attr), getattr(q[""], attr), rtol=1e-8)


class _Interrupt(Exception):
    pass


def _interrupted(batches, at):
    for i, b in enumerate(batches):
        if i == at:
            raise KeyboardInterrupt
        yield b


def test_interrupted_then_resumed_fit_equals_uninterrupted(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 2))
    batches = [torch.randn(4, 1, 4, 4) for _ in range(7)]
    # the same settings, never interrupted: bit for bit the same result ("auto" would
    # pick the faster GEMM by timing, which may differ between the two runs)
    fitter = PatternFitter(model, method="weight_grad")
    whole = fitter.fit(batches, checkpoint=tmp_path / "other.ckpt", checkpoint_every=2)
    ckpt = tmp_path / "fit.ckpt"
    with pytest.raises(KeyboardInterrupt):
        fitter.fit(_interrupted(batches, 5), checkpoint=ckpt, checkpoint_every=2)
    assert _hook_count(model) == 0
    resumed = fitter.fit(batches, checkpoint=ckpt, checkpoint_every=2, resume=True)
    _equal(whole, resumed, exact=True)
    assert resumed.settings["batches"] == 7
    # without checkpoints the sums are grouped differently: equal to float32 rounding
    plain = PatternFitter(model).fit(batches)
    for name in plain:
        for attr in ATTRS:
            a, b = getattr(plain[name], attr), getattr(resumed[name], attr)
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * a.abs().max())


def test_resume_refuses_a_checkpoint_of_another_fit(tmp_path):
    model = _mlp()
    batches = [torch.randn(4, 5, dtype=torch.float64) for _ in range(4)]
    ckpt = tmp_path / "fit.ckpt"
    with pytest.raises(KeyboardInterrupt):
        PatternFitter(model).fit(_interrupted(batches, 3), checkpoint=ckpt, checkpoint_every=1)
    assert ckpt.exists()
    from captum_pattern import PatternFileError

    with pytest.raises(PatternFileError, match="pattern_types"):
        PatternFitter(model, pattern_types=["relu"]).fit(batches, checkpoint=ckpt, resume=True)
    with torch.no_grad():
        model[0].weight.add_(1)
    with pytest.raises(PatternFileError, match="weights changed"):
        PatternFitter(model).fit(batches, checkpoint=ckpt, resume=True)


def test_a_completed_fit_leaves_no_checkpoint_to_resume_from(tmp_path):
    model = _mlp()
    first = [torch.randn(4, 5, dtype=torch.float64) for _ in range(3)]
    other = [torch.randn(4, 5, dtype=torch.float64) + 3 for _ in range(3)]
    ckpt = tmp_path / "fit.ckpt"
    PatternFitter(model).fit(first, checkpoint=ckpt, checkpoint_every=1)
    assert not ckpt.exists()
    # a later fit on other data with resume=True fits that data, not the first fit's
    resumed = PatternFitter(model).fit(other, checkpoint=ckpt, checkpoint_every=1, resume=True)
    fresh = PatternFitter(model).fit(other)
    _equal(fresh, resumed)


def test_two_gloo_processes_equal_one_process(tmp_path):
    script = Path(__file__).with_name("dist_fit.py")
    out = tmp_path / "dist.patterns.safetensors"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        str(script),
        str(out),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    sys.path.insert(0, str(script.parent))
    from dist_fit import make_model_and_data

    model, data = make_model_and_data()
    shards = list(data.chunk(2))
    shards[1] = shards[1] + 0.5
    single = PatternFitter(model).fit(torch.cat(shards).split(2))
    merged = Patterns.load(out, model=model)
    assert merged.settings["world_size"] == 2
    _equal(single, merged)


@pytest.mark.parametrize("dtype,bound", [(torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
def test_reduced_precision_forward_costs_little_accuracy(dtype, bound):
    """autocast rounds gates and outputs; the patterns move by ~1e-3 (bf16), ~3e-4 (fp16)."""
    from captum_pattern.zoo import SmallCNN, digits, train_classifier

    data = digits()
    model = train_classifier(SmallCNN(), data.x_train, data.y_train, epochs=3)
    batches = data.x_train[:512].split(128)
    ref = PatternFitter(model).fit(batches)
    low = PatternFitter(model).fit(batches, autocast=dtype)
    errors = []
    for name in ref:
        for attr in ("a_plus", "a_linear"):
            a, b = getattr(ref[name], attr), getattr(low[name], attr)
            assert b.dtype == torch.float32 and torch.isfinite(b).all()
            errors.append(float((a - b).norm() / a.norm()))
    assert max(errors) < bound
    assert min(errors) > 1e-7  # the forward really ran in reduced precision


def test_an_empty_batch_is_named_not_blamed_on_the_model():
    from captum_pattern import InvalidDataError

    model = _mlp()
    with pytest.raises(InvalidDataError, match=r"batch 1 is empty \(0 examples\)"):
        PatternFitter(model).fit([torch.randn(4, 5).double(), torch.randn(0, 5).double()])


def test_a_checkpoint_with_non_finite_sums_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from captum_pattern import PatternFileError

    model = _mlp()
    batches = [torch.randn(4, 5, dtype=torch.float64) for _ in range(4)]
    ckpt = tmp_path / "fit.ckpt"
    with pytest.raises(KeyboardInterrupt):
        PatternFitter(model).fit(_interrupted(batches, 3), checkpoint=ckpt, checkpoint_every=1)
    with safe_open(str(ckpt), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        metadata = handle.metadata()
    key = next(k for k in tensors if "sum." in k)
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, str(ckpt), metadata=metadata)
    with pytest.raises(PatternFileError, match="holds NaN or Inf"):
        PatternFitter(model).fit(batches, checkpoint=ckpt, resume=True)
