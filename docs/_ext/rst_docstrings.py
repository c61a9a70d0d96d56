"""Griffe extension: render ctxpred's Sphinx-flavoured Google docstrings on the mkdocs site.

The library's docstrings are Google style (``Args:``, ``Returns:``, ``Shape:``) but use a few
reStructuredText constructs that plain Markdown shows verbatim. At load time (before the
docstrings are parsed) this extension rewrites, without touching the source files:

* ``.. math::`` blocks          -> ``$$ ... $$`` display math (rendered by MathJax via arithmatex);
* ``:math:`x```                 -> ``$x$`` inline math;
* ``:func:`name```, ``:class:``, ``:meth:``, ``:mod:``, ``:attr:``, ``:exc:``, ``:data:`` ->
  a cross-reference when ``name`` resolves to a public object of a module listed in
  ``link_modules`` (pages that render all its public members), otherwise inline code, so a
  reference can never break ``mkdocs build --strict``;
* a lone ``Example:`` heading   -> ``Examples:`` so doctest lines become highlighted code;
* RST "simple tables" (columns framed by ``=====  =====`` rules; cells separated by 2+ spaces)
  -> Markdown pipe tables (a row that does not split into its columns fails the build); tables
  belong on the docs pages, this is for the few a docstring keeps;
* a literal block introduced by ``::`` -> a fenced ``python`` code block.

Configured in ``mkdocs.yml`` under the python handler's ``extensions`` option.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(func|class|meth|mod|attr|exc|data|obj):`~?([^`]+)`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_TABLE_RULE = re.compile(r"^\s*=+(\s+=+)+\s*$")


def _indent_of(line: str) -> int:
    return len(line) - len(line.lstrip())


def _cells(line: str, columns: int) -> list[str]:
    """Split a row of a simple table into its cells, separated by runs of 2+ spaces.

    A cell may overflow its rule (e.g. a long role), but it may not contain 2+ spaces in a row:
    such a row raises, so that a table never renders with its cells shifted.
    """
    parts = re.split(r"\s{2,}", line.strip())
    if len(parts) != columns:
        raise ValueError(
            f"RST simple table row {line.strip()!r} splits into {len(parts)} cells at runs of 2+ "
            f"spaces, expected {columns}: keep single spaces inside a cell"
        )
    return [part.replace("|", "\\|") for part in parts]


def _simple_tables(text: str) -> str:
    """Turn RST simple tables (``===  ===`` rule, header, rule, rows, rule) into pipe tables."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        rule = lines[i]
        if not _TABLE_RULE.match(rule):
            out.append(rule)
            i += 1
            continue
        spans = [m.span() for m in re.finditer(r"=+", rule)]
        end = i + 1
        rules = [i]
        while end < len(lines) and lines[end].strip() and len(rules) < 3:
            if _TABLE_RULE.match(lines[end]):
                rules.append(end)
            end += 1
        if len(rules) < 3:
            out.append(rule)
            i += 1
            continue
        indent = rule[: _indent_of(rule)]
        header = _cells(lines[rules[0] + 1], len(spans))
        body = [_cells(line, len(spans)) for line in lines[rules[1] + 1 : rules[2]] if line.strip()]
        out.append("")
        out.append(indent + "| " + " | ".join(header) + " |")
        out.append(indent + "|" + "---|" * len(header))
        out.extend(indent + "| " + " | ".join(row) + " |" for row in body)
        out.append("")
        i = rules[2] + 1
    return "\n".join(out)


def _literal_blocks(text: str) -> str:
    """Turn ``::``-introduced indented literal blocks into fenced python code blocks."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.rstrip()
        if not stripped.endswith("::") or stripped.lstrip().startswith(".. "):
            out.append(line)
            i += 1
            continue
        base = _indent_of(line)
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        if j >= len(lines) or _indent_of(lines[j]) <= base:
            out.append(line)
            i += 1
            continue
        lead = stripped[:-2].rstrip()
        if lead.strip():
            out.append(lead + ":")
        block: list[str] = []
        while j < len(lines) and (not lines[j].strip() or _indent_of(lines[j]) > base):
            block.append(lines[j])
            j += 1
        while block and not block[-1].strip():
            block.pop()
        cut = min(_indent_of(b) for b in block if b.strip())
        pad = " " * base
        out.extend(["", pad + "```python", *(pad + b[cut:] for b in block), pad + "```", ""])
        i = j
    return "\n".join(out)


def _math_blocks(text: str) -> str:
    """Turn every ``.. math::`` directive and its indented body into a ``$$`` block."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.lstrip()
        if not stripped.startswith(".. math::"):
            out.append(line)
            i += 1
            continue
        indent = line[: len(line) - len(stripped)]
        body: list[str] = []
        inline = stripped[len(".. math::"):].strip()
        if inline:
            body.append(inline)
        i += 1
        while i < len(lines) and (
            not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)
        ):
            body.append(lines[i].strip())
            i += 1
        while body and not body[-1]:
            body.pop()
        while body and not body[0]:
            body.pop(0)
        out.extend(["", f"{indent}$$", *(f"{indent}{b}" for b in body), f"{indent}$$", ""])
    return "\n".join(out)


class RstDocstrings(griffe.Extension):
    """Rewrite the RST constructs of ctxpred docstrings into Markdown (see the module doc)."""

    def __init__(self, link_modules: list[str] | None = None) -> None:
        super().__init__()
        self.link_modules = tuple(link_modules or ())

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **_: Any) -> None:
        self._walk(pkg, loader, set())

    def _walk(self, obj: griffe.Object, loader: griffe.GriffeLoader, seen: set[str]) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is not None:
            obj.docstring.value = self._rewrite(obj.docstring.value, obj, loader)
        for member in obj.members.values():
            if not member.is_alias:
                self._walk(member, loader, seen)

    def _rewrite(self, text: str, obj: griffe.Object, loader: griffe.GriffeLoader) -> str:
        text = _math_blocks(text)
        text = _literal_blocks(_simple_tables(text))
        text = _MATH_ROLE.sub(lambda m: f"${m.group(1).strip()}$", text)
        text = _ROLE.sub(lambda m: self._reference(m.group(2), obj, loader), text)
        return _EXAMPLE.sub(r"\1Examples:", text)

    def _reference(self, name: str, obj: griffe.Object, loader: griffe.GriffeLoader) -> str:
        title = name.rsplit(".", 1)[-1] if "." in name else name
        target = self._resolve(name, obj, loader)
        if target is None:
            return f"`{title}`"
        return f"[`{title}`][{target}]"

    def _resolve(self, name: str, obj: griffe.Object, loader: griffe.GriffeLoader) -> str | None:
        scopes: list[griffe.Object] = []
        node: griffe.Object | None = obj
        while node is not None:
            scopes.append(node)
            node = node.parent
        candidates = [f"{scope.path}.{name}" for scope in scopes] + [name]
        for path in candidates:
            try:
                found = loader.modules_collection.get_member(path)
            except (KeyError, ValueError, AttributeError, griffe.AliasResolutionError):
                continue
            try:
                final = found.final_target if found.is_alias else found
            except griffe.AliasResolutionError:
                continue
            canonical = final.path
            parts = canonical.split(".")
            if any(p.startswith("_") for p in parts):
                return None
            if final.is_module:
                return canonical if canonical in self.link_modules else None
            # mkdocstrings renders a member only when it and its parents carry a docstring.
            node = final
            while not node.is_module:
                if not node.docstring:
                    return None
                node = node.parent
            return canonical if node.path in self.link_modules else None
        return None
