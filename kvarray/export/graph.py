"""A small ONNX graph builder and the layers every exported architecture shares.

`GraphBuilder` collects nodes, inputs, outputs and initializers and names intermediate values for you;
the functions below it are layers written once for all architectures: linear projections, RMSNorm,
rotary tables and their application (NeoX pairing, partial rotary), and int8/float16 pool decoding.
Shapes in the docstrings use T (tokens of the pass), E (hidden size), H (heads), D (head_dim).
Only standard ONNX ops (opset `OPSET`) are used, so the graphs run on any ONNX runtime; ONNX Runtime's
optimizer then fuses them (RMSNorm -> SimplifiedLayerNormalization, Transpose + MatMul -> FusedMatMul).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
#: the domain of ONNX Runtime's contrib ops (GroupQueryAttention in the decode view), opset version 1
CONTRIB_DOMAIN = "com.microsoft"
INT64_MAX = np.iinfo(np.int64).max
#: ONNX element types of the dtype names used in kvarray.
ELEM_TYPE = {
    "float32": TensorProto.FLOAT,
    "float16": TensorProto.FLOAT16,
    "int8": TensorProto.INT8,
    "int32": TensorProto.INT32,
    "int64": TensorProto.INT64,
}

Dim = int | str


class GraphBuilder:
    """Collects one ONNX graph: inputs, outputs, initializers and nodes, naming values as it goes."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._constants: dict[tuple[str, bytes, tuple[int, ...]], str] = {}
        self._count = 0
        self._scope: list[str] = []

    # -- values -------------------------------------------------------------------------------------
    def input(self, name: str, dtype: str, shape: Sequence[Dim]) -> str:
        """Declare graph input `name` of dtype name `dtype` and `shape` (ints or symbolic names)."""
        self.inputs.append(helper.make_tensor_value_info(name, ELEM_TYPE[dtype], list(shape)))
        return name

    def output(self, name: str, dtype: str, shape: Sequence[Dim]) -> None:
        """Declare graph output `name`; a node must produce a value of that name."""
        self.outputs.append(helper.make_tensor_value_info(name, ELEM_TYPE[dtype], list(shape)))

    def weight(self, name: str, array: np.ndarray) -> str:
        """Add `array` as an initializer called `name` (its dtype kept) and return the name."""
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(self, value: Any, dtype: Any = np.int64) -> str:
        """A constant initializer (deduplicated by value): ints default to int64, e.g. shapes and axes."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.tobytes(), array.shape)
        if key not in self._constants:
            self._constants[key] = self.weight(f"const.{len(self._constants)}", array)
        return self._constants[key]

    # -- nodes --------------------------------------------------------------------------------------
    def scope(self, prefix: str) -> _Scope:
        """Context manager prefixing the names of the nodes made inside it (e.g. ``layers.3``)."""
        return _Scope(self, prefix)

    def op(
        self,
        op_type: str,
        *inputs: str,
        outputs: int | Sequence[str] = 1,
        domain: str = "",
        **attributes: Any,
    ) -> Any:
        """Add one node and return its output name (or list of names when `outputs` asks for several).

        `outputs` is a count (names are generated) or the explicit output names (e.g. a graph output).
        """
        self._count += 1
        base = "/".join([*self._scope, f"{op_type}_{self._count}"])
        names = [f"{base}:{i}" for i in range(outputs)] if isinstance(outputs, int) else list(outputs)
        self.nodes.append(
            helper.make_node(op_type, list(inputs), names, name=base, domain=domain or None, **attributes)
        )
        return names[0] if isinstance(outputs, int) and outputs == 1 else names

    # -- the model ----------------------------------------------------------------------------------
    def model(self, metadata: dict[str, str]) -> onnx.ModelProto:
        """The finished, checked ModelProto with `metadata` as its metadata_props."""
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        opsets = [helper.make_opsetid("", OPSET)]
        if any(node.domain == CONTRIB_DOMAIN for node in self.nodes):
            opsets.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))  # ONNX Runtime's contrib ops
        model = helper.make_model(graph, opset_imports=opsets, producer_name="kvarray")
        model.ir_version = 8  # readable by onnxruntime >= 1.14
        helper.set_model_props(model, metadata)
        onnx.checker.check_model(model)
        return model


class _Scope:
    def __init__(self, builder: GraphBuilder, prefix: str) -> None:
        self.builder, self.prefix = builder, prefix

    def __enter__(self) -> None:
        self.builder._scope.append(self.prefix)

    def __exit__(self, *exc: object) -> None:
        self.builder._scope.pop()


# -- layers shared by the architectures ---------------------------------------------------------------
def linear(g: GraphBuilder, x: str, weight: np.ndarray, name: str, bias: np.ndarray | None = None) -> str:
    """``x [T, in] @ weight.T (+ bias)`` -> ``[T, out]``; `weight` is ``[out, in]`` as PyTorch stores it.

    The initializer is stored transposed (``[in, out]``), the layout MatMul reads without a copy.
    """
    y = g.op("MatMul", x, g.weight(f"{name}.weight", np.ascontiguousarray(weight.T)))
    return g.op("Add", y, g.weight(f"{name}.bias", bias)) if bias is not None else y


def rms_norm(g: GraphBuilder, x: str, weight: np.ndarray, eps: float, name: str) -> str:
    """RMSNorm over the last axis of ``x [..., E]``: ``x / sqrt(mean(x^2) + eps) * weight``.

    Written as Pow, ReduceMean, Add, Sqrt, Div, Mul: the pattern ONNX Runtime fuses into one
    SimplifiedLayerNormalization node.
    """
    square = g.op("Pow", x, g.const(2.0, np.float32))
    mean = g.op("ReduceMean", square, axes=[-1], keepdims=1)
    root = g.op("Sqrt", g.op("Add", mean, g.const(eps, np.float32)))
    return g.op("Mul", g.op("Div", x, root), g.weight(f"{name}.weight", weight))


def rotary_tables(g: GraphBuilder, position_ids: str, inv_freq: np.ndarray) -> tuple[str, str]:
    """``cos``, ``sin`` ``[T, 1, R / 2]`` float32 of ``position_ids [T]`` int64 and ``inv_freq [R / 2]``.

    The angle is ``float32(position) * float32(inv_freq)``, as transformers computes it.
    """
    positions = g.op("Unsqueeze", g.op("Cast", position_ids, to=TensorProto.FLOAT), g.const([1]))
    angles = g.op("Mul", positions, g.weight("rope.inv_freq", inv_freq.astype(np.float32)))
    angles = g.op("Unsqueeze", angles, g.const([1]))
    return g.op("Cos", angles), g.op("Sin", angles)


def apply_rope(g: GraphBuilder, x: str, cos: str, sin: str, rotary_dim: int, head_dim: int) -> str:
    """Rotate ``x [T, H, D]`` by the tables ``[T, 1, R / 2]`` with NeoX pairing (value i with i + R / 2).

    The first R = `rotary_dim` values of each head rotate, the remaining ``D - R`` pass through unchanged
    (partial rotary): ``[x1 cos - x2 sin, x2 cos + x1 sin, x_pass]``.
    """
    half = rotary_dim // 2
    sizes = [half, half] + ([head_dim - rotary_dim] if rotary_dim < head_dim else [])
    parts = g.op("Split", x, g.const(sizes), axis=-1, outputs=len(sizes))
    x1, x2 = parts[0], parts[1]
    first = g.op("Sub", g.op("Mul", x1, cos), g.op("Mul", x2, sin))
    second = g.op("Add", g.op("Mul", x2, cos), g.op("Mul", x1, sin))
    return g.op("Concat", first, second, *parts[2:], axis=-1)


def decode_pool(g: GraphBuilder, rows: str, dtype: str, scales: str | None, row_shape: Sequence[int]) -> str:
    """Float32 values of a pool view ``rows [N, *row_shape]`` stored as `dtype`.

    float32 passes through (no node, no copy); float16 is cast; int8 is dequantized with ``scales
    [N, prod(row_shape) // 32]`` float16: each group of 32 consecutive values of a flattened row is
    ``float32(q) * float32(scale)``. float16 and int8 make one float32 copy of the view per layer.
    """
    if dtype == "float32":
        return rows
    values = g.op("Cast", rows, to=TensorProto.FLOAT)
    if dtype == "float16":
        return values
    assert scales is not None, "int8 pools come with scales"
    grouped = g.op("Reshape", values, g.const([0, -1, 32]))
    factor = g.op("Unsqueeze", g.op("Cast", scales, to=TensorProto.FLOAT), g.const([-1]))
    return g.op("Reshape", g.op("Mul", grouped, factor), g.const([0, *row_shape]))


def silu(g: GraphBuilder, x: str) -> str:
    """``x * sigmoid(x)`` (SiLU / swish)."""
    return g.op("Mul", x, g.op("Sigmoid", x))


def gelu(g: GraphBuilder, x: str, approximate: bool = False) -> str:
    """GELU of `x`: exact ``x * (1 + erf(x / sqrt(2))) / 2``, or with `approximate` the tanh form
    (``gelu_new``: ``x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 x^3))) / 2``, T5 v1.1's gated-gelu)."""
    if approximate:
        cube = g.op("Mul", g.op("Pow", x, g.const(3.0, np.float32)), g.const(0.044715, np.float32))
        inner = g.op("Mul", g.op("Add", x, cube), g.const(np.sqrt(2.0 / np.pi), np.float32))
        gate = g.op("Add", g.op("Tanh", inner), g.const(1.0, np.float32))
    else:
        erf = g.op("Erf", g.op("Div", x, g.const(np.sqrt(2.0), np.float32)))
        gate = g.op("Add", erf, g.const(1.0, np.float32))
    return g.op("Mul", g.op("Mul", x, gate), g.const(0.5, np.float32))


def layer_norm(g: GraphBuilder, x: str, weight: np.ndarray, bias: np.ndarray, eps: float, name: str) -> str:
    """LayerNorm over the last axis of ``x [..., E]``, `weight` and `bias` ``[E]``: one LayerNormalization."""
    w, b = g.weight(f"{name}.weight", weight), g.weight(f"{name}.bias", bias)
    return g.op("LayerNormalization", x, w, b, axis=-1, epsilon=float(eps))
