"""A byte-level tokenizer built in code, offline: token id b is byte b, then three special tokens.

    ids 0..255   the bytes themselves (UTF-8 text is split into its bytes, no merges)
    256          <s>     beginning of text
    257          </s>    end of text
    258          <pad>   padding

The tokenizer is written with the `tokenizers` library as a byte-level BPE with an empty merge list (so
every byte is one token and the id is the byte's value), then wrapped in transformers'
`PreTrainedTokenizerFast` so that `save_pretrained` writes the usual tokenizer.json and config files.
"""

from __future__ import annotations

from pathlib import Path

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
BOS_ID, EOS_ID, PAD_ID = 256, 257, 258
VOCAB_SIZE = 259


def byte_alphabet() -> dict[int, str]:
    """The printable character byte-level tokenizers use for each byte (byte value -> character).

    Printable Latin-1 bytes stand for themselves; the others (controls, space, ...) are moved to code
    points from 256 upwards, in byte order, so that every byte has a visible, distinct character.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table: dict[int, str] = {}
    extra = 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def encode(text: str) -> list[int]:
    """Token ids of `text` without the tokenizer object: its UTF-8 bytes."""
    return list(text.encode("utf-8"))


def decode(ids: list[int]) -> str:
    """Text of token ids (special tokens dropped, invalid UTF-8 replaced)."""
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def build_tokenizer():
    """A `PreTrainedTokenizerFast` over the byte vocabulary (needs `tokenizers` and `transformers`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: byte for byte, char in byte_alphabet().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS, PAD])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    assert fast.convert_tokens_to_ids([BOS, EOS, PAD]) == [BOS_ID, EOS_ID, PAD_ID]
    return fast


def save_tokenizer(directory: Path) -> None:
    """Write tokenizer.json (and transformers' tokenizer config files) into `directory`."""
    build_tokenizer().save_pretrained(str(directory))
