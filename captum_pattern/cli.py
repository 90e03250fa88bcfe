"""The ``captum-pattern`` command line: ``demo``, ``fit`` and ``explain``.

``captum-pattern demo`` trains, fits and draws on bundled data (no download);
``captum-pattern fit MODEL IMAGES`` learns the patterns of a torchvision model
(or your own) from an image folder; ``captum-pattern explain MODEL IMAGE...``
draws PatternNet, PatternAttribution and Captum's methods side by side.
See ``docs/cli.md``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .compare import FIGURE_METHODS

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
    return 0


# ---------------------------------------------------------------------- fit
def _checkpoint_batches(path: Path) -> int:
    """Batches a fitter checkpoint holds (0 when there is none or it is unreadable)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return int((handle.metadata() or {}).get("batches_done", 0))
    except Exception:
        return 0  # the fitter reports what is wrong with it


def _fit(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from .fitter import PatternFitter
    from .images import ImageFiles, ResumableBatches, image_transform, load_model

    device = torch.device(args.device)
    model = load_model(args.model, args.weights, args.num_classes, args.seed).to(device)
    dataset = ImageFiles([args.images], image_transform(args.image_size))
    if len(dataset) == 0:
        print(f"error: no image files under {args.images}", file=sys.stderr)
        return 2
    out = Path(args.out or f"{_stem(args.model)}.patterns.safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = Path(args.checkpoint or f"{out}.checkpoint")
    settings_file = Path(f"{checkpoint}.json")
    settings = _data_settings(args, dataset)
    skip = _checkpoint_batches(checkpoint) if args.resume else 0
    if skip and settings_file.exists():
        earlier = json.loads(settings_file.read_text())
        changed = sorted(k for k in settings if earlier.get(k) != settings[k])
        if changed:
            print(
                f"error: cannot resume {checkpoint}: {', '.join(changed)} changed since it was "
                "written, so the batches would not be the same; use the same settings, or "
                "start over without --resume",
                file=sys.stderr,
            )
            return 2
    if not args.resume and checkpoint.exists():
        print(f"note: starting over; {checkpoint} is from an earlier fit (--resume continues it)")
    settings_file.write_text(json.dumps(settings, indent=1))
    batches = ResumableBatches(
        dataset, args.batch_size, args.workers, pin_memory=device.type == "cuda", skip=skip
    )
    n_batches = len(batches) if args.max_batches is None else min(len(batches), args.max_batches)
    total = min(len(dataset), n_batches * args.batch_size)
    done_images = min(skip * args.batch_size, total)
    if skip:
        print(f"resuming after batch {skip} of {n_batches} from {checkpoint}")
    bar = tqdm(
        total=total, initial=done_images, unit="img", desc="fit patterns", disable=args.no_progress
    )
    try:
        patterns = PatternFitter(model, args.pattern_types).fit(
            batches,
            max_batches=args.max_batches,
            device=device,
            checkpoint=checkpoint,
            checkpoint_every=args.checkpoint_every,
            resume=args.resume,
            callback=lambda done, size: bar.update(size),
        )
    except KeyboardInterrupt:
        bar.close()
        print(f"\ninterrupted; continue with the same command and --resume ({checkpoint})")
        return 130
    bar.close()
    patterns.save(out)
    checkpoint.unlink(missing_ok=True)
    settings_file.unlink(missing_ok=True)
    print(patterns.summary())
    print(f"wrote {out.resolve()}")
    return 0


def _data_settings(args: argparse.Namespace, dataset: Any) -> dict[str, Any]:
    """What decides which images each batch holds (checked when resuming)."""
    return {
        "images": [str(p.resolve()) for p in dataset.paths],
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "model": args.model,
        "weights": args.weights,
        "num_classes": args.num_classes,
        "seed": args.seed,
    }


def _stem(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", spec.rpartition(":")[2] or spec)


# ------------------------------------------------------------------ explain
def _explain(args: argparse.Namespace) -> int:
    import torch

    from .canonize import model_state_guard
    from .compare import METHODS, explain
    from .images import class_names, image_paths, load_images, load_model
    from .patterns import Patterns
    from .visualization import comparison_grid

    device = torch.device(args.device)
    dtype = getattr(torch, args.precision)
    model = load_model(args.model, args.weights, args.num_classes, args.seed)
    patterns = Patterns.load(args.patterns, model=model).to(device=device, dtype=dtype)
    model = model.to(device=device, dtype=dtype)
    names = class_names(args.model, model, args.labels)
    methods = list(dict.fromkeys(args.methods))
    files = image_paths(args.images)
    if not files:
        print("error: no image files given", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[Path, torch.Tensor, dict[str, torch.Tensor], str]] = []
    failed: dict[str, str] = {}
    for i in range(0, len(files), args.batch_size):
        chunk = files[i : i + args.batch_size]
        x, shown = load_images(chunk, args.image_size)
        x = x.to(device=device, dtype=dtype)
        with model_state_guard(model), torch.no_grad():
            probabilities = model(x).softmax(1)
        if args.target is not None and not 0 <= args.target < probabilities.shape[1]:
            print(
                f"error: --target {args.target} is not a class of this model "
                f"(it has {probabilities.shape[1]} outputs)",
                file=sys.stderr,
            )
            return 2
        target = (
            probabilities.argmax(1)
            if args.target is None
            else torch.full_like(probabilities.argmax(1), args.target)
        )
        results: dict[str, torch.Tensor] = {}
        for name in methods:
            if name in failed:
                continue
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")
                    results.update(explain(model, x, target, patterns, [name]))
            except Exception as exc:  # Captum's methods do not support every model
                if METHODS[name].needs_patterns:
                    raise
                failed[name] = f"{type(exc).__name__}: {exc}"
        for k, path in enumerate(chunk):
            t = int(target[k])
            label = names[t] if names is not None and t < len(names) else f"class {t}"
            title = f"{path.parent.name}/{path.name}\n{label} ({float(probabilities[k, t]):.2f})"
            rows.append((path, shown[k], {n: r[k].cpu() for n, r in results.items()}, title))
    for name, reason in failed.items():
        print(f"left out {name}: it failed on this model ({reason})", file=sys.stderr)
    for name in methods:
        bad = [row[0].name for row in rows if name in row[2] and not row[2][name].isfinite().all()]
        if bad:
            print(
                f"{name} is not finite for {len(bad)} image(s) ({', '.join(bad[:3])}): the values "
                f"overflow {args.precision}; try --precision float64",
                file=sys.stderr,
            )
    kept = [n for n in methods if n not in failed]
    groups = {n: METHODS[n].group for n in kept}
    written = []
    if args.grid:
        figures = [(out / "explanations.png", rows)]
    else:
        figures = [(out / f"{j:03d}_{row[0].stem}.png", [row]) for j, row in enumerate(rows)]
    for path, group_rows in figures:
        images = torch.stack([row[1] for row in group_rows])
        explanations = {n: torch.stack([row[2][n] for row in group_rows]) for n in kept}
        comparison_grid(images, explanations, groups, [row[3] for row in group_rows], path)
        written.append(path)
    for path in written:
        print(f"wrote {path.resolve()}")
    return 0


# ------------------------------------------------------------------- parser
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
    parser.add_argument("--num-classes", type=int, help="output size of a torchvision model")
    parser.add_argument("--seed", type=int, default=0, help="seed of random weights")
    parser.add_argument(
        "--image-size", type=int, default=224, help="centre crop size (resize: 256/224 of it)"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")


def build_parser() -> argparse.ArgumentParser:
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
        "Captum's Saliency, Deconvolution, GuidedBackprop and LRP, plus a text summary.",
    )
    demo.add_argument("--out", default="captum-pattern-demo", help="output folder")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--epochs", type=int, default=8)
    demo.add_argument("--images", type=int, default=6, help="number of test images to explain")
    demo.add_argument("--size", type=int, default=32, help="image size the digits are upsampled to")
    demo.add_argument(
        "--threads", type=int, default=1, help="PyTorch CPU threads (0: keep the default)"
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
    fit.add_argument("--batch-size", type=int, default=32)
    fit.add_argument("--max-batches", type=int, help="stop after this many batches")
    fit.add_argument("--workers", type=int, default=4, help="DataLoader worker processes")
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
        "--checkpoint-every", type=int, default=50, help="save a checkpoint every N batches"
    )
    fit.add_argument("--resume", action="store_true", help="continue from the checkpoint")
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
    exp.add_argument("--target", type=int, help="class to explain (default: the predicted class)")
    exp.add_argument("--labels", help="class names, one per line")
    exp.add_argument("--out", default="explanations", help="output folder")
    exp.add_argument("--grid", action="store_true", help="one figure with a row per image")
    exp.add_argument("--batch-size", type=int, default=8)
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
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in APP_MODULES:
            raise
        print(
            f"error: 'captum-pattern {args.command}' needs {exc.name}, part of the application "
            'extra: pip install "captum-pattern[demo]"',
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
