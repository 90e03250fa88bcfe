"""The ``captum-pattern`` command line: ``demo``, ``fit`` and ``explain``.

``captum-pattern demo`` trains, fits and draws on bundled data (no download);
``captum-pattern fit MODEL IMAGES`` learns the patterns of a torchvision model
(or your own) from an image folder; ``captum-pattern explain MODEL IMAGE...``
draws PatternNet, PatternAttribution and Captum's methods side by side.
See ``docs/cli.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
import traceback
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from .compare import FIGURE_METHODS
from .errors import PatternError

__all__ = ["build_parser", "main", "method_name"]

DEFAULT_METHODS = FIGURE_METHODS
_ALIASES = {
    "saliency": "Gradient",
    "deconvolution": "DeConvNet",
    "guidedbackpropagation": "Guided BackProp",
    "inputxgradient": "Input × Gradient",
}


def _key(name: str) -> str:
    return re.sub(r"[^a-z]", "", name.lower())


def method_name(name: str) -> str:
    """The :data:`~captum_pattern.compare.METHODS` name for a command-line spelling.

    Case, spaces, hyphens and underscores do not matter, and Captum's class
    names are accepted.

    >>> method_name("guided-backprop"), method_name("Saliency"), method_name("patternnet")
    ('Guided BackProp', 'Gradient', 'PatternNet')
    """
    from .compare import METHODS

    known = {_key(n): n for n in METHODS} | _ALIASES
    if _key(name) not in known:
        raise argparse.ArgumentTypeError(
            f"unknown method {name!r}; choose from {', '.join(METHODS)}"
        )
    return known[_key(name)]


# --------------------------------------------------------------------- demo
def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(
        args.out,
        seed=args.seed,
        epochs=args.epochs,
        n_images=args.images,
        size=args.size,
        threads=args.threads or None,
        progress=not args.no_progress,
    )
    print(result.summary.read_text(), end="")
    print(f"wrote {result.out_dir.resolve()}")
    print(f"figure: {result.figure.resolve()}")
    if result.page is not None:
        print(f"page: {result.page.resolve()}")
    return 0


# ------------------------------------------------------------ shared checks
class _Refused(Exception):
    """A problem found before the long work: printed as ``error: ...``, exit status 2."""


def _writable_file(path: Path, what: str) -> None:
    """Refuse now what would fail after the work: a folder, or a place we cannot write."""
    if path.is_dir():
        raise _Refused(f"{what} {path} is a folder; give a file name (e.g. {path / 'x'}...)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=True):
            pass
    except OSError as exc:
        raise _Refused(f"cannot write {what} {path}: {exc.strerror or exc}") from exc
    if path.exists() and not os.access(path, os.W_OK):
        raise _Refused(f"cannot write {what} {path}: the file is read-only")


def _writable_folder(path: Path, what: str) -> bool:
    """Refuse an unusable output folder now; whether it had to be created."""
    if path.exists() and not path.is_dir():
        raise _Refused(f"{what} {path} is a file; give a folder")
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".captum-pattern-", delete=True):
            pass
    except OSError as exc:
        raise _Refused(f"cannot write into {what} {path}: {exc.strerror or exc}") from exc
    return created


@contextlib.contextmanager
def _removed_if_left_empty(path: Path, created: bool) -> Iterator[None]:
    """On an error, remove the folder this command created if nothing was written into it."""
    try:
        yield
    except BaseException:
        if created and path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        raise


def _preprocessing(args: argparse.Namespace) -> Any:
    from .images import preprocessing_for

    return preprocessing_for(
        args.model, args.weights, args.resize, args.image_size, args.interpolation
    )


def _check_headers(files: Sequence[Path]) -> None:
    """Open every image's header (cheap): a non-image or damaged header fails now, named."""
    from PIL import Image

    from .images import UnreadableImageError

    for path in files:
        try:
            with Image.open(path) as image:
                image.verify()  # PNG: checks every chunk's CRC; others: the header
        except Exception as exc:
            raise UnreadableImageError(path, f"{type(exc).__name__}: {exc}") from exc


