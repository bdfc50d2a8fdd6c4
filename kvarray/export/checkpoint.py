"""Read a Hugging Face checkpoint folder (config.json + *.safetensors) into NumPy, without torch.

Tensors are read lazily with `safetensors.numpy`; bfloat16 tensors (which NumPy has no dtype for) are
read from the file's own header and widened to float32 exactly. Every tensor the exporter asks for is
checked by name and shape, so a bad checkpoint fails with the tensor's name in the message.

A damaged folder fails early with the file named: a missing or empty config.json or *.safetensors
(`MissingModelFile`), a config.json that is not a JSON object, a safetensors file whose header is not
JSON or whose tensors do not exactly cover its bytes (truncated, padded, random bytes), a tensor holding
NaN or infinities (`ModelFileError`).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MissingModelFile, MissingTensor, ModelFileError, ShapeMismatch, SpecMismatch

CONFIG_FILE = "config.json"
#: bytes per element of the safetensors dtypes
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
#: the largest safetensors header read (the format's own limit is 100 MB)
MAX_HEADER_BYTES = 100_000_000


def read_config(path: str | Path) -> dict[str, Any]:
    """The JSON object in `path` (a config.json).

    Raises `MissingModelFile` (no file), `ModelFileError` (not UTF-8 JSON, truncated, or not an object).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingModelFile(f"no {path.name} at {path}")
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path} is not valid JSON (truncated or corrupted?): {exc}") from None
    if not isinstance(config, dict):
        raise ModelFileError(f"{path} holds a JSON {type(config).__name__}, expected an object")
    return config


