"""Cache state shared by every cache: the configuration record, pool copies and safetensors files.

A cache's `state_dict` is a flat ``{name: host NumPy array}``: ``meta.config`` (the configuration as
uint8 JSON, compared on load), the bookkeeping arrays and every pool. The helpers here build and check
the parts all caches have in common; each cache adds and checks its own bookkeeping. A failed check
raises `SpecMismatch` before anything is written.

Files (docs/reliability.md): `save_state` writes a temporary file next to the target, fsyncs it and
renames it over the target (`write_atomic`), so an interrupted save leaves the previous file as it was.
The metadata carries the cache kind, the layout version `STATE_FORMAT` and a SHA-256 of every tensor's
name, dtype, shape and bytes (`state_digest`); `load_state` checks all three (`StateFormatMismatch`,
`SpecMismatch`, `CorruptFile`). Files written before the checksum existed still load, checked by their
configuration, shapes and bookkeeping only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import struct
from collections.abc import Iterable, Iterator, Mapping
from types import ModuleType
from typing import IO, Any

import numpy as np

from .errors import CorruptFile, SpecMismatch, StateFormatMismatch
from .xp import to_numpy

#: Version of the `state_dict` / file layout.
STATE_FORMAT = 1
#: The `state_dict` key of the configuration record (uint8 JSON).
CONFIG_KEY = "meta.config"
#: Metadata strings of a cache file.
KIND_META, VERSION_META, CONFIG_META = "kvarray.kind", "kvarray.version", "kvarray.config"
FORMAT_META, CHECKSUM_META = "kvarray.format", "kvarray.sha256"

NamedArrays = Iterable[tuple[str, Any]]


def config_json(config: Mapping[str, Any]) -> str:
    """The configuration record as canonical JSON (sorted keys), ``format`` included."""
    return json.dumps({"format": STATE_FORMAT, **config}, sort_keys=True)


def config_array(config: str) -> np.ndarray:
    """``config`` (JSON) as the uint8 array stored under `CONFIG_KEY`."""
    return np.frombuffer(config.encode(), np.uint8).copy()


def check_config(state: Mapping[str, Any], ours: str, what: str) -> None:
    """Raise `SpecMismatch` unless ``state[CONFIG_KEY]`` is the configuration `ours` (JSON) of a `what`
    (`StateFormatMismatch` when only the layout version differs)."""
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise SpecMismatch(f"a {what} state must be a mapping of names (str) to arrays, got {state!r:.80}")
    config = state.get(CONFIG_KEY)
    if config is None:
        raise SpecMismatch(f"not a kvarray {what} state: {CONFIG_KEY} is missing")
    try:
        theirs = bytes(np.asarray(to_numpy(config), np.uint8)).decode()
        found = json.loads(theirs)
    except (TypeError, ValueError, OverflowError) as exc:  # not uint8 JSON text
        raise SpecMismatch(f"{CONFIG_KEY} of the {what} state is not a configuration record: {exc}") from None
    expected = json.loads(ours)
    if not isinstance(found, dict):
        raise SpecMismatch(f"{CONFIG_KEY} of the {what} state is not a configuration record: {theirs!r}")
    if found.get("format") != expected["format"]:
        raise StateFormatMismatch(expected["format"], found.get("format"), f"the {what} state")
    if found != expected:
        raise SpecMismatch(f"the state was made for {theirs}; this cache is {ours}")


def copy_pools(named: NamedArrays) -> dict[str, np.ndarray]:
    """Host copies of the named pools (device pools are copied to the host)."""
    return {name: np.array(to_numpy(arr), copy=True) for name, arr in named}


def check_cell_arrays(state: Mapping[str, np.ndarray]) -> str:
    """Why a causal state's ``cells.*`` arrays (prefix stripped) lack `Cells.export`'s dtypes and ranks, or
    "" (`Cells.check_state` checks the rest)."""
    for name, dtype in (("seq_ids", np.int64), ("seq_indptr", np.int64), ("seq_cells", np.int32)):
        arr = state.get(name)
        if arr is not None and (arr.dtype != dtype or arr.ndim != 1):
            return f"cells.{name} must be {np.dtype(dtype)} [n], got {arr.dtype} {tuple(arr.shape)}"
    return ""


def check_cell_positions(state: Mapping[str, np.ndarray], limit: int) -> str:
    """Why the positions of a causal state's owned cells are not in ``[0, limit)``, or "" (call after
    `Cells.check_state` accepted ``positions [N]`` and ``refs [N]``)."""
    owned = state["positions"][state["refs"] > 0]
    if owned.size and (owned.min() < 0 or owned.max() >= limit):
        return f"owned cells' positions must lie in [0, {limit})"
    return ""


def check_pools(state: Mapping[str, Any], named: NamedArrays) -> None:
    """Raise `SpecMismatch` unless `state` holds every named pool with its shape and dtype."""
    for name, arr in named:
        saved = state.get(name)
        try:
            found = (tuple(saved.shape), np.dtype(saved.dtype))  # type: ignore[union-attr]
        except (AttributeError, TypeError):
            found = None
        if found != (tuple(arr.shape), arr.dtype):
            raise SpecMismatch(f"{name} is missing or not {np.dtype(arr.dtype)} {tuple(arr.shape)}")


def write_pools(state: Mapping[str, Any], named: NamedArrays, xp: ModuleType) -> None:
    """Overwrite the named pools in place with `state`'s arrays (checked by `check_pools`)."""
    for name, arr in named:
        arr[...] = xp.asarray(state[name])


