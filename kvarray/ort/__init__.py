"""ONNX Runtime adapter: IO binding of cache buffers, naming conventions, and the generation engine."""

from __future__ import annotations

from .binding import Binder, OutputBuffers, device_name, is_zero_copy
from .core import EngineMetrics
from .engine import Engine, EngineConfig, GraphKind, KVDtype, NativeRunner, Runner
from .names import CONVENTIONS, Convention, check_names, match_convention
from .optimum import OptimumRunner
from .sampling import SamplingParams
from .scheduler import FinishReason, Request, RequestState, TokenEvent
from .seq2seq import Seq2SeqConfig, Seq2SeqEngine, Seq2SeqMetrics
from .tokenizer import ByteTokenizer, load_tokenizer

__all__ = [
    "CONVENTIONS",
    "Binder",
    "ByteTokenizer",
    "Convention",
    "Engine",
    "EngineConfig",
    "EngineMetrics",
    "FinishReason",
    "GraphKind",
    "KVDtype",
    "NativeRunner",
    "OptimumRunner",
    "OutputBuffers",
    "Request",
    "RequestState",
    "Runner",
    "SamplingParams",
    "Seq2SeqConfig",
    "Seq2SeqEngine",
    "Seq2SeqMetrics",
    "TokenEvent",
    "check_names",
    "device_name",
    "is_zero_copy",
    "load_tokenizer",
    "match_convention",
]
