"""GPU check: is a CUDA fit right, and how fast is it against inference?

    python benchmarks/gpu_check.py                        # one H100/H200-class GPU, < 5 min
    python benchmarks/gpu_check.py --device cpu --tiny    # the same code on tiny models

Prints every table as it is measured and writes them to ``benchmarks/results/gpu.md``
(``--out``):

1. **fit correctness**: the relative error, per layer, of the patterns fitted on the
   device in float32 (TF32 off), with PyTorch's default TF32 flags, with ``tf32=True``
   and under ``autocast`` bfloat16 / float16, against a CPU float64 fit of the same
   model and data;
2. **attribution correctness**: PatternNet / PatternAttribution on the device in
   float32 against the CPU in float64 (same float64 patterns), next to the CPU in
   float32;
3. **speed**: images/s of fitting (per further batch, and whole fits with their fixed
   costs) against images/s of inference, for torchvision VGG-16 and ResNet-50 at
   224 px (random weights, synthetic images, batch 64).  The fitter has no switch for
   its side-stream prefetch: it copies batches that are on the CPU from pinned memory
   on a side stream and does nothing for batches already on the device.  So "with
   prefetch" feeds batches from (pinned or pageable) CPU memory and "without" feeds
   batches already on the device.  Peak device memory of each fit;
4. **ρ time**: :func:`captum_pattern.metrics.signal_quality` against a fitting pass
   over the same number of images.

Without CUDA (and no ``--device cpu``) it says so, writes nothing and exits 0.  A
section that raises is reported as failed (traceback printed, the other sections
still run) and the script exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import math
import platform
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from captum_pattern import PatternAttribution, PatternFitter, PatternNet, Patterns
from captum_pattern.metrics import signal_quality

HERE = Path(__file__).resolve().parent
ALL_TYPES = ("relu", "relu_negative", "linear")
NO_CUDA = (
    "gpu_check: no CUDA device (torch.cuda.is_available() is False), so nothing was "
    "measured and no report was written. Run it on a machine with a GPU, or try the "
    "code with --device cpu --tiny."
)


# ------------------------------------------------------------------- models, data
def he_init(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random He-initialised weights and biases near zero; random BatchNorm statistics.

    A trained network's gain: PyTorch's default initialisation shrinks activations
    layer by layer, so the patterns (``wᵀa = 1``) grow and their product over a deep
    network overflows float32.  Random running statistics make BatchNorm folding
    matter.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.normal_(0.0, (2.0 / m.weight[0].numel()) ** 0.5, generator=generator)
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.01, generator=generator)
            elif isinstance(m, nn.BatchNorm2d):
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.uniform_(-0.2, 0.2, generator=generator)
                m.running_var.uniform_(0.5, 2.0, generator=generator)
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.uniform_(-0.1, 0.1, generator=generator)
    return model.eval()


def _vgg16() -> nn.Module:
    from torchvision.models import vgg16

    return he_init(vgg16(weights=None))


def _resnet50() -> nn.Module:
    from torchvision.models import resnet50

    return he_init(resnet50(weights=None))


def _resnet18() -> nn.Module:
    from torchvision.models import resnet18

    return he_init(resnet18(weights=None, num_classes=100))


def _tiny_vgg() -> nn.Module:
    from captum_pattern.zoo import VGGStyle

    blocks = ((64,), (128,), (256, 256))
    model = VGGStyle(width=1 / 16, image_size=16, blocks=blocks, hidden=32, num_classes=10)
    return he_init(model)


def _tiny_resnet() -> nn.Module:
    """A stem and one torchvision ``BasicBlock`` with a downsampling branch (in-place add)."""
    from torchvision.models.resnet import BasicBlock

    downsample = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
    return he_init(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=True),
            BasicBlock(8, 16, stride=2, downsample=downsample),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, 10),
        )
    )


def _quarter_vgg() -> nn.Module:
    from captum_pattern.zoo import VGGStyle

    return he_init(VGGStyle(width=1 / 4, image_size=64, num_classes=100))


@dataclass
class Config:
    """What is measured; :meth:`full` on a GPU, :meth:`tiny` to test the code on a CPU."""

    # correctness: (name, builder, image size); a float64 CPU fit of each
    correctness: list[tuple[str, Callable[[], nn.Module], int]]
    correctness_batches: int
    correctness_batch: int
    explain_images: int
    # speed: (name, builder, image size)
    speed: list[tuple[str, Callable[[], nn.Module], int]]
    batch: int
    # a whole fit over few and over many batches; per batch is the slope between them
    few: int
    many: int
    repeats: int
    # ρ: the model (index into speed) and batches per split
    rho_batches: int
    rho_positions: tuple[int | None, ...]
    budget_s: float
    tiny: bool = False
    notes: list[str] = field(default_factory=list)

    @classmethod
    def full(cls) -> Config:
        return cls(
            correctness=[
                ("VGG-16 layout, 1/4 width", _quarter_vgg, 64),
                ("ResNet-18", _resnet18, 64),
            ],
            correctness_batches=4,
            correctness_batch=32,
            explain_images=8,
            speed=[("VGG-16", _vgg16, 224), ("ResNet-50", _resnet50, 224)],
            batch=64,
            few=2,
            many=6,
            repeats=2,
            rho_batches=2,
            rho_positions=(16, None),
            budget_s=270.0,
        )

    @classmethod
    def tiny_run(cls) -> Config:
        return cls(
            correctness=[("tiny VGG", _tiny_vgg, 16), ("tiny ResNet", _tiny_resnet, 16)],
            correctness_batches=2,
            correctness_batch=4,
            explain_images=2,
            speed=[("tiny VGG", _tiny_vgg, 16), ("tiny ResNet", _tiny_resnet, 16)],
            batch=4,
            few=1,
            many=2,
            repeats=1,
            rho_batches=1,
            rho_positions=(4, None),
            budget_s=600.0,
            tiny=True,
        )


def images(count: int, batch: int, size: int, seed: int) -> list[Tensor]:
    """``count`` batches of synthetic images (a smooth field plus noise, per-channel offset)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        coarse = torch.randn(batch, 3, max(1, size // 8), max(1, size // 8), generator=generator)
        smooth = nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")
        noise = 0.3 * torch.randn(batch, 3, size, size, generator=generator)
        out.append(smooth + noise + torch.tensor([0.5, 0.4, 0.3]).reshape(1, 3, 1, 1))
    return out


# ----------------------------------------------------------------------- helpers
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def tf32_flags(enabled: bool | None) -> Iterator[None]:
    """Set both TF32 flags (``None``: leave PyTorch's defaults); restore them afterwards."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if enabled is not None:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def relative_error(value: Tensor, reference: Tensor) -> float:
    """``‖value − reference‖ / ‖reference‖`` in float64 on the CPU (absolute if the norm is 0)."""
    value = value.detach().to("cpu", torch.float64)
    reference = reference.detach().to("cpu", torch.float64)
    scale = float(reference.norm())
    error = float((value - reference).norm())
    return error / scale if scale > 0 else error


def layer_errors(patterns: Patterns, reference: Patterns) -> dict[str, float]:
    """Per layer, the largest relative error over the pattern types both hold."""
    out = {}
    for name in reference:
        errors = [
            relative_error(patterns[name].pattern(kind), reference[name].pattern(kind))
            for kind in reference[name].pattern_types
        ]
        out[name] = max(errors)
    return out


def failure(error: Exception) -> str:
    """A table cell for a measurement that raised (a finding, not a crash of the script)."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"raised {type(error).__name__}: {first[:160]}"


def release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def timed(device: torch.device, run: Callable[[], object]) -> float:
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - start


def timed_peak(device: torch.device, run: Callable[[], object]) -> tuple[float, float]:
    """Seconds and peak device memory in GiB (NaN off CUDA) of ``run``."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(device, run)
    if device.type != "cuda":
        return seconds, math.nan
    return seconds, torch.cuda.max_memory_allocated(device) / 2**30


def cell(value: object) -> str:
    """A table cell: small numbers in exponent form, the rest with 3 significant digits."""
    if not isinstance(value, float):
        return str(value)
    if math.isnan(value):
        return "—"
    if value != 0 and abs(value) < 1e-2:
        return f"{value:.2e}"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


@dataclass
class Table:
    title: str
    header: Sequence[str]
    rows: list[list[object]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"## {self.title}", ""]
        lines.append("| " + " | ".join(self.header) + " |")
        lines.append("| " + " | ".join("---" for _ in self.header) + " |")
        lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in self.rows]
        if self.notes:
            lines += ["", *self.notes]
        return "\n".join(lines)


# ------------------------------------------------------------------- 1. fit
@dataclass
class Variant:
    """One device fit compared with the float64 reference."""

    label: str
    autocast: torch.dtype | None = None
    tf32: bool = False  # the fitter's option
    flags: bool | None = False  # both global TF32 flags during the fit; None: PyTorch's


def fit_variants(device: torch.device) -> list[Variant]:
    """The device fits compared (TF32 ones only on CUDA)."""
    variants = [Variant("float32")]
    if device.type == "cuda":
        variants += [
            Variant("float32, PyTorch's TF32 defaults", flags=None),
            Variant("tf32=True", tf32=True),
        ]
    variants += [
        Variant("autocast bfloat16", autocast=torch.bfloat16),
        Variant("autocast float16", autocast=torch.float16),
    ]
    return variants


def check_fit(config: Config, device: torch.device) -> tuple[list[Table], dict[str, Patterns]]:
    """Device fits against a CPU float64 fit, per layer; returns the float64 patterns too."""
    tables, references = [], {}
    for name, build, size in config.correctness:
        model = build()
        data = images(config.correctness_batches, config.correctness_batch, size, seed=1)
        reference_model = copy.deepcopy(model).double()
        reference = PatternFitter(reference_model).fit([x.double() for x in data], device="cpu")
        references[name] = reference
        device_model = copy.deepcopy(model).to(device)
        columns: dict[str, dict[str, float]] = {}
        failed: dict[str, str] = {}
        for v in fit_variants(device):
            try:
                with tf32_flags(v.flags):
                    fitted = PatternFitter(device_model).fit(
                        data, device=device, autocast=v.autocast, tf32=v.tf32
                    )
            except Exception as error:  # e.g. float16 overflow: report it, go on
                failed[v.label] = failure(error)
                release(device)
                continue
            columns[v.label] = layer_errors(fitted, reference)
        table = Table(
            f"Fit correctness: {name} ({size} px, {len(data)}×{config.correctness_batch} "
            f"images) on {device.type}, relative error against a CPU float64 fit",
            ["layer", *columns],
        )
        for layer in reference:
            table.rows.append([layer, *(columns[label][layer] for label in columns)])
        table.rows.append(["**max**", *(max(c.values()) for c in columns.values())])
        table.notes += [f"`{label}`: {text}" for label, text in failed.items()]
        table.notes.append(
            "Per layer, max over `a₊`, `a₋`, `a` of ‖a − a_ref‖ / ‖a_ref‖. "
            "`float32` runs with both TF32 flags off."
        )
        tables.append(table)
    return tables, references


# ----------------------------------------------------------- 2. attribution
def check_attribution(
    config: Config, device: torch.device, references: dict[str, Patterns]
) -> Table:
    """PatternNet / PatternAttribution on the device (float32) and the CPU (float32) vs float64."""
    name, build, size = config.correctness[0]
    patterns = references[name]
    model = build()
    x = images(1, config.explain_images, size, seed=2)[0]
    reference_model = copy.deepcopy(model).double()
    with torch.no_grad():
        target = reference_model(x.double()).argmax(1)
    table = Table(
        f"Attribution correctness: {name}, {len(x)} images, float64 patterns, "
        "relative error against the CPU in float64",
        ["method", "CPU float32", f"{device.type} float32 (TF32 off)"],
    )
    for method in (PatternNet, PatternAttribution):
        expected = method(reference_model, patterns).attribute(x.double(), target=target)
        row: list[object] = [method.__name__]
        for where in (torch.device("cpu"), device):
            m = copy.deepcopy(model).to(where)
            with tf32_flags(False):
                got = method(m, patterns).attribute(x.to(where), target=target.to(where))
            row.append(relative_error(got, expected))
        table.rows.append(row)
    return table


# ------------------------------------------------------------------ 3. speed
@dataclass
class Feed:
    label: str
    pattern_types: tuple[str, ...]
    where: str  # "device", "pinned" or "pageable"


FEEDS = (
    Feed("all 3 types, batches on the device (no prefetch)", ALL_TYPES, "device"),
    Feed("all 3 types, pinned CPU batches (side-stream prefetch)", ALL_TYPES, "pinned"),
    Feed("all 3 types, pageable CPU batches (prefetch pins them)", ALL_TYPES, "pageable"),
    Feed("`relu` only, batches on the device", ("relu",), "device"),
)


def fit_timed(
    fitter: PatternFitter, data: list[Tensor], device: torch.device, repeats: int
) -> tuple[float, float, Patterns]:
    """The fastest of ``repeats`` whole fits: seconds, peak memory (GiB), the patterns."""
    results: list[Patterns] = []
    runs = [
        timed_peak(device, lambda: results.append(fitter.fit(data, device=device)))
        for _ in range(repeats)
    ]
    return min(t for t, _ in runs), max(p for _, p in runs), results[-1]


def feed_batches(batch: Tensor, count: int, where: str, device: torch.device) -> list[Tensor]:
    """``count`` references to one batch, placed as ``where`` says."""
    if where == "device":
        placed = batch.to(device)
    elif where == "pinned" and device.type == "cuda":
        placed = batch.cpu().pin_memory()
    else:
        placed = batch.cpu()
    return [placed] * count


def measure_feed(
    config: Config, device: torch.device, model: nn.Module, batch: Tensor, feed: Feed
) -> tuple[tuple[float, float, float], Patterns, float]:
    """Fit images/s per further batch and over a whole fit, peak GiB; the patterns; s/batch."""
    fitter = PatternFitter(model, pattern_types=feed.pattern_types)
    fitter.fit(feed_batches(batch, 1, feed.where, device), device=device)  # warm-up
    seconds, peaks = {}, []
    for count in (config.few, config.many):
        data = feed_batches(batch, count, feed.where, device)
        seconds[count], peak, patterns = fit_timed(fitter, data, device, config.repeats)
        peaks.append(peak)
    slope = (seconds[config.many] - seconds[config.few]) / (config.many - config.few)
    fit_rate = config.batch / slope if slope > 0 else math.nan
    whole = config.many * config.batch / seconds[config.many]
    return (fit_rate, whole, max(peaks)), patterns, seconds[config.many] / config.many


def measure_speed(
    config: Config, device: torch.device, deadline: float
) -> tuple[Table, dict[str, tuple[nn.Module, Patterns, float]]]:
    """Images/s of fitting against inference; keeps each model's last all-types fit for ρ."""
    table = Table(
        f"Speed on {device.type}: images/s, batch {config.batch}",
        [
            "model",
            "fit",
            "inference img/s",
            "fit img/s per batch",
            "fit / inference",
            f"whole fit of {config.many} batches, img/s",
            "peak memory GiB",
        ],
    )
    table.notes += [
        f"*per batch*: the slope between whole fits of {config.few} and {config.many} "
        f"batches (minimum of {config.repeats} repetitions); *whole fit*: with its fixed "
        "costs (probe forward, allocation, solve, fingerprint). Inference: `no_grad` "
        "forward on batches already on the device. Peak memory: "
        "`torch.cuda.max_memory_allocated` during the fit, model and batches included.",
        "The fitter has no prefetch switch: on CUDA it copies CPU batches from pinned "
        "memory on a side stream and leaves device batches as they are.",
    ]
    kept: dict[str, tuple[nn.Module, Patterns, float]] = {}
    for name, build, size in config.speed:
        model = build().to(device)
        batch = images(1, config.batch, size, seed=3)[0]
        on_device = batch.to(device)

        def infer(count: int, model: nn.Module = model, x: Tensor = on_device) -> None:
            with torch.no_grad():
                for _ in range(count):
                    model(x)

        infer(2)  # warm-up: cuDNN algorithm choice, allocator
        per_image = min(
            timed(device, lambda: infer(config.many)) for _ in range(config.repeats)
        ) / (config.many * config.batch)
        inference = 1.0 / per_image
        for feed in FEEDS:
            if time.perf_counter() > deadline:
                table.rows.append([name, feed.label, inference, "skipped: time budget", "", "", ""])
                continue
            try:
                rates, patterns, per_batch = measure_feed(config, device, model, batch, feed)
            except Exception as error:  # e.g. out of memory: report it, go on
                table.rows.append([name, feed.label, inference, failure(error), "", "", ""])
                release(device)
                continue
            fit_rate, whole, peak = rates
            table.rows.append(
                [name, feed.label, inference, fit_rate, fit_rate / inference, whole, peak]
            )
            if feed.pattern_types == ALL_TYPES and feed.where == "device":
                kept[name] = (model, patterns, per_batch)
            del patterns
        del model, on_device
        release(device)
    return table, kept


# -------------------------------------------------------------------- 4. rho
def measure_rho(
    config: Config, device: torch.device, kept: dict[str, tuple[nn.Module, Patterns, float]]
) -> Table:
    """``signal_quality`` time against one fitting pass over as many images."""
    name, build, size = config.speed[0]
    if name in kept:
        model, patterns, fit_per_batch = kept[name]
    else:  # the speed section did not get that far: fit here
        model = build().to(device)
        data = [x.to(device) for x in images(config.rho_batches, config.batch, size, seed=3)]
        fitter = PatternFitter(model)
        fitter.fit(data[:1], device=device)
        start = time.perf_counter()
        patterns = fitter.fit(data, device=device)
        synchronize(device)
        fit_per_batch = (time.perf_counter() - start) / len(data)
    v_data = [x.to(device) for x in images(config.rho_batches, config.batch, size, seed=4)]
    eval_data = [x.to(device) for x in images(config.rho_batches, config.batch, size, seed=5)]
    fit_pass = fit_per_batch * config.rho_batches
    table = Table(
        f"ρ time on {device.type}: {name}, {config.rho_batches}×{config.batch} images per "
        "split, all four estimators",
        ["positions per image", "ρ seconds", "v pass", "solve", "eval pass", "ρ / fit pass"],
    )
    table.notes.append(
        f"*fit pass*: a whole fit (all three types) over {config.rho_batches} batches, "
        f"{fit_pass:.3g} s, from the speed section's {config.many}-batch fit."
    )
    first = next(iter(patterns))  # warm-up: kernels, solver libraries
    signal_quality(model, patterns, v_data[:1], eval_data[:1], layers=[first], max_positions=1)
    for positions in config.rho_positions:
        seconds: dict[str, float] = {}

        def run(positions: int | None = positions, seconds: dict[str, float] = seconds) -> None:
            result = signal_quality(
                model, patterns, v_data, eval_data, max_positions=positions, device=device
            )
            seconds.update(result.seconds)

        try:
            total = timed(device, run)
        except Exception as error:  # e.g. out of memory: report it, go on
            table.rows.append(["every" if positions is None else positions, failure(error)])
            release(device)
            continue
        table.rows.append(
            [
                "every" if positions is None else positions,
                total,
                seconds.get("v_pass", math.nan),
                seconds.get("solve", math.nan),
                seconds.get("eval_pass", math.nan),
                total / fit_pass,
            ]
        )
    return table


# -------------------------------------------------------------------- report
def header(device: torch.device, config: Config) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        machine = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    else:
        machine = (
            f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"
        )
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    flags = (
        f"PyTorch defaults: `torch.backends.cuda.matmul.allow_tf32={matmul}`, "
        f"`torch.backends.cudnn.allow_tf32={cudnn}`"
    )
    lines = [
        "# GPU check",
        "",
        f"`python benchmarks/gpu_check.py{' --device cpu --tiny' if config.tiny else ''}`, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.",
        f"Machine: {machine}; torch {torch.__version__}, Python {platform.python_version()}. "
        f"{flags}.",
    ]
    if config.tiny:
        lines.append("**Tiny models on the CPU: a test of the script, not a measurement.**")
    return "\n".join(lines)


def run_checks(device: torch.device, config: Config) -> tuple[str, bool]:
    """Every section; returns the report and whether all of them ran."""
    started = time.perf_counter()
    deadline = started + config.budget_s
    parts = [header(device, config)]
    print(parts[0], flush=True)
    ok = True

    def section(title: str, run: Callable[[], list[Table]]) -> None:
        nonlocal ok
        begin = time.perf_counter()
        try:
            tables = run()
        except Exception:  # report it, keep measuring the rest
            ok = False
            text = f"## {title}: FAILED\n\n```\n{traceback.format_exc()}```"
        else:
            text = "\n\n".join(t.markdown() for t in tables)
        text += f"\n\n({title}: {time.perf_counter() - begin:.1f} s)"
        parts.append(text)
        print("\n" + text, flush=True)

    references: dict[str, Patterns] = {}
    kept: dict[str, tuple[nn.Module, Patterns, float]] = {}

    def fits() -> list[Table]:
        tables, found = check_fit(config, device)
        references.update(found)
        return tables

    def speed() -> list[Table]:
        table, found = measure_speed(config, device, deadline)
        kept.update(found)
        return [table]

    section("fit correctness", fits)
    if references:
        section("attribution correctness", lambda: [check_attribution(config, device, references)])
    section("speed", speed)
    if time.perf_counter() < deadline:
        section("rho time", lambda: [measure_rho(config, device, kept)])
    else:
        parts.append("## ρ time: skipped (time budget spent)")
    parts.append(f"Total: {time.perf_counter() - started:.0f} s.")
    return "\n\n".join(parts) + "\n", ok


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny models, few images")
    parser.add_argument("--out", default=str(HERE / "results" / "gpu.md"), help="the report")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    config = Config.tiny_run() if args.tiny else Config.full()
    report, ok = run_checks(device, config)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report, encoding="utf-8")
    print(f"\nwritten to {out}" + ("" if ok else "; some sections FAILED (see above)"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
