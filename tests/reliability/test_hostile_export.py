"""Damaged checkpoint folders for the exporter: each fails with a named kvarray error that names the file
and what was expected, before any graph is written."""

# ruff: noqa: E501 - table rows stay one per line

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # engine_helpers (no conftest here)

from engine_helpers import TINY  # noqa: E402

from kvarray.errors import KVArrayError, MissingTensor, ShapeMismatch, SpecMismatch  # noqa: E402
from kvarray.export import Checkpoint, MissingModelFile, ModelFileError, export  # noqa: E402

WEIGHTS = "model.safetensors"


def checkpoint(tmp: Path) -> Path:
    """A copy of the random tiny Llama's checkpoint folder."""
    folder = tmp / "checkpoint"
    shutil.copytree(TINY / "checkpoint", folder)
    return folder


def header_of(path: Path) -> tuple[int, dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return length, json.loads(raw[8 : 8 + length]), raw[8 + length :]


def with_header(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


# ---- the damage, each a function of the checkpoint folder -----------------------------------------------
def remove_folder(ckpt: Path) -> None:
    shutil.rmtree(ckpt)


def remove_config(ckpt: Path) -> None:
    (ckpt / "config.json").unlink()


def remove_weights(ckpt: Path) -> None:
    (ckpt / WEIGHTS).unlink()


def cut_config(ckpt: Path) -> None:
    path = ckpt / "config.json"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def empty_config(ckpt: Path) -> None:
    (ckpt / "config.json").write_bytes(b"")


def binary_config(ckpt: Path) -> None:
    (ckpt / "config.json").write_bytes(np.random.default_rng(0).bytes(300))


def list_config(ckpt: Path) -> None:
    (ckpt / "config.json").write_text("[1, 2, 3]")


def edit(**changes):
    def change(ckpt: Path) -> None:
        path = ckpt / "config.json"
        config = json.loads(path.read_text())
        config.update(changes)
        path.write_text(json.dumps(config))

    return change


def cut_weights(fraction: float):
    def cut(ckpt: Path) -> None:
        path = ckpt / WEIGHTS
        path.write_bytes(path.read_bytes()[: int(path.stat().st_size * fraction)])

    return cut


def weights_of(data: bytes):
    def write(ckpt: Path) -> None:
        (ckpt / WEIGHTS).write_bytes(data)

    return write


def huge_header_length(ckpt: Path) -> None:
    path = ckpt / WEIGHTS
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 2**40) + raw[8:])


def garbled_header(ckpt: Path) -> None:
    path = ckpt / WEIGHTS
    raw = bytearray(path.read_bytes())
    raw[8:12] = b"\xff\x00{["
    path.write_bytes(bytes(raw))


def padded_weights(ckpt: Path) -> None:
    path = ckpt / WEIGHTS
    path.write_bytes(path.read_bytes() + b"\x00" * 64)


def first_entry(change):
    def damage(ckpt: Path) -> None:
        path = ckpt / WEIGHTS
        _, header, data = header_of(path)
        name = next(n for n in header if n != "__metadata__")
        change(header[name])
        with_header(path, header, data)

    return damage


def nan_weight(ckpt: Path) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(ckpt / WEIGHTS))
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name] = tensors[name].copy()
    tensors[name][3, 5] = np.nan
    save_file(tensors, str(ckpt / WEIGHTS))


def drop_tensor(ckpt: Path) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(ckpt / WEIGHTS))
    del tensors["model.norm.weight"]
    save_file(tensors, str(ckpt / WEIGHTS))


def reshape_tensor(ckpt: Path) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(ckpt / WEIGHTS))
    tensors["model.norm.weight"] = np.ones(7, tensors["model.norm.weight"].dtype)
    save_file(tensors, str(ckpt / WEIGHTS))


CASES = [
    ("no folder", remove_folder, MissingModelFile, "no checkpoint folder"),
    ("no config.json", remove_config, MissingModelFile, "no config.json in checkpoint folder"),
    ("no safetensors", remove_weights, MissingModelFile, r"no \*.safetensors file"),
    ("config cut at half", cut_config, ModelFileError, "config.json is not valid JSON"),
    ("empty config", empty_config, ModelFileError, "not valid JSON"),
    ("config of random bytes", binary_config, ModelFileError, "not valid JSON"),
    ("config is a list", list_config, ModelFileError, "holds a JSON list, expected an object"),
    ("hidden_size is text", edit(hidden_size="64"), SpecMismatch, "'hidden_size' = '64' is not int"),
    ("zero layers", edit(num_hidden_layers=0), SpecMismatch, "'num_hidden_layers' = 0, expected an int >= 1"),
    ("negative heads", edit(num_attention_heads=-4), SpecMismatch, "expected an int >= 1"),
    ("float vocab", edit(vocab_size=259.5), SpecMismatch, "'vocab_size' = 259.5 is not int"),
    ("no vocab_size", edit(vocab_size=None), SpecMismatch, "has no 'vocab_size'"),
    ("weights cut at half", cut_weights(0.5), ModelFileError, r"its data ends at byte \d+, the file holds \d+ after its header \(truncated\?\)"),
    ("weights cut in the header", cut_weights(0.001), ModelFileError, "its header says"),
    ("weights of 4 bytes", weights_of(b"\x01\x02\x03\x04"), ModelFileError, "shorter than its header"),
    ("empty weights", weights_of(b""), ModelFileError, "0 bytes, shorter than its header"),
    ("weights of random bytes", weights_of(np.random.default_rng(1).bytes(5000)), ModelFileError, "not a safetensors file"),
    ("header length 2**40", huge_header_length, ModelFileError, "its header says 1099511627776 bytes"),
    ("garbled header", garbled_header, ModelFileError, "header is not JSON"),
    ("padded weights", padded_weights, ModelFileError, "(truncated or padded?)"),
    ("offsets too short", first_entry(lambda e: e["data_offsets"].__setitem__(1, e["data_offsets"][1] - 4)), ModelFileError, "needs"),
    ("unknown dtype", first_entry(lambda e: e.__setitem__("dtype", "F17")), ModelFileError, "unknown dtype 'F17'"),
    ("negative shape", first_entry(lambda e: e.__setitem__("shape", [-1])), ModelFileError, "lists of ints >= 0"),
    ("entry without offsets", first_entry(lambda e: e.pop("data_offsets")), ModelFileError, "dtype, shape and data_offsets"),
    ("a NaN weight", nan_weight, ModelFileError, "'model.layers.0.mlp.up_proj.weight' holds 1 NaN or infinite values"),
    ("a missing tensor", drop_tensor, MissingTensor, "no tensor 'model.norm.weight'"),
    ("a tensor of the wrong shape", reshape_tensor, ShapeMismatch, r"'model.norm.weight' has shape \[7\]"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_export_hostile_checkpoints_27_cases(tmp_path, case):
    assert len(CASES) == 27
    _, damage, error, message = case
    ckpt = checkpoint(tmp_path)
    damage(ckpt)
    out = tmp_path / "out"
    with pytest.raises(error, match=message) as caught:
        export("llama", ckpt, out)
    assert isinstance(caught.value, KVArrayError)
    assert not list(out.glob("*.onnx")) if out.exists() else True  # nothing half-written


def test_a_missing_checkpoint_is_also_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint folder"):
        Checkpoint(tmp_path / "nowhere")


def test_the_intact_checkpoint_reads(tmp_path):
    ckpt = Checkpoint(checkpoint(tmp_path))
    assert "model.norm.weight" in ckpt.names
    assert np.isfinite(ckpt.tensor("model.norm.weight")).all()
