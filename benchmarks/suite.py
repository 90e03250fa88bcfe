"""What the benchmarks share: the run's sizes, the models, training, fitting, timing, plots.

Used by the tests of ``pytest benchmarks`` and by ``python benchmarks/report.py``.

Every model is built only from module types Captum's LRP supports (``Linear``,
``Conv2d``, ``ReLU``, ``MaxPool2d``, ``Dropout``; flattening in ``forward``)
and trained here from a fixed seed, so every method runs on it and a run is
reproducible.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import matplotlib as mpl
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from captum_pattern import PatternFitter, Patterns
from captum_pattern.compare import METHODS, explain_in_batches
from captum_pattern.zoo import SmallCNN, VGGStyle, accuracy, digits, photo_crops, train_classifier

#: every method of the comparison, in table order
ALL_METHODS: tuple[str, ...] = tuple(METHODS)
SIGNAL_METHODS: tuple[str, ...] = tuple(n for n, m in METHODS.items() if m.group == "signal")


@dataclass(frozen=True)
class Config:
    """Sizes of one benchmark run (the default fits in minutes on 2 CPU cores)."""

    gt_train: int = 2000  # 8×8 ground-truth training samples (+1000 for testing)
    gt_explain: int = 100  # correctly classified test samples explained
    gt_mlp_epochs: int = 40
    gt_cnn_epochs: int = 10
    gt64: tuple[tuple[str, str], ...] = (("linear", "white"),)
    gt64_train: int = 1500
    gt64_epochs: int = 10
    wilming_n: int = 2000
    digits_epochs: int = 20
    vgg_width: float = 1 / 8
    vgg_size: int = 64
    vgg_train: int = 2400
    vgg_epochs: int = 8
    rho_split: int = 512  # images per split (patterns, v, evaluation) on the VGG-style net
    degradation_images: int = 48
    degradation_steps: int = 24
    degradation_patch: int = 4
    speed_images: int = 128
    speed_repeats: int = 2
    large: bool = False

    @classmethod
    def large_run(cls) -> Config:
        every = tuple(
            (s, b)
            for s in ("linear", "multiplicative", "rigid", "xor")
            for b in ("white", "correlated")
        )
        return replace(
            cls(),
            gt_train=8000,
            gt_explain=500,
            gt_cnn_epochs=15,
            gt64=every,
            gt64_train=8000,
            gt64_epochs=20,
            wilming_n=8000,
            vgg_train=8000,
            vgg_epochs=15,
            rho_split=2000,
            degradation_images=256,
            degradation_steps=60,
            speed_images=1024,
            speed_repeats=3,
            large=True,
        )

    def summary(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------- models
class Logistic(nn.Module):
    """Logistic regression (a linear layer on the flattened input)."""

    def __init__(self, features: int, classes: int = 2) -> None:
        super().__init__()
        self.fc = nn.Linear(features, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(x, 1))


class MLP(nn.Module):
    """Two hidden ReLU layers."""

    def __init__(self, features: int, classes: int = 2, hidden: int = 64) -> None:
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, hidden // 2)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(hidden // 2, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu1(self.fc1(torch.flatten(x, 1)))
        return self.fc3(self.relu2(self.fc2(x)))


class CNN64(nn.Module):
    """Four 3×3 convolutions with max pooling, then two dense layers (64×64 inputs)."""

    def __init__(self, in_channels: int = 1, classes: int = 2) -> None:
        super().__init__()
        channels = (in_channels, 8, 16, 32, 32)
        layers: list[nn.Module] = []
        for c_in, c_out in itertools.pairwise(channels):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(64, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.relu(self.fc1(torch.flatten(self.features(x), 1))))


def kaiming(model: nn.Module) -> nn.Module:
    """He initialisation (what lets a plain 16-layer VGG train without BatchNorm)."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            nn.init.zeros_(module.bias)
    return model


def vgg_style(config: Config, classes: int = 10) -> nn.Module:
    """VGG-16's layout (13 convolutions, 3 dense layers) at ``config.vgg_width``."""
    torch.manual_seed(0)
    return kaiming(
        VGGStyle(num_classes=classes, width=config.vgg_width, image_size=config.vgg_size)
    )


@dataclass
class Trained:
    """A trained model, its test accuracy, and the seconds training took."""

    model: nn.Module
    accuracy: float
    seconds: float


def train(
    build: Callable[[], nn.Module],
    x: Tensor,
    y: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    epochs: int,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    batch_size: int = 64,
    seed: int = 0,
) -> Trained:
    """Build (seeded) and train with Adam; report the test accuracy."""
    torch.manual_seed(seed)
    model = build()
    start = time.perf_counter()
    train_classifier(model, x, y, epochs, batch_size, lr=lr, weight_decay=weight_decay, seed=seed)
    seconds = time.perf_counter() - start
    return Trained(model.eval(), accuracy(model, x_test, y_test), seconds)


