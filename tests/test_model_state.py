"""One model-state policy: every entry point that runs a user's model gives it back as it was.

The model: in training mode, with a BatchNorm frozen in eval mode inside it and
one parameter frozen (``requires_grad=False``).  After each call, returning or
raising, every module's mode and every parameter's flag are what they were.
``model.train(was_training)`` would put the frozen BatchNorm back in training
mode: that is what these tests catch.
"""

import pytest
import torch
from torch import nn

from captum_pattern import PatternFitter
from captum_pattern.compare import explain
from captum_pattern.metrics import patch_degradation
from captum_pattern.zoo import accuracy, train_classifier


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.BatchNorm2d(4),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 3),
    )
    model.train()
    model[2].eval()  # frozen BatchNorm
    model[0].bias.requires_grad_(False)  # frozen parameter
    return model


def _state(model: nn.Module) -> tuple[list[bool], list[bool]]:
    return [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()]


X = torch.rand(4, 1, 6, 6)
Y = torch.tensor([0, 1, 2, 1])


def _explain(model, fail):
    patterns = PatternFitter(model).fit([torch.rand(16, 1, 6, 6)])
    explain(model, X, 7 if fail else Y, patterns, methods=["Gradient", "PatternNet"])


def _degradation(model, fail):
    heat = torch.rand(4, 1, 5, 5) if fail else torch.rand(4, 1, 6, 6)
    patch_degradation(model, X, heat, patch_size=2, steps=3)


def _train(model, fail):
    def on_epoch(epoch, loss):
        if fail:
            raise KeyboardInterrupt

    train_classifier(model, X, Y, epochs=1, batch_size=2, on_epoch=on_epoch)


CALLS = {"explain": _explain, "degradation": _degradation, "train": _train}


@pytest.mark.parametrize("name", list(CALLS))
@pytest.mark.parametrize("fail", [False, True], ids=["returns", "raises"])
def test_modes_and_flags_come_back_per_module(name, fail):
    model = _model()
    before = _state(model)
    assert before[0][3] is False and before[0][0] is True  # the set-up is what we say
    if fail:
        with pytest.raises((Exception, KeyboardInterrupt)):
            CALLS[name](model, fail)
    else:
        CALLS[name](model, fail)
    assert _state(model) == before


def test_accuracy_runs_in_eval_mode_and_restores():
    model = _model()
    model.append(nn.Dropout(0.9))
    before = _state(model)
    torch.manual_seed(1)
    assert accuracy(model, X, Y) == accuracy(model, X, Y)  # dropout off: deterministic
    assert _state(model) == before


def test_training_keeps_a_frozen_batchnorm_frozen():
    model = _model()
    stats = model[2].running_mean.clone()
    train_classifier(model, X, Y, epochs=1, batch_size=2)
    assert torch.equal(model[2].running_mean, stats)  # eval mode during training too
    fresh = _model().eval()  # a model given in eval mode trains every module
    train_classifier(fresh, X, Y, epochs=1, batch_size=2)
    assert not torch.equal(fresh[2].running_mean, stats)
    assert not any(m.training for m in fresh.modules())  # and comes back in eval mode
