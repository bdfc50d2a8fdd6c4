"""The metadata every exported graph carries, so that a graph explains itself to the adapter.

Keys of the ONNX ``metadata_props`` (all values are strings; JSON where structured):

    kvarray.version       kvarray version that exported the graph
    kvarray.architecture  "llama" (later "t5", "whisper")
    kvarray.graph         the graph's role: "decoder_step" (encoder-decoder models add "encoder")
    kvarray.spec          JSON {num_layers, num_kv_heads, head_dim, dtype}: a `KVSpec`
    kvarray.rope          JSON {theta, rotary_dim, style, scaling} or "null" (no rotary embedding)
    kvarray.vocab_size    logits width
    kvarray.kv_dtype      storage of past_key/past_value inputs: float32, float16 or int8
    kvarray.group_size    int8 values per float16 scale (32)
    kvarray.view          "pool" or "gathered"
    kvarray.inputs        JSON list of input names, in order
    kvarray.outputs       JSON list of output names, in order
    kvarray.tokens        JSON {bos_token_id, eos_token_id, pad_token_id} from the checkpoint's config
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from ..errors import SpecMismatch
from ..spec import DEFAULT_GROUP_SIZE, KVSpec, Llama3Scaling, RopeSpec, RopeStyle

PREFIX = "kvarray."


def rope_to_json(rope: RopeSpec | None) -> Any:
    """A JSON-able dict of `rope` (None stays None)."""
    if rope is None:
        return None
    scaling = None
    if rope.scaling is not None:
        s = rope.scaling
        scaling = {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        }
    return {"theta": rope.theta, "rotary_dim": rope.rotary_dim, "style": rope.style.value, "scaling": scaling}


def rope_from_json(data: Any) -> RopeSpec | None:
    """The `RopeSpec` written by `rope_to_json`."""
    if data is None:
        return None
    scaling = data.get("scaling")
    if scaling is not None:
        scaling = Llama3Scaling(
            factor=scaling["factor"],
            low_freq_factor=scaling["low_freq_factor"],
            high_freq_factor=scaling["high_freq_factor"],
            original_max_position_embeddings=scaling["original_max_position_embeddings"],
        )
    return RopeSpec(
        theta=data["theta"], rotary_dim=data["rotary_dim"], style=RopeStyle(data["style"]), scaling=scaling
    )


def graph_metadata(
    *,
    architecture: str,
    graph: str,
    spec: KVSpec,
    rope: RopeSpec | None,
    vocab_size: int,
    kv_dtype: str,
    view: str,
    inputs: list[str],
    outputs: list[str],
    tokens: dict[str, Any],
) -> dict[str, str]:
    """The metadata_props of one graph (keys listed in the module docstring)."""
    from .. import __version__

    spec_json = {
        "num_layers": spec.num_layers,
        "num_kv_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "dtype": spec.dtype,
    }
    values: dict[str, Any] = {
        "version": __version__,
        "architecture": architecture,
        "graph": graph,
        "spec": json.dumps(spec_json),
        "rope": json.dumps(rope_to_json(rope)),
        "vocab_size": str(vocab_size),
        "kv_dtype": kv_dtype,
        "group_size": str(DEFAULT_GROUP_SIZE),
        "view": view,
        "inputs": json.dumps(inputs),
        "outputs": json.dumps(outputs),
        "tokens": json.dumps(tokens),
    }
    return {PREFIX + key: value for key, value in values.items()}


@dataclass(frozen=True)
class GraphInfo:
    """What a native graph says about itself (its metadata, parsed)."""

    architecture: str
    graph: str
    spec: KVSpec
    rope: RopeSpec | None
    vocab_size: int
    kv_dtype: str
    group_size: int
    view: str
    inputs: list[str]
    outputs: list[str]
    tokens: dict[str, Any]
    version: str


def read_metadata(model: str | Path | onnx.ModelProto) -> GraphInfo:
    """Parse the kvarray metadata of a graph file (weights are not loaded) or a loaded ModelProto.

    Raises:
        SpecMismatch: the graph has no kvarray metadata (it was not exported by kvarray).
    """
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    props = {p.key[len(PREFIX) :]: p.value for p in model.metadata_props if p.key.startswith(PREFIX)}
    if "architecture" not in props:
        raise SpecMismatch("this graph has no kvarray metadata: it was not exported by kvarray.export")
    spec = json.loads(props["spec"])
    return GraphInfo(
        architecture=props["architecture"],
        graph=props["graph"],
        spec=KVSpec(spec["num_layers"], spec["num_kv_heads"], spec["head_dim"], spec["dtype"]),
        rope=rope_from_json(json.loads(props["rope"])),
        vocab_size=int(props["vocab_size"]),
        kv_dtype=props["kv_dtype"],
        group_size=int(props["group_size"]),
        view=props["view"],
        inputs=json.loads(props["inputs"]),
        outputs=json.loads(props["outputs"]),
        tokens=json.loads(props["tokens"]),
        version=props["version"],
    )
