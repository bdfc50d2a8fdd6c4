"""The Numba CPU kernels against the NumPy reference: bit-identical (rope_shift: within float64 rounding).

Property tests draw shapes, dtypes and plans with hypothesis and values from a seeded generator (with
special values injected: float16 max, subnormals, zeros, one huge value among tiny ones); table tests use
values that encode their coordinates, ``100 * cell + 10 * head + dim``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvarray.ops import cpu, reference
from kvarray.spec import Llama3Scaling, RopeSpec, RopeStyle

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FLOATS = (np.float16, np.float32)
INDEX = (np.int32, np.int64)
SPECIALS = np.array([65504.0, -65504.0, 2.0**-24, -(2.0**-24), 2.0**-20, 0.0, -0.0, 1e-7, 3e4])


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal shapes, dtypes and bytes (NaN == NaN, -0 != +0)."""
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def values(rng: np.random.Generator, shape: tuple[int, ...], dtype: type, wild: bool) -> np.ndarray:
    """Normal values with per-row magnitudes from 1e-8 to 1e4; `wild` injects special values and zeros."""
    x = rng.standard_normal(shape) * np.exp(rng.uniform(-18, 9, shape[:1] + (1,) * (len(shape) - 1)))
    if wild and x.size:
        flat = x.reshape(-1)
        spots = rng.integers(0, flat.size, max(1, flat.size // 50))
        flat[spots] = rng.choice(SPECIALS, spots.size)
        if shape[0] > 1:
            x[rng.integers(0, shape[0])] = 0.0  # an all-zero row: scale 0, exact zeros
    return x.astype(dtype)


def int8_pool(
    x: np.ndarray, group: int, quantize: Callable[..., None] = reference.quantize_int8
) -> tuple[np.ndarray, np.ndarray]:
    """``x [N, H, D]`` float quantized by `quantize` in groups of `group`: int8 ``q`` (x's shape) and float16
    ``scales [N, H * D // group]``."""
    n, h, d = x.shape
    q, scales = np.zeros(x.shape, np.int8), np.zeros((n, h * d // group), np.float16)
    quantize(x, q, scales)
    return q, scales


@st.composite
def pool_shapes(draw: st.DrawFn) -> dict:
    heads = draw(st.integers(1, 8))
    dim = draw(st.sampled_from([64, 80, 128]))
    group = draw(st.sampled_from([g for g in (16, 32, 64) if (heads * dim) % g == 0]))
    cells = draw(st.integers(0, 12))
    return {
        "heads": heads,
        "dim": dim,
        "group": group,
        "cells": cells,
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


# --- scatter ------------------------------------------------------------------------------------------------


@SETTINGS
@given(
    shape=pool_shapes(),
    pool_dtype=st.sampled_from(FLOATS + (np.int8,)),
    row_dtype=st.sampled_from(FLOATS),
    index=st.sampled_from(INDEX),
    wild=st.booleans(),
    data=st.data(),
)
def test_scatter_rows_matches_reference(
    shape: dict, pool_dtype: type, row_dtype: type, index: type, wild: bool, data: st.DataObject
) -> None:
    rng = np.random.default_rng(shape["seed"])
    n, h, d = shape["cells"], shape["heads"], shape["dim"]
    t = data.draw(st.integers(0, n))
    pool = rng.integers(-100, 100, (n, h, d)).astype(pool_dtype)
    scales = rng.random((n, h * d // shape["group"])).astype(np.float16) if pool_dtype == np.int8 else None
    rows = values(rng, (t, h, d), row_dtype, wild)
    cells = rng.permutation(n)[:t].astype(index)
    got, want = pool.copy(), pool.copy()
    got_s, want_s = (None, None) if scales is None else (scales.copy(), scales.copy())
    cpu.scatter_rows(got, rows, cells, got_s)
    with np.errstate(over="ignore"):
        reference.scatter_rows(want, rows, cells, want_s)
    assert same_bits(got, want)
    if scales is not None:
        assert same_bits(got_s, want_s)


# --- quantize / dequantize ----------------------------------------------------------------------------------


def assert_int8_error_bound(x: np.ndarray, q: np.ndarray, scales: np.ndarray) -> None:
    """|x - x'| <= scale / 2 where x is within the 127 steps of its scale; clipped beyond that.

    A normal float16 scale (>= 2**-14) is within 2**-11 of absmax / 127, so no value of its group clips;
    a subnormal scale is coarser, and the values past 127.5 scales (at most ~127 * 2**-25 apart) clip.
    """
    rows = x.shape[0]
    xg = x.reshape(rows, scales.shape[1], x[0].size // scales.shape[1] if rows else 0).astype(np.float64)
    s = scales.astype(np.float64)[:, :, None]
    back = q.reshape(xg.shape).astype(np.float32) * scales.astype(np.float32)[:, :, None]
    clipped = np.maximum(np.abs(xg) - 127.5 * s, 0)
    assert (np.abs(xg - back) <= s / 2 + clipped).all()
    assert (clipped[np.broadcast_to(s >= 2.0**-14, clipped.shape)] == 0).all()


@SETTINGS
@given(
    shape=pool_shapes(), dtype=st.sampled_from(FLOATS), out_dtype=st.sampled_from(FLOATS), wild=st.booleans()
)
def test_quantize_and_dequantize_match_reference(
    shape: dict, dtype: type, out_dtype: type, wild: bool
) -> None:
    rng = np.random.default_rng(shape["seed"])
    n, h, d = shape["cells"], shape["heads"], shape["dim"]
    x = values(rng, (n, h, d), dtype, wild)
    got_q, want_q = np.zeros(x.shape, np.int8), np.zeros(x.shape, np.int8)
    got_s = np.zeros((n, h * d // shape["group"]), np.float16)
    want_s = got_s.copy()
    cpu.quantize_int8(x, got_q, got_s)
    reference.quantize_int8(x, want_q, want_s)
    assert same_bits(got_q, want_q) and same_bits(got_s, want_s)
    assert_int8_error_bound(x, got_q, got_s)
    got_x, want_x = np.zeros(x.shape, out_dtype), np.zeros(x.shape, out_dtype)
    cpu.dequantize_int8(got_q, got_s, got_x)
    with np.errstate(over="ignore"):
        reference.dequantize_int8(want_q, want_s, want_x)
    assert same_bits(got_x, want_x)


@pytest.mark.parametrize(
    "group, expect_scale",
    [
        ([65504.0] * 32, np.float16(65504 / 127)),  # float16 max
        ([0.0] * 32, np.float16(0)),  # all zeros: scale 0, q 0
        ([2.0**-24] + [0.0] * 31, np.float16(2.0**-24)),  # a tiny subnormal: scale floored to 2**-24
        ([3e4] + [1e-3] * 31, np.float16(3e4 / 127)),  # one huge value among tiny ones
        ([-5.0, 5.0] + [0.5] * 30, np.float16(5 / 127)),  # +- extremes
        ([np.inf] + [1.0] * 31, np.float16(65504)),  # inf: scale clamps to 65504, q saturates
    ],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_quantize_extremes(group: list, expect_scale: np.float16, dtype: type) -> None:
    x = np.array([group], dtype=np.float32).astype(dtype)
    got_q, got_s = np.zeros((1, 32), np.int8), np.zeros((1, 1), np.float16)
    want_q, want_s = got_q.copy(), got_s.copy()
    with np.errstate(over="ignore"):
        cpu.quantize_int8(x, got_q, got_s)
        reference.quantize_int8(x, want_q, want_s)
    assert same_bits(got_q, want_q) and same_bits(got_s, want_s)
    if not (dtype == np.float16 and group[0] == 3e4):  # float16 3e4 rounds to 29984
        assert got_s[0, 0] == expect_scale
    if group[0] == 0.0:
        assert (got_q == 0).all()
    if np.isfinite(x.astype(np.float32)).all():
        assert_int8_error_bound(x, got_q, got_s)


def test_quantize_nan_group_gets_nan_scale_and_zeros() -> None:
    x = np.ones((1, 64), np.float32)
    x[0, 3] = np.nan
    q, s = np.full((1, 64), 9, np.int8), np.zeros((1, 2), np.float16)
    cpu.quantize_int8(x, q, s)
    assert np.isnan(s[0, 0]) and (q[0, :32] == 0).all()
    assert s[0, 1] == np.float16(1 / 127) and (q[0, 32:] == 127).all()


def test_half_conversions_match_numpy_on_every_float16() -> None:
    every = np.arange(2**16, dtype=np.uint16).view(np.float16).reshape(2**10, 2**6)
    pool = np.zeros(every.shape + (1,), np.float32)
    cpu.scatter_rows(pool.reshape(2**10, 1, 2**6), every.reshape(2**10, 1, 2**6), np.arange(2**10))
    assert same_bits(pool.reshape(every.shape), every.astype(np.float32))
    back = np.zeros(every.shape, np.float16)
    cpu.scatter_rows(back.reshape(2**10, 1, 2**6), pool.reshape(2**10, 1, 2**6), np.arange(2**10))
    assert same_bits(back, every)


@pytest.mark.parametrize("group", [16, 32, 64])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_quantize_ties_match_reference(group: int, dtype: type) -> None:
    """Values at and next to half-integer multiples of their scale: ``rint`` ties go to even, and the
    kernels' fixed-size (g = 32) and general group loops round exactly as the reference."""
    rng = np.random.default_rng(group)
    rows = 64
    scale = rng.choice([2.0**-24, 2.0**-14, 0.01, 1.0, 3.0, 65504 / 127], (rows, 1)).astype(np.float16)
    steps = rng.integers(-127, 127, (rows, 4 * group)) + 0.5
    x = (steps * scale.astype(np.float64)).astype(dtype)
    x[:, ::3] = np.nextafter(x[:, ::3], np.inf)
    x[:, 1::3] = np.nextafter(x[:, 1::3], -np.inf)
    x[:, ::group] = np.minimum(127 * scale.astype(np.float32), 65504).astype(dtype)  # absmax: 127 steps
    got_q, got_s = np.zeros(x.shape, np.int8), np.zeros((rows, 4), np.float16)
    want_q, want_s = got_q.copy(), got_s.copy()
    cpu.quantize_int8(x, got_q, got_s)
    reference.quantize_int8(x, want_q, want_s)
    assert same_bits(got_q, want_q) and same_bits(got_s, want_s)


@pytest.mark.parametrize("out_dtype", [np.float32, np.float16])
def test_dequantize_special_scales_match_reference(out_dtype: type) -> None:
    """Scales that are inf, NaN, subnormal or the largest float16 (with q = 0, -128 and 127) take the kernels'
    value-by-value path; finite ones the vector path. Both give the reference's bits."""
    special = [np.inf, -np.inf, np.nan, 2.0**-24, 2.0**-15, 65504.0, -2.0, 0.0, -0.0, 1.0]
    scales = np.array(special * 4, np.float16).reshape(10, 4)
    q = np.random.default_rng(3).integers(-128, 128, (10, 4 * 32)).astype(np.int8)
    q[:, ::7], q[:, 1::9], q[:, 2::11] = 0, -128, 127
    got, want = np.zeros(q.shape, out_dtype), np.zeros(q.shape, out_dtype)
    cpu.dequantize_int8(q, scales, got)
    with np.errstate(over="ignore", invalid="ignore"):
        reference.dequantize_int8(q, scales, want)
    assert same_bits(got, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_quantize_and_dequantize_zero_rows(dtype: type) -> None:
    """R = 0: the kernels and the reference write nothing and raise nothing."""
    x, q, s = np.zeros((0, 4, 32), dtype), np.zeros((0, 4, 32), np.int8), np.zeros((0, 4), np.float16)
    for kernels in (cpu, reference):
        kernels.quantize_int8(x, q, s)
        kernels.dequantize_int8(q, s, x)
    assert x.shape == (0, 4, 32) and q.shape == (0, 4, 32) and s.shape == (0, 4)


# --- gather -------------------------------------------------------------------------------------------------


@SETTINGS
@given(
    shape=pool_shapes(),
    pool_dtype=st.sampled_from(FLOATS + (np.int8,)),
    out_dtype=st.sampled_from(FLOATS),
    index=st.sampled_from(INDEX),
    data=st.data(),
)
def test_gather_rows_matches_reference(
    shape: dict, pool_dtype: type, out_dtype: type, index: type, data: st.DataObject
) -> None:
    rng = np.random.default_rng(shape["seed"])
    n, h, d = max(shape["cells"], 1), shape["heads"], shape["dim"]
    lengths = np.array(data.draw(st.lists(st.integers(0, 2 * n), max_size=4)), dtype=np.int64)
    padded = int(lengths.max(initial=0)) + data.draw(st.integers(0, 3))
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(index)
    indices = rng.integers(0, n, int(indptr[-1])).astype(index)
    pool = values(rng, (n, h, d), np.float32, wild=True)
    scales = None
    if pool_dtype == np.int8:
        pool, scales = int8_pool(pool, shape["group"])
    else:
        pool = pool.astype(pool_dtype)
        out_dtype = pool_dtype
    got = np.full((len(lengths), h, padded, d), 7, out_dtype)
    want = got.copy()
    cpu.gather_rows(pool, indptr, indices, got, scales)
    with np.errstate(over="ignore"):
        reference.gather_rows(pool, indptr, indices, want, scales)
    assert same_bits(got, want)


@pytest.mark.parametrize(
    "heads, dim, group",
    [(2, 128, 32), (2, 128, 16), (2, 128, 64), (2, 80, 32), (3, 64, 192), (1, 80, 16)],
)
@pytest.mark.parametrize("out_dtype", [np.float32, np.float16])
def test_gather_int8_group_layouts(heads: int, dim: int, group: int, out_dtype: type) -> None:
    """Every path of the int8 gather: g = 32 inside a head (fixed-size loops), other groups inside a head,
    and groups spanning two heads (D = 80 with g = 32; g = 192 over three heads of 64); padding included."""
    rng = np.random.default_rng(dim + group)
    n = 9
    pool, scales = int8_pool(values(rng, (n, heads, dim), np.float32, wild=True), group)
    indptr, indices = np.array([0, 5, 5, 9]), rng.integers(0, n, 9)
    got = np.full((3, heads, 6, dim), 7, out_dtype)
    want = got.copy()
    cpu.gather_rows(pool, indptr, indices, got, scales)
    with np.errstate(over="ignore"):
        reference.gather_rows(pool, indptr, indices, want, scales)
    assert same_bits(got, want)


# --- move ---------------------------------------------------------------------------------------------------


@st.composite
def move_plans(draw: st.DrawFn) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """A pool size and runs ``(src, dst, length)`` with disjoint destinations: random, compaction, shift."""
    n = draw(st.integers(0, 40))
    kind = draw(st.sampled_from(["random", "compaction", "shift"]))
    src: list[int] = []
    dst: list[int] = []
    length: list[int] = []
    if kind == "compaction" and n:  # keep the used cells in order, packed to the front (a defrag plan)
        used = draw(st.lists(st.booleans(), min_size=n, max_size=n))
        target = 0
        for cell in np.flatnonzero(used):
            if src and src[-1] + length[-1] == cell and dst[-1] + length[-1] == target:
                length[-1] += 1
            else:
                src.append(int(cell)), dst.append(target), length.append(1)
            target += 1
    elif kind == "shift" and n:  # one run moved up or down by a few rows, overlapping itself
        size = draw(st.integers(1, n))
        start = draw(st.integers(0, n - size))
        to = draw(st.integers(0, n - size))
        src, dst, length = [start], [to], [size]
    else:  # cut [0, n) into segments, make some of them destinations, sources anywhere (overlaps included)
        cuts = sorted(set(draw(st.lists(st.integers(0, n), max_size=6)) + [0, n]))
        for begin, end in zip(cuts[:-1], cuts[1:], strict=True):
            if draw(st.booleans()):
                size = draw(st.integers(0, end - begin))
                src.append(draw(st.integers(0, n - size))), dst.append(begin), length.append(size)
        order = draw(st.permutations(range(len(src))))
        src, dst, length = [src[i] for i in order], [dst[i] for i in order], [length[i] for i in order]
    as_array = [np.array(a, dtype=np.int64) for a in (src, dst, length)]
    return n, as_array[0], as_array[1], as_array[2]


@SETTINGS
@given(plan=move_plans(), index=st.sampled_from(INDEX), seed=st.integers(0, 2**32 - 1))
def test_move_rows_matches_reference(plan: tuple, index: type, seed: int) -> None:
    n, src, dst, length = plan
    rng = np.random.default_rng(seed)
    pools = [
        values(rng, (n, 2, 64), np.float16, wild=True),
        values(rng, (n, 3, 80), np.float32, wild=True),
        rng.integers(-127, 128, (n, 1, 64)).astype(np.int8),
        rng.random((n, 2)).astype(np.float16),
        rng.random((n,)).astype(np.float64),
    ]
    got, want = [p.copy() for p in pools], [p.copy() for p in pools]
    cpu.move_rows(got, src.astype(index), dst.astype(index), length.astype(index))
    reference.move_rows(want, src, dst, length)
    assert all(same_bits(g, w) for g, w in zip(got, want, strict=True))


# --- rope ---------------------------------------------------------------------------------------------------


def rope_pool(
    rng: np.random.Generator, shape: dict, dtype: type, quantize: Callable[..., None]
) -> tuple[np.ndarray, np.ndarray | None]:
    """Keys ``[cells, heads, dim]`` of `shape` (`values`, no special values) as `dtype`; an int8 pool is
    quantized by `quantize` in groups of ``shape["group"]`` and comes with its scales (a float one: None)."""
    x = values(rng, (shape["cells"], shape["heads"], shape["dim"]), np.float32, wild=False)
    if dtype == np.int8:
        return int8_pool(x, shape["group"], quantize)
    return x.astype(dtype), None


def rope_cpu_and_reference(
    pool: np.ndarray, scales: np.ndarray | None, cells: np.ndarray, deltas: np.ndarray, rope: RopeSpec
) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """``[(got, got_s), (want, want_s)]``: `cpu.rope_shift` and `reference.rope_shift` on copies of `pool`
    and `scales`."""
    results = []
    for kernels in (cpu, reference):
        p, s = pool.copy(), None if scales is None else scales.copy()
        kernels.rope_shift(p, cells, deltas, rope, s)
        results.append((p, s))
    return results


@SETTINGS
@given(
    shape=pool_shapes(),
    dtype=st.sampled_from(FLOATS + (np.int8,)),
    style=st.sampled_from(list(RopeStyle)),
    partial=st.booleans(),
    scaled=st.booleans(),
    data=st.data(),
)
def test_rope_shift_matches_reference(
    shape: dict, dtype: type, style: RopeStyle, partial: bool, scaled: bool, data: st.DataObject
) -> None:
    rng = np.random.default_rng(shape["seed"])
    n, d = shape["cells"], shape["dim"]
    rope = RopeSpec(
        theta=500000.0,
        rotary_dim=d // 2 if partial else None,
        style=style,
        scaling=Llama3Scaling() if scaled else None,
    )
    t = data.draw(st.integers(0, n))
    cells = rng.permutation(n)[:t]
    deltas = rng.integers(-5000, 5000, t)
    deltas[: t // 3] = 0
    pool, scales = rope_pool(rng, shape, dtype, cpu.quantize_int8)
    (got, got_s), (want, want_s) = rope_cpu_and_reference(pool, scales, cells, deltas, rope)
    unmoved = cells[deltas == 0]  # cos 0 = 1 and sin 0 = 0 exactly: the reference's bits, the old values
    assert same_bits(got[unmoved], want[unmoved])  # (a zero may change sign: -0 - (-b * 0) is +0)
    if scales is None:
        assert (got[unmoved] == pool[unmoved]).all()
    if scales is None:  # sin/cos of libm and NumPy may differ in the last float64 bit
        np.testing.assert_allclose(
            got.astype(np.float64),
            want.astype(np.float64),
            rtol=2e-3 if dtype == np.float16 else 1e-6,
            atol=1e-30,
        )
    else:  # a last-bit difference may move a value across a rounding boundary: one step of its scale
        assert (
            np.abs(got_s.astype(np.float64) - want_s).max(initial=0) <= np.abs(want_s).max(initial=0) * 2**-10
        )
        a = np.zeros(got.shape, np.float32)
        b = a.copy()
        cpu.dequantize_int8(got, got_s, a)
        cpu.dequantize_int8(want, want_s, b)
        step = np.repeat(np.maximum(got_s, want_s).astype(np.float32), shape["group"], axis=1).reshape(
            a.shape
        )
        assert (np.abs(a - b) <= 1.01 * step).all()


@SETTINGS
@given(
    shape=pool_shapes(),
    dtype=st.sampled_from(FLOATS + (np.int8,)),
    style=st.sampled_from(list(RopeStyle)),
    partial=st.booleans(),
    shared=st.booleans(),
)
def test_rope_shift_is_bit_identical(
    shape: dict, dtype: type, style: RopeStyle, partial: bool, shared: bool
) -> None:
    """The CPU kernel takes its angles' cos/sin from NumPy, one row per distinct delta (`shared`: a context
    shift, every cell by one delta), and rotates without fused multiply-adds: the reference's bits."""
    rng = np.random.default_rng(shape["seed"])
    n, d = shape["cells"], shape["dim"]
    rope = RopeSpec(theta=10000.0, rotary_dim=d // 2 if partial else None, style=style)
    cells = rng.permutation(n)[: rng.integers(0, n + 1)]
    deltas = np.full(len(cells), -7) if shared else rng.integers(-3000, 3000, len(cells))
    pool, scales = rope_pool(rng, shape, dtype, reference.quantize_int8)
    (got, got_s), (want, want_s) = rope_cpu_and_reference(pool, scales, cells, deltas, rope)
    assert same_bits(got, want)
    if scales is not None:
        assert same_bits(got_s, want_s)


# --- tables: values encode their coordinates (100 * cell + 10 * head + dim) ---------------------------------


def coordinate_pool(cells: int, heads: int = 2, dim: int = 3, dtype: type = np.float32) -> np.ndarray:
    """``pool[c, h, d] = 100 * c + 10 * h + d``: every value names its own place."""
    c, h, d = np.meshgrid(np.arange(cells), np.arange(heads), np.arange(dim), indexing="ij")
    return (100 * c + 10 * h + d).astype(dtype)


def test_scatter_table() -> None:
    pool = np.zeros((4, 2, 3), np.float32)
    rows = coordinate_pool(2) + 1000  # row t holds 1000 + 100 t + 10 h + d
    cpu.scatter_rows(pool, rows, np.array([3, 1], np.int32))
    expect = np.zeros((4, 2, 3), np.float32)
    expect[3] = [[1000, 1001, 1002], [1010, 1011, 1012]]  # row 0 -> cell 3
    expect[1] = [[1100, 1101, 1102], [1110, 1111, 1112]]  # row 1 -> cell 1
    assert same_bits(pool, expect)


def test_gather_table() -> None:
    pool = coordinate_pool(5)
    out = np.full((2, 2, 3, 3), -1, np.float32)
    # sequence 0 owns cells [4, 0], sequence 1 owns [2]; L = 3
    cpu.gather_rows(pool, np.array([0, 2, 3]), np.array([4, 0, 2]), out)
    expect = np.array(
        [
            [
                [[400, 401, 402], [0, 1, 2], [0, 0, 0]],  # seq 0, head 0: cell 4, cell 0, padding
                [[410, 411, 412], [10, 11, 12], [0, 0, 0]],
            ],  # seq 0, head 1
            [
                [[200, 201, 202], [0, 0, 0], [0, 0, 0]],  # seq 1, head 0: cell 2, padding
                [[210, 211, 212], [0, 0, 0], [0, 0, 0]],
            ],  # seq 1, head 1
        ],
        np.float32,
    )
    assert same_bits(out, expect)


@pytest.mark.parametrize(
    "src, dst, length, expect_cells",
    [
        ([3], [0], [2], [3, 4, 2, 3, 4, 5]),  # compaction: cells 3, 4 move down to 0, 1
        ([0], [1], [4], [0, 0, 1, 2, 3, 5]),  # upward shift overlapping itself
        ([0, 3], [3, 0], [2, 2], [3, 4, 2, 0, 1, 5]),  # swap: both runs read the old values
        ([1, 5], [0, 4], [3, 1], [1, 2, 3, 3, 5, 5]),  # compaction of two runs, the first over its own source
        ([0], [0], [0], [0, 1, 2, 3, 4, 5]),  # an empty run changes nothing
    ],
)
def test_move_table(src: list, dst: list, length: list, expect_cells: list) -> None:
    keys = coordinate_pool(6, dtype=np.float16)
    scales = np.arange(6, dtype=np.float16)[:, None] * np.ones((1, 2), np.float16)
    cpu.move_rows([keys, scales], *(np.array(a) for a in (src, dst, length)))
    assert same_bits(keys, coordinate_pool(6, dtype=np.float16)[expect_cells])
    assert (scales[:, 0] == expect_cells).all() and (scales[:, 1] == expect_cells).all()


def test_int8_scatter_gather_table() -> None:
    """One group of 4 per head: [0, 1, 2, 127] has absmax 127, so the scale is 1 and q equals x."""
    pool, scales = np.zeros((3, 2, 4), np.int8), np.zeros((3, 2), np.float16)
    rows = np.array([[[0, 1, 2, 127], [0, -1, -2, -127]]], np.float32)
    cpu.scatter_rows(pool, rows, np.array([2]), scales)
    assert pool[2].tolist() == [[0, 1, 2, 127], [0, -1, -2, -127]] and scales[2].tolist() == [1, 1]
    out = np.zeros((1, 2, 1, 4), np.float16)
    cpu.gather_rows(pool, np.array([0, 1]), np.array([2]), out, scales)
    assert out[0, :, 0].tolist() == rows[0].tolist()


def test_rope_table() -> None:
    """theta 1, head_dim 2: the one pair turns by delta radians (NeoX pairs value 0 with value 1)."""
    pool = np.array([[[1.0, 0.0]], [[0.0, 2.0]]], np.float32)
    cpu.rope_shift(pool, np.array([0, 1]), np.array([1, 0]), RopeSpec(theta=1.0))
    assert np.allclose(pool[0, 0], [np.cos(1.0), np.sin(1.0)]) and pool[1, 0].tolist() == [0.0, 2.0]


def test_empty_inputs_change_nothing() -> None:
    pool, scales = np.ones((3, 1, 32), np.int8), np.ones((3, 1), np.float16)
    none = np.zeros(0, np.int64)
    cpu.scatter_rows(pool, np.zeros((0, 1, 32), np.float32), none, scales)
    cpu.gather_rows(pool, np.zeros(1, np.int64), none, np.zeros((0, 1, 4, 32), np.float32), scales)
    cpu.move_rows([pool, scales], none, none, none)
    cpu.rope_shift(pool, none, none, RopeSpec(), scales)
    cpu.quantize_int8(np.zeros((0, 32), np.float32), np.zeros((0, 32), np.int8), np.zeros((0, 1), np.float16))
    cpu.dequantize_int8(
        np.zeros((0, 32), np.int8), np.zeros((0, 1), np.float16), np.zeros((0, 32), np.float32)
    )
    assert (pool == 1).all() and (scales == 1).all()
