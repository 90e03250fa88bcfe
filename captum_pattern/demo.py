"""The demo: train a small CNN on digits, fit its patterns, compare explanations.

scikit-learn's bundled 8×8 digits, upsampled to 32×32 so that the network has
two convolutions before its first pooling, train :class:`~captum_pattern.zoo.SmallCNN`;
:class:`~captum_pattern.PatternFitter` learns the patterns in one pass over the
training images; a few test images are explained with Captum's gradient
(Saliency), DeConvNet, Guided BackProp and LRP and with PatternNet and
PatternAttribution, and drawn in the layout of the paper's Fig. 1/6.
Then the paper's two measurements, kept cheap: ρ of each signal estimator per
layer (Fig. 3; :func:`~captum_pattern.metrics.signal_quality` on the two halves
of the test set, 8 positions per image) and patch degradation of the
attribution methods against a random order (Fig. 4;
:func:`~captum_pattern.metrics.patch_degradation`).  ``index.html`` shows the
three results on one page.  Everything it needs ships with the installed
packages; nothing is downloaded.
"""

from __future__ import annotations

import html
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .canonize import model_state_guard
from .compare import FIGURE_METHODS, METHODS, explain
from .fitter import PatternFitter
from .metrics import Degradation, patch_degradation, rho_means, signal_quality
from .patterns import Patterns
from .visualization import comparison_grid
from .zoo import SmallCNN, Split, accuracy, digits, train_classifier, upsample

__all__ = ["DEGRADATION_METHODS", "DEMO_METHODS", "DemoResult", "run_demo"]

DEMO_METHODS = FIGURE_METHODS
#: the attribution methods whose patch degradation the demo page shows (the paper's Fig. 4)
DEGRADATION_METHODS = ("PatternAttribution", "LRP")
#: patches replaced in the degradation curves (of 64: the first quarter of the image)
DEGRADATION_STEPS = 16
#: the ρ estimators in the paper's order, with its names
ESTIMATOR_NAMES = {"random": "random", "filter": "S_w", "linear": "S_a", "two_component": "S_a+-"}


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
    page: Path | None = None


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


def _train(
    out: Path, seed: int, epochs: int, size: int, progress: bool
) -> tuple[Split, SmallCNN, float, Path]:
    """Train the demo's CNN on digits at ``size`` px; save it."""
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
    return data, model, test_accuracy, model_path


def _run(out: Path, seed: int, epochs: int, n_images: int, size: int, progress: bool) -> DemoResult:
    start = time.perf_counter()
    stages: dict[str, float] = {}
    out.mkdir(parents=True, exist_ok=True)
    data, model, test_accuracy, model_path = _train(out, seed, epochs, size, progress)
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
    explanations, figure_path = _explain_examples(out, model, data, patterns, n_images, progress)
    stages["explain"] = time.perf_counter() - mark

    mark = time.perf_counter()
    half = len(data.x_test) // 2
    rho = rho_means(
        signal_quality(
            model,
            patterns,
            data.x_test[:half].split(256),
            data.x_test[half:].split(256),
            max_positions=8,
            seed=seed,
        )
    )
    stages["rho"] = time.perf_counter() - mark
    mark = time.perf_counter()
    degradation = _degradation(model, patterns, data.x_test[:96], size)
    degradation_path = out / "degradation.png"
    _draw_degradation(degradation, degradation_path)
    stages["degradation"] = time.perf_counter() - mark
    seconds = time.perf_counter() - start
    summary_path = out / "summary.txt"
    summary_path.write_text(
        _summary(size, data, test_accuracy, patterns, figure_path, explanations, stages, seconds)
    )
    page = out / "index.html"
    page.write_text(
        _page(size, data, test_accuracy, explanations, rho, degradation, stages, seconds)
    )
    return DemoResult(
        out,
        figure_path,
        summary_path,
        patterns_path,
        model_path,
        test_accuracy,
        seconds,
        stages,
        page,
    )


def _explain_examples(
    out: Path, model: SmallCNN, data: Split, patterns: Patterns, n_images: int, progress: bool
) -> tuple[dict[str, torch.Tensor], Path]:
    """Explain ``n_images`` test digits with every demo method; draw the comparison grid."""
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
    titles = [
        f"true {int(t)} / pred {int(p)} ({float(c):.2f})"
        for t, p, c in zip(labels, predicted, confidence)
    ]
    figure_path = out / "comparison.png"
    comparison_grid(
        x, explanations, {n: METHODS[n].group for n in explanations}, titles, figure_path
    )
    return explanations, figure_path


