"""Masks built from no input: an all-allowing one (transformers >= 5.17 builds
``arange(N) >= 0`` for bidirectional encoders) changes nothing and must not stop merging;
a real constant bias (relative position) still does."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, explicit: bool) -> None:
        super().__init__()
        self.heads, self.explicit = heads, explicit
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, mask):
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if self.explicit:  # matmul -> scale -> + additive mask -> softmax -> matmul, as transformers' eager path
            logits = q @ k.transpose(-1, -2) * (c // self.heads) ** -0.5
            if mask is not None:
                logits = logits + torch.zeros_like(mask, dtype=logits.dtype).masked_fill(~mask, float("-inf"))
            attended = logits.softmax(dim=-1) @ v
        else:
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, n, c))
        return x + self.mlp(self.norm2(x))


class Encoder(nn.Module):
    """CLS + patch tokens through pre-norm blocks; ``mask`` picks the constant mask kind."""

    def __init__(self, mask: str, dim: int = 32, depth: int = 3, tokens: int = 24, explicit: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mask_kind, self.tokens = mask, tokens
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.embed = nn.Linear(8, dim)
        self.blocks = nn.ModuleList(Block(dim, 4, explicit) for _ in range(depth))
        self.rel = nn.Parameter(torch.randn(tokens + 1, tokens + 1) * 0.1)

    def forward(self, patches):
        x = torch.cat([self.cls.expand(patches.shape[0], -1, -1), self.embed(patches)], dim=1)
        n = x.shape[1]
        if self.mask_kind == "none":
            mask = None
        elif self.mask_kind == "all-true":
            idx = torch.arange(n, device=x.device)
            mask = (idx[None, None, :, None] >= 0) & (idx[None, None, None, :] >= 0)
            mask = mask.expand(x.shape[0], -1, n, n)
        elif self.mask_kind == "causal":  # as transformers >= 5.17 builds it, from arange alone
            idx = torch.arange(n, device=x.device)
            mask = (idx[None, None, :, None] >= idx[None, None, None, :]).expand(x.shape[0], -1, n, n)
        else:  # a learned relative-position bias: constant, and it varies by query
            mask = self.rel[None, None]
        for block in self.blocks:
            x = block(x, mask)
        return x[:, 0]


def patches():
    return torch.randn(2, 24, 8, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("explicit", [False, True])
@pytest.mark.parametrize("prop_attn", [True, False])
def test_an_all_true_constant_mask_merges_like_no_mask(turbo, prop_attn, explicit):
    x = patches()
    masked = turbo(Encoder("all-true", explicit=explicit).eval(), r=4, prop_attn=prop_attn)
    plain = turbo(Encoder("none", explicit=explicit).eval(), r=4, prop_attn=prop_attn)
    out_masked, out_plain = masked(x), plain(x)
    assert masked.report.fallback_reason is None
    assert masked.report.tokens_per_block == plain.report.tokens_per_block == [25, 21, 17]
    assert not masked.report.padding
    assert torch.allclose(out_masked, out_plain, atol=1e-6)


def test_a_parameter_bias_that_is_zero_now_still_falls_back(turbo):
    # Zero at init (as BEiT's relative-position table is), but read from a parameter: weights
    # loaded in place later would make it matter without a recompile, so it is never dropped.
    model = Encoder("relative").eval()
    with torch.no_grad():
        model.rel.zero_()
    compiled = turbo(model, r=4)
    compiled(patches())
    assert "does not come from the input" in compiled.report.fallback_reason


@pytest.mark.parametrize("kind, reason", [
    ("relative", "does not come from the input"),
    ("causal", "varies by query"),  # built from arange alone, as transformers >= 5.17 builds it
])
def test_other_constant_masks_still_fall_back_and_say_what_they_are(turbo, kind, reason):
    model = Encoder(kind).eval()
    compiled = turbo(model, r=4)
    out = compiled(patches())
    assert reason in compiled.report.fallback_reason
    with torch.no_grad():
        assert torch.allclose(out, model(patches()), atol=1e-6)
