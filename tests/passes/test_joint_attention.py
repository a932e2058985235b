"""Joint image-text attention (SD3's MMDiT blocks): the image tokens merge and are restored
around the attention, the text tokens stay whole inside the concatenated sequence."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

diffusers = pytest.importorskip("diffusers")

TEXT = 7


def small_sd3(layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=layers, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=16,
    ).eval()
    return model


def sd3_inputs(latents: torch.Tensor) -> dict:
    gen = torch.Generator().manual_seed(3)
    return dict(hidden_states=latents, encoder_hidden_states=torch.randn(2, TEXT, 32, generator=gen),
                pooled_projections=torch.randn(2, 16, generator=gen), timestep=torch.tensor([10, 500]))


def cell_duplicated_latents() -> torch.Tensor:
    """Latents whose 2 x 2 patches repeat over each 2 x 2 cell of the 8 x 8 token grid: with
    the position embedding zeroed, the four tokens of a cell are exact duplicates."""
    cells = torch.randn(2, 4, 4, 4, 2, 2, generator=torch.Generator().manual_seed(2))  # B, C, cell rows, cols, patch
    tokens = cells[:, :, :, None, :, None].expand(-1, -1, -1, 2, -1, 2, -1, -1)  # B, C, cr, 2, cc, 2, ph, pw
    return tokens.permute(0, 1, 2, 3, 6, 4, 5, 7).reshape(2, 4, 16, 16).contiguous()


def no_position_embedding(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        model.pos_embed.pos_embed.zero_()
    return model


def test_duplicated_image_cells_give_the_unmerged_output(turbo):
    model = no_position_embedding(small_sd3())
    inputs = sd3_inputs(cell_duplicated_latents())
    with torch.no_grad():
        want = model(**inputs).sample
    compiled = turbo(model, ratio=0.5)
    got = compiled(**inputs).sample
    report = compiled.report
    assert report.fallback_reason is None
    merged = [c for c in report.components if c.decision == "merges"]
    assert [(c.kind, c.tokens_in, c.tokens_merged) for c in merged] == [("self-attention", 64, 32)] * 2
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_text_keys_get_no_size_bias_and_image_keys_need_it(turbo):
    # Without the log(size) bias the text tokens (and the image queries) attend to a merged
    # image key as to one token: the output moves.
    model = no_position_embedding(small_sd3())
    inputs = sd3_inputs(cell_duplicated_latents())
    with torch.no_grad():
        want = model(**inputs).sample
    got = turbo(model, ratio=0.5, prop_attn=False)(**inputs).sample
    assert (got - want).abs().max() > 1e-4


def test_real_latents_merge_and_ratio_zero_is_bit_identical(turbo):
    model = small_sd3()
    inputs = sd3_inputs(torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5)))
    with torch.no_grad():
        want = model(**inputs).sample
    merged = turbo(model, ratio=0.5)
    got = merged(**inputs).sample
    assert got.shape == want.shape and torch.isfinite(got).all()
    assert 0 < (got - want).abs().max() and F.cosine_similarity(got.flatten(1), want.flatten(1)).min() > 0.9
    torch._dynamo.reset()
    untouched = turbo(model, ratio=0.0)
    assert torch.equal(untouched(**inputs).sample, want)


def test_joint_sites_record_each_sequence():
    from model_builders import dynamo_graph
    from turbo_fx.passes.find_attention import find_attention_sites

    model = small_sd3()
    inputs = sd3_inputs(torch.randn(2, 4, 16, 16))
    sites = find_attention_sites(dynamo_graph(model, **inputs))
    assert len(sites) == 2
    first, last = sites
    # image tokens first (64), then the text (7); the last block keeps no text stream
    assert [(p.start, p.count, p.closing_add is not None) for p in first.joint] == [(0, 64, True), (64, TEXT, True)]
    assert [(p.start, p.count, p.closing_add is not None) for p in last.joint] == [(0, 64, True), (64, TEXT, False)]


# Flux: double-stream blocks (joint attention, text and image each with its residual stream) and
# single-stream blocks (one stream that concatenates text and image), rotary positions from ids,
# packed tokens returned as they are (no grid after the last block).
FLUX_TEXT, FLUX_GROUPS = 6, 16


def small_flux() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)).eval()


def flux_inputs(duplicated: bool) -> dict:
    """64 image tokens; with ``duplicated``, every 4 consecutive tokens (one cell of the one-row
    partition) share their content and their position ids, so they are exact duplicates."""
    gen = torch.Generator().manual_seed(1)
    group = torch.arange(FLUX_GROUPS)
    ids = torch.stack([torch.zeros(FLUX_GROUPS), (group // 4).float(), (group % 4).float()], -1)
    if duplicated:
        tokens, img_ids = torch.randn(2, FLUX_GROUPS, 16, generator=gen).repeat_interleave(4, 1), ids.repeat_interleave(4, 0)
    else:
        rows, cols = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
        tokens = torch.randn(2, 64, 16, generator=gen)
        img_ids = torch.stack([torch.zeros(64), rows.flatten().float(), cols.flatten().float()], -1)
    return dict(hidden_states=tokens, encoder_hidden_states=torch.randn(2, FLUX_TEXT, 32, generator=gen),
                pooled_projections=torch.randn(2, 32, generator=gen), timestep=torch.tensor([0.5, 0.5]),
                img_ids=img_ids, txt_ids=torch.zeros(FLUX_TEXT, 3))


def test_flux_duplicated_image_tokens_give_the_unmerged_output(turbo):
    model, inputs = small_flux(), flux_inputs(duplicated=True)
    with torch.no_grad():
        want = model(**inputs).sample
    compiled = turbo(model, ratio=0.5)
    got = compiled(**inputs).sample
    report = compiled.report
    assert report.fallback_reason is None and "tokens are concatenated" in report.mode_note
    merged = [(c.module, c.grid, c.tokens_in, c.tokens_merged) for c in report.components if c.decision == "merges"]
    # The image tokens of all four blocks, on one row (the model never reshapes them to a grid);
    # the six text tokens stay whole, and so do their rows of the rotary tables (70 = 6 + 64).
    assert [m[1:] for m in merged] == [((1, 64), 64, 32)] * 4
    assert [m[0] for m in merged] == ["transformer_blocks.0.attn", "transformer_blocks.1.attn",
                                      "single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"]
    assert report.token_tables and all(t.endswith("(70 rows from token 0): rows") for t in report.token_tables)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_flux_needs_the_size_bias_and_ratio_zero_is_bit_identical(turbo):
    model, inputs = small_flux(), flux_inputs(duplicated=True)
    with torch.no_grad():
        want = model(**inputs).sample
    assert (turbo(model, ratio=0.5, prop_attn=False)(**inputs).sample - want).abs().max() > 1e-3
    torch._dynamo.reset()
    assert torch.equal(turbo(model, ratio=0.0)(**inputs).sample, want)


def test_flux_real_positions_merge_close_to_the_unmerged_output(turbo):
    model, inputs = small_flux(), flux_inputs(duplicated=False)
    with torch.no_grad():
        want = model(**inputs).sample
    got = turbo(model, ratio=0.5)(**inputs).sample
    assert 0 < (got - want).abs().max() and F.cosine_similarity(got.flatten(1), want.flatten(1)).min() > 0.9


def test_joint_then_single_stream_model_written_here_merges_image_tokens_only(turbo):
    # Not Flux's code: the text follows the image in the single stream, attention and
    # feed-forward close separate adds, rotations are (row, column) of 2x2 cells.
    from tests.model_builders import JointRotaryDiT, cell_duplicated_latents

    model = JointRotaryDiT(by_cell=True, single=2).eval()
    inputs = (cell_duplicated_latents(), torch.tensor([3.0, 7.0]), torch.tensor([0, 2]))
    with torch.no_grad():
        want = model(*inputs)
    compiled = turbo(model, ratio=0.25, merge_components=("self-attention", "feed-forward"))
    got = compiled(*inputs)
    report = compiled.report
    assert report.fallback_reason is None
    merging = [(c.kind, c.tokens_in, c.tokens_merged) for c in report.components if c.decision == "merges"]
    # Two joint blocks (attention, feed-forward) on the image stream, then the single stream's
    # four components, each merging 16 of its 64 image tokens and keeping the 2 text tokens.
    assert merging == [("self-attention", 64, 48), ("feed-forward", 64, 48)] * 4
    assert all(t.endswith("rows") for t in report.token_tables)
    # On one row of tokens a cell of 4 holds two duplicated pairs: at ratio 0.25 every merged
    # token is an exact duplicate of its destination, so the output is the unmerged one.
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    torch._dynamo.reset()
    assert (turbo(model, ratio=0.25, prop_attn=False)(*inputs) - want).abs().max() > 1e-4
