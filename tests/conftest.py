"""Test session setup: the separate-process markers and the array-backend fixture."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from kvarray.xp import cupy_unavailable_reason

CUDASIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """cudasim tests need the simulator switched on for the whole process, and ptx tests need it off."""
    for item in items:
        if "cudasim" in item.keywords and not CUDASIM:
            item.add_marker(
                pytest.mark.skip(
                    reason="CUDA simulator tests run in their own process: "
                    "NUMBA_ENABLE_CUDASIM=1 pytest -m cudasim (tests/run.sh does)"
                )
            )
        if "ptx" in item.keywords and CUDASIM:
            item.add_marker(
                pytest.mark.skip(reason="compile_ptx does not work while the CUDA simulator is on")
            )
        if "gpu" in item.keywords and cupy_unavailable_reason():
            item.add_marker(pytest.mark.skip(reason=f"no usable CUDA device: {cupy_unavailable_reason()}"))


def _backends() -> list:
    reason = cupy_unavailable_reason()
    return [
        pytest.param("numpy", id="numpy"),
        pytest.param("cupy", id="cupy", marks=pytest.mark.skipif(bool(reason), reason=reason or "usable")),
    ]


@pytest.fixture(params=_backends())
def xp(request: pytest.FixtureRequest):
    """The array namespace under test: NumPy always, CuPy where a CUDA device is usable."""
    if request.param == "numpy":
        return np
    import cupy

    return cupy


@pytest.fixture(scope="session")
def import_path() -> Callable[[str, Path], ModuleType]:
    """``import_path(name, path)``: the Python file `path`, outside any package (benchmarks/, docs/examples/),
    imported as module `name` (registered in ``sys.modules``: dataclasses look their module up)."""

    def load(name: str, path: Path) -> ModuleType:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    return load
