"""Cross-attention over merged tokens: a site of another sequence whose keys come from the
merged one (BLIP's text encoder and decoder over the image tokens) attends over the merged
tokens with their log-size key bias, so for exact duplicates it gives the unmerged result."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model_builders import images, tiny_timm_vit

tf = pytest.importorskip("transformers")

SMALL = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96)
# initializer_range: BLIP's default (1e-10) makes every random image token the same.
BLIP = dict(vision_config=dict(SMALL, image_size=32, patch_size=4, initializer_range=0.02),
            text_config=dict(SMALL, vocab_size=100, max_position_embeddings=32, encoder_hidden_size=48,
                             initializer_range=0.02),
            projection_dim=16)


def two_pattern_images(batch: int = 2) -> torch.Tensor:
    """An 8x8 grid of 4-px patches: pattern A in 48 patches, pattern B in 16, so the image
    tokens are exact duplicates of two kinds in unequal numbers (once positions are zero)."""
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(batch, 3, 4, 4, generator=g), torch.randn(batch, 3, 4, 4, generator=g)
    grid = a.repeat(1, 1, 8, 8)
    grid[:, :, :8, :] = b.repeat(1, 1, 2, 8)  # the top two patch rows
    return grid


def blip(cls):
    torch.manual_seed(0)
    model = cls(tf.BlipConfig(**BLIP)).eval()
    with torch.no_grad():
        model.vision_model.embeddings.position_embedding.zero_()
    return model


def text_ids() -> torch.Tensor:
    return torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(1))


def test_blip_itm_merges_the_image_and_its_text_encoder_reads_the_merged_tokens(turbo):
    model = blip(tf.BlipForImageTextRetrieval)
    inputs = dict(input_ids=text_ids(), pixel_values=images(2, size=32))
    compiled = turbo(model, r=6)
    out = compiled(**inputs)
    report = compiled.report
    assert report.fallback_reason is None
    assert report.tokens_per_block == [65, 59]
    decisions = {s.module: s.decision for s in report.sites}
    assert decisions["vision_model.encoder.layers.1.self_attn"] == "merges"
    assert decisions["text_encoder.encoder.layer.0.crossattention.self"] == "reads merged"
    assert decisions["text_encoder.encoder.layer.0.attention.self"] == "untouched"
    # The text's cross-attention comes after the image merges: the CLS row ranks them, and the
    # report says so.
    assert report.semantic_source.startswith("the first token's (CLS) self-attention row")
    assert "reads the tokens only after they merge" in report.semantic_source
    with torch.no_grad():
        plain = model(**inputs)
    assert out.itm_score.shape == plain.itm_score.shape
    assert not torch.allclose(out.itm_score, plain.itm_score, atol=1e-6)


@pytest.mark.parametrize("cls, field", [
    (tf.BlipForImageTextRetrieval, "itm_score"),
    (tf.BlipForConditionalGeneration, "logits"),
])
def test_cross_attention_over_merged_duplicates_gives_the_unmerged_result(turbo, cls, field):
    model = blip(cls)
    inputs = dict(input_ids=text_ids(), pixel_values=two_pattern_images())
    with torch.no_grad():
        plain = getattr(model(**inputs), field)
    merged = turbo(model, r=8)
    out = getattr(merged(**inputs), field)
    assert merged.report.merges == 2
    assert torch.allclose(out, plain, atol=1e-4), (out - plain).abs().max()
    # Without the size bias the text side weighs each merged token once: the result moves.
    unbiased = getattr(turbo(model, r=8, prop_attn=False)(**inputs), field)
    assert not torch.allclose(unbiased, plain, atol=1e-3)
    # The two biases are separate options: the image tower's self-attention can go without
    # while the text still reads the merged tokens in proportion (and the other way round).
    text_only = turbo(model, r=8, prop_attn=False, cross_attention_bias=True)
    image_only = turbo(model, r=8, cross_attention_bias=False)
    text_only_out, image_only_out = getattr(text_only(**inputs), field), getattr(image_only(**inputs), field)
    assert text_only.report.merges == image_only.report.merges == 2
    # (Small for the ITM score, far above float32 noise.)
    assert (text_only_out - unbiased).abs().max() > 2e-5
    assert (image_only_out - unbiased).abs().max() > 2e-5


class MaskedReader(nn.Module):
    """A timm ViT and one cross-attention layer over its tokens with a key mask of its own."""

    def __init__(self) -> None:
        super().__init__()
        pytest.importorskip("timm")
        self.vit = tiny_timm_vit(depth=2)
        self.query = nn.Parameter(torch.randn(1, 4, 48))
        self.q, self.kv = nn.Linear(48, 48), nn.Linear(48, 96)

    def forward(self, pixels, key_mask):
        tokens = self.vit.forward_features(pixels)  # [B, 65, 48]
        b = tokens.shape[0]
        q = self.q(self.query.expand(b, -1, -1)).reshape(b, 4, 3, 16).transpose(1, 2)
        k, v = self.kv(tokens).reshape(b, -1, 2, 3, 16).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        query_stream = self.query.expand(b, -1, -1)
        return query_stream + out.transpose(1, 2).reshape(b, 4, 48)


def test_a_reader_with_its_own_mask_reads_every_image_token(turbo):
    # The reader's own mask cannot cover merged tokens, so the image sequence does not stay
    # merged: each of its attentions merges and restores, and the reader sees all 65 tokens
    # under its own mask (masking a key still changes its output as in the model).
    model = MaskedReader().eval()
    pixels, key_mask = images(2, size=32), torch.ones(2, 65, dtype=torch.bool)
    compiled = turbo(model, r=4)
    out = compiled(pixels, key_mask)
    report = compiled.report
    assert "it has its own attention mask over the merged tokens" in report.mode_note
    assert [s.decision for s in report.sites] == ["merges", "merges", "untouched"]
    masked = key_mask.clone()
    masked[:, 10:30] = False
    with torch.no_grad():
        want, want_masked = model(pixels, key_mask), model(pixels, masked)
    got_masked = compiled(pixels, masked)
    assert F.cosine_similarity(out.flatten(1), want.flatten(1)).min() > 0.99
    assert F.cosine_similarity(got_masked.flatten(1), want_masked.flatten(1)).min() > 0.99
    assert (got_masked - out).abs().max() > 1e-3


def blip2_model() -> "tf.Blip2Model":
    """A small BLIP-2 (4 query tokens; token id 99 marks their places in the text)."""
    torch.manual_seed(0)
    small = dict(SMALL, initializer_range=0.02)
    config = tf.Blip2Config(
        vision_config=dict(small, image_size=32, patch_size=4),
        qformer_config=dict(small, vocab_size=100, encoder_hidden_size=48, cross_attention_frequency=1,
                            max_position_embeddings=32),
        text_config=dict(model_type="opt", hidden_size=48, num_hidden_layers=1, num_attention_heads=3,
                         ffn_dim=96, vocab_size=100, max_position_embeddings=64, word_embed_proj_dim=48),
        num_query_tokens=4, image_token_index=99)
    return tf.Blip2Model(config).eval()


class QFormerFeatures(nn.Module):
    """BLIP-2's image side: the vision tower, then the Q-Former's learned queries
    cross-attending to its tokens (what ``Blip2Model`` hands the language model)."""

    def __init__(self) -> None:
        super().__init__()
        model = blip2_model()
        self.vision, self.qformer, self.queries = model.vision_model, model.qformer, model.query_tokens
        with torch.no_grad():
            self.vision.embeddings.position_embedding.zero_()

    def forward(self, pixels):
        image = self.vision(pixel_values=pixels).last_hidden_state
        queries = self.queries.expand(image.shape[0], -1, -1)
        return self.qformer(query_embeds=queries, encoder_hidden_states=image).last_hidden_state


def test_the_qformer_reads_merged_image_tokens_and_duplicates_give_the_unmerged_queries(turbo):
    model = QFormerFeatures().eval()
    pixels = two_pattern_images()
    compiled = turbo(model, r=8)
    out = compiled(pixels)
    assert compiled.report.tokens_per_block == [65, 57]
    decisions = {s.module: s.decision for s in compiled.report.sites}
    assert decisions["vision.encoder.layers.1.self_attn"] == "merges"
    assert decisions["qformer.encoder.layer.0.crossattention.attention"] == "reads merged"
    assert decisions["qformer.encoder.layer.0.attention.attention"] == "untouched"
    with torch.no_grad():
        plain = model(pixels)
    assert torch.allclose(out, plain, atol=1e-4), (out - plain).abs().max()


def test_the_whole_blip2_model_merges_its_image_and_the_qformer_reads_it(turbo):
    """``Blip2Model.forward`` in one graph: the Q-Former's cross-attention carries an all-ones
    mask built from the image tokens' shape; it is cleared, so the Q-Former reads the merged
    tokens, and the language model (causal) stays exact up to what the queries carry."""
    model = blip2_model()
    with torch.no_grad():
        model.vision_model.embeddings.position_embedding.zero_()
    # The language model's input starts with one placeholder per query token.
    ids = torch.cat([torch.full((2, 4), 99), text_ids()], dim=1)
    inputs = dict(pixel_values=two_pattern_images(), input_ids=ids)
    with torch.no_grad():
        plain = model(**inputs).logits
    compiled = turbo(model, r=8)
    out = compiled(**inputs).logits
    report = compiled.report
    assert report.fallback_reason is None and report.tokens_per_block == [65, 57]
    decisions = {s.module: s.decision for s in report.sites}
    assert decisions["qformer.encoder.layer.0.crossattention.attention"] == "reads merged"
    assert decisions["qformer.encoder.layer.1.crossattention.attention"] == "reads merged"
    assert decisions["language_model.model.decoder.layers.0.self_attn"] == "untouched"
    assert torch.allclose(out, plain, atol=1e-4), (out - plain).abs().max()
