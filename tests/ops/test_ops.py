"""The runtime merge ops (turbo_fx/ops/) against hand-computed expectations."""
from __future__ import annotations

import math

import pytest
import torch

from turbo_fx import ops


def merged_pairs(dest: torch.Tensor) -> set[tuple[int, ...]]:
    """Groups of old token indices (per sample 0) that ended in the same new token, size > 1."""
    groups: dict[int, list[int]] = {}
    for old, new in enumerate(dest[0].tolist()):
        groups.setdefault(new, []).append(old)
    return {tuple(g) for g in groups.values() if len(g) > 1}


@pytest.mark.parametrize(
    "n, p, r, min_tokens, expected",
    [
        (197, 1, 13, 0, 13),
        (10, 1, 8, 0, 4),  # half of the 9 unprotected tokens, rounded down
        (10, 1, 3, 8, 2),  # the min_tokens floor binds
        (10, 2, 3, 12, 0),  # already below the floor
        (3, 2, 5, 0, 0),  # one unprotected token cannot merge
    ],
)
def test_merge_count_clamps(n, p, r, min_tokens, expected):
    assert ops.merge_count(n, p, r, min_tokens) == expected


def test_counts_sizes_and_order():
    torch.manual_seed(0)
    x = torch.randn(3, 21, 8)
    size = torch.ones(3, 21)
    merged, new_size, dest = ops.merge_tokens(x, size, x, None, r=6, protected=1)
    assert merged.shape == (3, 15, 8)
    assert torch.equal(new_size.sum(1), torch.full((3,), 21.0))
    for b in range(3):
        assert torch.equal(torch.bincount(dest[b], minlength=15).float(), new_size[b])
        assert dest[b, 0] == 0
        # B tokens (odd offsets) never move away; in original order they take increasing slots
        b_slots = dest[b, 2::2]
        assert torch.all(b_slots[1:] > b_slots[:-1])


def test_size_weighted_average_by_hand():
    # protected token 0; A = {1, 3}, B = {2, 4}; token 1 is closest to 2, token 3 to 4.
    metric = torch.tensor([[[0.0, 0.0, 1.0], [1.0, 0.1, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.2, 1.0, 0.0]]])
    x = torch.tensor([[[5.0], [1.0], [4.0], [7.0], [9.0]]])
    size = torch.tensor([[1.0, 2.0, 1.0, 1.0, 3.0]])
    # r=1: token 1 (cos ~0.995 to token 2) beats token 3 (cos ~0.981 to token 4)
    merged, new_size, dest = ops.merge_tokens(x, size, metric, None, r=1, protected=1)
    assert merged_pairs(dest) == {(1, 2)}
    assert torch.allclose(merged[0, :, 0], torch.tensor([5.0, (2 * 1.0 + 1 * 4.0) / 3, 7.0, 9.0]))
    assert torch.equal(new_size[0], torch.tensor([1.0, 3.0, 1.0, 3.0]))
    merged, new_size, dest = ops.merge_tokens(x, size, metric, None, r=2, protected=1)
    assert merged_pairs(dest) == {(1, 2), (3, 4)}
    assert torch.allclose(merged[0, :, 0], torch.tensor([5.0, 2.0, (7.0 + 3 * 9.0) / 4]))


def test_exact_duplicates_lose_nothing():
    torch.manual_seed(1)
    unique = torch.randn(2, 6, 5)
    cls = torch.randn(2, 1, 5)
    # tokens come in identical adjacent pairs after the protected CLS: A and B copies of each other
    x = torch.cat([cls, unique.repeat_interleave(2, dim=1)], dim=1)
    size = torch.ones(2, 13)
    merged, new_size, dest = ops.merge_tokens(x, size, x, None, r=6, protected=1)
    assert torch.allclose(merged, torch.cat([cls, unique], dim=1), atol=1e-6)
    assert torch.equal(new_size, torch.tensor([[1.0] + [2.0] * 6] * 2))
    restored = ops.restore_tokens(merged, dest, axis=1)
    assert torch.allclose(restored, x, atol=1e-6)


