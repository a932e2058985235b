"""Size-weighted reductions over the token axis: each merged token counts as the tokens it
stands for, so means and sums inside the model see what the unmerged tokens would give.

Half-precision tokens are summed in float32 and the result returned in their dtype, as
torch's own ``sum`` and ``mean`` accumulate: a float16 sum of size-weighted tokens rounded
before the division would overflow to inf where the unmerged mean is finite."""
from __future__ import annotations

import torch
from torch import Tensor

_HALF = (torch.float16, torch.bfloat16)


def weighted_token_sum(y: Tensor, size: Tensor, offset: int, keepdim: bool = False) -> Tensor:
    """Sum over the token axis of y [B, n, C], each token counted ``size`` times
    (``size[:, offset:]`` describes y's tokens)."""
    return _weighted_sum(y, size, offset, keepdim).to(y.dtype)


def weighted_token_mean(y: Tensor, size: Tensor, offset: int, keepdim: bool = False) -> Tensor:
    """Mean over the token axis of y [B, n, C] as the unmerged tokens would give it: each
    merged token counts as the ``size`` original tokens it stands for."""
    total = size[:, offset:].to(_accumulation_dtype(y.dtype)).sum(dim=1).clamp_min(1e-6)
    total = total[:, None, None] if keepdim else total[:, None]
    return (_weighted_sum(y, size, offset, keepdim) / total).to(y.dtype)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _HALF else dtype


def _weighted_sum(y: Tensor, size: Tensor, offset: int, keepdim: bool) -> Tensor:
    """The size-weighted token sum in the accumulation dtype (float32 for half precision)."""
    dtype = _accumulation_dtype(y.dtype)
    weight = size[:, offset:].to(dtype)
    return (y.to(dtype) * weight[:, :, None]).sum(dim=1, keepdim=keepdim)