def build_state(
    config: str, bookkeeping: Mapping[str, np.ndarray], pools: NamedArrays
) -> dict[str, np.ndarray]:
    """A `state_dict`: the configuration record (`config` JSON), the cache's bookkeeping arrays, and host
    copies of its named pools."""
    state = {CONFIG_KEY: config_array(config)}
    state.update(bookkeeping)
    state.update(copy_pools(pools))
    return state


def check_common(state: Mapping[str, Any], config: str, what: str, pools: NamedArrays) -> None:
    """Raise `SpecMismatch` unless `state` is made for the configuration `config` (JSON) of a `what` and
    holds every named pool with its shape and dtype (`check_config`, `check_pools`)."""
    check_config(state, config, what)
    check_pools(state, pools)


def state_digest(state: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of every array of `state`, in name order: name, dtype, shape, then the bytes."""
    digest = hashlib.sha256()
    for name in sorted(state):
        arr = np.ascontiguousarray(to_numpy(state[name]))
        digest.update(f"{name}\0{arr.dtype.str}\0{list(arr.shape)}\0".encode())
        digest.update(arr.reshape(-1).view(np.uint8).data)
    return digest.hexdigest()


_SAFETENSORS_DTYPES = {
    np.dtype(np.bool_): "BOOL", np.dtype(np.uint8): "U8", np.dtype(np.int8): "I8",
    np.dtype(np.uint16): "U16", np.dtype(np.int16): "I16", np.dtype(np.float16): "F16",
    np.dtype(np.uint32): "U32", np.dtype(np.int32): "I32", np.dtype(np.float32): "F32",
    np.dtype(np.uint64): "U64", np.dtype(np.int64): "I64", np.dtype(np.float64): "F64",
}


def safetensors_chunks(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> Iterator[Any]:
    """The bytes of a safetensors file holding `tensors` (host arrays) and the `metadata` strings, as
    pieces to write in order: the header length (8 bytes, little-endian), the JSON header padded with
    spaces to a multiple of 8, then each array's bytes in name order (views, no copy of the arrays)."""
    header: dict[str, Any] = {}
    arrays = []
    offset = 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        code = _SAFETENSORS_DTYPES.get(arr.dtype.newbyteorder("="))
        if code is None or not arr.dtype.isnative:
            raise SpecMismatch(f"{name}: safetensors cannot store dtype {arr.dtype}")
        span = [offset, offset + arr.nbytes]
        header[name] = {"dtype": code, "shape": list(arr.shape), "data_offsets": span}
        offset += arr.nbytes
        arrays.append(arr)
    header["__metadata__"] = dict(metadata)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    yield struct.pack("<Q", len(text))
    yield text
    for arr in arrays:
        yield arr.reshape(-1).view(np.uint8).data


def _write(handle: IO[bytes], chunks: Iterable[Any]) -> None:
    """Write every chunk to the open binary file `handle` (one place, so tests can fail a write)."""
    for chunk in chunks:
        handle.write(chunk)


def write_atomic(path: str | os.PathLike[str], chunks: Iterable[Any]) -> None:
    """Write the `chunks` (bytes-like) to `path` all or nothing.

    They go to a temporary file in the same directory (``.{name}.{random}.tmp``, created with the
    process's umask like any new file), which is flushed, fsynced and renamed over `path` with
    `os.replace` (atomic on POSIX and Windows); the directory is fsynced after, where the system allows.
    Any exception on the way removes the temporary file and leaves `path` as it was.
    """
    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target))
    temp = os.path.join(directory, f".{os.path.basename(target)}.{secrets.token_hex(6)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            _write(handle, chunks)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    _sync_directory(directory)


def _sync_directory(directory: str) -> None:
    """fsync a directory so a rename in it is durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def save_state(path: str | os.PathLike[str], state: Mapping[str, np.ndarray], kind: str) -> None:
    """Write a cache's `state_dict` to a safetensors file, atomically (`write_atomic`).

    The metadata strings name the cache's `kind` ("causal", "encoder", "encdec"), the kvarray version,
    the layout version `STATE_FORMAT`, the SHA-256 of the tensors (`state_digest`) and, when present,
    the configuration.
    """
    from . import __version__

    tensors = {name: np.ascontiguousarray(to_numpy(arr)) for name, arr in state.items()}
    metadata = {
        KIND_META: kind, VERSION_META: __version__, FORMAT_META: str(STATE_FORMAT),
        CHECKSUM_META: state_digest(tensors),
    }
    if CONFIG_KEY in tensors:
        metadata[CONFIG_META] = bytes(tensors[CONFIG_KEY].astype(np.uint8)).decode()
    write_atomic(path, safetensors_chunks(tensors, metadata))


def load_state(path: str | os.PathLike[str], kind: str) -> dict[str, np.ndarray]:
    """The `state_dict` in a file written by `save_state` for a cache of `kind`.

    Raises `CorruptFile` (not a safetensors file, truncated, or tensors that do not match the checksum),
    `StateFormatMismatch` (another layout version), `SpecMismatch` (a file of another cache kind);
    `OSError` when the file cannot be read (missing, a directory, no permission).

    Files written before the checksum and format fields existed load too (checked by configuration,
    shapes and bookkeeping only), as do causal-cache files of the first layout (no ``kvarray.kind``,
    the configuration only in the metadata string ``kvarray.config``).
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), framework="np") as handle:
            metadata = handle.metadata() or {}
            state: dict[str, np.ndarray] = {name: handle.get_tensor(name) for name in handle.keys()}
    except SafetensorError as exc:
        raise CorruptFile(f"{path} is not a readable safetensors file: {exc}") from None
    fmt = metadata.get(FORMAT_META)
    if fmt is not None and fmt != str(STATE_FORMAT):
        raise StateFormatMismatch(STATE_FORMAT, fmt, str(path))
    legacy = KIND_META not in metadata and CONFIG_META in metadata
    found = "causal" if legacy else metadata.get(KIND_META)
    if found != kind:
        raise SpecMismatch(f"{path} is not a kvarray {kind} cache file (kind {found!r})")
    checksum = metadata.get(CHECKSUM_META)
    if checksum is not None and checksum != state_digest(state):
        raise CorruptFile(f"{path}: the tensors do not match the file's SHA-256; the file is damaged")
    if CONFIG_KEY not in state and CONFIG_META in metadata:
        state[CONFIG_KEY] = config_array(metadata[CONFIG_META])
    return state
