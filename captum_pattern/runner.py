"""The streaming runner: the one loop that runs a user's model over data.

:class:`StreamRunner` owns everything about reading data that the fitter and
:func:`~captum_pattern.metrics.signal_quality` share: batch parsing, device
moves (on CUDA from pinned memory on a side stream, overlapping the previous
batch's compute), reduced precision (autocast, TF32), ``max_batches``, error
wrapping, the progress callback, checkpoints and resume, and the reduction of
sums across ``torch.distributed`` processes.  What is computed from each batch
is not its business: that is done by a :func:`~captum_pattern.tap.layer_tap`
callback, and what is checkpointed and reduced is an :class:`Accumulator`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import Tensor, nn

from .errors import InvalidDataError, PatternFileError, forward_errors
from .patterns import save_atomically

__all__ = [
    "Accumulator",
    "Checkpoint",
    "Precision",
    "StreamRunner",
    "as_tuple",
    "batch_inputs",
    "distributed",
    "model_device",
]

Batches = Iterator[tuple[int, tuple[Tensor, ...]]]


def batch_inputs(batch: Any, index: int) -> tuple[Tensor, ...]:
    """The model inputs of a batch: a tensor, or the first item of a tuple/list.

    >>> batch_inputs((torch.ones(2, 3), torch.tensor([0, 1])), 0)[0].shape
    torch.Size([2, 3])
    """
    inputs: tuple[Tensor, ...] | None = None
    if isinstance(batch, Tensor):
        inputs = (batch,)
    elif isinstance(batch, (tuple, list)) and batch:
        first = batch[0]
        if isinstance(first, Tensor):
            inputs = (first,)
        elif (
            isinstance(first, (tuple, list)) and first and all(isinstance(t, Tensor) for t in first)
        ):
            inputs = tuple(first)
    if inputs is not None:
        if any(t.dim() > 0 and t.shape[0] == 0 for t in inputs):
            raise InvalidDataError(
                f"batch {index} is empty (0 examples); leave empty batches out of the data "
                "(an empty dataset or split, or a sampler that yields nothing)"
            )
        return inputs
    raise InvalidDataError(
        f"batch {index} is a {type(batch).__name__}; expected a tensor or a tuple/list "
        "whose first item is the input tensor (or a tuple of input tensors)"
    )


def as_tuple(args: Any) -> tuple[Any, ...]:
    """``None`` → ``()``, a tuple as it is, anything else → a 1-tuple."""
    if args is None:
        return ()
    return tuple(args) if isinstance(args, tuple) else (args,)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (the CPU if it has none)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def distributed() -> bool:
    """Whether a ``torch.distributed`` process group is active."""
    return dist.is_available() and dist.is_initialized()


@dataclass(frozen=True)
class Precision:
    """Optional reduced precision for the forward pass: autocast dtype and TF32."""

    autocast: torch.dtype | None = None
    tf32: bool = False

    def __post_init__(self) -> None:
        if self.autocast not in (None, torch.bfloat16, torch.float16):
            raise ValueError(
                f"autocast must be None, torch.bfloat16 or torch.float16, got {self.autocast}"
            )

    def forward(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        """The context for one forward pass on ``device``."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast)

    @contextlib.contextmanager
    def tf32_flags(self, device: torch.device) -> Iterator[None]:
        """Allow TF32 on CUDA for the block (the global flags are restored afterwards)."""
        if not (self.tf32 and device.type == "cuda"):
            yield
            return
        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class Accumulator(Protocol):
    """What a runner checkpoints and reduces: sums that add across batches and ranks."""

    def flush(self) -> None:
        """Finish buffered work (before a checkpoint and at the end)."""

    def state_dict(self) -> dict[str, Tensor]:
        """Every tensor needed to resume."""

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore :meth:`state_dict`'s tensors."""

    def reduce(self, all_reduce: Callable[[Tensor], None]) -> None:
        """Sum this rank's state with every other rank's through ``all_reduce``."""


