"""Entry guards of the caches: one thread at a time, the argument checks every entry point shares, and the
undo records that make a multi-step operation all-or-nothing.

- `exclusive` / `exclusive_checked` decorate public cache methods: a non-blocking re-entrant lock refuses
  a second thread with `ConcurrentUse` (the same thread may nest calls); `exclusive_checked` also runs
  an argument check first and, for a method that writes, an undo hook when the body fails halfway.
- `as_int`, `seq_id`, `position`, `check_batch_values` refuse what would otherwise be truncated or wrap
  around: bools, floats, integers outside int64, unsigned ids past int64, positions past `MAX_POSITION`.
- `check_finite` refuses keys or values holding NaN or infinity (the host scan is `kvarray.finite`: a few
  microseconds for a decode step's ``[64, 8, 64]`` float16 rows; docs/reliability.md has the figures).
- `RowBackup` keeps copies of the pool rows an operation overwrites and writes them back on failure, with
  plain array indexing (never through the kernel that just failed); `BookkeepingUndo` does the same for
  the cells' bookkeeping.

Shapes: T tokens of a batch, R rows, N pool rows.
"""

from __future__ import annotations

import functools
import inspect
import operator
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from .errors import (
    ConcurrentUse,
    DTypeMismatch,
    IndexOutOfRange,
    KVArrayError,
    NonFiniteValues,
    PositionError,
)
from .xp import array_namespace, is_device_array

__all__ = [
    "MAX_POSITION", "BookkeepingUndo", "RowBackup", "as_int", "as_int_array", "check_batch_values",
    "check_finite", "check_finite_kv", "check_layer_type", "exclusive", "exclusive_checked", "new_guard",
    "position", "seq_id",
]

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: Token positions lie in ``[0, MAX_POSITION)``, so a position plus any delta or window stays in int64.
MAX_POSITION = 2**62

F = TypeVar("F", bound=Callable[..., Any])


# ---- one thread at a time ---------------------------------------------------------------------------
def new_guard() -> Any:
    """The lock a cache keeps as ``self._guard`` for `exclusive` (re-entrant: a method may call another)."""
    return threading.RLock()


def _refuse(method: Callable[..., Any]) -> ConcurrentUse:
    return ConcurrentUse(
        f"{method.__qualname__} was called while another thread is inside this cache; a cache serves one "
        "thread at a time: share it behind your own lock, or give each thread its own cache"
    )


def exclusive(method: F) -> F:
    """Decorate a public cache method: refuse with `ConcurrentUse` while another thread is inside the cache.

    The lock is taken without waiting (``acquire(blocking=False)``), so a refused call changes nothing and
    never blocks. The wrapper has the method's own parameter list (`_wrap`): about 0.2 microseconds a
    call, where a ``*args, **kwargs`` wrapper costs twice that (docs/reliability.md).
    """
    return _wrap(method, None, None)


def exclusive_checked(
    check: Callable[..., None], on_fault: Callable[[Any], None] | None = None
) -> Callable[[F], F]:
    """Like `exclusive`, with ``check(self, <the method's arguments>)`` run first (it raises a
    `KVArrayError` to refuse the call). With `on_fault`, a body that raises anything but a `KVArrayError`
    (those are raised before anything is written, by contract) calls ``on_fault(self)`` to undo what it
    did, then the exception propagates unchanged."""

    def decorate(method: F) -> F:
        return _wrap(method, check, on_fault)

    return decorate


_WRAPPER = """
def {name}({params}):
    guard = {self}._guard
    if not guard.acquire(False):
        raise refuse(method)
    try:
{body}
    finally:
        guard.release()
"""
_CALL = "        return method({args})"
_CHECK = "        check({args})\n"
_UNDO = """        try:
            return method({args})
        except KVArrayError:
            raise
        except BaseException:
            on_fault({self})
            raise"""


