"""A language model's placeholder tokens (the visual tokens a vision tower's features fill in)
compacted once before the first layer: the ops by hand, exactness on duplicated features, and
transformers' LLaVA through its own forward and ``generate``."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from tests.model_builders import PlaceholderPrefixLM, dynamo_graph, grouped_features, placeholder_prompt
from turbo_fx import ops
from turbo_fx.passes.find_attention import find_attention_sites
from turbo_fx.passes.find_placeholders import find_placeholder_scatter
from turbo_fx.report import recording


def compacted(report) -> list[tuple]:
    return [(b.kind, b.tokens_in, b.tokens_out) for b in report.blocks]


# ---- the ops, checked by hand -------------------------------------------------------------------

def test_compaction_merges_only_placeholders_and_keeps_position_order():
    seq = torch.arange(2 * 9 * 2, dtype=torch.float32).reshape(2, 9, 2)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 2:6] = True  # rows hold their placeholders in different places
    mask[1, 4:8] = True
    seq[0, 2:6] = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    seq[1, 4:8] = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    out, size, assign, position = ops.compact_placeholders(seq, mask.unsqueeze(-1), 4, 2)
    assert out.shape == (2, 7, 2)
    assert size.tolist() == [[1, 1, 2, 2, 1, 1, 1], [1, 1, 1, 1, 2, 2, 1]]
    assert position.tolist() == [[0, 1, 2.5, 4.5, 6, 7, 8], [0, 1, 2, 3, 4.5, 6.5, 8]]
    assert assign.tolist() == [[0, 1, 2, 2, 3, 3, 4, 5, 6], [0, 1, 2, 3, 4, 4, 5, 5, 6]]
    # text tokens untouched, each placeholder pair merged into its own value
    torch.testing.assert_close(ops.restore_tokens(out, assign, 1), seq, rtol=0, atol=0)


def test_merging_down_to_a_quarter_merges_only_equal_tokens():
    x = torch.randn(1, 4, 3).repeat_interleave(4, dim=1)  # 16 tokens, 4 groups of 4 equal ones
    merged, size, assign = ops.merge_placeholder_tokens(x, 4)
    assert size.tolist() == [[4.0] * 4]
    assert assign.tolist() == [[0] * 4 + [1] * 4 + [2] * 4 + [3] * 4]
    torch.testing.assert_close(merged, x[:, ::4])


def test_semantic_value_keeps_an_attended_token_from_merging():
    torch.manual_seed(0)
    x = torch.randn(1, 8, 16)
    x[0, 1], x[0, 3] = x[0, 0] + 0.01, x[0, 2] + 0.01  # tokens 0 and 2 are the most redundant
    _, size, assign = ops.merge_placeholder_tokens(x, 6)
    assert assign[0, 0] == assign[0, 1] and assign[0, 2] == assign[0, 3]
    attended = torch.full((1, 8), 0.1 / 7)
    attended[0, 0] = 0.9  # the text attends to token 0: it keeps its own slot
    _, size, assign = ops.merge_placeholder_tokens(x, 6, attended, alpha=0.5)
    assert assign[0].tolist().count(assign[0, 0].item()) == 1 and assign[0, 2] == assign[0, 3]


def test_text_attention_ranks_the_placeholders_the_text_after_them_reads():
    rows = torch.tensor([[False, True, True, True, False, False]])
    q, k = torch.zeros(1, 2, 6, 4), torch.zeros(1, 1, 6, 4)  # one key head shared by two query heads
    k[0, 0, 2, 0] = 10.0
    q[0, :, 4:, 0] = 1.0  # the two text tokens after the image look for key 2
    value = ops.text_attention_to_placeholders(q, k, rows, 3, None)
    assert value.shape == (1, 3) and value.sum().item() == pytest.approx(1.0)
    assert value[0].argmax().item() == 1 and value[0, 1] > 0.9
    # position 5 is padding (no query may read it): only position 4 ranks, and it reads key 3
    q[0, :, 5, 0], q[0, :, 4, 0], k[0, 0, 3, 1] = 1.0, 0.0, 10.0
    q[0, :, 4, 1] = 1.0
    padding = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
    padding[..., 5] = False
    value = ops.text_attention_to_placeholders(q, k, rows, 3, None, padding)
    assert value[0].argmax().item() == 2 and value[0, 2] > 0.9
    nothing_after = torch.tensor([[False, False, False, True, True, True]])
    torch.testing.assert_close(ops.text_attention_to_placeholders(q, k, nothing_after, 3, None),
                               torch.full((1, 3), 1 / 3))


def test_compacted_mask_reads_the_original_mask_at_slot_positions():
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    position = torch.tensor([[0.0, 1.5, 3.0, 4.0]])  # positions 1 and 2 merged (mean 1.5 rounds to 2)
    size = torch.tensor([[1.0, 2.0, 1.0, 1.0]])
    got = ops.compact_mask(causal, position, size, torch.float32, False, 0)
    low = torch.finfo(torch.float32).min
    want = torch.tensor([[0, low, low, low], [0, math.log(2), low, low], [0, math.log(2), 0, low],
                         [0, math.log(2), 0, 0]])
    torch.testing.assert_close(got[0, 0], want)
    # is_causal (no mask) gives the causal mask over slots, with a cache prefix of 2 keys in front
    got = ops.compact_mask(None, position, size, torch.float32, True, 2)
    assert (got[0, 0] > low).tolist() == [[True] * 3 + [False] * 3, [True] * 4 + [False] * 2,
                                         [True] * 5 + [False], [True] * 6]
    assert got[0, 0, 3, 3].item() == pytest.approx(math.log(2))


def test_rows_with_different_placeholder_counts_are_refused_at_run_time():
    rows = torch.tensor([[True, True, False], [True, False, False]])
    with pytest.raises(RuntimeError, match="different numbers of placeholder tokens"):
        torch.ops.turbo_fx.check_placeholder_count(rows, 2)


# ---- a prefix language model written here --------------------------------------------------------

def test_placeholder_scatter_is_found_by_structure():
    model = PlaceholderPrefixLM().eval()
    gm = dynamo_graph(model, placeholder_prompt(), grouped_features())
    found = find_placeholder_scatter(gm, find_attention_sites(gm))
    assert (found.length, found.count, found.batch, len(found.sites)) == (23, 16, 2, 2)


@pytest.mark.parametrize("group, ratio", [(2, 0.5), (4, 0.75)])
def test_duplicated_features_give_the_unmerged_logits(turbo, group, ratio):
    ids = placeholder_prompt()
    model = PlaceholderPrefixLM(prefix=ids.shape[1] - 2).eval()  # image and prompt read both ways
    features = grouped_features(group=group)
    with torch.no_grad():
        want = model(ids, features)
    compiled = turbo(model, ratio=ratio)
    got = compiled(ids, features)
    assert compacted(compiled.report) == [("placeholders", 16, 16 // group)]
    assert compiled.report.fallback_reason is None
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    # the same merge without the log(size) bias: each merged key counts once, and the text moves
    torch._dynamo.reset()
    unbiased = turbo(model, ratio=ratio, prop_attn=False)(ids, features)
    assert (unbiased - want)[:, -4:].abs().max() > 1e-3


def test_ratio_zero_leaves_the_language_model_bit_identical(turbo):
    model = PlaceholderPrefixLM().eval()
    ids, features = placeholder_prompt(), torch.randn(32, 32)
    with torch.no_grad():
        want = model(ids, features)
    compiled = turbo(model, ratio=0.0)
    assert torch.equal(compiled(ids, features), want)
    assert compacted(compiled.report) == [("placeholders", 16, 16)]


def test_rows_with_placeholders_elsewhere_run_unmerged_without_error(turbo):
    model = PlaceholderPrefixLM().eval()
    ids, features = placeholder_prompt(), torch.randn(32, 32)
    compiled = turbo(model, ratio=0.5)
    compiled(ids, features)
    moved = ids.clone()
    moved[1, 3], moved[1, 0] = 5, model.image_token  # the same count per row, one placeholder moved
    with torch.no_grad():
        want = model(moved, features)
    torch.testing.assert_close(compiled(moved, features)[1, -4:], want[1, -4:], rtol=0, atol=0.5)
    uneven = ids.clone()
    uneven[1, 3] = 5  # 15 placeholders in row 1: the guard runs this call unmerged
    uneven[0, 0] = model.image_token
    with torch.no_grad():
        want = model(uneven, features)
    torch.testing.assert_close(compiled(uneven, features), want)
    assert compiled.graphs[0].run_time_failures == 1


# ---- transformers' LLaVA -------------------------------------------------------------------------

tf = pytest.importorskip("transformers")
IMAGE_TOKEN, PATCHES = 127, 64
GREEDY = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, num_beams=1)


def tiny_llava(seed: int = 0) -> torch.nn.Module:
    """A CLIP tower (8x8 patches) under a two-layer Llama decoder with rotary positions."""
    torch.manual_seed(seed)
    vision = tf.CLIPVisionConfig(image_size=32, patch_size=4, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=2)
    text = tf.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)
    config = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                            image_seq_length=PATCHES, vision_feature_layer=-2,
                            vision_feature_select_strategy="default")
    return tf.LlavaForConditionalGeneration(config).eval()


def llava_inputs(batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(1, 100, (batch, 6), generator=g)
    ids = torch.cat([prompt[:, :2], torch.full((batch, PATCHES), IMAGE_TOKEN), prompt[:, 2:]], dim=1)
    pixels = torch.randn(batch, 3, 32, 32, generator=g)
    return dict(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids))


def with_turbo_forward(model: torch.nn.Module, **options) -> torch.nn.Module:
    """A copy whose forward is compiled with turbo (so ``generate`` runs the compiled forward)."""
    options.setdefault("inner_backend", "eager")
    fast = copy.deepcopy(model)
    fast.forward = torch.compile(fast.forward, backend="turbo", options=options)
    return fast


def compaction_report(graphs) -> object:
    found = [g for g in graphs if g.blocks and g.blocks[0].kind == "placeholders"]
    assert len(found) == 1, [g.fallback_reason for g in graphs]
    return found[0]


def test_llava_language_model_reads_the_compacted_image_tokens():
    model, inputs = tiny_llava(), llava_inputs()
    fast = with_turbo_forward(model, ratio=0.75)
    with recording() as rec, torch.no_grad():
        logits = fast(**inputs).logits
    report = compaction_report(rec.graphs)
    assert compacted(report) == [("placeholders", PATCHES, 16)]
    assert "70 -> 22 tokens" in report.mode_note
    assert report.fallback_reason is None and report.outputs_restored >= 3  # hidden states, keys, values
    assert logits.shape == (2, 70, 128)
    # the tower merges too: its tokens are restored where the projector's output is split by image
    tower = [g for g in rec.graphs if g.blocks and g.blocks[0].kind != "placeholders"]
    assert len(tower) == 1 and tower[0].fallback_reason is None
    assert [b.tokens_out for b in tower[0].blocks][-1] < 65


def test_llava_ratio_zero_generates_the_unmerged_tokens():
    model, inputs = tiny_llava(), llava_inputs()
    with torch.no_grad():
        want = model.generate(**inputs, **GREEDY)
        got = with_turbo_forward(model, ratio=0.0).generate(**inputs, **GREEDY)
    assert torch.equal(got, want)


def test_llava_decode_steps_agree_with_a_fresh_compacted_prefill():
    """Each token ``generate`` picks from the restored cache is the one a full forward of the prompt
    and the tokens so far picks (compacted the same way, no cache): decode steps see the merged
    keys with their sizes exactly as the compacted prefill did, in a left-padded row too."""
    model, inputs = tiny_llava(), llava_inputs()
    ids, mask = inputs["input_ids"].clone(), inputs["attention_mask"].clone()
    ids[1, 3:], ids[1, :3], mask[1, :3] = inputs["input_ids"][1, :-3], 0, 0  # row 1 left-padded by 3
    inputs = dict(inputs, input_ids=ids, attention_mask=mask)
    # r=0: the tower stays unmerged, since generate() encodes the images outside the compiled
    # forward, while a plain forward compiles the tower too. semantic=False: the semantic value
    # comes from the text after the image, which a fresh prefill extends with the generated tokens.
    fast = with_turbo_forward(model, r=0, ratio=0.5, semantic=False)
    with recording() as rec, torch.no_grad():
        out = fast.generate(**inputs, **GREEDY, output_logits=True, return_dict_in_generate=True)
    compaction_report(rec.graphs)
    prompt = inputs["input_ids"].shape[1]
    with recording() as fresh:
        for step in range(GREEDY["max_new_tokens"]):
            ids = out.sequences[:, :prompt + step]
            with torch.no_grad():
                logits = fast(input_ids=ids, pixel_values=inputs["pixel_values"],
                              attention_mask=torch.cat([mask, torch.ones(2, step, dtype=mask.dtype)], 1)).logits[:, -1]
            torch.testing.assert_close(out.logits[step], logits, rtol=1e-4, atol=1e-4)
    # the longer prompts recompile the language model for a symbolic length, and it still compacts
    lengths = [g.mode_note.split("(")[-1].split(" -> ")[0] for g in fresh.graphs if g.mode_note]
    assert lengths and not all(length.isdigit() for length in lengths), lengths
    assert all(g.fallback_reason is None for g in fresh.graphs if g.mode_note)


def test_llava_generate_with_tower_and_language_model_compiled():
    """The README's recipe: generate() encodes the images outside the compiled forward, so the tower
    is compiled on its own; both merge, and r = ratio = 0 gives the unmerged tokens."""
    model, inputs = tiny_llava(), llava_inputs()
    with torch.no_grad():
        want = model.generate(**inputs, **GREEDY)
    for options, merging in ((dict(r=0, ratio=0.0), False), (dict(r=4, ratio=0.75), True)):
        torch._dynamo.reset()
        fast = with_turbo_forward(model, ratio=options["ratio"])
        fast.model.vision_tower = torch.compile(fast.model.vision_tower, backend="turbo",
                                                options=dict(r=options["r"], inner_backend="eager"))
        with recording() as rec, torch.no_grad():
            got = fast.generate(**inputs, **GREEDY)
        assert got.shape == want.shape
        modes = sorted(g.mode for g in rec.graphs if g.rewritten)
        if merging:
            assert modes == ["compact", "merge"], [g.fallback_reason for g in rec.graphs]
        else:
            assert modes == [] and torch.equal(got, want)


def test_llava_rotary_drift_on_duplicated_image_tokens_is_measured():
    """With rotary positions (and a causal mask) duplicated features cannot give the unmerged
    logits: the copies sit at different positions, and the later copy attends to the earlier
    one. Measured relative error of the text tokens' logits: 0.016 at keep 1/2 and 0.041 at keep
    1/4 for features duplicated in runs of 4, against 0.35 and 0.40 for distinct (random-weight)
    features; held below 0.1 and below the distinct features' error."""
    model = tiny_llava()
    inputs = llava_inputs()
    with torch.no_grad():
        features = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        features = torch.cat(list(features), dim=0)
        duplicated = features.reshape(2, PATCHES, -1)[:, ::4].repeat_interleave(4, dim=1).reshape(-1, 32)
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        mask = (inputs["input_ids"] == IMAGE_TOKEN).unsqueeze(-1)
        language = model.model.language_model

    def text_logits(fn, image_features):
        filled = embeds.masked_scatter(mask, image_features)
        with torch.no_grad():
            return model.lm_head(fn(inputs_embeds=filled).last_hidden_state[:, -6:])

    class Filled(torch.nn.Module):  # the LLaVA pattern, the scatter inside the compiled graph
        def __init__(self):
            super().__init__()
            self.language = language

        def forward(self, image_features):
            return self.language(inputs_embeds=embeds.masked_scatter(mask, image_features)).last_hidden_state

    drift = {}
    for name, image_features in (("duplicated", duplicated), ("distinct", features)):
        with torch.no_grad():
            want = model.lm_head(language(inputs_embeds=embeds.masked_scatter(mask, image_features))
                                 .last_hidden_state[:, -6:])
        for ratio in (0.5, 0.75):
            torch._dynamo.reset()
            fast = torch.compile(Filled(), backend="turbo", options=dict(ratio=ratio, inner_backend="eager"))
            with recording() as rec, torch.no_grad():
                got = model.lm_head(fast(image_features)[:, -6:])
            assert [g.mode for g in rec.graphs if g.rewritten] == ["compact"]
            drift[name, ratio] = ((got - want).norm() / want.norm()).item()
    assert max(drift["duplicated", r] for r in (0.5, 0.75)) < 0.1, drift
    assert all(drift["duplicated", r] < drift["distinct", r] for r in (0.5, 0.75)), drift


