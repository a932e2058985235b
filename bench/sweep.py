"""Where recent architectures stand: each one, built tiny with random weights from its library
class, is compiled with turbo and run once; a row says how many graphs Dynamo made, how many
merged, the tokens per block, and the reason of every graph that fell back.

``CASES`` is the list (tests/core/test_sweep.py runs the same one), ``build(case)`` makes a
case's model and inputs, ``run_case`` compiles and runs one, ``sweep`` gives every row.
"""
from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

MERGE = {"r": 4}  # encoders: tokens merged per block
RESTORE = {"ratio": 0.5}  # generation transformers: share of tokens merged, restored after


@dataclass(frozen=True)
class Case:
    name: str
    family: str  # the structure the case stands for
    library: str  # timm, transformers or diffusers
    options: dict = field(default_factory=lambda: dict(MERGE))
    control: bool = False  # a family that already merged before these architectures came


@dataclass
class Built:
    """A model, the inputs of one forward, and the tensor of its output that is compared."""

    model: torch.nn.Module
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    output: Callable[[Any], torch.Tensor] = lambda out: out


CASES = (
    Case("vit_small_patch16_dinov3", "rotary", "timm"),
    Case("eva02_tiny_patch14_224", "rotary", "timm"),
    Case("vit_base_patch16_rope_reg1_gap_256", "rotary", "timm"),
    Case("DINOv3ViTModel", "rotary", "transformers"),
    Case("FluxTransformer2DModel", "rotary, joint image-text attention", "diffusers", dict(RESTORE)),
    Case("SD3Transformer2DModel", "joint image-text attention", "diffusers", dict(RESTORE)),
    Case("LlavaForConditionalGeneration", "reader reshapes the tokens; image tokens in a language model",
         "transformers", dict(MERGE, ratio=0.5)),
    Case("PaliGemmaForConditionalGeneration", "image tokens in a prefix language model", "transformers",
         dict(MERGE, ratio=0.5)),
    Case("Idefics3ForConditionalGeneration", "image tokens filled in a graph of their own", "transformers",
         dict(MERGE, ratio=0.5)),
    Case("DPTForDepthEstimation", "reader reshapes the tokens", "transformers"),
    Case("TimesformerModel", "video", "transformers"),
    Case("Siglip2VisionModel", "NaFlex", "transformers"),
    Case("Qwen2VisionTransformerPretrainedModel", "multi-graph tower", "transformers"),
    Case("vit_small_patch16_224", "control", "timm", control=True),
    Case("CLIPVisionModel", "control", "transformers", control=True),
    Case("DiTTransformer2DModel", "control", "diffusers", dict(RESTORE), control=True),
)
BY_NAME = {case.name: case for case in CASES}


def _generator(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(batch: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=_generator(seed))


SMALL_VIT = dict(embed_dim=48, num_heads=3, depth=2, num_classes=10)
TIMM = {  # timm kwargs and image side
    "vit_small_patch16_dinov3": (dict(img_size=64, **SMALL_VIT), 64),
    "eva02_tiny_patch14_224": (dict(img_size=56, depth=2, num_classes=10), 56),
    "vit_base_patch16_rope_reg1_gap_256": (dict(img_size=64, **SMALL_VIT), 64),
    "vit_small_patch16_224": (dict(img_size=64, **SMALL_VIT), 64),
}
HF = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96)


def _timm(name: str) -> Built:
    import timm

    kwargs, size = TIMM[name]
    return Built(timm.create_model(name, pretrained=False, **kwargs), (_images(2, size),))


def _last_hidden_state(out) -> torch.Tensor:
    return out.last_hidden_state


def _sample(out) -> torch.Tensor:
    return out.sample


def _dinov3() -> Built:
    import transformers as tf

    config = tf.DINOv3ViTConfig(image_size=32, patch_size=4, num_register_tokens=2, **HF)
    return Built(tf.DINOv3ViTModel(config), kwargs=dict(pixel_values=_images(2, 32)), output=_last_hidden_state)


def _clip_vision() -> Built:
    import transformers as tf

    config = tf.CLIPVisionConfig(image_size=32, patch_size=4, **HF)
    return Built(tf.CLIPVisionModel(config), kwargs=dict(pixel_values=_images(2, 32)), output=_last_hidden_state)


