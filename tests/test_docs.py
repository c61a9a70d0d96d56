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

import contextlib
import importlib
import importlib.util
import io
import os
import pkgutil
import re
import subprocess
import sys
from html.parser import HTMLParser
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


OUTPUT_INFO = 'text title="Output"'
_OUTPUT = re.compile(
    r"^```python[^\n]*\n(?:(?!```).*\n)*?```[ \t]*\n\s*"  # a python block, blank lines,
    r"^```text title=\"Output\"\n(?P<out>(?:(?!```).*\n)*?)```",  # then its output block
    re.MULTILINE,
)


def output_blocks(text: str) -> dict[int, str]:
    """``{line of a python block: the output block right after it}`` (top-level blocks only).

    An output block is a ```` ```text title="Output" ```` fence that follows a ```python block,
    separated by blank lines only; it shows what the code prints, and the test checks it.
    """
    return {text[: m.start()].count("\n") + 1: m["out"] for m in _OUTPUT.finditer(text)}


def run_page(page: Path) -> dict[int, str]:
    """Run a page's python blocks in order, in one namespace: ``{line: what the block printed}``."""
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem}"}
    printed: dict[int, str] = {}
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny examples: threads only add contention on a shared machine
    try:
        for line, source, skipped in code_blocks(page.read_text()):
            if skipped:
                continue
            code = compile(source, f"{page.relative_to(ROOT)}:{line}", "exec")
            buffer = io.StringIO()
            try:
                with contextlib.redirect_stdout(buffer):
                    exec(code, namespace)
            except Exception as err:
                raise AssertionError(
                    f"the code block at {page.relative_to(ROOT)} line {line} failed: "
                    f"{type(err).__name__}: {err}"
                ) from err
            printed[line] = buffer.getvalue()
    finally:
        torch.set_num_threads(threads)
    return printed


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(DOCS)))
def test_page_code_runs(page: Path) -> None:
    """Every block runs; an output block shown after a block is what that block prints."""
    printed = run_page(page)
    for line, shown in output_blocks(page.read_text()).items():
        assert printed.get(line, "").strip() == shown.strip(), (
            f"{page.relative_to(ROOT)} line {line}: the output block differs from what the code "
            f"prints; rerun `python -m tests.test_docs {page.relative_to(ROOT)}`.\n"
            f"printed:\n{printed.get(line, '')}\nshown:\n{shown}"
        )


def test_output_blocks_parser() -> None:
    text = "```python\nprint(1)\n```\n\n```text title=\"Output\"\n1\n```\n```python\nx\n```\n"
    assert output_blocks(text) == {1: "1\n"}
    # a block without output is not paired with the output of the next block
    later = "```python\na\n```\n" + text
    assert output_blocks(later) == {4: "1\n"}


def update_outputs(page: Path) -> None:
    """Write, after every top-level python block that prints, its output block (or refresh it)."""
    printed = run_page(page)
    lines = page.read_text().split("\n")
    shown = output_blocks("\n".join(lines))
    for line in sorted(printed, reverse=True):
        out = printed[line].rstrip("\n")
        start = line - 1
        if lines[start].startswith(" "):
            continue  # indented blocks (admonitions, lists) are left alone
        end = start + 1
        while not lines[end].startswith("```"):
            end += 1
        if line in shown:  # replace the existing output block
            o_start = end + 1
            while lines[o_start].strip() == "":
                o_start += 1
            o_end = o_start + 1
            while not lines[o_end].startswith("```"):
                o_end += 1
            del lines[end + 1 : o_end + 1]
        if out:
            lines[end + 1 : end + 1] = ["", f"```{OUTPUT_INFO}", *out.split("\n"), "```"]
    page.write_text("\n".join(lines))


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