def _degradation(
    model: torch.nn.Module, patterns: Patterns, images: torch.Tensor, size: int
) -> dict[str, Degradation]:
    """Patch degradation of each of :data:`DEGRADATION_METHODS` (the first also runs random)."""
    with model_state_guard(model), torch.no_grad():
        predicted = model(images).argmax(1)
    results = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")
        for i, name in enumerate(DEGRADATION_METHODS):
            heat = explain(model, images, predicted, patterns, methods=[name])[name]
            results[name] = patch_degradation(
                model,
                images,
                heat,
                patch_size=max(1, size // 8),
                steps=DEGRADATION_STEPS,
                random_baseline=i == 0,
            )
    return results


def _draw_degradation(results: dict[str, Degradation], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for name, result in results.items():
        ax.plot(result.mean_curve.numpy(), label=f"{name} (area {result.area:.3f})")
        if result.random_curves is not None:
            random = result.random_curves.mean(0).numpy()
            ax.plot(random, "k--", label=f"random order (area {result.random_area:.3f})")
    ax.set_xlabel("patches replaced by the image mean")
    ax.set_ylabel("probability of the predicted class")
    ax.set_title("Patch degradation (the paper's Fig. 4): steeper is better")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _page(
    size: int,
    data: Split,
    test_accuracy: float,
    explanations: dict[str, torch.Tensor],
    rho: dict[str, dict[str, float]],
    degradation: dict[str, Degradation],
    stages: dict[str, float],
    seconds: float,
) -> str:
    """``index.html``: the comparison figure, the ρ table and the degradation curves."""
    e = html.escape
    estimators = [k for k in ESTIMATOR_NAMES if any(k in by_est for by_est in rho.values())]
    head = "".join(f"<th>ρ({e(ESTIMATOR_NAMES[k])})</th>" for k in estimators)
    rho_rows = "".join(
        f"<tr><td>{e(layer)}</td>"
        + "".join(f"<td>{by_est[k]:.3f}</td>" for k in estimators)
        + "</tr>"
        for layer, by_est in rho.items()
    )
    random_area = next(
        (r.random_area for r in degradation.values() if r.random_area is not None), None
    )
    area_rows = "".join(
        f"<tr><td>{e(name)}</td><td>{r.area:.3f}</td></tr>" for name, r in degradation.items()
    )
    if random_area is not None:
        area_rows += f"<tr><td>random order</td><td>{random_area:.3f}</td></tr>"
    timing = ", ".join(f"{k} {v:.1f} s" for k, v in stages.items())
    methods = ", ".join(e(n) for n in explanations)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>captum-pattern demo</title>
<style>
body {{ font-family: sans-serif; max-width: 1100px; margin: 1em auto; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0; }}
td, th {{ border: 1px solid #bbb; padding: 0.2em 0.6em; text-align: right; }}
td:first-child {{ text-align: left; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>captum-pattern demo</h1>
<p>SmallCNN on scikit-learn's digits upsampled to {size}×{size}: test accuracy
{test_accuracy:.3f} on {len(data.x_test)} images; patterns fitted on
{len(data.x_train)} training images. Time: {seconds:.1f} s ({e(timing)}).</p>
<h2>1. Explanations (the paper's Fig. 1/6)</h2>
<p>Columns: input, {methods}. Gradient, DeConvNet, Guided BackProp and PatternNet
are signals in input space (grey = 0); LRP and PatternAttribution are heat maps
(red positive, blue negative).</p>
<img src="comparison.png" alt="comparison of explanation methods">
<h2>2. Quality of the signal estimators, ρ (the paper's Fig. 3)</h2>
<p>Mean ρ over each layer's neurons (higher is better): patterns and <i>v</i> fitted
on different data, correlation measured on the second half of the test set,
8 positions per image in convolutions. A value slightly above 1 is a best <i>v</i>
on one half that correlates slightly negatively with <i>y</i> on the other: no signal
left in the residual, within sampling noise.</p>
<table><tr><th>layer</th>{head}</tr>{rho_rows}</table>
<h2>3. Patch degradation (the paper's Fig. 4)</h2>
<p>The first {DEGRADATION_STEPS} of 64 patches ({size // 8 or 1}×{size // 8 or 1} pixels)
replaced by the image mean, in the order of each method's attribution, on
{len(next(iter(degradation.values())).curves)} test images; the area is the mean
of the mean curve (smaller is better).</p>
<table><tr><th>method</th><th>area</th></tr>{area_rows}</table>
<img src="degradation.png" alt="patch degradation curves">
</body></html>
"""


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