def _llava() -> Built:
    """A CLIP tower (8x8 patches) under a Llama decoder whose prompt holds the 64 image tokens."""
    import transformers as tf

    vision = tf.CLIPVisionConfig(image_size=32, patch_size=4, **HF)
    text = tf.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)
    image_token, patches = 127, (32 // 4) ** 2
    config = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                            image_seq_length=patches, vision_feature_layer=-2,
                            vision_feature_select_strategy="default")
    prompt = torch.randint(1, 100, (2, 6), generator=_generator())
    ids = torch.cat([prompt[:, :2], torch.full((2, patches), image_token), prompt[:, 2:]], dim=1)
    inputs = dict(input_ids=ids, pixel_values=_images(2, 32), attention_mask=torch.ones_like(ids))
    return Built(tf.LlavaForConditionalGeneration(config), kwargs=inputs, output=lambda out: out.logits)


def _paligemma() -> Built:
    """A SigLIP tower (8x8 patches) under a Gemma decoder; the image and the prompt's prefix are read
    both ways (token_type_ids), the answer causally."""
    import transformers as tf

    vision = dict(HF, image_size=32, patch_size=4)
    text = dict(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3,
                num_key_value_heads=1, head_dim=16)
    image_token, patches = 299, (32 // 4) ** 2
    config = tf.PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                                projection_dim=48)
    prompt = torch.randint(2, 200, (2, 8), generator=_generator())
    ids = torch.cat([torch.full((2, patches), image_token), prompt], dim=1)
    types = torch.cat([torch.zeros(2, patches + 4), torch.ones(2, 4)], dim=1).long()
    inputs = dict(input_ids=ids, pixel_values=_images(2, 32), attention_mask=torch.ones_like(ids), token_type_ids=types)
    return Built(tf.PaliGemmaForConditionalGeneration(config), kwargs=inputs, output=lambda out: out.logits)


