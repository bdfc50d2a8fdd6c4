"""Whisper encoder + decoder-step graphs vs transformers: committed references always, live where torch is.

Each comparison encodes the sequences' features (``[80, 3000]``, regenerated from the reference's seed) in
one encoder batch, prefills the decoder prompts and runs 16 greedy steps through the decoder-step graph with
NumPy pools (seq2seq_driver.py), checking every logits row within 1e-4 of transformers' forward pass and
the greedy tokens against its `generate`.
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
from seq2seq_driver import check_seq2seq, committed_graphs, run_greedy

from kvarray.errors import MissingTensor, ShapeMismatch, SpecMismatch, UnsupportedModel
from kvarray.export import export, read_metadata
from kvarray.export.reference import reference_sources, torch_unavailable_reason

WHISPER = MODELS / "tiny-whisper-random"
TOLERANCE = 1e-4
#: max |logit difference| of reduced-precision self-attention pools (measured in docs/export.md, ~3x headroom)
POOL_BOUNDS = {"float16": 1e-3, "int8": 0.015}
REASON = torch_unavailable_reason()


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    return load_reference(WHISPER)


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> Exports:
    """(kv_dtype, view) -> (encoder, decoder_step) exported from the committed checkpoint, once."""
    return Exports("whisper", WHISPER, tmp_path_factory.mktemp("whisper"))


def test_committed_graphs_match_committed_reference(reference):
    check_seq2seq(reference, *committed_graphs(WHISPER), [0, 1, 2], TOLERANCE)


@pytest.mark.parametrize("view", ["pool", "gathered"])
def test_each_sequence_alone_matches_reference(reference, graphs, view):
    for k in range(3):
        check_seq2seq(reference, *graphs("float32", view), [k], TOLERANCE)


def test_flat_batch_equals_each_sequence_alone(reference, graphs):
    sources = reference_sources(reference)
    prompts = prompts_of(reference)
    together, chosen = run_greedy(*graphs(), sources, prompts)
    for k in range(3):
        (alone,), (chosen_alone,) = run_greedy(*graphs(), [sources[k]], [prompts[k]], first_cell=7)
        np.testing.assert_allclose(together[k], alone, rtol=0, atol=1e-5)
        assert chosen[k] == chosen_alone


@pytest.mark.parametrize("kv_dtype", ["float16", "int8"])
def test_reduced_precision_pool_stays_within_its_bound(reference, graphs, kv_dtype):
    worst = check_seq2seq(reference, *graphs(kv_dtype, "pool"), [0, 1, 2], POOL_BOUNDS[kv_dtype])
    assert worst > 0


def test_metadata_and_names(graphs):
    encoder, step = graphs()
    enc, dec = read_metadata(encoder), read_metadata(step)
    assert (enc.architecture, enc.graph, dec.architecture, dec.graph) == (
        "whisper",
        "encoder",
        "whisper",
        "decoder_step",
    )
    assert (dec.spec.num_layers, dec.spec.num_kv_heads, dec.spec.head_dim, dec.rope) == (2, 4, 8, None)
    assert enc.inputs == ["input_features"]
    assert enc.outputs == ["cross_key.0", "cross_value.0", "cross_key.1", "cross_value.1"]
    assert dec.inputs == [
        "input_ids",
        "position_ids",
        "past_key.0",
        "past_value.0",
        "past_key.1",
        "past_value.1",
        "attention_bias",
        "cross_key.0",
        "cross_value.0",
        "cross_key.1",
        "cross_value.1",
        "cross_bias",
        "logits_index",
    ]
    assert dec.tokens["decoder_start_token_id"] == 256


# -- bad checkpoints --------------------------------------------------------------------------------------
@pytest.fixture
def ckpt(tmp_path) -> Path:
    return copy_checkpoint(WHISPER, tmp_path)


def test_missing_tensor_is_named(ckpt, tmp_path):
    drop_tensor(ckpt, "model.encoder.conv2.bias")
    with pytest.raises(MissingTensor, match=r"model\.encoder\.conv2\.bias"):
        export("whisper", ckpt, tmp_path / "out")


def test_bad_configs(ckpt, tmp_path):
    edit_config(ckpt, num_mel_bins=128)
    with pytest.raises(ShapeMismatch, match=r"conv1\.weight.*\[32, 80, 3\].*\[32, 128, 3\]"):
        export("whisper", ckpt, tmp_path / "out")
    edit_config(ckpt, num_mel_bins=80, decoder_attention_heads=5)
    with pytest.raises(SpecMismatch, match="d_model 32 is not a multiple of decoder_attention_heads 5"):
        export("whisper", ckpt, tmp_path / "out")
    edit_config(ckpt, decoder_attention_heads=4, activation_function="swish")
    with pytest.raises(UnsupportedModel, match="activation_function 'swish'"):
        export("whisper", ckpt, tmp_path / "out")
    edit_config(ckpt, activation_function="gelu", model_type="t5")
    with pytest.raises(SpecMismatch, match="has no 'num_layers'"):  # a T5 config without T5's sizes
        export("t5", ckpt, tmp_path / "out")


# -- live comparison with transformers (the `reference` extra) ---------------------------------------------
live = pytest.mark.skipif(REASON is not None, reason=REASON or "")


@pytest.mark.reference
@live
def test_committed_reference_is_what_transformers_computes(reference):
    from kvarray.export.reference import seq2seq_reference

    prompts = prompts_of(reference)
    fresh = seq2seq_reference(WHISPER / "checkpoint", reference_sources(reference), prompts)
    assert_same_reference(fresh, {name: value for name, value in reference.items() if name in fresh})


@pytest.mark.reference
@live
def test_variant_matches_transformers_live(tmp_path):
    """Unequal encoder/decoder widths of heads and FFN, scaled embeddings, one decoder layer."""
    from kvarray.export.reference import greedy_margin, random_seq2seq, seq2seq_reference

    config = dict(
        vocab_size=300,
        d_model=64,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=4,
        encoder_ffn_dim=48,
        decoder_ffn_dim=80,
        num_mel_bins=16,
        max_source_positions=1500,
        max_target_positions=32,
        scale_embedding=True,
        decoder_start_token_id=1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=None,
        suppress_tokens=None,
        begin_suppress_tokens=None,
    )
    random_seq2seq("whisper", tmp_path / "ckpt", seed=3, **config)
    features = [np.random.default_rng(k).standard_normal((16, 3000), dtype=np.float32) for k in range(2)]
    ref = seq2seq_reference(tmp_path / "ckpt", features, [[1, 5, 6], [1]])
    ref["features_seed"] = np.asarray(0)
    assert greedy_margin(ref) > 2 * TOLERANCE, "a near tie: choose another seed"
    encoder, step = export("whisper", tmp_path / "ckpt", tmp_path / "out")
    check_seq2seq(ref, encoder, step, [0, 1], TOLERANCE, n_mels=16)
