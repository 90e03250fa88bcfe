"""Neuron and layer variants against the explicit Jacobian of a swapped model copy."""

import copy

import pytest
import torch
from captum.attr import (
    GradientAttribution,
    LayerAttribution,
    LayerGradientXActivation,
    NeuronAttribution,
    NeuronGradient,
)

from captum_pattern import (
    InvalidInputError,
    LayerPatternAttribution,
    LayerPatternNet,
    NeuronPatternAttribution,
    NeuronPatternNet,
    PatternAttribution,
    PatternNet,
    UnsupportedModelError,
)
from models import MODELS, folded_weight, random_patterns
from reference import swapped_copy

LAYERS = [  # (model, layer, to_input, target)
    ("sequential", "1", False, 2),  # BatchNorm folded into conv "0": the pair's output
    ("sequential", "0", True, 1),  # the folded conv's input (the model input)
    ("sequential", "2", False, 3),  # in-place ReLU
    ("sequential", "4", False, 0),
    ("sequential", "11", True, 4),
    ("residual", "bn1", False, 1),
    ("residual", "conv2", True, 2),
    ("residual", "fc", True, 0),
    ("branching", "dense", False, 2),
    ("branching", "head", True, 1),
    ("branching", "pool", False, 0),
    ("tokens", "proj", False, 2),
]

NEURONS = [  # (model, layer, to_input, selector)
    ("sequential", "5", False, (3, 2, 1)),
    ("sequential", "1", False, (2, slice(None), slice(1, 4))),
    ("sequential", "6", True, lambda h: h[:, :2].sum((1, 2, 3))),
    ("sequential", "13", False, 4),
    ("residual", "bn2", False, (5, 1, 2)),
    ("residual", "fc", True, 17),
    ("branching", "dense", False, 4),
    ("branching", "head", True, (slice(0, 20),)),
    ("tokens", "proj", False, (1, 3)),
]


def _substitutes(model, patterns, kind, weighted):
    out = {}
    for name in patterns:
        a = patterns[name].pattern(kind)
        out[name] = folded_weight(model, name, patterns.folds) * a if weighted else a
    return out


def _setup(name, kind="relu"):
    torch.manual_seed(0)
    model = MODELS[name]().double()
    inputs = tuple(x.double() for x in model.example())
    patterns = random_patterns(model, inputs).to(dtype=torch.float64)
    return model, inputs, patterns


def _run_capturing(clone, layer_name, to_input, inputs, replace=None):
    """Run ``clone``; return (output, layer tensor); ``replace`` substitutes the layer tensor.

    The recorded tensor is the original; the network goes on with a copy, so
    in-place operations downstream do not change it.
    """
    module = clone.get_submodule(layer_name)
    seen = []

    def pre_hook(mod, args):
        seen.append(args[0])
        return (replace if replace is not None else args[0].clone(), *args[1:])

    def hook(mod, args, output):
        seen.append(output)
        return replace if replace is not None else output.clone()

    if to_input:
        handle = module.register_forward_pre_hook(pre_hook)
    else:
        handle = module.register_forward_hook(hook)
    try:
        output = clone(*inputs)
    finally:
        handle.remove()
    return output, seen[0]


def _select(h, selector):
    """The reference's own reading of a neuron selector: plain indexing after the batch axis."""
    if callable(selector):
        return selector(h)
    index = selector if isinstance(selector, tuple) else (selector,)
    return h[(slice(None), *index)]


def reference_neuron(model, subs, folds, inputs, layer_name, to_input, selector):
    """Jacobian of the selected neurons of one example, contracted with their values."""
    clone = swapped_copy(model, subs, folds)
    rows = [[] for _ in inputs]
    for i in range(inputs[0].shape[0]):

        def f(*xs, i=i):
            full = [torch.cat([x[:i], xi, x[i + 1 :]]) for x, xi in zip(inputs, xs)]
            _, h = _run_capturing(clone, layer_name, to_input, full)
            return _select(h, selector)[i]

        xi = tuple(x[i : i + 1] for x in inputs)
        jac = torch.autograd.functional.jacobian(f, xi)
        value = f(*xi).detach()
        for k in range(len(inputs)):
            rows[k].append(torch.tensordot(value, jac[k], dims=value.dim()))
    return tuple(torch.cat(r) for r in rows)


