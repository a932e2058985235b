"""Packed attention (``F.multi_head_attention_forward``, the one call nn.MultiheadAttention
leaves in the graph): torchvision's ViT merges exactly as a timm ViT with the same weights
(whose SDPA path the reference implementation checks), and nn.TransformerEncoder merges."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from model_builders import images

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

DIM, HEADS, DEPTH, MLP = 48, 3, 3, 96


def torchvision_vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=4, num_layers=DEPTH, num_heads=HEADS,
                              hidden_dim=DIM, mlp_dim=MLP)
    model.heads = nn.Identity()  # its head is zero-initialised; compare the CLS features
    with torch.no_grad():
        model.class_token.normal_()
    return model.eval()


def timm_twin(tv: nn.Module) -> nn.Module:
    """A timm ViT holding the torchvision model's weights: the same function, reached through
    SDPA instead of the packed call."""
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=DIM, depth=DEPTH,
                              num_heads=HEADS, mlp_ratio=MLP / DIM, num_classes=0).eval()
    mapped = {
        "cls_token": tv.class_token,
        "pos_embed": tv.encoder.pos_embedding,
        "patch_embed.proj.weight": tv.conv_proj.weight,
        "patch_embed.proj.bias": tv.conv_proj.bias,
        "norm.weight": tv.encoder.ln.weight,
        "norm.bias": tv.encoder.ln.bias,
    }
    for i, layer in enumerate(tv.encoder.layers):
        attn = layer.self_attention
        mapped.update({
            f"blocks.{i}.norm1.weight": layer.ln_1.weight, f"blocks.{i}.norm1.bias": layer.ln_1.bias,
            f"blocks.{i}.attn.qkv.weight": attn.in_proj_weight, f"blocks.{i}.attn.qkv.bias": attn.in_proj_bias,
            f"blocks.{i}.attn.proj.weight": attn.out_proj.weight, f"blocks.{i}.attn.proj.bias": attn.out_proj.bias,
            f"blocks.{i}.norm2.weight": layer.ln_2.weight, f"blocks.{i}.norm2.bias": layer.ln_2.bias,
            f"blocks.{i}.mlp.fc1.weight": layer.mlp[0].weight, f"blocks.{i}.mlp.fc1.bias": layer.mlp[0].bias,
            f"blocks.{i}.mlp.fc2.weight": layer.mlp[3].weight, f"blocks.{i}.mlp.fc2.bias": layer.mlp[3].bias,
        })
    model.load_state_dict({k: v.detach().clone() for k, v in mapped.items()})
    return model


def test_the_twins_agree_unmerged():
    tv = torchvision_vit()
    x = images(2, size=32)
    with torch.no_grad():
        assert torch.allclose(tv(x), timm_twin(tv)(x), atol=1e-5)


@pytest.mark.parametrize("options", [
    dict(r=4),
    dict(r=6, alpha=1.0),
    dict(r=4, semantic=False),
    dict(r=4, metric="queries"),
    dict(r=4, prop_attn=False),
    dict(r=[8, 0, 5], fusion="div"),
])
def test_torchvision_vit_merges_like_its_timm_twin(turbo, options):
    tv = torchvision_vit()
    twin = timm_twin(tv)
    x = images(2, size=32)
    packed, sdpa = turbo(tv, **options), turbo(twin, **options)
    out_packed, out_sdpa = packed(x), sdpa(x)
    assert [b.kind for b in packed.report.blocks] == ["packed"] * DEPTH
    assert packed.report.tokens_per_block == sdpa.report.tokens_per_block
    assert packed.report.merges > 0
    assert torch.allclose(out_packed, out_sdpa, atol=1e-5), (out_packed - out_sdpa).abs().max()
    with torch.no_grad():
        assert not torch.allclose(out_packed, tv(x), atol=1e-4)  # it did merge


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_merges_and_restores_its_tokens(turbo, norm_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(DIM, HEADS, MLP, batch_first=True, dropout=0.0, norm_first=norm_first)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 20, DIM, generator=torch.Generator().manual_seed(4))
    compiled = turbo(encoder, r=3)
    out = compiled(x)
    assert compiled.report.tokens_per_block == [20, 17]
    assert [b.module for b in compiled.report.blocks] == ["layers.0.self_attn", "layers.1.self_attn"]
    assert out.shape == x.shape  # restored to 20 tokens
    # Exact duplicates: every token the same, so merged tokens stand for copies.
    same = x[:, :1].expand(-1, 20, -1).contiguous()
    with torch.no_grad():
        assert torch.allclose(turbo(encoder, r=3)(same), encoder(same), atol=1e-5)


def test_sequence_first_attention_stays_unmerged_with_a_reason(turbo):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(DIM, HEADS, MLP, batch_first=False, dropout=0.0)
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    x = torch.randn(20, 2, DIM)
    compiled = turbo(encoder, r=3)
    out = compiled(x)
    assert "without batch_first" in compiled.report.fallback_reason
    with torch.no_grad():
        assert torch.allclose(out, encoder(x), atol=1e-6)
