"""T5 encoder + decoder-step graphs vs transformers: committed references always, live where torch is.

Each comparison encodes the sequences' source tokens in one flat encoder pass, prefills the decoder prompts
(the start token, alone or with forced tokens) and runs 16 greedy steps through the decoder-step graph with
NumPy pools (seq2seq_driver.py), checking every decoder logits row within 1e-4 of transformers' forward
pass and the greedy tokens against its `generate`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from export_helpers import (
    MODELS,
    Exports,
    assert_same_reference,
    copy_checkpoint,
    drop_tensor,
    edit_config,
    load_reference,
    prompts_of,
)
from seq2seq_driver import Seq2SeqDriver, check_seq2seq, committed_graphs, run_greedy

from kvarray.errors import DTypeMismatch, MissingTensor, ShapeMismatch, UnsupportedModel
from kvarray.export import export, read_metadata
from kvarray.export.reference import reference_sources, torch_unavailable_reason

T5 = MODELS / "tiny-t5-random"
TOLERANCE = 1e-4
#: max |logit difference| of reduced-precision self-attention pools (measured in docs/export.md, ~3x headroom)
POOL_BOUNDS = {"float16": 5e-4, "int8": 0.012}
REASON = torch_unavailable_reason()


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    return load_reference(T5)


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> Exports:
    """(kv_dtype, view) -> (encoder, decoder_step) exported from the committed checkpoint, once."""
    return Exports("t5", T5, tmp_path_factory.mktemp("t5"))


def test_committed_graphs_match_committed_reference(reference):
    check_seq2seq(reference, *committed_graphs(T5), [0, 1, 2], TOLERANCE)


@pytest.mark.parametrize("view", ["pool", "gathered"])
@pytest.mark.parametrize("batch", [[0], [1], [2]], ids=["seq0", "seq1", "seq2"])
def test_each_sequence_alone_matches_reference(reference, graphs, view, batch):
    check_seq2seq(reference, *graphs("float32", view), batch, TOLERANCE)


@pytest.mark.parametrize("view", ["pool", "gathered"])
def test_flat_batch_equals_each_sequence_alone(reference, graphs, view):
    sources = reference_sources(reference)
    prompts = prompts_of(reference)
    together, chosen = run_greedy(*graphs("float32", view), sources, prompts)
    for k in range(3):
        (alone,), (chosen_alone,) = run_greedy(
            *graphs("float32", view), [sources[k]], [prompts[k]], first_cell=7
        )
        np.testing.assert_allclose(together[k], alone, rtol=0, atol=1e-5)
        assert chosen[k] == chosen_alone


def test_flat_encoder_rows_equal_each_sequence_alone(graphs):
    """The encoder's flat batch: each sequence's cross K/V rows are what it gets encoded alone."""
    encoder, step = graphs()
    sources = [np.arange(3, 12), np.arange(40, 73), np.asarray([7])]
    together = Seq2SeqDriver(encoder, step)
    together.encode([0, 1, 2], sources)
    for k, source in enumerate(sources):
        alone = Seq2SeqDriver(encoder, step)
        alone.encode([k], [source])
        for layer in range(2):
            for a, b in zip(together.cross[k][layer], alone.cross[k][layer], strict=True):
                assert a.shape == (len(source), 4, 8)
                np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kv_dtype", ["float16", "int8"])
def test_reduced_precision_pool_stays_within_its_bound(reference, graphs, kv_dtype):
    worst = check_seq2seq(reference, *graphs(kv_dtype, "pool"), [0, 1, 2], POOL_BOUNDS[kv_dtype])
    assert worst > 0


def test_metadata_and_names(graphs):
    encoder, step = graphs("int8", "pool")
    enc, dec = read_metadata(encoder), read_metadata(step)
    assert (enc.architecture, enc.graph, dec.graph, dec.kv_dtype, dec.view) == (
        "t5",
        "encoder",
        "decoder_step",
        "int8",
        "pool",
    )
    assert (dec.spec.num_layers, dec.spec.num_kv_heads, dec.spec.head_dim, dec.rope) == (2, 4, 8, None)
    assert enc.inputs == ["input_ids", "position_ids", "attention_bias"]
    assert enc.outputs == ["cross_key.0", "cross_value.0", "cross_key.1", "cross_value.1"]
    assert dec.inputs == [
        "input_ids",
        "position_ids",
        *[
            f"{n}.{i}"
            for i in range(2)
            for n in ("past_key", "past_value", "past_key_scale", "past_value_scale")
        ],
        "past_position_ids",
        "attention_bias",
        "cross_key.0",
        "cross_value.0",
        "cross_key.1",
        "cross_value.1",
        "cross_bias",
        "logits_index",
    ]
    assert dec.outputs == ["logits", "new_key.0", "new_value.0", "new_key.1", "new_value.1"]
    assert dec.tokens["decoder_start_token_id"] == 258 and dec.vocab_size == 259


# -- bad checkpoints --------------------------------------------------------------------------------------
@pytest.fixture
def ckpt(tmp_path) -> Path:
    return copy_checkpoint(T5, tmp_path)


def test_missing_tensor_is_named(ckpt, tmp_path):
    drop_tensor(ckpt, "decoder.block.1.layer.1.EncDecAttention.k.weight")
    with pytest.raises(MissingTensor, match=r"decoder\.block\.1\.layer\.1\.EncDecAttention\.k\.weight"):
        export("t5", ckpt, tmp_path / "out")


def test_bad_configs(ckpt, tmp_path):
    edit_config(ckpt, d_ff=40)
    with pytest.raises(ShapeMismatch, match=r"DenseReluDense\.wi_0\.weight.*\[32, 24\].*\[40, 24\]"):
        export("t5", ckpt, tmp_path / "out")
    edit_config(ckpt, d_ff=32, feed_forward_proj="gated-swish")
    with pytest.raises(UnsupportedModel, match="feed_forward_proj 'gated-swish'"):
        export("t5", ckpt, tmp_path / "out")
    edit_config(ckpt, feed_forward_proj="gated-gelu", model_type="bart")
    with pytest.raises(UnsupportedModel, match="model_type 'bart' is not T5"):
        export("t5", ckpt, tmp_path / "out")
    with pytest.raises(UnsupportedModel, match="is not whisper"):
        export("whisper", T5 / "checkpoint", tmp_path / "out")
    with pytest.raises(DTypeMismatch, match="gathered view"):
        export("t5", T5 / "checkpoint", tmp_path / "out", kv_dtype="int8", view="gathered")
    assert not (tmp_path / "out" / "encoder.onnx").exists()  # nothing written on failure


# -- live comparison with transformers (the `reference` extra) ---------------------------------------------
live = pytest.mark.skipif(REASON is not None, reason=REASON or "")


@pytest.mark.reference
@live
def test_committed_reference_is_what_transformers_computes(reference):
    from kvarray.export.reference import seq2seq_reference

    prompts = prompts_of(reference)
    fresh = seq2seq_reference(T5 / "checkpoint", reference_sources(reference), prompts)
    assert_same_reference(fresh, reference)


@pytest.mark.reference
@live
def test_bucket_table_is_transformers_bucketing():
    import torch
    from transformers.models.t5.modeling_t5 import T5Attention

    from kvarray.export.t5 import relative_position_bucket

    for buckets, distance in ((32, 128), (8, 20), (16, 40)):
        for bidirectional in (True, False):
            relative = np.arange(-distance - 40, distance + 40)
            theirs = T5Attention._relative_position_bucket(
                torch.tensor(relative),
                bidirectional=bidirectional,
                num_buckets=buckets,
                max_distance=distance,
            )
            ours = relative_position_bucket(relative, bidirectional, buckets, distance)
            np.testing.assert_array_equal(ours, theirs.numpy())


V10 = dict(
    vocab_size=259,
    d_model=32,
    d_kv=8,
    d_ff=48,
    num_layers=2,
    num_decoder_layers=1,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=12,
    feed_forward_proj="relu",
    tie_word_embeddings=True,
    decoder_start_token_id=0,
    pad_token_id=0,
    eos_token_id=None,
)


@pytest.mark.reference
@live
@pytest.mark.parametrize(
    "overrides",
    [{}, {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False, "d_kv": 16}],
    ids=["v1.0-relu-tied", "v1.1-gated-untied-wide"],
)
def test_native_graphs_match_transformers_live(tmp_path, overrides):
    from kvarray.export.reference import greedy_margin, random_seq2seq, seq2seq_reference

    random_seq2seq("t5", tmp_path / "ckpt", seed=11, **{**V10, **overrides})
    sources = [np.arange(5, 30), np.asarray([9, 8, 7])]
    ref = seq2seq_reference(tmp_path / "ckpt", sources, [[0, 40], [0]])
    assert greedy_margin(ref) > 2 * TOLERANCE, "a near tie: choose another seed"
    encoder, step = export("t5", tmp_path / "ckpt", tmp_path / "out")
    check_seq2seq(ref, encoder, step, [0, 1], TOLERANCE)
