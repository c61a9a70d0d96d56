"""Look at the docs site as a reader does: headless-Chromium screenshots of every page.

    python docs/screenshots.py                      # build the site, shoot every page at 1280 px
    python docs/screenshots.py --width 1024 --height 4000 --pages method api/loss
    python docs/screenshots.py --site-dir site      # shoot an already built site

It builds the site with ``mkdocs build --strict`` into a temporary folder (unless ``--site-dir``
is given), serves it on ``127.0.0.1`` and has headless Chromium (Debian: ``apt-get install
chromium``) load each page with every other host unreachable, as a reader without internet sees
it, then writes ``site-shots/<page>.png`` (``site-shots/`` is gitignored). A page is shot at the
window size (``--width`` x ``--height``); content below it is cut off, so use a tall window for
long pages. The pictures are for looking, not for CI: nothing is compared.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def find_chromium() -> str:
    """The path of a Chromium (or Chrome) binary, or exit with how to install one."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    sys.exit("no Chromium found: install one (Debian/Ubuntu: apt-get install chromium)")


def build_site(out: Path) -> None:
    """``mkdocs build --strict`` of the repository's site into ``out``."""
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
                    "--site-dir", str(out)], cwd=ROOT, check=True, env=env)


def pages(site: Path) -> list[str]:
    """The URL path of every page of a built site (``""`` for the home page)."""
    found = []
    for index in sorted(site.rglob("index.html")):
        rel = index.parent.relative_to(site).as_posix()
        if rel.startswith(("assets", "javascripts", "search")):
            continue
        found.append("" if rel == "." else rel)
    return found


@contextlib.contextmanager
def serve(site: Path) -> Iterator[str]:
    """Serve ``site`` on a free local port for the duration of the block; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def shoot(chromium: str, url: str, png: Path, width: int, height: int, wait_ms: int) -> None:
    """One screenshot of ``url`` into ``png``, with every host but 127.0.0.1 unreachable."""
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--no-first-run", f"--user-data-dir={profile}",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            f"--window-size={width},{height}", f"--virtual-time-budget={wait_ms}",
            f"--screenshot={png}", url,
        ], check=True, capture_output=True, timeout=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--site-dir", type=Path, help="a built site (default: build one now)")
    parser.add_argument("--out", type=Path, default=ROOT / "site-shots", help="output folder")
    parser.add_argument("--width", type=int, default=1280, help="window width in pixels")
    parser.add_argument("--height", type=int, default=2400, help="window height in pixels")
    parser.add_argument("--wait-ms", type=int, default=8000,
                        help="virtual time the page gets to run its scripts (MathJax)")
    parser.add_argument("--pages", nargs="*",
                        help="only these pages, e.g. method api/loss ('' is the home page)")
    args = parser.parse_args(argv)
    chromium = find_chromium()
    with contextlib.ExitStack() as stack:
        site = args.site_dir
        if site is None:
            site = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "site"
            build_site(site)
        base = stack.enter_context(serve(site))
        args.out.mkdir(parents=True, exist_ok=True)
        wanted = pages(site) if args.pages is None else [p.strip("/") for p in args.pages]
        for page in wanted:
            png = args.out / f"{page.replace('/', '_') or 'index'}.png"
            shoot(chromium, base + (page + "/" if page else ""), png, args.width, args.height,
                  args.wait_ms)
            print(png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
