"""Runtime token-merging ops: plain torch functions that the passes call from the graph.

They are ordinary torch code with static Python ints for every count, so Dynamo's
graph stays traceable and Inductor traces through them and fuses them like any
other op. Shapes use ``B`` (batch), ``H`` (heads), ``N`` (tokens), ``C`` (channels).

Token bookkeeping
-----------------
``size`` [B, N] float32: how many original tokens each current token stands for.
Padding tokens have size 0: a size-weighted average then ignores them, and the
attention bias ``log(size)`` masks them, so one tensor carries both facts.
``dest`` [B, N] int64: where each token of the previous sequence went.
``assign`` [B, N0] int64: where each original token is now (composition of dests).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import Tensor

# A pair of padding tokens is the best merge there is (nothing is lost); a pair
# across padding and real tokens is the worst. Finite, so no inf - inf NaNs.
PAD_PAIR_SCORE = 1.0e4
# An additive mask value at or below this excludes a key: exp(-1000) is 0 in any float dtype.
MASKED_BELOW = -1000.0
# A salient token (keep_salient) as a destination scores below any real or padding pair, and
# as a source ranks below every other token; finite, for the same reason as above.
SALIENT_PAIR_SCORE = -2.0e4
SALIENT_DEGREE = -1.0e9


def merge_count(n_tokens: int, protected: int, r: int, min_tokens: int, reserved: int = 0) -> int:
    """How many tokens one block can actually merge: r clamped to the bipartite
    limit (half the unprotected tokens, less ``reserved`` salient tokens that may not
    merge) and to the ``min_tokens`` floor."""
    mergeable = max(0, (n_tokens - protected) // 2 - reserved)
    floor_room = max(0, n_tokens - min_tokens)
    return max(0, min(r, mergeable, floor_room))


def head_mean(t: Tensor, token_axis: int = -2) -> Tensor:
    """Average a per-head tensor over heads (dim 1) into a [B, N, D] metric."""
    m = t.mean(dim=1)
    if token_axis in (-1, t.dim() - 1):
        m = m.transpose(-1, -2)
    return m


def key_validity(mask: Tensor, like: Tensor) -> Tensor:
    """Which keys an attention mask lets the first (CLS) query see, as [B, N] bool
    (B and N taken from ``like``, the [B, N, C] token sequence)."""
    m = mask
    while m.dim() > 2:
        m = m[:, 0] if m.dim() > 3 else m[:, 0, :]
    if m.dim() == 1:
        m = m.unsqueeze(0)
    valid = m if m.dtype == torch.bool else m > MASKED_BELOW
    return valid.expand(like.shape[0], like.shape[1])


def check_key_padding_mask(mask: Tensor) -> Tensor:
    """Fail loudly at run time if a mask differs between query rows (causal, banded):
    merging rewrites masks as per-key padding masks, which would be wrong for those."""
    if mask.dim() >= 2 and mask.size(-2) > 1:
        same = (mask == mask[..., :1, :]).all()
        torch._assert_async(same, "turbo_fx: the attention mask varies by query; token merging needs a key-padding mask")
    return mask


def initial_sizes(x: Tensor, valid: Tensor | None = None) -> Tensor:
    """Sizes before any merge: 1 for every real token, 0 for padding."""
    if valid is None:
        return torch.ones(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    return valid.to(torch.float32)


def initial_assign(x: Tensor) -> Tensor:
    """Each original token is where it started."""
    return torch.arange(x.shape[1], device=x.device).unsqueeze(0).expand(x.shape[0], -1)


def key_bias(size: Tensor, dtype: torch.dtype, prop_attn: bool) -> Tensor:
    """Additive attention bias [B, 1, 1, N]: log(size) (proportional attention) or 0,
    and the dtype's lowest value for size-0 (padding) keys."""
    if prop_attn:
        value = size.clamp_min(1.0).log()
    else:
        value = torch.zeros_like(size)
    bias = torch.where(size > 0, value, torch.finfo(dtype).min)
    return bias.to(dtype)[:, None, None, :]


def add_bias(logits: Tensor, bias: Tensor) -> Tensor:
    """Logits plus a [B, 1, 1, N] bias (explicit attention)."""
    return logits + bias.to(logits.dtype)


