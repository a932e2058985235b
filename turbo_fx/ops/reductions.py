"""Size-weighted reductions over the token axis: each merged token counts as the tokens it
stands for, so means and sums inside the model see what the unmerged tokens would give."""
from __future__ import annotations

from torch import Tensor


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
