"""Suite-wide pytest set-up (applies to tests/ and to the docstring examples in ctxpred/).

The tests use tiny tensors, for which intra-op threads only add synchronization cost (and on a
shared 2-core machine, contention): every test runs with one torch thread.

``device`` and ``dtype`` fixtures (kornia style): a test that takes ``device`` runs once per
device, a test that takes ``dtype`` once per floating dtype. The defaults run every device
present (``cpu``, plus ``cuda`` when a GPU is visible) and ``float32``; choose with

* ``--device cpu`` / ``--device cuda`` / ``--device cpu,cuda`` / ``--device all`` (the default,
  every device present);
* ``--dtype float32`` (default) / ``--dtype float16,bfloat16,float32,float64`` / ``--dtype all``.

A device named explicitly but absent is skipped, not silently dropped: the skip is reported.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

torch.set_num_threads(1)

# The Triton program imports triton at module level (solver="triton" imports it only when used):
# where triton is absent there is nothing in it to collect.
collect_ignore = (
    [] if importlib.util.find_spec("triton") else ["ctxpred/wasserstein/_triton_kernel.py"]
)

_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


def _available_devices() -> list[str]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    return devices


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ctxpred")
    group.addoption(
        "--device", action="store", default="all",
        help="devices for the `device` fixture: 'all' (every device present; default), or a "
             "comma-separated list such as 'cpu', 'cuda', 'cpu,cuda'",
    )
    group.addoption(
        "--dtype", action="store", default="float32",
        help="dtypes for the `dtype` fixture: 'float32' (default), 'all', or a comma-separated "
             "list of float16, bfloat16, float32, float64",
    )


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _uses_root_fixture(metafunc: pytest.Metafunc, name: str) -> bool:
    """The test asks for ``name`` and gets this file's fixture (a test module may define its
    own ``device`` / ``dtype`` fixture, which then wins and is left alone)."""
    if name not in metafunc.fixturenames:
        return False
    definitions = metafunc._arg2fixturedefs.get(name) or ()
    return bool(definitions) and definitions[-1].baseid == ""


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    config = metafunc.config
    if _uses_root_fixture(metafunc, "device"):
        option = config.getoption("--device")
        names = _available_devices() if option == "all" else _split(option)
        metafunc.parametrize("device", names, indirect=True, ids=names)
    if _uses_root_fixture(metafunc, "dtype"):
        option = config.getoption("--dtype")
        names = list(_DTYPES) if option == "all" else _split(option)
        unknown = sorted(set(names) - set(_DTYPES))
        if unknown:
            raise pytest.UsageError(f"--dtype: unknown {unknown}; choose from {list(_DTYPES)}")
        metafunc.parametrize("dtype", names, indirect=True, ids=names)


@pytest.fixture
def device(request: pytest.FixtureRequest) -> torch.device:
    """The ``torch.device`` of this test run (see the module docstring)."""
    name = getattr(request, "param", "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("--device cuda asked for, but no CUDA device is visible")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise pytest.UsageError(f"--device: unknown device {name!r}; use cpu and/or cuda")
    return torch.device(name)


@pytest.fixture
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    """The floating dtype of this test run (see the module docstring)."""
    return _DTYPES[getattr(request, "param", "float32")]
