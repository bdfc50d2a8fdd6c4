"""What a token costs: `KVSpec`, `RopeSpec`, storage dtypes and bytes-per-token arithmetic."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Literal, Union

import numpy as np

from .errors import DTypeMismatch, ShapeMismatch

#: Storage precisions a pool may use. ``int8`` is symmetric absmax with a float16 scale per group.
KVDtype = Literal["float32", "float16", "int8"]
KV_DTYPES: tuple[str, ...] = ("float32", "float16", "int8")
#: One storage dtype for keys and values, or a ``(key_dtype, value_dtype)`` pair.
KVDtypeArg = Union[str, tuple[str, str]]  # noqa: UP007 (a runtime alias on Python 3.10)

DEFAULT_GROUP_SIZE = 32
SCALE_DTYPE = np.dtype(np.float16)


def storage_dtype(name: str) -> np.dtype:
    """The NumPy dtype of a storage precision name ("float32", "float16" or "int8")."""
    if name not in KV_DTYPES:
        raise DTypeMismatch(f"unknown KV storage dtype {name!r}; expected one of {', '.join(KV_DTYPES)}")
    return np.dtype(name)


def kv_dtype_pair(kv_dtype: KVDtypeArg) -> tuple[str, str]:
    """Normalise a `kv_dtype` argument to a ``(key_dtype, value_dtype)`` pair of names, validated."""
    pair = (kv_dtype, kv_dtype) if isinstance(kv_dtype, str) else tuple(kv_dtype)
    if len(pair) != 2:
        raise DTypeMismatch(f"kv_dtype must be a name or a (key, value) pair of names, got {kv_dtype!r}")
    for name in pair:
        storage_dtype(name)
    return pair[0], pair[1]


def row_bytes(values_per_row: int, dtype: str, group_size: int = DEFAULT_GROUP_SIZE) -> int:
    """Bytes one cell row of `values_per_row` values takes in `dtype` (int8 includes its scales)."""
    if dtype == "int8":
        check_group_size(values_per_row, group_size)
        return values_per_row + (values_per_row // group_size) * SCALE_DTYPE.itemsize
    return values_per_row * storage_dtype(dtype).itemsize


def check_group_size(values_per_row: int, group_size: int) -> None:
    """Raise `ShapeMismatch` unless int8 groups of `group_size` tile a row of `values_per_row` values."""
    if group_size <= 0 or values_per_row % group_size:
        raise ShapeMismatch(
            f"int8 groups of {group_size} values must tile a cell row of kv_heads * head_dim = "
            f"{values_per_row} values"
        )


@dataclass(frozen=True, slots=True)
class KVSpec:
    """What one token costs per layer.

    Attributes:
        num_layers: decoder layers that keep a cache.
        num_kv_heads: key/value heads (fewer than query heads under grouped-query attention).
        head_dim: values per head.
        dtype: the dtype models compute K/V in ("float32" or "float16"); storage may differ.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "float16"

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ShapeMismatch(f"KVSpec.{name} must be a positive integer, got {value!r}")
        if self.dtype not in ("float32", "float16"):
            raise DTypeMismatch(f"KVSpec.dtype must be 'float32' or 'float16', got {self.dtype!r}")

    @property
    def row_values(self) -> int:
        """Values in one cell row of one pool: ``num_kv_heads * head_dim``."""
        return self.num_kv_heads * self.head_dim

    def bytes_per_token(self, kv_dtype: KVDtypeArg = "float16", group_size: int = DEFAULT_GROUP_SIZE) -> int:
        """Bytes one token takes over all layers, keys plus values, in the given storage dtype(s).

        Example: a 16-layer spec with 8 kv heads of 64 in float16 costs 16 * 2 * 512 * 2 = 32768 bytes;
        in int8 (group 32) 16 * 2 * (512 + 16 * 2) = 17408 bytes, 0.53125 of that.
        """
        key, value = kv_dtype_pair(kv_dtype)
        per_layer = row_bytes(self.row_values, key, group_size) + row_bytes(
            self.row_values, value, group_size
        )
        return self.num_layers * per_layer


class RopeStyle(enum.Enum):
    """How rotary embedding pairs the values of a head.

    NEOX: value i pairs with value i + rotary_dim / 2 (Llama, GPT-NeoX, Hugging Face's `rotate_half`).
    GPTJ: value 2i pairs with value 2i + 1 (GPT-J, the original RoFormer, llama.cpp's "normal" mode).
    """

    NEOX = "neox"
    GPTJ = "gptj"


@dataclass(frozen=True, slots=True)
class Llama3Scaling:
    """Llama 3.1's `rope_scaling` (rope_type "llama3"): long wavelengths slowed by `factor`, smoothly."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True, slots=True)
class RopeSpec:
    """Rotary position embedding parameters, enough to re-rotate cached keys by a position delta.

    Attributes:
        theta: the base of the frequencies (10000 for Llama 2, 500000 for Llama 3).
        rotary_dim: leading values of each head that rotate (None: all of head_dim); the rest pass through.
        style: the pairing of values (`RopeStyle.NEOX` or `RopeStyle.GPTJ`).
        scaling: optional Llama 3 frequency scaling.
    """

    theta: float = 10000.0
    rotary_dim: int | None = None
    style: RopeStyle = RopeStyle.NEOX
    scaling: Llama3Scaling | None = None

    def rotary_dims(self, head_dim: int) -> int:
        """Values per head that rotate: `rotary_dim` or all of `head_dim`; validated even and in range."""
        dims = head_dim if self.rotary_dim is None else self.rotary_dim
        if dims <= 0 or dims > head_dim or dims % 2:
            raise ShapeMismatch(f"rotary_dim must be even and in [2, head_dim={head_dim}], got {dims}")
        return dims

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """The angular frequency of each rotating pair, float64 ``[rotary_dims(head_dim) // 2]``.

        Pair i turns by ``position * inv_freq[i]`` radians, ``inv_freq[i] = theta ** (-2 i / rotary_dim)``,
        then adjusted by `scaling` as Llama 3 does.
        """
        dims = self.rotary_dims(head_dim)
        inv = 1.0 / (self.theta ** (np.arange(0, dims, 2, dtype=np.float64) / dims))
        if self.scaling is None:
            return inv
        s = self.scaling
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / inv
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor
        )
        blended = (1 - smooth) * inv / s.factor + smooth * inv
        return np.where(wavelen > low_wavelen, inv / s.factor, np.where(wavelen < high_wavelen, inv, blended))
