"""Stale state is noticed: other models' patterns warn; edited weights and replaced layers
are picked up on the next call (issue 12, class 1)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from captum_pattern import PatternAttribution, PatternFitter, PatternMismatchError, PatternNet
from models import SequentialCNN, random_patterns


def _fitted():
    torch.manual_seed(0)
    model = SequentialCNN()
    (x,) = model.example(8)
    patterns = PatternFitter(model).fit([x, x.flip(0) + 0.5])
    return model, patterns, model.example(3)[0]


def _no_warning(run):
    """Run without a stale-state warning (a zero-explanation warning is another matter)."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = run()
    stale = [str(w.message) for w in seen if "all zeros" not in str(w.message)]
    assert stale == []
    return result


def test_patterns_of_another_model_with_the_same_shapes_warn_once():
    model, patterns, x = _fitted()
    other = SequentialCNN()  # same architecture, other weights
    _no_warning(lambda: PatternAttribution(model, patterns).attribute(x, target=1))
    method = PatternNet(other, patterns)
    with pytest.warns(UserWarning, match=r"not fitted on its current weights.*refit"):
        method.attribute(x, target=1)
    _no_warning(lambda: method.attribute(x, target=2))  # once


def test_patterns_not_made_by_a_fit_are_not_checked():
    model = SequentialCNN()
    (x,) = model.example(3)
    _no_warning(lambda: PatternNet(model, random_patterns(model, (x,))).attribute(x, target=0))


EDITS = {
    "data-mul": lambda m: m[11].weight.data.mul_(1.5),
    "data-setitem": lambda m: m[11].weight.data.__setitem__((0, 0), 3.0),
    "batchnorm-data": lambda m: m[1].running_var.data.mul_(4.0),  # folded into conv 0
    "data-assign": lambda m: setattr(m[4].weight, "data", m[4].weight.data * -1),
}


@pytest.mark.parametrize("name", sorted(EDITS))
def test_weights_edited_through_data_are_picked_up(name):
    model, patterns, x = _fitted()
    method = PatternAttribution(model, patterns)
    before = method.attribute(x, target=1)
    EDITS[name](model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        after = method.attribute(x, target=1)
    # a whole-tensor edit breaks wᵀa = 1 of the fit, so it is also announced
    if name != "data-setitem":
        assert any("weights changed since the fit" in str(w.message) for w in caught)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = PatternAttribution(model, patterns).attribute(x, target=1)
    assert torch.equal(after, fresh)
    assert not torch.allclose(after, before)


def test_a_replaced_layer_is_picked_up_or_refused():
    model, patterns, x = _fitted()
    method = PatternAttribution(model, patterns)
    method.attribute(x, target=3)
    replacement = copy.deepcopy(model[11])
    with torch.no_grad():
        replacement.weight.mul_(-2)
    model[11] = replacement
    with pytest.warns(UserWarning, match="not fitted on its current weights"):
        after = method.attribute(x, target=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(after, PatternAttribution(model, patterns).attribute(x, target=3))
    model[11] = nn.Linear(32, 7)
    with pytest.raises(PatternMismatchError, match="layer '11'"):
        method.attribute(x, target=3)


def test_an_activation_replaced_after_the_first_call_is_seen():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    patterns = PatternFitter(model).fit([torch.randn(64, 3)])
    pn, x = PatternNet(model, patterns), torch.randn(2, 3)
    pn.attribute(x, target=0)  # the regimes are found on this first call
    model[1] = nn.LeakyReLU(0.1)
    with pytest.raises(PatternMismatchError, match="fitted with relu .* now runs leaky_relu"):
        pn.attribute(x, target=0)
    model[1] = nn.Hardtanh(0.0, 1.0)  # another regime set: refused as well
    with pytest.raises(PatternMismatchError, match="now runs hardtanh"):
        pn.attribute(x, target=0)
    model[1] = nn.ReLU()  # a new ReLU object: the fitted function again
    assert torch.equal(pn.attribute(x, target=0), PatternNet(model, patterns).attribute(x, 0))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool, torch.complex64])
def test_patterns_cast_in_memory_to_a_non_real_dtype_are_refused(dtype):
    """Cast at use, they would explain with truncated, 0/1 or real-part patterns."""
    model, patterns, _ = _fitted()
    with pytest.raises(PatternMismatchError, match=rf"a_plus has dtype {dtype}"):
        patterns.to(dtype=dtype)
    lp = next(iter(patterns.values()))
    with pytest.raises(PatternMismatchError, match="zero masks are bool"):
        type(lp)(lp.a_plus, None, None, 1, lp.positive_fraction, {"relu": lp.positive_fraction})
    assert patterns.to(dtype=torch.float64)  # real floating point is fine
