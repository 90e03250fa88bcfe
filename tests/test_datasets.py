"""The ground-truth generators: seeded, and the signal is where and what they say."""

import numpy as np
import pytest
import torch

from captum_pattern.datasets import (
    TETROMINO_SCENARIOS,
    WILMING_DISTRACTOR,
    WILMING_SIGNAL,
    gaussian_filter,
    linear_toy,
    tetrominoes,
    wilming,
)
from captum_pattern.zoo import photo_crops

GENERATORS = {
    "toy": lambda seed: linear_toy(200, seed=seed),
    "wilming": lambda seed: wilming(200, seed=seed),
    **{
        f"tetris-{s}-{b}": (lambda seed, s=s, b=b: tetrominoes(200, s, b, seed=seed))
        for s in TETROMINO_SCENARIOS
        for b in ("white", "correlated")
    },
}


def _no_label_left(rest: torch.Tensor, y: torch.Tensor) -> bool:
    """The class means of ``rest`` agree within 5 standard errors at every pixel."""
    a, b = rest[y == 1], rest[y == 0]
    se = (a.var(0) / len(a) + b.var(0) / len(b)).sqrt()
    return bool(((a.mean(0) - b.mean(0)).abs() < 5 * se + 1e-12).all())


@pytest.mark.parametrize("name", list(GENERATORS))
def test_seeded_and_consistent(name):
    a, b, c = GENERATORS[name](0), GENERATORS[name](0), GENERATORS[name](1)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.mask, b.mask)
    assert not torch.equal(a.x, c.x)
    assert a.mask.shape == a.x.shape == a.signal.shape and a.mask.dtype == torch.bool
    # the signal component lies inside the mask
    assert float(a.signal[~a.mask].abs().max()) == 0.0
    assert bool(a.mask.flatten(1).any(1).all())


def test_toy_is_the_papers_example():
    data = linear_toy(500, noise_mean=2.0, seed=4)
    assert torch.allclose(data.x[:, 0] - data.x[:, 1], data.y, atol=1e-6)
    assert torch.allclose(data.signal, data.y[:, None] * torch.tensor([1.0, 0.0]))
    assert float(data.y.min()) >= -1 and float(data.y.max()) <= 1
    assert float(data.x[:, 1].mean()) == pytest.approx(2.0, abs=0.15)  # ε ~ N(2, 1)


def test_wilming_suppressor_region_is_outside_the_signal():
    data = wilming(4000, seed=2)
    suppressor = torch.from_numpy((WILMING_DISTRACTOR != 0) & (WILMING_SIGNAL == 0))
    assert int(suppressor.sum()) == 12
    assert not bool(data.mask[0, 0][suppressor].any())
    # the label lives in the signal component only: x − signal has the same mean per class
    assert _no_label_left(data.x - data.signal, data.y)
    assert not _no_label_left(data.x, data.y)
    # ... and the signal component separates the classes by ±λ₁·a
    assert torch.equal(data.signal[data.y == 1].sign(), -data.signal[data.y == 0].sign())
    assert data.y.sum() == 2000


@pytest.mark.parametrize("scenario", TETROMINO_SCENARIOS)
def test_tetromino_label_is_in_the_signal_only(scenario):
    data = tetrominoes(4000, scenario, "white", seed=1)
    assert float(data.x.abs().max()) == pytest.approx(1.0)
    assert _no_label_left(data.x - data.signal, data.y)
    if scenario == "linear":  # elsewhere the classes differ beyond their means
        assert not _no_label_left(data.x, data.y)
    assert int(data.y.sum()) == 2000


def test_tetromino_masks_and_xor_signs():
    fixed = tetrominoes(40, "linear")
    assert int(fixed.mask[0].sum()) == 8  # T and L, 4 pixels each
    assert torch.equal(fixed.mask, fixed.mask[:1].expand_as(fixed.mask))
    rigid = tetrominoes(40, "rigid")
    assert bool((rigid.mask.flatten(1).sum(1) == 4).all())
    xor = tetrominoes(400, "xor")
    t_sign = xor.signal[:, 0, 1, 1].sign()  # the T's top pixel
    l_sign = xor.signal[:, 0, 4, 5].sign()  # the L's top pixel
    assert torch.equal((t_sign * l_sign < 0).long(), xor.y)


def test_tetrominoes_64_are_blurred_and_thresholded():
    data = tetrominoes(8, "linear", "correlated", size=64)
    assert data.x.shape == (8, 1, 64, 64)
    assert 8 * 64 < int(data.mask[0].sum()) < 2 * 8 * 64  # blurred 8×-scaled shapes
    with pytest.raises(ValueError, match="alpha"):
        tetrominoes(8, "linear", size=32)
    assert tetrominoes(8, "linear", size=32, alpha=0.1, smoothing=5.0).x.shape[-1] == 32


def test_split_is_a_partition():
    data = wilming(100)
    a, b, c = data.split(50, 30)
    assert (len(a), len(b), len(c)) == (50, 30, 20)
    rows = torch.cat([a.x, b.x, c.x]).flatten(1)
    assert torch.unique(rows, dim=0).shape[0] == 100


def test_photo_crops_are_seeded_images():
    a, b = photo_crops(30, 10, size=32, seed=3), photo_crops(30, 10, size=32, seed=3)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert a.x_train.shape == (30, 3, 32, 32)
    assert 0.0 <= float(a.x_train.min()) and float(a.x_train.max()) <= 1.0
    assert sorted(set(a.y_train.tolist())) == list(range(10))


@pytest.mark.parametrize(("shape", "sigma"), [((8, 8), 3.0), ((64, 64), 10.0), ((5, 7), 1.5)])
def test_gaussian_filter_is_scipys(shape, sigma):
    """The numpy blur that keeps the core free of scipy computes what scipy computes."""
    ndimage = pytest.importorskip("scipy.ndimage")
    image = np.random.default_rng(0).normal(size=shape)
    expected = ndimage.gaussian_filter(image, sigma)
    np.testing.assert_allclose(gaussian_filter(image, sigma), expected, rtol=0, atol=1e-12)
