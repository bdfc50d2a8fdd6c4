"""Array backends: the only module that imports CuPy.

kvarray keeps its caches in plain arrays: NumPy on the host, CuPy on a CUDA device. This module finds the
namespace of an array, picks the default backend, moves arrays to the host, and accepts any DLPack
producer (torch, JAX, NumPy, CuPy) without a copy where DLPack allows one.

The default backend is CuPy when a CUDA device is usable and NumPy otherwise; set the environment
variable ``KVARRAY_BACKEND=numpy`` or ``KVARRAY_BACKEND=cupy`` to choose.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType
from typing import Any

import numpy as np

from .errors import BackendUnavailable, DeviceMismatch, DTypeMismatch

BACKEND_ENV = "KVARRAY_BACKEND"
BACKENDS = ("numpy", "cupy")


@functools.lru_cache(maxsize=1)
def _cupy_status() -> tuple[ModuleType | None, str]:
    """``(cupy, "")`` when CuPy imports and sees a CUDA device, else ``(None, why_not)``; memoized."""
    try:
        import cupy  # noqa: PLC0415 - the one place kvarray imports CuPy
    except Exception as exc:  # ImportError, or a broken CUDA installation raising on import
        return None, f"CuPy is not importable ({type(exc).__name__}: {exc}); install kvarray[gpu]"
    try:
        if not cupy.cuda.is_available():
            return None, "CuPy is installed but no CUDA device is usable (cupy.cuda.is_available() is False)"
        cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return None, f"CuPy cannot reach a CUDA device ({type(exc).__name__}: {exc})"
    return cupy, ""


def cupy_unavailable_reason() -> str:
    """Why CuPy cannot be used here, or "" when it can."""
    return _cupy_status()[1]


def require_cupy() -> ModuleType:
    """The CuPy module; raises `BackendUnavailable` naming the reason when no CUDA device is usable."""
    cupy, why = _cupy_status()
    if cupy is None:
        raise BackendUnavailable(f"the cupy backend was requested but cannot be used: {why}")
    return cupy


def get_namespace(name: str) -> ModuleType:
    """The array module for a backend name, "numpy" or "cupy"."""
    if name == "numpy":
        return np
    if name == "cupy":
        return require_cupy()
    raise BackendUnavailable(f"unknown array backend {name!r}; expected one of {', '.join(BACKENDS)}")


def default_namespace() -> ModuleType:
    """The backend new caches use: `KVARRAY_BACKEND` if set, else CuPy with a usable device, else NumPy."""
    chosen = os.environ.get(BACKEND_ENV, "").strip().lower()
    if chosen:
        return get_namespace(chosen)
    cupy, _ = _cupy_status()
    return cupy if cupy is not None else np


def is_device_array(x: Any) -> bool:
    """True for arrays in CUDA device memory (CuPy, Numba device arrays, anything with
    ``__cuda_array_interface__``), False for host arrays."""
    return hasattr(x, "__cuda_array_interface__")


def array_namespace(*arrays: Any) -> ModuleType:
    """The namespace (`numpy` or `cupy`) of the given arrays; all must live on the same side.

    Raises `DeviceMismatch` when host and device arrays are mixed.
    """
    on_device = {is_device_array(a) for a in arrays if a is not None}
    if len(on_device) > 1:
        raise DeviceMismatch("arrays of one call are split between host memory and a CUDA device")
    if on_device == {True}:
        return require_cupy()
    return np


def to_numpy(x: Any) -> np.ndarray:
    """A NumPy array with the values of `x` (copied from the device when `x` is on a CUDA device).

    Host arrays of any DLPack producer come back without a copy where DLPack allows.
    """
    if isinstance(x, np.ndarray):
        return x
    if is_device_array(x):
        if hasattr(x, "get"):  # CuPy
            return x.get()
        if hasattr(x, "copy_to_host"):  # Numba device array
            return x.copy_to_host()
        return require_cupy().asarray(x).get()
    return from_dlpack(x, np)


def from_dlpack(x: Any, xp: ModuleType | None = None) -> Any:
    """An array of namespace `xp` (default: the side `x` lives on) viewing the memory of `x`.

    Accepts NumPy and CuPy arrays, torch tensors, JAX arrays and any other DLPack producer. No copy is made
    when `x` already lives where `xp` computes; a host tensor asked for on the device (or the reverse) is
    copied. Raises `DTypeMismatch` for arrays whose dtype NumPy cannot represent (bfloat16, for one).
    """
    if xp is None:
        xp = require_cupy() if is_device_array(x) or _dlpack_on_device(x) else np
    if xp is np:
        if isinstance(x, np.ndarray):
            return x
        if is_device_array(x) or _dlpack_on_device(x):
            return to_numpy(require_cupy().from_dlpack(x))
        if hasattr(x, "__dlpack__"):
            try:
                return np.from_dlpack(x)
            except (BufferError, TypeError, RuntimeError):
                pass  # e.g. a tensor that requires grad, or an old producer: fall back to the buffer protocol
        try:
            if hasattr(x, "detach"):  # torch tensors that refuse DLPack (requires_grad)
                return x.detach().numpy()
            return np.asarray(x)
        except (TypeError, BufferError, RuntimeError) as exc:  # e.g. bfloat16: no NumPy equivalent
            raise DTypeMismatch(
                f"cannot view a {type(x).__name__} of dtype {getattr(x, 'dtype', '?')} "
                f"as a NumPy array: {exc}"
            ) from exc
    cupy = require_cupy()
    if xp is not cupy:
        raise DeviceMismatch(f"unknown array namespace {getattr(xp, '__name__', xp)!r}")
    if isinstance(x, cupy.ndarray):
        return x
    if is_device_array(x) or _dlpack_on_device(x):
        return cupy.from_dlpack(x) if hasattr(x, "__dlpack__") else cupy.asarray(x)
    return cupy.asarray(from_dlpack(x, np))


_KDLCUDA = (2, 13)  # DLPack device types: kDLCUDA, kDLCUDAManaged


def _dlpack_on_device(x: Any) -> bool:
    """True when `x` is a DLPack producer whose memory is on a CUDA device."""
    device = getattr(x, "__dlpack_device__", None)
    if device is None:
        return False
    try:
        kind, _ = device()
    except Exception:
        return False
    return int(kind) in _KDLCUDA


def resident_zeros(xp: ModuleType, shape: tuple[int, ...], dtype: Any) -> Any:
    """A zero-filled array of namespace `xp` whose memory is resident now, not on first touch.

    `numpy.zeros` maps zero pages lazily, so the first write into each 4 KiB page of a large pool would take
    a page fault in the middle of a forward pass; pools are allocated once, so they pay for that up front.
    """
    if xp is np:
        out = np.empty(shape, dtype=dtype)
        out.fill(0)
        return out
    return xp.zeros(shape, dtype=dtype)
