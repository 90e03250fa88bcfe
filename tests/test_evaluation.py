"""The Quantus adapter: its documented call contract, and Quantus itself where installed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from captum_pattern import (
    InvalidInputError,
    LayerPatternAttribution,
    NeuronPatternNet,
    PatternAttribution,
    PatternFitter,
    PatternNet,
)
from captum_pattern.evaluation import (
    METHODS,
    PatternExplainer,
    explain,
    image_mean_fill,
    replace_by_fill,
)
from captum_pattern.metrics import patch_degradation
from captum_pattern.zoo import SmallCNN, digits, train_classifier

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    return digits(seed=0).x_train[:256]


@pytest.fixture(scope="module")
def cnn(data: torch.Tensor) -> tuple[nn.Module, object]:
    # trained briefly: every class's logit is positive on some images, so the output
    # layer's a+ pattern is not empty for any class (it would be on an untrained net)
    torch.manual_seed(0)
    split = digits(seed=0)
    model = train_classifier(SmallCNN(), split.x_train[:512], split.y_train[:512], 4, lr=3e-3)
    model.eval()  # train_classifier hands the model back in the mode it was given
    return model, PatternFitter(model).fit(data.split(64))


def _batch(n: int = 6) -> tuple[np.ndarray, np.ndarray]:
    x = digits(seed=0).x_test[:n].numpy()
    return x, np.arange(n) % 10


# ------------------------------------------------------------- the call contract
@pytest.mark.parametrize(
    "method,cls", [("pattern_net", PatternNet), ("pattern_attribution", PatternAttribution)]
)
def test_numpy_in_numpy_out_equals_the_captum_method(cnn, method, cls):
    model, patterns = cnn
    x, y = _batch()
    a = explain(model=model, inputs=x, targets=y, method=method, patterns=patterns, reduce_axes=())
    assert isinstance(a, np.ndarray) and a.shape == x.shape and a.dtype == np.float32
    expected = cls(model, patterns).attribute(torch.from_numpy(x), target=torch.from_numpy(y))
    np.testing.assert_allclose(a, expected.numpy(), rtol=1e-5, atol=1e-7)


def test_default_sums_channels_like_quantus_explain(cnn):
    model, patterns = cnn
    x = np.repeat(_batch()[0], 1, axis=1)
    y = np.array([3, 1, 4, 1, 5, 9])
    full = explain(model=model, inputs=x, targets=y, patterns=patterns, reduce_axes=())
    summed = explain(model=model, inputs=x, targets=y, patterns=patterns)
    dropped = explain(model=model, inputs=x, targets=y, patterns=patterns, keepdims=False)
    assert summed.shape == (6, 1, 8, 8) and dropped.shape == (6, 8, 8)
    np.testing.assert_allclose(summed, full.sum(1, keepdims=True), rtol=1e-6)


def test_three_channel_inputs_are_summed_per_pixel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    patterns = PatternFitter(model).fit([torch.randn(64, 3, 6, 6)])
    x = np.random.default_rng(0).normal(size=(4, 3, 6, 6)).astype("float32")
    full = explain(model=model, inputs=x, targets=[0, 1, 2, 0], patterns=patterns, reduce_axes=())
    summed = explain(model=model, inputs=x, targets=[0, 1, 2, 0], patterns=patterns)
    assert full.shape == x.shape and summed.shape == (4, 1, 6, 6)
    np.testing.assert_allclose(summed[:, 0], full.sum(1), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "targets",
    [
        np.array([2, 2, 2, 2, 2, 2]),
        np.array([2.0] * 6),
        torch.full((6,), 2),
        [2] * 6,
        2,
        np.int64(2),
        np.array(2),
    ],
    ids=["numpy", "numpy-float", "tensor", "list", "int", "numpy-scalar", "numpy-0d"],
)
def test_every_target_form_selects_the_same_class(cnn, targets):
    model, patterns = cnn
    x, _ = _batch()
    reference = PatternAttribution(model, patterns).attribute(torch.from_numpy(x), target=2)
    a = explain(model=model, inputs=x, targets=targets, patterns=patterns, reduce_axes=())
    np.testing.assert_allclose(a, reference.numpy(), rtol=1e-5, atol=1e-7)


def test_per_example_targets_are_used_per_example(cnn):
    model, patterns = cnn
    x, _ = _batch()
    y = np.array([0, 1, 2, 3, 4, 5])
    a = explain(model=model, inputs=x, targets=y, patterns=patterns, reduce_axes=())
    for i in range(6):
        one = PatternAttribution(model, patterns).attribute(
            torch.from_numpy(x[i : i + 1]), target=int(y[i])
        )
        np.testing.assert_allclose(a[i : i + 1], one.numpy(), rtol=1e-5, atol=1e-7)


def test_batches_give_the_same_result(cnn):
    model, patterns = cnn
    x, y = _batch()
    whole = explain(model=model, inputs=x, targets=y, patterns=patterns)
    chunked = explain(model=model, inputs=x, targets=y, patterns=patterns, batch_size=4)
    np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-8)


def test_tensor_and_float64_inputs(cnn):
    model, patterns = cnn
    x, y = _batch()
    from_numpy = explain(model=model, inputs=x, targets=y, patterns=patterns)
    from_tensor = explain(
        model=model, inputs=torch.from_numpy(x), targets=torch.from_numpy(y), patterns=patterns
    )
    from_double = explain(model=model, inputs=x.astype(np.float64), targets=y, patterns=patterns)
    np.testing.assert_array_equal(from_tensor, from_numpy)
    np.testing.assert_allclose(from_double, from_numpy, rtol=1e-6)
    assert from_double.dtype == np.float32  # computed in the model's dtype


@pytest.mark.parametrize("device", DEVICES)
def test_model_on_any_device_gives_cpu_numpy(cnn, device):
    model, patterns = cnn
    x, y = _batch()
    reference = explain(model=model, inputs=x, targets=y, patterns=patterns)
    moved = SmallCNN().to(device).eval()
    moved.load_state_dict(model.state_dict())
    a = explain(
        model=moved,
        inputs=torch.from_numpy(x).to(device),
        targets=y,
        patterns=patterns,
        device=device,
    )
    assert isinstance(a, np.ndarray)
    np.testing.assert_allclose(a, reference, rtol=1e-4, atol=1e-6)


def test_two_dimensional_inputs_are_not_reduced():
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2))
    patterns = PatternFitter(model).fit([torch.randn(128, 5)])
    x = np.random.default_rng(1).normal(size=(3, 5)).astype("float32")
    a = explain(model=model, inputs=x, targets=np.array([0, 1, 0]), patterns=patterns)
    assert a.shape == (3, 5)


def test_neuron_method_explains_the_selected_neuron(cnn):
    model, patterns = cnn
    x, y = _batch()
    a = explain(
        model=model,
        inputs=x,
        targets=y,
        method="neuron_pattern_net",
        layer="fc1",
        neuron_selector=7,
        patterns=patterns,
        reduce_axes=(),
    )
    expected = NeuronPatternNet(model, model.fc1, patterns).attribute(
        torch.from_numpy(x), neuron_selector=7
    )
    np.testing.assert_allclose(a, expected.numpy(), rtol=1e-5, atol=1e-7)


def test_layer_method_is_summed_and_resized_to_the_input(cnn):
    model, patterns = cnn
    x, y = _batch()
    a = explain(
        model=model,
        inputs=x,
        targets=y,
        method="layer_pattern_attribution",
        layer="pool1",
        patterns=patterns,
    )
    assert a.shape == (6, 1, 8, 8)
    at_layer = LayerPatternAttribution(model, model.pool1, patterns).attribute(
        torch.from_numpy(x), target=torch.from_numpy(y)
    )
    assert at_layer.shape == (6, 32, 4, 4)
    # bilinear 2x upsampling keeps the mean of each image's channel-summed map
    np.testing.assert_allclose(a.mean((1, 2, 3)), at_layer.sum(1).mean((1, 2)).numpy(), rtol=1e-4)


def test_layer_method_refuses_a_dense_layer(cnn):
    model, patterns = cnn
    x, y = _batch()
    with pytest.raises(InvalidInputError, match="fc1"):
        explain(
            model=model,
            inputs=x,
            targets=y,
            method="layer_pattern_net",
            layer="fc1",
            patterns=patterns,
        )


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"method": "saliency"}, ValueError, "unknown method"),
        ({"patterns": None}, ValueError, "needs patterns"),
        ({"colour": True}, TypeError, "colour"),
        ({"channel_first": False}, InvalidInputError, "channel"),
        ({"method": "neuron_pattern_net"}, ValueError, "layer"),
        ({"method": "neuron_pattern_net", "layer": "fc9"}, ValueError, "fc9"),
        ({"method": "neuron_pattern_net", "layer": "fc1"}, ValueError, "neuron_selector"),
    ],
)
def test_clear_errors(cnn, kwargs, error, match):
    model, patterns = cnn
    x, y = _batch()
    options = {"patterns": patterns, **kwargs}
    with pytest.raises(error, match=match):
        explain(model=model, inputs=x, targets=y, **options)


def test_wrong_number_of_targets(cnn):
    model, patterns = cnn
    x, _ = _batch()
    with pytest.raises(InvalidInputError, match="3 classes for 6 inputs"):
        explain(model=model, inputs=x, targets=np.array([1, 2, 3]), patterns=patterns)
    with pytest.raises(InvalidInputError, match="class indices"):
        explain(model=model, inputs=x, targets=np.full(6, 1.5), patterns=patterns)


# ----------------------------------------------------------- PatternExplainer
def test_explainer_with_fixed_patterns_matches_explain(cnn):
    model, patterns = cnn
    x, y = _batch()
    explainer = PatternExplainer("pattern_net", patterns=patterns)
    np.testing.assert_array_equal(
        explainer(model=model, inputs=x, targets=y),
        explain(model=model, inputs=x, targets=y, method="pattern_net", patterns=patterns),
    )


def test_explainer_refits_when_the_weights_change(cnn, data):
    model, patterns = cnn
    x, y = _batch()
    explainer = PatternExplainer("pattern_net", fit_data=list(data.split(64)))
    first = explainer.patterns_for(model)
    assert explainer.patterns_for(model) is first  # same weights: fitted once
    np.testing.assert_allclose(
        explainer(model=model, inputs=x, targets=y),
        explain(model=model, inputs=x, targets=y, method="pattern_net", patterns=patterns),
        rtol=1e-5,
        atol=1e-7,
    )
    randomised = SmallCNN().eval()
    randomised.load_state_dict(model.state_dict())
    with torch.no_grad():
        randomised.fc2.weight.normal_()
    refitted = explainer.patterns_for(randomised)
    assert refitted is not first
    expected = PatternFitter(randomised).fit(data.split(64))
    torch.testing.assert_close(refitted["fc2"].pattern("relu"), expected["fc2"].pattern("relu"))


def test_explainer_needs_one_source_of_patterns(cnn, data):
    with pytest.raises(ValueError, match="exactly one"):
        PatternExplainer("pattern_net")
    with pytest.raises(ValueError, match="exactly one"):
        PatternExplainer("pattern_net", patterns=cnn[1], fit_data=[data])


# ------------------------------------------------ RegionPerturbation settings
def test_replace_by_fill_replaces_only_the_indices():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 2, 4, 4))
    fill = image_mean_fill(x)
    arr = x.reshape(3, -1)
    indices = np.array([[0, 5, 17], [1, 2, 3], [31, 30, 16]])
    out = replace_by_fill(arr, indices, fill)
    for i in range(3):
        changed = np.flatnonzero(out[i] != arr[i])
        assert set(changed) <= set(indices[i])
        np.testing.assert_array_equal(out[i, indices[i]], fill[i, indices[i]])
        # channel 0 occupies the first 16 entries: each pixel takes its own channel's mean
        for j in indices[i]:
            assert out[i, j] == x[i, j // 16].mean()
    assert not np.shares_memory(out, arr)
    with pytest.raises(InvalidInputError, match="batch_size"):
        replace_by_fill(arr[:2], indices[:2], fill)


# ------------------------------------------------------------- Quantus itself


def _quantus():
    return pytest.importorskip("quantus")


@pytest.mark.parametrize("method", ["pattern_net", "pattern_attribution"])
def test_quantus_calls_it_as_explain_func(cnn, method):
    q = _quantus()
    model, patterns = cnn
    x, y = _batch(8)
    metric = q.Sparseness(disable_warnings=True)
    kwargs = {"method": method, "patterns": patterns}
    scores = metric(
        model=model, x_batch=x, y_batch=y, explain_func=explain, explain_func_kwargs=kwargs
    )
    a = explain(model=model, inputs=x, targets=y, **kwargs)
    precomputed = metric(model=model, x_batch=x, y_batch=y, a_batch=a)
    assert len(scores) == 8 and np.all(np.isfinite(scores))
    np.testing.assert_allclose(scores, precomputed, rtol=1e-6)


def test_quantus_random_logit_and_max_sensitivity_with_the_explainer(cnn):
    q = _quantus()
    model, patterns = cnn
    x, y = _batch(4)
    explainer = PatternExplainer("pattern_attribution", patterns=patterns)
    logit = q.RandomLogit(
        num_classes=10,
        seed=0,
        similarity_func=q.similarity_func.correlation_spearman,
        disable_warnings=True,
    )
    scores = logit(model=model, x_batch=x, y_batch=y, explain_func=explainer)
    # another class gives another explanation: similarity below 1 for some image
    assert len(scores) == 4 and np.all(np.isfinite(scores)) and min(scores) < 0.999
    sensitivity = q.MaxSensitivity(nr_samples=3, disable_warnings=True)
    scores = sensitivity(model=model, x_batch=x, y_batch=y, explain_func=explainer, device="cpu")
    assert len(scores) == 4 and np.all(np.isfinite(scores)) and min(scores) >= 0


def test_quantus_region_perturbation_reproduces_patch_degradation(cnn):
    q = _quantus()
    model, patterns = cnn
    x, _ = _batch(12)
    images = torch.from_numpy(x)
    predicted = model(images).argmax(1).numpy()
    ours = patch_degradation(
        model,
        images,
        PatternAttribution(model, patterns),
        patch_size=2,
        steps=16,
        random_baseline=False,
    )
    metric = q.RegionPerturbation(
        patch_size=2,
        regions_evaluation=16,
        order="morf",
        abs=False,
        normalise=False,
        perturb_func=replace_by_fill,
        perturb_func_kwargs={"fill": image_mean_fill(x)},
        disable_warnings=True,
    )
    drops = metric(
        model=model,
        x_batch=x,
        y_batch=predicted,
        explain_func=explain,
        explain_func_kwargs={"patterns": patterns},
        batch_size=len(x),
        softmax=True,
    )
    curves = ours.curves[:, :1].numpy() - np.asarray(drops)
    np.testing.assert_allclose(curves, ours.curves[:, 1:].numpy(), rtol=0, atol=1e-6)


def test_methods_table_is_complete():
    assert set(METHODS) == {
        f"{scope}pattern_{kind}"
        for scope in ("", "neuron_", "layer_")
        for kind in ("net", "attribution")
    }
