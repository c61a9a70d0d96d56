"""Griffe extension: render ctxpred's Sphinx-flavoured Google docstrings on the mkdocs site.

The library's docstrings are Google style (``Args:``, ``Returns:``, ``Shape:``) with Markdown
code (fenced blocks, doctests) and a few reStructuredText bits that plain Markdown would show
verbatim. At load time (before the docstrings are parsed) this extension rewrites, without
touching the source files:

* ``.. math::`` blocks          -> ``$$ ... $$`` display math (rendered by MathJax via arithmatex);
* ``:math:`x```                 -> ``$x$`` inline math;
* ``:func:`name```, ``:class:``, ``:meth:``, ``:mod:``, ``:attr:``, ``:exc:``, ``:data:`` ->
  a cross-reference when ``name`` resolves to a public object of a module listed in
  ``link_modules`` (pages that render all its public members), otherwise inline code, so a
  reference can never break ``mkdocs build --strict``; it shows the last component of the
  name, except for a module (``:mod:`ctxpred.heads``` shows ``ctxpred.heads``);
* a lone ``Example:`` heading   -> ``Examples:`` so doctest lines become highlighted code;
* `` -- `` between words         -> an em dash (outside code).

Nothing else: any other RST construct left in a docstring's prose (a table, a ``::`` literal
block, another directive or role, an RST link) makes the build fail with the object and the
line (:func:`check_supported`), rather than render as garbage. Tables belong on the docs pages.

Configured in ``mkdocs.yml`` under the python handler's ``extensions`` option.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import griffe

_ROLE = re.compile(r":(func|class|meth|mod|attr|exc|data|obj):`(~?)([^`]+)`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_UNSUPPORTED = (
    (re.compile(r"^\s*=+(\s+=+)+\s*$"), "an RST table (put tables on the docs pages)"),
    (re.compile(r"::\s*$"), "an RST literal block '::' (use a fenced ``` block or a doctest)"),
    (re.compile(r"^\s*\.\. \S"), "an RST directive or comment other than '.. math::'"),
    (re.compile(r"`[^`]+`__?(?!\w)"), "an RST link or reference (`text`_)"),
    (re.compile(r":[a-z]+:`"), "an RST role other than :math: and the cross-reference roles"),
)
_DASH = re.compile(r"(?<=\S) -- (?=\S)")
_CODE_SPAN = re.compile(r"(`+).+?\1")
_CODE_OR_LINK = re.compile(r"``.+?``|`[^`]+`(?!_)")


def _prose(lines: list[str]) -> list[bool]:
    """Per line: is it prose, i.e. outside fenced code blocks and doctest examples?

    A doctest example is a ``>>>`` line, its ``...`` continuations and its expected output,
    which runs to the next blank line.
    """
    out: list[bool] = []
    fence: str | None = None
    doctest = False
    for line in lines:
        stripped = line.strip()
        if fence is not None:
            out.append(False)
            if stripped.startswith(fence):
                fence = None
            continue
        if stripped.startswith(("```", "~~~")):
            fence = stripped[:3]
            out.append(False)
            continue
        doctest = stripped.startswith(">>>") or (doctest and bool(stripped))
        out.append(not doctest)
    return out


def _outside_code(line: str, fn: Callable[[str], str]) -> str:
    """``fn`` applied to ``line`` with its inline code spans held out (as placeholders)."""
    spans = [m.group(0) for m in _CODE_SPAN.finditer(line)]
    masked = _CODE_SPAN.sub("\x00", line)
    parts = fn(masked).split("\x00")
    return "".join(part + (spans[i] if i < len(spans) else "") for i, part in enumerate(parts))


def _dashes(text: str) -> str:
    """A spaced ASCII ``--`` between words becomes an em dash, outside code."""
    lines = text.split("\n")
    return "\n".join(
        _outside_code(line, lambda s: _DASH.sub(" \u2014 ", s)) if prose else line
        for line, prose in zip(lines, _prose(lines), strict=True)
    )


def check_supported(text: str, where: str) -> None:
    """Raise if ``text`` (rewritten) still holds an RST construct that Markdown shows verbatim.

    Code is exempt: fenced blocks, doctest examples and inline code spans.
    """
    lines = text.split("\n")
    for line, prose in zip(lines, _prose(lines), strict=True):
        if not prose:
            continue
        bare = _CODE_OR_LINK.sub("``", line)  # an RST link `text`_ is not code
        for pattern, what in _UNSUPPORTED:
            if pattern.search(bare):
                raise ValueError(
                    f"the docstring of {where} uses {what}, which docs/_ext/rst_docstrings.py "
                    f"does not render: {line.strip()!r}"
                )


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
        if pkg.name == "ctxpred":  # not the packages it imports (torch, ...)
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
        text = _ROLE.sub(
            lambda m: self._reference(m.group(3), obj, loader, full=m[1] == "mod" and not m[2]),
            text,
        )
        text = _dashes(_EXAMPLE.sub(r"\1Examples:", text))
        check_supported(text, obj.path)
        return text

    def _reference(
        self, name: str, obj: griffe.Object, loader: griffe.GriffeLoader, full: bool = False
    ) -> str:
        """A module keeps its dotted name (``:mod:`~a.b``` shows ``b``); any other object shows
        its last component."""
        title = name if full else name.rsplit(".", 1)[-1]
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
