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
* a lone ``Example:`` heading   -> ``Examples:`` so doctest lines become highlighted code.

Configured in ``mkdocs.yml`` under the python handler's ``extensions`` option.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(func|class|meth|mod|attr|exc|data|obj):`~?([^`]+)`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


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
            module = final.module.path
            return canonical if module in self.link_modules else None
        return None
