"""Every Python example in README.md and docs/ runs."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def _blocks():
    for path in FILES:
        for i, code in enumerate(BLOCK.findall(path.read_text())):
            yield pytest.param(path, code, id=f"{path.name}-{i}")


@pytest.mark.parametrize("path,code", list(_blocks()))
def test_example_runs(path, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(path), "exec"), {"__name__": "__doc_example__"})


def test_readme_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text().splitlines()
    assert text[0] == "```bash"
    assert "pip install" in text[1] and "captum-pattern demo" in text[1]
    assert "pytest" in text[2] and text[3] == "```"
    # the first command installs the application extra the demo needs, and CI installs the same
    install = text[1].split(" && ")[1]
    assert '".[demo,dev]"' in install
    ci = (ROOT / ".ci" / "run").read_text()
    assert install in ci and ".venv/bin/pytest" in ci