# ---------------------------------------------------------------------- fit
@dataclass(frozen=True)
class _Ranks:
    """This process's place in a ``torchrun`` job (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, files: Sequence[Path]) -> list[Path]:
        """Every ``world``-th image from ``rank`` on: each image on exactly one rank, none dropped.

        >>> files = [Path(f"{i}.png") for i in range(5)]
        >>> [p.name for p in _Ranks(1, 2).shard(files)]
        ['1.png', '3.png']
        """
        return list(files[self.rank :: self.world])

    def file(self, path: Path) -> Path:
        """This rank's copy of a per-process file (the fitter's ``<checkpoint>.rank<r>``)."""
        return path if self.world == 1 else path.with_name(f"{path.name}.rank{self.rank}")

    def say(self, text: str) -> None:
        """Print on rank 0 only (the other ranks would repeat it)."""
        if self.main:
            print(text, flush=True)


#: the variables ``torchrun`` sets for each process
_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@contextlib.contextmanager
def _process_group(args: argparse.Namespace) -> Iterator[tuple[_Ranks, Any]]:
    """Join the ``torchrun`` job this process belongs to (if any); yields its ranks and device.

    ``gloo`` on the CPU, ``nccl`` on CUDA with device ``cuda:LOCAL_RANK``;
    collectives give up after ``--timeout`` seconds.  The group is destroyed
    on the way out, also after an error.
    """
    import torch

    device = torch.device(args.device)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield _Ranks(), device
        return
    import torch.distributed as dist

    missing = [v for v in _TORCHRUN_VARIABLES if v not in os.environ]
    if missing:
        raise _Refused(
            f"WORLD_SIZE is set but {', '.join(missing)} not: start several processes with "
            "torchrun --nproc_per_node=N -m captum_pattern fit ..."
        )
    if dist.is_initialized():
        raise _Refused("a torch.distributed process group is already running in this process")
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=args.timeout))
    try:
        yield _Ranks(dist.get_rank(), dist.get_world_size()), device
    finally:
        dist.destroy_process_group()


def _agree(ranks: _Ranks, device: Any, refusal: _Refused | None) -> None:
    """Stop every rank when one refused before the work (each rank checks its own shard)."""
    if ranks.world == 1:
        if refusal is not None:
            raise refusal
        return
    import torch
    import torch.distributed as dist

    flag = torch.tensor([0 if refusal is None else ranks.rank + 1], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if refusal is not None:
        raise _Refused(f"rank {ranks.rank} of {ranks.world}: {refusal}")
    if int(flag):
        raise _Refused(
            f"rank {int(flag) - 1} refused to start (its message says why); so does rank "
            f"{ranks.rank}"
        )


def _lost_peers(
    ranks: _Ranks, args: argparse.Namespace, checkpoint: Path, error: BaseException
) -> _Refused:
    """What a rank says when a collective fails: another rank died or hangs."""
    text = str(error).strip()
    reason = text.splitlines()[0][:200] if text else type(error).__name__
    return _Refused(
        f"rank {ranks.rank} of {ranks.world}: the other processes did not all answer (within "
        f"--timeout {args.timeout:g} s); one of them failed or hangs, its message says why "
        f"({reason}). The batches done are kept in {checkpoint}.rank<r> (every "
        "--checkpoint-every batches): fix the cause and continue with the same command and "
        "--resume"
    )


def _from_collective(error: BaseException) -> bool:
    """Whether ``error`` was raised inside a ``torch.distributed`` collective.

    gloo reports a lost peer or a timeout as a plain ``RuntimeError``; where it
    comes from tells it apart from the model's own errors.
    """
    import torch.distributed as dist

    if isinstance(error, dist.DistError):
        return True
    return any(
        Path(frame.f_code.co_filename).name == "distributed_c10d.py"
        for frame, _ in traceback.walk_tb(error.__traceback__)
    )


def _checkpoint_batches(path: Path) -> int:
    """Batches a fitter checkpoint holds (0 when there is none or it is unreadable)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return int((handle.metadata() or {}).get("batches_done", 0))
    except Exception:
        return 0  # the fitter reports what is wrong with it