def test_rst_extension_rewrites_math_roles_and_dashes() -> None:
    import griffe

    ext = _rst_extension()
    text = "\n".join([
        "Intro :math:`W_p^p` and :func:`neighbors`, :class:`~ctxpred.heads.NaiveHead`,",
        ":mod:`ctxpred.neighborhoods` and :mod:`~ctxpred.neighborhoods`,",
        ":func:`_private_helper` -- a dash, ``a -- b`` in code.",
        "",
        ".. math::",
        "    a = b",
        "",
        "```python",
        "x = 1 -- 2  # fenced code is left alone::",
        "```",
        "",
        "Example:",
        "    >>> 1 -- 2",
        "    3",
    ])
    loader = griffe.GriffeLoader()
    package = loader.load("ctxpred")
    extension = ext.RstDocstrings(link_modules=["ctxpred.neighborhoods", "ctxpred.heads.naive"])
    out = extension._rewrite(text, package["neighborhoods"], loader)
    assert "$W_p^p$" in out and "$$\na = b\n$$" in out
    assert "[`neighbors`][ctxpred.neighborhoods.neighbors]" in out
    assert "[`NaiveHead`][ctxpred.heads.naive.NaiveHead]" in out
    assert "[`ctxpred.neighborhoods`][ctxpred.neighborhoods]" in out
    assert "[`neighborhoods`][ctxpred.neighborhoods]," in out
    assert "`_private_helper`" in out and "[`_private_helper`]" not in out
    assert "`_private_helper` \u2014 a dash, ``a -- b`` in code." in out
    assert "x = 1 -- 2  # fenced code is left alone::" in out
    assert "Examples:\n    >>> 1 -- 2\n    3" in out
    unlisted = ext.RstDocstrings(link_modules=["ctxpred.heads"])
    assert unlisted._rewrite(":func:`neighbors`", package["neighborhoods"], loader) == (
        "`neighbors`"
    )


@pytest.mark.parametrize("construct", [
    "=====  =====\nname   what\n=====  =====\nx      y\n=====  =====",  # a simple table
    "Usage::\n\n    f(x)",  # a literal block
    ".. note::\n    careful",  # a directive other than math
    "See `the paper <https://x.org>`_.",  # an RST link
    "See :ref:`install`.",  # a role without a rendering
])
def test_rst_extension_fails_loudly_on_unsupported_rst(construct: str) -> None:
    import griffe

    loader = griffe.GriffeLoader()
    package = loader.load("ctxpred")
    extension = _rst_extension().RstDocstrings(link_modules=[])
    with pytest.raises(ValueError, match=r"ctxpred\.neighborhoods uses .* does not render"):
        extension._rewrite(f"Summary.\n\n{construct}\n", package["neighborhoods"], loader)
    # the same text as code is fine
    fenced = "Summary.\n\n```text\n" + construct + "\n```\n"
    assert construct in extension._rewrite(fenced, package["neighborhoods"], loader)


def _documented_args(doc: str) -> set[str]:
    """The names of a Google-style ``Args:`` section (entries one indent level deeper)."""
    match = re.search(r"^Args:\n((?:[ \t]+.*\n|\n)+)", doc + "\n", re.MULTILINE)
    if match is None:
        return set()
    body = match.group(1)
    indent = min(len(line) - len(line.lstrip()) for line in body.split("\n") if line.strip())
    return {m.group(1) for m in re.finditer(rf"^ {{{indent}}}\*{{0,2}}(\w+)\b[^\n]*?:", body,
                                            re.MULTILINE)}


def _public_classes() -> list[type]:
    import ctxpred.heads
    import ctxpred.neighborhoods
    import ctxpred.wasserstein

    found: dict[str, type] = {}
    for module in (ctxpred, ctxpred.heads, ctxpred.neighborhoods, ctxpred.wasserstein):
        for name in module.__all__:
            obj = getattr(module, name)
            # exceptions and named tuples document their fields, not constructor arguments
            if (isinstance(obj, type) and obj.__init__ is not object.__init__
                    and not issubclass(obj, (BaseException, tuple))):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return [found[k] for k in sorted(found)]


