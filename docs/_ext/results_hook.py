"""MkDocs hook: include the measured tables of ``docs/results/`` into the pages that cite them.

A page writes, on a line of its own::

    <!-- result: estimators_cpu.md | python3 run.py bench estimators -->

and the hook replaces that line with the content of ``docs/results/estimators_cpu.md``, its
headings demoted below the page's own (``#`` becomes ``###``). When the file does not exist (a
fresh clone, a benchmark not run yet) the line becomes a note naming the command that writes it,
so the site never shows a table that was not measured, and never fails to build for lack of one.
The benchmark scripts own ``docs/results/``; the files are excluded from the site as pages.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

_DIRECTIVE = re.compile(
    r"^<!--\s*result:\s*(?P<name>[\w.-]+\.md)\s*\|\s*(?P<command>.+?)\s*-->\s*$", re.MULTILINE
)
_FENCE = re.compile(r"^\s*(```|~~~)")


def demote_headings(text: str, levels: int = 2) -> str:
    """Add ``levels`` ``#`` to every Markdown heading outside code fences."""
    out, in_fence = [], False
    for line in text.split("\n"):
        if _FENCE.match(line):
            in_fence = not in_fence
        if not in_fence and re.match(r"^#{1,6} ", line):
            line = "#" * levels + line
        out.append(line)
    return "\n".join(out)


def include_results(markdown: str, results_dir: Path) -> str:
    """Replace every ``<!-- result: NAME | COMMAND -->`` line (see the module docstring)."""

    def replace(match: re.Match[str]) -> str:
        path = results_dir / match["name"]
        if path.is_file():
            return demote_headings(path.read_text().strip())
        return (
            f'!!! note "Not measured in this checkout"\n'
            f"    `docs/results/{match['name']}` does not exist yet. "
            f"`{match['command']}` measures it and writes the file that appears here."
        )

    return _DIRECTIVE.sub(replace, markdown)


def on_page_markdown(markdown: str, *, page: Any, config: Any, files: Any, **_: Any) -> str:
    """MkDocs event: expand the result directives of every page."""
    return include_results(markdown, Path(config["docs_dir"]) / "results")