@dataclass
class Checkpoint:
    """Where and how often a run saves its :class:`Accumulator`.

    ``settings`` must be equal on resume (else the checkpoint belongs to
    another run).  With ``torch.distributed``, each rank uses
    ``<path>.rank<r>``.  A run that completes deletes its checkpoint, so a
    later ``resume`` cannot return an earlier run's result.
    """

    path: str | os.PathLike[str]
    every: int = 0
    resume: bool = False
    settings: dict[str, Any] = field(default_factory=dict)
    kind: str = "captum-pattern-checkpoint"
    version: int = 1

    @property
    def file(self) -> Path:
        path = Path(self.path)
        if distributed():
            path = path.with_name(f"{path.name}.rank{dist.get_rank()}")
        return path

    def save(self, state: Accumulator, done: int) -> None:
        """Write ``state`` after ``done`` batches, atomically."""
        state.flush()
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.state_dict().items()}
        metadata = {
            "format": self.kind,
            "format_version": str(self.version),
            "batches_done": str(done),
            "settings": json.dumps(self.settings, sort_keys=True),
        }
        save_atomically(tensors, self.file, metadata)

    def restore(self, state: Accumulator) -> int:
        """Load the saved state into ``state``; the number of batches it holds (0: none)."""
        path = self.file
        if not path.is_file():
            return 0  # nothing saved yet: start from the beginning
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        except Exception as exc:
            raise PatternFileError(f"{path}: not a readable checkpoint ({exc})") from exc
        if meta.get("format") != self.kind:
            raise PatternFileError(
                f"{path}: not a {self.kind} file (its metadata 'format' is "
                f"{_shown(meta.get('format'))}, expected {self.kind!r})"
            )
        version = _metadata_count(path, meta, "format_version")
        if version > self.version:
            raise PatternFileError(
                f"{path}: written by a newer captum-pattern (checkpoint format version "
                f"{version}; this version reads {self.version}); upgrade to resume"
            )
        if version < self.version:
            raise PatternFileError(
                f"{path}: written by an older captum-pattern (checkpoint format version "
                f"{version}; this version reads {self.version}), whose checkpoints cannot be "
                "resumed; delete the file to start the fit over"
            )
        done = _metadata_count(path, meta, "batches_done")
        saved = _metadata_settings(path, meta)
        expected = json.loads(json.dumps(self.settings, sort_keys=True))
        for key, value in expected.items():
            if saved.get(key) != value:
                raise PatternFileError(
                    f"{path}: the checkpoint's settings entry {key!r} differs from this "
                    f"run's ({key} changed since it was written); resume with the same model "
                    "and settings, or delete the checkpoint to start over"
                )
        for key, tensor in tensors.items():
            if not tensor.is_floating_point():
                raise PatternFileError(
                    f"{path}: the checkpoint's tensor {key!r} is stored as {tensor.dtype}, "
                    "expected a real floating-point tensor (the file is damaged); delete it "
                    "to start over"
                )
            if not tensor.double().isfinite().all():  # float8 has no isfinite of its own
                raise PatternFileError(
                    f"{path}: the checkpoint's {key!r} holds NaN or Inf (the file is damaged); "
                    "delete it to start over"
                )
        try:
            state.load_state_dict(tensors)
        except ValueError as exc:
            raise PatternFileError(f"{path}: {exc}") from exc
        return done

    def remove(self) -> None:
        """Delete the checkpoint file (after a completed run)."""
        self.file.unlink(missing_ok=True)


def _shown(text: str | None) -> str:
    """A metadata value for a message: ``missing``, or its first 40 characters."""
    return "missing" if text is None else repr(text[:40] + ("..." if len(text) > 40 else ""))


def _damaged(path: Path, meta: Mapping[str, str], key: str, expected: str) -> PatternFileError:
    return PatternFileError(
        f"{path}: the checkpoint's metadata {key!r} is {_shown(meta.get(key))}, expected "
        f"{expected} (the file is damaged); delete it to start over"
    )


def _metadata_count(path: Path, meta: Mapping[str, str], key: str) -> int:
    """A whole number from 0 to ``sys.maxsize`` in a checkpoint's metadata, or a clear error."""
    try:
        value = int(meta[key])
    except (KeyError, ValueError):
        raise _damaged(path, meta, key, "a whole number") from None
    if not 0 <= value <= sys.maxsize:
        raise _damaged(path, meta, key, f"a whole number from 0 to {sys.maxsize}")
    return value


