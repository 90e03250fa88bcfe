"""A Captum drop-in: PatternAttribution(model), Captum's target rules, wrapped models.

Captum's own tests run in ``test_captum_targets.py``, ``test_captum_hook_removal.py``,
``test_captum_neuron_gradient.py`` and ``test_captum_layer_gradient_x_activation.py``
(see ``captum_suite.py``); this file adds the checks of the Captum conventions
those leave open.
"""

from __future__ import annotations

import copy
import gc
import os
import re
import tempfile
import weakref

import numpy as np
import pytest
import torch
from captum.attr import LayerGradientXActivation, Saliency
from captum.testing.helpers.basic_models import BasicModel_MultiLayer
from captum_suite import weight_patterns
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from captum_pattern import (
    InvalidInputError,
    LayerPatternAttribution,
    LayerPatternNet,
    NeuronPatternAttribution,
    NeuronPatternNet,
    PatternAttribution,
    PatternFitter,
    PatternMismatchError,
    PatternNet,
    Patterns,
)
from captum_pattern.errors import InvalidTargetError
from captum_pattern.patterns import attached_patterns

MAIN = [PatternNet, PatternAttribution]


def _mlp(outputs: int = 4) -> nn.Module:
    return nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, outputs))


def _snapshot(model: nn.Module) -> tuple:
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [(n, id(p)) for n, p in model.named_parameters()],
        [(n, id(b)) for n, b in model.named_buffers()],
        [(n, id(m), sorted(vars(m))) for n, m in model.named_modules()],
    )


def _same(before: tuple, after: tuple) -> bool:
    states = before[0].keys() == after[0].keys() and all(
        torch.equal(before[0][k], after[0][k]) for k in before[0]
    )
    return states and before[1:] == after[1:]


# --------------------------------------------------- patterns from the model
def test_fit_makes_them_the_models_patterns_without_touching_the_model():
    model = _mlp()
    before = _snapshot(model)
    patterns = PatternFitter(model).fit([torch.randn(64, 3)])
    assert _same(before, _snapshot(model))
    x = torch.randn(5, 3)
    for cls in MAIN:
        assert torch.equal(cls(model).attribute(x, target=2), cls(model, patterns).attribute(x, 2))
    assert _same(before, _snapshot(model))


def test_model_with_attached_patterns_is_collected():
    model = _mlp()
    PatternFitter(model).fit([torch.randn(32, 3)])
    method = PatternAttribution(model)
    method.attribute(torch.randn(2, 3), target=1)
    ref = weakref.ref(model)
    del model, method
    gc.collect()
    assert ref() is None


def test_load_and_attach_make_them_the_models_patterns(tmp_path):
    fitted_on = _mlp()
    patterns = PatternFitter(fitted_on).fit([torch.randn(64, 3)])
    path = tmp_path / "p.safetensors"
    patterns.save(path)
    x = torch.randn(4, 3)
    expected = PatternNet(fitted_on, patterns).attribute(x, target=0)
    loaded_into = copy.deepcopy(fitted_on)
    assert attached_patterns(loaded_into) is None
    Patterns.load(path, model=loaded_into)
    assert torch.equal(PatternNet(loaded_into).attribute(x, target=0), expected)
    attached_to = copy.deepcopy(fitted_on)
    patterns.attach(attached_to)
    assert torch.equal(PatternNet(attached_to).attribute(x, target=0), expected)


def test_explicit_patterns_win_and_a_later_fit_is_used():
    model = _mlp()
    first = PatternFitter(model).fit([torch.randn(64, 3)])
    other = PatternFitter(copy.deepcopy(model)).fit([torch.randn(64, 3) + 2])
    x = torch.randn(4, 3)
    kind = {"pattern_type": "linear"}
    explicit = PatternNet(model, other, **kind).attribute(x, target=1)
    assert torch.equal(explicit, PatternNet(copy.deepcopy(model), other, **kind).attribute(x, 1))
    method = PatternNet(model, **kind)
    assert torch.equal(method.attribute(x, 1), PatternNet(model, first, **kind).attribute(x, 1))
    assert not torch.allclose(explicit, method.attribute(x, target=1))
    other.attach(model)  # a newer fit or attach: the method follows it
    assert torch.equal(method.attribute(x, target=1), explicit)


