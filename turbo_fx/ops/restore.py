"""Restoring the original token count: each original token takes its merged token's value."""
from __future__ import annotations

from torch import Tensor


def restore_tokens(y: Tensor, assign: Tensor, axis: int) -> Tensor:
    """Give a token-axis tensor back its original token count: each original token
    takes the value of the merged token it went into. Axis 0 must be the batch."""
    moved = y.movedim(axis, 1)
    index = assign.reshape(assign.shape + (1,) * (moved.dim() - 2)).expand(
        (assign.shape[0], assign.shape[1]) + tuple(moved.shape[2:])
    )
    return moved.gather(1, index).movedim(1, axis)
