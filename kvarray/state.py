"""Cache state shared by every cache: the configuration record, pool copies and safetensors files.

A cache's `state_dict` is a flat ``{name: host NumPy array}``: ``meta.config`` (the configuration as
uint8 JSON, compared on load), the bookkeeping arrays and every pool. The helpers here build and check
the parts all caches have in common; each cache adds and checks its own bookkeeping. A failed check
raises `SpecMismatch` before anything is written.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from types import ModuleType
from typing import Any

import numpy as np

from .errors import SpecMismatch
from .xp import to_numpy

#: Version of the `state_dict` / file layout.
STATE_FORMAT = 1
#: The `state_dict` key of the configuration record (uint8 JSON).
CONFIG_KEY = "meta.config"

NamedArrays = Iterable[tuple[str, Any]]


def config_json(config: Mapping[str, Any]) -> str:
    """The configuration record as canonical JSON (sorted keys), ``format`` included."""
    return json.dumps({"format": STATE_FORMAT, **config}, sort_keys=True)


def config_array(config: str) -> np.ndarray:
    """``config`` (JSON) as the uint8 array stored under `CONFIG_KEY`."""
    return np.frombuffer(config.encode(), np.uint8).copy()


def check_config(state: Mapping[str, Any], ours: str, what: str) -> None:
    """Raise `SpecMismatch` unless ``state[CONFIG_KEY]`` is the configuration `ours` (JSON) of a `what`."""
    config = state.get(CONFIG_KEY)
    if config is None:
        raise SpecMismatch(f"not a kvarray {what} state: {CONFIG_KEY} is missing")
    theirs = bytes(np.asarray(config, np.uint8)).decode()
    if json.loads(theirs) != json.loads(ours):
        raise SpecMismatch(f"the state was made for {theirs}; this cache is {ours}")


def copy_pools(named: NamedArrays) -> dict[str, np.ndarray]:
    """Host copies of the named pools (device pools are copied to the host)."""
    return {name: np.array(to_numpy(arr), copy=True) for name, arr in named}


def check_pools(state: Mapping[str, Any], named: NamedArrays) -> None:
    """Raise `SpecMismatch` unless `state` holds every named pool with its shape and dtype."""
    for name, arr in named:
        saved = state.get(name)
        if saved is None or (tuple(saved.shape), np.dtype(saved.dtype)) != (tuple(arr.shape), arr.dtype):
            raise SpecMismatch(f"{name} is missing or not {np.dtype(arr.dtype)} {tuple(arr.shape)}")


def write_pools(state: Mapping[str, Any], named: NamedArrays, xp: ModuleType) -> None:
    """Overwrite the named pools in place with `state`'s arrays (checked by `check_pools`)."""
    for name, arr in named:
        arr[...] = xp.asarray(state[name])


def build_state(
    config: str, bookkeeping: Mapping[str, np.ndarray], pools: NamedArrays
) -> dict[str, np.ndarray]:
    """A `state_dict`: the configuration record (`config` JSON), the cache's bookkeeping arrays, and host
    copies of its named pools."""
    state = {CONFIG_KEY: config_array(config)}
    state.update(bookkeeping)
    state.update(copy_pools(pools))
    return state


def check_common(state: Mapping[str, Any], config: str, what: str, pools: NamedArrays) -> None:
    """Raise `SpecMismatch` unless `state` is made for the configuration `config` (JSON) of a `what` and
    holds every named pool with its shape and dtype (`check_config`, `check_pools`)."""
    check_config(state, config, what)
    check_pools(state, pools)


def save_state(path: str, state: Mapping[str, np.ndarray], kind: str) -> None:
    """Write a cache's `state_dict` to a safetensors file; the metadata strings name the cache's `kind`
    ("causal", "encoder", "encdec"), the kvarray version and, when present, the configuration."""
    from safetensors.numpy import save_file

    from . import __version__

    metadata = {"kvarray.kind": kind, "kvarray.version": __version__}
    if CONFIG_KEY in state:
        metadata["kvarray.config"] = bytes(np.asarray(state[CONFIG_KEY], np.uint8)).decode()
    save_file(dict(state), str(path), metadata=metadata)


def load_state(path: str, kind: str) -> dict[str, np.ndarray]:
    """The `state_dict` in a file written by `save_state` for a cache of `kind`; `SpecMismatch` otherwise.

    Causal-cache files of the first layout (no ``kvarray.kind``, the configuration only in the metadata
    string ``kvarray.config``) are read too.
    """
    from safetensors import safe_open
    from safetensors.numpy import load_file

    with safe_open(str(path), framework="np") as handle:
        metadata = handle.metadata() or {}
    legacy = "kvarray.kind" not in metadata and "kvarray.config" in metadata
    found = "causal" if legacy else metadata.get("kvarray.kind")
    if found != kind:
        raise SpecMismatch(f"{path} is not a kvarray {kind} cache file (kind {found!r})")
    state: dict[str, np.ndarray] = dict(load_file(str(path)))
    if CONFIG_KEY not in state and "kvarray.config" in metadata:
        state[CONFIG_KEY] = config_array(metadata["kvarray.config"])
    return state