def cls_attention(q: Tensor, k: Tensor, scale: float | None, mask: Tensor | None) -> Tensor:
    """Semantic value: the first (CLS) query's attention over all keys, averaged over
    heads, [B, N]. One row of softmax(q k^T * scale + mask), so models on fused
    attention (SDPA), which never materialise probabilities, still get it."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    logits = torch.matmul(q[:, :, :1, :], k.transpose(-1, -2)).float() * scale
    if mask is not None:
        row = mask[..., :1, :] if mask.dim() >= 2 else mask
        if row.dtype == torch.bool:
            logits = logits.masked_fill(~row, float("-inf"))
        else:
            logits = logits + row.float()
    return logits.softmax(dim=-1).mean(dim=1)[:, 0]


def cls_attention_from_probs(probs: Tensor) -> Tensor:
    """Semantic value from materialised attention probabilities [B, H, N, N]."""
    return probs[:, :, 0, :].float().mean(dim=1)


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

    Returns (merged x [B, N-r, C], merged size [B, N-r], dest [B, N]).
    """
    batch, n_tokens, channels = x.shape
    if r <= 0:
        return x, size, initial_assign(x)
    unit = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a, b = unit[:, protected::2], unit[:, protected + 1 :: 2]
    scores = a @ b.transpose(-1, -2)
    if padding:
        valid_a = size[:, protected::2] > 0
        valid_b = size[:, protected + 1 :: 2] > 0
        both_pad = (~valid_a)[:, :, None] & (~valid_b)[:, None, :]
        crossing = valid_a[:, :, None] ^ valid_b[:, None, :]
        scores = torch.where(both_pad, PAD_PAIR_SCORE, torch.where(crossing, -PAD_PAIR_SCORE, scores))
    salient = None
    if keep_salient > 0 and semantic is not None:
        salient = _most_salient(semantic, protected, keep_salient)
        scores = scores.masked_fill(salient[:, None, protected + 1 :: 2], SALIENT_PAIR_SCORE)
    redundancy, match = scores.max(dim=-1)

    normalised = None
    if semantic is not None:
        if padding:
            n_valid = (size > 0).sum(dim=-1, keepdim=True).to(torch.float32)
        else:
            n_valid = float(n_tokens)
        normalised = (semantic.float() * n_valid)[:, protected::2]
    if use_redundancy:
        degree = information_degree(redundancy, normalised, fusion, alpha, beta, gamma, block)
    elif normalised is None:
        raise ValueError("merge_tokens: semantic-only ranking needs the semantic value")
    else:
        degree = -normalised
    if salient is not None:
        degree = degree.masked_fill(salient[:, protected::2], SALIENT_DEGREE)

    chosen = degree.topk(r, dim=-1).indices
    src_tok = protected + 2 * chosen
    dst_tok = protected + 1 + 2 * match.gather(1, chosen)
    kept = torch.ones(batch, n_tokens, dtype=torch.bool, device=x.device).scatter(1, src_tok, False)
    position = kept.cumsum(dim=1) - 1
    dst_new = position.gather(1, dst_tok)
    dest = position.scatter(1, src_tok, dst_new)
    kept_index = _kept_index(kept, position, n_tokens - r)

    # Survivors are gathered once; only the r destination rows are then corrected:
    # (s_d x_d + sum_i s_i x_i) / S_d = x_d + sum_i s_i (x_i - x_d) / S_d, with S_d the merged size.
    weight = size.to(torch.float32)
    src_weight = weight.gather(1, src_tok)
    new_size = weight.gather(1, kept_index).scatter_add(1, dst_new, src_weight)
    coef = src_weight / new_size.gather(1, dst_new).clamp_min(1e-6)
    # Row selection by advanced indexing: on CPU it is several times faster than gather.
    sample = torch.arange(batch, device=x.device)[:, None]
    delta = (x[sample, src_tok].float() - x[sample, dst_tok].float()) * coef[:, :, None]
    merged = x[sample, kept_index].index_put((sample.expand_as(dst_new), dst_new), delta.to(x.dtype), accumulate=True)
    return merged, new_size, dest


def _most_salient(semantic: Tensor, protected: int, k: int) -> Tensor:
    """[B, N] bool: the k unprotected tokens with the highest semantic value."""
    value = semantic.float().clone()
    value[:, :protected] = float("-inf")
    top = value.topk(min(k, value.shape[1] - protected), dim=-1).indices
    return torch.zeros_like(value, dtype=torch.bool).scatter(1, top, True)


def _kept_index(kept: Tensor, position: Tensor, n_kept: int) -> Tensor:
    """For each new slot, the old index of the token that survives there: the kept
    tokens scattered to their positions, the merged-away ones to a discarded extra slot."""
    slot = torch.where(kept, position, n_kept)
    order = torch.arange(kept.shape[1], device=kept.device).expand_as(position)
    return torch.zeros(kept.shape[0], n_kept + 1, dtype=torch.long, device=kept.device).scatter(1, slot, order)[:, :n_kept]


def compose_assign(assign: Tensor, dest: Tensor) -> Tensor:
    """Where each original token is after one more merge."""
    return dest.gather(1, assign)


def restore_tokens(y: Tensor, assign: Tensor, axis: int) -> Tensor:
    """Give a token-axis tensor back its original token count: each original token
    takes the value of the merged token it went into. Axis 0 must be the batch."""
    moved = y.movedim(axis, 1)
    index = assign.reshape(assign.shape + (1,) * (moved.dim() - 2)).expand(
        (assign.shape[0], assign.shape[1]) + tuple(moved.shape[2:])
    )
    return moved.gather(1, index).movedim(1, axis)


