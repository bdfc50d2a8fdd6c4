"""Binding cache buffers to an ONNX Runtime session through IO binding, without copies.

`Binder` wraps one `onnxruntime.IOBinding`:

- `bind_input(name, array)`: a NumPy array becomes a CPU `OrtValue` over the array's own memory
  (``OrtValue.ortvalue_from_numpy`` wraps a C-contiguous array without copying: `is_zero_copy` checks it
  by pointer); a CuPy array (anything with ``__cuda_array_interface__``) is bound by its device pointer
  for the CUDA execution provider (``bind_input(name, "cuda", device_id, dtype, shape, ptr)``).
- `OutputBuffers`: outputs are written by the session into preallocated buffers (``[rows, ...]`` with a
  capacity in rows, grown when a pass needs more) bound as OrtValues over their first rows, so a step
  allocates nothing on the output side.
- rebinding per step costs only what changed: each name remembers the ``(pointer, shape, dtype)`` it is
  bound to, and binding the same memory again is a dictionary look-up.

The CUDA path is thin and untested here (no device): it refuses host arrays and needs ``onnxruntime-gpu``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from ..errors import DeviceMismatch, LayoutError

__all__ = ["Binder", "BoundArray", "OutputBuffers", "device_name", "is_zero_copy"]

#: the device names ONNX Runtime's IO binding uses
CPU, CUDA = "cpu", "cuda"


def device_name(array: Any) -> str:
    """``"cuda"`` for an array exposing ``__cuda_array_interface__`` (CuPy, numba device arrays), else
    ``"cpu"`` (NumPy)."""
    return CUDA if hasattr(array, "__cuda_array_interface__") else CPU


def is_zero_copy(value: ort.OrtValue, array: np.ndarray) -> bool:
    """True iff `value` reads `array`'s own memory (same data pointer; empty arrays count as shared)."""
    if array.size == 0:
        return True
    return int(value.data_ptr()) == int(array.ctypes.data)


@dataclass(frozen=True, slots=True)
class BoundArray:
    """What one name is bound to: the memory (pointer, shape, dtype) and the OrtValue over it (CPU)."""

    pointer: int
    shape: tuple[int, ...]
    dtype: np.dtype
    value: ort.OrtValue | None  # None for a CUDA binding by pointer
    array: Any  # kept alive while bound


def _key(array: Any) -> tuple[int, tuple[int, ...], np.dtype]:
    if device_name(array) == CUDA:
        pointer = int(array.__cuda_array_interface__["data"][0])
    else:
        pointer = int(array.ctypes.data)
    return pointer, tuple(int(n) for n in array.shape), np.dtype(array.dtype)


class Binder:
    """The IO binding of one session, rebinding a name only when its memory, shape or dtype changed.

    Args:
        session: the `onnxruntime.InferenceSession`.
        device: "cpu" or "cuda": where the session's inputs live (the execution provider's side).
        device_id: the CUDA device ordinal (ignored on the CPU).
    """

    def __init__(self, session: ort.InferenceSession, device: str = CPU, device_id: int = 0) -> None:
        if device not in (CPU, CUDA):
            raise DeviceMismatch(f"device must be 'cpu' or 'cuda', got {device!r}")
        self.session = session
        self.device = device
        self.device_id = int(device_id)
        self.io = session.io_binding()
        self._inputs: dict[str, BoundArray] = {}
        self._outputs: dict[str, BoundArray] = {}
        self.rebinds = 0  # bindings actually made (a counter for tests and overhead reports)

    def bind_input(self, name: str, array: Any) -> BoundArray:
        """Bind `array` (C-contiguous, NumPy on "cpu", device memory on "cuda") to input `name`.

        Returns the binding; a call with the memory, shape and dtype already bound does nothing. Raises
        `LayoutError` (not C-contiguous: a copy would be needed) or `DeviceMismatch` (host array for a
        CUDA session, or device array for a CPU one).
        """
        return self._bind(name, array, self._inputs, output=False)

    def bind_output(self, name: str, array: Any) -> BoundArray:
        """Bind `array` as the buffer the session writes output `name` into (its exact output shape)."""
        return self._bind(name, array, self._outputs, output=True)

    def bound(self, name: str) -> BoundArray | None:
        """The current binding of input or output `name`, or None."""
        return self._inputs.get(name) or self._outputs.get(name)

    def run(self, run_options: ort.RunOptions | None = None) -> None:
        """Run the session on the bound inputs into the bound outputs."""
        if self.device == CUDA:
            self.io.synchronize_inputs()
        self.session.run_with_iobinding(self.io, run_options)
        if self.device == CUDA:
            self.io.synchronize_outputs()

    def clear(self) -> None:
        """Forget every binding (the next binds are made afresh)."""
        self.io.clear_binding_inputs()
        self.io.clear_binding_outputs()
        self._inputs.clear()
        self._outputs.clear()

    def _bind(self, name: str, array: Any, table: dict[str, BoundArray], *, output: bool) -> BoundArray:
        old = table.get(name)
        if old is not None and old.array is array:  # the same array object: nothing to look up
            return old
        key = _key(array)
        if old is not None and (old.pointer, old.shape, old.dtype) == key:
            return old
        where = device_name(array)
        if where != self.device:
            raise DeviceMismatch(
                f"{name}: a {where} array cannot be bound to a session on {self.device!r} "
                f"(bind {'device memory (CuPy)' if self.device == CUDA else 'NumPy arrays'})"
            )
        if where == CPU:
            if not array.flags.c_contiguous:
                raise LayoutError(f"{name}: binding needs a C-contiguous array (a copy would be made)")
            value = ort.OrtValue.ortvalue_from_numpy(array)
            if output:
                self.io.bind_ortvalue_output(name, value)
            else:
                self.io.bind_ortvalue_input(name, value)
        else:
            value = None
            pointer, shape, dtype = key
            if output:
                self.io.bind_output(name, CUDA, self.device_id, dtype, list(shape), pointer)
            else:
                self.io.bind_input(name, CUDA, self.device_id, dtype, list(shape), pointer)
        bound = BoundArray(key[0], key[1], key[2], value, array)
        table[name] = bound
        self.rebinds += 1
        return bound


class OutputBuffers:
    """Preallocated output buffers ``[capacity, *row_shape]`` per name, handed out as their first rows.

    Args:
        xp: the array namespace (numpy, or cupy for a CUDA session).
        shapes: name -> (row shape, dtype), e.g. ``{"new_key.0": ((H, D), float32), "logits": ((V,), ...)}``.
        rows: initial capacity in rows; `view` grows a buffer (to the next power of two) when asked for more.
    """

    def __init__(self, xp: Any, shapes: dict[str, tuple[tuple[int, ...], Any]], rows: int = 64) -> None:
        self.xp = xp
        self.shapes = {name: (tuple(shape), np.dtype(dtype)) for name, (shape, dtype) in shapes.items()}
        self._buffers = {
            name: xp.empty((rows, *shape), dtype) for name, (shape, dtype) in self.shapes.items()
        }

    def view(self, name: str, rows: int) -> Any:
        """The first `rows` rows of `name`'s buffer ``[rows, *row_shape]`` (C-contiguous, no copy)."""
        buf = self._buffers[name]
        if buf.shape[0] < rows:
            shape, dtype = self.shapes[name]
            size = 1 << max(int(rows) - 1, 1).bit_length()
            buf = self._buffers[name] = self.xp.empty((size, *shape), dtype)
        return buf[:rows]

    def capacity(self, name: str) -> int:
        """Rows `name`'s buffer holds now."""
        return int(self._buffers[name].shape[0])
