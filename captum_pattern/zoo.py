"""Small models and data that need no download, for the demo, tests and benchmarks.

The models use only module types Captum's LRP supports (``Conv2d``, ``ReLU``,
``MaxPool2d``, ``Linear``; flattening happens in ``forward``), so every Captum
method runs on them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .canonize import model_lock, model_state_guard

__all__ = [
    "PHOTO_REGIONS",
    "SmallCNN",
    "Split",
    "VGGStyle",
    "accuracy",
    "digits",
    "photo_crops",
    "train_classifier",
    "upsample",
]


@dataclass
class Split:
    """Train and test tensors of a classification data set."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def digits(seed: int = 0, test_fraction: float = 0.25) -> Split:
    """scikit-learn's bundled 8×8 digits as ``(N, 1, 8, 8)`` float tensors in ``[0, 1]``.

    >>> data = digits()
    >>> data.x_train.shape[1:], int(data.y_train.max())
    (torch.Size([1, 8, 8]), 9)
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    n_test = int(len(x) * test_fraction)
    return Split(x[n_test:], y[n_test:], x[:n_test], y[:n_test])


class SmallCNN(nn.Module):
    """Three convolutions, two max pools, two dense layers (MNIST/digits size).

    >>> SmallCNN()(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, size: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.relu3 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * (size // 4) ** 2, 64)
        self.relu4 = nn.ReLU()
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu1(self.conv1(x))
        x = self.pool1(self.relu2(self.conv2(x)))
        x = self.pool2(self.relu3(self.conv3(x)))
        x = self.relu4(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


class VGGStyle(nn.Module):
    """A VGG-16-like network: blocks of 3×3 convolutions and max pools, then 3 dense layers.

    ``blocks`` lists the channels of each convolution per block; the default is
    VGG-16's layout (13 convolutions) at ``width`` times its channels.

    >>> VGGStyle(width=1 / 16, image_size=32)(torch.zeros(1, 3, 32, 32)).shape
    torch.Size([1, 1000])
    """

    VGG16 = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 1000,
        width: float = 1.0,
        image_size: int = 224,
        blocks: tuple[tuple[int, ...], ...] = VGG16,
        hidden: int | None = None,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for block in blocks:
            for c in block:
                c = max(1, round(c * width))
                layers += [nn.Conv2d(channels, c, 3, padding=1), nn.ReLU()]
                channels = c
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        spatial = image_size // 2 ** len(blocks)
        hidden = hidden or max(8, round(4096 * width))
        self.classifier = nn.Sequential(
            nn.Linear(channels * spatial * spatial, hidden),
            nn.ReLU(),
            nn.Dropout(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    """Fraction of correct predictions, in eval mode (every module's mode restored after)."""
    correct = 0
    with model_state_guard(model), torch.no_grad():
        for i in range(0, len(x), batch_size):
            correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    return correct / max(len(x), 1)


def train_classifier(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    on_epoch: Callable[[int, float], None] | None = None,
) -> nn.Module:
    """Train with Adam and cross-entropy, deterministically for a given ``seed``.

    ``on_epoch(epoch, mean_loss)`` is called after each epoch.  A model given
    in training mode trains with its modules' own modes (a BatchNorm frozen
    with ``.eval()`` stays frozen); a model given in eval mode trains with
    every module in training mode.  Afterwards, also when training raises,
    every module's mode is as it was
    (call ``.eval()`` before using the model for inference).  Returns the model.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    modes = [(module, module.training) for module in model.modules()]
    with model_lock(model), _restoring(modes):
        if not modes[0][1]:
            model.train()
        for epoch in range(epochs):
            order = torch.randperm(len(x), generator=generator)
            total = 0.0
            for i in range(0, len(x), batch_size):
                index = order[i : i + batch_size]
                optimizer.zero_grad()
                loss = loss_fn(model(x[index]), y[index])
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(index)
            if on_epoch is not None:
                on_epoch(epoch, total / len(x))
    return model


@contextmanager
def _restoring(modes: list[tuple[nn.Module, bool]]) -> Iterator[None]:
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


def upsample(split: Split, size: int) -> Split:
    """The same data at ``size × size`` pixels (bilinear, kept in ``[0, 1]``).

    Larger images give the network room for two convolutions before the first
    pooling, so its explanations can show strokes rather than blocks.

    >>> upsample(digits(), 32).x_test.shape[1:]
    torch.Size([1, 32, 32])
    """

    def resize(x: Tensor) -> Tensor:
        resized = nn.functional.interpolate(x, size=(size, size), mode="bilinear")
        return resized.clamp(0.0, 1.0)

    return Split(resize(split.x_train), split.y_train, resize(split.x_test), split.y_test)


# Natural-image classification without a download: crops of scikit-learn's two
# bundled photographs, one class per region (box: top, left, height, width).
PHOTO_REGIONS: dict[str, tuple[int, int, int, int, int]] = {
    # name: (image, top, left, height, width) on the 427×640 images
    "sky": (0, 0, 400, 130, 240),
    "roof": (0, 90, 150, 120, 180),
    "pagoda": (0, 230, 140, 130, 150),
    "trees": (0, 190, 520, 230, 120),
    "lake": (0, 180, 330, 100, 190),
    "flower centre": (1, 160, 270, 110, 130),
    "petals": (1, 60, 240, 100, 200),
    "leaves left": (1, 0, 0, 200, 220),
    "leaves right": (1, 60, 460, 240, 180),
    "bud": (1, 330, 250, 97, 170),
}


def photo_crops(n_train: int = 4000, n_test: int = 1000, size: int = 64, seed: int = 0) -> Split:
    """Random ``size``×``size`` RGB crops of scikit-learn's bundled photos, 10 region classes.

    The class is the region of :data:`PHOTO_REGIONS` the crop comes from
    (sky, roof, pagoda, trees, lake in ``china.jpg``; flower centre, petals,
    leaves left/right, bud in ``flower.jpg``); crops are flipped and their
    brightness jittered at random.  Values are in ``[0, 1]``.  A small
    natural-image task for the VGG-style benchmarks; nothing is downloaded.

    >>> data = photo_crops(20, 10, size=32)
    >>> data.x_train.shape, data.y_test.shape
    (torch.Size([20, 3, 32, 32]), torch.Size([10]))
    """
    from sklearn.datasets import load_sample_images

    images = [
        torch.tensor(im, dtype=torch.float32).permute(2, 0, 1) / 255.0
        for im in load_sample_images().images
    ]
    regions = list(PHOTO_REGIONS.values())
    for name, (_, _, _, h, w) in PHOTO_REGIONS.items():
        if h < size // 2 or w < size // 2:
            raise ValueError(f"region {name!r} is too small for {size}-pixel crops")
    generator = torch.Generator().manual_seed(seed)

    def draw(n: int) -> tuple[Tensor, Tensor]:
        labels = torch.arange(n) % len(regions)
        labels = labels[torch.randperm(n, generator=generator)]
        crops = torch.empty(n, 3, size, size)
        for i, label in enumerate(labels.tolist()):
            image, top, left, h, w = regions[label]
            picture = images[image]
            # the crop's centre lies in the region; the crop stays inside the photo
            cy = top + int(torch.randint(h, (1,), generator=generator))
            cx = left + int(torch.randint(w, (1,), generator=generator))
            y0 = min(max(cy - size // 2, 0), picture.shape[1] - size)
            x0 = min(max(cx - size // 2, 0), picture.shape[2] - size)
            crop = picture[:, y0 : y0 + size, x0 : x0 + size]
            if bool(torch.rand(1, generator=generator) < 0.5):
                crop = crop.flip(-1)
            brightness = 0.8 + 0.4 * float(torch.rand(1, generator=generator))
            crops[i] = (crop * brightness).clamp(0, 1)
        return crops, labels

    x_train, y_train = draw(n_train)
    x_test, y_test = draw(n_test)
    return Split(x_train, y_train, x_test, y_test)
