"""Speed: fit time / forward time, attribute time / Saliency time, memory.

Run with ``pytest benchmarks -k speed -s``.  Every figure is a ratio of two
timings taken in the same run on the same batches (the minimum of a few
interleaved repetitions, after a warm-up), printed as a table and written to
``benchmarks/results/speed.json`` and ``speed.md``.  Nothing here asserts a
timing: shared machines are noisy.  What is asserted is what must hold
(e.g. fitting memory stays O(parameters), not O(patches)).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from captum.attr import LRP, Saliency
from torch import nn

from captum_pattern import InvalidInputError, PatternAttribution, PatternFitter, PatternNet
from captum_pattern.zoo import SmallCNN, VGGStyle

ALL_TYPES = ("relu", "relu_negative", "linear")


@dataclass
class Case:
    name: str
    make: Callable[[], nn.Module]
    batch_shape: tuple[int, ...]
    batches: int
    explain_batch: int
    lrp: bool = True


def _he(model: nn.Module) -> nn.Module:
    """He-initialised weights, zero biases: random, but with a trained network's gain.

    PyTorch's default initialisation shrinks activations layer by layer, so that
    the patterns (``wᵀa = 1``) grow in proportion and their product over VGG-16's
    16 layers overflows float32; trained networks do not behave like that.
    """
    generator = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            with torch.no_grad():
                m.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=generator)
                if m.bias is not None:
                    m.bias.zero_()
    return model


def _resnet18() -> nn.Module:
    from torchvision.models import resnet18

    model = resnet18(weights=None, num_classes=100)
    # random but realistic BatchNorm statistics, so that folding matters
    generator = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2, generator=generator)
            m.running_var.uniform_(0.5, 2.0, generator=generator)
    return model


CASES = [
    Case("small CNN 28x28", lambda: _he(SmallCNN(size=28)), (256, 1, 28, 28), 12, 64),
    Case("VGG-16 64x64", lambda: _he(VGGStyle(image_size=64)), (16, 3, 64, 64), 12, 16),
    Case("VGG-16 224x224", lambda: _he(VGGStyle(image_size=224)), (2, 3, 224, 224), 3, 2),
    Case("ResNet-18 (BN folded) 64x64", _resnet18, (16, 3, 64, 64), 8, 16, lrp=False),
]


def _min_time(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _forward(model: nn.Module, batches: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for b in batches:
            model(b)


def measure_fit(case: Case, repeats: int = 2) -> dict[str, float]:
    """Fit time over forward time on the same batches.

    ``total``: a fit over all the case's batches (fixed costs included: probe,
    solve, fingerprint).  ``per batch``: the slope between a one-batch and a
    full fit, i.e. what each further batch costs.  ``fixed cost``: the rest of
    a one-batch fit, in plain forward passes of one batch.
    """
    torch.manual_seed(0)
    model = case.make().eval()
    batches = [torch.randn(case.batch_shape) for _ in range(case.batches)]
    result: dict[str, float] = {}
    for label, types in (("all", ALL_TYPES), ("relu", ("relu",))):

        def fit(data: list[torch.Tensor], t: tuple[str, ...] = types) -> None:
            PatternFitter(model, pattern_types=t).fit(data)

        fit(batches[:2])  # warm-up (and the per-layer GEMM choice)
        _forward(model, batches[:2])
        forward, short, full = [], [], []
        for _ in range(repeats):  # interleaved, so that drift hits all three
            forward.append(_min_time(lambda: _forward(model, batches), 1))
            short.append(_min_time(lambda: fit(batches[:1]), 1))
            full.append(_min_time(lambda: fit(batches), 1))
        n = len(batches)
        forward_time, short_time, full_time = min(forward), min(short), min(full)
        result[f"total fit/forward ({label})"] = full_time / forward_time
        per_batch = (full_time - short_time) / (n - 1)
        result[f"per-batch fit/forward ({label})"] = per_batch / (forward_time / n)
        # probe, allocation, solve, fingerprint: a fit's cost beyond its batches
        result[f"fixed cost in forward batches ({label})"] = (short_time - per_batch) / (
            forward_time / n
        )
    result["forward s/batch"] = forward_time / n
    return result


def measure_attribute(case: Case, repeats: int = 3) -> dict[str, float]:
    """Attribute time over Captum Saliency time, same model and batch.

    With random weights the patterns' product along a deep network can exceed
    float32 (``attribute`` then raises); such a case is timed in float64
    (model, inputs and patterns), reported in the ``float64`` column.
    """
    torch.manual_seed(0)
    model = case.make().eval()
    x = torch.randn(case.explain_batch, *case.batch_shape[1:])
    patterns = PatternFitter(model).fit([torch.randn(case.batch_shape)])
    try:
        PatternNet(model, patterns).attribute(x, target=1)
        float64 = False
    except InvalidInputError:
        model, x, patterns = model.double(), x.double(), patterns.to(dtype=torch.float64)
        float64 = True
    pa, pn, saliency = (
        PatternAttribution(model, patterns),
        PatternNet(model, patterns),
        Saliency(model),
    )
    target = 1

    def run_saliency() -> None:
        saliency.attribute(x.clone().requires_grad_(True), target=target)

    # Captum's LRP writes into the weights in place (and back), which bumps their
    # version and makes PatternAttribution recompute its cached w ⊙ a: give it a copy
    lrp_model = copy.deepcopy(model)

    def run_lrp() -> None:
        LRP(lrp_model).attribute(x.clone().requires_grad_(True), target=target)

    runs = {
        "Saliency": run_saliency,
        "PatternAttribution": lambda: pa.attribute(x, target=target),
        "PatternNet": lambda: pn.attribute(x, target=target),
    }
    if case.lrp:
        runs["LRP"] = run_lrp
    times: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name].append(_min_time(fn, 1))
    best = {name: min(values) for name, values in times.items()}
    result = {
        f"{name}/Saliency": best[name] / best["Saliency"] for name in runs if name != "Saliency"
    }
    result["Saliency s"] = best["Saliency"]
    result["float64"] = float(float64)
    return result


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from captum_pattern import PatternFitter
    from captum_pattern.zoo import VGGStyle
    torch.manual_seed(0)
    model = VGGStyle(image_size=64).eval()
    batches = [torch.randn(16, 3, 64, 64) for _ in range(4)]
    with torch.no_grad():
        model(batches[0])
    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024
    before = hwm()
    if sys.argv[1] == "fit":
        PatternFitter(model, pattern_types=sys.argv[2].split(",")).fit(batches)
    else:
        with torch.no_grad():
            for b in batches:
                model(b)
    print(hwm() - before, sum(p.numel() for p in model.parameters()))
    """
)


