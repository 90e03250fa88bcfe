"""Small models covering the module types the attributions must handle.

The tests' own decisions are written here by hand, not asked of the package:
each model's ``FOLDS`` (which BatchNorm reads which layer's output unchanged,
read off its ``forward``; none for a model without BatchNorm) and
:func:`linear_layers` (every Linear and ConvNd).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from captum_pattern import LayerPatterns, Patterns


def _randomize_batchnorm(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


class SequentialCNN(nn.Sequential):
    """Conv+BN (folded), in-place ReLU, max pool, 'same' padding, adaptive pool, dropout."""

    FOLDS: ClassVar[dict[str, str]] = {"0": "1"}  # the BatchNorm right after the first conv

    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(2, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3, padding="same", stride=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Dropout(0.5),
            nn.Linear(32, 16),
            nn.ReLU(),
            nn.Linear(16, 5),
        )
        _randomize_batchnorm(self)

    @staticmethod
    def example(n: int = 3) -> tuple[torch.Tensor, ...]:
        return (torch.randn(n, 2, 12, 12),)


class Residual(nn.Module):
    """A residual block with BatchNorm (folded), a reused ReLU module and F.relu."""

    FOLDS: ClassVar[dict[str, str]] = {
        "stem": "bn0",
        "conv1": "bn1",
        "conv2": "bn2",
    }  # each bn reads its conv alone

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False, padding_mode="reflect")
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(8 * 4 * 4, 4)
        _randomize_batchnorm(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn0(self.stem(x)))
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        x = F.relu(x + y)
        return self.fc(torch.flatten(self.pool(x), 1))

    @staticmethod
    def example(n: int = 3) -> tuple[torch.Tensor, ...]:
        return (torch.randn(n, 3, 8, 8),)


class Branching(nn.Module):
    """Two inputs, two branches (Conv1d and Linear) concatenated; an extra scale argument."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, dilation=2, padding=2)
        self.pool = nn.MaxPool1d(2)
        self.dense = nn.Linear(5, 6)
        self.head = nn.Linear(4 * 5 + 6, 3)

    def forward(self, signal: torch.Tensor, vector: torch.Tensor, scale: float = 1.0):
        a = torch.flatten(self.pool(F.relu(self.conv(signal))), 1)
        b = F.relu(self.dense(vector))
        return self.head(torch.cat([a, b], dim=1)) * scale

    @staticmethod
    def example(n: int = 3) -> tuple[torch.Tensor, ...]:
        return (torch.randn(n, 2, 10), torch.randn(n, 5))


class Volumetric(nn.Module):
    """Conv3d with groups and replicate padding, output with two trailing dims."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 4, 2, groups=2, padding=1, padding_mode="replicate")
        self.pool = nn.AdaptiveMaxPool3d(1)
        self.fc = nn.Linear(4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.flatten(self.pool(F.relu(self.conv(x))), 1)
        return self.fc(h).view(-1, 2, 3)

    @staticmethod
    def example(n: int = 2) -> tuple[torch.Tensor, ...]:
        return (torch.randn(n, 2, 4, 5, 3),)


class Tokens(nn.Module):
    """Linear layers on (batch, tokens, features) input, mean over tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.proj(x)).mean(1))

    @staticmethod
    def example(n: int = 3) -> tuple[torch.Tensor, ...]:
        return (torch.randn(n, 5, 4),)


MODELS = {
    "sequential": SequentialCNN,
    "residual": Residual,
    "branching": Branching,
    "volumetric": Volumetric,
    "tokens": Tokens,
}


def folds_of(model: nn.Module) -> dict[str, str]:
    """``{layer: batchnorm}`` written out by hand: the class's ``FOLDS``.

    A model without ``FOLDS`` may have no BatchNorm at all (then nothing folds);
    otherwise its folds must be written out and passed explicitly.
    """
    folds = getattr(type(model), "FOLDS", None)
    if folds is not None:
        return dict(folds)
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise TypeError(f"{type(model).__name__} has BatchNorms: write its folds out by hand")
    return {}


def check_folds(model: nn.Module, folds: dict[str, str], inputs: tuple[torch.Tensor, ...]) -> None:
    """Each BatchNorm of ``folds`` reads exactly its layer's output values (one forward)."""
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in folds}
    bn_inputs: dict[str, list[torch.Tensor]] = {name: [] for name in folds}
    handles = []
    for layer, bn in folds.items():
        handles.append(
            model.get_submodule(layer).register_forward_hook(
                lambda m, i, o, k=layer: outputs[k].append(o.detach().clone())
            )
        )
        handles.append(
            model.get_submodule(bn).register_forward_pre_hook(
                lambda m, i, k=layer: bn_inputs[k].append(i[0].detach().clone())
            )
        )
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    for layer, bn in folds.items():
        pairs = list(zip(outputs[layer], bn_inputs[layer]))
        assert pairs and len(outputs[layer]) == len(bn_inputs[layer]), (layer, bn)
        assert all(torch.equal(out, read) for out, read in pairs), (layer, bn)


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear and Conv1d/2d/3d of ``model`` by name: the layers a pattern replaces."""
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return {name: m for name, m in model.named_modules() if isinstance(m, kinds)}


def random_patterns(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...] | None = None,
    folds: dict[str, str] | None = None,
) -> Patterns:
    """Patterns with random values (not fitted) for every :func:`linear_layers` entry.

    ``folds`` defaults to :func:`folds_of`; with ``inputs`` they are checked
    against one forward pass first (:func:`check_folds`).
    """
    folds = folds_of(model) if folds is None else folds
    if inputs is not None:
        check_folds(model, folds, inputs)
    layers = {}
    for name, layer in linear_layers(model).items():
        shape = layer.weight.shape
        layers[name] = LayerPatterns(
            a_plus=torch.randn(shape),
            a_minus=torch.randn(shape),
            a_linear=torch.randn(shape),
            n_samples=1,
            positive_fraction=torch.full((shape[0],), 0.5),
            folded_batchnorm=folds.get(name),
        )
    return Patterns(layers)


def folded_weight(model: nn.Module, name: str, folds: dict[str, str]) -> torch.Tensor:
    """The layer's weight with its BatchNorm folded in, written out for the tests."""
    weight = model.get_submodule(name).weight.detach()
    if name not in folds:
        return weight
    bn = model.get_submodule(folds[name])
    gamma = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    return weight * gamma.view(-1, *[1] * (weight.dim() - 1))


def hook_counts(model: nn.Module) -> list[tuple[str, int, int, int]]:
    """Forward, pre-forward and backward hooks of every module."""
    return [
        (name, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
        for name, m in model.named_modules()
    ]


def model_state(model: nn.Module) -> dict:
    """Everything attribute/fit must leave as it was: tensors, modes, flags, hooks."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "modes": [m.training for m in model.modules()],
        "grad": [p.requires_grad for p in model.parameters()],
        "hooks": hook_counts(model),
    }


def assert_same_state(model: nn.Module, snap: dict) -> None:
    state = model.state_dict()
    assert state.keys() == snap["state"].keys()
    for k, v in snap["state"].items():
        assert torch.equal(state[k], v), k
    assert [m.training for m in model.modules()] == snap["modes"]
    assert [p.requires_grad for p in model.parameters()] == snap["grad"]
    assert hook_counts(model) == snap["hooks"]