def _wrap(method: F, check: Callable[..., None] | None, on_fault: Callable[[Any], None] | None) -> F:
    """The guarded wrapper of `method`, written with the method's own parameters (defaults included) so
    that calling it costs one plain Python call plus the lock (a ``*args, **kwargs`` wrapper pays for
    packing and unpacking the arguments on every call)."""
    params, args, defaults = [], [], {}
    star = False
    for i, p in enumerate(inspect.signature(method).parameters.values()):
        if p.kind is p.VAR_POSITIONAL:
            params.append(f"*{p.name}")
            args.append(f"*{p.name}")
            star = True
            continue
        if p.kind is p.VAR_KEYWORD:
            params.append(f"**{p.name}")
            args.append(f"**{p.name}")
            continue
        if p.kind is p.KEYWORD_ONLY and not star:
            params.append("*")
            star = True
        text = p.name
        if p.default is not p.empty:
            defaults[f"_default{i}"] = p.default
            text = f"{p.name}=_default{i}"
        params.append(text)
        args.append(f"{p.name}={p.name}" if p.kind is p.KEYWORD_ONLY else p.name)
    me, joined = params[0], ", ".join(args)
    body = (_CHECK.format(args=joined) if check is not None else "") + (
        _UNDO.format(args=joined, self=me) if on_fault is not None else _CALL.format(args=joined))
    source = _WRAPPER.format(name=method.__name__, params=", ".join(params), self=me, body=body)
    namespace: dict[str, Any] = {"method": method, "check": check, "on_fault": on_fault, "refuse": _refuse,
                                 "KVArrayError": KVArrayError, **defaults}
    exec(compile(source, f"<kvarray.guard wrapper of {method.__qualname__}>", "exec"), namespace)
    return functools.update_wrapper(namespace[method.__name__], method)  # type: ignore[return-value]


# ---- integers that must not be truncated or wrap around ---------------------------------------------
def as_int(name: str, value: object, lo: float = INT64_MIN, hi: float = INT64_MAX,
           error: type[KVArrayError] = IndexOutOfRange) -> int:
    """`value` as a Python int in ``[lo, hi]`` (``-math.inf``, ``math.inf``: unbounded).

    Raises `DTypeMismatch` for anything that is not an integer (bools and floats included, so ``1.5`` is
    never truncated to 1 and ``True`` never read as 1), `error` (default `IndexOutOfRange`) outside
    ``[lo, hi]``.
    """
    if isinstance(value, (bool, np.bool_)):
        raise DTypeMismatch(f"{name} must be an integer, got the bool {value!r}")
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise DTypeMismatch(f"{name} must be an integer, got {value!r} ({type(value).__name__})") from None
    if not lo <= number <= hi:
        raise error(f"{name} must be in [{lo}, {hi}], got {number}")
    return number


def check_layer_type(layer: object) -> None:
    """Refuse a bool layer index (``True`` would read as layer 1) with `IndexOutOfRange`; the caches'
    `check_layer` checks the range."""
    if isinstance(layer, (bool, np.bool_)):
        raise IndexOutOfRange(f"layer must be an integer, got the bool {layer!r}")


def seq_id(value: object, name: str = "seq") -> int:
    """A sequence id: any integer that fits int64 (`DTypeMismatch`, `IndexOutOfRange` otherwise)."""
    return as_int(name, value)


def position(name: str, value: object, lo: int = 0) -> int:
    """A position (or a count of positions) in ``[lo, MAX_POSITION)``; `PositionError` outside it."""
    return as_int(name, value, lo, MAX_POSITION - 1, PositionError)


def as_int_array(name: str, values: Any) -> np.ndarray:
    """`values` (a scalar, a sequence or a host array of integers) as a flat int64 array ``[n]``.

    Raises `DTypeMismatch` for anything but integers (bools and floats included: nothing is truncated)
    and `IndexOutOfRange` for values outside int64 (unsigned ids past ``2**63 - 1`` never wrap around).
    """
    if is_device_array(values):
        raise DTypeMismatch(f"{name} must be host integers (a list or a NumPy array), got a device array")
    try:
        arr = np.asarray(values)
    except (TypeError, ValueError, OverflowError) as exc:
        raise DTypeMismatch(f"{name} must be integers: {exc}") from None
    if arr.size and arr.dtype.kind not in "iu":
        raise DTypeMismatch(f"{name} must be integers, got {arr.dtype} values")
    arr = arr.reshape(-1)
    if arr.size and arr.dtype.kind == "u" and int(arr.max()) > INT64_MAX:
        raise IndexOutOfRange(f"{name} must fit int64 ([{INT64_MIN}, {INT64_MAX}]), got {int(arr.max())}")
    return arr.astype(np.int64)