#: settings that older checkpoints do not record, and the value they had
_SETTING_DEFAULTS = {"precision": "float32", "world_size": 1}


def _fit_plan(
    args: argparse.Namespace, files: list[Path], settings_file: Path, skip: int, world: int
) -> tuple[list[Path], list[int]]:
    """The images of the fit, in batch order, and the batches an earlier run dropped.

    A resumed fit keeps its first run's list (so every batch holds the same
    images): images removed since are left out of their batches with a
    warning; images added since, or other changed settings, refuse the resume.
    """
    if not (skip and settings_file.exists()):
        return files, []
    damaged = f"cannot resume: {settings_file} is damaged"
    try:
        earlier = json.loads(settings_file.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise _Refused(f"{damaged} ({type(exc).__name__}); start over") from exc
    record = earlier if isinstance(earlier, dict) else {}
    images, dropped = record.get("images"), record.get("dropped_batches", [])
    if not (
        isinstance(images, list)
        and all(isinstance(p, str) for p in images)
        and isinstance(dropped, list)
        and all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in dropped)
    ):
        raise _Refused(
            f"{damaged} (expected an object with a list of image paths and a list of dropped "
            "batch numbers); start over without --resume"
        )
    settings = _data_settings(args, files, world)
    keys = [k for k in settings if k != "images"]
    changed = sorted(k for k in keys if earlier.get(k, _SETTING_DEFAULTS.get(k)) != settings[k])
    if changed:
        raise _Refused(
            f"cannot resume {settings_file.name[: -len('.json')]}: {', '.join(changed)} changed "
            "since it was written, so the batches would not be the same; use the same settings "
            "(and the same number of processes), or start over without --resume"
        )
    plan = [Path(p) for p in images]
    known = {str(p) for p in plan}
    added = [str(p) for p in (f.resolve() for f in files) if str(p) not in known]
    if added:
        raise _Refused(
            f"cannot resume: {len(added)} image(s) were added since the checkpoint "
            f"({', '.join(added[:3])}); the batches would not be the same: start over without "
            "--resume (images removed since are fine)"
        )
    present = {str(f.resolve()) for f in files}
    removed = [p for p in plan if str(p) not in present]
    if removed:
        shown = ", ".join(p.name for p in removed[:3])
        print(f"note: {len(removed)} image(s) removed since the checkpoint are left out ({shown})")
    return plan, list(dropped)


def _other_world(checkpoint: Path, ranks: _Ranks) -> None:
    """Refuse to resume a checkpoint written by another number of processes."""
    mine = ranks.file(checkpoint)
    if mine.exists():
        return
    if ranks.world == 1 and checkpoint.with_name(f"{checkpoint.name}.rank0").exists():
        raise _Refused(
            f"cannot resume: {checkpoint}.rank0 is the checkpoint of a fit on several "
            "processes; resume it with torchrun and the same --nproc_per_node/--nnodes"
        )
    if ranks.world > 1 and checkpoint.exists():
        raise _Refused(
            f"cannot resume: {checkpoint} is the checkpoint of a fit on one process; resume it "
            "without torchrun, or start over without --resume"
        )


