"""Semantic value: how much the CLS (first) query attends to each token, [B, N]."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def cls_attention(q: Tensor, k: Tensor, scale: float | None, mask: Tensor | None) -> Tensor:
    """Semantic value: the first (CLS) query's attention over all keys, averaged over
    heads, [B, N]. One row of softmax(q k^T * scale + mask), so models on fused
    attention (SDPA), which never materialise probabilities, still get it."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    logits = _cls_logits(q[:, :, :1, :], k, scale)
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


def _cls_logits(row: Tensor, k: Tensor, scale: float) -> Tensor:
    """The CLS row's scaled logits [B, H, 1, N] in float32.

    float16 tops out at 65504: there the product q . k can overflow to inf (and the softmax
    give NaN), and logits past 8192 round to steps of 8, where fused attention keeps its
    logits in float32; so float16 rows and keys are multiplied in float32. bfloat16 has
    float32's range and multiplies in its own dtype (no float32 copy of the keys); every
    dtype keeps the reference's order, product then scale."""
    if row.dtype == torch.float16:
        row, k = row.float(), k.float()
    return torch.matmul(row, k.transpose(-1, -2)).float() * scale
