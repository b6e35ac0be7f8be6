"""Griffe extension for the API reference (mkdocs.yml loads it; it is not part of the package).

The package's docstrings are Google style with a little reStructuredText that griffe's Google parser and
Markdown do not read. Before parsing, this rewrites:

- an ``Example:`` heading to ``Examples:``. Napoleon reads both as an examples section, griffe only the
  plural; under the singular the ``>>>`` lines would render as one paragraph of text, and an output line
  such as ``[1.0, 0.857]`` after ``[...]`` as a broken cross-reference (which fails ``--strict``).
- Sphinx roles (``:func:`~pkg.mod.name```) to optional cross-references: a link where the target is in the
  reference, plain code otherwise (a target outside it, such as ``diffusers.FluxPipeline``, never warns).
  ``:math:`...``` becomes inline code.
- literal blocks (a paragraph ending in ``::`` and the indented block under it, ``.. math::`` too) to fenced
  code blocks.
"""

from __future__ import annotations

import html
import re
import textwrap
from typing import Any

import griffe

_SINGULAR_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
_SPHINX_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|data|obj|exc|const):`(~?)([\w.]+?)(\(\))?`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _fence_literal_blocks(text: str) -> str:
    """``paragraph::`` + an indented block -> ``paragraph:`` + a fenced code block (``Example::`` -> section)."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        line, pad = lines[i], " " * _indent(lines[i])
        if line.strip().startswith(".. math:: "):  # a one-line formula
            out += [f"{pad}```", pad + line.strip().removeprefix(".. math:: "), f"{pad}```"]
            i += 1
            continue
        start = end = i + 1
        if line.rstrip().endswith("::"):
            while start < len(lines) and not lines[start].strip():
                start += 1
            end = start
            while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > _indent(line)):
                end += 1
        if end == start:  # not a literal block
            out.append(line)
            i += 1
            continue
        head = line.rstrip()[:-2].rstrip()
        if head.strip() in ("Example", "Examples"):
            out.append(f"{pad}Examples:")
            pad += "    "  # the block is the section's content
        elif head.strip() != ".. math":
            out += [f"{head}:", ""]
        body = textwrap.dedent("\n".join(lines[start:end]).rstrip()).split("\n")
        out += [f"{pad}```", *(pad + body_line if body_line else "" for body_line in body), f"{pad}```"]
        if end < len(lines):
            out.append("")
        i = end
    return "\n".join(out)


def _rewrite(obj: griffe.Object) -> None:
    def cross_reference(match: re.Match[str]) -> str:
        short, target, call = match.groups()
        text = (target.rsplit(".", 1)[-1] if short else target) + (call or "")
        head, dot, rest = target.partition(".")
        if not head:  # ``~.metrics.name``: relative to the current package
            identifier = obj.module.path.rpartition(".")[0] + target
        else:
            try:
                identifier = obj.resolve(head) + dot + rest
            except griffe.NameResolutionError:
                identifier = target
        return f'<autoref identifier="{html.escape(identifier)}" optional><code>{html.escape(text)}</code></autoref>'

    if obj.docstring is not None:
        value = _SINGULAR_EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
        value = _fence_literal_blocks(value)
        value = _MATH_ROLE.sub(r"`\1`", value)
        obj.docstring.value = _SPHINX_ROLE.sub(cross_reference, value)
    for member in obj.members.values():
        if not member.is_alias:
            _rewrite(member)


class DocstringMarkup(griffe.Extension):
    """Rewrite the reStructuredText bits of the package's docstrings into what mkdocstrings renders."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        _rewrite(pkg)