def _fit(args: argparse.Namespace) -> int:
    from .images import UnreadableImageError

    out = Path(args.out or f"{_stem(args.model)}.patterns.safetensors")
    checkpoint = Path(args.checkpoint or f"{out}.checkpoint")
    with _process_group(args) as (ranks, device):
        refusal, prepared = None, None
        try:
            prepared = _prepare_fit(args, ranks, device, out, checkpoint)
        except _Refused as exc:
            refusal = exc
        except (UnreadableImageError, FileNotFoundError, ValueError, TypeError) as exc:
            if ranks.world == 1:
                raise
            refusal = _Refused(str(exc))
        try:
            _agree(ranks, device, refusal)
        except RuntimeError as exc:  # a rank is gone before the fit
            if not _from_collective(exc):
                raise
            raise _lost_peers(ranks, args, checkpoint, exc) from exc
        assert prepared is not None
        return _run_fit(args, ranks, device, out, checkpoint, prepared)


@dataclass
class _PreparedFit:
    model: Any
    batches: Any
    settings: dict[str, Any]
    settings_file: Path
    skip: int
    total: int
    skipped: list[Path]


def _prepare_fit(
    args: argparse.Namespace, ranks: _Ranks, device: Any, out: Path, checkpoint: Path
) -> _PreparedFit:
    """Everything before the long work: checks, the image list and this rank's shard, the model."""
    import torch

    from .images import ImageFiles, ResumableBatches, UnreadableImageError, image_paths, load_model

    mine = ranks.file(checkpoint)
    settings_file = Path(f"{mine}.json")
    if ranks.main:
        _writable_file(out, "--out")
    _writable_file(mine, "--checkpoint")
    files = image_paths([args.images])
    if not files:
        raise _Refused(f"no image files under {args.images}")
    if args.resume:
        _other_world(checkpoint, ranks)
    skip = _checkpoint_batches(mine) if args.resume else 0
    plan, dropped = _fit_plan(args, files, settings_file, skip, ranks.world)
    if len(plan) < ranks.world:
        raise _Refused(
            f"{len(plan)} image(s) for {ranks.world} processes: each needs at least one; "
            "start fewer processes"
        )
    shard = ranks.shard(plan)
    if args.on_bad_image == "error":
        try:
            _check_headers([p for p in shard if p.exists()])
        except UnreadableImageError as exc:
            raise _Refused(
                f"{exc}; remove or replace it, or skip unreadable images with --on-bad-image skip"
            ) from exc
    dtype = getattr(torch, args.precision)
    model = load_model(args.model, args.weights, args.num_classes, args.seed)
    model = model.to(device=device, dtype=dtype)
    preprocessing = _preprocessing(args)
    ranks.say(f"images: {preprocessing.describe()}")
    if ranks.world > 1:
        ranks.say(f"{len(plan)} images on {ranks.world} processes, every {ranks.world}th to each")
    if not args.resume and mine.exists():
        print(f"note: starting over; {mine} is from an earlier fit (--resume continues it)")
    settings = {**_data_settings(args, plan, ranks.world), "dropped_batches": dropped}
    settings_file.write_text(json.dumps(settings, indent=1))
    skipped: list[Path] = []

    def unreadable(error: UnreadableImageError) -> None:
        if args.on_bad_image == "error" and error.path.exists():
            raise error
        skipped.append(error.path)
        warnings.warn(f"skipped {error}", stacklevel=1)

    def dropped_batch(index: int) -> None:
        settings["dropped_batches"].append(index)
        settings_file.write_text(json.dumps(settings, indent=1))

    batches = ResumableBatches(
        ImageFiles(shard, preprocessing, search=False),
        args.batch_size,
        args.workers,
        pin_memory=device.type == "cuda",
        skip=skip,
        on_unreadable=unreadable,
        dropped=dropped,
        on_dropped=dropped_batch,
    )
    per_rank = args.batch_size * (args.max_batches or len(plan))
    total = sum(min(len(plan[r :: ranks.world]), per_rank) for r in range(ranks.world))
    return _PreparedFit(model, _cast(batches, dtype), settings, settings_file, skip, total, skipped)


