"""turbo inside real diffusers pipelines (small random components, a tokenizer built here):
a full denoising loop with classifier-free guidance, one compile for every step."""
from __future__ import annotations

import json

import pytest
import torch

import turbo_fx

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def local_clip_tokenizer(folder) -> "transformers.CLIPTokenizer":
    """A CLIP BPE tokenizer over single letters (no merges), written to ``folder``."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in LETTERS:
        vocab[letter] = len(vocab)
        vocab[letter + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


def stable_diffusion(folder) -> "diffusers.StableDiffusionPipeline":
    torch.manual_seed(0)
    tokenizer = local_clip_tokenizer(folder)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                                          steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, steps: int = 4) -> torch.Tensor:
    with torch.no_grad():
        return pipe(["a cat", "a dog"], num_inference_steps=steps, guidance_scale=5.0, height=32, width=32,
                    generator=torch.Generator().manual_seed(0), output_type="pt").images


def test_stable_diffusion_loop_compiles_once(tmp_path):
    pipe = stable_diffusion(tmp_path)
    want = generate(pipe)
    unet = pipe.unet
    pipe.unet = torch.compile(unet, backend="turbo", options={"ratio": 0.5, "inner_backend": "eager"})
    with turbo_fx.recording() as rec:
        got = generate(pipe)
    # Four steps, each with a new timestep tensor and a batch of 4 (2 prompts x guidance): one graph.
    assert turbo_fx.counters["graphs"] == 1 and turbo_fx.counters["graphs_rewritten"] == 1
    report = rec.graphs[0]
    assert [c.tokens_merged for c in report.components if c.decision == "merges"] == [128] * 3  # the self-attention of the 3 blocks at 16 x 16 (the default)
    assert got.shape == want.shape == (2, 3, 32, 32) and torch.isfinite(got).all()
    assert not torch.equal(got, want)
    torch._dynamo.reset()
    pipe.unet = torch.compile(unet, backend="turbo", options={"ratio": 0.0, "inner_backend": "eager"})
    assert torch.equal(generate(pipe), want)


def test_dit_pipeline_runs_merged():
    torch.manual_seed(0)
    transformer = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2, sample_size=16,
        patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=8)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    pipe = diffusers.DiTPipeline(transformer=transformer, vae=vae, scheduler=diffusers.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)

    def run():
        with torch.no_grad():
            return pipe(class_labels=[1, 2], num_inference_steps=3, guidance_scale=4.0,
                        generator=torch.Generator().manual_seed(0), output_type="np").images

    want = run()
    options = {"ratio": 0.5, "inner_backend": "eager", "merge_components": ("self-attention", "feed-forward")}
    pipe.transformer = torch.compile(transformer, backend="turbo", options=options)
    with turbo_fx.recording() as rec:
        got = run()
    assert turbo_fx.counters["graphs"] == 1
    assert [(c.kind, c.tokens_merged) for c in rec.graphs[0].components] == [("self-attention", 32), ("feed-forward", 32)] * 2
    assert got.shape == want.shape and bool((got == got).all())


def test_inductor_compiles_the_merged_unet_once_for_every_timestep():
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8).eval()
    x, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    eager = torch.compile(unet, backend="turbo", options={"ratio": 0.5, "inner_backend": "eager"})
    with torch.no_grad():
        want = [eager(x, torch.tensor([t, t]), text).sample for t in (999, 500, 1)]
    torch._dynamo.reset()
    turbo_fx.counters.clear()
    compiled = torch.compile(unet, backend="turbo", options={"ratio": 0.5})
    with torch.no_grad():
        got = [compiled(x, torch.tensor([t, t]), text).sample for t in (999, 500, 1)]
    assert turbo_fx.counters["graphs"] == 1 and turbo_fx.counters["graphs_rewritten"] == 1
    assert turbo_fx.counters["graphs_fallback"] == 0
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
