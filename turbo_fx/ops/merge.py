"""The merge itself: informativity-driven bipartite matching and the token bookkeeping.

``size`` [B, N] float32: how many original tokens each current token stands for. Padding
tokens have size 0: a size-weighted average then ignores them, and the attention bias
``log(size)`` masks them, so one tensor carries both facts.
``dest`` [B, N] int64: where each token of the previous sequence went.
``assign`` [B, N0] int64: where each original token is now (composition of dests).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


# A pair of padding tokens is the best merge there is (nothing is lost); a pair
# across padding and real tokens is the worst. Finite, so no inf - inf NaNs.
PAD_PAIR_SCORE = 1.0e4
# A salient token (keep_salient) as a destination scores below any real or padding pair, and
# as a source ranks below every other token; finite, for the same reason as above.
SALIENT_PAIR_SCORE = -2.0e4
SALIENT_DEGREE = -1.0e9


def merge_count(n_tokens: int, protected: int, r: int, min_tokens: int, reserved: int = 0, tail: int = 0) -> int:
    """How many tokens one block can actually merge: r clamped to the bipartite
    limit (half the unprotected tokens, less ``reserved`` salient tokens that may not
    merge) and to the ``min_tokens`` floor. ``tail``: protected tokens at the end."""
    mergeable = max(0, (n_tokens - protected - tail) // 2 - reserved)
    floor_room = max(0, n_tokens - min_tokens)
    return max(0, min(r, mergeable, floor_room))


def head_mean(t: Tensor, token_axis: int = -2) -> Tensor:
    """Average a per-head tensor over heads (dim 1) into a [B, N, D] metric."""
    m = t.mean(dim=1)
    if token_axis in (-1, t.dim() - 1):
        m = m.transpose(-1, -2)
    return m


def initial_sizes(x: Tensor, valid: Tensor | None = None) -> Tensor:
    """Sizes before any merge: 1 for every real token, 0 for padding."""
    if valid is None:
        return torch.ones(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    return valid.to(torch.float32)


def initial_assign(x: Tensor) -> Tensor:
    """Each original token is where it started."""
    # Materialised, not an expand: every later assign is contiguous, and one layout for all
    # blocks lets one compiled merge step serve them all.
    return torch.arange(x.shape[1], device=x.device).unsqueeze(0).repeat(x.shape[0], 1)


def unit_rows(metric: Tensor) -> Tensor:
    """``metric`` [B, N, D] with every row scaled to unit length, in float32: their products
    are the cosine similarities the merge ranks. An all-zero row stays zero (similarity 0 to
    every token).

    Why float32: the norm's floor 1e-12 is 0 in float16, where a zero row would become 0/0 =
    NaN, and a NaN similarity wins every ``max`` and ``topk`` (a zero destination row would
    draw every merge). Half-precision scores would also round near-equal similarities to
    ties that float32 tells apart. The scores this feeds, [B, N/2, N/2], are a small fraction
    of the block's own attention logits, [B, H, N, N]. float64 stays float64."""
    metric = metric.to(torch.promote_types(metric.dtype, torch.float32))
    return metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def information_degree(
    redundancy: Tensor,
    semantic: Tensor | None,
    fusion: str,
    alpha: float,
    beta: float,
    gamma: float,
    block: int,
) -> Tensor:
    """E from R and the normalised semantic value I (None: redundancy only)."""
    if semantic is None:
        return redundancy
    if fusion == "sub":
        return redundancy - alpha * semantic
    if fusion == "div":
        return redundancy / semantic.clamp_min(1e-6)
    if fusion == "mul":
        return redundancy * (1.0 - alpha * semantic)
    if fusion == "layer":
        return redundancy - (beta ** abs(gamma - block)) * alpha * semantic
    raise ValueError(f"unknown fusion {fusion!r}")