def _cast(batches: Iterable[Any], dtype: Any) -> Iterable[Any]:
    """The batches' images in ``dtype`` (float32, as read, needs nothing)."""
    import torch

    if dtype == torch.float32:
        return batches
    return ((images.to(dtype), indices) for images, indices in batches)


def _run_fit(
    args: argparse.Namespace,
    ranks: _Ranks,
    device: Any,
    out: Path,
    checkpoint: Path,
    prepared: _PreparedFit,
) -> int:
    """The fit itself on this rank's shard; rank 0 writes the merged patterns."""
    from tqdm.auto import tqdm

    from .fitter import PatternFitter
    from .images import UnreadableImageError

    if prepared.skip:
        print(
            f"{'' if ranks.world == 1 else f'rank {ranks.rank}: '}resuming after batch "
            f"{prepared.skip} from {ranks.file(checkpoint)}"
        )
    # rank 0's bar counts its own images times the number of processes: an estimate of the
    # total rate that needs no collective while the fit runs (the shards differ by one image)
    done = min(prepared.skip * args.batch_size * ranks.world, prepared.total)
    bar = tqdm(
        total=prepared.total,
        initial=done,
        unit="img",
        desc="fit patterns" + (f" ({ranks.world} processes)" if ranks.world > 1 else ""),
        disable=args.no_progress or not ranks.main,
    )

    def progress(_: int, size: int) -> None:
        bar.update(min(size * ranks.world, bar.total - bar.n))

    try:
        patterns = PatternFitter(prepared.model, args.pattern_types).fit(
            prepared.batches,
            max_batches=args.max_batches,
            device=device,
            checkpoint=checkpoint,
            checkpoint_every=args.checkpoint_every,
            resume=args.resume,
            callback=progress,
        )
    except KeyboardInterrupt:
        bar.close()
        print(f"\ninterrupted; continue with the same command and --resume ({checkpoint})")
        return 130
    except UnreadableImageError as exc:
        bar.close()
        raise _Refused(
            f"{exc}. Replace or remove the file and continue with the same command and "
            f"--resume ({checkpoint} keeps the batches done), or skip such images with "
            "--on-bad-image skip"
        ) from exc
    except RuntimeError as exc:
        bar.close()
        if ranks.world > 1 and _from_collective(exc):
            raise _lost_peers(ranks, args, checkpoint, exc) from exc
        raise
    bar.close()
    if ranks.main:
        patterns.save(out)
    prepared.settings_file.unlink(missing_ok=True)
    if ranks.world > 1:
        _barrier(ranks, args, checkpoint)  # the others wait until the file is written
    ranks.say(patterns.summary())
    if prepared.skipped:
        names = ", ".join(str(p) for p in prepared.skipped[:5])
        print(f"skipped {len(prepared.skipped)} unreadable image(s): {names}", file=sys.stderr)
    ranks.say(f"wrote {out.resolve()}")
    return 0


def _barrier(ranks: _Ranks, args: argparse.Namespace, checkpoint: Path) -> None:
    import torch.distributed as dist

    try:
        dist.barrier()
    except RuntimeError as exc:
        raise _lost_peers(ranks, args, checkpoint, exc) from exc


def _data_settings(
    args: argparse.Namespace, files: Sequence[Path], world_size: int
) -> dict[str, Any]:
    """What decides which images each batch holds (checked when resuming)."""
    return {
        "images": [str(p.resolve()) for p in files],
        "image_size": args.image_size,
        "resize": args.resize,
        "interpolation": args.interpolation,
        "batch_size": args.batch_size,
        "model": args.model,
        "weights": args.weights,
        "num_classes": args.num_classes,
        "seed": args.seed,
        "precision": args.precision,
        "world_size": world_size,
    }


