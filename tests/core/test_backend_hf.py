"""The turbo backend on transformers models: ViT, DeiT, DINOv2 and BERT with padded batches."""
from __future__ import annotations

import pytest
import torch

from model_builders import images, padded_batch, small_hf


@pytest.mark.parametrize("kind, protected", [("vit", 1), ("deit", 2), ("dinov2", 1)])
def test_vision_models_rewrite_and_restore_outputs(turbo, kind, protected):
    model = small_hf(kind)
    x = images(2)
    compiled = turbo(model, r=6)
    out = compiled(x)
    report = compiled.report
    assert report.fallback_reason is None
    assert report.protected == protected
    n0 = 64 + protected
    assert report.tokens_per_block == [n0, n0 - 6, n0 - 12]
    assert report.outputs_restored >= 1
    with torch.no_grad():
        plain = model(x)
    assert out.last_hidden_state.shape == plain.last_hidden_state.shape
    # protected tokens are never merged, so their rows keep their own values (not copies of others)
    cls = out.last_hidden_state[:, 0]
    assert not any(torch.allclose(cls, out.last_hidden_state[:, j]) for j in range(protected, n0))


@pytest.mark.parametrize("kind", ["vit", "dinov2"])
def test_explicit_attention_equals_sdpa_under_turbo(turbo, kind):
    """Two independent paths: SDPA (semantic value recomputed as one CLS row, bias as a mask)
    and explicit matmul+softmax (semantic value read from the probabilities, bias added to logits)."""
    x = images(2)
    fused = turbo(small_hf(kind, attn="sdpa"), r=5)(x).last_hidden_state
    torch._dynamo.reset()
    explicit_model = small_hf(kind, attn="eager")
    explicit = turbo(explicit_model, r=5)
    out = explicit(x).last_hidden_state
    assert explicit.report.fallback_reason is None
    assert {b.kind for b in explicit.report.blocks} == {"explicit"}
    assert (out - fused).abs().max().item() < 1e-4


def test_restore_outputs_off_returns_merged_tokens(turbo):
    compiled = turbo(small_hf("vit"), r=6, restore_outputs=False)
    out = compiled(images(2))
    assert out.last_hidden_state.shape == (2, 65 - 18, 48)
    assert compiled.report.outputs_restored == 0


def test_all_hidden_states_are_restored(turbo):
    model = small_hf("vit")
    compiled = turbo(model, r=6)
    out = compiled(images(2), output_hidden_states=True)
    assert [tuple(h.shape) for h in out.hidden_states] == [(2, 65, 48)] * 4
    # hidden state 3 (after the last block) was restored from 47 merged tokens: 47 distinct rows
    distinct = torch.unique(out.hidden_states[3][0], dim=0)
    assert distinct.shape[0] == 47


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_bert_padding_never_touches_real_tokens(turbo, attn):
    """Sample 1 has 14 padding tokens; r=2 over 3 layers merges 6 tokens per sample, which
    the padding alone can absorb. Its real tokens must then equal the unmerged model's, and
    padding content must not matter for any real token."""
    model = small_hf("bert", attn=attn)
    ids, mask = padded_batch([20, 6], 20)
    compiled = turbo(model, r=2)
    out = compiled(input_ids=ids, attention_mask=mask).last_hidden_state
    assert compiled.report.padding and compiled.report.fallback_reason is None
    assert compiled.report.protected == 1
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (out[1, :6] - plain[1, :6]).abs().max().item() < 1e-5
    other_padding = ids.clone()
    other_padding[1, 6:] = torch.randint(1, 100, (14,), generator=torch.Generator().manual_seed(9))
    again = compiled(input_ids=other_padding, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert torch.equal(out[real], again[real])


def test_bert_padding_with_inductor(turbo):
    """The padding path (mask check, validity, size-0 padding) through Inductor."""
    model = small_hf("bert", layers=2)
    ids, mask = padded_batch([16, 5], 16)
    out = turbo(model, r=3, inner_backend="inductor")(input_ids=ids, attention_mask=mask).last_hidden_state
    torch._dynamo.reset()
    eager = turbo(model, r=3)(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (out - eager).abs().max().item() < 1e-4


def test_bert_varying_lengths_fall_back_with_advice_or_merge_with_dynamic_false(turbo):
    """A second sequence length makes Dynamo's token count symbolic: that graph falls back with
    a reason that says what to do; with dynamic=False every length gets its own merged graph."""
    model = small_hf("bert")
    compiled = turbo(model, r=2)
    for n in (16, 20):
        ids, mask = padded_batch([n, n - 3], n)
        out = compiled(input_ids=ids, attention_mask=mask).last_hidden_state
        assert out.shape == (2, n, 48)
    assert compiled.graphs[0].merges == 3
    assert "dynamic=False" in compiled.graphs[1].fallback_reason
    torch._dynamo.reset()
    static = torch.compile(model, backend="turbo", options={"r": 2, "inner_backend": "eager"}, dynamic=False)
    from turbo_fx.report import recording

    with recording() as rec, torch.no_grad():
        for n in (16, 20):
            ids, mask = padded_batch([n, n - 3], n)
            static(input_ids=ids, attention_mask=mask)
    assert [g.tokens_per_block for g in rec.graphs] == [[16, 14, 12], [20, 18, 16]]
