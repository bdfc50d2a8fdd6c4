"""KVSpec and RopeSpec: validation and the arithmetic every other module relies on."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kvarray import DTypeMismatch, KVSpec, Llama3Scaling, RopeSpec, ShapeMismatch
from kvarray.spec import kv_dtype_pair, row_bytes


@pytest.mark.parametrize(
    ("kv_dtype", "expected"),
    [
        # 16 layers * (keys + values) * 8 heads * 64 values * bytes a value (+ 2-byte scale per 32 values)
        ("float32", 16 * 2 * 512 * 4),
        ("float16", 16 * 2 * 512 * 2),
        ("int8", 16 * 2 * (512 + 16 * 2)),
        (("int8", "float16"), 16 * ((512 + 32) + 512 * 2)),
    ],
)
def test_bytes_per_token(kv_dtype, expected):
    assert KVSpec(16, 8, 64).bytes_per_token(kv_dtype) == expected


def test_int8_costs_8_5_bits_a_value():
    spec = KVSpec(16, 8, 64)
    assert spec.bytes_per_token("int8") / spec.bytes_per_token("float16") == 0.53125


@pytest.mark.parametrize("bad", [dict(num_layers=0), dict(num_kv_heads=-1), dict(head_dim=2.5)])
def test_spec_rejects_non_positive_sizes(bad):
    args = dict(num_layers=2, num_kv_heads=2, head_dim=8) | bad
    with pytest.raises(ShapeMismatch, match=next(iter(bad))):
        KVSpec(**args)


def test_spec_rejects_unknown_compute_dtype():
    with pytest.raises(DTypeMismatch, match="float32' or 'float16"):
        KVSpec(2, 2, 8, dtype="int8")


def test_kv_dtype_pair():
    assert kv_dtype_pair("int8") == ("int8", "int8")
    assert kv_dtype_pair(("int8", "float16")) == ("int8", "float16")
    with pytest.raises(DTypeMismatch, match="bfloat16"):
        kv_dtype_pair("bfloat16")
    with pytest.raises(DTypeMismatch, match="pair"):
        kv_dtype_pair(("int8", "int8", "int8"))


def test_int8_groups_must_tile_a_row():
    assert row_bytes(80 * 2, "int8", 32) == 160 + 5 * 2  # head_dim 80, 2 heads: groups straddle heads
    with pytest.raises(ShapeMismatch, match="tile"):
        row_bytes(80, "int8", 32)


def test_rope_inv_freq_plain():
    inv = RopeSpec(theta=10000.0).inv_freq(8)
    np.testing.assert_allclose(inv, [1.0, 10000**-0.25, 10000**-0.5, 10000**-0.75])


def test_rope_partial_rotary_dims():
    assert RopeSpec(rotary_dim=32).rotary_dims(128) == 32
    assert RopeSpec(rotary_dim=32).inv_freq(128).shape == (16,)
    for bad in (0, 3, 130):
        with pytest.raises(ShapeMismatch, match="rotary_dim"):
            RopeSpec(rotary_dim=bad).rotary_dims(128)


def test_rope_llama3_scaling_keeps_short_and_slows_long_wavelengths():
    scaling = Llama3Scaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
    )
    plain = RopeSpec(theta=500000.0).inv_freq(128)
    scaled = RopeSpec(theta=500000.0, scaling=scaling).inv_freq(128)
    wavelen = 2 * math.pi / plain
    short, long_ = wavelen < 8192 / 4, wavelen > 8192 / 1
    np.testing.assert_array_equal(scaled[short], plain[short])
    np.testing.assert_allclose(scaled[long_], plain[long_] / 8)
    middle = ~short & ~long_
    assert middle.any()
    assert ((scaled[middle] < plain[middle]) & (scaled[middle] > plain[middle] / 8)).all()
