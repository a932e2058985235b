"""Redundancy analysis (Figure 3): S and C against hand computations, padding, explicit attention, the plot."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from model_builders import images, padded_batch, small_hf, small_vit
from timm.models.vision_transformer import VisionTransformer

from turbo_fx.bench.analysis import NoAttentionError, analyze_redundancy, plot_redundancy


def mean_offdiag_cosine(x: torch.Tensor) -> torch.Tensor:
    """S per sample of x [B, N, C], written out the slow way."""
    n = x.shape[1]
    sim = F.cosine_similarity(x[:, :, None, :], x[:, None, :, :], dim=-1)
    return sim[:, ~torch.eye(n, dtype=torch.bool)].mean(dim=-1)


def top_quarter_mass(cls_row: torch.Tensor) -> torch.Tensor:
    top = math.ceil(cls_row.shape[-1] / 4)
    return cls_row.sort(dim=-1, descending=True).values[:, :top].sum(dim=-1)


def timm_reference(model, x) -> list[tuple[float, float]]:
    """(S, C) per block from forward pre-hooks and timm's attention written out by hand."""
    found = []

    def hook(block, args):
        (h,) = args
        attn = block.attn
        y = block.norm1(h)
        batch, n, channels = y.shape
        qkv = attn.qkv(y).reshape(batch, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        probs = (q @ k.transpose(-2, -1) * attn.scale).softmax(dim=-1)
        found.append((float(mean_offdiag_cosine(h).mean()), float(top_quarter_mass(probs[:, :, 0].mean(dim=1)).mean())))

    handles = [b.register_forward_pre_hook(hook) for b in model.blocks]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return found


def test_timm_vit_matches_hooks_and_hand_attention():
    model = small_vit("vit")
    x = images(2)
    report = analyze_redundancy(model, x)
    expected = timm_reference(model, x)
    assert [b.module for b in report.blocks] == [f"blocks.{i}.attn" for i in range(4)]
    assert [b.tokens for b in report.blocks] == [17] * 4
    assert report.redundancy == pytest.approx([s for s, _ in expected], abs=1e-5)
    assert report.concentration == pytest.approx([c for _, c in expected], abs=1e-5)
    # The analysis leaves no compiled code behind.
    forward = type(model).forward.__code__
    assert torch._C._dynamo.eval_frame._debug_get_cache_entry_list(forward) == []


def test_identical_tokens_give_s_one_and_uniform_attention_gives_a_quarter():
    # No class token and no position embedding: a constant image makes all 16 tokens equal,
    # so every block sees identical tokens (S = 1) and attends uniformly (C = 4 / 16).
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
                              class_token=False, global_pool="avg", pos_embed="none").eval()
    report = analyze_redundancy(model, torch.full((2, 3, 32, 32), 0.7))
    assert report.redundancy == pytest.approx([1.0, 1.0], abs=1e-6)
    assert report.concentration == pytest.approx([0.25, 0.25], abs=1e-6)


def test_zero_queries_give_uniform_attention():
    # q = 0 makes every logit 0: the CLS query spreads 1/17 over 17 tokens, and the
    # top ceil(17/4) = 5 of them hold 5/17.
    model = small_vit("vit", depth=2)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[:48] = 0.0
            block.attn.qkv.bias[:48] = 0.0
    report = analyze_redundancy(model, images(2))
    assert report.concentration == pytest.approx([5 / 17] * 2, abs=1e-6)


def bert_reference_s(model, ids, mask) -> list[float]:
    """S per layer over real tokens only, from the hidden states entering each layer."""
    found = []

    def hook(layer, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        per_sample = [mean_offdiag_cosine(h[i : i + 1, mask[i].bool()]) for i in range(h.shape[0])]
        found.append(float(torch.cat(per_sample).mean()))

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in model.encoder.layer]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in handles:
        h.remove()
    return found


def test_bert_padding_is_excluded():
    model = small_hf("bert")
    ids, mask = padded_batch([10, 6], 12)
    report = analyze_redundancy(model, model_kwargs={"input_ids": ids, "attention_mask": mask})
    assert len(report.blocks) == 3
    assert all(b.tokens == 12 and b.real_tokens == 8.0 for b in report.blocks)
    assert report.redundancy == pytest.approx(bert_reference_s(model, ids, mask), abs=1e-5)
    assert "real tokens" in report.table()

    other = ids.clone()
    other[mask == 0] = torch.randint(1, 100, (int((mask == 0).sum()),), generator=torch.Generator().manual_seed(7))
    assert not torch.equal(other, ids)
    changed = analyze_redundancy(model, model_kwargs={"input_ids": other, "attention_mask": mask})
    assert changed.redundancy == pytest.approx(report.redundancy, abs=1e-6)
    assert changed.concentration == pytest.approx(report.concentration, abs=1e-6)


def test_explicit_attention_gives_the_sdpa_numbers():
    explicit = analyze_redundancy(small_hf("vit", attn="eager"), images(2))
    fused = analyze_redundancy(small_hf("vit", attn="sdpa"), images(2))
    assert [b.kind for b in explicit.blocks] == ["explicit"] * 3
    assert [b.kind for b in fused.blocks] == ["sdpa"] * 3
    assert explicit.redundancy == pytest.approx(fused.redundancy, abs=1e-5)
    assert explicit.concentration == pytest.approx(fused.concentration, abs=1e-5)


def test_report_exports_and_plot(tmp_path):
    vit = analyze_redundancy(small_vit("vit"), images(2), label="timm ViT")
    hf = analyze_redundancy(small_hf("vit"), images(2), label="HF ViT")
    data = json.loads(json.dumps(vit.to_dict()))
    assert data["label"] == "timm ViT" and len(data["blocks"]) == 4
    assert set(data["blocks"][0]) >= {"block", "module", "tokens", "redundancy", "concentration"}
    assert "| blocks.3.attn" in vit.table() and "timm ViT" in str(vit)

    path = tmp_path / "redundancy.png"
    assert plot_redundancy([vit, hf], str(path)) == str(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    single = tmp_path / "one.png"
    plot_redundancy({"only": vit}, str(single))
    assert single.stat().st_size > 5000


def test_model_without_attention_raises():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 8)).eval()
    with pytest.raises(NoAttentionError, match="no self-attention block"):
        analyze_redundancy(model, torch.randn(2, 5, 8))
