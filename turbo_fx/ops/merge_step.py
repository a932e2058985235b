"""One attention block's whole merge step as one call, and as the opaque op
``torch.ops.turbo_fx.merge_block`` that the graph calls; ``record_merges`` collects what it did."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from .attention_bias import key_bias
from .merge import compose_assign, head_mean, merge_tokens
from .semantic import cls_attention, cls_attention_from_probs


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
    protected_tail: int = 0,
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
        keep_salient, protected_tail,
    )
    if r <= 0:
        # merge_tokens hands its inputs back when nothing merges; an op's outputs must not
        # alias its inputs (functionalization and CUDA-graph memory pools rely on that).
        merged, new_size = merged.clone(), new_size.clone()
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
                      keep_salient=0, protected_tail=0):
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