def test_protected_tokens_never_merge():
    # every token is identical, so protected tokens would be perfect partners if allowed
    x = torch.ones(1, 9, 4)
    x[0, :2] = torch.tensor([3.0, 1.0, 1.0, 1.0])
    merged, new_size, dest = ops.merge_tokens(x, torch.ones(1, 9), torch.ones(1, 9, 4), None, r=3, protected=2)
    assert dest[0, :2].tolist() == [0, 1]
    assert new_size[0, :2].tolist() == [1.0, 1.0]
    assert torch.equal(merged[0, :2], x[0, :2])
    assert all(min(group) >= 2 for group in merged_pairs(dest))


def test_padding_merges_with_padding_first_and_never_into_real_tokens():
    torch.manual_seed(2)
    x = torch.randn(2, 12, 6)
    size = torch.ones(2, 12)
    size[1, 6:] = 0.0  # sample 1: 6 real tokens, 6 padding
    merged, new_size, dest = ops.merge_tokens(x, size, x, None, r=3, protected=1, padding=True)
    real = size[1] > 0
    groups: dict[int, list[int]] = {}
    for old, new in enumerate(dest[1].tolist()):
        groups.setdefault(new, []).append(old)
    merged_groups = [g for g in groups.values() if len(g) > 1]
    assert sum(len(g) - 1 for g in merged_groups) == 3
    for group in merged_groups:
        assert not real[group].any(), f"padding group {group} mixed with real tokens"
    # the real tokens of sample 1 are untouched
    for old in range(6):
        assert torch.allclose(merged[1, dest[1, old]], x[1, old])
    assert new_size[1].sum() == 6.0


def test_padding_never_pollutes_real_tokens_when_forced():
    # 5 real tokens, 2 padding, r=3 forces merges beyond the single padding pair
    x = torch.randn(1, 8, 4)
    size = torch.tensor([[1.0, 1, 1, 1, 1, 1, 0, 0]])
    merged, new_size, dest = ops.merge_tokens(x, size, x, None, r=3, protected=1, padding=True)
    # every merged real token is the size-weighted mean of real tokens only
    for new in range(merged.shape[1]):
        members = [old for old in range(8) if dest[0, old] == new]
        weights = size[0, members]
        if weights.sum() > 0:
            expected = (x[0, members] * weights[:, None]).sum(0) / weights.sum()
            assert torch.allclose(merged[0, new], expected, atol=1e-6)
    assert new_size.sum() == 6.0


def hand_fusion_case():
    """1 protected token; A = tokens 1, 3, 5 and B = tokens 2, 4, 6, with (by construction)
    R = [1.0, 0.8, 0.5] and normalised semantic values I = [2.0, 0.5, 0.1] for the A tokens."""
    b0, b1, b2 = [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]
    a0, a1, a2 = b0, [0.6, 0.8], [-0.5, -math.sqrt(0.75)]
    metric = torch.tensor([[[0.3, 0.3], a0, b0, a1, b1, a2, b2]])
    n = 7
    semantic = torch.full((1, n), 0.1 / n)
    semantic[0, [1, 3, 5]] = torch.tensor([2.0, 0.5, 0.1]) / n
    x = torch.arange(n, dtype=torch.float32).reshape(1, n, 1)
    return x, metric, semantic


@pytest.mark.parametrize(
    "fusion, alpha, beta, gamma, block, use_semantic, source",
    [
        ("sub", 0.3, 1.0, 0.0, 0, False, 1),  # E = R = [1.0, 0.8, 0.5]
        ("sub", 0.3, 1.0, 0.0, 0, True, 3),  # E = [0.4, 0.65, 0.47]
        ("div", 0.0, 1.0, 0.0, 0, True, 5),  # E = [0.5, 1.6, 5.0]
        ("mul", 0.45, 1.0, 0.0, 0, True, 3),  # E = [0.1, 0.62, 0.4775]
        ("layer", 0.3, 0.5, 0.0, 0, True, 3),  # weight 0.5**0 * 0.3: as sub
        ("layer", 0.3, 0.5, 0.0, 3, True, 1),  # weight 0.5**3 * 0.3 = 0.0375: E = [0.925, 0.78, 0.50]
    ],
)
def test_fusion_strategies_choose_by_hand(fusion, alpha, beta, gamma, block, use_semantic, source):
    x, metric, semantic = hand_fusion_case()
    _, _, dest = ops.merge_tokens(
        x, torch.ones(1, 7), metric, semantic if use_semantic else None, r=1, protected=1,
        fusion=fusion, alpha=alpha, beta=beta, gamma=gamma, block=block,
    )
    assert merged_pairs(dest) == {(source, source + 1)}


