"""The merge-and-restore ops against hand-worked grids and brute-force references."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from turbo_fx import ops


def test_top_left_destinations_of_a_4x4_grid():
    dst, src = ops.grid_partition(4, 4, 2, 2, seed=None)
    assert dst.tolist() == [0, 2, 8, 10]
    assert src.tolist() == [1, 3, 4, 5, 6, 7, 9, 11, 12, 13, 14, 15]


def test_rows_and_columns_outside_full_cells_are_sources():
    # 5 x 3 grid, 2 x 2 cells: 2 x 1 full cells; row 4 and column 2 hold no destination.
    dst, src = ops.grid_partition(5, 3, 2, 2, seed=None)
    assert dst.tolist() == [0, 6]
    assert sorted(dst.tolist() + src.tolist()) == list(range(15))


@pytest.mark.parametrize("sx, sy", [(2, 2), (3, 2), (2, 1)])
def test_seeded_destinations_are_one_per_cell(sx, sy):
    height, width = 12, 12
    dst, src = ops.grid_partition(height, width, sx, sy, seed=7)
    rows, cols = dst // width, dst % width
    cells = (rows // sy) * (width // sx) + cols // sx
    assert sorted(cells.tolist()) == list(range((height // sy) * (width // sx)))
    assert sorted(dst.tolist() + src.tolist()) == list(range(height * width))
    assert src.tolist() == sorted(src.tolist())


def test_seeded_offsets_are_reproducible_and_spread():
    first = ops.grid_partition(16, 16, 2, 2, seed=3)[0]
    assert torch.equal(first, ops.grid_partition(16, 16, 2, 2, seed=3)[0])
    assert not torch.equal(first, ops.grid_partition(16, 16, 2, 2, seed=4)[0])
    offsets = ops.cell_offsets(torch.arange(64), 4, seed=3)
    counts = torch.bincount(offsets, minlength=4)
    assert counts.min() >= 8, counts  # every place in the cell is used, none dominates


def reference_plan(x, dst, src, r, semantic=None, alpha=0.0):
    """Loops over tokens: each source's best destination by cosine, degree, stable ranking."""
    batch, n, _ = x.shape
    assign = torch.zeros(batch, n, dtype=torch.long)
    n_dst = len(dst)
    for b in range(batch):
        best, partner = [], []
        for s in src.tolist():
            sims = [F.cosine_similarity(x[b, s], x[b, d], dim=0).item() for d in dst.tolist()]
            j = max(range(n_dst), key=lambda i: sims[i])
            best.append(sims[j])
            partner.append(j)
        degree = [v - (alpha * semantic[b, s].item() if semantic is not None else 0.0)
                  for v, s in zip(best, src.tolist())]
        order = sorted(range(len(degree)), key=lambda i: -degree[i])
        for j, d in enumerate(dst.tolist()):
            assign[b, d] = j
        for k, i in enumerate(order[r:]):
            assign[b, src[i]] = n_dst + k
        for i in order[:r]:
            assign[b, src[i]] = partner[i]
    size = torch.zeros(batch, n - r)
    for b in range(batch):
        for t in range(n):
            size[b, assign[b, t]] += 1
    return assign, size


@pytest.mark.parametrize("use_semantic", [False, True])
def test_merge_plan_matches_the_loop_reference(use_semantic):
    torch.manual_seed(0)
    x = torch.randn(2, 36, 8, dtype=torch.float64)
    dst, src = ops.grid_partition(6, 6, 2, 2, seed=1)
    semantic = torch.rand(2, 36) * 2 if use_semantic else None
    assign, size = ops.grid_merge_plan(x, dst, src, 14, semantic, alpha=0.3)
    want_assign, want_size = reference_plan(x, dst, src, 14, semantic, alpha=0.3)
    assert torch.equal(assign, want_assign)
    assert torch.equal(size, want_size)


def test_merge_by_plan_averages_the_assigned_tokens():
    x = torch.tensor([[[1.0], [3.0], [10.0], [6.0]]])
    assign = torch.tensor([[0, 0, 1, 0]])
    size = torch.tensor([[3.0, 1.0]])
    torch.testing.assert_close(ops.merge_by_plan(x, assign, size), torch.tensor([[[10.0 / 3], [10.0]]]))


def test_exact_duplicates_in_cells_give_the_unmerged_attention():
    """Every 2 x 2 cell holds one token four times: merging half the tokens and attending with
    the log-size key bias, then restoring, is the attention over all tokens."""
    torch.manual_seed(0)
    cells = torch.randn(2, 3, 3, 16)
    grid = cells.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)  # [2, 6, 6, 16]
    x = grid.reshape(2, 36, 16)
    dst, src = ops.grid_partition(6, 6, 2, 2, seed=5)
    merged, assign, size, bias = ops.grid_merge(x, dst, src, 18, None, 0.0, True, True, torch.float32)
    assert merged.shape == (2, 18, 16)
    q = merged.view(2, 18, 2, 8).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, q, q, attn_mask=bias).transpose(1, 2).reshape(2, 18, 16)
    full_q = x.view(2, 36, 2, 8).transpose(1, 2)
    want = F.scaled_dot_product_attention(full_q, full_q, full_q).transpose(1, 2).reshape(2, 36, 16)
    torch.testing.assert_close(ops.restore_tokens(out, assign, 1), want, atol=1e-5, rtol=1e-5)
    # Without the bias a merged token is under-attended: the result differs.
    plain = F.scaled_dot_product_attention(q, q, q).transpose(1, 2).reshape(2, 18, 16)
    assert (ops.restore_tokens(plain, assign, 1) - want).abs().max() > 1e-3


def test_cross_attention_saliency_matches_the_loop_reference():
    torch.manual_seed(0)
    q = torch.randn(2, 3, 10, 4)
    k = torch.randn(2, 3, 5, 4)
    got = ops.cross_attention_saliency(q, k, None, None, None)
    want = torch.zeros(2, 10)
    for b in range(2):
        for h in range(3):
            for t in range(5):
                logits = torch.stack([q[b, h, i] @ k[b, h, t] / math.sqrt(4) for i in range(10)])
                want[b] += logits.softmax(0) / (3 * 5)
    torch.testing.assert_close(got, want * 10)
    torch.testing.assert_close(got.sum(-1), torch.full((2,), 10.0))


def test_cross_attention_saliency_of_merged_queries_is_per_original_token():
    torch.manual_seed(0)
    q_full = torch.randn(1, 2, 6, 4)
    assign = torch.tensor([[0, 0, 1, 2, 2, 2]])
    merged = q_full[:, :, [0, 2, 3]]
    q_full = merged[:, :, assign[0]]  # the unmerged queries are the merged ones, repeated
    k = torch.randn(1, 2, 3, 4)
    size = torch.tensor([[2.0, 1.0, 3.0]])
    torch.testing.assert_close(ops.cross_attention_saliency(merged, k, 0.5, assign, size),
                               ops.cross_attention_saliency(q_full, k, 0.5, None, None))
