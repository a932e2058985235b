"""What merging needs from attention that reaches the graph as one call with a packed
in-projection (``F.multi_head_attention_forward``, behind ``nn.MultiheadAttention``,
``nn.TransformerEncoderLayer``, torchvision's ViT and OpenAI CLIP): the keys' (or queries')
head mean and the CLS query's attention row, computed from the call's inputs, because the
projected keys never appear in the graph.

Tokens arrive as the call sees them, ``[N, B, C]`` (``batch_first`` modules transpose before
the call). The packed weight ``[3C, C]`` holds the q, k and v projections in that order.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _projection(weight: Tensor, bias: Optional[Tensor], which: int, channels: int):
    rows = slice(which * channels, (which + 1) * channels)
    return weight[rows], (bias[rows] if bias is not None else None)


def packed_head_mean(tokens: Tensor, in_proj_weight: Tensor, in_proj_bias: Optional[Tensor],
                     num_heads: int, which: int) -> Tensor:
    """The q (``which=0``) or k (``which=1``) projection averaged over heads, ``[B, 1, N, D]``.

    Averaging over heads is linear, so it is one projection with the head-averaged weight:
    N·C·D multiply-adds instead of the N·C·C of projecting every head."""
    channels = tokens.shape[-1]
    head_dim = channels // num_heads
    weight, bias = _projection(in_proj_weight, in_proj_bias, which, channels)
    weight = weight.reshape(num_heads, head_dim, channels).mean(dim=0)
    if bias is not None:
        bias = bias.reshape(num_heads, head_dim).mean(dim=0)
    return F.linear(tokens.transpose(0, 1), weight, bias)[:, None]


def packed_cls_probs(tokens: Tensor, in_proj_weight: Tensor, in_proj_bias: Optional[Tensor],
                     num_heads: int, key_bias: Optional[Tensor] = None) -> Tensor:
    """The first (CLS) query's attention over all keys, per head, ``[B, H, 1, N]``.

    ``q_h · (W_k,h x_j + b_k,h) = (W_k,h^T q_h) · x_j + q_h · b_k,h``: folding the CLS query
    into the key weight gives the row for B·H·N·C multiply-adds, without the keys.
    ``key_bias``: the additive per-key bias the attention call itself gets ([B, N])."""
    x = tokens.transpose(0, 1)  # [B, N, C]
    batch, _, channels = x.shape
    head_dim = channels // num_heads
    w_q, b_q = _projection(in_proj_weight, in_proj_bias, 0, channels)
    w_k, b_k = _projection(in_proj_weight, in_proj_bias, 1, channels)
    q_cls = F.linear(x[:, 0], w_q, b_q).reshape(batch, num_heads, head_dim).float()
    folded = torch.einsum("bhd,hdc->bhc", q_cls, w_k.reshape(num_heads, head_dim, channels).float())
    logits = torch.einsum("bhc,bnc->bhn", folded, x.float())
    if b_k is not None:
        logits = logits + (q_cls * b_k.reshape(num_heads, head_dim).float()).sum(dim=-1, keepdim=True)
    logits = logits / head_dim ** 0.5
    if key_bias is not None:
        logits = logits + key_bias.float()[:, None, :]
    return logits.softmax(dim=-1)[:, :, None, :]


def key_padding_bias(bias: Tensor) -> Tensor:
    """The ``[B, 1, 1, N]`` key bias as the ``[B, N]`` float ``key_padding_mask`` that the
    packed attention call adds to its logits."""
    return bias[:, 0, 0, :]