def test_information_degree_formulas():
    r = torch.tensor([0.9, 0.5])
    i = torch.tensor([2.0, 0.25])
    assert torch.allclose(ops.information_degree(r, i, "sub", 0.1, 1, 0, 0), torch.tensor([0.7, 0.475]))
    assert torch.allclose(ops.information_degree(r, i, "div", 0.1, 1, 0, 0), torch.tensor([0.45, 2.0]))
    assert torch.allclose(ops.information_degree(r, i, "mul", 0.1, 1, 0, 0), torch.tensor([0.72, 0.4875]))
    assert torch.allclose(ops.information_degree(r, i, "layer", 0.1, 2.0, 1.0, 3), torch.tensor([0.9 - 0.8, 0.5 - 0.1]))
    assert ops.information_degree(r, None, "sub", 0.1, 1, 0, 0) is r


def test_key_bias_values():
    size = torch.tensor([[1.0, 2.0, 0.0, 5.0]])
    low = torch.finfo(torch.float32).min
    assert torch.equal(ops.key_bias(size, torch.float32, True)[0, 0, 0], torch.tensor([0.0, math.log(2.0), low, math.log(5.0)]))
    assert torch.equal(ops.key_bias(size, torch.float32, False)[0, 0, 0], torch.tensor([0.0, 0.0, low, 0.0]))
    assert ops.key_bias(size, torch.bfloat16, True).dtype == torch.bfloat16


def test_size_bias_equals_repeated_keys():
    # attention to a key of size s with +log s equals attention to s copies of it
    torch.manual_seed(3)
    q, k, v = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8)
    size = torch.tensor([[1.0, 3.0, 2.0]])
    biased = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=ops.key_bias(size, torch.float32, True))
    reps = torch.tensor([1, 3, 2])
    copies = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(reps, dim=2), v.repeat_interleave(reps, dim=2)
    )
    assert torch.allclose(biased, copies, atol=1e-6)


@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_cls_attention_is_the_first_row_of_full_attention(mask_kind):
    torch.manual_seed(4)
    q, k = torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8)
    mask = None
    full = q @ k.transpose(-1, -2) * 0.3
    if mask_kind == "bool":
        mask = torch.ones(2, 1, 6, 6, dtype=torch.bool)
        mask[1, :, :, 4:] = False
        full = full.masked_fill(~mask, float("-inf"))
    elif mask_kind == "float":
        mask = torch.zeros(2, 1, 1, 6)
        mask[0, ..., 2] = -1e9
        mask[1, ..., 3] = math.log(3.0)
        full = full + mask
    expected = full.softmax(-1)[:, :, 0, :].mean(1)
    assert torch.allclose(ops.cls_attention(q, k, 0.3, mask), expected, atol=1e-6)
    assert torch.allclose(ops.cls_attention_from_probs(full.softmax(-1)), expected, atol=1e-6)


def test_key_validity_reads_the_cls_row():
    bool_mask = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    bool_mask[1, ..., 3:] = False
    float_mask = torch.zeros(2, 1, 1, 5)
    float_mask[0, ..., 4] = torch.finfo(torch.float32).min
    float_mask[1, ..., 1] = -10000.0
    like = torch.empty(2, 5, 7)
    assert ops.key_validity(bool_mask, like).tolist() == [[True] * 5, [True, True, True, False, False]]
    assert ops.key_validity(float_mask, like).tolist() == [[True] * 4 + [False], [True, False, True, True, True]]