@pytest.mark.parametrize("cls", _public_classes(), ids=lambda c: c.__qualname__)
def test_every_constructor_argument_is_documented(cls: type) -> None:
    """The class docstring's ``Args:`` names every ``__init__`` argument (the API pages merge
    ``__init__`` into the class, so that is where a reader finds them)."""
    import inspect

    params = [p.name for p in inspect.signature(cls.__init__).parameters.values()
              if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    doc = inspect.getdoc(cls) or ""
    missing = [p for p in params if p not in _documented_args(doc)]
    assert not missing, f"{cls.__qualname__}: Args section lacks {missing}"
    sections = re.findall(r"^(Args|Returns|Shape|Example):$", doc, re.MULTILINE)
    assert len(sections) == len(set(sections)), f"{cls.__qualname__}: a repeated section {sections}"


def test_documented_args_parser() -> None:
    doc = ("Summary.\n\nArgs:\n    a: one.\n        more: not an arg.\n    b (int): two.\n\n"
           "Shape:\n    c: no.")
    assert _documented_args(doc) == {"a", "b"}
    assert _documented_args("No args.") == set()


def _returns_entries(source: str) -> list[list[str]]:
    """The entry lines of each ``Returns:`` section of a source file (one indent deeper)."""
    lines = source.split("\n")
    sections = []
    for i, line in enumerate(lines):
        if line.strip() != "Returns:":
            continue
        indent = len(line) - len(line.lstrip())
        entries, j = [], i + 1
        while j < len(lines) and (
            not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent
        ):
            if lines[j].strip() and len(lines[j]) - len(lines[j].lstrip()) == indent + 4:
                entries.append(lines[j].strip())
            j += 1
        sections.append(entries)
    return sections


def test_returns_sections_have_one_entry() -> None:
    """A continuation line of a return value is indented; otherwise the rendered Returns table
    splits one value into two rows (seen on the API pages)."""
    split = [f"{path.relative_to(ROOT)}: {entries}"
             for path in sorted((ROOT / "ctxpred").rglob("*.py"))
             for entries in _returns_entries(path.read_text()) if len(entries) != 1]
    assert not split, "Returns sections with more than one entry:\n" + "\n".join(split)
    broken = "Returns:\n    ``x``: the\n    rest.\n\nExample:\n    >>> 1\n"
    assert _returns_entries(broken) == [["``x``: the", "rest."]]
    assert _returns_entries(broken.replace("    rest", "        rest")) == [["``x``: the"]]


def test_results_hook_includes_measured_files_or_names_the_command(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("results_hook", DOCS / "_ext/results_hook.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    table = "\n".join([
        "# Speed", "", "Written on 2026-11-26 by `run --a 1-2`.", "## Per size", "",
        "```", "# not a heading", "x +- y 1-2", "```",
        "| a | range |", "|---|---|", "| 0.25 +- 0.04 | 2067-3715 |", "",
        "Targets (ratios from this run):", "", "- `t_over_u`: 1.4", "- `v`: 2", "",
        "Targets: time ratio <= 1.15.", "after -- the end",
    ])
    (tmp_path / "speed.md").write_text(table)
    page = (
        "Intro\n<!-- result: speed.md | python3 run.py bench speed -->\n"
        "<!-- result: missing.md | python3 run.py bench missing -->\nEnd"
    )
    out = hook.include_results(page, tmp_path)
    assert "**Speed**" in out and "\n### Per size\n" in out and "\n# not a heading\n" in out
    assert "| 0.25 ± 0.04 | 2067–3715 |" in out and "x +- y 1-2" in out  # not in code
    assert "2026-11-26" in out and "`run --a 1-2`" in out
    assert "Targets" not in out and "t_over_u" not in out and "after — the end" in out
    assert "`docs/results/missing.md` does not exist" in out
    assert "`python3 run.py bench missing`" in out and "<!--" not in out


class _PageScan(HTMLParser):
    """What a built page loads (scripts, stylesheets) and its visible text outside code/math."""

    _SKIP = frozenset({"code", "pre", "script", "style", "kbd", "samp"})
    _VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link",
                       "meta", "source", "track", "wbr"})

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[str] = []
        self.stylesheets: list[str] = []
        self.images: list[str] = []
        self.text: list[str] = []
        self.math = 0
        self._stack: list[bool] = []  # per open element: does it hide its text from the check

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "script" and a.get("src"):
            self.scripts.append(a["src"])
        if tag == "img" and a.get("src"):
            self.images.append(a["src"])
        if tag == "link" and "stylesheet" in a.get("rel", "").split():
            self.stylesheets.append(a.get("href", ""))
        if tag in self._VOID:
            return
        is_math = "arithmatex" in a.get("class", "").split()
        self.math += is_math
        hidden = tag in self._SKIP or is_math or bool(self._stack and self._stack[-1])
        self._stack.append(hidden)

    def handle_endtag(self, tag: str) -> None:
        if tag not in self._VOID and self._stack:
            self._stack.pop()

    def handle_data(self, data: str) -> None:
        if not (self._stack and self._stack[-1]):
            self.text.append(data)


