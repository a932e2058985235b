"""Attention sub-blocks regrouped around the attention (divided space-time attention): each
merges its tokens before the attention and restores them after the output projection, when
the whole sequence cannot merge."""
from __future__ import annotations

import pytest
import torch

from tests.model_builders import FactorizedVideoTransformer, cell_repeated_video, dynamo_graph, row_repeated_video
from turbo_fx import ops
from turbo_fx.passes.find_attention import find_attention_sites
from turbo_fx.passes.find_components import find_local_runs


def merged(report) -> list[tuple]:
    return [(c.kind, c.grid, c.tokens_in, c.tokens_merged) for c in report.components if c.decision == "merges"]


def no_position(model: FactorizedVideoTransformer) -> FactorizedVideoTransformer:
    with torch.no_grad():
        model.pos.zero_()
    return model.eval()


def test_local_components_are_found_by_structure():
    model = FactorizedVideoTransformer().eval()
    gm = dynamo_graph(model, row_repeated_video())
    runs = find_local_runs(gm, find_attention_sites(gm))
    # space (16 places, no reshape above them that names a grid: one row) and time (2 frames), per block
    assert [(r.grid, r.components[0].lead, r.components[0].trail) for r in runs] == [((1, 16), 0, 0), ((1, 2), 0, 0)] * 2
    assert all(r.components[0].closing_add is None for r in runs)


def test_divided_space_time_model_with_duplicated_rows_gives_the_unmerged_output(turbo):
    model = no_position(FactorizedVideoTransformer())
    video = row_repeated_video()
    with torch.no_grad():
        want = model(video)
    compiled = turbo(model, ratio=0.5)
    got = compiled(video)
    report = compiled.report
    assert report.fallback_reason is None and "since the whole sequence cannot merge" in report.mode_note
    # Only the spatial attentions merge: the temporal ones hold 2 tokens, 8x fewer than the largest.
    assert merged(report) == [("self-attention", (1, 16), 16, 8)] * 2
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_the_size_bias_is_what_makes_duplicates_exact(turbo):
    model = no_position(FactorizedVideoTransformer())
    video = row_repeated_video()
    with torch.no_grad():
        want = model(video)
    got = turbo(model, ratio=0.5, prop_attn=False)(video)
    assert (got - want).abs().max() > 1e-4


def test_temporal_attention_merges_when_allowed_and_short_sequences_say_why(turbo):
    model = no_position(FactorizedVideoTransformer())
    video = row_repeated_video(frames=8)
    compiled = turbo(model, ratio=0.5, max_downsample=8)
    with torch.no_grad():
        want = model(video)
    got = compiled(video)
    assert merged(compiled.report) == [("self-attention", (1, 16), 16, 8), ("self-attention", (1, 8), 8, 4)] * 2
    assert got.shape == want.shape and torch.isfinite(got).all()
    torch._dynamo.reset()
    short = turbo(model, ratio=0.5, max_downsample=8)
    short(row_repeated_video(frames=2))
    reasons = {c.reason for c in short.report.components if c.decision != "merges"}
    assert reasons == {"its 1x2 tokens fill no 2x2 cell, so no token is a merge destination"}


transformers = pytest.importorskip("transformers")


def small_timesformer() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.TimesformerConfig(image_size=32, patch_size=8, num_frames=2, hidden_size=48,
                                            num_hidden_layers=2, num_attention_heads=3, intermediate_size=96)
    model = transformers.TimesformerModel(config).eval()
    with torch.no_grad():
        model.embeddings.position_embeddings.zero_()
        model.embeddings.time_embeddings.zero_()
    return model


def test_timesformer_with_duplicated_cells_gives_the_unmerged_output(turbo):
    model = small_timesformer()
    video = cell_repeated_video()
    with torch.no_grad():
        want = model(pixel_values=video).last_hidden_state
    compiled = turbo(model, ratio=0.5)
    got = compiled(pixel_values=video).last_hidden_state
    report = compiled.report
    assert report.fallback_reason is None
    # The spatial attention's 16 patches sit on a 4x4 grid; each frame's class token stays whole.
    assert merged(report) == [("self-attention", (4, 4), 16, 8)] * 2
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_timesformer_ratio_zero_is_bit_identical_and_real_video_merges(turbo):
    model = small_timesformer()
    video = torch.randn(2, 2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(pixel_values=video).last_hidden_state
    got = turbo(model, ratio=0.5)(pixel_values=video).last_hidden_state
    assert 0 < (got - want).abs().max()
    assert torch.nn.functional.cosine_similarity(got.flatten(1), want.flatten(1)).min() > 0.9
    torch._dynamo.reset()
    assert torch.equal(turbo(model, ratio=0.0)(pixel_values=video).last_hidden_state, want)


def test_one_row_of_tokens_gets_cells_along_the_row():
    dst, src = ops.grid_partition(1, 10, 2, 2, None)
    assert dst.tolist() == [0, 4] and src.tolist() == [1, 2, 3, 5, 6, 7, 8, 9]
    assert ops.destination_count(1, 10, 2, 2) == 2 and ops.destination_count(1, 3, 2, 2) == 0
    assert ops.destination_count(4, 4, 2, 2) == 4


def test_restore_keeps_tokens_around_the_merged_ones():
    y = torch.tensor([[[10.0], [1.0], [2.0], [20.0], [21.0]]])  # lead 1, merged 2, trail 2
    assign = torch.tensor([[0, 1, 0, 1]])
    out = ops.restore_tokens(y, assign, 1, 1, 2)
    assert out[0, :, 0].tolist() == [10.0, 1.0, 2.0, 1.0, 2.0, 20.0, 21.0]
