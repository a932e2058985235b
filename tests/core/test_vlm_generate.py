"""BLIP captioning through ``generate()`` with a turbo vision tower.

``BlipForConditionalGeneration.generate`` runs ``model.vision_model`` once and then the text
decoder once per new token, with the image tokens as ``encoder_hidden_states``. So the way to
use turbo there is to compile the vision tower alone:
``model.vision_model = torch.compile(model.vision_model, backend="turbo", options=...)``. Its
output is restored to the full token count (``restore_outputs=True``): every original token
carries its merged token's value, and the decoder's cross-attention over k copies of a key is
attention over one key with a ``log(k)`` bias, i.e. exactly proportional attention over the
merged tokens. The tests check that on transformers' own ``generate`` and pin down how the
text decoder behaves under torch.compile (which graphs it compiles, per step and per call).
"""
from __future__ import annotations

import copy

import pytest
import torch

from turbo_fx.report import recording

tf = pytest.importorskip("transformers")

TINY = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96)
# BLIP's default initializer_range (1e-10) makes every random image token the same; the token
# ids must lie inside the tiny vocabulary (the defaults are BERT's, 30522 and up).
TINY_BLIP = dict(
    vision_config=dict(TINY, image_size=32, patch_size=4, initializer_range=0.02),
    text_config=dict(TINY, vocab_size=100, max_position_embeddings=64, encoder_hidden_size=48,
                     initializer_range=0.02, bos_token_id=1, eos_token_id=2, sep_token_id=3, pad_token_id=0),
    projection_dim=16,
)
NEW_TOKENS = 6
GREEDY = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1)
VISION_SITES = [f"encoder.layers.{i}.self_attn" for i in range(2)]


