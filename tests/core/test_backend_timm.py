"""The turbo backend on timm ViTs, held to the independent eager reference (turbo_fx/reference.py)."""
from __future__ import annotations

import pytest
import torch

from model_builders import NUM_PREFIX, duplicated_pairs, images, small_vit
from turbo_fx import ops
from turbo_fx.config import LinearSchedule, TurboConfig
from turbo_fx.reference import reference_forward

OPTION_SETS = [
    dict(r=4),
    dict(r=4, fusion="div"),
    dict(r=4, fusion="mul", alpha=0.2),
    dict(r=3, fusion="layer", alpha=0.5, beta=0.8, gamma=2.0),
    dict(r=[2, 5, 1, 4], semantic=False),
    dict(r=5, redundancy=False),
    dict(r=5, keep_salient=2, alpha=0.5),
    dict(r=LinearSchedule(first=6, last=1), metric="queries"),
    dict(r=6, prop_attn=False),
    dict(r=6, min_tokens=12),
    dict(r=3, protected=2, alpha=1.0),
    dict(r=4, fuse_merges=True),
    dict(r=4, compile_merge_step=True),
]


@pytest.mark.parametrize("kind", ["vit", "vit_avg", "vit_reg", "deit_distilled"])
@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_graph_pass_equals_reference(turbo, kind, options):
    model = small_vit(kind, patch_size=4)
    x = images(3)
    compiled = turbo(model, **options)
    out = compiled(x)
    with torch.no_grad():
        expected = reference_forward(model, x, TurboConfig(**options))
    assert compiled.report.fallback_reason is None
    assert compiled.report.merges > 0
    assert (out - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("kind", ["vit", "deit_distilled", "vit_reg"])
def test_r0_equals_plain_model(turbo, kind):
    model = small_vit(kind, patch_size=4)
    x = images(2)
    compiled = turbo(model, r=0)
    out = compiled(x)
    with torch.no_grad():
        plain = model(x)
    assert (out - plain).abs().max().item() <= 1e-5
    assert compiled.report.merges == 0
    assert compiled.report.fallback_reason is None


@pytest.mark.parametrize(
    "kind, options, expected_tokens",
    [
        # 64 patches + 1 CLS = 65 tokens; r=8 per block
        ("vit", dict(r=8), [65, 57, 49, 41]),
        # 64 + CLS + dist = 66 at r=20: 66 -> 46 -> 26, then (26 - 2) // 2 = 12 binds: -> 14
        ("deit_distilled", dict(r=20), [66, 46, 26, 14]),
        # min_tokens=40 binds at the third block: 65 -> 55 -> 45 -> 40
        ("vit", dict(r=10, min_tokens=40), [65, 55, 45, 40]),
        ("vit_reg", dict(r=[1, 2, 3, 4]), [67, 66, 64, 61]),
    ],
)
def test_exact_tokens_per_block(turbo, kind, options, expected_tokens):
    compiled = turbo(small_vit(kind, patch_size=4), **options)
    compiled(images(2))
    report = compiled.report
    assert report.tokens_per_block == expected_tokens
    assert report.protected == NUM_PREFIX[kind]
    for block in report.blocks:
        assert block.r_applied == ops.merge_count(block.tokens_in, report.protected, block.r_requested, options.get("min_tokens", 0))


def test_protected_detection_matches_timm(turbo):
    for kind, prefix in NUM_PREFIX.items():
        compiled = turbo(small_vit(kind, patch_size=4), r=2)
        compiled(images(1))
        assert compiled.report.protected == prefix, kind
        assert "prepended parameter" in compiled.report.protected_note


def test_proportional_attention_bias_is_applied(turbo):
    model = small_vit("vit", patch_size=4)
    x = images(2)
    with_bias = turbo(model, r=6)
    out_bias = with_bias(x)
    torch._dynamo.reset()
    without = turbo(model, r=6, prop_attn=False)
    out_plain = without(x)
    # the graph really changed: every SDPA after the first merge reads a bias from a merge
    assert (out_bias - out_plain).abs().max().item() > 1e-4
    with torch.no_grad():
        assert (out_bias - reference_forward(model, x, TurboConfig(r=6))).abs().max() < 1e-4
        assert (out_plain - reference_forward(model, x, TurboConfig(r=6, prop_attn=False))).abs().max() < 1e-4


def test_sdpa_graph_carries_the_bias():
    """Inspect the rewritten graph itself: SDPA calls after the first merge take the merge's bias."""
    from turbo_fx.report import recording

    with recording(keep_graphs=True) as rec, torch.no_grad():
        torch.compile(small_vit("vit", patch_size=4), backend="turbo", options={"r": 4, "inner_backend": "eager"})(images(1))
    gm = rec.graphs[0].graph_module
    sdpa = [n for n in gm.graph.nodes if n.op == "call_function" and "scaled_dot_product_attention" in str(n.target)]
    masks = [n.kwargs.get("attn_mask") for n in sdpa]
    assert len(masks) == 4 and masks[0] is None
    for mask in masks[1:]:
        assert mask is not None and mask.target.__name__ == "getitem" and mask.args[1] == 3
        assert "merge_block" in str(mask.args[0].target)


def test_fused_and_opaque_merges_agree(turbo):
    model = small_vit("deit_distilled", patch_size=4)
    x = images(2)
    a = turbo(model, r=5)(x)
    torch._dynamo.reset()
    b = turbo(model, r=5, fuse_merges=True)(x)
    assert (a - b).abs().max().item() < 1e-5


@pytest.mark.parametrize("symbolic_tokens, fuse_merges", [(True, False), (False, False), (True, True)],
                         ids=["opaque symbolic", "opaque static", "fused symbolic"])
def test_inductor_and_a_second_batch_size(turbo, symbolic_tokens, fuse_merges):
    """The default inner compiler (Inductor), with symbolic (unbacked) or static token counts,
    then another batch size (Dynamo recompiles with a SymInt batch)."""
    model = small_vit("vit", patch_size=8, depth=3)
    compiled = turbo(model, r=3, inner_backend="inductor", symbolic_tokens=symbolic_tokens, fuse_merges=fuse_merges)
    for batch in (2, 3):
        x = images(batch, seed=batch)
        out = compiled(x)
        with torch.no_grad():
            expected = reference_forward(model, x, TurboConfig(r=3))
        assert out.shape == (batch, 10)
        assert (out - expected).abs().max().item() < 1e-4
    assert len(compiled.graphs) == 2
    assert all(g.fallback_reason is None and g.merges == 3 for g in compiled.graphs)


@pytest.mark.parametrize("kind", ["vit", "vit_avg"])
def test_exact_duplicates_give_the_unmerged_logits(turbo, kind):
    """Tokens in identical pairs, 8 twin pairs merged in block 0: with proportional attention and
    size-weighted pooling the merged model computes exactly what the unmerged one does."""
    model = small_vit(kind)
    x = duplicated_pairs(model, images(2))
    compiled = turbo(model, r=[8, 0, 0, 0])
    out = compiled(x)
    with torch.no_grad():
        plain = model(x)
    assert compiled.report.merges == 1
    assert compiled.report.reductions_weighted == (1 if kind == "vit_avg" else 0)
    assert (out - plain).abs().max().item() < 1e-5