def check_batch_values(seq_ids: Any, positions: Any) -> None:
    """Refuse the batch values that `kvarray.batch.group_batch` would wrap around: unsigned ``seq_ids``
    past int64 (`IndexOutOfRange`) and ``positions [T]`` at or past `MAX_POSITION` (`PositionError`).

    Host arrays and sequences only (device arrays are read by `group_batch` itself); shapes and dtypes
    are left to `group_batch`. O(T).
    """
    for name, values in (("seq_ids", seq_ids), ("positions", positions)):
        if is_device_array(values):
            continue
        try:
            arr = values if isinstance(values, np.ndarray) else np.asarray(values)
        except (TypeError, ValueError, OverflowError):
            continue  # ragged or odd input: group_batch says what it expected
        if arr.size == 0 or arr.dtype.kind not in "iu":
            continue
        if name == "seq_ids" and arr.dtype.kind == "i":
            continue  # signed integers fit int64
        top = int(arr.max())
        if name == "seq_ids" and top > INT64_MAX:
            raise IndexOutOfRange(f"seq_ids must fit int64 ([{INT64_MIN}, {INT64_MAX}]), got {top}")
        if name == "positions" and top >= MAX_POSITION:
            raise PositionError(f"positions must lie in [0, {MAX_POSITION}), got {top}")


# ---- finite keys and values ---------------------------------------------------------------------------
_FLOATS = (np.dtype(np.float16), np.dtype(np.float32))


@functools.cache
def _host_scan() -> Callable[..., int]:
    """`kvarray.finite.host_nonfinite`, imported on the first check (it loads Numba)."""
    from .finite import host_nonfinite

    return host_nonfinite


def check_finite(name: str, arr: Any, other: tuple[str, Any] | None = None) -> None:
    """Raise `NonFiniteValues` when the float16/float32 array `arr` (rows ``[R, ...]``, host or device), or
    the array of ``other = (name, array)``, holds NaN or infinity; other dtypes are left to the dtype
    checks. Two host arrays cost one scan call; a device array costs one reduction and a synchronisation."""
    named = [(name, arr)] if other is None else [(name, arr), other]
    host = []
    for label, values in named:
        if values.dtype not in _FLOATS or values.size == 0:
            continue
        if type(values) is np.ndarray:
            host.append((label, values))
        elif is_device_array(values):
            if not bool(array_namespace(values).isfinite(values).all()):
                raise _nonfinite(label, None)
        else:
            host.append((label, np.asarray(values)))
    if host:
        bad = _host_scan()(*(values for _, values in host))
        if bad >= 0:
            raise _nonfinite(*host[bad])


def check_finite_kv(keys: Any, values: Any, which: tuple[bool, bool]) -> None:
    """`check_finite` of a write's ``keys`` and/or ``values`` (``which``: check keys, check values), in one
    scan when both are checked host arrays."""
    named = [(n, a) for n, a, check in zip(("keys", "values"), (keys, values), which, strict=True) if check]
    if named:
        check_finite(*named[0], *named[1:])


def _nonfinite(name: str, host: np.ndarray | None) -> NonFiniteValues:
    where = ""
    if host is not None and host.ndim:
        rows = ~np.isfinite(host).reshape(host.shape[0], -1).all(axis=1)
        where = f" in row {int(np.flatnonzero(rows)[0])}"
    return NonFiniteValues(
        f"{name} must be finite: NaN or infinity found{where}; the cache stores finite values only "
        "(an int8 pool cannot represent them, and one would spread through attention)"
    )


# ---- undo records -------------------------------------------------------------------------------------
class BookkeepingUndo:
    """A cache's bookkeeping as it was, put back when an operation fails after it started changing it.

    Works on a `kvarray.cells.Cells` (anything with ``checkpoint()``, ``rollback(point)`` and a
    ``generation``): the checkpoint is O(capacity) host integers; after `restore`, the generation is the
    old one again, so the plan that was current is current again (the bookkeeping is the same, down to the
    slots of the cell tables that its page table reads).
    """

    __slots__ = ("cells", "point", "generation")

    def __init__(self, cells: Any) -> None:
        self.cells = cells
        self.point = cells.checkpoint()
        self.generation = cells.generation

    def restore(self) -> None:
        """Put the bookkeeping back as it was at construction."""
        self.cells.rollback(self.point)
        self.cells.generation = self.generation


class RowBackup:
    """Copies of rows ``rows [R]`` of several arrays ``[N, ...]`` (pools, scales), for `restore`.

    Taken before an operation overwrites those rows; `restore` writes them back with plain indexing
    (``array[rows] = copy``), so undoing never runs the kernel that failed.
    """

    __slots__ = ("arrays", "rows", "saved")

    def __init__(self, arrays: Sequence[Any], rows: Any) -> None:
        self.arrays = list(arrays) if len(rows) else []
        self.rows = rows
        self.saved = [a[rows] for a in self.arrays]

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return sum(int(s.nbytes) for s in self.saved)

    def restore(self) -> None:
        """Write the saved rows back into every array."""
        for arr, saved in zip(self.arrays, self.saved, strict=True):
            arr[self.rows] = saved
