"""Helpers of the exporter tests (a module of its own: `conftest` is a name every test folder has, so
importing from it depends on which folder's conftest pytest loaded first)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

MODELS = Path(__file__).resolve().parents[2] / "models"
TINY = MODELS / "tiny-llama-random"
TRAINED = MODELS / "tiny-llama"


class Exports:
    """``exports(kv_dtype, view)`` -> the graph paths of models/NAME/checkpoint (in the order `export`
    returns them), exported into `out` once per (kv_dtype, view)."""

    def __init__(self, arch: str, model: Path, out: Path) -> None:
        self.arch, self.model, self.out = arch, model, out
        self.cache: dict[tuple[str, str], tuple[Path, ...]] = {}

    def __call__(self, kv_dtype: str = "float32", view: str = "pool") -> tuple[Path, ...]:
        from kvarray.export import export

        if (kv_dtype, view) not in self.cache:
            written = export(self.arch, self.model / "checkpoint", self.out, kv_dtype=kv_dtype, view=view)
            self.cache[kv_dtype, view] = tuple(written)
        return self.cache[kv_dtype, view]


def load_reference(model: Path) -> dict[str, np.ndarray]:
    """transformers' greedy continuations and logits committed in model/reference.npz."""
    return dict(np.load(model / "reference.npz"))


def prompts_of(reference: dict[str, np.ndarray]) -> list[list[int]]:
    """The prompts stored in a reference.npz, in order."""
    return [
        reference[f"prompt_{k}"].tolist()
        for k in range(len([n for n in reference if n.startswith("prompt_")]))
    ]


def assert_same_reference(fresh: dict[str, np.ndarray], committed: dict[str, np.ndarray]) -> None:
    """Every array of `committed` is in `fresh`: logits within 1e-5, everything else equal."""
    for name, value in committed.items():
        if name.startswith("logits_"):
            np.testing.assert_allclose(fresh[name], value, rtol=0, atol=1e-5)
        else:
            np.testing.assert_array_equal(fresh[name], value)


# -- edited checkpoints ---------------------------------------------------------------------------------
def copy_checkpoint(model: Path, tmp_path: Path) -> Path:
    """A copy of model/checkpoint in tmp_path/ckpt, to edit."""
    shutil.copytree(model / "checkpoint", tmp_path / "ckpt")
    return tmp_path / "ckpt"


def edit_config(ckpt: Path, **changes) -> None:
    """Update config.json of the checkpoint folder `ckpt` with `changes`."""
    config = json.loads((ckpt / "config.json").read_text())
    config.update(changes)
    (ckpt / "config.json").write_text(json.dumps(config))


def drop_tensor(ckpt: Path, name: str) -> None:
    """Rewrite model.safetensors of the checkpoint folder `ckpt` without tensor `name`."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(ckpt / "model.safetensors"))
    del tensors[name]
    save_file(tensors, str(ckpt / "model.safetensors"))
