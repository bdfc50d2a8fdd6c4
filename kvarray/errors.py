"""The exceptions kvarray raises for runtime conditions.

Every error a caller can provoke is one of these (all subclasses of `KVArrayError`), and each also
derives from the builtin exception it refines, so ``except ValueError`` keeps working. Asserts are
kept for bugs inside kvarray only.
"""

from __future__ import annotations

from typing import Any


class KVArrayError(Exception):
    """Base class of every error kvarray raises on purpose."""


class ShapeMismatch(KVArrayError, ValueError):
    """An array's shape (or rank) is not the one the call needs."""


class DTypeMismatch(KVArrayError, TypeError):
    """An array's dtype is not one the call accepts."""


class LayoutError(KVArrayError, ValueError):
    """An array is not C-contiguous (or not writable) where the call needs it to be."""


class DeviceMismatch(KVArrayError, ValueError):
    """Arrays of one call live on different devices (host and CUDA, or two CUDA devices)."""


class IndexOutOfRange(KVArrayError, IndexError):
    """A cell, row or position index falls outside the array it indexes."""


class BackendUnavailable(KVArrayError, RuntimeError):
    """The requested array backend (CuPy, a CUDA device) cannot be used here; the message says why."""


class CacheFull(KVArrayError):
    """A batch needs more free cells than the pool has.

    Attributes:
        asked: cells the batch needs.
        free: cells free when the batch was refused.
    """

    def __init__(self, asked: int, free: int, what: str = "cells") -> None:
        super().__init__(f"cache full: the batch needs {asked} {what}, {free} are free")
        self.asked = asked
        self.free = free


class TooManySequences(KVArrayError):
    """More live sequences than the cache's `max_sequences`."""


class UnknownSequence(KVArrayError, KeyError):
    """A sequence id the cache does not hold."""

    def __str__(self) -> str:  # KeyError quotes its argument; say it plainly
        return str(self.args[0]) if self.args else "unknown sequence"


class PositionError(KVArrayError, ValueError):
    """Positions that go backwards or skip inside a sequence, or a range outside it."""


class NoForwardPass(KVArrayError, RuntimeError):
    """`put` or `get` called before `start_forward` planned a batch."""


class SpecMismatch(KVArrayError, ValueError):
    """A saved cache, a graph or a checkpoint made for another spec."""


class ConfigError(KVArrayError, ValueError):
    """An argument outside what a cache accepts: constructor options out of range or contradicting each
    other, an unknown view name."""


class SequenceExists(KVArrayError, ValueError):
    """A sequence id that already holds cells where a new one is needed (the target of `copy_prefix`)."""


class StalePlan(NoForwardPass):
    """A forward plan used after the cache moved on (a later `start_forward`, `remove`, `defrag`, ...)."""


class CacheClosed(KVArrayError, RuntimeError):
    """A cache used after `close()` released its pools."""


class ConcurrentUse(KVArrayError, RuntimeError):
    """A cache called from one thread while another thread is inside one of its methods.

    Caches are not shared between threads at the same time (docs/reliability.md): the second call is
    refused before it changes anything. Calls from different threads one after the other are fine.
    """


class NonFiniteValues(KVArrayError, ValueError):
    """Keys or values holding NaN or infinity where the cache stores only finite numbers."""


class CorruptFile(SpecMismatch):
    """A cache file that is truncated, garbled, or whose tensors do not match the checksum it carries."""


class StateFormatMismatch(SpecMismatch):
    """A cache file or state of another layout version (`kvarray.state.STATE_FORMAT`).

    Attributes:
        expected: the version this kvarray reads; found: the file's.
    """

    def __init__(self, expected: int, found: object, what: str = "cache file") -> None:
        super().__init__(
            f"{what} has state format {found!r}; this kvarray reads format {expected} "
            "(save it again with the kvarray that wrote it, or upgrade)"
        )
        self.expected = expected
        self.found = found