def _stem(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", spec.rpartition(":")[2] or spec)


# ------------------------------------------------------------------ explain
def _explain(args: argparse.Namespace) -> int:
    out = Path(args.out)
    created = _writable_folder(out, "--out")
    with _removed_if_left_empty(out, created):
        return _explain_into(out, args)


def _explain_into(out: Path, args: argparse.Namespace) -> int:
    import torch

    from .canonize import model_state_guard
    from .images import UnreadableImageError, class_names, image_paths, load_model, read_image
    from .patterns import Patterns

    files = image_paths(args.images)
    if not files:
        raise _Refused("no image files given")
    device = torch.device(args.device)
    dtype = getattr(torch, args.precision)
    model = load_model(args.model, args.weights, args.num_classes, args.seed)
    patterns = Patterns.load(args.patterns, model=model).to(device=device, dtype=dtype)
    model = model.to(device=device, dtype=dtype)
    preprocessing = _preprocessing(args)
    names = class_names(args.model, model, args.labels)
    report = _Report(list(dict.fromkeys(args.methods)), args.precision)
    rows: list[_Row] = []
    for i in range(0, len(files), args.batch_size):
        chunk: list[tuple[Path, torch.Tensor]] = []
        for path in files[i : i + args.batch_size]:
            try:
                chunk.append((path, preprocessing.display(read_image(path))))
            except UnreadableImageError as exc:
                report.unreadable.append(str(exc))
                print(f"skipped {exc}", file=sys.stderr)
        if not chunk:
            continue
        shown = torch.stack([image for _, image in chunk])
        mean = torch.tensor(preprocessing.mean).reshape(1, -1, 1, 1)
        std = torch.tensor(preprocessing.std).reshape(1, -1, 1, 1)
        x = ((shown - mean) / std).to(device=device, dtype=dtype)
        with model_state_guard(model), torch.no_grad():
            probabilities = model(x).softmax(1)
        if args.target is not None and args.target >= probabilities.shape[1]:
            raise _Refused(
                f"--target {args.target} is not a class of this model "
                f"(it has {probabilities.shape[1]} outputs)"
            )
        target = (
            probabilities.argmax(1)
            if args.target is None
            else torch.full_like(probabilities.argmax(1), args.target)
        )
        results = report.explain(model, x, target, patterns)
        new_rows = []
        for k, (path, image) in enumerate(chunk):
            t = int(target[k])
            label = names[t] if names is not None and t < len(names) else f"class {t}"
            title = f"{path.parent.name}/{path.name}\n{label} ({float(probabilities[k, t]):.2f})"
            new_rows.append(_Row(path, image, {n: r[k].cpu() for n, r in results.items()}, title))
        if not args.grid:  # each figure as soon as it is done
            for row in new_rows:
                report.draw(out / f"{len(rows):03d}_{row.path.stem}.png", [row])
                rows.append(row)
        else:
            rows += new_rows
    if args.grid and rows:
        report.draw(out / "explanations.png", rows)
    return report.finish(rows)


@dataclass
class _Row:
    path: Path
    image: Any
    explanations: dict[str, Any]
    title: str


@dataclass
class _Report:
    """What ``explain`` ran, wrote and could not do, said at the end."""

    methods: list[str]
    precision: str
    failed: dict[str, str] = field(default_factory=dict)
    unreadable: list[str] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)

    def explain(self, model: Any, x: Any, target: Any, patterns: Any) -> dict[str, Any]:
        from .compare import METHODS, explain

        results: dict[str, Any] = {}
        for name in self.methods:
            if name in self.failed:
                continue
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")
                    results.update(explain(model, x, target, patterns, [name]))
            except Exception as exc:  # Captum's methods do not support every model
                if METHODS[name].needs_patterns:
                    raise
                self.failed[name] = f"{type(exc).__name__}: {exc}"
                print(
                    f"left out {name}: it failed on this model ({self.failed[name]})",
                    file=sys.stderr,
                )
        return results

    def draw(self, path: Path, rows: list[_Row]) -> None:
        import torch

        from .compare import METHODS
        from .visualization import comparison_grid

        kept = [n for n in self.methods if n not in self.failed]
        images = torch.stack([row.image for row in rows])
        explanations = {n: torch.stack([row.explanations[n] for row in rows]) for n in kept}
        groups = {n: METHODS[n].group for n in kept}
        comparison_grid(images, explanations, groups, [row.title for row in rows], path)
        self.written.append(path)
        print(f"wrote {path.resolve()}", flush=True)

    def finish(self, rows: list[_Row]) -> int:
        for name in self.methods:
            bad = [
                row.path.name
                for row in rows
                if name in row.explanations and not row.explanations[name].isfinite().all()
            ]
            if bad:
                print(
                    f"{name} is not finite for {len(bad)} image(s) ({', '.join(bad[:3])}): the "
                    f"values overflow {self.precision}; try --precision float64",
                    file=sys.stderr,
                )
        if self.unreadable:
            print(
                f"error: {len(self.unreadable)} image(s) could not be read and have no figure; "
                f"the {len(self.written)} figure(s) of the others were written",
                file=sys.stderr,
            )
            return 1
        return 0


