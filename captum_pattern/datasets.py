"""Synthetic data whose true signal is known: generated, seeded, never downloaded.

Every generator returns a :class:`GroundTruthData`: inputs ``x``, labels
``y``, and per sample the **true signal mask** (the pixels that carry
information about the label) and the **true signal component** (the part of
``x`` the label put there: ``x`` minus the same sample generated without the
signal).  Three families:

* :func:`linear_toy` — the paper's 2-D example (Kindermans et al. 2018, Sec. 2):
  ``x = a_s·y + a_d·ε``.
* :func:`wilming` — Wilming et al. (2022), *Scrutinizing XAI using linear
  ground-truth data with suppressor variables*: 8×8 images
  ``x = λ₁·a·z + λ₂·d·η + λ₃·ε`` whose distractor ``d`` covers a *suppressor*
  region where the signal pattern ``a`` is zero.
* :func:`tetrominoes` — XAI-TRIS (Clark et al. 2024): a T or an L tetromino on
  white or smoothed Gaussian noise, in the ``linear`` (additive),
  ``multiplicative``, ``rigid`` (randomly rotated and translated) and ``xor``
  scenarios, at 8×8 or 64×64.

The constants (patterns, positions, noise scales, smoothing, signal weights
``α``) are those of the authors' public generators (``braindatalab/
scrutinizing-xai`` and ``braindatalab/xai-tris``), re-implemented here.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "TETROMINO_ALPHA",
    "TETROMINO_SCENARIOS",
    "WILMING_DISTRACTOR",
    "WILMING_SIGNAL",
    "GroundTruthData",
    "linear_toy",
    "tetrominoes",
    "wilming",
]


@dataclass
class GroundTruthData:
    """Inputs with their labels, true signal masks and true signal components.

    Attributes
    ----------
    x:
        Inputs, ``(N, C, H, W)`` for images, ``(N, D)`` for vectors.
    y:
        Class labels (``long``) or, for the regression toy, the target value.
    mask:
        ``bool``, shaped like ``x``: where the signal is.
    signal:
        Shaped like ``x``: the part of ``x`` caused by the label.
    name:
        A short description (generator and settings).
    """

    x: Tensor
    y: Tensor
    mask: Tensor
    signal: Tensor
    name: str = ""

    def __len__(self) -> int:
        return len(self.x)

    def subset(self, index: Tensor | slice) -> GroundTruthData:
        """The samples at ``index`` (a slice, index tensor or bool mask)."""
        return GroundTruthData(
            **{f.name: getattr(self, f.name)[index] for f in fields(self) if f.name != "name"},
            name=self.name,
        )

    def split(self, *sizes: int, seed: int = 0) -> tuple[GroundTruthData, ...]:
        """Disjoint random subsets of the given sizes (plus the rest, if any is left).

        >>> parts = linear_toy(100).split(60, 20)
        >>> [len(p) for p in parts]
        [60, 20, 20]
        """
        if sum(sizes) > len(self):
            raise ValueError(f"sizes {sizes} add up to more than the {len(self)} samples")
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        bounds = np.cumsum((0, *sizes)).tolist()
        if bounds[-1] < len(self):
            bounds.append(len(self))
        return tuple(self.subset(order[a:b]) for a, b in itertools.pairwise(bounds))


# ------------------------------------------------------------ the paper's toy
def linear_toy(
    n: int = 1000,
    a_s: tuple[float, ...] = (1.0, 0.0),
    a_d: tuple[float, ...] = (1.0, 1.0),
    noise_mean: float = 0.0,
    noise_std: float = 1.0,
    exact: bool = False,
    seed: int = 0,
) -> GroundTruthData:
    """The paper's linear example: ``x = a_s·y + a_d·ε``, ``y ~ U[−1, 1]``, ``ε ~ N(μ, σ²)``.

    ``y`` (float) is the regression target; the filter that extracts it is
    ``w = (1, −1)`` for the default directions, the pattern is ``a_s``.  With
    ``exact``, ``ε`` is made zero-mean and uncorrelated with ``y`` within each
    regime ``y > 0`` and ``y ≤ 0`` of the sample (the population property, held
    exactly by the finite sample), so the patterns fitted on it equal ``a_s``
    up to rounding.

    >>> data = linear_toy(4)
    >>> data.x.shape, data.mask[0].tolist()
    (torch.Size([4, 2]), [True, False])
    >>> bool(torch.allclose(data.x[:, 0] - data.x[:, 1], data.y))
    True
    """
    rng = np.random.default_rng(seed)
    y = rng.uniform(-1.0, 1.0, n)
    eps = rng.normal(noise_mean, noise_std, n)
    if exact:
        for regime in (y > 0, y <= 0):
            design = np.stack([np.ones(int(regime.sum())), y[regime]], 1)
            coef, *_ = np.linalg.lstsq(design, eps[regime], rcond=None)
            eps[regime] -= design @ coef
    a_s_, a_d_ = np.asarray(a_s, dtype=np.float64), np.asarray(a_d, dtype=np.float64)
    signal = np.outer(y, a_s_)
    x = signal + np.outer(eps, a_d_)
    mask = np.broadcast_to(a_s_ != 0, x.shape).copy()
    return GroundTruthData(
        torch.from_numpy(x).float(),
        torch.from_numpy(y).float(),
        torch.from_numpy(mask),
        torch.from_numpy(signal).float(),
        name="linear toy",
    )


# ------------------------------------------------------------- Wilming 2022
_BLOCK = np.array(
    [[0, 0.5, 0.5, 0], [0.5, 1, 1, 0.5], [0.5, 1, 1, 0.5], [0, 0.5, 0.5, 0]], dtype=np.float64
)


def _wilming_patterns() -> tuple[np.ndarray, np.ndarray]:
    signal = np.zeros((8, 8))
    signal[:4, :4] = _BLOCK
    signal[4:, :4] = -_BLOCK
    distractor = np.zeros((8, 8))
    distractor[:4, :4] = _BLOCK
    distractor[:4, 4:] = -_BLOCK
    return signal, distractor


#: Wilming et al.'s signal pattern ``a`` (two blobs in the left half).
WILMING_SIGNAL: np.ndarray
#: Their distractor pattern ``d``: the top-left blob and the suppressor (top right).
WILMING_DISTRACTOR: np.ndarray
WILMING_SIGNAL, WILMING_DISTRACTOR = _wilming_patterns()


def _random_spd(dim: int, rng: np.random.Generator) -> np.ndarray:
    """``U diag(λ) Uᵀ`` with a random rotation ``U`` and ``λ ~ U(0, 1) + 0.01 max``."""
    upper = np.triu(2 * np.pi * rng.random((dim, dim)) - np.pi)
    rotation = torch.linalg.matrix_exp(torch.from_numpy(upper - upper.T)).numpy()
    eig = rng.random(dim)
    eig += 0.01 * eig.max()
    return (rotation * eig) @ rotation.T


def _unit_rms(term: np.ndarray) -> np.ndarray:
    """``term`` divided by its root-mean-square per-sample norm (0 stays 0)."""
    norm = np.linalg.norm(term) / np.sqrt(len(term))
    return term if norm == 0 else term / norm


def wilming(
    n: int = 1000,
    weights: tuple[float, float, float] = (0.08, 0.46, 0.46),
    noise: str = "correlated",
    seed: int = 0,
) -> GroundTruthData:
    """Wilming et al. (2022): ``x = λ₁·a·z + λ₂·d·η + λ₃·ε`` on 8×8 images, two classes.

    ``z = −1`` for class 0 and ``+1`` for class 1, ``η ~ N(0, 1)`` the
    distractor, ``ε ~ N(0, Σ)`` with a random covariance (``noise="correlated"``,
    the authors' setting) or ``N(0, I)`` (``"white"``).  Each of the three
    terms is scaled to unit mean squared norm per sample before weighting (the
    authors divide by the Frobenius norm of the whole data matrix: the same up
    to the factor ``√n``).  The signal mask is ``a ≠ 0``; the suppressor region
    (``d ≠ 0`` where ``a = 0``, the top-right block) is not in it.

    >>> data = wilming(200)
    >>> data.x.shape, int(data.mask[0].sum()), sorted(set(data.y.tolist()))
    (torch.Size([200, 1, 8, 8]), 24, [0, 1])
    """
    if noise not in ("correlated", "white"):
        raise ValueError(f"noise must be 'correlated' or 'white', got {noise!r}")
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.zeros(n // 2), np.ones(n - n // 2)]).astype(np.int64)
    z = 2.0 * labels - 1.0
    eta = rng.normal(0.0, 1.0, n)
    if noise == "correlated":
        cov = _random_spd(64, rng)
        eps = rng.multivariate_normal(np.zeros(64), cov, size=n)
    else:
        eps = rng.normal(0.0, 1.0, (n, 64))
    a, d = WILMING_SIGNAL.reshape(-1), WILMING_DISTRACTOR.reshape(-1)
    signal = weights[0] * _unit_rms(np.outer(z, a))
    x = signal + weights[1] * _unit_rms(np.outer(eta, d)) + weights[2] * _unit_rms(eps)
    order = rng.permutation(n)
    shape = (n, 1, 8, 8)
    mask = np.broadcast_to((a != 0).reshape(1, 1, 8, 8), shape).copy()
    return GroundTruthData(
        torch.from_numpy(x[order].reshape(shape)).float(),
        torch.from_numpy(labels[order]),
        torch.from_numpy(mask),
        torch.from_numpy(signal[order].reshape(shape)).float(),
        name=f"wilming {noise} λ={weights}",
    )


# ----------------------------------------------------------------- XAI-TRIS
TETROMINO_SCENARIOS = ("linear", "multiplicative", "rigid", "xor")

#: The signal weights ``α`` of the XAI-TRIS configurations, by
#: ``(size, scenario, background)``: tuned by the authors so that the models
#: learn the task but not trivially.
TETROMINO_ALPHA: dict[tuple[int, str, str], float] = {
    (8, "linear", "white"): 0.18,
    (8, "linear", "correlated"): 0.0125,
    (8, "multiplicative", "white"): 0.7,
    (8, "multiplicative", "correlated"): 0.1,
    (8, "rigid", "white"): 0.65,
    (8, "rigid", "correlated"): 0.2,
    (8, "xor", "white"): 0.35,
    (8, "xor", "correlated"): 0.15,
    (64, "linear", "white"): 0.03,
    (64, "linear", "correlated"): 0.02,
    (64, "multiplicative", "white"): 0.2,
    (64, "multiplicative", "correlated"): 0.65,
    (64, "rigid", "white"): 0.575,
    (64, "rigid", "correlated"): 0.375,
    (64, "xor", "white"): 0.35,
    (64, "xor", "correlated"): 0.15,
}

_T = np.array([[1, 0], [1, 1], [1, 0]], dtype=np.float64)
_L = np.array([[1, 0], [1, 0], [1, 1]], dtype=np.float64)
_POSITIONS = ((1, 1), (4, 5))  # on the 8×8 grid, scaled with the image


def gaussian_filter(image: np.ndarray, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """A Gaussian blur along every axis, as ``scipy.ndimage.gaussian_filter`` computes it.

    The kernel ``exp(−x²/2σ²)`` (normalised) reaches ``int(truncate·σ + 0.5)``
    pixels each way; borders are mirrored with the edge pixel repeated
    (``d c b a | a b c d | d c b a``, scipy's ``mode="reflect"``), several times
    over when the kernel is wider than the image.

    >>> gaussian_filter(np.eye(3), 1.0).sum().round(6)
    np.float64(3.0)
    """
    radius = int(truncate * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    out = np.asarray(image, dtype=np.float64)
    for axis in range(out.ndim):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        padded = np.moveaxis(np.pad(out, pad, mode="symmetric"), axis, -1)
        windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * radius + 1, axis=-1)
        out = np.moveaxis(windows @ kernel, -1, axis)
    return out


def _shape(base: np.ndarray, scale: int) -> np.ndarray:
    return np.kron(base, np.ones((scale, scale)))


def _smooth_pattern(image: np.ndarray, scale: int) -> np.ndarray:
    """XAI-TRIS blurs the tetromino (σ = 1.5 px) when it is scaled up more than 3×."""
    if scale <= 3:
        return image
    return gaussian_filter(image, 1.5)


def _place(canvas: np.ndarray, shape: np.ndarray, row: int, col: int) -> None:
    canvas[row : row + shape.shape[0], col : col + shape.shape[1]] += shape


def tetrominoes(
    n: int = 2000,
    scenario: str = "linear",
    background: str = "white",
    size: int = 8,
    alpha: float | None = None,
    smoothing: float | None = None,
    seed: int = 0,
) -> GroundTruthData:
    """XAI-TRIS data (Clark et al. 2024): a T (class 0) or an L (class 1) tetromino in noise.

    Parameters
    ----------
    n:
        Number of samples (half per class; a quarter per sign pattern for ``xor``).
    scenario:
        ``"linear"``: ``x = α·s + (1−α)·b`` with the shape at a fixed place per
        class (T top left, L bottom right).  ``"multiplicative"``:
        ``x = (1 − α·s) ⊙ b``.  ``"rigid"``: additive, the tetromino randomly
        rotated by a multiple of 90° and placed anywhere.  ``"xor"``: additive,
        both shapes present with signs ``(+,+)`` or ``(−,−)`` for class 0 and
        ``(+,−)`` or ``(−,+)`` for class 1.
    background:
        ``"white"``: ``b ~ N(0, 0.5²)`` per pixel; ``"correlated"``: the same
        smoothed with a Gaussian filter (σ = 3 at 8×8, 10 at 64×64).
    size:
        Image side, a multiple of 8 (the tetrominoes scale with it; the rigid
        scenario uses half that scale, as XAI-TRIS does at 64×64).
    alpha, smoothing:
        Signal weight and noise smoothing σ; default: the XAI-TRIS values
        (:data:`TETROMINO_ALPHA`; other sizes than 8 and 64 must give them).

    Signal and background are each divided by their Frobenius norm over the
    whole data set and the result is scaled to ``max |x| = 1``, as in XAI-TRIS.
    The mask of the fixed-place scenarios is where either tetromino can be
    (the mask XAI-TRIS scores against), of ``rigid`` the sample's own
    tetromino; blurred shapes (size 64) are thresholded at 0.05.

    >>> data = tetrominoes(8, "xor")
    >>> data.x.shape, int(data.mask[0].sum()), int(data.y.sum())
    (torch.Size([8, 1, 8, 8]), 8, 4)
    """
    alpha, smoothing = _tetromino_settings(scenario, background, size, alpha, smoothing)
    rng = np.random.default_rng(seed)
    labels, patterns, masks = _tetromino_signals(n, scenario, size, rng)
    noise = rng.normal(0.0, 0.5, (n, size, size))
    if background == "correlated":
        noise = np.stack([gaussian_filter(b, smoothing) for b in noise])
    noise /= np.linalg.norm(noise)
    if scenario == "multiplicative":
        factor = 1.0 - alpha * patterns
        norm = np.linalg.norm(factor)
        x = factor / norm * noise
        signal = -alpha * patterns / norm * noise  # x minus the same with the shape removed
    else:
        s = patterns / np.linalg.norm(patterns)
        x = alpha * s + (1.0 - alpha) * noise
        signal = alpha * s
    bound = np.abs(x).max()
    x, signal = x / bound, signal / bound
    order = rng.permutation(n)
    shape4 = (n, 1, size, size)
    return GroundTruthData(
        torch.from_numpy(x[order].reshape(shape4)).float(),
        torch.from_numpy(labels[order]),
        torch.from_numpy(masks[order].reshape(shape4)),
        torch.from_numpy(signal[order].reshape(shape4)).float(),
        name=f"tetrominoes {scenario} {background} {size}×{size} α={alpha}",
    )


def _tetromino_settings(
    scenario: str, background: str, size: int, alpha: float | None, smoothing: float | None
) -> tuple[float, float]:
    """Check the arguments; the signal weight and smoothing σ (XAI-TRIS defaults)."""
    if scenario not in TETROMINO_SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; expected one of {TETROMINO_SCENARIOS}")
    if background not in ("white", "correlated"):
        raise ValueError(f"background must be 'white' or 'correlated', got {background!r}")
    if size % 8:
        raise ValueError(f"size must be a multiple of 8, got {size}")
    if alpha is None:
        if (size, scenario, background) not in TETROMINO_ALPHA:
            raise ValueError(f"no XAI-TRIS signal weight for size {size}; give alpha")
        alpha = TETROMINO_ALPHA[(size, scenario, background)]
    if smoothing is None:
        smoothing = {8: 3.0, 64: 10.0}.get(size)
        if smoothing is None and background == "correlated":
            raise ValueError(f"no XAI-TRIS smoothing for size {size}; give smoothing")
    return alpha, 0.0 if smoothing is None else smoothing


def _tetromino_signals(
    n: int, scenario: str, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, the signal images (shapes, maybe blurred) and the masks they are scored on."""
    scale = size // 8
    labels = np.concatenate([np.zeros(n // 2), np.ones(n - n // 2)]).astype(np.int64)
    patterns = np.zeros((n, size, size))
    masks = np.zeros((n, size, size), dtype=bool)
    shapes = (_shape(_T, scale), _shape(_L, scale))
    places = [(r * scale, c * scale) for r, c in _POSITIONS]
    union = np.zeros((size, size))
    for shape, (r, c) in zip(shapes, places):
        _place(union, shape, r, c)
    union_mask = _smooth_pattern(union, scale) >= 0.05
    signs, combo = np.array([(1, 1), (-1, -1), (1, -1), (-1, 1)]), np.zeros(n, dtype=np.int64)
    if scenario == "xor":
        combo = np.repeat(np.arange(4), -(-n // 4))[:n]
        labels = (combo >= 2).astype(np.int64)
    rigid_scale = max(1, scale // 2)
    for i in range(n):
        canvas = np.zeros((size, size))
        if scenario == "rigid":
            shape = np.rot90(_shape((_T, _L)[labels[i]], rigid_scale), k=int(rng.integers(4)))
            row = int(rng.integers(0, size - shape.shape[0] + 1))
            col = int(rng.integers(0, size - shape.shape[1] + 1))
            _place(canvas, shape, row, col)
            patterns[i] = _smooth_pattern(canvas, rigid_scale)
            masks[i] = patterns[i] >= 0.05
            continue
        if scenario == "xor":
            for k, (shape, (r, c)) in enumerate(zip(shapes, places)):
                _place(canvas, signs[combo[i], k] * shape, r, c)
        else:
            _place(canvas, shapes[labels[i]], *places[labels[i]])
        patterns[i] = _smooth_pattern(canvas, scale)
        masks[i] = union_mask
    return labels, patterns, masks