class UnsupportedModel(KVArrayError, ValueError):
    """A checkpoint whose architecture, rope type or config option the exporter does not implement."""


class MissingTensor(KVArrayError, KeyError):
    """A tensor the model's config requires is not in the checkpoint; the message names it."""

    def __str__(self) -> str:  # KeyError quotes its argument; say it plainly
        return str(self.args[0]) if self.args else "missing tensor"


class EntryWritten(KVArrayError, ValueError):
    """A static encoder entry's layer written a second time (encoder K/V are written once, never changed)."""


class UnknownModality(ConfigError):
    """A modality the encoder cache was not configured with (its storage precision is unknown)."""


class NoEncoderEntry(UnknownSequence):
    """A decoder step (or fork) for a sequence without a complete encoder entry (every layer written)."""


# ---- the ONNX Runtime adapter and generation engine (kvarray.ort) ----------------------------------
class GraphMismatch(SpecMismatch):
    """A graph whose input/output names or shapes do not match the naming convention or the cache spec;
    the message lists the names (or shapes) expected and found."""


class EmptyPrompt(KVArrayError, ValueError):
    """A generation request without any prompt token."""


class PromptTooLong(KVArrayError, ValueError):
    """A prompt longer than the cache's capacity or the model's context.

    Attributes:
        length: prompt tokens; limit: the most the cache or model takes; what: "cache" or "model context".
    """

    def __init__(self, length: int, limit: int, what: str) -> None:
        super().__init__(f"prompt of {length} tokens is longer than the {what} ({limit} tokens)")
        self.length = length
        self.limit = limit
        self.what = what


class UnknownToken(KVArrayError, ValueError):
    """A token id outside the model's vocabulary ``[0, vocab_size)``."""


class UnknownRequest(KVArrayError, KeyError):
    """A request id the engine does not hold (never added, or already finished and collected)."""

    def __str__(self) -> str:  # KeyError quotes its argument; say it plainly
        return str(self.args[0]) if self.args else "unknown request"


class TokenizerError(KVArrayError, ValueError):
    """A model folder whose tokenizer cannot be read here (not byte-level and `tokenizers` not installed)."""


class AudioFormatError(KVArrayError, ValueError):
    """An audio file kvarray cannot read (not a PCM WAV, a sample width other than 16 bits, more than two
    channels)."""


class ModelFileError(KVArrayError, ValueError):
    """A model file that cannot be what its name says: a checkpoint's config.json or *.safetensors, an
    ONNX graph, truncated, corrupted or of another format; the message names the file and what was
    expected."""


class MissingModelFile(ModelFileError, FileNotFoundError):
    """A model file (or folder) that is not there; also a `FileNotFoundError`."""


class InvalidUTF8(KVArrayError, ValueError):
    """Text that is not valid UTF-8: a prompt given as bytes that do not decode (or a str holding lone
    surrogates, what Python makes of such bytes in ``sys.argv``), a line of a batch file.

    Attributes:
        offset: index of the first bad byte (bytes) or character (str) in what was given.
    """

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


class NonFiniteLogits(KVArrayError, ValueError):
    """A request's logits row holds NaN or +inf (or only -inf): there is no token to choose. The engine
    fails that request alone (`FinishReason.ERROR`)."""


class RequestFailed(KVArrayError, RuntimeError):
    """A request that finished with `FinishReason.ERROR` (raised by ``generate``, once every request of
    the call has finished; the original exception is its ``__cause__`` and ``request.error``).

    Attributes:
        request_id: the failed request; outputs: every request's new tokens of the call, in order (the
            failed ones hold what they produced before failing).
    """

    def __init__(self, message: str, request_id: int, outputs: list[list[int]] | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.outputs: list[list[int]] = outputs or []

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (str(self), self.request_id, self.outputs)


class EngineBusy(KVArrayError, RuntimeError):
    """`step` called while another thread is inside `step` of the same engine (one thread steps; any
    thread may add or cancel requests)."""
