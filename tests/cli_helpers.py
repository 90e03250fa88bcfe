"""Helpers shared by the command-line tests: image folders and an interrupted read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captum_pattern.images import ImageFiles

READ = ImageFiles.__getitem__  # the loader's own way of reading image ``index``


def write_images(root: Path, count: int, seed: int, digits: int = 1) -> Path:
    """``count`` random RGB PNGs ``0.png, 1.png, ...`` (``digits`` wide), sizes varying."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for i in range(count):
        pixels = rng.integers(0, 256, (36 + i, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{i:0{digits}d}.png")
    return root


def stop_reading_at(
    monkeypatch: pytest.MonkeyPatch, index: int, read: list[int] | None = None
) -> None:
    """Reading image ``index`` or a later one raises ``KeyboardInterrupt`` (a user's Ctrl-C).

    The indices read before are appended to ``read``; :func:`read_normally` undoes it.
    """

    def interrupted(self: ImageFiles, i: int):  # type: ignore[no-untyped-def]
        if i >= index:
            raise KeyboardInterrupt
        if read is not None:
            read.append(i)
        return READ(self, i)

    monkeypatch.setattr(ImageFiles, "__getitem__", interrupted)


def read_normally(monkeypatch: pytest.MonkeyPatch) -> None:
    """Undo :func:`stop_reading_at`."""
    monkeypatch.setattr(ImageFiles, "__getitem__", READ)
