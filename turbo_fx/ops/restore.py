"""Restoring the original token count: each original token takes its merged token's value."""
from __future__ import annotations

import torch
from torch import Tensor


def restore_tokens(y: Tensor, assign: Tensor, axis: int) -> Tensor:
    """Give a token-axis tensor back its original token count: each original token
    takes the value of the merged token it went into. Axis 0 must be the batch."""
    moved = y.movedim(axis, 1)
    index = assign.reshape(assign.shape + (1,) * (moved.dim() - 2)).expand(
        (assign.shape[0], assign.shape[1]) + tuple(moved.shape[2:])
    )
    return moved.gather(1, index).movedim(1, axis)


def merge_token_constant(constant: Tensor, assign: Tensor, like: Tensor) -> Tensor:
    """A per-token constant [1 or B, N0, C] (YOLOS's mid-position embeddings) for the merged
    tokens of ``like`` [B, N, C]: each merged token gets the mean over the original tokens
    it stands for, so adding it to a merged token equals merging the tokens after the add."""
    batch, n_tokens = like.shape[0], like.shape[-2]
    rows = constant.expand(batch, -1, -1).to(torch.float32)
    index = assign.unsqueeze(-1).expand(-1, -1, rows.shape[-1])
    sums = rows.new_zeros(batch, n_tokens, rows.shape[-1]).scatter_add(1, index, rows)
    counts = rows.new_zeros(batch, n_tokens).scatter_add(1, assign, rows.new_ones(assign.shape))
    return (sums / counts.clamp_min(1.0).unsqueeze(-1)).to(constant.dtype)
