"""Many architectures, no per-model code: each is either rewritten (right token counts and
output shapes) or compiled unchanged with a stated reason, and never raises."""
from __future__ import annotations

import pytest
import torch

from model_builders import images

SMALL_VIT = dict(embed_dim=48, num_heads=3, depth=2, num_classes=10)

# name -> (timm kwargs, image size, expected outcome, protected tokens or reason fragment)
TIMM_CASES = {
    "vit_small_patch16_224": (dict(img_size=64, **SMALL_VIT), 64, "rewrite", 1),
    "deit_small_distilled_patch16_224": (dict(img_size=64, **SMALL_VIT), 64, "rewrite", 2),
    "vit_small_patch14_reg4_dinov2": (dict(img_size=56, **SMALL_VIT), 56, "rewrite", 5),
    "vit_base_patch16_clip_224": (dict(img_size=64, **SMALL_VIT), 64, "rewrite", 1),
    "vit_medium_patch16_gap_256": (dict(img_size=64, **SMALL_VIT), 64, "rewrite", 0),  # no class token
    # No class token: patches only, redundancy ranking; the class-attention blocks (CaiT) and
    # the attention-pooling head (SigLIP) read the merged patches.
    "cait_xxs24_224": (dict(img_size=64, embed_dim=48, depth=2, num_heads=3, num_classes=10), 64, "rewrite", 0),
    "vit_base_patch16_siglip_224": (dict(img_size=64, **SMALL_VIT), 64, "rewrite", 0),
    "beit_base_patch16_224": (dict(img_size=64, **SMALL_VIT), 64, "fallback", "does not come from the input"),
    # Rotary positions: EVA-02 stores its cos/sin table, DINOv3 computes it from the patch grid
    # and splits its class and register tokens off before rotating.
    "eva02_tiny_patch14_224": (dict(img_size=56, depth=2, num_classes=10), 56, "rewrite", 1),
    "vit_small_patch16_dinov3": (dict(img_size=64, **SMALL_VIT), 64, "rewrite", 5),
    "vit_base_patch16_rope_reg1_gap_256": (dict(img_size=64, **SMALL_VIT), 64, "rewrite", 1),
    "swin_tiny_patch4_window7_224": (dict(img_size=56, depths=(1, 1), num_heads=(2, 4), embed_dim=32, num_classes=10), 56, "fallback", ""),
}


@pytest.mark.parametrize("name", list(TIMM_CASES))
def test_timm_architectures(turbo, name):
    import timm

    kwargs, size, outcome, expected = TIMM_CASES[name]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    x = images(2, size=size)
    compiled = turbo(model, r=4)
    out = compiled(x)
    with torch.no_grad():
        plain = model(x)
    assert out.shape == plain.shape
    graphs = compiled.graphs
    if outcome == "rewrite":
        assert all(g.fallback_reason is None for g in graphs), [g.fallback_reason for g in graphs]
        report = next(g for g in graphs if g.blocks)
        assert report.merges == len(report.blocks)
        assert report.protected == expected
        assert torch.isfinite(out).all()
    else:
        reasons = [g.fallback_reason for g in graphs if g.fallback_reason]
        assert reasons and any(expected in r for r in reasons), reasons
        assert torch.allclose(out, plain, atol=1e-5)


# name -> the rule each rotary table of the merged stages gets with rotary="position"
ROTARY_RULES = {
    "eva02_tiny_patch14_224": "rows (the table is stored, not computed from rotation angles in the graph)",
    "vit_small_patch16_dinov3": "position",
    "vit_base_patch16_rope_reg1_gap_256": "rows (the table is stored, not computed from rotation angles in the graph)",
}


@pytest.mark.parametrize("name", list(ROTARY_RULES))
def test_timm_rotary_tables_follow_the_merges(turbo, name):
    import timm

    kwargs, size, _, _ = TIMM_CASES[name]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    compiled = turbo(model, r=4, rotary="position")
    compiled(images(2, size=size))
    report = next(g for g in compiled.graphs if g.blocks)
    # a cos and a sin table for the queries and for the keys of the one block after a merge
    assert len(report.token_tables) == 4, report.token_tables
    assert all(t.split(": ", 1)[1] == ROTARY_RULES[name] for t in report.token_tables), report.token_tables


