"""MkDocs hook: include the measured reports of ``docs/results/`` into the pages that cite them.

A page writes, on a line of its own::

    <!-- result: estimators_cpu.md | python3 run.py bench estimators -->

and the hook replaces that line with the report ``docs/results/estimators_cpu.md`` (a path
relative to ``docs/results/``, e.g. ``../assets/demo/metrics.md``, is allowed too), prepared for
readers:

* its title (the first ``#`` heading) becomes a bold line, and its other headings go one level
  down (``##`` becomes ``###``), so they sit under the page's own section and stay in the table
  of contents;
* the benchmark's internal acceptance thresholds (a ``Targets`` line and the list under it) are
  left out: they are for maintainers, and stay in the file and its JSON;
* ASCII stand-ins become typography outside code: ``+-`` becomes ±, a numeric range ``2067-3715``
  an en dash, a spaced `` -- `` an em dash.

When the file does not exist (a fresh clone, a benchmark not run yet) the line becomes a note
naming the command that writes it, so the site never shows a table that was not measured, and
never fails to build for lack of one. The benchmark scripts own ``docs/results/``; the files are
excluded from the site as pages.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

_DIRECTIVE = re.compile(
    r"^<!--\s*result:\s*(?P<name>[\w./-]+\.md)\s*\|\s*(?P<command>.+?)\s*-->\s*$", re.MULTILINE
)
_FENCE = re.compile(r"^\s*(```|~~~)")
_TARGETS = re.compile(r"^Targets\b[^\n]*\n(?:[ \t]*\n)*(?:[ \t]*- [^\n]*\n)*", re.MULTILINE)
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
_DATE = re.compile(r"\b\d{4}-\d{2}-\d{2}\b")


def demote_headings(text: str, levels: int = 1) -> str:
    """Turn the first ``#`` heading into a bold line and add ``levels`` ``#`` to the others.

    Lines inside code fences are left alone.
    """
    out, in_fence, titled = [], False, False
    for line in text.split("\n"):
        if _FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence and re.match(r"^# ", line) and not titled:
            line, titled = f"**{line[2:].strip()}**", True
        elif not in_fence and re.match(r"^#{1,6} ", line):
            line = "#" * levels + line
        out.append(line)
    return "\n".join(out)


def _typography(segment: str) -> str:
    dates = _DATE.findall(segment)
    segment = _DATE.sub("\0", segment)
    segment = re.sub(r"\s*\+-\s*", " ± ", segment)
    segment = re.sub(r"(?<=\d)-(?=\d)", "–", segment)
    segment = segment.replace(" -- ", " — ")
    for date in dates:
        segment = segment.replace("\0", date, 1)
    return segment


def for_readers(text: str) -> str:
    """Leave out ``Targets`` blocks and apply the typography of the module docstring."""
    text = _TARGETS.sub("", text)
    out, in_fence = [], False
    for line in text.split("\n"):
        if _FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence:
            pieces, last = [], 0
            for span in _CODE_SPAN.finditer(line):
                pieces += [_typography(line[last:span.start()]), span.group(0)]
                last = span.end()
            line = "".join([*pieces, _typography(line[last:])])
        out.append(line)
    return "\n".join(out)


def include_results(markdown: str, results_dir: Path) -> str:
    """Replace every ``<!-- result: NAME | COMMAND -->`` line (see the module docstring)."""

    def replace(match: re.Match[str]) -> str:
        path = results_dir / match["name"]
        if path.is_file():
            return demote_headings(for_readers(path.read_text().strip()))
        return (
            f'!!! note "Not measured in this checkout"\n'
            f"    `docs/{Path(os.path.normpath(Path('results') / match['name'])).as_posix()}` "
            f"does not exist yet. "
            f"`{match['command']}` measures it and writes the file that appears here."
        )

    return _DIRECTIVE.sub(replace, markdown)


def on_page_markdown(markdown: str, *, page: Any, config: Any, files: Any, **_: Any) -> str:
    """MkDocs event: expand the result directives of every page."""
    return include_results(markdown, Path(config["docs_dir"]) / "results")
