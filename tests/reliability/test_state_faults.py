"""Cache files under faults: a save interrupted at any byte (or at the fsync, or at the rename) leaves the
previous file byte for byte and no temporary file behind; a load checks the SHA-256 the file carries, its
layout version and its kind, and refuses truncated or garbled files with a named error before the cache
changes. Files written before the checksum existed still load."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # hostile_helpers (no conftest here)

from hostile_helpers import (  # noqa: E402
    assert_refused,
    causal_cache,
    encdec_cache,
    encoder_cache,
    put_all,
    snapshot,
)
from safetensors.numpy import load_file, save_file  # noqa: E402

from kvarray import state as state_module  # noqa: E402
from kvarray.errors import CorruptFile, SpecMismatch, StateFormatMismatch  # noqa: E402
from kvarray.state import CHECKSUM_META, STATE_FORMAT  # noqa: E402

MAKERS = {"causal": causal_cache, "encoder": encoder_cache, "encdec": encdec_cache}


class DiskFull(OSError):
    """The failure injected into a save."""


def failing_writer(limit: int) -> Any:
    """A `kvarray.state._write` that writes the first `limit` bytes, then raises `DiskFull`."""

    def write(handle: IO[bytes], chunks: Any) -> None:
        left = limit
        for chunk in chunks:
            data = memoryview(chunk).cast("B")
            handle.write(data[:left])
            left -= min(left, len(data))
            if left == 0:
                break
        raise DiskFull(f"no space left after {limit} bytes")

    return write


def other_files(folder: Path, keep: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != keep)


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Any, Path, bytes]:
    """A causal cache saved to ``cache.safetensors`` (the previous file), then changed: (cache, path,
    the file's bytes)."""
    cache = causal_cache()
    path = tmp_path / "cache.safetensors"
    cache.save(path)
    put_all(cache, [0, 1], [6, 5])
    return cache, path, path.read_bytes()


def test_save_interrupted_at_any_byte_keeps_the_previous_file(saved: tuple[Any, Path, bytes],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    cache, path, old = saved
    size = len(old)
    for limit in (0, 1, 7, 8, 9, 100, size // 2, size - 1, size, size + 500):
        monkeypatch.setattr(state_module, "_write", failing_writer(limit))
        with pytest.raises(DiskFull):
            cache.save(path)
        assert path.read_bytes() == old, f"the previous file changed after a save failed at byte {limit}"
        assert other_files(path.parent, path.name) == [], "a temporary file was left behind"
    monkeypatch.undo()
    cache.save(path)
    assert path.read_bytes() != old
    restored = causal_cache()
    restored.load(path)
    assert snapshot(restored) == snapshot(cache)


@pytest.mark.parametrize("stage", ["fsync", "replace"])
def test_save_failing_at_fsync_or_rename_keeps_the_previous_file(
    saved: tuple[Any, Path, bytes], monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    cache, path, old = saved

    def fail(*args: Any) -> None:
        raise DiskFull(f"{stage} failed")

    monkeypatch.setattr(state_module.os, stage, fail)
    with pytest.raises(DiskFull):
        cache.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == old and other_files(path.parent, path.name) == []


def test_first_save_interrupted_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state_module, "_write", failing_writer(50))
    with pytest.raises(DiskFull):
        causal_cache().save(tmp_path / "new.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_save_into_a_missing_folder_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        causal_cache().save(tmp_path / "missing" / "cache.safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", MAKERS)
def test_saved_files_are_plain_safetensors_with_a_checksum(tmp_path: Path, kind: str) -> None:
    cache = MAKERS[kind]()
    path = tmp_path / f"{kind}.safetensors"
    cache.save(path)
    tensors = load_file(str(path))  # any safetensors reader opens it
    expected = cache.state_dict()
    assert tensors.keys() == expected.keys()
    for name, arr in expected.items():
        assert tensors[name].dtype == arr.dtype and tensors[name].tobytes() == arr.tobytes()
    header = json.loads(path.read_bytes()[8 : 8 + int.from_bytes(path.read_bytes()[:8], "little")])
    meta = header["__metadata__"]
    assert meta["kvarray.kind"] == kind and meta["kvarray.format"] == str(STATE_FORMAT)
    assert meta[CHECKSUM_META] == state_module.state_digest(expected)
    restored = MAKERS[kind]()
    restored.load(path)
    assert snapshot(restored) == snapshot(cache)


def data_start(blob: bytes) -> int:
    return 8 + int.from_bytes(blob[:8], "little")


def corrupt_cases(blob: bytes) -> dict[str, bytes]:
    """Damaged copies of a saved file, by name."""
    start = data_start(blob)
    cuts = (0, 5, 8, start - 1, start, start + 100, len(blob) - 1)
    cases = {f"truncated to {n} bytes": blob[:n] for n in cuts}
    for where in (start, start + (len(blob) - start) // 2, len(blob) - 1):  # a flipped bit in the tensor data
        flipped = bytearray(blob)
        flipped[where] ^= 0x04
        cases[f"bit flipped at byte {where}"] = bytes(flipped)
    cases["garbage"] = bytes(range(256)) * 4
    cases["header length past the end"] = (len(blob) * 2).to_bytes(8, "little") + blob[8:]
    cases["header not JSON"] = blob[:8] + b"X" + blob[9:]
    return cases


def test_damaged_files_are_refused_13_cases(saved: tuple[Any, Path, bytes]) -> None:
    cache, path, blob = saved
    cases = corrupt_cases(blob)
    assert len(cases) == 13
    for name, data in cases.items():
        path.write_bytes(data)
        try:
            match = "not a readable safetensors file|SHA-256"
            assert_refused(cache, lambda c: c.load(path), CorruptFile, match)
        except AssertionError as exc:  # name the case that failed
            raise AssertionError(f"{name}: {exc}") from exc


def rewrite(path: Path, metadata: dict[str, str] | None = None, drop: tuple[str, ...] = (),
            tensors: dict[str, np.ndarray] | None = None) -> None:
    """Rewrite a saved file with safetensors' own writer: metadata changed (None values delete keys)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as handle:
        meta = dict(handle.metadata())
        arrays = {k: handle.get_tensor(k) for k in handle.keys()}
    meta.update({k: v for k, v in (metadata or {}).items() if v is not None})
    for key in [k for k, v in (metadata or {}).items() if v is None]:
        meta.pop(key, None)
    arrays.update(tensors or {})
    for name in drop:
        arrays.pop(name)
    save_file(arrays, str(path), metadata=meta)


def test_another_format_version_is_named(saved: tuple[Any, Path, bytes]) -> None:
    cache, path, _ = saved
    rewrite(path, {"kvarray.format": "2"})
    match = "format '2'; this kvarray reads format 1"
    assert_refused(cache, lambda c: c.load(path), StateFormatMismatch, match)
    with pytest.raises(StateFormatMismatch) as info:
        cache.load(path)
    assert (info.value.expected, info.value.found) == (1, "2")


def test_another_kind_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "encoder.safetensors"
    encoder_cache().save(path)
    match = "is not a kvarray causal cache file .kind 'encoder'."
    assert_refused(causal_cache(), lambda c: c.load(path), SpecMismatch, match)
    assert_refused(encdec_cache(), lambda c: c.load(path), SpecMismatch, "is not a kvarray encdec cache file")


def test_another_configuration_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    causal_cache(capacity=64).save(path)
    assert_refused(causal_cache(), lambda c: c.load(path), SpecMismatch, "the state was made for")


def test_a_checksum_over_changed_tensors_is_refused(saved: tuple[Any, Path, bytes]) -> None:
    """A file whose tensors were rewritten by another tool (valid safetensors) but kept the old checksum."""
    cache, path, _ = saved
    keys = load_file(str(path))["layer.0.keys"]
    rewrite(path, tensors={"layer.0.keys": keys + np.float16(1)})
    assert_refused(cache, lambda c: c.load(path), CorruptFile, "do not match the file's SHA-256")


def test_files_without_a_checksum_still_load(saved: tuple[Any, Path, bytes]) -> None:
    """Files written before the checksum and format fields (and causal files of the first layout, with
    the configuration only in the metadata) load, checked by configuration and bookkeeping only."""
    cache, path, _ = saved
    expected = snapshot(causal_cache())
    rewrite(path, {CHECKSUM_META: None, "kvarray.format": None})
    cache.load(path)
    assert snapshot(cache) == expected
    put_all(cache, [0, 1], [6, 5])
    rewrite(path, {"kvarray.kind": None}, drop=("meta.config",))
    cache.load(path)
    assert snapshot(cache) == expected


def test_state_digest_covers_names_dtypes_and_shapes() -> None:
    base = {"a": np.arange(4, dtype=np.int32)}
    digest = state_module.state_digest(base)
    assert digest == state_module.state_digest({"a": np.arange(4, dtype=np.int32)})
    for other in ({"b": base["a"]}, {"a": base["a"].view(np.float32)}, {"a": base["a"].reshape(2, 2)}):
        assert state_module.state_digest(other) != digest


def test_no_temporary_file_survives_a_save(tmp_path: Path) -> None:
    path = tmp_path / "cache.safetensors"
    for _ in range(3):
        causal_cache().save(path)
    assert os.listdir(tmp_path) == ["cache.safetensors"]