def captioner(zero_positions: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    model = tf.BlipForConditionalGeneration(tf.BlipConfig(**TINY_BLIP)).eval()
    if zero_positions:  # so that equal patches give equal tokens
        with torch.no_grad():
            model.vision_model.embeddings.position_embedding.zero_()
    return model


def random_images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def duplicate_patch_images(batch: int = 2) -> torch.Tensor:
    """An 8x8 grid of 4-px patches holding two patterns (16 and 48 copies): with zero position
    embeddings the 64 patch tokens are exact duplicates of two kinds."""
    g = torch.Generator().manual_seed(11)
    first, second = torch.randn(batch, 3, 4, 4, generator=g), torch.randn(batch, 3, 4, 4, generator=g)
    grid = second.repeat(1, 1, 8, 8)
    grid[:, :, :8, :] = first.repeat(1, 1, 2, 8)
    return grid


def with_turbo_vision(model: torch.nn.Module, **options) -> torch.nn.Module:
    """A copy of ``model`` whose vision tower is compiled with turbo (the rewritten graph runs
    eagerly unless ``inner_backend`` is given: compile time is not what these tests are about)."""
    options.setdefault("inner_backend", "eager")
    fast = copy.deepcopy(model)
    fast.vision_model = torch.compile(fast.vision_model, backend="turbo", options=options)
    return fast


def caption(model: torch.nn.Module, pixels: torch.Tensor, **kwargs):
    with torch.no_grad():
        return model.generate(pixel_values=pixels, **GREEDY, **kwargs)


def caption_with_scores(model: torch.nn.Module, pixels: torch.Tensor):
    out = caption(model, pixels, output_scores=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.scores, dim=1)  # [B, 1 + NEW_TOKENS], [B, NEW_TOKENS, vocab]


class GraphCounter:
    """A Dynamo backend that runs graphs as captured and counts them."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def test_generate_with_a_turbo_vision_tower_merges_and_returns_token_ids():
    model = captioner()
    fast = with_turbo_vision(model, r=8)
    pixels = random_images(3)
    with recording() as rec:
        ids = caption(fast, pixels)
    assert ids.dtype == torch.long and ids.shape == (3, 1 + NEW_TOKENS)
    assert (ids[:, 0] == model.config.text_config.bos_token_id).all()
    assert ((ids >= 0) & (ids < 100)).all()
    # One graph: the vision tower runs once per generate call, whatever the caption length.
    assert len(rec.graphs) == 1
    report = rec.graphs[0]
    assert report.fallback_reason is None and report.rewritten
    assert report.merges == 2 and report.tokens_per_block == [65, 57]
    assert report.outputs_restored >= 1
    decisions = {s.module: s.decision for s in report.sites}
    assert all(decisions[site] == "merges" for site in VISION_SITES), decisions


def test_the_restored_image_tokens_have_the_full_count_and_the_merged_values():
    model = captioner()
    fast = with_turbo_vision(model, r=8)
    pixels = random_images()
    with torch.no_grad():
        plain = model.vision_model(pixel_values=pixels).last_hidden_state
        merged = fast.vision_model(pixel_values=pixels).last_hidden_state
    assert merged.shape == plain.shape == (2, 65, 48)
    # 16 tokens merged away per image: the restored sequence holds only 49 distinct rows.
    for b in range(2):
        assert torch.unique(merged[b], dim=0).shape[0] == 65 - 16
    assert not torch.allclose(merged, plain, atol=1e-3)


def test_r0_gives_exactly_the_unmerged_captions():
    model = captioner()
    pixels = random_images()
    plain_ids, plain_scores = caption_with_scores(model, pixels)
    ids, scores = caption_with_scores(with_turbo_vision(model, r=0), pixels)
    assert torch.equal(ids, plain_ids)
    assert torch.equal(scores, plain_scores)


def test_exact_duplicate_patches_give_the_unmerged_captions_with_r_above_0():
    model = captioner(zero_positions=True)
    pixels = duplicate_patch_images()
    plain_ids, plain_scores = caption_with_scores(model, pixels)
    with recording() as rec:
        ids, scores = caption_with_scores(with_turbo_vision(model, r=8), pixels)
    assert [g.merges for g in rec.graphs] == [2]
    assert torch.equal(ids, plain_ids)
    assert torch.allclose(scores, plain_scores, atol=1e-4), (scores - plain_scores).abs().max()


def test_cross_attention_over_restored_tokens_is_proportional_attention_over_merged_ones(turbo):
    """On random images (no duplicates) the restored vision tower, read by the plain decoder,
    gives the logits of the whole model compiled as one graph, where the decoder's
    cross-attention reads the merged tokens with their log-size key bias."""
    model = captioner()
    pixels = random_images()
    input_ids = torch.randint(4, 100, (2, 5), generator=torch.Generator().manual_seed(2))
    input_ids[:, 0] = model.config.text_config.bos_token_id
    whole = turbo(model, r=8)
    # use_cache=False: with a cache, the cross-attention keys pass through the cache's concat.
    whole_logits = whole(input_ids=input_ids, pixel_values=pixels, use_cache=False).logits
    decisions = {s.module: s.decision for s in whole.report.sites}
    assert decisions["text_decoder.bert.encoder.layer.0.crossattention.self"] == "reads merged"
    tower = with_turbo_vision(model, r=8)
    with torch.no_grad():
        restored = tower.vision_model(pixel_values=pixels).last_hidden_state
        split_logits = model.text_decoder(input_ids=input_ids, encoder_hidden_states=restored).logits
        plain_logits = model(input_ids=input_ids, pixel_values=pixels).logits
    gap = (split_logits - whole_logits).abs().max().item()
    assert gap < 1e-5, gap  # seen: 1e-7
    # ... while merging moved the logits (seen: 4e-4; the tiny random decoder damps the image).
    assert (split_logits - plain_logits).abs().max().item() > 100 * max(gap, 1e-7)


# --------------------------------------------------------------------------- the text decoder
def test_wrapping_the_decoder_module_compiles_nothing_under_generate():
    """``generate`` reaches the decoder as ``text_decoder.generate`` -> ``self(...)`` on the
    original module, so an OptimizedModule wrapper around it is bypassed: compile its forward."""
    model = captioner()
    counter = GraphCounter()
    model.text_decoder = torch.compile(model.text_decoder, backend=counter)
    caption(model, random_images())
    assert counter.graphs == 0


def test_a_compiled_decoder_forward_compiles_three_graphs_and_none_per_step():
    """Step 1 (no cache yet: the cross-attention keys and values are computed), step 2 (the
    cache is now an EncoderDecoderCache: a type guard fails), step 3 (the self-attention cache
    grows from 1 to 2: automatic dynamic shapes make its length symbolic); every later step
    and every later call reuses the third graph."""
    model = captioner()
    plain = caption(model, random_images())
    fast = with_turbo_vision(model, r=0)
    counter = GraphCounter()
    fast.text_decoder.forward = torch.compile(fast.text_decoder.forward, backend=counter)
    ids = caption(fast, random_images())
    assert counter.graphs == 3
    caption(fast, random_images())
    assert counter.graphs == 3
    assert torch.equal(ids, plain)


def test_static_caches_give_two_decoder_graphs_and_the_same_captions():
    """With an EncoderDecoderCache of two StaticCaches passed in (``cache_implementation="static"``
    fails for BLIP: it makes one StaticCache that the cross-attention overflows), every step
    after the first has the same shapes: two graphs, the same with dynamic=False."""
    from transformers.cache_utils import EncoderDecoderCache, StaticCache

    model = captioner()
    pixels = random_images()
    plain = caption(model, pixels)
    text = model.config.text_config
    counter = GraphCounter()
    model.text_decoder.forward = torch.compile(model.text_decoder.forward, backend=counter, dynamic=False)

    def caches():
        return EncoderDecoderCache(StaticCache(text, max_cache_len=1 + NEW_TOKENS), StaticCache(text, max_cache_len=65))

    for _ in range(2):
        ids = caption(model, pixels, past_key_values=caches())
        assert torch.equal(ids, plain)
    assert counter.graphs == 2
