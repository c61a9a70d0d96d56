"""The documentation cannot drift from the code: every ```python block in docs/ runs here.

Each Markdown page under ``docs/`` (``docs/results/`` excluded: generated tables, no code) is
one test. Its ```python blocks run in order, in one namespace, like a notebook, so a page can
build a model in one block and train it in the next. A block is skipped only when the line right
before its opening fence is the marker ``<!-- docs-test: skip -->`` (an HTML comment, invisible on
the site); use it sparingly, e.g. for a multi-GPU launch that cannot run here. Shell commands go in
```bash blocks, which are never run.

Besides running the code, the tests check that every ``::: ctxpred.xxx`` reference of the API
pages imports, that every public module of the package has an API page, and that every page of
the nav exists.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import re
from pathlib import Path

import pytest
import torch

import ctxpred

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SKIP_MARKER = "<!-- docs-test: skip -->"
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)\s*(?P<info>[^\n`]*)$")


def code_blocks(text: str) -> list[tuple[int, str, bool]]:
    """``(line_number, source, skipped)`` of every ```python block of a Markdown text.

    Indented fences (inside admonitions or list items) are found too; their indentation is
    removed. The ``info`` string must start with ``python`` or ``py`` (attributes such as
    ``title="..."`` may follow).
    """
    lines = text.split("\n")
    blocks: list[tuple[int, str, bool]] = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        indent, fence = match["indent"], match["fence"]
        lang = match["info"].strip().split(" ")[0].lstrip("{").lstrip(".").lower()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not (
            lines[i].strip().startswith(fence) and lines[i].strip().strip(fence[0]) == ""
        ):
            line = lines[i]
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
            i += 1
        i += 1
        if lang in {"python", "py"}:
            previous = lines[start - 1].strip() if start > 0 else ""
            blocks.append((start + 1, "\n".join(body) + "\n", previous == SKIP_MARKER))
    return blocks


def _pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "results" not in p.relative_to(DOCS).parts)


def test_code_blocks_parser() -> None:
    text = "\n".join([
        "# t",
        "```python",
        "a = 1",
        "```",
        "```bash",
        "echo no",
        "```",
        SKIP_MARKER,
        "```python",
        "raise SystemExit",
        "```",
        "!!! note",
        "    ```python title=\"x.py\"",
        "    b = a + 1",
        "    ```",
    ])
    blocks = code_blocks(text)
    assert [(line, skip) for line, _, skip in blocks] == [(2, False), (9, True), (13, False)]
    assert blocks[0][1] == "a = 1\n" and blocks[2][1] == "b = a + 1\n"


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(DOCS)))
def test_page_code_runs(page: Path) -> None:
    blocks = code_blocks(page.read_text())
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem}"}
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny examples: threads only add contention on a shared machine
    try:
        for line, source, skipped in blocks:
            if skipped:
                continue
            code = compile(source, f"{page.relative_to(ROOT)}:{line}", "exec")
            try:
                exec(code, namespace)
            except Exception as err:
                raise AssertionError(
                    f"the code block at {page.relative_to(ROOT)} line {line} failed: "
                    f"{type(err).__name__}: {err}"
                ) from err
    finally:
        torch.set_num_threads(threads)


def test_skip_marker_is_rare() -> None:
    blocks = [b for p in _pages() for b in code_blocks(p.read_text())]
    skipped = sum(skip for _, _, skip in blocks)
    assert skipped <= max(2, len(blocks) // 10), f"{skipped} of {len(blocks)} blocks are skipped"


def _api_targets() -> list[str]:
    targets = []
    for page in _pages():
        targets += re.findall(r"^:::\s+([\w.]+)", page.read_text(), flags=re.MULTILINE)
    return targets


def test_api_references_import() -> None:
    targets = _api_targets()
    assert "ctxpred.neighborhoods" in targets
    for target in targets:
        module, _, attr = target.rpartition(".")
        try:
            importlib.import_module(target)
        except ModuleNotFoundError:
            assert hasattr(importlib.import_module(module), attr), target


def test_every_public_module_has_an_api_page() -> None:
    targets = set(_api_targets())
    public = [
        m.name for m in pkgutil.walk_packages(ctxpred.__path__, "ctxpred.")
        if not any(part.startswith("_") for part in m.name.split("."))
    ]
    missing = [m for m in public if not any(t == m or t.startswith(m + ".") for t in targets)]
    assert not missing, f"public modules without an API page under docs/api/: {missing}"


def test_nav_pages_exist() -> None:
    nav = re.findall(r":\s+([\w/.-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.MULTILINE)
    assert "index.md" in nav
    missing = [p for p in nav if not (DOCS / p).is_file()]
    assert not missing, f"pages in the mkdocs.yml nav that do not exist: {missing}"


def _rst_extension():
    spec = importlib.util.spec_from_file_location("rst_docstrings", DOCS / "_ext/rst_docstrings.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rst_extension_rewrites_math_tables_literals_and_roles() -> None:
    import griffe

    ext = _rst_extension()
    text = "\n".join([
        "Intro :math:`W_p^p` and :func:`neighbors`, :class:`~ctxpred.heads.NaiveHead`,",
        ":func:`_private_helper`.",
        "",
        ".. math::",
        "    a = b",
        "",
        "=====  =======",
        "name   what",
        "=====  =======",
        "x      first",
        "y      second",
        "=====  =======",
        "",
        "Usage::",
        "",
        "    f(x)",
        "",
        "Example:",
        "    >>> 1",
    ])
    loader = griffe.GriffeLoader()
    package = loader.load("ctxpred")
    extension = ext.RstDocstrings(link_modules=["ctxpred.neighborhoods", "ctxpred.heads.naive"])
    out = extension._rewrite(text, package["neighborhoods"], loader)
    assert "$W_p^p$" in out and "$$\na = b\n$$" in out
    assert "[`neighbors`][ctxpred.neighborhoods.neighbors]" in out
    assert "[`NaiveHead`][ctxpred.heads.naive.NaiveHead]" in out
    assert "`_private_helper`" in out and "[`_private_helper`]" not in out
    assert "| name | what |\n|---|---|\n| x | first |\n| y | second |" in out
    assert "Usage:\n\n```python\nf(x)\n```" in out
    assert "Examples:\n    >>> 1" in out
    unlisted = ext.RstDocstrings(link_modules=["ctxpred.heads"])
    assert unlisted._rewrite(":func:`neighbors`", package["neighborhoods"], loader) == (
        "`neighbors`"
    )


def test_results_hook_includes_measured_files_or_names_the_command(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("results_hook", DOCS / "_ext/results_hook.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    table = "# Speed\n\n```\n# not a heading\n```\n| a |\n|---|\n| 1 |\n"
    (tmp_path / "speed.md").write_text(table)
    page = (
        "Intro\n<!-- result: speed.md | python3 run.py bench speed -->\n"
        "<!-- result: missing.md | python3 run.py bench missing -->\nEnd"
    )
    out = hook.include_results(page, tmp_path)
    assert "### Speed" in out and "\n# not a heading\n" in out and "| 1 |" in out
    assert "`docs/results/missing.md` does not exist" in out
    assert "`python3 run.py bench missing`" in out and "<!--" not in out
