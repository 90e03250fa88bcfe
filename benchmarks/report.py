"""Reports with nothing to assert: the example explanations.

    python benchmarks/report.py                 # the default sizes (about 2 min on 2 cores)
    python benchmarks/report.py --large         # the sizes of ``pytest benchmarks --large``
    python benchmarks/report.py --results DIR   # write somewhere else than benchmarks/results/

Trains the digits CNN and the VGG-style net exactly as ``pytest benchmarks`` does
(``suite.paper_setups``) and draws the paper's Fig. 1/6 layout for four test images per
net.  Writes ``report.md``, ``report.json``, ``examples.json`` and the figures
``examples_digits.png`` and ``examples_vgg_style.png`` into the results folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from results import Results
from suite import Config, Setup, explain_all, paper_setups

from captum_pattern.compare import METHODS
from captum_pattern.visualization import comparison_grid
from captum_pattern.zoo import PHOTO_REGIONS

HERE = Path(__file__).resolve().parent


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
    examples(setups, results)
    results.write()


if __name__ == "__main__":
    main()
