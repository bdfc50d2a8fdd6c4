"""Live comparison with transformers (the `reference` extra): skipped, with the reason, where torch is absent.

The committed references (models/*/reference.npz) are regenerated here and must agree with the files, and
config variants the committed model does not cover are built with transformers on the spot and compared
with their native graphs.
"""

from __future__ import annotations

import pytest
from export_helpers import TINY, assert_same_reference, prompts_of
from graph_driver import GraphDriver
from test_llama_export import NEW_TOKENS, TOLERANCE, check_against

from kvarray.export import export
from kvarray.export.reference import (
    LLAMA_VARIANTS,
    SMALL_LLAMA,
    greedy_margin,
    greedy_reference,
    random_llama,
    torch_unavailable_reason,
)

REASON = torch_unavailable_reason()
pytestmark = [pytest.mark.reference, pytest.mark.skipif(REASON is not None, reason=REASON or "")]


def test_committed_reference_is_what_transformers_computes(tiny_reference):
    live = greedy_reference(TINY / "checkpoint", prompts_of(tiny_reference), NEW_TOKENS)
    assert_same_reference(live, tiny_reference)


@pytest.mark.parametrize("overrides", list(LLAMA_VARIANTS.values()), ids=list(LLAMA_VARIANTS))
def test_native_graph_matches_transformers_live(tmp_path, overrides):
    random_llama(tmp_path / "ckpt", seed=11, **{**SMALL_LLAMA, **overrides})
    prompts = [[72, 101, 108, 108, 111], [10, 32, 100, 101, 102, 32, 102, 40, 41, 58, 10, 9]]
    reference = greedy_reference(tmp_path / "ckpt", prompts, NEW_TOKENS)
    # two logits each within TOLERANCE cannot swap when their gap exceeds 2 * TOLERANCE
    assert greedy_margin(reference) > 2 * TOLERANCE, "a near tie: choose another seed"
    (graph,) = export("llama", tmp_path / "ckpt", tmp_path / "out")
    check_against(reference, GraphDriver(graph, first_cell=4), TOLERANCE, [0, 1])
