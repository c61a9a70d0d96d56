#!/usr/bin/env python3
"""ctxpred's task runner: every set-up step behind one command, needing only Python.

    python3 run.py demo [demo options]   # train the reference model with and without context
                                         # prediction on bundled data and print the report
    python3 run.py test                  # ruff + the whole pytest suite + `mkdocs build --strict`
    python3 run.py docs                  # live preview of the documentation site (mkdocs serve)
    python3 run.py bench NAME [options]  # run benchmarks/NAME.py (estimators, launches,
                                         # overhead, quality)

On first use it creates ``.venv`` beside this file and installs the project with its ``dev``
extra. PyTorch is installed first, as ``torch==2.13.0`` (the CPU build), unless the venv already
has a torch; set ``TORCH_SPEC`` (e.g. ``TORCH_SPEC="torch==2.13.0 --index-url ..."``) to choose
another build for a GPU. Re-installation happens only when ``pyproject.toml`` changes.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / ("python.exe" if os.name == "nt" else "python")
STAMP = VENV / ".ctxpred-installed"


def _sh(cmd: list[str], **kw) -> None:
    print("+", " ".join(shlex.quote(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, **kw)


def ensure_venv() -> None:
    """Create .venv and install the project (idempotent, keyed by pyproject.toml's hash)."""
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text().strip() == want and PY.exists():
        return
    if not PY.exists():
        _sh([sys.executable, "-m", "venv", str(VENV)])
    has_torch = subprocess.run([str(PY), "-c", "import torch"], capture_output=True).returncode == 0
    if not has_torch:
        spec = os.environ.get("TORCH_SPEC", "torch==2.13.0")
        _sh([str(PY), "-m", "pip", "install", *shlex.split(spec)])
    _sh([str(PY), "-m", "pip", "install", "-e", ".[dev]"])
    STAMP.write_text(want)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(__doc__)
        return 0
    task, rest = argv[0], argv[1:]
    ensure_venv()
    env = dict(os.environ)
    env.setdefault("PYTHONPATH", str(ROOT))
    env.setdefault("NO_MKDOCS_2_WARNING", "1")  # mkdocs-material prints an end-of-life banner
    if task == "test":
        _sh([str(PY), "-m", "ruff", "check", "."], env=env)
        _sh([str(PY), "-m", "pytest", *rest], env=env)
        _sh([str(PY), "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir",
             str(ROOT / "site")], env=env)
    elif task == "demo":
        _sh([str(PY), "-m", "reference_models.demo", *rest], env=env)
    elif task == "docs":
        _sh([str(PY), "-m", "mkdocs", "serve", *rest], env=env)
    elif task == "bench":
        if not rest:
            print("usage: python3 run.py bench NAME [options]  (NAME in benchmarks/)")
            return 2
        _sh([str(PY), str(ROOT / "benchmarks" / f"{rest[0]}.py"), *rest[1:]], env=env)
    else:
        print(f"unknown task {task!r}; expected one of demo, test, docs, bench")
        return 2
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except subprocess.CalledProcessError as err:
        sys.exit(err.returncode or 1)
