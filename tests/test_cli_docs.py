"""Every ``captum-pattern`` command line shown in README.md and docs/ parses."""

import re
import shlex
from pathlib import Path

import pytest

from captum_pattern.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BASH = re.compile(r"```bash\n(.*?)```", re.S)


def _commands():
    for path in FILES:
        for block in BASH.findall(path.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                for i, word in enumerate(words):
                    launched = word == "captum_pattern" and words[i - 1] == "-m"  # torchrun
                    if word.endswith("captum-pattern") or launched:
                        yield pytest.param(
                            words[i + 1 :], id=f"{path.name}:{' '.join(words[i + 1 : i + 3])}"
                        )


COMMANDS = list(_commands())


def test_the_docs_show_every_command():
    shown = {c.values[0][0] for c in COMMANDS}
    assert shown == {"demo", "fit", "explain"}


@pytest.mark.parametrize("argv", COMMANDS)
def test_documented_command_parses(argv):
    args = build_parser().parse_args(argv)
    assert args.command == argv[0]
    if args.command == "explain":
        assert args.images and all(not a.startswith("-") for a in args.images)
