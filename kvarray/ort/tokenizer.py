"""Tokenizers for the engine: the byte-level tokenizer of the tiny models, or `tokenizers` when installed.

`load_tokenizer(folder)` reads ``folder/tokenizer.json``. A byte-level BPE without merges (what
models/byte_tokenizer.py writes: one token per byte, the byte-level alphabet's characters as the vocabulary,
then special tokens) is read by `ByteTokenizer` with no dependency. Any other tokenizer.json is loaded with
the `tokenizers` package when it is installed; otherwise `TokenizerError` says so.

`encode` takes a str or UTF-8 bytes; text that is not valid UTF-8 (bytes that do not decode, a str with
lone surrogates such as ``sys.argv`` holds for such bytes) raises `InvalidUTF8` with the first bad offset.
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Any, Protocol

from ..errors import InvalidUTF8, ModelFileError, TokenizerError
from ..export import read_config

__all__ = [
    "ByteTokenizer",
    "StreamDecoder",
    "Tokenizer",
    "byte_level_alphabet",
    "load_tokenizer",
    "read_tokenizer_json",
    "utf8_bytes",
]


def utf8_bytes(text: str | bytes, what: str = "prompt") -> bytes:
    """The UTF-8 bytes of `text` (a str, or bytes that must already be valid UTF-8).

    Raises `InvalidUTF8` naming `what` and the first bad offset: bytes that do not decode, or a str
    holding lone surrogates (``sys.argv`` and ``os.fsdecode`` turn undecodable bytes into those);
    `TokenizerError` for anything that is neither str nor bytes.
    """
    if isinstance(text, (bytes, bytearray, memoryview)):
        raw = bytes(text)
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidUTF8(
                f"{what} is not valid UTF-8: byte 0x{raw[exc.start]:02x} at offset {exc.start}", exc.start
            ) from None
        return raw
    if not isinstance(text, str):
        raise TokenizerError(f"{what} must be text (str or UTF-8 bytes), got {type(text).__name__}")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        char = ord(text[exc.start])
        raise InvalidUTF8(
            f"{what} is not valid UTF-8: lone surrogate U+{char:04X} at character {exc.start} "
            f"(undecodable byte 0x{char & 0xFF:02x} when it came from the command line or a file name)",
            exc.start,
        ) from None


class Tokenizer(Protocol):
    """What the engine needs of a tokenizer."""

    def encode(self, text: str | bytes) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def decoder(self) -> StreamDecoder: ...


class StreamDecoder(Protocol):
    """Turns token ids into text one at a time (bytes of a character split over tokens are held back)."""

    def feed(self, token: int) -> str: ...

    def flush(self) -> str: ...


def byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet: character -> byte value.

    Printable bytes ("!".."~", "\u00a1".."\u00ac", "\u00ae".."\u00ff") stand for themselves; the other 68
    bytes take the code points 256, 257, ... in byte order.
    """
    keep = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    table, extra = {}, 0
    for byte in range(256):
        if byte in keep:
            table[chr(byte)] = byte
        else:
            table[chr(0x100 + extra)] = byte
            extra += 1
    return table


