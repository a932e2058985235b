"""Per-sequence decisions: a graph with several token sequences merges the one that can,
and every other sequence runs exactly as the unmerged model (bit for bit, since the same
ops run on the same values)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from model_builders import images, tiny_timm_vit

tf = pytest.importorskip("transformers")

SMALL = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96)
VISION = dict(SMALL, image_size=32, patch_size=4)  # 64 patches + CLS = 65 tokens
TEXT = dict(SMALL, vocab_size=100, max_position_embeddings=32)


def text_inputs(batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(3, 100, (batch, length), generator=torch.Generator().manual_seed(1))


def clip_model():
    torch.manual_seed(0)
    return tf.CLIPModel(tf.CLIPConfig(vision_config=VISION, text_config=TEXT, projection_dim=16)).eval()


def test_clip_merges_the_image_tower_and_leaves_the_text_tower_exact(turbo):
    model = clip_model()
    inputs = dict(input_ids=text_inputs(), pixel_values=images(2, size=32))
    compiled = turbo(model, r=4)
    out = compiled(**inputs)
    with torch.no_grad():
        plain = model(**inputs)
    report = compiled.report
    assert report.fallback_reason is None
    assert [(b.module, b.tokens_in, b.r_applied) for b in report.blocks] == [
        ("vision_model.encoder.layers.0.self_attn", 65, 4),
        ("vision_model.encoder.layers.1.self_attn", 61, 4),
    ]
    decisions = {s.module: (s.decision, s.reason) for s in report.sites}
    assert decisions["vision_model.encoder.layers.0.self_attn"] == ("merges", "")
    for layer in (0, 1):
        decision, reason = decisions[f"text_model.encoder.layers.{layer}.self_attn"]
        assert decision == "untouched" and "causal" in reason
    assert torch.equal(out.text_embeds, plain.text_embeds)
    assert torch.equal(out.text_model_output.last_hidden_state, plain.text_model_output.last_hidden_state)
    # The image tower did merge: its outputs move, and its token axis was restored.
    assert not torch.allclose(out.image_embeds, plain.image_embeds, atol=1e-6)
    assert out.vision_model_output.last_hidden_state.shape == plain.vision_model_output.last_hidden_state.shape
    assert out.logits_per_image.shape == plain.logits_per_image.shape


def test_clip_with_duplicated_patches_gives_the_unmerged_similarities(turbo):
    # Every patch the same and no position embedding: merged tokens stand for exact copies,
    # and with proportional attention the image tower's output equals the unmerged one.
    model = clip_model()
    with torch.no_grad():
        model.vision_model.embeddings.position_embedding.weight.zero_()
    pixels = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2)).repeat(1, 1, 8, 8)
    inputs = dict(input_ids=text_inputs(), pixel_values=pixels)
    out = turbo(model, r=8)(**inputs)
    with torch.no_grad():
        plain = model(**inputs)
    assert torch.allclose(out.image_embeds, plain.image_embeds, atol=1e-5)
    assert torch.allclose(out.logits_per_image, plain.logits_per_image, atol=1e-4)
    assert torch.equal(out.text_embeds, plain.text_embeds)


class TwoTowers(nn.Module):
    """A dual encoder assembled by hand (no class a library knows): a timm ViT and a
    bidirectional BERT, both mergeable on their own."""

    def __init__(self) -> None:
        super().__init__()
        pytest.importorskip("timm")
        self.image = tiny_timm_vit(depth=3)
        self.text = tf.BertModel(tf.BertConfig(**TEXT), add_pooling_layer=False)

    def forward(self, pixels, ids):
        return self.image(pixels), self.text(input_ids=ids).last_hidden_state


def test_of_two_mergeable_sequences_the_longer_chain_merges_and_the_other_stays_exact(turbo):
    model = TwoTowers().eval()
    pixels, ids = images(2, size=32), text_inputs()
    image, text = turbo(model, r=3)(pixels, ids)
    with torch.no_grad():
        plain_image, plain_text = model(pixels, ids)
    assert torch.equal(text, plain_text)
    assert image.shape == plain_image.shape and not torch.allclose(image, plain_image, atol=1e-6)


def test_two_towers_report_names_the_stream_that_merges(turbo):
    model = TwoTowers().eval()
    compiled = turbo(model, r=3)
    compiled(images(2, size=32), text_inputs())
    report = compiled.report
    assert [b.module for b in report.blocks] == [f"image.blocks.{i}.attn" for i in range(3)]
    text_sites = [s for s in report.sites if s.module.startswith("text.")]
    assert len(text_sites) == 2
    assert all(s.decision == "untouched" and "another sequence merges" in s.reason for s in text_sites)
    assert len({s.stream for s in text_sites}) == 1
    assert {s.stream for s in report.sites if s.decision == "merges"}.isdisjoint({text_sites[0].stream})


def test_explain_lists_every_site_with_its_decision():
    import turbo_fx

    model = clip_model()
    report = turbo_fx.explain(model, model_kwargs=dict(input_ids=text_inputs(), pixel_values=images(2, size=32)), r=4)
    text = str(report)
    assert "untouched (exact): 2 site(s)" in text
    assert "text_model.encoder.layers.1.self_attn" in text and "causal" in text
    graph = report.graphs[0]
    assert [s.decision for s in graph.sites] == ["merges", "merges", "untouched", "untouched"]


class GrowingSequence(nn.Module):
    """Image tokens through two blocks, then learned extra tokens concatenated onto them and
    two more blocks (single-stream fusion): one sequence whose token count changes."""

    def __init__(self) -> None:
        super().__init__()
        pytest.importorskip("timm")
        self.vit = tiny_timm_vit(depth=4)
        self.extra = nn.Parameter(torch.randn(1, 6, 48))

    def forward(self, pixels):
        x = self.vit.patch_embed(pixels)
        x = self.vit._pos_embed(x)
        x = self.vit.blocks[1](self.vit.blocks[0](x))
        x = torch.cat([x, self.extra.expand(x.shape[0], -1, -1)], dim=1)
        return self.vit.blocks[3](self.vit.blocks[2](x))


def test_a_sequence_whose_token_count_grows_merges_and_restores_each_component(turbo):
    # The whole sequence cannot merge (its count changes between sites), so each attention
    # merges and restores on its own; after the concatenation only the image part (65 of 71
    # tokens) merges, the extra tokens stay whole.
    model = GrowingSequence().eval()
    pixels = images(2, size=32)
    compiled = turbo(model, r=4)
    out = compiled(pixels)
    report = compiled.report
    assert report.fallback_reason is None and report.mode == "merge-and-restore"
    assert "changes its token count between sites ([65, 71])" in report.mode_note
    merging = [(c.module, c.tokens_in, c.tokens_merged) for c in report.components if c.decision == "merges"]
    assert merging == [(f"vit.blocks.{i}.attn", 65, 33) for i in range(4)]
    with torch.no_grad():
        want = model(pixels)
    assert out.shape == want.shape and 0 < (out - want).abs().max()
    torch._dynamo.reset()
    assert torch.equal(turbo(model, ratio=0.0)(pixels), want)