class Checkpoint:
    """A checkpoint folder: its config and its tensors by name.

    Args:
        directory: a folder with ``config.json`` and one or more ``*.safetensors`` files (sharded
            checkpoints are read through their files directly; the index file is not needed).


    Raises `MissingModelFile` (no folder, no config.json, no *.safetensors), `ModelFileError` (a
    config.json or safetensors header that cannot be read, see the module docstring).
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise MissingModelFile(f"no checkpoint folder {self.directory} (no {CONFIG_FILE} in it)")
        config_path = self.directory / CONFIG_FILE
        if not config_path.is_file():
            raise MissingModelFile(f"no {CONFIG_FILE} in checkpoint folder {self.directory}")
        self.config: dict[str, Any] = read_config(config_path)
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise MissingModelFile(f"no *.safetensors file in checkpoint folder {self.directory}")
        self._where: dict[str, Path] = {}
        self._header: dict[str, dict[str, Any]] = {}
        for path in files:
            header = _read_header(path)
            for name, entry in header.items():
                if name != "__metadata__":
                    self._where[name] = path
                    self._header[name] = entry
        self.used: set[str] = set()

    @property
    def names(self) -> list[str]:
        """Every tensor name in the checkpoint, sorted."""
        return sorted(self._where)

    def has(self, name: str) -> bool:
        """Whether the checkpoint holds a tensor called `name`."""
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of tensor `name` (raises `MissingTensor`)."""
        self._check_present(name)
        return tuple(self._header[name]["shape"])

    def tensor(self, name: str, shape: Sequence[int] | None = None) -> np.ndarray:
        """Tensor `name` as a C-contiguous float32 array, checked against `shape` when given.

        Raises:
            MissingTensor: the checkpoint has no tensor of that name.
            ShapeMismatch: its shape is not `shape` (the config and the weights disagree).
            ModelFileError: its bytes cannot be read, or it holds NaN or infinities.
        """
        stored = self.shape(name)
        if shape is not None and tuple(stored) != tuple(shape):
            raise ShapeMismatch(
                f"checkpoint tensor {name!r} has shape {list(stored)}, the config implies {list(shape)} "
                f"({self.directory / CONFIG_FILE})"
            )
        self.used.add(name)
        path = self._where[name]
        try:
            if self._header[name]["dtype"] == "BF16":
                array = _read_bf16(path, self._header[name])
            else:
                from safetensors import safe_open

                with safe_open(str(path), framework="np") as f:
                    array = np.ascontiguousarray(f.get_tensor(name), dtype=np.float32)
        except (OSError, ValueError, TypeError) as exc:  # safetensors raises SafetensorError (an Exception)
            raise ModelFileError(f"{path}: tensor {name!r} cannot be read: {exc}") from exc
        except Exception as exc:
            if type(exc).__name__ != "SafetensorError":
                raise
            raise ModelFileError(f"{path}: tensor {name!r} cannot be read: {exc}") from exc
        finite = np.isfinite(array)
        if not finite.all():
            count = int(array.size - np.count_nonzero(finite))
            raise ModelFileError(f"{path}: tensor {name!r} holds {count} NaN or infinite values")
        return array

    def _check_present(self, name: str) -> None:
        if name not in self._where:
            near = [n for n in self._where if n.split(".")[-1] == name.split(".")[-1]][:3]
            hint = f"; tensors with the same suffix: {', '.join(near)}" if near else ""
            raise MissingTensor(f"checkpoint {self.directory} has no tensor {name!r}{hint}")

    def require(self, key: str, kind: type = int) -> Any:
        """Config value `key`, which must be present and of `kind` (raises `SpecMismatch`).

        An int must be >= 1 and a float finite: every int the exporters require is a size or a count.
        """
        if key not in self.config or self.config[key] is None:
            raise SpecMismatch(f"{self.directory / CONFIG_FILE} has no {key!r}")
        value: Any = self.config[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        right_kind = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        if not right_kind:
            raise SpecMismatch(f"{self.directory / CONFIG_FILE}: {key!r} = {value!r} is not {kind.__name__}")
        where = self.directory / CONFIG_FILE
        if kind is int and value < 1:
            raise SpecMismatch(f"{where}: {key!r} = {value!r}, expected an int >= 1")
        if kind is float and not np.isfinite(value):
            raise SpecMismatch(f"{where}: {key!r} = {value!r}, expected a finite float")
        return value


def _read_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file: name -> {dtype, shape, data_offsets}, checked.

    Raises `ModelFileError` unless the file is 8 bytes of header length, a JSON object of that length,
    then the tensors' bytes: each entry's offsets hold exactly its shape's bytes and together they cover
    the rest of the file exactly (so a truncated or padded file is caught before any tensor is read).
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise ModelFileError(f"{path} is not a safetensors file ({size} bytes, shorter than its header)")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise ModelFileError(
                f"{path} is not a safetensors file (truncated or corrupted?): its header says {length} "
                f"bytes, the file has {size - 8} after the length"
            )
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path}: the safetensors header is not JSON (corrupted?): {exc}") from None
    if not isinstance(header, dict):
        kind = type(header).__name__
        raise ModelFileError(f"{path}: the safetensors header is a JSON {kind}, not an object")
    data = size - 8 - length
    covered = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        why = _entry_problem(entry, data)
        if why:
            raise ModelFileError(f"{path}: tensor {name!r}: {why}")
        covered += entry["data_offsets"][1] - entry["data_offsets"][0]
    if covered != data:
        raise ModelFileError(
            f"{path}: the tensors cover {covered} bytes, the file holds {data} after its header "
            "(truncated or padded?)"
        )
    return header


def _entry_problem(entry: Any, data: int) -> str:
    """What is wrong with one safetensors header entry (an empty string when nothing)."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        return "expected an object with dtype, shape and data_offsets"
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_BYTES:
        return f"unknown dtype {dtype!r}"
    ints = [*shape, *offsets] if isinstance(shape, list) and isinstance(offsets, list) else None
    if ints is None or len(offsets) != 2 or not all(isinstance(n, int) and n >= 0 for n in ints):
        return f"shape {shape!r} and data_offsets {offsets!r} must be lists of ints >= 0"
    begin, end = offsets
    want = int(np.prod(shape, dtype=np.int64)) * DTYPE_BYTES[dtype]
    if end - begin != want:
        return f"data_offsets [{begin}, {end}) hold {end - begin} bytes, {dtype} {shape} needs {want}"
    if end > data:
        return f"its data ends at byte {end}, the file holds {data} after its header (truncated?)"
    return ""


def _read_bf16(path: Path, entry: dict[str, Any]) -> np.ndarray:
    """A bfloat16 tensor widened to float32 (exact: bfloat16 is the top half of a float32)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        begin, end = entry["data_offsets"]
        f.seek(8 + length + begin)
        raw = np.frombuffer(f.read(end - begin), dtype="<u2")
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(entry["shape"])