def merge_tokens(
    x: Tensor,
    size: Tensor,
    metric: Tensor,
    semantic: Tensor | None,
    r: int,
    protected: int,
    fusion: str = "sub",
    alpha: float = 0.0,
    beta: float = 1.0,
    gamma: float = 0.0,
    block: int = 0,
    padding: bool = False,
    use_redundancy: bool = True,
    keep_salient: int = 0,
    tail: int = 0,
    traced: bool = False,
    kept_rows: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Merge ``r`` tokens of x [B, N, C] by informativity-driven bipartite matching.

    The first ``protected`` tokens never merge. The rest split alternately into A
    (even offsets) and B (odd offsets); each A token's redundancy R is its best
    cosine similarity to a B token; the r A tokens with the highest information
    degree E merge into their best B partner by size-weighted average. Tokens keep
    their original relative order. ``r`` must already be clamped (``merge_count``).
    Without ``use_redundancy`` (semantic-only ranking) E = -I: the A tokens the CLS
    token attends to least merge, still into their most similar B partner.
    ``keep_salient``: the k unprotected tokens with the highest semantic value neither
    merge nor receive merges (attention sinks such as BERT's [SEP] keep their identity).
    ``tail``: the last ``tail`` tokens never merge either (YOLOS's detection tokens).
    ``traced``: the code will be traced and compiled (``fuse_merges``): kept positions are
    counted by a comparison the compiler fuses instead of a ``cumsum`` library call.
    ``kept_rows``: applied to the [B, N-r] index of surviving tokens before anything is
    gathered with it; every merged output takes its token count from that index.

    Returns (merged x [B, N-r, C], merged size [B, N-r], dest [B, N]).
    """
    batch, n_tokens, channels = x.shape
    if r <= 0:
        return x, size, initial_assign(x)
    end = n_tokens - tail
    unit = unit_rows(metric)
    a, b = unit[:, protected:end:2], unit[:, protected + 1 : end : 2]
    if traced:
        # Dense copies: the matmul of stride-2 slices checks whether they can be viewed
        # flat, a guard on the token count's parity that would compile the step twice.
        a, b = a.contiguous(), b.contiguous()
    scores = a @ b.transpose(-1, -2)
    if padding:
        valid_a = size[:, protected:end:2] > 0
        valid_b = size[:, protected + 1 : end : 2] > 0
        both_pad = (~valid_a)[:, :, None] & (~valid_b)[:, None, :]
        crossing = valid_a[:, :, None] ^ valid_b[:, None, :]
        scores = torch.where(both_pad, PAD_PAIR_SCORE, torch.where(crossing, -PAD_PAIR_SCORE, scores))
    salient = None
    if keep_salient > 0 and semantic is not None:
        salient = _most_salient(semantic, protected, keep_salient, tail)
        scores = scores.masked_fill(salient[:, None, protected + 1 : end : 2], SALIENT_PAIR_SCORE)
    redundancy, match = scores.max(dim=-1)

    normalised = None
    if semantic is not None:
        if padding:
            n_valid = (size > 0).sum(dim=-1, keepdim=True).to(torch.float32)
        else:
            n_valid = n_tokens  # not float(): under a symbolic token count that would specialise it
        normalised = (semantic.float() * n_valid)[:, protected:end:2]
    if use_redundancy:
        degree = information_degree(redundancy, normalised, fusion, alpha, beta, gamma, block)
    elif normalised is None:
        raise ValueError("merge_tokens: semantic-only ranking needs the semantic value")
    else:
        degree = -normalised
    if salient is not None:
        degree = degree.masked_fill(salient[:, protected:end:2], SALIENT_DEGREE)

    chosen = degree.topk(r, dim=-1).indices
    src_tok = protected + 2 * chosen
    dst_tok = protected + 1 + 2 * match.gather(1, chosen)
    kept = torch.ones(batch, n_tokens, dtype=torch.bool, device=x.device).scatter(1, src_tok, False)
    position = _kept_positions(src_tok, n_tokens) if traced else kept.cumsum(dim=1) - 1
    dst_new = position.gather(1, dst_tok)
    dest = position.scatter(1, src_tok, dst_new)
    kept_index = _kept_index(kept, position, n_tokens - r)
    if kept_rows is not None:
        kept_index = kept_rows(kept_index)

    # Survivors are gathered once; only the r destination rows are then corrected:
    # (s_d x_d + sum_i s_i x_i) / S_d = x_d + sum_i s_i (x_i - x_d) / S_d, with S_d the merged size.
    weight = size.to(torch.float32)
    src_weight = weight.gather(1, src_tok)
    sample = torch.arange(batch, device=x.device)[:, None]
    dst_rows = (sample.expand_as(dst_new), dst_new)
    # index_put, not scatter_add: Inductor generates a kernel for an accumulating index_put,
    # where on CPU with more than one thread it leaves scatter_add to an ATen call
    # (torch._inductor.utils.use_scatter_fallback, config.cpp.fallback_scatter_reduce_sum).
    new_size = weight.gather(1, kept_index).index_put(dst_rows, src_weight, accumulate=True)
    coef = src_weight / new_size.gather(1, dst_new).clamp_min(1e-6)
    # Row selection by advanced indexing: on CPU it is several times faster than gather.
    delta = (x[sample, src_tok].float() - x[sample, dst_tok].float()) * coef[:, :, None]
    merged = x[sample, kept_index].index_put(dst_rows, delta.to(x.dtype), accumulate=True)
    return merged, new_size, dest


def _most_salient(semantic: Tensor, protected: int, k: int, tail: int = 0) -> Tensor:
    """[B, N] bool: the k unprotected tokens with the highest semantic value."""
    value = semantic.float().clone()
    value[:, :protected] = float("-inf")
    if tail:
        value[:, value.shape[1] - tail:] = float("-inf")
    top = value.topk(min(k, value.shape[1] - protected - tail), dim=-1).indices
    return torch.zeros_like(value, dtype=torch.bool).scatter(1, top, True)


def _kept_positions(src_tok: Tensor, n_tokens: int) -> Tensor:
    """[B, N]: each token's index among the kept tokens (its own index less the merged-away
    tokens before it); meaningful for kept tokens only. A [B, N, r] comparison that Inductor
    reduces in one kernel, where a cumsum over the kept mask is a library call."""
    index = torch.arange(n_tokens, device=src_tok.device)
    removed_before = (src_tok[:, None, :] < index[None, :, None]).sum(dim=-1)
    return index[None, :] - removed_before


def _kept_index(kept: Tensor, position: Tensor, n_kept: int) -> Tensor:
    """For each new slot, the old index of the token that survives there: the kept
    tokens scattered to their positions, the merged-away ones to a discarded extra slot."""
    slot = torch.where(kept, position, n_kept)
    order = torch.arange(kept.shape[1], device=kept.device).expand_as(position)
    return torch.zeros(kept.shape[0], n_kept + 1, dtype=torch.long, device=kept.device).scatter(1, slot, order)[:, :n_kept]


def compose_assign(assign: Tensor, dest: Tensor) -> Tensor:
    """Where each original token is after one more merge."""
    return dest.gather(1, assign)
