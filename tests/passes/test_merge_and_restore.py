"""Merge-and-restore mode on diffusers models (small random configs): exact where the math says
so, an eager reference for one block, and exact token counts per component."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from turbo_fx import TurboConfig, TurboConfigError, ops
from turbo_fx.report import recording

diffusers = pytest.importorskip("diffusers")

ALL = ("self-attention", "cross-attention", "feed-forward")


def transformer2d(layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.Transformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=16, num_layers=layers,
        cross_attention_dim=12, norm_num_groups=4,
    ).eval()


def small_unet(**extra) -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8, **extra,
    ).eval()


def small_dit(layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=layers, sample_size=16,
        patch_size=2, num_embeds_ada_norm=10, norm_num_groups=8,
    ).eval()


def unet_inputs():
    torch.manual_seed(1)
    return torch.randn(2, 4, 16, 16), torch.tensor([10, 10]), torch.randn(2, 7, 32)


def cell_duplicated(batch: int, channels: int, height: int, width: int) -> torch.Tensor:
    """Feature maps whose every 2 x 2 cell holds one value: after per-position ops (GroupNorm,
    a 1 x 1 projection) each cell's four tokens are exact duplicates."""
    torch.manual_seed(2)
    return F.interpolate(torch.randn(batch, channels, height // 2, width // 2), scale_factor=2, mode="nearest")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("use_rand", [False, True])
def test_duplicated_cells_give_the_unmerged_output(turbo, use_rand):
    model = transformer2d()
    x, text = cell_duplicated(2, 16, 8, 8), torch.randn(2, 5, 12)
    with torch.no_grad():
        want = model(x, encoder_hidden_states=text).sample
    compiled = turbo(model, ratio=0.5, use_rand=use_rand, merge_components=ALL)
    got = compiled(x, encoder_hidden_states=text).sample
    report = compiled.report
    assert [c.tokens_merged for c in report.components] == [32] * 6
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_duplicates_need_the_size_bias(turbo):
    model = transformer2d()
    x, text = cell_duplicated(2, 16, 8, 8), torch.randn(2, 5, 12)
    with torch.no_grad():
        want = model(x, encoder_hidden_states=text).sample
    got = turbo(model, ratio=0.5, prop_attn=False, merge_components=ALL)(x, encoder_hidden_states=text).sample
    assert (got - want).abs().max() > 1e-3


def reference_block(model, x, text, ratio):
    """One Transformer2DModel layer with merge-and-restore written out by hand: merge the
    stream, run the component on it (self-attention with the log-size mask), restore, add."""
    batch, _, height, width = x.shape
    hidden = model.proj_in(model.norm(x))
    inner = hidden.shape[1]
    tokens = hidden.permute(0, 2, 3, 1).reshape(batch, height * width, inner)
    block = model.transformer_blocks[0]
    dst, src = ops.grid_partition(height, width, 2, 2, seed=None)
    assign, size = ops.grid_merge_plan(tokens, dst, src, int(ratio * height * width))

    def merged(t):
        return ops.merge_by_plan(t, assign, size)

    def back(t):
        return ops.restore_tokens(t, assign, 1)

    tokens = tokens + back(block.attn1(block.norm1(merged(tokens)), attention_mask=size.log()[:, None, :]))
    tokens = tokens + back(block.attn2(block.norm2(merged(tokens)), encoder_hidden_states=text))
    tokens = tokens + back(block.ff(block.norm3(merged(tokens))))
    grid = tokens.reshape(batch, height, width, inner).permute(0, 3, 1, 2)
    return model.proj_out(grid) + x


def test_graph_pass_matches_the_eager_reference(turbo):
    model = transformer2d(layers=1)
    torch.manual_seed(3)
    x, text = torch.randn(2, 16, 8, 8), torch.randn(2, 5, 12)
    with torch.no_grad():
        want = reference_block(model, x, text, 0.5)
        unmerged = model(x, encoder_hidden_states=text).sample
    got = turbo(model, ratio=0.5, use_rand=False, semantic=False, merge_components=ALL)(x, encoder_hidden_states=text).sample
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert relative_error(got, unmerged) > 1e-3  # the reference is not the unmerged model


def test_ratio_zero_leaves_the_unet_exact(turbo):
    unet = small_unet()
    x, t, text = unet_inputs()
    with torch.no_grad():
        want = unet(x, t, text).sample
    compiled = turbo(unet, ratio=0.0)
    got = compiled(x, t, text).sample
    assert torch.equal(got, want)
    assert not compiled.report.rewritten
    assert compiled.report.components and all(c.decision == "untouched" for c in compiled.report.components)


def test_unet_tokens_per_component(turbo):
    unet = small_unet()
    compiled = turbo(unet, ratio=0.5, merge_components=ALL)
    compiled(*unet_inputs())
    components = compiled.report.components
    # down block 0 and up block 1 run at 16 x 16, the mid block at 8 x 8.
    assert [c.grid for c in components] == [(16, 16)] * 3 + [(8, 8)] * 3 + [(16, 16)] * 6
    assert [c.kind for c in components[:3]] == ["self-attention", "cross-attention", "feed-forward"]
    merged = [c.tokens_merged if c.decision == "merges" else None for c in components]
    assert merged == [128] * 3 + [None] * 3 + [128] * 6
    assert "max_downsample=1" in components[3].reason


def test_max_downsample_and_components_choose_what_merges(turbo):
    unet = small_unet()
    x, t, text = unet_inputs()
    compiled = turbo(unet, ratio=0.5, max_downsample=2, merge_components=("self-attention",))
    compiled(x, t, text)
    merging = [(c.kind, c.tokens_merged) for c in compiled.report.components if c.decision == "merges"]
    assert merging == [("self-attention", 128), ("self-attention", 32), ("self-attention", 128), ("self-attention", 128)]


def test_default_merges_self_attention_only(turbo):
    compiled = turbo(small_unet(), ratio=0.5)
    compiled(*unet_inputs())
    merging = {c.kind for c in compiled.report.components if c.decision == "merges"}
    assert merging == {"self-attention"}
    reasons = {c.reason for c in compiled.report.components if c.kind != "self-attention"}
    assert reasons == {"'cross-attention' is not in merge_components", "'feed-forward' is not in merge_components"}


def test_ratio_is_clamped_to_the_sources(turbo):
    compiled = turbo(small_unet(), ratio=0.9, merge_components=ALL)
    compiled(*unet_inputs())
    # 2 x 2 cells leave 192 of 256 tokens as sources: at most 192 merge, 64 stay.
    assert {c.tokens_merged for c in compiled.report.components if c.decision == "merges"} == {64}


def test_semantic_value_comes_from_the_latest_cross_attention_at_the_grid(turbo):
    compiled = turbo(small_unet(), ratio=0.5)
    compiled(*unet_inputs())
    sources = [c.semantic for c in compiled.report.components if c.decision == "merges" and c.kind == "self-attention"]
    assert sources[0].startswith("none")
    assert sources[1] == "cross-attention down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    assert sources[2] == "cross-attention up_blocks.1.attentions.0.transformer_blocks.0.attn2"


def test_semantic_value_changes_the_merge(turbo):
    unet = small_unet()
    x, t, text = unet_inputs()
    plain = turbo(unet, ratio=0.5, semantic=False, merge_components=ALL)(x, t, text).sample
    weighted = turbo(unet, ratio=0.5, alpha=5.0, merge_components=ALL)(x, t, text).sample
    assert not torch.allclose(plain, weighted)


def test_flops_fall_with_the_ratio():
    unet = small_unet()
    x, t, text = unet_inputs()
    ratios = []
    for ratio in (0.3, 0.5, 0.7):
        torch._dynamo.reset()
        compiled = torch.compile(unet, backend="turbo", options={"ratio": ratio, "inner_backend": "eager"})
        with recording(count_flops=True) as rec, torch.no_grad():
            compiled(x, t, text)
        ratios.append(rec.graphs[-1].flop_ratio)
    assert 1.0 > ratios[0] > ratios[1] > ratios[2]


def test_dit_merges_every_block(turbo):
    dit = small_dit()
    torch.manual_seed(4)
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([3, 3]), torch.tensor([1, 2])
    with torch.no_grad():
        want = dit(x, timestep=t, class_labels=y).sample
    compiled = turbo(dit, ratio=0.5, merge_components=ALL)
    got = compiled(x, timestep=t, class_labels=y).sample
    components = compiled.report.components
    assert [c.kind for c in components] == ["self-attention", "feed-forward"] * 2
    assert [(c.grid, c.tokens_merged) for c in components] == [((8, 8), 32)] * 4
    assert got.shape == want.shape and torch.isfinite(got).all()
    exact = turbo(dit, ratio=0.0)(x, timestep=t, class_labels=y).sample
    assert torch.equal(exact, want)


@pytest.mark.parametrize("options, message", [
    ({"ratio": 1.0}, "'ratio' must be a number in [0, 1)"),
    ({"ratio": -0.1}, "'ratio' must be a number in [0, 1)"),
    ({"merge_components": ("attention",)}, "'merge_components' must be a subset"),
    ({"sx": 0}, "'sx' must be an int >= 1"),
    ({"max_downsample": 0}, "'max_downsample' must be an int >= 1"),
])
def test_bad_generation_options_are_clear_errors(options, message):
    with pytest.raises(TurboConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        TurboConfig(**options)
    compiled = torch.compile(small_dit(1), backend="turbo", options=options)
    with pytest.raises(Exception) as info, torch.no_grad():
        compiled(torch.randn(1, 4, 16, 16), timestep=torch.tensor([1]), class_labels=torch.tensor([1]))
    assert message in str(info.value)


def test_explain_lists_components_and_flops():
    import turbo_fx

    x, t, text = unet_inputs()
    text_report = str(turbo_fx.explain(small_unet(), x, t, text, ratio=0.5, merge_components=ALL))
    assert "merge-and-restore: 9 of 12 generation components merge and restore" in text_report
    assert "semantic value" in text_report and "FLOPs:" in text_report
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1" in text_report


def test_sdxl_layout_merges_its_largest_attention_grid(turbo):
    """SDXL's top resolution has no attention and its blocks stack transformer layers: the
    largest grid with attention (8 x 8 here) is the one that merges at max_downsample=1."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8, transformer_layers_per_block=(1, 2, 2), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
    ).eval()
    x, t, text = unet_inputs()
    added = {"text_embeds": torch.randn(2, 32), "time_ids": torch.randn(2, 6)}
    compiled = turbo(unet, ratio=0.5, merge_components=ALL)
    got = compiled(x, t, text, added_cond_kwargs=added).sample
    components = compiled.report.components
    merging = [(c.grid, c.tokens_merged) for c in components if c.decision == "merges"]
    # At 8 x 8: down block 1 (one attention of two layers) and up block 1 (two attentions of
    # two layers), three components per layer.
    assert merging == [((8, 8), 32)] * (3 * 2 + 3 * 2 * 2)
    assert all(c.grid == (4, 4) for c in components if c.decision == "untouched")
    assert torch.isfinite(got).all()


def test_sd2_layout_merges_every_stacked_layer(turbo):
    """Linear projections in and out of the grid and two transformer layers per block."""
    unet = small_unet(use_linear_projection=True, transformer_layers_per_block=2)
    x, t, text = unet_inputs()
    compiled = turbo(unet, ratio=0.5)
    compiled(x, t, text)
    merging = [(c.kind, c.grid, c.tokens_merged) for c in compiled.report.components if c.decision == "merges"]
    # 16 x 16: one attention in down block 0, two in up block 1, two layers each.
    assert merging == [("self-attention", (16, 16), 128)] * (2 * 3)


def test_pixart_adaptive_norm_blocks_merge(turbo):
    torch.manual_seed(0)
    model = diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2, sample_size=16,
        patch_size=2, cross_attention_dim=32, caption_channels=24, norm_num_groups=8).eval()
    torch.manual_seed(5)
    x, t, caption = torch.randn(2, 4, 16, 16), torch.tensor([3, 3]), torch.randn(2, 5, 24)
    kwargs = dict(encoder_hidden_states=caption, timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    with torch.no_grad():
        want = model(x, **kwargs).sample
    compiled = turbo(model, ratio=0.5, merge_components=ALL)
    got = compiled(x, **kwargs).sample
    components = compiled.report.components
    assert [c.kind for c in components] == ["self-attention", "cross-attention", "feed-forward"] * 2
    assert all(c.tokens_merged == 32 for c in components)
    assert got.shape == want.shape and torch.isfinite(got).all()
    assert torch.equal(turbo(model, ratio=0.0)(x, **kwargs).sample, want)