# ---- transformers' PaliGemma: a model of the family the code was not written against ---------------

def tiny_paligemma() -> tuple[torch.nn.Module, dict]:
    from turbo_fx.bench.sweep import BY_NAME, build

    built = build(BY_NAME["PaliGemmaForConditionalGeneration"])
    return built.model, built.kwargs


@pytest.mark.parametrize("group, ratio", [(2, 0.5), (4, 0.75)])
def test_paligemma_prefix_mask_gives_the_unmerged_logits_on_duplicated_image_tokens(group, ratio):
    """PaliGemma reads the image and the prompt's prefix both ways (its mask comes from
    token_type_ids), so duplicated image tokens stay duplicates through every layer: compacted, they
    give the unmerged logits. Gemma's rotation is zeroed here, since copies at different positions
    are rotated differently; left on, the largest difference was 1.5e-4 for runs of 4 copies."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    model, inputs = tiny_paligemma()
    with torch.no_grad():
        model.model.language_model.rotary_emb.inv_freq.zero_()
        features = model.get_image_features(inputs["pixel_values"]).pooler_output
    duplicated = features[:, ::group].repeat_interleave(group, dim=1)
    call = dict(inputs, mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=duplicated)})
    call.pop("pixel_values")
    with torch.no_grad():
        want = model(**call).logits
    fast = with_turbo_forward(model, ratio=ratio)
    with recording() as rec, torch.no_grad():
        got = fast(**call).logits
    assert compacted(compaction_report(rec.graphs)) == [("placeholders", 64, 64 // group)]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
