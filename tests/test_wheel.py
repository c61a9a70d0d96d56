"""The install line works: build the wheel, install it in a clean virtual environment, run the
README's quick start there.

The new environment sees no repository: it is created with ``venv --without-pip`` in a temporary
folder and the code runs with ``python -I`` (no current directory, no ``PYTHONPATH``) from another
temporary folder. To avoid downloading PyTorch, a ``.pth`` file appends the test interpreter's
site-packages to its ``sys.path``: that gives it torch, numpy and pip, but never an
editable ctxpred, because the ``.pth`` files *inside* an appended folder are not processed (they
are where an editable install lives). The test checks that ``ctxpred`` is imported from the new
environment's own site-packages. About 20 s.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_quick_start() -> str:
    """The first ```python block under the README's "Quick start" heading."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "README.md has no ```python block under '## Quick start'"
    return match.group(1)


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME"}}
    env["PIP_NO_INDEX"] = "1"  # nothing is downloaded
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    tail = f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{tail}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # --no-build-isolation: the build backend (setuptools) comes from this environment, offline
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
          "-w", str(out), str(ROOT)], cwd=out)
    wheels = list(out.glob("ctxpred-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_holds_the_package_and_declares_the_extras(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "ctxpred/__init__.py" in names and "ctxpred/wasserstein/__init__.py" in names
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "reference_models/"))]
    metadata = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith(".dist-info/METADATA"))
    ).decode()
    assert "Provides-Extra: ot" in metadata
    assert re.search(r"Requires-Dist: pot.*extra == .ot.", metadata), metadata


def test_readme_quick_start_runs_from_the_installed_wheel(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = Path(_run([str(python), "-I", "-c", "import sysconfig; print(sysconfig.get_paths()"
                      "['purelib'])"], cwd=tmp_path).stdout.strip())
    (site / "_shared_torch.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([str(python), "-I", "-m", "pip", "install", "--no-deps", "-q", str(wheel)], cwd=tmp_path)

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = _run([str(python), "-I", "-c", "import ctxpred; print(ctxpred.__file__)"], cwd=work)
    location = Path(where.stdout.strip()).resolve()
    assert location.is_relative_to(site.resolve()), f"ctxpred imported from {location}"
    assert not location.is_relative_to(ROOT)

    script = work / "quick_start.py"
    script.write_text(readme_quick_start() + "\nprint('quick start ok')\n")
    done = _run([str(python), "-I", str(script)], cwd=work)
    assert "quick start ok" in done.stdout