def reference_layer(model, subs, folds, inputs, layer_name, to_input, target):
    """Jacobian of the selected output w.r.t. the layer's tensor, contracted with its value."""
    clone = swapped_copy(model, subs, folds)
    _, h_all = _run_capturing(clone, layer_name, to_input, inputs)
    h_all = h_all.detach().clone()
    rows = []
    for i in range(h_all.shape[0]):

        def f(hi, i=i):
            h = torch.cat([h_all[:i], hi, h_all[i + 1 :]])
            output, _ = _run_capturing(clone, layer_name, to_input, inputs, replace=h)
            return output[:, target][i]  # every LAYERS target is an int

        hi = h_all[i : i + 1]
        jac = torch.autograd.functional.jacobian(f, hi)
        value = f(hi).detach()
        rows.append(torch.tensordot(value, jac, dims=value.dim()))
    return torch.cat(rows)


@pytest.mark.parametrize("case", LAYERS, ids=lambda c: f"{c[0]}-{c[1]}-{'in' if c[2] else 'out'}")
@pytest.mark.parametrize("cls", [LayerPatternNet, LayerPatternAttribution])
def test_layer_variant_matches_reference(case, cls):
    name, layer_name, to_input, target = case
    model, inputs, patterns = _setup(name)
    method = cls(model, model.get_submodule(layer_name), patterns)
    got = method.attribute(
        inputs if len(inputs) > 1 else inputs[0], target=target, attribute_to_layer_input=to_input
    )
    subs = _substitutes(model, patterns, "relu", cls is LayerPatternAttribution)
    ref = reference_layer(model, subs, patterns.folds, inputs, layer_name, to_input, target)
    assert isinstance(got, torch.Tensor) and got.shape == ref.shape
    assert ref.abs().max() > 0
    assert torch.allclose(got, ref, rtol=1e-9, atol=1e-12), (got - ref).abs().max()


@pytest.mark.parametrize("case", NEURONS, ids=lambda c: f"{c[0]}-{c[1]}-{'in' if c[2] else 'out'}")
@pytest.mark.parametrize("cls", [NeuronPatternNet, NeuronPatternAttribution])
def test_neuron_variant_matches_reference(case, cls):
    name, layer_name, to_input, selector = case
    model, inputs, patterns = _setup(name)
    method = cls(model, model.get_submodule(layer_name), patterns)
    got = method.attribute(
        inputs if len(inputs) > 1 else inputs[0],
        neuron_selector=selector,
        attribute_to_neuron_input=to_input,
    )
    got = got if isinstance(got, tuple) else (got,)
    subs = _substitutes(model, patterns, "relu", cls is NeuronPatternAttribution)
    ref = reference_neuron(model, subs, patterns.folds, inputs, layer_name, to_input, selector)
    assert any(r.abs().max() > 0 for r in ref)
    for g, r in zip(got, ref):
        assert g.shape == r.shape
        assert torch.allclose(g, r, rtol=1e-9, atol=1e-12), (g - r).abs().max()


def _weights_as_patterns(model, patterns):
    for layer in patterns:
        patterns[layer].a_plus = folded_weight(model, layer, patterns.folds).clone()
    return patterns


@pytest.mark.parametrize("case", NEURONS[:6], ids=lambda c: f"{c[0]}-{c[1]}")
def test_neuron_with_weights_as_patterns_is_captum_neuron_gradient(case):
    name, layer_name, to_input, selector = case
    model, inputs, patterns = _setup(name)
    patterns = _weights_as_patterns(model, patterns)
    layer = model.get_submodule(layer_name)
    ours = NeuronPatternNet(model, layer, patterns, start_from="one").attribute(
        inputs, selector, attribute_to_neuron_input=to_input
    )
    theirs = NeuronGradient(model, layer).attribute(
        tuple(x.clone().requires_grad_() for x in inputs),
        selector,
        attribute_to_neuron_input=to_input,
    )
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("case", LAYERS[2:], ids=lambda c: f"{c[0]}-{c[1]}")
def test_layer_with_weights_as_patterns_is_captum_layer_gradient(case):
    name, layer_name, to_input, target = case
    model, inputs, patterns = _setup(name)
    patterns = _weights_as_patterns(model, patterns)
    layer = model.get_submodule(layer_name)
    ours = LayerPatternNet(model, layer, patterns, start_from="one").attribute(
        inputs, target, attribute_to_layer_input=to_input
    )
    theirs = LayerGradientXActivation(model, layer, multiply_by_inputs=False).attribute(
        inputs, target, attribute_to_layer_input=to_input
    )
    assert torch.allclose(ours, theirs, rtol=1e-9, atol=1e-12)


def test_neuron_at_the_output_layer_is_the_main_method():
    model, (x,), patterns = _setup("sequential")
    for neuron_cls, cls in (
        (NeuronPatternNet, PatternNet),
        (NeuronPatternAttribution, PatternAttribution),
    ):
        neuron = neuron_cls(model, model[13], patterns).attribute(x, neuron_selector=3)
        assert torch.allclose(neuron, cls(model, patterns).attribute(x, target=3), rtol=1e-12)


