"""hoist_merge_inputs: each merge's metric and semantic value computed before the merge (so that a
block-by-block compile puts them in the attention's compute piece), with the graph's values
unchanged, on the attention forms turbo merges: SDPA with and without a padding mask, explicit
softmax (probabilities), packed ``nn.MultiheadAttention``, and no semantic value at all."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from model_builders import images, padded_batch, small_hf, small_vit
from turbo_fx import block_compile
from turbo_fx.ops.merge_step import block_arguments, metric_as_one_head, semantic_as_one_head
from turbo_fx.passes.graph_utils import is_merge
from turbo_fx.passes.hoist_merge_inputs import hoist_merge_inputs
from turbo_fx.passes.split_at_merges import split_at_merges


def transformer_encoder() -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(48, 3, 96, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 3, enable_nested_tensor=False).eval()


CASES = {
    "timm ViT (SDPA)": (lambda: small_vit("vit", patch_size=4, depth=3), lambda: (images(2),), {}),
    "BERT with padding (SDPA, mask)": (lambda: small_hf("bert"), lambda: padded_batch([16, 9], 16), {}),
    "ViT, explicit softmax": (lambda: small_hf("vit", attn="eager"), lambda: (images(2),), {}),
    "nn.TransformerEncoder (packed)": (transformer_encoder, lambda: (torch.randn(2, 33, 48),), {}),
    "no semantic value": (lambda: small_vit("vit", patch_size=4, depth=3), lambda: (images(2),),
                          {"semantic": False}),
}


def rewritten_graph(turbo, monkeypatch, case: str):
    """The rewritten graph that the block-by-block compile receives, and its inputs."""
    build, inputs, options = CASES[case]
    seen = []
    real = block_compile.compile_blocks

    def spy(gm, example_inputs, *args, **kwargs):
        seen.append((gm, list(example_inputs)))
        return real(gm, example_inputs, *args, **kwargs)

    monkeypatch.setattr(block_compile, "compile_blocks", spy)
    turbo(build(), r=2, inner_backend="inductor", compile_blocks=True, **options)(*inputs())
    assert len(seen) == 1, "the graph was not compiled block by block"
    return seen[0]


def merge_steps(gm) -> list[dict]:
    return [block_arguments(n.args, n.kwargs) for n in gm.graph.nodes if is_merge(n)]


@pytest.mark.parametrize("case", list(CASES))
def test_hoisted_graph_computes_the_same_values(turbo, monkeypatch, case):
    gm, inputs = rewritten_graph(turbo, monkeypatch, case)
    before = [n.format_node() for n in gm.graph.nodes]
    hoisted = hoist_merge_inputs(gm)
    assert [n.format_node() for n in gm.graph.nodes] == before, "the pass changed its input graph"
    with torch.no_grad():
        expected, got = gm(*inputs), hoisted(*inputs)
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    got = got if isinstance(got, (tuple, list)) else (got,)
    # Exactly equal: the same ops run in eager mode; the mean over one head and the CLS row
    # read back from one-head probabilities are the values themselves.
    assert len(expected) == len(got) and all(torch.equal(a, b) for a, b in zip(expected, got))
    steps = merge_steps(hoisted)
    assert len(steps) == len(merge_steps(gm)) >= 2
    semantic = "semantic" not in CASES[case][2]
    for step in steps:
        assert step["metric_source"].target is metric_as_one_head and step["metric_token_axis"] == -2
        assert step["semantic_q"] is None and step["semantic_k"] is None and step["semantic_mask"] is None
        probs = step["semantic_probs"]
        assert (probs.target is semantic_as_one_head) if semantic else probs is None
    # A second run finds nothing more to move.
    again = hoist_merge_inputs(hoisted)
    assert len(again.graph.nodes) == len(hoisted.graph.nodes)


@pytest.mark.parametrize("case", ["timm ViT (SDPA)", "BERT with padding (SDPA, mask)"])
def test_split_puts_the_hoisted_calls_in_the_compute_pieces(turbo, monkeypatch, case):
    """What the pass is for: split at the merges, each merge piece reads a ready metric and
    semantic row from its inputs, and the compute piece before it computes them."""
    gm, _ = rewritten_graph(turbo, monkeypatch, case)
    split = split_at_merges(hoist_merge_inputs(gm))
    hoisted_calls = (metric_as_one_head, semantic_as_one_head)
    merge_pieces = compute_with_calls = 0
    for node in split.module.graph.nodes:
        if node.op != "call_module":
            continue
        piece = getattr(split.module, node.target)
        calls = [n for n in piece.graph.nodes if n.target in hoisted_calls]
        if node.target in split.compute:
            compute_with_calls += bool(calls)
            continue
        merge_pieces += 1
        assert not calls
        (merge,) = [n for n in piece.graph.nodes if is_merge(n)]
        step = block_arguments(merge.args, merge.kwargs)
        assert step["metric_source"].op == "placeholder" and step["semantic_probs"].op == "placeholder"
    assert merge_pieces >= 2 and compute_with_calls == merge_pieces
