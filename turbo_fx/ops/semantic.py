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
