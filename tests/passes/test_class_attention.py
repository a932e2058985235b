"""Sequences without a class token, and the heads that read them by attention.

CaiT (talking-heads self-attention over the patches, then class-attention blocks whose keys
are ``cat([class token, patches])``) and MAP-pooled ViTs (a learned query cross-attends to
the patches) have no class token among the tokens that merge: nothing protects a token,
the ranking is by redundancy alone, and the heads read the merged patches with their
``log(size)`` key bias (none for the class token's own key). For exact duplicates that
gives the unmerged logits."""
from __future__ import annotations

import logging

import pytest
import torch

from model_builders import images

timm = pytest.importorskip("timm")
from timm.models.cait import Cait  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from turbo_fx.passes.find_attention import find_attention_sites  # noqa: E402


def cait(depth: int = 3, class_depth: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    # timm's layer scale starts at 1e-5, which would make every block nearly the identity.
    model = Cait(img_size=32, patch_size=8, embed_dim=48, depth=depth, num_heads=3, depth_token_only=class_depth,
                 num_classes=10, init_values=1.0)
    return spread(model)


def spread(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights large enough that attention is far from uniform."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 or "token" in name or "latent" in name:
                param.normal_(0.0, 0.15)
    return model.eval()


def map_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, global_pool="map",
                              class_token=False, num_classes=10)
    return spread(model)


def twin_columns(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Patches (and their position embeddings) in identical adjacent pairs: on the 4x4 grid
    of 8-px patches, columns 1 and 3 copy columns 0 and 2, so tokens 2k and 2k+1 are twins."""
    x = x.clone()
    x[..., 8:16] = x[..., 0:8]
    x[..., 24:32] = x[..., 16:24]
    with torch.no_grad():
        pos = model.pos_embed[0]  # [16, C]: no prefix tokens in either model
        assert pos.shape[0] == 16
        pos[1::2] = pos[0::2]
    return x


def decisions(report) -> dict[str, str]:
    return {s.module: s.decision for s in report.sites}


def test_talking_heads_attention_is_found_with_its_softmax():
    model = cait(depth=2, class_depth=1)
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    torch.compile(model, backend=keep)(images(2))
    sites = find_attention_sites(graphs[0])
    assert [s.module for s in sites] == ["blocks.0.attn", "blocks.1.attn", "blocks_token_only.0.attn"]
    heads_mixed = sites[:2]
    assert all(s.kind == "explicit" and s.softmax is not None for s in heads_mixed)
    # The bias goes where the softmax reads: after the pre-softmax head mix.
    assert all(s.logits.op == "call_method" and s.logits.target == "permute" for s in heads_mixed)
    assert all(not s.problems for s in heads_mixed)


def test_cait_merges_its_patches_and_the_class_attention_reads_them(turbo):
    model = cait()
    compiled = turbo(model, r=2)
    out = compiled(images(2))
    report = compiled.report
    assert report.fallback_reason is None
    assert report.tokens_per_block == [16, 14, 12]
    assert report.protected == 0
    assert "no class token" in report.protected_note
    assert report.semantic_source.startswith("off: the sequence has no class token")
    assert decisions(report) == {
        "blocks.0.attn": "merges", "blocks.1.attn": "merges", "blocks.2.attn": "merges",
        "blocks_token_only.0.attn": "reads merged", "blocks_token_only.1.attn": "reads merged",
    }
    assert out.shape == (2, 10)


@pytest.mark.parametrize("build", [cait, map_vit], ids=["cait", "map-head"])
def test_heads_over_merged_twins_give_the_unmerged_logits(turbo, build):
    model = build()
    x = twin_columns(model, images(2))
    with torch.no_grad():
        plain = model(x)
    # Half the twins merge, so sizes differ (1 and 2) and the bias matters.
    compiled = turbo(model, r=[4, 0, 0])
    out = compiled(x)
    assert compiled.report.merges == 1
    assert compiled.report.tokens_per_block == [16, 12, 12]
    assert (out - plain).abs().max().item() < 1e-5
    # Each merged twin is one key: without its log(2) bias the heads weigh it half.
    unbiased = turbo(model, r=[4, 0, 0], cross_attention_bias=False)(x)
    assert (unbiased - plain).abs().max().item() > 1e-3


def test_semantic_only_ranking_without_a_class_token_falls_back_and_says_why(turbo, caplog):
    model = map_vit()
    x = images(2)
    with caplog.at_level(logging.WARNING, logger="turbo_fx"):
        compiled = turbo(model, r=2, redundancy=False)
        out = compiled(x)
    assert "semantic-only ranking (redundancy=False) needs a class token" in caplog.text
    with torch.no_grad():
        assert torch.equal(out, model(x))


def test_patch_positions_from_an_embedding_table_still_mean_no_class_token(turbo):
    """SigLIP's vision tower looks its positions up in an nn.Embedding (from a buffer, not the
    input): its tokens are patches only, unlike a text model's looked-up token ids."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = tf.SiglipVisionConfig(image_size=32, patch_size=4, hidden_size=48, num_hidden_layers=2,
                                   num_attention_heads=3, intermediate_size=96)
    model = tf.SiglipVisionModel(config).eval()
    # Twin patches: on the 8x8 grid of 4-px patches odd columns copy even ones, so tokens
    # 2k and 2k+1 are identical (their position rows too).
    x = images(2)
    for col in range(0, 32, 8):
        x[..., col + 4:col + 8] = x[..., col:col + 4]
    with torch.no_grad():
        table = model.embeddings.position_embedding.weight
        table[1::2] = table[0::2]
        plain = model(pixel_values=x).pooler_output
    compiled = turbo(model, r=[8, 0])
    out = compiled(pixel_values=x).pooler_output
    report = compiled.report
    assert report.fallback_reason is None
    assert report.protected == 0
    assert report.tokens_per_block == [64, 56]
    # The attention-pooling head (nn.MultiheadAttention) reads the merged patches, with
    # their log-size bias as a float key padding mask.
    assert decisions(report)["head.attention"] == "reads merged"
    assert (out - plain).abs().max().item() < 1e-5
