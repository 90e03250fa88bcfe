"""Where the benchmarks write: one JSON and one Markdown section per benchmark, plus PNGs.

``results.md`` and ``results.json`` in the results folder hold every section of
the run, in a fixed order; each benchmark's figures sit next to them.
``python benchmarks/report.py`` writes ``report.md`` and ``report.json`` the same way.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SECTION_ORDER = (
    "toy",
    "signal_quality",
    "speed",
    "degradation",
    "ground_truth",
    "examples",
    "paper_experiment",
)


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: floats rounded, NaN as an em dash, the rest as text."""
    if isinstance(value, float):
        return "—" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], digits: int = 3) -> str:
    """A GitHub Markdown table.

    >>> print(markdown_table(["a", "b"], [[1, 0.5]]))
    | a | b |
    | --- | --- |
    | 1 | 0.500 |
    """
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(fmt(v, digits) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


@dataclass
class Results:
    """Collects the sections of one benchmark run and writes them to ``{stem}.md/json``."""

    root: Path
    settings: dict[str, Any] = field(default_factory=dict)
    stem: str = "results"
    title: str = "captum-pattern benchmark results"
    sections: dict[str, tuple[str, str, Any]] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def figure(self, name: str) -> Path:
        """Path of a figure in the results folder."""
        return self.root / name

    def add(self, key: str, title: str, markdown: str, data: Any) -> None:
        """Record a section and write its JSON now (a later failure keeps it)."""
        self.sections[key] = (title, markdown, data)
        (self.root / f"{key}.json").write_text(json.dumps(_jsonable(data), indent=1))
        print(f"\n## {title}\n\n{markdown}\n")

    def write(self) -> None:
        """``{stem}.md`` and ``{stem}.json`` with every section, in the fixed order."""

        def rank(key: str) -> tuple[int, str]:
            prefixes = [i for i, p in enumerate(SECTION_ORDER) if key.startswith(p)]
            return (prefixes[0] if prefixes else len(SECTION_ORDER), key)

        keys = sorted(self.sections, key=rank)
        elapsed = time.time() - self.started
        lines = [
            f"# {self.title}",
            "",
            f"Settings: `{json.dumps(self.settings)}`; wall time of the session {elapsed:.0f} s.",
            "",
        ]
        for key in keys:
            title, markdown, _ = self.sections[key]
            lines += [f"## {title}", "", markdown, ""]
        (self.root / f"{self.stem}.md").write_text("\n".join(lines))
        everything = {"settings": self.settings, "seconds": elapsed}
        everything |= {key: self.sections[key][2] for key in keys}
        (self.root / f"{self.stem}.json").write_text(json.dumps(_jsonable(everything), indent=1))
