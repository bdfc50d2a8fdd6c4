"""IO binding: zero-copy by pointer, rebinding only what changed, output buffers reused, CUDA refusals."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from ort_models import TINY

from kvarray.errors import DeviceMismatch, LayoutError
from kvarray.ort import Binder, Engine, EngineConfig, OutputBuffers, SamplingParams, device_name, is_zero_copy

GRAPH = TINY / "native" / "decoder_step.pool.float32.onnx"


@pytest.fixture(scope="module")
def session() -> ort.InferenceSession:
    return ort.InferenceSession(str(GRAPH), providers=["CPUExecutionProvider"])


def test_numpy_input_is_bound_zero_copy_and_rebound_only_when_it_changes(session):
    binder = Binder(session)
    keys = np.zeros((64, 2, 16), np.float32)
    bound = binder.bind_input("past_key.0", keys[:32])
    assert is_zero_copy(bound.value, keys) and bound.value.data_ptr() == keys.ctypes.data
    assert binder.bind_input("past_key.0", keys[:32]) is bound and binder.rebinds == 1  # same memory
    assert binder.bind_input("past_key.0", keys[:64]) is not bound and binder.rebinds == 2  # new shape


def test_non_contiguous_arrays_are_refused(session):
    with pytest.raises(LayoutError, match="C-contiguous"):
        Binder(session).bind_input("past_key.0", np.zeros((2, 16, 8), np.float32).transpose(1, 0, 2))


class FakeDeviceArray:
    """Stands for a CuPy array: only ``__cuda_array_interface__`` (no device here)."""

    def __init__(self) -> None:
        self.shape, self.dtype = (4, 2, 16), np.dtype(np.float32)
        self.__cuda_array_interface__ = {"data": (1 << 20, False), "shape": self.shape, "typestr": "<f4"}


def test_device_names_and_cuda_refusals(session):
    assert device_name(np.zeros(3)) == "cpu" and device_name(FakeDeviceArray()) == "cuda"
    with pytest.raises(DeviceMismatch, match="a cpu array cannot be bound to a session on 'cuda'"):
        Binder(session, device="cuda").bind_input("past_key.0", np.zeros((4, 2, 16), np.float32))
    with pytest.raises(DeviceMismatch, match="a cuda array cannot be bound to a session on 'cpu'"):
        Binder(session).bind_input("past_key.0", FakeDeviceArray())
    with pytest.raises(DeviceMismatch):
        Binder(session, device="tpu")


def test_output_buffers_grow_and_hand_out_leading_rows():
    buffers = OutputBuffers(np, {"new_key.0": ((2, 16), np.float32)}, rows=4)
    first = buffers.view("new_key.0", 3)
    assert first.shape == (3, 2, 16) and first.flags.c_contiguous
    assert buffers.view("new_key.0", 4).ctypes.data == first.ctypes.data
    grown = buffers.view("new_key.0", 5)
    assert buffers.capacity("new_key.0") == 8 and grown.shape == (5, 2, 16)


def test_engine_binds_the_pool_view_and_outputs_zero_copy(prompts):
    eng = Engine.from_model_dir(TINY, EngineConfig(threads=1, capacity=256))
    eng.add_request(prompts[0], SamplingParams(max_new_tokens=8))
    eng.add_request(prompts[1], SamplingParams(max_new_tokens=8))
    eng.step()  # prefill
    pointers = []
    for _ in range(3):  # decode steps: same T, same n_kv
        eng.step()
        for layer in range(eng.spec.num_layers):
            view = eng.cache.get(layer, "pool")
            assert is_zero_copy(eng.binder.bound(f"past_key.{layer}").value, view.keys)
            assert is_zero_copy(eng.binder.bound(f"past_value.{layer}").value, view.values)
            assert view.keys.base is not None  # a slice of the pool, not a copy
        new_key = eng.binder.bound("new_key.0")
        assert new_key.shape == (2, 2, 16) and is_zero_copy(new_key.value, eng._new_keys[0])
        pointers.append(
            (new_key.pointer, eng.binder.bound("logits").pointer, eng.binder.bound("input_ids").pointer)
        )
    assert pointers[0] == pointers[1] == pointers[2]  # output and input buffers reused across steps
    rebinds = eng.binder.rebinds
    eng.step()
    # a decode step with the same T and n_kv rebinds nothing: the cache refills its bias buffer in place
    assert eng.binder.rebinds == rebinds
    assert is_zero_copy(eng.binder.bound("attention_bias").value, eng.cache.plan.bias_before_put)