@pytest.fixture(scope="module")
def built_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site as ``mkdocs build --strict`` writes it (about 10 s)."""
    site = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(site)],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return site


def _built_pages(site: Path) -> list[Path]:
    return sorted(p for p in site.rglob("*.html") if not p.relative_to(site).parts[0] == "assets")


_EXTERNAL = re.compile(r"^(https?:)?//", re.IGNORECASE)
# raw TeX, an RST role, an unresolved cross-reference ([title][ctxpred.x]) or an ASCII dash
_RAW = re.compile(r"\\\(|\\\[|:(class|func|meth|math|mod|attr|exc|data):`|\]\[[\w.]+\]|\w -- \w")


def test_site_loads_nothing_from_the_network(built_site: Path) -> None:
    pages = _built_pages(built_site)
    assert len(pages) >= 10
    external, missing = [], []
    for page in pages:
        scan = _PageScan()
        scan.feed(page.read_text())
        external += [f"{page.relative_to(built_site)}: {url}"
                     for url in scan.scripts + scan.stylesheets + scan.images
                     if _EXTERNAL.match(url)]
        missing += [f"{page.relative_to(built_site)}: {url}" for url in scan.images
                    if not _EXTERNAL.match(url) and not (page.parent / url).resolve().is_file()]
    assert not external, "pages load scripts, stylesheets or images from the network:\n" + (
        "\n".join(external))
    assert not missing, "images missing from the site (run the command that draws them):\n" + (
        "\n".join(missing))
    # the math renderer is part of the site, fonts included
    mathjax = built_site / "javascripts/mathjax"
    assert (mathjax / "tex-chtml.js").stat().st_size > 100_000
    assert len(list((mathjax / "output/chtml/fonts/woff-v2").glob("*.woff"))) > 10


def test_site_text_has_no_raw_tex_or_rst_roles(built_site: Path) -> None:
    """Outside code and the math elements that MathJax typesets, no ``\\(``, ``\\[`` or role."""
    raw, math_pages = [], 0
    for page in _built_pages(built_site):
        scan = _PageScan()
        scan.feed(page.read_text())
        math_pages += scan.math > 0
        if scan.math:
            assert any(s.endswith("javascripts/mathjax/tex-chtml.js") for s in scan.scripts), page
        text = "".join(scan.text)
        raw += [f"{page.relative_to(built_site)}: ...{text[max(0, m.start() - 40):m.end() + 40]}..."
                for m in _RAW.finditer(text)]
    assert math_pages >= 3, "the method and API pages have formulas: arithmatex found none"
    assert not raw, "raw TeX, RST roles, unresolved references or ' -- ' in the text:\n" + (
        "\n".join(raw))


def test_every_public_name_is_rendered_on_an_api_page(built_site: Path) -> None:
    """Each name of the public modules' ``__all__`` has its entry (an anchor at its canonical
    path) on an API page: a ``members:`` list or filter that drops one fails here."""
    import inspect

    anchors = set()
    for page in (built_site / "api").rglob("index.html"):
        anchors |= set(re.findall(r'id="(ctxpred\.[\w.]+)"', page.read_text()))
    modules = ["ctxpred", "ctxpred.functional", "ctxpred.attach", "ctxpred.loss", "ctxpred.heads",
               "ctxpred.neighborhoods", "ctxpred.wasserstein", "ctxpred.errors"]
    missing = []
    for name in modules:
        module = importlib.import_module(name)
        for attr in module.__all__:
            obj = getattr(module, attr)
            if inspect.ismodule(obj) or attr == "__version__":
                continue
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__module__.startswith(
                    "ctxpred"):
                path = f"{obj.__module__}.{obj.__qualname__}"
            else:  # constants and type aliases: documented where they are defined
                path = f"{name}.{attr}"
            if path not in anchors:
                missing.append(f"{name}.{attr} ({path})")
    functional = importlib.import_module("ctxpred.functional")
    missing += [f"ctxpred.functional.{n} (functional page)" for n in functional.__all__
                if f"ctxpred.functional.{n}" not in anchors]
    assert not missing, "public names without an entry on an API page:\n" + "\n".join(missing)
    dunders = sorted(a for a in anchors if re.search(r"\.__\w+__$", a))
    assert not dunders, f"API pages render module internals: {dunders}"


def test_page_scan_sees_external_assets_and_raw_text() -> None:
    scan = _PageScan()
    scan.feed('<link rel="stylesheet" href="https://cdn/x.css"><script src="//cdn/m.js"></script>'
              '<p>a \\(x\\) <code>\\(ok\\)</code><span class="arithmatex">\\(ok\\)</span>'
              '<br>:class:`Y` [<code>a</code>][ctxpred.a] b -- c</p>')
    assert scan.scripts == ["//cdn/m.js"] and scan.stylesheets == ["https://cdn/x.css"]
    assert all(_EXTERNAL.match(u) for u in scan.scripts + scan.stylesheets)
    assert not _EXTERNAL.match("../assets/javascripts/bundle.js")
    assert [m.group(0) for m in _RAW.finditer("".join(scan.text))] == [
        "\\(", ":class:`", "][ctxpred.a]", "b -- c"]


if __name__ == "__main__":
    # from the repository root (so that its ctxpred is imported, not an installed one):
    # python -m tests.test_docs docs/tutorials/unet2d.md ...  writes the pages' output blocks
    for arg in sys.argv[1:]:
        update_outputs(Path(arg).resolve())
        print(f"updated the output blocks of {arg}")


def test_loss_scale_table_reads_the_latest_demo_run(tmp_path: Path) -> None:
    """``docs/loss_scale.py`` reads the most recent checkpoint of each run (an older
    configuration's checkpoint may sit beside it) and names its timestep weighting."""
    spec = importlib.util.spec_from_file_location("loss_scale", ROOT / "docs" / "loss_scale.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    folder = tmp_path / "checkpoints"
    folder.mkdir()

    def save(name: str, tag: str, weight: float, loss: float, mtime: int,
             weighting: str = "none") -> None:
        history = [{"point_loss": 0.1, "context_loss": loss}] * 4
        context = {"weight": weight, "timestep_weighting": weighting} if name != "baseline" \
            else None
        path = folder / f"{name}-{tag}.pt"
        torch.save({"config": {"context": context}, "step": 4, "history": history}, path)
        os.utime(path, (mtime, mtime))

    save("baseline", "0000", 0.0, 0.0, 1000)
    save("context", "aaaa", 0.3, 0.06, 2000, "snr")  # newer, but its name sorts first
    save("context", "ffff", 0.1, 0.01, 1500)
    text = module.table(tmp_path, tail=4)
    assert "λ = 0.3" in text and "'snr'" in text and "| 0.0600 |" in text
