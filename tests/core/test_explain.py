"""turbo_fx.explain: sites, merges, tokens per block and FLOPs, checked against hand-computed FLOPs."""
from __future__ import annotations

import pytest
import torch

import turbo_fx
from model_builders import images, small_vit
from turbo_fx import ops

BATCH, CHANNELS, HEADS, MLP, CLASSES, PATCH_PIXELS = 2, 48, 3, 192, 10, 3 * 4 * 4


def vit_flops(tokens_in: list[int], r_applied: list[int], protected: int = 1, semantic: bool = True) -> int:
    """FLOPs (2 per multiply-add) of the small ViT (patch 4, 64 patches) counted by hand."""
    b, c, head_dim = BATCH, CHANNELS, CHANNELS // HEADS
    flops = 2 * b * 64 * PATCH_PIXELS * c  # patch embedding conv
    for n_in, r in zip(tokens_in, r_applied):
        n_out = n_in - r
        flops += 2 * b * n_in * c * 3 * c  # qkv
        flops += 4 * b * n_in * n_in * c  # q k^T and attn @ v over all heads
        flops += 2 * b * n_in * c * c  # proj
        flops += 2 * 2 * b * n_out * c * MLP  # fc1 and fc2 run on the merged tokens
        if r:
            rest = n_in - protected
            flops += 2 * b * ((rest + 1) // 2) * (rest // 2) * head_dim  # A x B similarities
            if semantic:
                flops += 2 * b * HEADS * n_in * head_dim  # the CLS query row
    return flops + 2 * b * c * CLASSES  # head


def test_explain_reports_sites_tokens_and_flops():
    model = small_vit("vit", patch_size=4)
    report = turbo_fx.explain(model, images(BATCH), r=8)
    assert len(report.graphs) == 1
    graph = report.graphs[0]
    assert graph.fallback_reason is None
    assert [b.module for b in graph.blocks] == [f"blocks.{i}.attn" for i in range(4)]
    assert graph.tokens_per_block == [65, 57, 49, 41]
    assert graph.flops_before == vit_flops([65] * 4, [0] * 4)
    assert graph.flops_after == vit_flops([65, 57, 49, 41], [8] * 4)
    assert report.flop_ratio == graph.flops_after / graph.flops_before < 0.8
    text = str(report)
    assert "blocks.3.attn" in text and "FLOPs" in text and "protected tokens: 1" in text


def test_explain_without_semantic_counts_no_cls_row():
    report = turbo_fx.explain(small_vit("vit", patch_size=4), images(BATCH), r=8, semantic=False)
    assert report.graphs[0].flops_after == vit_flops([65, 57, 49, 41], [8] * 4, semantic=False)


def test_explain_reports_a_fallback():
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU())
    report = turbo_fx.explain(mlp, torch.randn(2, 5, 16), r=4)
    assert report.fallbacks == ["no attention site found in the graph"]
    assert report.flops_before == report.flops_after == 2 * 2 * 5 * 16 * 16


def test_a_configuration_that_merges_nothing_reports_every_site_untouched():
    report = turbo_fx.explain(small_vit("vit"), images(2), r=0)
    graph = report.graphs[0]
    assert graph.merges == 0
    assert {s.decision for s in graph.sites} == {"untouched"}
    assert all("merges no token" in s.reason for s in graph.sites)


def test_trade_off_lists_each_budget_with_its_counted_flops():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=6).eval()
    table = turbo_fx.trade_off(model, torch.randn(1, 3, 224, 224), budgets=(0.9, 0.7, 0.5))
    assert [row.budget for row in table.rows] == [0.9, 0.7, 0.5]
    for row in table.rows:
        assert row.fallback == "" and abs(row.flop_ratio - row.budget) < 0.02, row
        assert row.tokens_per_block[0] == 197 and row.schedule.startswith("r=[")
    # a smaller budget merges more, block by block
    ends = [row.tokens_per_block[-1] for row in table.rows]
    assert ends == sorted(ends, reverse=True) and ends[0] > ends[-1]
    assert "FLOP ratio counted" in str(table)
    with pytest.raises(TypeError, match="budgets"):
        turbo_fx.trade_off(model, torch.randn(1, 3, 224, 224), r=4)
