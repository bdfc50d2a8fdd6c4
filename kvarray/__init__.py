"""kvarray: KV caches for transformer inference on NumPy and CuPy arrays.

The caches (`CausalCache`, `EncoderCache`, `EncoderDecoderCache`) share one interface (`Cache`); the
kernels live in `kvarray.ops`, the ONNX Runtime adapter and engine in `kvarray.ort`, the exporter in
`kvarray.export`. See docs/index.md.
"""

from __future__ import annotations

from .causal import CacheStats, CausalCache
from .encdec import EncoderDecoderCache
from .encoder import EncoderCache
from .errors import (
    AudioFormatError,
    BackendUnavailable,
    CacheClosed,
    CacheFull,
    ConfigError,
    DeviceMismatch,
    DTypeMismatch,
    EmptyPrompt,
    EntryWritten,
    GraphMismatch,
    IndexOutOfRange,
    KVArrayError,
    LayoutError,
    MissingTensor,
    NoEncoderEntry,
    NoForwardPass,
    PositionError,
    PromptTooLong,
    SequenceExists,
    ShapeMismatch,
    SpecMismatch,
    StalePlan,
    TokenizerError,
    TooManySequences,
    UnknownModality,
    UnknownRequest,
    UnknownSequence,
    UnknownToken,
    UnsupportedModel,
)
from .interface import Cache
from .spec import KVSpec, Llama3Scaling, RopeSpec, RopeStyle
from .views import ForwardPlan, GatheredView, PageTable, PoolView, View

__version__ = "0.1.0"

__all__ = [
    "AudioFormatError",
    "BackendUnavailable",
    "Cache",
    "CacheClosed",
    "CacheFull",
    "CacheStats",
    "CausalCache",
    "ConfigError",
    "DTypeMismatch",
    "DeviceMismatch",
    "EmptyPrompt",
    "EncoderCache",
    "EncoderDecoderCache",
    "EntryWritten",
    "ForwardPlan",
    "GatheredView",
    "GraphMismatch",
    "IndexOutOfRange",
    "KVArrayError",
    "KVSpec",
    "LayoutError",
    "Llama3Scaling",
    "MissingTensor",
    "NoEncoderEntry",
    "NoForwardPass",
    "PageTable",
    "PoolView",
    "PositionError",
    "PromptTooLong",
    "RopeSpec",
    "RopeStyle",
    "SequenceExists",
    "ShapeMismatch",
    "SpecMismatch",
    "StalePlan",
    "TokenizerError",
    "TooManySequences",
    "UnknownModality",
    "UnknownRequest",
    "UnknownSequence",
    "UnknownToken",
    "UnsupportedModel",
    "View",
    "__version__",
]