def _metadata_settings(path: Path, meta: Mapping[str, str]) -> dict[str, Any]:
    """The settings (a JSON object) in a checkpoint's metadata, or a clear error."""
    try:
        settings = json.loads(meta["settings"])
    except (KeyError, ValueError, RecursionError):  # JSONDecodeError is a ValueError
        raise _damaged(path, meta, "settings", "a JSON object") from None
    if not isinstance(settings, dict):
        raise _damaged(path, meta, "settings", "a JSON object")
    return settings


class StreamRunner:
    """Runs ``model`` over batches of data, with everything around it done once.

    Parameters
    ----------
    model:
        The network; it runs as it is (callers hold the model-state guard).
    device:
        Where batches are moved (default: the model's device).
    additional_forward_args:
        Extra positional arguments for the model's forward, after the inputs.
    max_batches:
        Stop after this many batches of each data iterable.
    precision:
        Autocast and TF32 for the forward passes.
    callback:
        Called after each batch with ``(batches_done, batch_size)``.

    Examples
    --------
    >>> model, seen = torch.nn.Linear(3, 1), []
    >>> runner = StreamRunner(model, max_batches=2)
    >>> runner.run([torch.ones(4, 3)] * 5, after_batch=seen.append)
    2
    >>> seen
    [1, 2]
    """

    def __init__(
        self,
        model: nn.Module,
        device: torch.device | str | None = None,
        additional_forward_args: Any = None,
        max_batches: int | None = None,
        precision: Precision | None = None,
        callback: Callable[[int, int], None] | None = None,
    ) -> None:
        if max_batches is not None and max_batches < 1:
            raise ValueError(f"max_batches must be at least 1, got {max_batches}")
        self.model = model
        self.device = torch.device(device) if device is not None else model_device(model)
        self.extra = as_tuple(additional_forward_args)
        self.max_batches = max_batches
        self.precision = precision or Precision()
        self.callback = callback
        self.batch = -1  # the batch being run, for messages

    def where(self) -> str:
        """A prefix for messages about the current batch."""
        return f"batch {self.batch}: " if self.batch >= 0 else ""

    def first_batch(
        self, data: Iterable[Any], what: str = "data"
    ) -> tuple[tuple[Tensor, ...], Iterator[tuple[int, Any]]]:
        """The first batch's inputs (on the device) and the data to :meth:`run` over.

        Raises :class:`InvalidDataError` when ``data`` yields nothing.
        """
        batches = enumerate(_iterable_of_batches(data, what))
        first = next(batches, None)
        if first is None:
            raise InvalidDataError(f"{what} yielded no batch; give at least one batch")
        inputs = self._to_device(batch_inputs(first[1], 0))
        return inputs, _FirstChained(first, batches)

    def forward(self, inputs: tuple[Tensor, ...], index: int) -> Any:
        """One forward pass, a failure of the model wrapped in :class:`InvalidDataError`."""
        self.batch = index
        with (
            self.precision.forward(self.device),
            forward_errors(InvalidDataError, f"batch {index}: ", inputs),
        ):
            return self.model(*inputs, *self.extra)

    def run(
        self,
        data: Iterable[Any],
        after_batch: Callable[[int], None] | None = None,
        state: Accumulator | None = None,
        checkpoint: Checkpoint | None = None,
        what: str = "data",
    ) -> int:
        """Run over ``data`` (from the checkpoint on, if resuming); the batches done.

        After each batch ``after_batch(batches_done)`` is called, then the
        progress callback, then the checkpoint is written when due.  At the
        end ``state`` is flushed and, under ``torch.distributed``, summed
        over the ranks; a completed run deletes its checkpoint.
        """
        start = 0
        if checkpoint is not None and checkpoint.resume and state is not None:
            start = checkpoint.restore(state)
        stream = (
            data if isinstance(data, _FirstChained) else enumerate(_iterable_of_batches(data, what))
        )
        if start and checkpoint is not None:
            _skip_done(stream, start, self.max_batches, checkpoint.file)
        rest = None if self.max_batches is None else max(self.max_batches - start, 0)
        done = start
        with self.precision.tf32_flags(self.device):
            for index, inputs in self._prefetch(itertools.islice(stream, rest)):
                self.forward(inputs, index)
                done = index + 1
                if after_batch is not None:
                    after_batch(done)
                if self.callback is not None:
                    self.callback(done, int(inputs[0].shape[0]) if inputs[0].dim() else 1)
                if checkpoint is not None and state is not None and checkpoint.every:
                    if done % checkpoint.every == 0:
                        checkpoint.save(state, done)
        self.batch = -1
        if done == 0:
            raise InvalidDataError(f"{what} yielded no batch; give at least one batch")
        if state is not None:
            state.flush()
            if distributed():
                state.reduce(_all_reduce)
        if checkpoint is not None:
            checkpoint.remove()
        return done

    # ------------------------------------------------------------ devices
    def _to_device(
        self, inputs: tuple[Tensor, ...], non_blocking: bool = False
    ) -> tuple[Tensor, ...]:
        return tuple(t.to(self.device, non_blocking=non_blocking) for t in inputs)

    def _prefetch(self, batches: Iterator[tuple[int, Any]]) -> Batches:
        """Parse and move batches; on CUDA, the next batch's copy overlaps compute."""
        if self.device.type != "cuda":
            for index, batch in batches:
                yield index, self._to_device(batch_inputs(batch, index))
            return
        side = torch.cuda.Stream(self.device)

        def load(index: int, batch: Any) -> tuple[int, tuple[Tensor, ...]]:
            inputs = batch_inputs(batch, index)
            with torch.cuda.stream(side):
                pinned = tuple(t.pin_memory() if t.device.type == "cpu" else t for t in inputs)
                return index, self._to_device(pinned, non_blocking=True)

        current = None
        for index, batch in batches:
            upcoming = load(index, batch)
            if current is not None:
                yield current
            torch.cuda.current_stream(self.device).wait_stream(side)
            for t in upcoming[1]:
                t.record_stream(torch.cuda.current_stream(self.device))
            current = upcoming
        if current is not None:
            yield current


