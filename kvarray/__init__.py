"""kvarray: KV caches for transformer inference on NumPy and CuPy arrays."""

from __future__ import annotations

from .errors import (
    BackendUnavailable,
    CacheFull,
    DeviceMismatch,
    DTypeMismatch,
    IndexOutOfRange,
    KVArrayError,
    LayoutError,
    NoForwardPass,
    PositionError,
    ShapeMismatch,
    SpecMismatch,
    TooManySequences,
    UnknownSequence,
)
from .spec import KVSpec, Llama3Scaling, RopeSpec, RopeStyle

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable",
    "CacheFull",
    "DTypeMismatch",
    "DeviceMismatch",
    "IndexOutOfRange",
    "KVArrayError",
    "KVSpec",
    "LayoutError",
    "Llama3Scaling",
    "NoForwardPass",
    "PositionError",
    "RopeSpec",
    "RopeStyle",
    "ShapeMismatch",
    "SpecMismatch",
    "TooManySequences",
    "UnknownSequence",
    "__version__",
]