def merge_block(
    x: Tensor,
    size: Tensor,
    assign: Tensor,
    metric_source: Tensor,
    metric_token_axis: int,
    semantic_q: Tensor | None,
    semantic_k: Tensor | None,
    semantic_mask: Tensor | None,
    semantic_probs: Tensor | None,
    scale: float | None,
    r: int,
    protected: int,
    fusion: str,
    alpha: float,
    beta: float,
    gamma: float,
    block: int,
    padding: bool,
    prop_attn: bool,
    bias_dtype: torch.dtype,
    symbolic_tokens: bool = False,
    use_redundancy: bool = True,
    keep_salient: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Everything one attention block's merge needs, in one call: the metric (per-head
    features averaged over heads), the semantic value (from the CLS query row, or from
    materialised probabilities; none when both are None), the merge itself, the new
    assign map and the key bias the next attention blocks use.

    Returns (merged x, merged size, new assign, key bias [B, 1, 1, N-r]).
    ``symbolic_tokens`` only matters to the opaque op's shape function."""
    metric = head_mean(metric_source, metric_token_axis)
    if semantic_probs is not None:
        semantic = cls_attention_from_probs(semantic_probs)
    elif semantic_q is not None:
        semantic = cls_attention(semantic_q, semantic_k, scale, semantic_mask)
    else:
        semantic = None
    merged, new_size, dest = merge_tokens(
        x, size, metric, semantic, r, protected, fusion, alpha, beta, gamma, block, padding, use_redundancy,
        keep_salient,
    )
    new_assign = compose_assign(assign, dest)
    if _MERGE_RECORDERS and not _is_fake(new_assign):
        _MERGE_RECORDERS[-1].append(
            MergeRecord(block, x.shape[1], merged.shape[1], new_assign.detach().cpu(), new_size.detach().cpu())
        )
    return merged, new_size, new_assign, key_bias(new_size, bias_dtype, prop_attn)


@dataclass(frozen=True)
class MergeRecord:
    """One executed merge, as ``record_merges`` collects it: the attention block that
    merged, tokens before and after, where every original token went ([B, N0]) and
    the merged tokens' sizes ([B, N])."""

    block: int
    tokens_in: int
    tokens_out: int
    assign: Tensor
    size: Tensor


_MERGE_RECORDERS: list[list[MergeRecord]] = []


@contextlib.contextmanager
def record_merges() -> Iterator[list[MergeRecord]]:
    """Collect a ``MergeRecord`` for every merge that runs inside the block, eager or
    compiled (the opaque merge op runs this Python code under Inductor too; with
    ``fuse_merges=True`` Inductor generates the merge itself and nothing is recorded)."""
    records: list[MergeRecord] = []
    _MERGE_RECORDERS.append(records)
    try:
        yield records
    finally:
        _MERGE_RECORDERS.remove(records)


def _is_fake(t: Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor) or t.device.type == "meta"


# ``merge_block`` as one opaque op: Inductor calls it instead of generating kernels for
# it. With ``symbolic_tokens`` its shape function reports the merged token count as an
# unbacked size, so the blocks after it, which differ only in token count, get
# shape-generic kernels that Inductor compiles once instead of once per block.
merge_block_op = torch.library.custom_op("turbo_fx::merge_block", merge_block, mutates_args=())


@merge_block_op.register_fake
def _merge_block_fake(x, size, assign, metric_source, metric_token_axis, semantic_q, semantic_k,
                      semantic_mask, semantic_probs, scale, r, protected, fusion, alpha, beta, gamma,
                      block, padding, prop_attn, bias_dtype, symbolic_tokens=False, use_redundancy=True,
                      keep_salient=0):
    batch, n_tokens, channels = x.shape
    kept = n_tokens - r
    if symbolic_tokens:
        kept = torch.library.get_ctx().new_dynamic_size(min=2)
    return (
        x.new_empty(batch, kept, channels),
        x.new_empty(batch, kept, dtype=torch.float32),
        assign.new_empty(assign.shape),
        x.new_empty(batch, 1, 1, kept, dtype=bias_dtype),
    )



def weighted_token_sum(y: Tensor, size: Tensor, offset: int, keepdim: bool = False) -> Tensor:
    """Sum over the token axis of y [B, n, C], each token counted ``size`` times
    (``size[:, offset:]`` describes y's tokens)."""
    weight = size[:, offset:].to(y.dtype)
    return (y * weight[:, :, None]).sum(dim=1, keepdim=keepdim)


def weighted_token_mean(y: Tensor, size: Tensor, offset: int, keepdim: bool = False) -> Tensor:
    """Mean over the token axis of y [B, n, C] as the unmerged tokens would give it: each
    merged token counts as the ``size`` original tokens it stands for."""
    total = size[:, offset:].to(y.dtype).sum(dim=1).clamp_min(1e-6)
    total = total[:, None, None] if keepdim else total[:, None]
    return weighted_token_sum(y, size, offset, keepdim) / total
