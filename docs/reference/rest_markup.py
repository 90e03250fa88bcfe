"""Griffe extension: read the reST markup of the package's docstrings as Markdown.

The docstrings are NumPy style with the reST markup Sphinx reads: bare doctest blocks
(``>>>`` lines outside an "Examples" section) and roles such as ``:class:`Patterns```.
mkdocstrings renders docstrings as Markdown, where neither means anything: doctest
lines would run together into one paragraph, and a role would show as literal text.
This extension translates both before the docstrings are parsed, for the site only
(the code is not changed):

- a bare doctest block becomes a fenced ``pycon`` code block;
- a role becomes inline code, linked to the object's reference entry when the
  reference has one (an optional cross-reference: a name that is not documented,
  such as a private helper, stays plain code instead of a broken link).

Loaded by ``mkdocs.yml`` (``extensions:`` of the python handler).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|data|mod|obj|exc|const):`(~?)([^`]+)`")
SECTION_UNDERLINE = re.compile(r"^\s*-{3,}\s*$")


def _resolve(obj: griffe.Object, target: str) -> str | None:
    """The full path of ``target`` as seen from ``obj``'s scope, or None if unknown."""
    if target.startswith("captum_pattern"):
        return target
    head, _, rest = target.partition(".")
    try:
        path = obj.resolve(head)
    except (griffe.NameResolutionError, griffe.AliasResolutionError, KeyError):
        return None
    return f"{path}.{rest}" if rest else path


def _roles_to_markdown(obj: griffe.Object, text: str) -> str:
    def replace(match: re.Match[str]) -> str:
        short, target = match.group(1) == "~", match.group(2)
        title = target.rsplit(".", 1)[-1] if short else target
        path = _resolve(obj, target)
        if path is None:
            return f"`{title}`"
        return f'<autoref identifier="{path}" optional><code>{title}</code></autoref>'

    return ROLE.sub(replace, text)


def _fence_doctests(text: str) -> str:
    """Wrap doctest blocks outside an "Examples" section in ``pycon`` fences."""
    lines = text.split("\n")
    out: list[str] = []
    in_examples = in_fence = False
    i = 0
    while i < len(lines):
        line = lines[i]
        following = lines[i + 1] if i + 1 < len(lines) else ""
        if line.strip() and SECTION_UNDERLINE.match(following):
            in_examples = line.strip().lower() == "examples"
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        if in_examples or in_fence or not line.lstrip().startswith(">>>"):
            out.append(line)
            i += 1
            continue
        indent = line[: len(line) - len(line.lstrip())]
        block = []
        while i < len(lines) and lines[i].strip():
            block.append(lines[i])
            i += 1
        if out and out[-1].strip():
            out.append("")
        out.extend([f"{indent}```pycon", *block, f"{indent}```"])
    return "\n".join(out)


class RestToMarkdown(griffe.Extension):
    """Translate doctest blocks and reST roles in every docstring of a loaded package."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        for obj in _objects(pkg):
            if obj.docstring is not None:
                text = _fence_doctests(obj.docstring.value)
                obj.docstring.value = _roles_to_markdown(obj, text)


def _objects(obj: griffe.Object) -> list[griffe.Object]:
    found = [obj]
    for member in obj.members.values():
        if not isinstance(member, griffe.Alias):
            found.extend(_objects(member))
    return found