def hf_model(kind: str):
    import transformers as tf

    torch.manual_seed(0)
    common = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96)
    if kind == "clip_vision":
        return tf.CLIPVisionModel(tf.CLIPVisionConfig(image_size=32, patch_size=4, **common))
    if kind == "clip_text":
        return tf.CLIPTextModel(tf.CLIPTextConfig(vocab_size=100, max_position_embeddings=32, **common))
    if kind == "blip_vision":
        return tf.BlipVisionModel(tf.BlipVisionConfig(image_size=32, patch_size=4, **common))
    if kind == "siglip_vision":
        return tf.SiglipVisionModel(tf.SiglipVisionConfig(image_size=32, patch_size=4, **common))
    if kind == "yolos":
        return tf.YolosModel(tf.YolosConfig(image_size=[32, 32], patch_size=4, num_detection_tokens=5, **common))
    if kind == "dinov3":
        return tf.DINOv3ViTModel(tf.DINOv3ViTConfig(image_size=32, patch_size=4, num_register_tokens=2, **common))
    if kind == "roberta":
        return tf.RobertaModel(tf.RobertaConfig(vocab_size=100, **common))
    if kind == "distilbert":
        return tf.DistilBertModel(tf.DistilBertConfig(vocab_size=100, dim=48, n_layers=2, n_heads=3, hidden_dim=96))
    raise ValueError(kind)


@pytest.mark.parametrize(
    "kind, outcome, expected",
    [
        ("clip_vision", "rewrite", 1),
        ("blip_vision", "rewrite", 1),
        ("siglip_vision", "rewrite", 0),
        ("yolos", "rewrite", 1),
        ("dinov3", "rewrite", 3),
        ("clip_text", "fallback", "varies by query"),
        ("roberta", "rewrite", 1),
        ("distilbert", "rewrite", 1),
    ],
)
def test_transformers_architectures(turbo, kind, outcome, expected):
    model = hf_model(kind).eval()
    if kind in ("clip_vision", "blip_vision", "siglip_vision", "yolos", "dinov3"):
        inputs = dict(pixel_values=images(2))
    else:
        ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[1, 8:] = 0
        inputs = dict(input_ids=ids, attention_mask=mask)
    compiled = turbo(model, r=2)
    out = compiled(**inputs).last_hidden_state
    with torch.no_grad():
        plain = model(**inputs).last_hidden_state
    assert out.shape == plain.shape
    graphs = compiled.graphs
    if outcome == "rewrite":
        assert all(g.fallback_reason is None for g in graphs), [g.fallback_reason for g in graphs]
        report = next(g for g in graphs if g.blocks)
        assert report.merges == len(report.blocks) and report.protected == expected
    else:
        reasons = [g.fallback_reason for g in graphs if g.fallback_reason]
        assert reasons and any(expected in r for r in reasons), reasons
        assert torch.allclose(out, plain, atol=1e-5)


@pytest.mark.parametrize("name", [n for n, case in TIMM_CASES.items() if case[2] == "rewrite"])
def test_timm_architectures_compiled_block_by_block_compute_the_rewrite(turbo, name):
    """The default Inductor path splits each family's merged graph at its merges (metric and
    semantic value hoisted into the compute pieces, merge pieces compiled too) and computes
    what the same rewrite computes run eagerly: class tokens, distillation and register
    tokens, no class token (no semantic value), class attention and a MAP head reading the
    merged patches."""
    import timm

    kwargs, size, _, _ = TIMM_CASES[name]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    x = images(2, size=size)
    split = turbo(model, r=4, inner_backend="inductor")
    out = split(x)
    report = next(g for g in split.graphs if g.blocks)
    merges = report.merges
    assert report.block_compile.startswith(f"{merges + 1} compute pieces"), report.block_compile
    assert f"; {merges} compiled merge pieces" in report.block_compile and "failed" not in report.block_compile
    torch._dynamo.reset()
    eager = turbo(model, r=4)(x)
    assert (out - eager).abs().max().item() < 1e-5