def measure_memory() -> dict[str, float]:
    """Peak resident memory of fitting VGG-16 at 64 px, beyond a forward pass."""

    def peak(*args: str) -> tuple[int, int]:
        out = subprocess.run(
            [sys.executable, "-c", _MEMORY_SCRIPT, *args],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
        return int(out[0]), int(out[1])

    forward, params = peak("forward")
    result = {"parameters (M)": params / 1e6}
    for label, types in (("all", ALL_TYPES), ("relu", ("relu",))):
        fit, _ = peak("fit", ",".join(types))
        sums = 3 if label == "all" else 2
        accumulators = sums * params * 8
        result[f"extra peak MB ({label})"] = (fit - forward) / 2**20
        result[f"float64 accumulators MB ({label})"] = accumulators / 2**20
    return result


def _write(folder: Path, name: str, rows: dict[str, dict[str, float]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(rows, indent=2))
    columns = sorted({k for row in rows.values() for k in row})
    lines = ["| case | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for case, row in rows.items():
        cells = [f"{row[c]:.2f}" if c in row else "" for c in columns]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (folder / f"{name}.md").write_text(table + "\n")
    print(f"\n{name} ({torch.get_num_threads()} threads, torch {torch.__version__})\n{table}")


@pytest.fixture
def folder(request: pytest.FixtureRequest) -> Path:
    """The results folder: ``--results`` of benchmarks/conftest.py."""
    return Path(request.config.getoption("--results"))


def test_speed_fit_ratios(folder: Path) -> None:
    rows = {case.name: measure_fit(case) for case in CASES}
    _write(folder, "speed_fit", rows)
    for row in rows.values():
        # the fixed cost is a difference of two timings: noise can make it <= 0
        assert all(v > 0 for k, v in row.items() if not k.startswith("fixed cost"))


def test_speed_attribute_ratios(folder: Path) -> None:
    rows = {case.name: measure_attribute(case) for case in CASES}
    _write(folder, "speed_attribute", rows)
    for row in rows.values():
        assert all(v > 0 for k, v in row.items() if k != "float64")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_speed_fit_memory_is_parameters_not_patches(folder: Path) -> None:
    row = measure_memory()
    _write(folder, "speed_memory", {"VGG-16 64x64, 4 batches of 16": row})
    # unfolded patch matrices of VGG-16 at 64 px: ~27 MB per image and layer pass
    # the fit's extra memory must stay near the float64 accumulators instead
    for label in ("all", "relu"):
        extra = row[f"extra peak MB ({label})"]
        assert extra < 2.0 * row[f"float64 accumulators MB ({label})"] + 512, label
