"""Read a Hugging Face checkpoint folder (config.json + *.safetensors) into NumPy, without torch.

Tensors are read lazily with `safetensors.numpy`; bfloat16 tensors (which NumPy has no dtype for) are
read from the file's own header and widened to float32 exactly. Every tensor the exporter asks for is
checked by name and shape, so a bad checkpoint fails with the tensor's name in the message.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MissingTensor, ShapeMismatch, SpecMismatch

CONFIG_FILE = "config.json"


class Checkpoint:
    """A checkpoint folder: its config and its tensors by name.

    Args:
        directory: a folder with ``config.json`` and one or more ``*.safetensors`` files (sharded
            checkpoints are read through their files directly; the index file is not needed).
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        config_path = self.directory / CONFIG_FILE
        if not config_path.is_file():
            raise FileNotFoundError(f"no {CONFIG_FILE} in checkpoint folder {self.directory}")
        self.config: dict[str, Any] = json.loads(config_path.read_text())
        files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors file in checkpoint folder {self.directory}")
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
        """
        stored = self.shape(name)
        if shape is not None and tuple(stored) != tuple(shape):
            raise ShapeMismatch(
                f"checkpoint tensor {name!r} has shape {list(stored)}, the config implies {list(shape)} "
                f"({self.directory / CONFIG_FILE})"
            )
        self.used.add(name)
        if self._header[name]["dtype"] == "BF16":
            return _read_bf16(self._where[name], self._header[name])
        from safetensors import safe_open

        with safe_open(str(self._where[name]), framework="np") as f:
            array = f.get_tensor(name)
        return np.ascontiguousarray(array, dtype=np.float32)

    def _check_present(self, name: str) -> None:
        if name not in self._where:
            near = [n for n in self._where if n.split(".")[-1] == name.split(".")[-1]][:3]
            hint = f"; tensors with the same suffix: {', '.join(near)}" if near else ""
            raise MissingTensor(f"checkpoint {self.directory} has no tensor {name!r}{hint}")

    def require(self, key: str, kind: type = int) -> Any:
        """Config value `key`, which must be present and of `kind` (raises `SpecMismatch`)."""
        if key not in self.config or self.config[key] is None:
            raise SpecMismatch(f"{self.directory / CONFIG_FILE} has no {key!r}")
        value = self.config[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise SpecMismatch(f"{self.directory / CONFIG_FILE}: {key!r} = {value!r} is not {kind.__name__}")
        return value


def _read_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file: name -> {dtype, shape, data_offsets}."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise ShapeMismatch(f"{path} is not a safetensors file (shorter than its header length)")
        (length,) = struct.unpack("<Q", prefix)
        return json.loads(f.read(length))


def _read_bf16(path: Path, entry: dict[str, Any]) -> np.ndarray:
    """A bfloat16 tensor widened to float32 (exact: bfloat16 is the top half of a float32)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        begin, end = entry["data_offsets"]
        f.seek(8 + length + begin)
        raw = np.frombuffer(f.read(end - begin), dtype="<u2")
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(entry["shape"])