@pytest.mark.parametrize(
    "build",
    [
        lambda m: PatternNet(m),
        lambda m: PatternAttribution(m),
        lambda m: NeuronPatternNet(m, m[1]),
        lambda m: NeuronPatternAttribution(m, m[1]),
        lambda m: LayerPatternNet(m, m[1]),
        lambda m: LayerPatternAttribution(m, [m[1]]),
    ],
)
def test_without_patterns_the_error_says_how_to_get_them(build):
    with pytest.raises(PatternMismatchError, match=r"PatternFitter\(model\)\.fit") as info:
        build(_mlp())
    assert "Patterns.load(path, model=model)" in str(info.value)
    assert "patterns.attach(model)" in str(info.value)


# -------------------------------------------------------------- error types
def _fitted_basic() -> nn.Module:
    net = BasicModel_MultiLayer()
    PatternFitter(net).fit([torch.randn(32, 3)])
    return net


@pytest.mark.parametrize("cls", MAIN)
def test_captum_target_error_tests_over_pattern_methods(cls):
    """Bodies of Captum's TestTargets.test_simple_target_missing_error and
    test_multi_target_error, with the method under test in place of IntegratedGradients."""
    net = _fitted_basic()
    inp = torch.zeros((1, 3))
    with pytest.raises(AssertionError):
        attr = cls(net)
        attr.attribute(inp)
    net = _fitted_basic()
    inp = torch.zeros((1, 3))
    with pytest.raises(AssertionError):
        attr = cls(net)
        attr.attribute(inp, additional_forward_args=(None, True), target=(1, 0))


def test_impossible_target_or_neuron_is_an_assertion_error_with_the_clear_message():
    net = _mlp(4)
    PatternFitter(net).fit([torch.randn(32, 3)])
    x = torch.randn(2, 3)
    cases = [
        (
            lambda: PatternNet(net).attribute(x, target=9),
            "target (9,): index 9 along dimension 1 is out of range",
        ),
        (lambda: LayerPatternNet(net, net[1]).attribute(x, target=(1, 2)), "too many indices"),
        (
            lambda: NeuronPatternNet(net, net[1]).attribute(x, 6),
            "neuron_selector 6: index 6 along dimension 1 is out of range for the layer's output",
        ),
    ]
    for run, message in cases:
        with pytest.raises(AssertionError, match=re.escape(message)) as info:
            run()
        assert isinstance(info.value, InvalidInputError)
        assert isinstance(info.value, InvalidTargetError)


# ------------------------------------------------------ targets and selectors
@pytest.fixture
def fitted():
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 6), nn.Unflatten(1, (2, 3)))
    PatternFitter(model).fit([torch.randn(64, 3)])
    return model, torch.randn(3, 3)


def test_unspecific_targets_and_selectors_are_refused(fitted):
    model, x = fitted
    refused = [
        (lambda: PatternNet(model).attribute(x), "target=None leaves 6 values"),
        (lambda: PatternNet(model).attribute(x, target=1), "leaves 3 values"),
        (lambda: PatternNet(model).attribute(x, target=[(0,), (1,), (1,)]), "leaves 3 values"),
        (lambda: NeuronPatternNet(model, model[1]).attribute(x, lambda h: h[:, :2]), "2 values"),
        (lambda: NeuronPatternNet(model, model[1]).attribute(x, lambda h: h.sum()), "shape ()"),
        (lambda: NeuronPatternNet(model, model[1]).attribute(x, lambda h: h[:1, 0]), r"\(1,\)"),
        (lambda: PatternNet(model).attribute(x, target=torch.tensor(1.9)), "dtype torch.float32"),
        (lambda: PatternNet(model).attribute(x, target=(torch.tensor(True),)), "integer"),
        (lambda: PatternNet(model).attribute(x, target=(True, 1)), "integer"),
    ]
    for run, message in refused:
        with pytest.raises(InvalidTargetError, match=message):
            run()
    with pytest.raises(AssertionError, match="Target not provided"):  # as Captum refuses
        Saliency(model).attribute(x.clone().requires_grad_())