def test_layer_at_the_model_input_is_the_main_method():
    model, (x,), patterns = _setup("sequential")
    for layer_cls, cls in (
        (LayerPatternNet, PatternNet),
        (LayerPatternAttribution, PatternAttribution),
    ):
        at_input = layer_cls(model, model[0], patterns).attribute(
            x, target=[0, 1, 2], attribute_to_layer_input=True
        )
        main = cls(model, patterns).attribute(x, target=[0, 1, 2])
        assert torch.allclose(at_input, main, rtol=1e-12)


def test_captum_types_and_interpolate():
    model, (x,), patterns = _setup("sequential")
    layer = LayerPatternAttribution(model, model[5], patterns)
    neuron = NeuronPatternNet(model, model[5], patterns)
    assert isinstance(layer, LayerAttribution) and isinstance(layer, GradientAttribution)
    assert isinstance(neuron, NeuronAttribution) and isinstance(neuron, GradientAttribution)
    for method in (layer, neuron):
        assert method.multiplies_by_inputs is False
        assert hasattr(method.attribute, "__wrapped__")
        assert method.layer is model[5]
    heat = layer.attribute(x, target=1)
    assert LayerAttribution.interpolate(heat, (12, 12)).shape == (3, 8, 12, 12)


def _state(model):
    hooks = [
        (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
        for m in model.modules()
    ]
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        hooks,
    )


def _assert_state(model, before):
    after = _state(model)
    assert before[0].keys() == after[0].keys()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1:] == after[1:]


def test_model_restored_after_success_and_after_errors():
    model, (x,), patterns = _setup("sequential")
    model.train()
    model[11].weight.requires_grad_(False)
    before = _state(model)
    NeuronPatternAttribution(model, model[5], patterns).attribute(x, (1, 2, 2))
    LayerPatternAttribution(model, model[9], patterns).attribute(x, target=0)
    _assert_state(model, before)
    with pytest.raises(InvalidInputError):
        NeuronPatternNet(model, model[5], patterns).attribute(x, (9, 0, 0))
    with pytest.raises(InvalidInputError):
        LayerPatternNet(model, model[5], patterns).attribute(x, target=7)
    _assert_state(model, before)


def test_errors_say_what_to_do():
    model, (x,), patterns = _setup("sequential")
    with pytest.raises(UnsupportedModelError, match="use the BatchNorm module"):
        LayerPatternNet(model, model[0], patterns).attribute(x, target=0)
    with pytest.raises(UnsupportedModelError, match="folded into layer '0'"):
        NeuronPatternNet(model, model[1], patterns).attribute(
            x, (0, 0, 0), attribute_to_neuron_input=True
        )
    with pytest.raises(ValueError, match="not a submodule"):
        LayerPatternNet(model, torch.nn.ReLU(), patterns)
    with pytest.raises(InvalidInputError, match="too many indices"):
        NeuronPatternNet(model, model[13], patterns).attribute(x, (1, 2))
    with pytest.raises(InvalidInputError, match="neuron_selector must be"):
        NeuronPatternNet(model, model[13], patterns).attribute(x, [1])
    residual, inputs, rpatterns = _setup("residual")
    with pytest.raises(UnsupportedModelError, match="ran 2 times"):
        LayerPatternNet(residual, residual.relu, rpatterns).attribute(inputs[0], target=0)


def test_selector_forms_agree():
    model, (x,), patterns = _setup("sequential")
    method = NeuronPatternNet(model, model[5], patterns)
    by_tuple = method.attribute(x, (2, 1, 3))
    by_callable = method.attribute(x, lambda h: h[:, 2, 1, 3])
    assert torch.allclose(by_tuple, by_callable, rtol=1e-12)
    # a slice: every selected neuron starts from its own value, the sum of their signals
    by_slice = method.attribute(x, (2, slice(1, 3), 3))
    parts = method.attribute(x, (2, 1, 3)) + method.attribute(x, (2, 2, 3))
    assert torch.allclose(by_slice, parts, rtol=1e-9, atol=1e-12)


def test_does_not_change_a_deep_copy_result():
    """Two instances on the same model give the same answer: no state is kept on the modules."""
    model, (x,), patterns = _setup("sequential")
    clone = copy.deepcopy(model)
    a = LayerPatternAttribution(model, model[5], patterns).attribute(x, target=2)
    b = LayerPatternAttribution(clone, clone[5], patterns).attribute(x, target=2)
    assert torch.equal(a, b)
