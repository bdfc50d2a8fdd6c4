"""Export Hugging Face checkpoints to kvarray's native ONNX graphs (see docs/export.md).

    from kvarray.export import export
    paths = export("llama", "models/tiny-llama/checkpoint", "out/", kv_dtype="int8", view="pool")

Reading needs only NumPy, safetensors and onnx (no torch). Each architecture registers one function in
`EXPORTERS`; the shared pieces live in `checkpoint` (reading), `graph` (builder and common layers),
`attention` (the block attention over past and this pass), `interface` (the inputs and outputs every
architecture declares alike) and `metadata` (what a graph says about itself).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import onnx

from ..errors import UnsupportedModel
from ..spec import storage_dtype
from .attention import View
from .checkpoint import Checkpoint, MissingModelFile, ModelFileError, read_config
from .llama import export_llama
from .metadata import GraphInfo, read_metadata
from .t5 import export_t5
from .whisper import export_whisper

#: arch name -> exporter(checkpoint, out_dir, kv_dtype, view) -> written graph paths.
EXPORTERS: dict[str, Callable[[Checkpoint, Path, str, View], list[Path]]] = {
    "llama": export_llama,
    "t5": export_t5,
    "whisper": export_whisper,
}
#: archs the CLI accepts whose exporters are not written yet (issue 5).
PLANNED: tuple[str, ...] = ()
#: graphs above this many bytes keep their weights in a side file (protobuf's limit is 2 GiB).
EXTERNAL_DATA_BYTES = 1 << 30


def export(
    arch: str,
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    kv_dtype: str = "float32",
    view: str = "pool",
) -> list[Path]:
    """Export the checkpoint in `checkpoint_dir` to native graphs in `out_dir`; return their paths.

    Args:
        arch: a key of `EXPORTERS` ("llama", "t5", "whisper").
        checkpoint_dir: folder with config.json and *.safetensors (transformers' `save_pretrained`).
        out_dir: created if needed; Llama writes ``decoder_step.{view}.{kv_dtype}.onnx``.
        kv_dtype: storage of the past inputs: "float32", "float16" or "int8" (pool view only).
        view: "pool" (``past_key.{i} [N, kv_heads, head_dim]``) or "gathered"
            (``past_key.{i} [S, kv_heads, L, head_dim]`` plus ``token_sequence [T]``).

    Raises:
        MissingModelFile, ModelFileError: the checkpoint folder or one of its files is missing, truncated
            or corrupted (`Checkpoint`).
        UnsupportedModel: an arch without an exporter, or a config the exporter does not implement.
        MissingTensor, ShapeMismatch, SpecMismatch: the checkpoint and its config disagree.
        DTypeMismatch: an unknown kv_dtype, or int8 with the gathered view.
    """
    if arch not in EXPORTERS:
        planned = " (planned, not implemented yet)" if arch in PLANNED else ""
        raise UnsupportedModel(
            f"no exporter for architecture {arch!r}{planned}; implemented: {', '.join(sorted(EXPORTERS))}"
        )
    storage_dtype(kv_dtype)
    try:
        chosen = View(view)
    except ValueError:
        raise UnsupportedModel(f"unknown view {view!r}; expected one of {[v.value for v in View]}") from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return EXPORTERS[arch](Checkpoint(checkpoint_dir), out, kv_dtype, chosen)


def save_model(model: onnx.ModelProto, path: Path) -> Path:
    """Write `model` to `path`, its weights in ``path.data`` beside it when it is too big for one file."""
    if model.ByteSize() > EXTERNAL_DATA_BYTES:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))
    return path


__all__ = [
    "EXPORTERS",
    "Checkpoint",
    "GraphInfo",
    "MissingModelFile",
    "ModelFileError",
    "View",
    "export",
    "read_config",
    "read_metadata",
    "save_model",
]