def test_causal_mask_is_refused_at_run_time():
    causal = torch.ones(4, 4, dtype=torch.bool).tril()[None, None]
    with pytest.raises(RuntimeError, match="varies by query"):
        ops.check_key_padding_mask(causal)
    with pytest.raises(RuntimeError, match="varies by query"):
        torch.ops.turbo_fx.check_key_padding_mask(torch.where(causal, 0.0, -1e9))
    padding = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    padding[1, ..., 3] = False
    first = ops.check_key_padding_mask(padding)
    assert first.shape == (2, 1, 1, 4) and torch.equal(first, padding[..., :1, :])
    assert first.data_ptr() != padding.data_ptr()  # an op's output never aliases its input
    like = torch.empty(2, 4, 8)
    assert torch.equal(ops.key_validity(first, like), ops.key_validity(padding, like))
    per_key = torch.zeros(2, 1, 1, 4)  # no query rows to compare: handed back as a copy
    assert torch.equal(ops.check_key_padding_mask(per_key), per_key)


def test_the_key_padding_check_has_a_shape_function():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        full = torch.empty(3, 1, 7, 7)
        assert torch.ops.turbo_fx.check_key_padding_mask(full).shape == (3, 1, 1, 7)
        assert torch.ops.turbo_fx.check_key_padding_mask(torch.empty(3, 1, 1, 7)).shape == (3, 1, 1, 7)


def test_restore_tokens_and_compose_assign():
    merged = torch.tensor([[[10.0], [20.0], [30.0]]])
    assign = torch.tensor([[0, 1, 1, 2, 2]])
    assert ops.restore_tokens(merged, assign, axis=1)[0, :, 0].tolist() == [10, 20, 20, 30, 30]
    maps = torch.arange(9.0).reshape(1, 1, 3, 3)  # an attention map with two token axes
    both = ops.restore_tokens(ops.restore_tokens(maps, assign, axis=2), assign, axis=3)
    assert both.shape == (1, 1, 5, 5)
    assert both[0, 0, 2, 4] == maps[0, 0, 1, 2]
    dest = torch.tensor([[0, 0, 1]])
    assert ops.compose_assign(assign, dest).tolist() == [[0, 0, 0, 1, 1]]


def test_merge_block_op_matches_plain_function_and_fake_shapes():
    torch.manual_seed(5)
    x, k, q = torch.randn(2, 9, 6), torch.randn(2, 3, 9, 4), torch.randn(2, 3, 9, 4)
    size, assign = torch.ones(2, 9), ops.initial_assign(x)
    args = (x, size, assign, k, -2, q, k, None, None, 0.5, 3, 1, "sub", 0.1, 1.0, 0.0, 0, False, True, torch.float32, False)
    plain = ops.merge_block(*args)
    opaque = torch.ops.turbo_fx.merge_block(*args)
    for a, b in zip(plain, opaque):
        assert torch.equal(a, b)
    assert [tuple(t.shape) for t in plain] == [(2, 6, 6), (2, 6), (2, 9), (2, 1, 1, 6)]
    torch.library.opcheck(torch.ops.turbo_fx.merge_block.default, args)


def test_symbolic_token_count_is_unbacked_in_the_shape_function():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    mode = FakeTensorMode(shape_env=ShapeEnv())
    with mode:
        x, k = torch.empty(2, 9, 6), torch.empty(2, 3, 9, 4)
        args = (x, torch.empty(2, 9), torch.empty(2, 9, dtype=torch.long), k, -2, None, None, None, None, None,
                3, 1, "sub", 0.1, 1.0, 0.0, 0, False, True, torch.float32)
        static = torch.ops.turbo_fx.merge_block(*args, False)
        symbolic = torch.ops.turbo_fx.merge_block(*args, True)
    assert static[0].shape[1] == 6
    tokens = symbolic[0].shape[1]
    assert isinstance(tokens, torch.SymInt) and tokens.node.hint is None
    assert symbolic[1].shape[1].node.expr == tokens.node.expr == symbolic[3].shape[-1].node.expr