def fit_patterns(model: nn.Module, x: Tensor, batch_size: int = 256) -> Patterns:
    """All three pattern types from ``x`` in one pass."""
    return PatternFitter(model).fit(x.split(batch_size))


@dataclass
class Setup:
    """A trained network with the paper's three splits and its patterns (from split 1)."""

    name: str
    model: nn.Module
    accuracy: float
    train_seconds: float
    split1: Tensor  # patterns
    split2: Tensor  # v
    test_x: Tensor  # scores
    test_y: Tensor
    patterns: Patterns
    patch: int
    steps: int
    batch: int = 64


def paper_setups(config: Config) -> dict[str, Setup]:
    """The digits CNN and the VGG-style net, trained, with patterns from split 1.

    Digits: patterns on the first half of the training images, ``v`` on the
    second half.  VGG-style: ``config.rho_split`` images for each.
    """
    d = digits(seed=0)
    small = train(SmallCNN, d.x_train, d.y_train, d.x_test, d.y_test, config.digits_epochs, lr=2e-3)
    half = len(d.x_train) // 2
    n = config.rho_split
    photos = photo_crops(max(config.vgg_train, 2 * n), n, size=config.vgg_size, seed=0)
    x, y = photos.x_train[: config.vgg_train], photos.y_train[: config.vgg_train]
    vgg = train(lambda: vgg_style(config), x, y, photos.x_test, photos.y_test, config.vgg_epochs)
    splits = {
        "digits CNN": (small, d.x_train[:half], d.x_train[half:], d.x_test, d.y_test, 2, 16),
        "VGG-style": (
            vgg,
            photos.x_train[:n],
            photos.x_train[n : 2 * n],
            photos.x_test,
            photos.y_test,
            config.degradation_patch,
            config.degradation_steps,
        ),
    }
    setups = {}
    for name, (trained, split1, split2, test_x, test_y, patch, steps) in splits.items():
        setups[name] = Setup(
            name=name,
            model=trained.model,
            accuracy=trained.accuracy,
            train_seconds=trained.seconds,
            split1=split1,
            split2=split2,
            test_x=test_x,
            test_y=test_y,
            patterns=fit_patterns(trained.model, split1, batch_size=64),
            patch=patch,
            steps=steps,
        )
    return setups


def explain_all(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    patterns: Patterns,
    methods: Sequence[str] = ALL_METHODS,
    batch_size: int = 64,
) -> dict[str, Tensor]:
    """Every method on ``x`` through its Captum API (batched)."""
    return explain_in_batches(model, x, target, patterns, methods, batch_size)


@dataclass
class Timing:
    """The fastest of several runs: wall and CPU seconds, and that run's result."""

    wall: float
    cpu: float
    result: Any


def timed(fn: Callable[[], Any], repeats: int = 1) -> Timing:
    """Run ``fn`` ``repeats`` times; keep the fastest (wall time) run.

    CPU time (all threads of the process) is reported too: on a shared machine it
    is less disturbed by other processes than wall time.
    """
    best = Timing(float("inf"), float("inf"), None)
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if wall < best.wall:
            best = Timing(wall, cpu, result)
    return best


# -------------------------------------------------------------------- plots
STYLE = {
    "random": ("tab:gray", ":"),
    "filter": ("tab:blue", "--"),
    "linear": ("tab:orange", "-"),
    "two_component": ("tab:red", "-"),
}


def plot_rho(panels: Mapping[str, Mapping[str, Mapping[str, float]]], path: str) -> None:
    """Fig. 3: mean ρ per layer (x) for each estimator, one panel per model."""
    fig = Figure(figsize=(5.2 * len(panels), 3.4))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (title, table) in zip(axes[0], panels.items()):
        layers = list(table)
        for est, (colour, line) in STYLE.items():
            values = [table[layer].get(est, float("nan")) for layer in layers]
            ax.plot(range(len(layers)), values, line, marker="o", ms=3, color=colour, label=est)
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(
            [n.replace("features.", "f").replace("classifier.", "c") for n in layers],
            rotation=60,
            fontsize=7,
        )
        ax.set_ylim(-0.05, 1.05)
        ax.set_ylabel("ρ (higher is better)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_degradation(panels: Mapping[str, Mapping[str, Tensor]], path: str) -> None:
    """Fig. 4: mean probability of the predicted class vs patches replaced."""
    fig = Figure(figsize=(5.6 * len(panels), 3.8))
    axes = fig.subplots(1, len(panels), squeeze=False)
    colours = mpl.colormaps["tab20"].colors
    for ax, (title, curves) in zip(axes[0], panels.items()):
        for i, (name, curve) in enumerate(curves.items()):
            dashed = name.startswith("random order")
            ax.plot(
                curve.numpy(),
                ":" if dashed else "-",
                color="black" if dashed else colours[i % len(colours)],
                lw=1.2,
                label=f"{name} ({float(curve.mean()):.3f})",
            )
        ax.set_xlabel("patches replaced")
        ax.set_ylabel("p(predicted class)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