def _idefics3() -> Built:
    """SmolVLM's form: a SigLIP-style tower whose tokens a pixel shuffle folds 4 to 1 before a Llama
    decoder; transformers fills the image tokens in a graph of their own."""
    import transformers as tf

    vision = dict(HF, image_size=32, patch_size=4)
    text = dict(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3,
                num_key_value_heads=3)
    image_token, tokens = 299, (32 // 4) ** 2 // 4
    config = tf.Idefics3Config(vision_config=vision, text_config=text, image_token_id=image_token, scale_factor=2)
    prompt = torch.randint(2, 200, (1, 9), generator=_generator())
    ids = torch.cat([prompt[:, :3], torch.full((1, tokens), image_token), prompt[:, 3:]], dim=1)
    inputs = dict(input_ids=ids, pixel_values=_images(1, 32).unsqueeze(1), attention_mask=torch.ones_like(ids))
    return Built(tf.Idefics3ForConditionalGeneration(config), kwargs=inputs, output=lambda out: out.logits)


def _dpt() -> Built:
    import transformers as tf

    config = tf.DPTConfig(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                          intermediate_size=64, backbone_out_indices=(0, 1, 2, 3), neck_hidden_sizes=(8, 16, 32, 32),
                          fusion_hidden_size=16, use_auxiliary_head=False)
    return Built(tf.DPTForDepthEstimation(config), kwargs=dict(pixel_values=_images(2, 32)),
                 output=lambda out: out.predicted_depth)


def _timesformer() -> Built:
    import transformers as tf

    config = tf.TimesformerConfig(image_size=32, patch_size=8, num_frames=2, **HF)
    video = torch.randn(2, 2, 3, 32, 32, generator=_generator())
    return Built(tf.TimesformerModel(config), kwargs=dict(pixel_values=video), output=_last_hidden_state)


def _siglip2() -> Built:
    """NaFlex: two images of 6x8 and 4x5 patches packed into 64 slots each, padding masked."""
    import transformers as tf

    patch = 4
    config = tf.Siglip2VisionConfig(patch_size=patch, num_patches=64, **HF)
    shapes = torch.tensor([[6, 8], [4, 5]])
    slots = 64
    pixels = torch.randn(2, slots, 3 * patch * patch, generator=_generator())
    mask = torch.zeros(2, slots, dtype=torch.long)
    for row, (h, w) in enumerate(shapes.tolist()):
        mask[row, : h * w] = 1
    pixels = pixels * mask[..., None]
    inputs = dict(pixel_values=pixels, pixel_attention_mask=mask, spatial_shapes=shapes)
    return Built(tf.Siglip2VisionModel(config), kwargs=inputs, output=_last_hidden_state)


def _qwen2_vl_tower() -> Built:
    """Qwen2-VL's vision tower alone: two images of 4x4 patches as one packed sequence, each
    attending within itself (``cu_seqlens``), then 2x2 patch merging."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
    import transformers as tf

    config = tf.Qwen2VLVisionConfig(depth=2, embed_dim=48, hidden_size=48, num_heads=3, patch_size=4,
                                    spatial_merge_size=2, temporal_patch_size=2, mlp_ratio=2)
    grid = torch.tensor([[1, 4, 4], [1, 4, 4]])
    patches = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 4 * 4, generator=_generator())
    return Built(Qwen2VisionTransformerPretrainedModel(config), kwargs=dict(hidden_states=patches, grid_thw=grid),
                 output=_last_hidden_state)


def _flux() -> Built:
    """8x8 latent tokens (already packed, 16 channels) and 6 text tokens through one double-stream
    and one single-stream block; rotary positions from the ids over (text, row, column)."""
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
    g = _generator()
    side, text = 8, 6
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()
    inputs = dict(hidden_states=torch.randn(2, side * side, 16, generator=g),
                  encoder_hidden_states=torch.randn(2, text, 32, generator=g),
                  pooled_projections=torch.randn(2, 32, generator=g), timestep=torch.tensor([0.5, 0.5]),
                  img_ids=img_ids, txt_ids=torch.zeros(text, 3))
    return Built(model, kwargs=inputs, output=_sample)


def _sd3() -> Built:
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
                                  pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16)
    g = _generator()
    inputs = dict(hidden_states=torch.randn(2, 4, 16, 16, generator=g),
                  encoder_hidden_states=torch.randn(2, 6, 32, generator=g),
                  pooled_projections=torch.randn(2, 32, generator=g), timestep=torch.tensor([500, 500]))
    return Built(model, kwargs=inputs, output=_sample)


def _dit() -> Built:
    from diffusers import DiTTransformer2DModel

    from turbo_fx.bench.diffusion_speed import SMALL_DIT

    g = _generator()
    inputs = (torch.randn(2, 4, SMALL_DIT["sample_size"], SMALL_DIT["sample_size"], generator=g),
              torch.tensor([500, 500]), torch.tensor([1000, 207]))
    return Built(DiTTransformer2DModel(**SMALL_DIT), inputs, output=_sample)


BUILDERS: dict[str, Callable[[], Built]] = {
    **{name: (lambda name=name: _timm(name)) for name in TIMM},
    "DINOv3ViTModel": _dinov3,
    "CLIPVisionModel": _clip_vision,
    "LlavaForConditionalGeneration": _llava,
    "PaliGemmaForConditionalGeneration": _paligemma,
    "Idefics3ForConditionalGeneration": _idefics3,
    "DPTForDepthEstimation": _dpt,
    "TimesformerModel": _timesformer,
    "Siglip2VisionModel": _siglip2,
    "Qwen2VisionTransformerPretrainedModel": _qwen2_vl_tower,
    "FluxTransformer2DModel": _flux,
    "SD3Transformer2DModel": _sd3,
    "DiTTransformer2DModel": _dit,
}


def build(case: Case, seed: int = 0) -> Built:
    """The case's model in eval mode, weights drawn from ``seed``, with its inputs."""
    torch.manual_seed(seed)
    built = BUILDERS[case.name]()
    built.model.eval()
    return built


# A fallback reason names the structure turbo could not follow; these would show that it passes
# on the text of an exception instead.
EXCEPTION_MARKERS = ("Error:", "Exception")


def exception_text(reason: str) -> list[str]:
    """The markers of ``EXCEPTION_MARKERS`` found in ``reason``."""
    return [marker for marker in EXCEPTION_MARKERS if marker in reason]


def outcome(graphs: Sequence) -> str:
    """``merged`` when a graph merged, ``fallback`` when none did and one fell back, else
    ``unchanged`` (nothing to merge)."""
    if any(g.rewritten for g in graphs):
        return "merged"
    return "fallback" if any(g.fallback_reason for g in graphs) else "unchanged"


def tokens(graph) -> list:
    """Tokens entering each block then leaving the last (merge mode), or per merging component
    its tokens and the tokens it runs on (merge-and-restore mode)."""
    if graph.components:
        return [[c.tokens_in, c.tokens_merged] for c in graph.components if c.decision == "merges"]
    return (graph.tokens_per_block + [graph.blocks[-1].tokens_out]) if graph.blocks else []


def row(case: Case, graphs: Sequence, seconds: float) -> dict:
    merged = [g for g in graphs if g.rewritten]
    reasons = [g.fallback_reason for g in graphs if g.fallback_reason]
    return {
        "model": case.name, "family": case.family, "library": case.library, "control": case.control,
        "options": case.options,
        "outcome": outcome(graphs), "graphs": len(graphs), "merged_graphs": len(merged),
        "mode": [g.mode for g in merged],
        "tokens_per_block": [tokens(g) for g in merged],
        "fallback_reasons": reasons,
        "reasons_with_exception_text": [r for r in reasons if exception_text(r)],
        "run_time_failures": [g.last_run_time_failure for g in graphs if g.run_time_failures],
        "seconds": round(seconds, 2),
    }


def run_case(case: Case, inner_backend: str = "eager", options: Optional[dict] = None) -> dict:
    """Compile ``case`` with turbo, run it once, and give its row (an ``error`` entry instead of
    raising, when anything escapes)."""
    from turbo_fx.report import recording

    started = time.perf_counter()
    torch._dynamo.reset()
    rec = None
    try:
        built = build(case)
        compiled = torch.compile(built.model, backend="turbo",
                                 options={**case.options, **(options or {}), "inner_backend": inner_backend})
        with recording() as rec, torch.no_grad():
            built.output(compiled(*built.args, **built.kwargs))
    except Exception as exc:  # a row for the table, not a crash of the whole sweep
        result = row(case, rec.graphs if rec is not None else [], time.perf_counter() - started)
        result.update(outcome="error", error=f"{type(exc).__name__}: {exc}".splitlines()[0],
                      traceback=traceback.format_exc(limit=-3))
        return result
    finally:
        torch._dynamo.reset()
    return row(case, rec.graphs, time.perf_counter() - started)


def sweep(cases: Sequence[Case] = CASES, log: Callable[[str], None] = print, **kwargs) -> list[dict]:
    rows = []
    for case in cases:
        rows.append(run_case(case, **kwargs))
        log(f"{case.name}: {rows[-1]['outcome']} ({rows[-1]['seconds']:.1f} s)")
    return rows


def _tokens(r: dict) -> str:
    parts = []
    for mode, per_graph in zip(r["mode"], r["tokens_per_block"]):
        if mode == "merge":
            parts.append("→".join(str(n) for n in per_graph))
        elif mode == "compact":
            parts.append("→".join(str(n) for n in per_graph) + " image tokens (compacted)")
        else:
            parts.append(", ".join(f"{a}→{b}" for a, b in per_graph) + " (merge and restore)")
    return "; ".join(parts) or "-"


def _reasons(r: dict) -> str:
    if r.get("error"):
        return f"raised {r['error']}"
    # Graphs without attention (embeddings, heads, the glue between towers) are counted, not listed.
    quiet = "no attention site found in the graph"
    listed = list(dict.fromkeys(x for x in r["fallback_reasons"] if x != quiet))
    skipped = sum(1 for x in r["fallback_reasons"] if x == quiet)
    if skipped:
        listed.append(f"{skipped} graph{'s' if skipped > 1 else ''}: {quiet}")
    return "<br>".join(listed) or "-"


def markdown(payload: dict) -> str:
    from turbo_fx.bench import output

    body = [[r["model"], r["family"], r["outcome"], r["graphs"], r["merged_graphs"], _tokens(r), _reasons(r)]
            for r in payload["rows"]]
    bad = [r["model"] for r in payload["rows"] if r["reasons_with_exception_text"]]
    failed = [f"{r['model']} ({'; '.join(r['run_time_failures'])})" for r in payload["rows"] if r["run_time_failures"]]
    lines = output.header(
        "Architecture sweep", payload,
        "Tiny random-weight configurations of each library class, compiled with turbo "
        f"(encoders {MERGE}, generation transformers {RESTORE}, rewritten graphs run eagerly) and run once. "
        "'merged': at least one graph merged tokens; tokens are per block, the last number the "
        "tokens leaving the last block.",
        "Fallback reasons quoting an exception instead of naming a structure: " + (", ".join(bad) or "none") + ".",
        "Merged graphs that failed at run time and ran unmerged: " + ("; ".join(failed) or "none") + ".")
    table = output.table(["model", "family", "outcome", "graphs", "merged", "tokens per block", "fallback reasons"],
                         body)
    return "\n".join(lines + [table, ""])


def render(path: str) -> str:
    """Rewrite the markdown beside a result JSON of this study from the JSON alone."""
    from turbo_fx.bench import output

    text = markdown(output.load_json(path))
    with open(path.removesuffix(".json") + ".md", "w") as f:
        f.write(text)
    return text


def check(args) -> None:
    unknown = [name for name in args.models or () if name not in BY_NAME]
    if unknown:
        from turbo_fx.bench.cli import UsageError

        raise UsageError(f"unknown sweep model(s) {', '.join(unknown)}; known: {', '.join(BY_NAME)}")


def run(args) -> dict:
    from turbo_fx.bench import output, timing

    cases = [BY_NAME[name] for name in args.models] if args.models else list(CASES)
    payload = {"machine": timing.machine(), "command": args.command,
               "rows": sweep(cases, log=timing.log, inner_backend=args.inner_backend, options=args.options)}
    output.write(payload, args.out, args.name or "sweep", markdown)
    return payload