# The recent families of ``turbo-fx sweep`` (``turbo_fx.bench.sweep.CASES``: rotary positions,
# joint image-text attention, readers that reshape the tokens, video, NaFlex, a tower Dynamo
# compiles as many graphs), built tiny from their library classes, and what each does: merge
# mode, merge-and-restore, or a fallback whose reason names the structure.
RECENT = {
    "vit_small_patch16_dinov3": "merge",
    "eva02_tiny_patch14_224": "merge",
    "vit_base_patch16_rope_reg1_gap_256": "merge",
    "DINOv3ViTModel": "merge",
    "FluxTransformer2DModel": "merge-and-restore",  # joint attention with no grid, then a concatenated stream
    "SD3Transformer2DModel": "merge-and-restore",
    "LlavaForConditionalGeneration": ["merge", "compact"],  # the tower; the language model's image tokens
    "PaliGemmaForConditionalGeneration": ["merge", "compact"],  # the same, under a prefix-LM mask
    "Idefics3ForConditionalGeneration": "fallback",  # image tokens filled in a graph of their own
    "DPTForDepthEstimation": "merge",
    "TimesformerModel": "merge-and-restore",  # divided space-time attention, around each spatial attention
    "Siglip2VisionModel": "merge",
    "Qwen2VisionTransformerPretrainedModel": "fallback",  # Dynamo cuts inside its attention sub-blocks
    "vit_small_patch16_224": "merge",
    "CLIPVisionModel": "merge",
    "DiTTransformer2DModel": "merge-and-restore",
}
_RECENT_RUNS: dict[str, tuple] = {}  # one compile per case for the tests below


def run_recent(turbo, name: str) -> tuple:
    """(merged output, unmerged output, graph reports) of sweep case ``name``; an exception
    raised by the compiled call is kept and raised again for the next test."""
    from turbo_fx.bench import sweep

    if name not in _RECENT_RUNS:
        case = sweep.BY_NAME[name]
        built = sweep.build(case)
        compiled = turbo(built.model, **case.options)
        try:
            out = built.output(compiled(*built.args, **built.kwargs))
        except Exception as exc:
            _RECENT_RUNS[name] = (exc,)
            raise
        with torch.no_grad():
            plain = built.output(built.model(*built.args, **built.kwargs))
        _RECENT_RUNS[name] = (out, plain, list(compiled.graphs))
    if len(_RECENT_RUNS[name]) == 1:
        raise _RECENT_RUNS[name][0]
    return _RECENT_RUNS[name]


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("name", list(RECENT))
def test_recent_architectures(turbo, name):
    out, plain, graphs = run_recent(turbo, name)
    assert graphs and out.shape == plain.shape
    merged = [g for g in graphs if g.rewritten]
    if RECENT[name] == "fallback":
        assert not merged and torch.allclose(out, plain, atol=1e-5)
    else:
        want = RECENT[name] if isinstance(RECENT[name], list) else [RECENT[name]]
        assert [g.mode for g in merged] == want, [g.fallback_reason for g in graphs]
        assert torch.isfinite(out).all()


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("name", list(RECENT))
def test_recent_architectures_fall_back_for_structural_reasons(turbo, name):
    """Every graph left alone says which structure it could not handle, never the text of an
    exception (``Error:``, ``Exception``) raised by a trial build."""
    _, _, graphs = run_recent(turbo, name)
    reasons = [g.fallback_reason for g in graphs if g.fallback_reason]
    quoting = [reason for reason in reasons if "Error:" in reason or "Exception" in reason]
    assert not quoting, "\n".join(quoting)


def test_recent_cases_are_the_sweep_cases():
    from turbo_fx.bench import sweep

    assert list(RECENT) == [case.name for case in sweep.CASES]