def _skip_done(stream: Iterator[Any], start: int, max_batches: int | None, path: Path) -> None:
    """Pass over the ``start`` batches a checkpoint holds; refuse data that has fewer.

    Data shorter than the checkpoint's count (as far as ``max_batches`` reaches)
    means other data, or a damaged count: the result would be silently wrong.
    """
    skipped = sum(1 for _ in itertools.islice(stream, start))
    needed = start if max_batches is None else min(start, max_batches)
    if skipped < needed:
        raise PatternFileError(
            f"{path}: the checkpoint holds {start} batches (its metadata 'batches_done') but "
            f"the data has only {skipped}; resume with the same data, or delete the checkpoint "
            "to start over"
        )


def _all_reduce(tensor: Tensor) -> None:
    """Sum ``tensor`` over every process, in place."""
    dist.all_reduce(tensor)


def _iterable_of_batches(data: Iterable[Any], what: str) -> Iterable[Any]:
    """``data``, unless it is one tensor, array or map-style dataset: single rows, not batches.

    A model that accepts unbatched inputs (``Conv2d`` takes ``(C, H, W)``)
    would then run on each row as if it were a batch.
    """
    if isinstance(data, Tensor) or type(data).__name__ == "ndarray":
        shape = tuple(getattr(data, "shape", ()))
        raise InvalidDataError(
            f"{what} is one {type(data).__name__} of shape {shape}, not an iterable of batches "
            "(iterating it would give its rows one by one); give a list of batches such as "
            "[x] or x.split(256), or a DataLoader"
        )
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(
        data, torch.utils.data.IterableDataset
    ):
        raise InvalidDataError(
            f"{what} is a {type(data).__name__}, whose items are single examples, not "
            "batches; wrap it: torch.utils.data.DataLoader(dataset, batch_size=256)"
        )
    return data


class _FirstChained(Iterator[tuple[int, Any]]):
    """``enumerate(data)`` with its (already read) first batch put back in front."""

    def __init__(self, first: tuple[int, Any], rest: Iterator[tuple[int, Any]]) -> None:
        self._first: tuple[int, Any] | None = first
        self._rest = rest

    def __next__(self) -> tuple[int, Any]:
        if self._first is not None:
            item, self._first = self._first, None
            return item
        return next(self._rest)
