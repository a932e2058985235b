"""Merge-and-restore for generation models, whose every token comes back (latents, pixels).

A component (self-attention, cross-attention, feed-forward) of a block whose tokens return to
a spatial grid runs on merged tokens, and its output is restored to every original token
(the paper's inverse sampling, ``restore_tokens``). The merge of one block is a *plan*:

- ``assign`` [B, N] int64: the merged token each original token goes into;
- ``size`` [B, M] float32: how many original tokens each merged token stands for.

Destinations are one token per ``sx`` x ``sy`` cell of the grid, so merges spread over the
whole image instead of collapsing one region; every other token is a source. The ``r``
sources with the highest information degree (cosine similarity to their best destination,
less ``alpha`` times their semantic value) merge into that destination. Merged tokens are
laid out as [destinations | kept sources]. Every count is a Python int fixed by the grid and
the ratio, so all shapes are static and nothing waits on the host. The destinations and
sources themselves are constants, built once when the graph is rewritten.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

_MASK31 = 0x7FFFFFFF


def cell_offsets(cells: Tensor, cell_size: int, seed: int) -> Tensor:
    """A pseudo-random offset in [0, cell_size) for every cell id, fixed by ``seed``.

    An integer hash (multiply, xor-shift) rather than a random generator: it is the same on
    every device and inside any compiled graph, and needs no generator state. Values are kept
    below 2**31 before each multiply so that int64 never overflows."""
    h = (cells * 2654435761 + (seed + 1) * 40503) & _MASK31
    h = h ^ (h >> 15)
    h = (h * 1274126177) & _MASK31
    h = h ^ (h >> 13)
    return h % cell_size


def cell_shape(height: int, sx: int, sy: int) -> tuple[int, int]:
    """The (sx, sy) cell of a grid: as asked, or for one row of tokens (a sequence with no
    grid) ``sx * sy`` tokens wide, so that it keeps the same share of destinations."""
    return (sx * sy, 1) if height == 1 else (sx, sy)


def destination_count(height: int, width: int, sx: int, sy: int) -> int:
    """How many destinations ``grid_partition`` gives the grid (one per full cell)."""
    sx, sy = cell_shape(height, sx, sy)
    return (height // sy) * (width // sx)


def grid_partition(height: int, width: int, sx: int, sy: int, seed: Optional[int], device=None) -> tuple[Tensor, Tensor]:
    """(destinations, sources) of a ``height`` x ``width`` token grid in row-major order:
    one destination per full ``sy`` x ``sx`` cell (its top-left token, or a token chosen by
    ``cell_offsets`` when ``seed`` is given); sources are all other tokens, ascending. Tokens
    of rows or columns that do not fill a cell are sources. A grid of one row takes cells of
    ``cell_shape``."""
    sx, sy = cell_shape(height, sx, sy)
    cells_h, cells_w = height // sy, width // sx
    cy = torch.arange(cells_h, device=device).unsqueeze(1)
    cx = torch.arange(cells_w, device=device).unsqueeze(0)
    if seed is None:
        offset = torch.zeros(cells_h, cells_w, dtype=torch.long, device=device)
    else:
        offset = cell_offsets(cy * cells_w + cx, sx * sy, seed)
    dst = ((cy * sy + offset // sx) * width + (cx * sx + offset % sx)).reshape(-1)
    n = height * width
    is_dst = torch.zeros(n, dtype=torch.long, device=device).scatter(0, dst, 1)
    # Stable sort puts every source (0) before every destination (1), each in ascending order.
    src = torch.sort(is_dst, stable=True).indices[: n - dst.numel()]
    return dst, src


def grid_merge_plan(
    metric: Tensor,
    dst: Tensor,
    src: Tensor,
    r: int,
    semantic: Optional[Tensor] = None,
    alpha: float = 0.0,
    redundancy: bool = True,
) -> tuple[Tensor, Tensor]:
    """The merge plan (``assign`` [B, N], ``size`` [B, N - r]) for tokens ``metric`` [B, N, C].

    Each source's redundancy is its best cosine similarity to a destination; its information
    degree is that minus ``alpha`` times its semantic value ([B, N], 1.0 = average), or minus
    the semantic value alone when ``redundancy`` is False. The ``r`` sources with the highest
    degree merge into their most similar destination."""
    batch, n = metric.shape[0], metric.shape[1]
    n_dst, n_src = dst.numel(), src.numel()
    unit = F.normalize(metric.float(), dim=-1)
    similarity = unit.index_select(1, src) @ unit.index_select(1, dst).transpose(1, 2)
    best, partner = similarity.max(dim=-1)  # [B, Ns]
    degree = best if redundancy else torch.zeros_like(best)
    if semantic is not None:
        degree = degree - (alpha if redundancy else 1.0) * semantic.float().index_select(1, src)
    order = torch.argsort(degree, dim=-1, descending=True, stable=True)
    merging, kept = order[:, :r], order[:, r:]
    kept_slots = (n_dst + torch.arange(n_src - r, device=metric.device)).expand(batch, -1)
    src_assign = torch.zeros(batch, n_src, dtype=torch.long, device=metric.device)
    src_assign = src_assign.scatter(1, kept, kept_slots).scatter(1, merging, partner.gather(1, merging))
    assign = torch.zeros(batch, n, dtype=torch.long, device=metric.device)
    assign = assign.scatter(1, src.expand(batch, -1), src_assign)
    assign = assign.scatter(1, dst.expand(batch, -1), torch.arange(n_dst, device=metric.device).expand(batch, -1))
    size = torch.zeros(batch, n - r, dtype=torch.float32, device=metric.device)
    size = size.scatter_add(1, assign, torch.ones(batch, n, dtype=torch.float32, device=metric.device))
    return assign, size


def merge_by_plan(x: Tensor, assign: Tensor, size: Tensor) -> Tensor:
    """Tokens ``x`` [B, N, C] merged by a plan: each merged token is the mean of the original
    tokens assigned to it (accumulated in float32, returned in ``x``'s dtype)."""
    index = assign.unsqueeze(-1).expand(-1, -1, x.shape[-1])
    total = torch.zeros(x.shape[0], size.shape[1], x.shape[-1], dtype=torch.float32, device=x.device)
    total = total.scatter_add(1, index, x.float())
    return (total / size.unsqueeze(-1)).to(x.dtype)


def grid_merge(
    x: Tensor,
    dst: Tensor,
    src: Tensor,
    r: int,
    semantic: Optional[Tensor],
    alpha: float,
    redundancy: bool,
    prop_attn: bool,
    logit_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One block's merge, scored on its first merging component's input ``x`` [B, N, C] with
    the grid's ``dst`` and ``src`` tokens (``grid_partition``, built once per graph): (merged
    x [B, M, C], assign [B, N], size [B, M], key bias [B, 1, 1, M] for attention over the
    merged tokens: ``log(size)`` with ``prop_attn``, else zeros)."""
    assign, size = grid_merge_plan(x, dst, src, r, semantic, alpha, redundancy)
    bias = size.log() if prop_attn else torch.zeros_like(size)
    return merge_by_plan(x, assign, size), assign, size, bias.to(logit_dtype)[:, None, None, :]


def cross_attention_saliency(q: Tensor, k: Tensor, scale: Optional[float], assign: Optional[Tensor],
                             size: Optional[Tensor]) -> Tensor:
    """The semantic value of image tokens from a cross-attention to text: for every text key,
    a softmax over the image tokens of ``q . k * scale`` (where in the image that text token
    points), averaged over text tokens and heads, times the token count (1.0 = uniform).
    ``q`` [B, H, M, D] are the image queries, merged when ``assign`` [B, N] and ``size`` [B, M]
    are given: the softmax is then the one over the N original tokens, each of which has its
    merged token's logits (``log(size)`` added, shared out by size). ``k`` [B, H, T, D].
    Returns [B, N] float32 in the original token order."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q.float() @ k.float().transpose(-1, -2)) * scale  # [B, H, M, T]
    if assign is None:
        mass = logits.softmax(dim=2).mean(dim=(1, 3))
        return mass * mass.shape[-1]
    log_size = size.log()[:, None, :, None]
    mass = (logits + log_size).softmax(dim=2).mean(dim=(1, 3)) / size
    return mass.gather(1, assign) * assign.shape[-1]
