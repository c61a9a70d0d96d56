"""MkDocs hook: serve MathJax from the site itself, so formulas render with no network.

MathJax 3 comes from the PyPI package ``django-static-mathjax`` (import name ``mathjax``; it is in
the ``docs`` extra of ``pyproject.toml``, so ``pip install -e ".[docs]"`` is all a fresh clone
needs, no npm). At build time this hook adds to the site, under ``javascripts/mathjax/``, the
parts that ``tex-chtml.js`` loads:

* ``tex-chtml.js``: TeX input, HTML output, the menu;
* ``output/chtml/fonts/woff-v2/``: the math fonts, fetched relative to the script's own URL;
* ``input/tex/extensions/``: TeX extensions that the ``autoload`` package fetches on first use.

``mkdocs.yml`` lists ``javascripts/mathjax.js`` (the configuration) before
``javascripts/mathjax/tex-chtml.js``. ``tests/test_docs.py`` builds the site and fails if any
page references a script or stylesheet outside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

SITE_DIR = "javascripts/mathjax"
PARTS = ("tex-chtml.js", "output/chtml/fonts/woff-v2", "input/tex/extensions")


def mathjax_root() -> Path:
    """The ``es5`` folder of the installed MathJax 3 (package ``django-static-mathjax``)."""
    try:
        import mathjax  # django-static-mathjax's import name
    except ImportError as err:
        raise PluginError(
            "MathJax is not installed: the docs need the PyPI package django-static-mathjax "
            "(pip install -e '.[docs]')"
        ) from err
    root = Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
    if not (root / "tex-chtml.js").is_file():
        raise PluginError(f"{root} has no tex-chtml.js: reinstall django-static-mathjax>=3.2")
    return root


def on_files(files: Files, *, config: Any, **_: Any) -> Files:
    """MkDocs event: add MathJax's files to the site (also under ``mkdocs serve``)."""
    root = mathjax_root()
    for part in PARTS:
        path = root / part
        sources = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for source in sources:
            uri = f"{SITE_DIR}/{source.relative_to(root).as_posix()}"
            files.append(File.generated(config, uri, abs_src_path=str(source)))
    return files
