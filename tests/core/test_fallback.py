"""Graphs the backend must not rewrite: compiled unchanged, one warning naming the reason, same outputs."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model_builders import images, small_vit


class TokenBlock(nn.Module):
    """A pre-norm attention block over [B, N, C] with options that make merging unsafe."""

    def __init__(self, dim: int = 16, heads: int = 2, causal: bool = False, position_bias: bool = False) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.bias = nn.Parameter(torch.randn(1, heads, 17, 17)) if position_bias else None

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias, is_causal=self.causal)
        return x + self.proj(out.transpose(1, 2).reshape(b, n, c))


class GridHead(nn.Module):
    """Attention blocks followed by a reshape of the tokens back into a 4x4 grid and a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(TokenBlock(), TokenBlock())
        self.conv = nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x):
        x = self.blocks(x)
        b, n, c = x.shape
        return self.conv(x[:, 1:].transpose(1, 2).reshape(b, c, 4, 4))


def tokens(batch: int = 2, n: int = 17) -> torch.Tensor:
    return torch.randn(batch, n, 16, generator=torch.Generator().manual_seed(0))


def run_and_capture(turbo, caplog, model, x, **options):
    compiled = turbo(model, **options)
    with caplog.at_level(logging.WARNING, logger="turbo_fx"):
        out = compiled(x)
    warnings = [r for r in caplog.records if r.name == "turbo_fx" and r.levelno == logging.WARNING]
    with torch.no_grad():
        plain = model(x)
    return compiled, out, plain, warnings


@pytest.mark.parametrize(
    "model, reason",
    [
        (nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)), "no attention site"),
        (nn.Sequential(TokenBlock(causal=True), TokenBlock(causal=True)), "causal attention"),
        (nn.Sequential(TokenBlock(position_bias=True)), "does not come from the input"),
        (GridHead(), "image grid"),
    ],
    ids=["no-attention", "causal", "position-bias", "token-grid"],
)
def test_unsafe_graphs_fall_back_with_one_warning(turbo, caplog, model, reason):
    model = model.eval()
    compiled, out, plain, warnings = run_and_capture(turbo, caplog, model, tokens(), r=2)
    assert compiled.report.fallback_reason is not None and reason in compiled.report.fallback_reason
    assert len(warnings) == 1 and reason in warnings[0].getMessage()
    assert torch.allclose(out, plain, atol=1e-6)


def test_wrong_length_r_list_falls_back_and_says_why(turbo, caplog):
    model = small_vit("vit", patch_size=8)
    compiled, out, plain, warnings = run_and_capture(turbo, caplog, model, images(2), r=[1, 2])
    assert "lists 2 blocks but the graph has 4" in compiled.report.fallback_reason
    assert len(warnings) == 1
    assert torch.allclose(out, plain, atol=1e-6)


def test_a_pass_bug_never_reaches_the_user(turbo, caplog, monkeypatch):
    import turbo_fx.rewrite as rewrite

    def broken(*args, **kwargs):
        raise KeyError("simulated pass bug")

    monkeypatch.setattr(rewrite, "propagate_shapes", broken)
    model = small_vit("vit", patch_size=8)
    compiled, out, plain, warnings = run_and_capture(turbo, caplog, model, images(2), r=2)
    assert "internal error" in compiled.report.fallback_reason and "simulated pass bug" in compiled.report.fallback_reason
    assert len(warnings) == 1
    assert torch.allclose(out, plain, atol=1e-6)


def test_r0_gives_no_warning(turbo, caplog):
    model = small_vit("vit", patch_size=8)
    compiled, out, plain, warnings = run_and_capture(turbo, caplog, model, images(2), r=0)
    assert warnings == [] and compiled.report.fallback_reason is None
    assert torch.equal(out, plain)