# ------------------------------------------------------------------- parser
def _count(minimum: int) -> Any:
    """An argparse type: an integer of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _seconds(text: str) -> float:
    """An argparse type: a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text}")
    return value


def _interpolation(text: str) -> str:
    """An argparse type: one of :data:`~captum_pattern.images.INTERPOLATIONS`."""
    from .images import INTERPOLATIONS  # only when the option is given: torchvision is slow

    if text.lower() not in INTERPOLATIONS:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(INTERPOLATIONS)}")
    return text.lower()


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        help="torchvision model name (vgg16, resnet50, ...) or package.module:function "
        "or file.py:function",
    )
    parser.add_argument(
        "--weights",
        help="state-dict file (.pth/.safetensors), or 'random' (seeded); default: "
        "torchvision's cache for a torchvision model (never downloaded), the factory's own",
    )
    parser.add_argument("--num-classes", type=_count(1), help="output size of a torchvision model")
    parser.add_argument("--seed", type=int, default=0, help="seed of random weights")
    parser.add_argument(
        "--image-size",
        "--crop",
        dest="image_size",
        type=_count(1),
        help="centre crop size; default: the weights' own for torchvision's weights, else 224",
    )
    parser.add_argument(
        "--resize",
        type=_count(1),
        help="resize the short side to this first; default: the weights' own for torchvision's "
        "weights, else 256/224 of the crop (a new --crop alone keeps the weights' ratio)",
    )
    parser.add_argument(
        "--interpolation",
        type=_interpolation,
        help="resize interpolation: bilinear, bicubic, nearest, lanczos, box or hamming; "
        "default: the weights' own, else bilinear",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")


def build_parser() -> argparse.ArgumentParser:  # long: one add_argument per option, flat
    """The argument parser of ``captum-pattern``."""
    parser = argparse.ArgumentParser(
        prog="captum-pattern",
        description="PatternNet and PatternAttribution (Kindermans et al., ICLR 2018) for PyTorch",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        help="train a small CNN on scikit-learn's digits, fit patterns, draw a comparison",
        description="Train a small CNN on scikit-learn's bundled digits (no download), fit "
        "its patterns and write a figure comparing PatternNet and PatternAttribution with "
        "Captum's Saliency, Deconvolution, GuidedBackprop and LRP, the signal quality rho "
        "and patch degradation, a text summary and index.html showing all three.",
    )
    demo.add_argument("--out", default="captum-pattern-demo", help="output folder")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--epochs", type=_count(1), default=8)
    demo.add_argument(
        "--images", type=_count(1), default=6, help="number of test images to explain"
    )
    demo.add_argument(
        "--size", type=_count(8), default=32, help="image size the digits are upsampled to"
    )
    demo.add_argument(
        "--threads", type=_count(0), default=1, help="PyTorch CPU threads (0: keep the default)"
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)

    fit = sub.add_parser(
        "fit",
        help="learn the patterns of a model from a folder of images",
        description="Learn the patterns of MODEL from the images under IMAGES (ImageFolder "
        "layout or a flat folder) with the standard ImageNet transform, in one pass, and "
        "write a patterns file. Interrupted fits continue with --resume.",
    )
    _model_arguments(fit)
    fit.add_argument("images", help="image folder (ImageFolder layout or flat)")
    fit.add_argument("--out", help="patterns file (default: <model>.patterns.safetensors)")
    fit.add_argument("--batch-size", type=_count(1), default=32)
    fit.add_argument("--max-batches", type=_count(1), help="stop after this many batches")
    fit.add_argument("--workers", type=_count(0), default=4, help="DataLoader worker processes")
    fit.add_argument(
        "--pattern-types",
        nargs="+",
        default=["relu", "relu_negative", "linear"],
        choices=["relu", "relu_negative", "linear"],
        help="which patterns to learn",
    )
    fit.add_argument(
        "--checkpoint", help="checkpoint file (default: the output file + '.checkpoint')"
    )
    fit.add_argument(
        "--checkpoint-every",
        type=_count(0),
        default=50,
        help="save a checkpoint every N batches (0: never)",
    )
    fit.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoint (images removed since are left out)",
    )
    fit.add_argument(
        "--on-bad-image",
        choices=["skip", "error"],
        default="skip",
        help="an image that cannot be read: skip it with a warning naming it (default), or "
        "stop with an error naming it (headers are checked before the fit)",
    )
    fit.add_argument(
        "--precision",
        choices=["float32", "float64"],
        default="float32",
        help="the model's and the images' dtype during the fit (the sums are float64 anyway)",
    )
    fit.add_argument(
        "--timeout",
        type=_seconds,
        default=1800.0,
        help="under torchrun: seconds a process waits for the others (the merge of the sums "
        "at the end, the start) before it stops with an error; default 1800",
    )
    fit.add_argument("--no-progress", action="store_true", help="no progress bar")
    fit.set_defaults(func=_fit)

    exp = sub.add_parser(
        "explain",
        help="draw explanations of images, PatternNet and PatternAttribution beside Captum's",
        description="Explain each image with the chosen methods and write one figure per "
        "image (or one grid with --grid): the input, then one column per method, signals in "
        "input space and attributions as heat maps (the paper's Fig. 1/6).",
    )
    _model_arguments(exp)
    exp.add_argument("images", nargs="+", help="image files or folders")
    exp.add_argument("--patterns", required=True, help="patterns file from 'captum-pattern fit'")
    exp.add_argument(
        "--methods",
        nargs="+",
        type=method_name,
        default=list(DEFAULT_METHODS),
        help="methods, e.g. PatternNet PatternAttribution Saliency guided-backprop LRP",
    )
    exp.add_argument(
        "--target", type=_count(0), help="class to explain (default: the predicted class)"
    )
    exp.add_argument("--labels", help="class names, one per line")
    exp.add_argument("--out", default="explanations", help="output folder")
    exp.add_argument("--grid", action="store_true", help="one figure with a row per image")
    exp.add_argument("--batch-size", type=_count(1), default=8)
    exp.add_argument(
        "--precision",
        choices=["float32", "float64"],
        default="float32",
        help="compute in float64 when a deep network's PatternNet overflows float32",
    )
    exp.set_defaults(func=_explain)
    return parser


#: modules of the ``demo`` extra (``pip install "captum-pattern[demo]"``)
APP_MODULES = ("torchvision", "sklearn", "PIL", "matplotlib", "tqdm")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except _Refused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except PatternError as exc:  # a file, model or data the package refuses: its message says why
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in APP_MODULES:
            raise
        print(
            f"error: the command line needs {exc.name}, part of the application extra: "
            'pip install "captum-pattern[demo]"',
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