class ByteTokenizer:
    """One token per UTF-8 byte, plus special tokens (dropped when decoding).

    Args:
        byte_ids: ``[256]`` the token id of each byte value.
        special: special token text -> id (e.g. ``{"<s>": 256, "</s>": 257, "<pad>": 258}``).
    """

    def __init__(self, byte_ids: list[int], special: dict[str, int]) -> None:
        if sorted(set(byte_ids)) != sorted(byte_ids) or len(byte_ids) != 256:
            raise TokenizerError("a byte tokenizer needs 256 distinct byte ids")
        self.byte_ids = list(byte_ids)
        self.special = dict(special)
        self._bytes = {token: byte for byte, token in enumerate(self.byte_ids)}
        self.vocab_size = max([*self.byte_ids, *self.special.values()]) + 1

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ByteTokenizer | None:
        """The tokenizer described by a parsed tokenizer.json, or None when it is not a merge-free
        byte-level BPE over the byte-level alphabet."""
        model = data.get("model") or {}
        pre = data.get("pre_tokenizer") or {}
        if model.get("type") != "BPE" or model.get("merges") or pre.get("type") != "ByteLevel":
            return None
        vocab: dict[str, int] = model.get("vocab") or {}
        alphabet = byte_level_alphabet()
        if len(vocab) != 256 or set(vocab) != set(alphabet):
            return None
        byte_ids = [0] * 256
        for char, token in vocab.items():
            byte_ids[alphabet[char]] = int(token)
        special = {t["content"]: int(t["id"]) for t in data.get("added_tokens", [])}
        return cls(byte_ids, special)

    def encode(self, text: str | bytes) -> list[int]:
        """Token ids of `text`'s UTF-8 bytes (no special tokens added); `InvalidUTF8` (`utf8_bytes`)."""
        ids = self.byte_ids
        return [ids[b] for b in utf8_bytes(text)]

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`: special and unknown ids dropped, invalid UTF-8 replaced (U+FFFD)."""
        table = self._bytes
        return bytes(table[i] for i in ids if i in table).decode("utf-8", errors="replace")

    def decoder(self) -> _ByteStream:
        """A `StreamDecoder` for one sequence."""
        return _ByteStream(self._bytes)


class _ByteStream:
    def __init__(self, table: dict[int, int]) -> None:
        self._table = table
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> str:
        byte = self._table.get(int(token))
        return "" if byte is None else self._utf8.decode(bytes((byte,)))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class _HFTokenizer:
    """`tokenizers.Tokenizer` behind the engine's `Tokenizer` protocol."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok

    def encode(self, text: str | bytes) -> list[int]:
        checked = utf8_bytes(text).decode("utf-8")
        return list(self.tok.encode(checked, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self.tok.decode(list(ids), skip_special_tokens=True))

    def decoder(self) -> _HFStream:
        return _HFStream(self)


class _HFStream:
    """Decodes the whole sequence so far and emits the new suffix (correct for any tokenizer, O(n) each)."""

    def __init__(self, tok: _HFTokenizer) -> None:
        self.tok, self.text = tok, ""
        self.ids: list[int] = []

    def feed(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete character: wait for its other bytes
            return ""
        new, self.text = text[len(self.text) :], text
        return new

    def flush(self) -> str:
        text = self.tok.decode(self.ids)
        new, self.text = text[len(self.text) :], text
        return new


def read_tokenizer_json(path: str | Path) -> dict[str, Any]:
    """The JSON object of a tokenizer.json file, read by `kvarray.export.read_config` (the checkpoint's
    config reader).

    Raises `TokenizerError` (its cause the reader's `ModelFileError`): no such file, not UTF-8 JSON,
    truncated, or not an object.
    """
    path = Path(path)
    try:
        return read_config(path)
    except ModelFileError as exc:
        raise TokenizerError(f"{path.name} is not a JSON tokenizer file: {exc}") from exc


def load_tokenizer(folder: str | Path) -> ByteTokenizer | _HFTokenizer:
    """The tokenizer of ``folder/tokenizer.json`` (see the module docstring).

    Raises `TokenizerError`: no tokenizer.json, one that is not a JSON object (truncated, corrupted, not
    UTF-8), one that is not byte-level while `tokenizers` is not installed, or one that `tokenizers`
    cannot read.
    """
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError(f"no tokenizer.json in {folder}")
    data = read_tokenizer_json(path)
    byte_level = ByteTokenizer.from_json(data)
    if byte_level is not None:
        return byte_level
    try:
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError:
        raise TokenizerError(
            f"{path} is not a byte-level tokenizer and the `tokenizers` package is not installed "
            "(pip install tokenizers)"
        ) from None
    try:
        return _HFTokenizer(HFTokenizer.from_file(str(path)))
    except Exception as exc:  # the library raises a bare Exception for a malformed file
        raise TokenizerError(f"{path} cannot be read by the `tokenizers` package: {exc}") from exc