def test_numpy_integers_in_lists_and_arrays_are_accepted(fitted):
    model, x = fitted
    method = PatternAttribution(model)
    expected = method.attribute(x, target=[(0, 1), (1, 2), (0, 0)])
    as_numpy = [(np.int64(0), np.int32(1)), (np.int64(1), 2), (np.uint8(0), np.int16(0))]
    assert torch.equal(method.attribute(x, target=as_numpy), expected)
    flat = nn.Sequential(*list(model)[:3])
    PatternFitter(flat).fit([torch.randn(64, 3)])
    method = PatternAttribution(flat)
    expected = method.attribute(x, target=[4, 0, 5])
    assert torch.equal(method.attribute(x, target=[np.int64(4), np.int32(0), 5]), expected)
    assert torch.equal(method.attribute(x, target=np.array([4, 0, 5])), expected)
    assert torch.equal(method.attribute(x, target=np.int64(4)), method.attribute(x, target=4))
    with pytest.raises(RuntimeError):  # Captum: gather refuses a negative per-example class
        Saliency(flat).attribute(x.clone().requires_grad_(), target=[4, -1, 5])
    with pytest.raises(InvalidTargetError, match="negative"):
        method.attribute(x, target=[4, -1, 5])


INDEX = st.integers(-7, 7)
SCALAR = st.one_of(INDEX, st.booleans(), INDEX.map(np.int64))
TARGETS = st.one_of(
    st.none(),
    SCALAR,
    st.tuples(SCALAR),
    st.tuples(INDEX, INDEX),
    INDEX.map(torch.tensor),
    st.floats(-5, 5).map(torch.tensor),
    st.booleans().map(torch.tensor),
    st.lists(INDEX, max_size=5).map(torch.tensor),
    st.lists(SCALAR, max_size=5),
    st.lists(st.tuples(INDEX), min_size=3, max_size=3),
    st.lists(st.tuples(INDEX, INDEX), min_size=3, max_size=3),
    st.lists(INDEX, min_size=3, max_size=3).map(np.array),
)
OUTPUTS = {"(N, 5)": (5,), "(N, 1)": (1,), "(N, 2, 3)": (2, 3)}


def _has_bool(target) -> bool:
    if isinstance(target, (bool, np.bool_)):
        return True
    if isinstance(target, torch.Tensor):
        return target.dtype == torch.bool
    return isinstance(target, (list, tuple)) and any(_has_bool(t) for t in target)


def _as_captum_reads(target):
    """The target with NumPy integers as Python ints (a deliberate widening, docs/captum.md)."""
    if isinstance(target, np.ndarray):
        return torch.as_tensor(target)
    if isinstance(target, np.integer):
        return int(target)
    if isinstance(target, (list, tuple)):
        return type(target)(_as_captum_reads(t) for t in target)
    return target


@given(target=TARGETS, output=st.sampled_from(sorted(OUTPUTS)))
def test_fuzzed_targets_accepted_and_refused_as_captum_saliency_does(target, output):
    """Where Saliency accepts, PatternNet with a = w from 1 is Saliency(abs=False) exactly;
    where it refuses, so do these methods.  Deliberate differences: bool targets are refused
    (Captum reads True as 1) and NumPy integers are read as ints (Captum refuses them)."""
    torch.manual_seed(0)
    shape = OUTPUTS[output]
    model = nn.Sequential(
        nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, int(np.prod(shape))), nn.Unflatten(1, shape)
    ).double()
    x = torch.randn(3, 3, dtype=torch.float64)
    try:
        captum = Saliency(model).attribute(
            x.clone().requires_grad_(), target=_as_captum_reads(target), abs=False
        )
    except (AssertionError, RuntimeError, IndexError, ValueError, TypeError):
        captum = None
    method = PatternNet(model, weight_patterns(model), start_from="one")
    if captum is None or _has_bool(target):
        with pytest.raises(InvalidTargetError):
            method.attribute(x, target=target)
    else:
        assert torch.allclose(method.attribute(x, target=target), captum, rtol=1e-12, atol=0)


# ---------------------------------------------------- layer lists and tokens
class _Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 4)
        self.hidden = nn.Linear(4, 5)
        self.relu = nn.ReLU()
        self.head = nn.Linear(5, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.hidden(self.embedding(ids)).mean(1)))


