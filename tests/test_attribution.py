"""PatternNet / PatternAttribution against the explicit Jacobian of a swapped model copy."""

import pytest
import torch
from captum.attr import Saliency

from captum_pattern import PatternAttribution, PatternFitter, PatternNet
from captum_pattern.errors import InvalidTargetError
from models import MODELS, Branching, Volumetric, folded_weight, folds_of, random_patterns
from reference import reference_backward

TARGETS = {
    "sequential": 2,
    "residual": 1,
    "branching": 0,
    "volumetric": (1, 2),
    "tokens": 2,
}
#: the reference's own reading of each target: plain indexing of the output
SELECT = {
    "sequential": lambda out: out[:, 2],
    "residual": lambda out: out[:, 1],
    "branching": lambda out: out[:, 0],
    "volumetric": lambda out: out[:, 1, 2],
    "tokens": lambda out: out[:, 2],
}


def _substitutes(model, patterns, kind, weighted):
    folds = patterns.folds
    out = {}
    for name in patterns:
        a = patterns[name].pattern(kind)
        out[name] = folded_weight(model, name, folds) * a if weighted else a
    return out


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("method", [PatternNet, PatternAttribution])
@pytest.mark.parametrize("kind", ["relu", "linear"])
def test_matches_explicit_jacobian_of_swapped_copy(name, method, kind):
    model = MODELS[name]().double()
    inputs = tuple(x.double() for x in model.example())
    patterns = random_patterns(model, inputs).to(dtype=torch.float64)
    target = TARGETS[name]
    result = method(model, patterns, pattern_type=kind).attribute(
        inputs if len(inputs) > 1 else inputs[0], target=target
    )
    result = result if isinstance(result, tuple) else (result,)
    subs = _substitutes(model, patterns, kind, weighted=method is PatternAttribution)
    expected = reference_backward(model, subs, patterns.folds, inputs, SELECT[name])
    for got, ref in zip(result, expected):
        assert got.shape == ref.shape
        assert torch.allclose(got, ref, rtol=1e-9, atol=1e-12), (got - ref).abs().max()


@pytest.mark.parametrize("name", MODELS)
def test_weights_as_patterns_give_gradient_times_output(name):
    """With a = w (folded), PatternNet is the gradient scaled by the output."""
    model = MODELS[name]().double()
    inputs = tuple(x.double() for x in model.example())
    patterns = random_patterns(model, inputs).to(dtype=torch.float64)
    folds = folds_of(model)
    for layer in patterns:
        patterns[layer].a_plus = folded_weight(model, layer, folds).clone()
    target = TARGETS[name]
    ours = PatternNet(model, patterns).attribute(inputs, target=target)
    ones = PatternNet(model, patterns, start_from="one").attribute(inputs, target=target)
    grads = Saliency(model).attribute(
        tuple(x.clone().requires_grad_() for x in inputs), target=target, abs=False
    )
    y = SELECT[name](model(*inputs)).detach()
    for got, got_one, grad in zip(ours, ones, grads):
        scale = y.reshape(-1, *[1] * (grad.dim() - 1)) if y.dim() == 1 else None
        if scale is not None:
            assert torch.allclose(got, grad * scale, rtol=1e-9, atol=1e-12)
        assert torch.allclose(got_one, grad, rtol=1e-9, atol=1e-12)


def test_fitted_patterns_on_sequential_match_reference():
    model = MODELS["sequential"]()
    data = [torch.randn(16, 2, 12, 12) for _ in range(3)]
    patterns = PatternFitter(model).fit(data)
    assert patterns.folds == {"0": "1"}
    x = torch.randn(4, 2, 12, 12)
    for method, weighted in ((PatternNet, False), (PatternAttribution, True)):
        got = method(model, patterns).attribute(x, target=[0, 1, 2, 3])
        subs = _substitutes(model, patterns, "relu", weighted)
        (ref,) = reference_backward(
            model, subs, patterns.folds, (x,), lambda o: o[torch.arange(4), torch.arange(4)]
        )
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-6)


def test_volumetric_multi_dim_output_and_list_of_tuples():
    model = Volumetric().double()
    (x,) = tuple(t.double() for t in model.example(3))
    patterns = random_patterns(model, (x,)).to(dtype=torch.float64)
    target = [(0, 1), (1, 2), (1, 0)]
    got = PatternNet(model, patterns).attribute(x, target=target)
    subs = _substitutes(model, patterns, "relu", False)
    select = lambda o: o[torch.arange(3), [0, 1, 1], [1, 2, 0]]  # noqa: E731
    (ref,) = reference_backward(model, subs, {}, (x,), select)
    assert torch.allclose(got, ref, rtol=1e-9, atol=1e-12)


def test_int_target_on_3d_output_is_refused_like_captum():
    """Captum: an int target on (N, A, B) leaves B values per example: refused, not summed."""
    model = Volumetric().double()
    (x,) = tuple(t.double() for t in model.example(2))
    patterns = random_patterns(model, (x,)).to(dtype=torch.float64)
    with pytest.raises(AssertionError, match="Target not provided"):
        Saliency(model).attribute(x.clone().requires_grad_(), target=1)
    with pytest.raises(InvalidTargetError, match="leaves 3 values per example"):
        PatternNet(model, patterns).attribute(x, target=1)


def test_additional_forward_args_reach_the_model():
    model = Branching().double()
    inputs = tuple(x.double() for x in model.example())
    patterns = random_patterns(model, inputs).to(dtype=torch.float64)
    pa = PatternNet(model, patterns)
    plain = pa.attribute(inputs, target=1)
    scaled = pa.attribute(inputs, target=1, additional_forward_args=(3.0,))
    # the output is scaled by 3 and the backward starts from it: 9x
    for a, b in zip(plain, scaled):
        assert torch.allclose(b, 9 * a)
