"""Reports with nothing to assert: the ρ timing table and the example explanations.

    python benchmarks/report.py                 # the default sizes (about 2 min on 2 cores)
    python benchmarks/report.py --large         # the sizes of ``pytest benchmarks --large``
    python benchmarks/report.py --results DIR   # write somewhere else than benchmarks/results/

Trains the digits CNN and the VGG-style net exactly as ``pytest benchmarks`` does
(``suite.paper_setups``), then times ρ against one fitting pass (timings on a shared
machine are reported, never asserted) and draws the paper's Fig. 1/6 layout for four test
images per net.  Writes ``report.md``, ``report.json``, ``speed_rho.json``, ``examples.json``
and the figures ``examples_digits.png`` and ``examples_vgg_style.png`` into the results
folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from results import Results, markdown_table
from suite import Config, Setup, explain_all, paper_setups, timed
from torch import Tensor, nn

from captum_pattern import PatternFitter
from captum_pattern.compare import METHODS
from captum_pattern.metrics import signal_quality
from captum_pattern.visualization import comparison_grid
from captum_pattern.zoo import PHOTO_REGIONS

HERE = Path(__file__).resolve().parent


def rho_speed(setups: dict[str, Setup], config: Config, results: Results) -> None:
    """ρ (v pass + solve + evaluation pass) against one fitting pass over the same images."""
    rows: list[list] = []
    data: dict[str, dict] = {}
    for name, s in setups.items():
        counts = [min(config.speed_images, len(s.split1))]
        if name == "VGG-style" and len(s.split1) > counts[0]:
            counts.append(len(s.split1))  # the solve is a fixed cost: also on the whole split
        for count in counts:
            _rho_against_fit(name, s, s.split1[:count], config, rows, data)
    header = [
        "model",
        "images",
        "positions",
        "forward s",
        "fit s",
        "ρ s",
        "ρ / fit",
        "ρ / fit (CPU time)",
        "v pass",
        "solve",
        "eval pass",
    ]
    table = markdown_table(header, rows, digits=2)
    note = (
        "The same images for every pass. forward: one `no_grad` pass; fit: `PatternFitter` "
        "with all three pattern types; ρ: every estimator, v pass + solve + evaluation pass "
        "(each pass over those images, so ρ reads them twice); positions: every output "
        "position of a convolution, or `max_positions=16` per image in both passes. Fastest of "
        f"{config.speed_repeats} runs on a shared 2-core machine; the last three columns "
        "split the fastest ρ run into its phases."
    )
    results.add(
        "speed_rho", "ρ evaluation time against a fitting pass", table + "\n\n" + note, data
    )


def _rho_against_fit(name: str, s: Setup, images: Tensor, config: Config, rows, data) -> None:
    """One forward, one fit and ρ over ``images``, with every position and with 16 per image."""
    batches = images.split(s.batch)
    forward = timed(lambda: _forward_all(s.model, batches), config.speed_repeats)
    fit = timed(lambda: PatternFitter(s.model).fit(batches), config.speed_repeats)
    for positions in (None, 16):
        rho = timed(
            lambda p=positions: signal_quality(
                s.model, s.patterns, batches, batches, max_positions=p
            ),
            config.speed_repeats,
        )
        parts = rho.result.seconds  # of the fastest run
        shares = [parts[k] / sum(parts.values()) for k in ("v_pass", "solve", "eval_pass")]
        label = "all" if positions is None else f"{positions} per image"
        ratio, ratio_cpu = rho.wall / fit.wall, rho.cpu / fit.cpu
        rows.append(
            [name, len(images), label, forward.wall, fit.wall, rho.wall, ratio, ratio_cpu, *shares]
        )
        data[f"{name} / {len(images)} images / {label}"] = {
            "images": len(images),
            "forward": forward.wall,
            "fit": fit.wall,
            "rho": rho.wall,
            "ratio_wall": ratio,
            "ratio_cpu": ratio_cpu,
            "parts": parts,
        }


def _forward_all(model: nn.Module, batches: tuple[Tensor, ...]) -> None:
    with torch.no_grad():
        for b in batches:
            model(b)


def examples(setups: dict[str, Setup], results: Results) -> None:
    """Four test images per net, every method (the paper's Fig. 1/6 layout)."""
    names = {}
    for name, s in setups.items():
        images, labels = s.test_x[:4], s.test_y[:4]
        with torch.no_grad():
            predicted = s.model(images).argmax(1)
        explanations = explain_all(s.model, images, predicted, s.patterns)
        groups = {m: METHODS[m].group for m in explanations}
        if name == "VGG-style":
            titles = [list(PHOTO_REGIONS)[int(p)] for p in predicted]
        else:
            titles = [f"{int(t)} → {int(p)}" for t, p in zip(labels, predicted)]
        path = results.figure(f"examples_{name.split()[0].lower().replace('-', '_')}.png")
        comparison_grid(images, explanations, groups, row_titles=titles, path=path)
        names[name] = path.name
    results.add(
        "examples",
        "Example explanations (Fig. 1/6 layout)",
        "Functions and signals in input space (normalised as in the paper), attributions as "
        "heat maps (red positive, blue negative). Figures: "
        + ", ".join(f"`{v}` ({k})" for k, v in names.items())
        + ".",
        names,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true", help="the sizes of --large")
    parser.add_argument("--results", default=str(HERE / "results"), help="output folder")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    config = Config.large_run() if args.large else Config()
    results = Results(
        Path(args.results),
        settings=config.summary(),
        stem="report",
        title="captum-pattern report (benchmarks/report.py)",
    )
    setups = paper_setups(config)
    rho_speed(setups, config, results)
    examples(setups, results)
    results.write()


if __name__ == "__main__":
    main()
