"""The demo: train a small CNN on digits, fit its patterns, compare explanations.

scikit-learn's bundled 8×8 digits, upsampled to 32×32 so that the network has
two convolutions before its first pooling, train :class:`~captum_pattern.zoo.SmallCNN`;
:class:`~captum_pattern.PatternFitter` learns the patterns in one pass over the
training images; a few test images are explained with Captum's gradient
(Saliency), DeConvNet, Guided BackProp and LRP and with PatternNet and
PatternAttribution, and drawn in the layout of the paper's Fig. 1/6.
Everything it needs ships with the installed packages; nothing is downloaded.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .canonize import model_state_guard
from .compare import FIGURE_METHODS, METHODS, explain
from .fitter import PatternFitter
from .patterns import Patterns
from .visualization import comparison_grid
from .zoo import SmallCNN, Split, accuracy, digits, train_classifier, upsample

__all__ = ["DEMO_METHODS", "DemoResult", "run_demo"]

DEMO_METHODS = FIGURE_METHODS


@dataclass
class DemoResult:
    """What the demo produced: file paths, test accuracy and seconds per stage."""

    out_dir: Path
    figure: Path
    summary: Path
    patterns: Path
    model: Path
    test_accuracy: float
    seconds: float
    stages: dict[str, float] = field(default_factory=dict)


def run_demo(
    out_dir: str | Path = "captum-pattern-demo",
    seed: int = 0,
    epochs: int = 8,
    n_images: int = 6,
    size: int = 32,
    threads: int | None = 1,
    progress: bool = True,
) -> DemoResult:
    """Train, fit, explain, draw; returns the paths written.

    ``threads`` sets PyTorch's CPU threads for the run (restored afterwards):
    one thread is the fastest on a small machine shared with other work,
    ``None`` keeps the current setting.

    >>> result = run_demo("/tmp/cp-demo-doctest", epochs=1, n_images=2, size=8, progress=False)
    >>> result.figure.name, result.figure.exists()
    ('comparison.png', True)
    """
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(Path(out_dir), seed, epochs, n_images, size, progress)
    finally:
        torch.set_num_threads(previous_threads)


def _run(out: Path, seed: int, epochs: int, n_images: int, size: int, progress: bool) -> DemoResult:
    start = time.perf_counter()
    stages: dict[str, float] = {}
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    data = digits(seed=seed)
    if size != 8:
        data = upsample(data, size)
    model = SmallCNN(size=size)
    with tqdm(total=epochs, desc="train CNN", unit="epoch", disable=not progress) as bar:

        def on_epoch(epoch: int, loss: float) -> None:
            bar.set_postfix(loss=f"{loss:.3f}")
            bar.update()

        train_classifier(
            model, data.x_train, data.y_train, epochs=epochs, lr=2e-3, seed=seed, on_epoch=on_epoch
        )
    model.eval()  # the demo's own model: trained, now only explained
    test_accuracy = accuracy(model, data.x_test, data.y_test)
    model_path = out / "digits_cnn.pt"
    torch.save(model.state_dict(), model_path)
    stages["train"] = time.perf_counter() - start

    batches = data.x_train.split(256)
    mark = time.perf_counter()
    with tqdm(
        total=len(data.x_train), desc="fit patterns", unit="img", disable=not progress
    ) as bar:
        patterns = PatternFitter(model).fit(batches, callback=lambda done, n: bar.update(n))
    stages["fit"] = time.perf_counter() - mark
    patterns_path = out / "digits.patterns.safetensors"
    patterns.save(patterns_path)

    mark = time.perf_counter()
    x, labels = _pick_examples(model, data.x_test, data.y_test, n_images)
    with model_state_guard(model), torch.no_grad():
        logits = model(x)
    predicted = logits.argmax(1)
    confidence = logits.softmax(1).max(1).values
    explanations = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")
        for name in tqdm(DEMO_METHODS, desc="explain", unit="method", disable=not progress):
            explanations.update(explain(model, x, predicted, patterns, methods=[name]))
    stages["explain"] = time.perf_counter() - mark

    mark = time.perf_counter()
    titles = [
        f"true {int(t)} / pred {int(p)} ({float(c):.2f})"
        for t, p, c in zip(labels, predicted, confidence)
    ]
    figure_path = out / "comparison.png"
    comparison_grid(
        x, explanations, {n: METHODS[n].group for n in explanations}, titles, figure_path
    )
    stages["draw"] = time.perf_counter() - mark
    seconds = time.perf_counter() - start
    summary_path = out / "summary.txt"
    summary_path.write_text(
        _summary(size, data, test_accuracy, patterns, figure_path, explanations, stages, seconds)
    )
    return DemoResult(
        out, figure_path, summary_path, patterns_path, model_path, test_accuracy, seconds, stages
    )


def _summary(
    size: int,
    data: Split,
    test_accuracy: float,
    patterns: Patterns,
    figure_path: Path,
    explanations: dict[str, torch.Tensor],
    stages: dict[str, float],
    seconds: float,
) -> str:
    timing = ", ".join(f"{k} {v:.1f} s" for k, v in stages.items())
    return (
        f"captum-pattern demo: scikit-learn digits upsampled to {size}x{size}, SmallCNN\n"
        f"test accuracy: {test_accuracy:.3f} ({len(data.x_test)} test images)\n"
        f"patterns fitted on {len(data.x_train)} training images:\n"
        f"{patterns.summary()}\n"
        f"figure: {figure_path}\n"
        "  rows: test images (true class / predicted class (softmax)); columns: input, "
        + ", ".join(explanations)
        + "\n"
        "  explaining the predicted class; Gradient, DeConvNet, Guided BackProp and PatternNet\n"
        "  are signals in input space, normalised as x / (2 max|x|) + 0.5 (grey = 0);\n"
        "  LRP and PatternAttribution are heat maps (red positive, blue negative).\n"
        f"time: {seconds:.1f} s ({timing})\n"
    )


def _pick_examples(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first correctly classified test image of each of ``n`` classes."""
    with model_state_guard(model), torch.no_grad():
        correct = model(x).argmax(1) == y
    chosen: list[int] = []
    seen: set[int] = set()
    for i in range(len(x)):
        label = int(y[i])
        if correct[i] and label not in seen:
            chosen.append(i)
            seen.add(label)
        if len(chosen) == n:
            break
    index = torch.tensor(chosen or list(range(min(n, len(x)))))
    return x[index], y[index]
