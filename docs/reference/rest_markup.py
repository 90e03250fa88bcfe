"""Griffe extension: read the reST markup of the package's docstrings as Markdown.

The docstrings are NumPy style with the markup Sphinx reads: bare doctest blocks
(``>>>`` lines outside an "Examples" section), roles such as ``:class:`Patterns``` and
``#:`` comments documenting a module constant. mkdocstrings renders docstrings as
Markdown, where none of these means anything: doctest lines would run together into one
paragraph, a role would show as literal text, and a constant would have no description.
This extension translates them before the docstrings are parsed, for the site only (the
code is not changed):

- a bare doctest block becomes a fenced ``pycon`` code block;
- a role becomes inline code, linked to the object's reference entry when the
  reference has one (an optional cross-reference: a name that is not documented,
  such as a private helper, stays plain code instead of a broken link);
- the ``#:`` comment lines right above an attribute become its docstring;
- an item naming several parameters without a type (``model, patterns:``) is given to
  each name (griffe would show the first name's annotation for all of them);
- a paragraph written after a Parameters list without a heading of its own (NumPy style
  would read its first words as more parameters) gets the heading "Notes". Such
  docstrings should get the heading in the code; this keeps the site right meanwhile.

Loaded by ``mkdocs.yml`` (``extensions:`` of the python handler).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(class|func|meth|attr|data|mod|obj|exc|const):`(~?)([^`]+)`")
SECTION_UNDERLINE = re.compile(r"^\s*-{3,}\s*$")
NAME_SECTIONS = ("parameters", "other parameters", "attributes")
#: an item naming several parameters and no type: ``model, patterns:``
SHARED_ITEM = re.compile(r"^(\w+(?:\s*,\s*\w+)+)\s*:?\s*$")
#: a line that starts an item of a NumPy name list: ``name``, ``a, b``, ``name : type``
NAME_ITEM = re.compile(r"^\*{0,2}\w+(\s*,\s*\*{0,2}\w+)*\s*(:.*)?$")


def _resolve(obj: griffe.Object, target: str, role: str) -> str | None:
    """The full path of ``target`` as seen from ``obj``'s scope, or None if unknown."""
    if target.startswith("captum_pattern"):
        path = target
    else:
        head, _, rest = target.partition(".")
        try:
            path = obj.resolve(head)
        except (griffe.NameResolutionError, griffe.AliasResolutionError, KeyError):
            return None
        path = f"{path}.{rest}" if rest else path
    # ``from .signal_quality import signal_quality`` rebinds the package attribute to the
    # function, but griffe keeps the submodule under that name: follow Python
    try:
        found = obj.modules_collection[path]
    except (KeyError, griffe.AliasResolutionError):
        return path
    name = path.rsplit(".", 1)[-1]
    if role != "mod" and found.is_module and name in found.members:
        return f"{path}.{name}"
    return path


def _roles_to_markdown(obj: griffe.Object, text: str) -> str:
    def replace(match: re.Match[str]) -> str:
        role, short, target = match.group(1), match.group(2) == "~", match.group(3)
        title = target.rsplit(".", 1)[-1] if short else target
        path = _resolve(obj, target, role)
        if path is None:
            return f"`{title}`"
        return f'<autoref identifier="{path}" optional><code>{title}</code></autoref>'

    return ROLE.sub(replace, text)


def _head_trailing_prose(text: str) -> str:
    """Put a "Notes" heading above prose that follows a list of names without one."""
    lines = text.split("\n")
    out: list[str] = []
    in_names = False
    for i, line in enumerate(lines):
        following = lines[i + 1] if i + 1 < len(lines) else ""
        if line.strip() and SECTION_UNDERLINE.match(following):
            in_names = line.strip().lower() in NAME_SECTIONS
        elif (
            in_names
            and line
            and not line[0].isspace()
            and not SECTION_UNDERLINE.match(line)
            and out
            and not out[-1].strip()
            and not NAME_ITEM.match(line)
        ):
            out.extend(["Notes", "-----"])
            in_names = False
        out.append(line)
    return "\n".join(out)


def _split_shared_items(text: str) -> str:
    """Write ``a, b:`` items without a type of a name list once per name."""
    lines = text.split("\n")
    out: list[str] = []
    in_names = False
    i = 0
    while i < len(lines):
        line = lines[i]
        following = lines[i + 1] if i + 1 < len(lines) else ""
        if line.strip() and SECTION_UNDERLINE.match(following):
            in_names = line.strip().lower() in NAME_SECTIONS
        match = SHARED_ITEM.match(line) if in_names else None
        if match is None:
            out.append(line)
            i += 1
            continue
        i += 1
        description = []
        while i < len(lines) and (not lines[i].strip() or lines[i][0].isspace()):
            description.append(lines[i])
            i += 1
        blank_tail = len(description) - len("\n".join(description).rstrip().split("\n"))
        body = description[: len(description) - blank_tail]
        for name in re.split(r"\s*,\s*", match.group(1)):
            out.extend([f"{name}:", *body])
        out.extend([""] * blank_tail)
    return "\n".join(out)


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
            if obj.docstring is None and obj.is_attribute:
                _comment_to_docstring(obj)
            if obj.docstring is not None:
                text = _split_shared_items(_head_trailing_prose(obj.docstring.value))
                text = _fence_doctests(text)
                obj.docstring.value = _roles_to_markdown(obj, text)


def _comment_to_docstring(attr: griffe.Object) -> None:
    """Make the ``#:`` comment lines right above ``attr`` its docstring, if there are any."""
    if attr.lineno is None or attr.filepath is None or isinstance(attr.filepath, list):
        return
    lines = attr.lines_collection[attr.filepath]
    comment: list[str] = []
    index = attr.lineno - 2  # the line above, 0-based
    while index >= 0 and lines[index].lstrip().startswith("#:"):
        comment.insert(0, lines[index].lstrip()[2:].strip())
        index -= 1
    if comment:
        attr.docstring = griffe.Docstring("\n".join(comment), lineno=index + 2, parent=attr)


def _objects(obj: griffe.Object) -> list[griffe.Object]:
    found = [obj]
    for member in obj.members.values():
        if not isinstance(member, griffe.Alias):
            found.extend(_objects(member))
    return found
