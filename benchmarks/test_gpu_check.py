"""benchmarks/gpu_check.py: its no-CUDA path, and its measurement code on tiny CPU models.

``pytest benchmarks -k gpu_check``: the tiny run takes about 15 s of CPU.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import gpu_check  # benchmarks/ is on the path (conftest.py)
import pytest
import torch

SCRIPT = Path(gpu_check.__file__).resolve()


def _rows(report: str, first_cell: str) -> list[list[str]]:
    """Cells of the Markdown table rows whose first cell is ``first_cell``."""
    rows = []
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            rows.append(cells)
    return rows


def test_without_cuda_it_says_so_writes_nothing_and_exits_0(tmp_path: Path) -> None:
    out = tmp_path / "gpu.md"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(SCRIPT.parents[1])}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "no CUDA device" in done.stdout
    assert "nothing was measured" in done.stdout
    assert not out.exists()


def test_tiny_cpu_run_produces_every_row_of_the_report(tmp_path: Path) -> None:
    out = tmp_path / "gpu.md"
    assert gpu_check.main(["--device", "cpu", "--tiny", "--out", str(out)]) == 0
    report = out.read_text(encoding="utf-8")
    assert "FAILED" not in report
    assert "not a measurement" in report  # tiny runs say what they are

    config = gpu_check.Config.tiny_run()
    # fit correctness: one table per model, a row per layer and a max row
    max_rows = _rows(report, "**max**")
    assert len(max_rows) == len(config.correctness)
    labels = [v.label for v in gpu_check.fit_variants(torch.device("cpu"))]
    for row in max_rows:
        assert len(row) == 1 + len(labels)
        errors = dict(zip(labels, map(float, row[1:])))
        # float32 on the CPU against float64: rounding only
        assert 0 < errors["float32"] < 1e-2
        assert all(e > 0 for e in errors.values())  # the reduced precisions do differ
    # attribution correctness: float32 against float64, both methods
    for method in ("PatternNet", "PatternAttribution"):
        (row,) = _rows(report, method)
        assert all(0 < float(v) < 1e-4 for v in row[1:])
    # speed: every model with every feed, inference and whole-fit rates positive
    for name, _, _ in config.speed:
        rows = _rows(report, name)
        assert [r[1] for r in rows] == [feed.label for feed in gpu_check.FEEDS]
        for r in rows:
            assert float(r[2]) > 0 and float(r[5]) > 0
    # ρ time: one row per position setting, a positive ratio to the fit pass
    for positions in config.rho_positions:
        (row,) = _rows(report, "every" if positions is None else str(positions))
        assert float(row[1]) > 0 and float(row[-1]) > 0
    assert re.search(r"Total: \d+ s", report)


@pytest.mark.parametrize("name", ["_vgg16", "_resnet50", "_resnet18", "_quarter_vgg"])
def test_the_full_run_models_build_and_run(name: str) -> None:
    """The GPU run's models: built with random weights, a forward pass at a small size."""
    model = getattr(gpu_check, name)()
    size = 64 if name == "_quarter_vgg" else 32
    with torch.no_grad():
        out = model(torch.zeros(1, 3, size, size))
    assert out.ndim == 2 and torch.isfinite(out).all()


def test_rho_timing_fits_its_own_patterns_when_the_speed_section_did_not() -> None:
    config = gpu_check.Config.tiny_run()
    table = gpu_check.measure_rho(config, torch.device("cpu"), kept={})
    assert [row[0] for row in table.rows] == [
        "every" if p is None else p for p in config.rho_positions
    ]
    for row in table.rows:
        assert all(isinstance(v, float) and v > 0 for v in row[1:])
