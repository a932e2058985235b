"""Explicit attention emitted as one SDPA call (``passes/explicit_as_sdpa.py``).

Which paths convert is checked on Dynamo's own graphs of small attention blocks written in
the styles models use (scale on the scores, on q, by division, pre-transposed keys, casts,
inert dropout); paths SDPA does not compute stay explicit. Converted models must give the
output of the same rewrite with every site explicit, and under Inductor they must run the
fused attention kernel at every site."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model_builders import dynamo_graph, padded_batch, small_hf
from turbo_fx.passes.explicit_as_sdpa import sdpa_form
from turbo_fx.passes.find_attention import find_attention_sites

tf = pytest.importorskip("transformers")

DIM, HEADS, TOKENS = 32, 4, 17


class Attention(nn.Module):
    """Pre-norm self-attention written in one of several explicit styles."""

    def __init__(self, style: str) -> None:
        super().__init__()
        self.style = style
        self.norm = nn.LayerNorm(DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.scale = (DIM // HEADS) ** -0.5

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, n, 3, HEADS, DIM // HEADS).unbind(2)
        q, v = q.transpose(1, 2), v.transpose(1, 2)
        s = self.style
        if s == "pre_transposed":
            scores = (q @ k.permute(0, 2, 3, 1)) * self.scale
        elif s == "scaled_q":
            scores = (q * self.scale) @ k.transpose(1, 2).transpose(-2, -1)
        elif s == "divided":
            scores = torch.matmul(q, k.transpose(1, 2).transpose(-1, -2)) / math.sqrt(DIM // HEADS)
        elif s == "two_factors":
            scores = (q @ k.transpose(1, 2).transpose(-2, -1)) * 2.0 * (self.scale / 2.0)
        else:
            scores = (q @ k.transpose(1, 2).transpose(-2, -1)) * self.scale
        if s == "mask_before_scale":
            scores = (q @ k.transpose(1, 2).transpose(-2, -1) + mask) * self.scale
        elif mask is not None:
            scores = scores + mask
        if s == "fp32_softmax":
            probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        else:
            probs = scores.softmax(dim=-1)
        probs = F.dropout(probs, 0.1, training=self.training and s == "live_dropout")
        out = (probs @ v).transpose(1, 2).reshape(b, n, DIM)
        return x + self.proj(out)


class Blocks(nn.Module):
    def __init__(self, style: str, depth: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.cls = nn.Parameter(torch.randn(1, 1, DIM))
        self.blocks = nn.ModuleList(Attention(style) for _ in range(depth))
        with torch.no_grad():
            for p in self.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 0.3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        for block in self.blocks:
            x = block(x, mask)
        return x[:, 0]


def tokens(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, TOKENS - 1, DIM, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("style, scale", [
    ("plain", (DIM // HEADS) ** -0.5),
    ("divided", (DIM // HEADS) ** -0.5),
    ("two_factors", (DIM // HEADS) ** -0.5),
    ("scaled_q", 1.0),  # the scale is already in q, which SDPA then takes as it is
    ("pre_transposed", (DIM // HEADS) ** -0.5),
    ("fp32_softmax", (DIM // HEADS) ** -0.5),
])
def test_styles_sdpa_computes_convert_with_their_scale(style, scale):
    gm = dynamo_graph(Blocks(style, depth=1).eval(), tokens())
    (site,) = find_attention_sites(gm)
    form = sdpa_form(site)
    assert form is not None
    assert form.scale == pytest.approx(scale, rel=1e-12)
    assert form.k_transposed == (style == "pre_transposed")


@pytest.mark.parametrize("style", ["mask_before_scale", "live_dropout"])
def test_paths_sdpa_does_not_compute_stay_explicit(style):
    model = Blocks(style, depth=1)
    model.train(style == "live_dropout")
    mask = torch.zeros(2, 1, 1, TOKENS)
    gm = dynamo_graph(model, tokens(), mask)
    (site,) = find_attention_sites(gm)
    assert site.kind == "explicit"
    assert sdpa_form(site) is None


def test_an_added_bool_mask_stays_explicit():
    """``scores + bool_mask`` adds 0 or 1; SDPA would read the same tensor as keep/drop."""
    gm = dynamo_graph(Blocks("plain", depth=1).eval(), tokens(), torch.ones(2, 1, 1, TOKENS, dtype=torch.bool))
    (site,) = find_attention_sites(gm)
    assert site.mask is not None and sdpa_form(site) is None


@pytest.mark.parametrize("style", ["plain", "divided", "scaled_q", "pre_transposed", "fp32_softmax"])
def test_converted_model_matches_the_explicit_rewrite(turbo, style):
    model, x = Blocks(style).eval(), tokens()
    explicit = turbo(model, r=3, explicit_as_sdpa=False)
    converted = turbo(model, r=3)
    reference = explicit(x)
    out = converted(x)
    assert explicit.report.sdpa_sites == []
    assert converted.report.sdpa_sites == [0, 1, 2]
    assert converted.report.tokens_per_block == explicit.report.tokens_per_block == [17, 14, 11]
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    assert "scaled_dot_product_attention" in converted.report.summary()


def test_unconverted_sites_keep_their_explicit_form(turbo):
    """A padding mask added before the scale: the sites stay explicit and still merge, with
    the output of the same rewrite asked to keep them explicit."""
    model, x = Blocks("mask_before_scale").eval(), tokens()
    mask = torch.zeros(2, 1, 1, TOKENS)
    mask[1, ..., -4:] = torch.finfo(torch.float32).min  # the second sequence has 4 padding tokens
    compiled, explicit = turbo(model, r=3), turbo(model, r=3, explicit_as_sdpa=False)
    out, reference = compiled(x, mask), explicit(x, mask)
    assert compiled.report.sdpa_sites == []
    assert compiled.report.merges == 3 and compiled.report.padding
    assert torch.equal(out, reference)


def graph_nodes(report, test) -> int:
    return sum(1 for n in report.graph_module.graph.nodes if test(n))


def test_padding_mask_and_bias_ride_in_the_sdpa_mask():
    """Eager BERT with padding: every site becomes SDPA whose mask is the original padding
    mask, then the merges' key bias; the output equals the explicit rewrite's."""
    from turbo_fx.report import recording

    model = small_hf("bert", attn="eager")
    ids, mask = padded_batch([20, 13], 20)
    outs, reports = {}, {}
    for name, extra in (("sdpa", {}), ("explicit", {"explicit_as_sdpa": False})):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="turbo", options={"r": 3, "inner_backend": "eager", **extra})
        with recording(keep_graphs=True) as rec, torch.no_grad():
            outs[name] = compiled(input_ids=ids, attention_mask=mask).last_hidden_state
        (reports[name],) = rec.graphs
    assert reports["sdpa"].padding and reports["sdpa"].sdpa_sites == [0, 1, 2]
    softmaxes = graph_nodes(reports["sdpa"], lambda n: "softmax" in str(n.target))
    sdpas = [n for n in reports["sdpa"].graph_module.graph.nodes if n.target is F.scaled_dot_product_attention]
    assert softmaxes == 0 and len(sdpas) == 3
    assert all(n.kwargs["attn_mask"] is not None for n in sdpas)
    real = mask.bool()
    torch.testing.assert_close(outs["sdpa"][real], outs["explicit"][real], atol=1e-5, rtol=1e-5)


def test_inductor_runs_fused_attention_at_every_explicit_site():
    """BLIP's explicit vision tower under turbo: one fused attention call per site, as
    plain Inductor gives the unmerged tower."""
    from torch.profiler import profile

    torch.manual_seed(0)
    config = tf.BlipVisionConfig(image_size=32, patch_size=4, hidden_size=48, num_hidden_layers=3,
                                 num_attention_heads=3, intermediate_size=96, initializer_range=0.02)
    model = tf.BlipVisionModel(config).eval()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, backend="turbo", options={"r": 4})
    with torch.no_grad():
        out = compiled(pixel_values=x).last_hidden_state
        with profile() as prof:
            compiled(pixel_values=x)
    fused = [e for e in prof.events() if "scaled_dot_product" in e.name and "attention" in e.name
             and not e.name.startswith("aten::scaled_dot_product_attention")]
    assert len({e.name for e in fused}) == 1 and len(fused) == 3
    assert out.shape == (2, 65, 48)
