"""Exception types raised by captum-pattern.

Every error the package raises on purpose is a :class:`PatternError`; the
subclasses also derive from the built-in type a caller would expect
(``ValueError``, ``TypeError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

__all__ = [
    "InvalidDataError",
    "InvalidInputError",
    "InvalidTargetError",
    "ModelChangedError",
    "PatternError",
    "PatternFileError",
    "PatternMismatchError",
    "UnsupportedModelError",
]


class PatternError(Exception):
    """Base class of every error raised on purpose by captum-pattern."""


class UnsupportedModelError(PatternError, ValueError):
    """The model has no layer the method can explain, or a module it cannot
    handle without giving a wrong answer."""


class PatternMismatchError(PatternError, ValueError):
    """The patterns do not belong to this model (missing, extra or mis-shaped
    layer, or a different BatchNorm folding)."""


class PatternFileError(PatternError, ValueError):
    """A pattern file is not readable: not a pattern file, truncated,
    corrupted or written by a newer format version."""


class InvalidDataError(PatternError, ValueError):
    """The data given to :class:`~captum_pattern.PatternFitter` is unusable
    (empty, or a batch with NaN or Inf values)."""


class ModelChangedError(PatternError, RuntimeError):
    """The model changed while a captum-pattern call was running on it
    (e.g. another thread switched it to training mode), so the result would
    mix two models."""


class InvalidInputError(PatternError, ValueError):
    """The inputs or targets given to ``attribute`` do not fit the model."""


class InvalidTargetError(InvalidInputError, AssertionError):
    """A ``target`` or ``neuron_selector`` that names no single value per example.

    Also an ``AssertionError``, the type Captum's methods raise for an
    impossible target or neuron, so code written against Captum catches it.
    """


@contextmanager
def forward_errors(error: type[PatternError], where: str, inputs: Sequence[Any]) -> Iterator[None]:
    """Turn a failure of the model's own forward pass into ``error``, naming the shapes.

    ``where`` prefixes the message (e.g. ``"batch 3: "``); errors of this
    package pass through unchanged.
    """
    try:
        yield
    except PatternError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        shapes = [tuple(t.shape) for t in inputs]
        raise error(
            f"{where}the model's forward pass failed on inputs of shape {shapes}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def caller_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning point at the first frame outside the package.

    For ``warnings.warn(..., stacklevel=caller_stacklevel())`` called directly
    in a function of the package (context managers' frames are skipped too).
    """
    package = os.path.dirname(os.path.abspath(__file__))
    skipped = (
        package + os.sep,
        os.path.join(os.path.dirname(contextlib.__file__), "contextlib"),
        os.path.join("captum", "log", ""),  # Captum's logging decorator on attribute
    )
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and _skipped(frame.f_code.co_filename, skipped):
        frame, level = frame.f_back, level + 1
    return level


def _skipped(filename: str, prefixes: tuple[str, ...]) -> bool:
    return filename.startswith(prefixes[:2]) or prefixes[2] in filename