@pytest.mark.parametrize("frozen", [False, True])
def test_layer_list_on_token_ids_equals_captum_layer_gradient(frozen):
    torch.manual_seed(0)
    model = _Tokens().double()
    model.requires_grad_(not frozen)
    ids = torch.randint(0, 10, (4, 6))
    layers = [model.embedding, model.relu, model.head]
    ours = LayerPatternNet(model, layers, weight_patterns(model), start_from="one").attribute(
        ids, target=[0, 2, 1, 1]
    )
    theirs = LayerGradientXActivation(model, layers, multiply_by_inputs=False).attribute(
        ids, target=[0, 2, 1, 1]
    )
    assert isinstance(ours, list) and len(ours) == 3
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-12, atol=1e-15)
    PatternFitter(model).fit([ids])
    heat = LayerPatternAttribution(model, model.embedding).attribute(ids, target=1)
    assert heat.shape == (4, 6, 4) and heat.abs().sum() > 0
    assert [p.requires_grad for p in model.parameters()] == [not frozen] * 5


# ------------------------------------------------------------ inference mode
def test_inference_mode_error_says_what_to_do():
    model = _mlp()
    PatternFitter(model).fit([torch.randn(32, 3)])
    with torch.inference_mode():
        x = torch.randn(2, 3)
        with pytest.raises(InvalidInputError, match=r"inside torch\.inference_mode\(\)"):
            PatternNet(model).attribute(x, target=0)
    expected = PatternNet(model).attribute(x.clone(), target=0)  # an inference tensor is fine
    assert torch.equal(PatternNet(model).attribute(x, target=0), expected)


# ------------------------------------------------------------ wrapped models
def _compiled(model: nn.Module) -> nn.Module:
    return torch.compile(model, backend="eager")


WRAPPERS = {
    "dataparallel": (nn.DataParallel, nn.DataParallel),
    "compile": (_compiled, _compiled),  # the fitter runs the module inside the wrapper
}


@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_patterns_of_bare_and_wrapped_models_serve_both(name, tmp_path):
    wrap, wrap_to_fit = WRAPPERS[name]
    torch.manual_seed(0)
    bare = _mlp()
    data = [torch.randn(64, 3)]
    x = torch.randn(4, 3)
    on_bare = PatternFitter(bare).fit(data)
    expected = PatternAttribution(bare, on_bare).attribute(x, target=3)
    wrapped = wrap(bare)
    assert torch.equal(PatternAttribution(wrapped).attribute(x, target=3), expected)
    assert torch.equal(PatternAttribution(wrapped, on_bare).attribute(x, target=3), expected)
    layer = LayerPatternAttribution(bare, bare[1], on_bare).attribute(x, target=3)
    path = tmp_path / "p.safetensors"
    on_bare.save(path)
    loaded = Patterns.load(path, model=wrapped)
    assert sorted(loaded) == ["0", "2"]
    assert torch.equal(LayerPatternAttribution(wrapped, bare[1]).attribute(x, 3), layer)
    on_wrapped = PatternFitter(wrap_to_fit(bare)).fit(data)
    assert on_wrapped.fingerprint == on_bare.fingerprint
    for model in (bare, wrapped):
        got = PatternAttribution(model, on_wrapped).attribute(x, target=3)
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7)
    on_wrapped.save(path)
    for model in (bare, wrapped):
        Patterns.load(path, model=model)
        got = LayerPatternAttribution(model, bare[1]).attribute(x, target=3)
        assert torch.allclose(got, layer, rtol=1e-5, atol=1e-7)


def test_distributed_data_parallel_in_a_one_process_group(tmp_path):
    import torch.distributed as dist

    store = tempfile.mkstemp(dir=tmp_path)[1]
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        bare = _mlp()
        x = torch.randn(4, 3)
        on_bare = PatternFitter(bare).fit([torch.randn(64, 3)])
        ddp = nn.parallel.DistributedDataParallel(bare)
        expected = PatternNet(bare, on_bare).attribute(x, target=1)
        assert torch.equal(PatternNet(ddp).attribute(x, target=1), expected)
        on_ddp = PatternFitter(ddp).fit([torch.randn(64, 3)])
        assert sorted(on_ddp.for_model(bare)) == ["0", "2"]
        assert torch.equal(
            PatternNet(bare, on_ddp).attribute(x, 1), PatternNet(ddp, on_ddp).attribute(x, 1)
        )
    finally:
        dist.destroy_process_group()
        os.unlink(store) if os.path.exists(store) else None
