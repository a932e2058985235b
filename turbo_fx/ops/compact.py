"""Placeholder compaction: a language model's input sequence with each row's placeholder tokens
(the positions a vision tower's features were written into) merged down to fewer tokens, the
other tokens left as they are, and the attention masks and key bias of the shorter sequence.

The compacted sequence keeps every token in the order of its position: a text token at its own
position, a merged visual token at the mean position of its members. ``position`` [B, L'] (float)
holds those positions; ``assign`` [B, L] says which slot each original position went into, so
per-token tables and outputs follow the merge as they do in merge mode.
"""
from __future__ import annotations

import torch
from torch import Tensor

from turbo_fx import torch_compat

from .attention_bias import MASKED_BELOW
from .merge import merge_tokens

PLACEHOLDER_COUNT_DIFFERS = ("turbo_fx: the rows of the batch hold different numbers of placeholder tokens; the "
                             "compacted sequence needs the same number in every row")


def placeholder_rows(mask: Tensor, like: Tensor) -> Tensor:
    """The [B, L] bool placeholder mask of the [B, L, C] sequence ``like`` from the scatter's mask,
    which may carry the channel axis ([B, L, 1] or [B, L, C])."""
    rows = mask
    while rows.dim() > 2:
        rows = rows[..., 0]
    return rows.to(torch.bool).expand(like.shape[0], like.shape[1])


@torch.library.custom_op("turbo_fx::check_placeholder_count", mutates_args=(),
                         tags=torch_compat.cudagraph_unsafe_tags())
def check_placeholder_count(rows: Tensor, count: int) -> Tensor:
    """``rows`` ([B, L] bool) copied, after raising ``RuntimeError`` if a row does not hold exactly
    ``count`` placeholders: the compacted length is fixed when the graph is built, and a row with
    more or fewer placeholders would be cut wrongly. A host check (one wait per forward on a GPU);
    the error reaches turbo's run-time guard, which runs the call unmerged."""
    if not bool((rows.sum(dim=1) == count).all()):
        raise RuntimeError(PLACEHOLDER_COUNT_DIFFERS)
    return rows.clone()


@check_placeholder_count.register_fake
def _check_placeholder_count_fake(rows: Tensor, count: int) -> Tensor:
    return torch.empty_like(rows)


def merge_placeholder_tokens(x: Tensor, kept: int, semantic: Tensor | None = None, fusion: str = "sub",
                             alpha: float = 0.0, beta: float = 1.0, gamma: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """x [B, V, C] merged down to ``kept`` tokens by rounds of bipartite matching on cosine
    similarity, ranked by the information degree when ``semantic`` [B, V] (a distribution over the
    tokens) is given: a merged token's semantic value is the sum of its members'. A round merges at
    most half of its candidates (a quarter of the tokens), so that the ranking decides which of
    them merge; a round that merged them all would leave it nothing to choose. Returns (merged [B, kept, C], size
    [B, kept], assign [B, V]: each token's merged index). Merged tokens keep the order of their
    surviving members."""
    batch, count, _ = x.shape
    size = torch.ones(batch, count, dtype=torch.float32, device=x.device)
    assign = torch.arange(count, device=x.device).expand(batch, count)
    n = count
    while n > kept:
        r = min(max(n // 4, 1), n - kept)
        x, size, dest = merge_tokens(x, size, x, semantic, r, 0, fusion, alpha, beta, gamma)
        if semantic is not None:
            semantic = semantic.new_zeros(batch, n - r).scatter_add(1, dest, semantic)
        assign = dest.gather(1, assign)
        n -= r
    return x, size, assign


def text_attention_to_placeholders(q: Tensor, k: Tensor, rows: Tensor, count: int, scale: float | None,
                                   mask: Tensor | None = None) -> Tensor:
    """The semantic value of each placeholder token [B, count] (a distribution over them): how much
    the text tokens after the last placeholder attend to it, causally, averaged over those tokens
    and the heads. ``q`` [B, H, L, D] and ``k`` [B, H_kv, L or more, D] are a layer's rotated
    queries and keys over the whole (uncompacted) sequence; keys before the last L (a cache's past)
    are dropped, key heads shared by several query heads repeated. ``mask`` (the site's own, bool or
    additive) marks padding: a position no query may read (its column in the last query row, which
    a causal mask lets read every earlier position) is not text that ranks. A row with no text
    after its placeholders gets the uniform distribution."""
    batch, heads, length, dim = q.shape
    k = k[:, :, k.shape[2] - length:]
    if k.shape[1] != heads:
        k = k.repeat_interleave(heads // k.shape[1], dim=1)
    position = torch.arange(length, device=q.device)
    logits = (q.float() @ k.float().transpose(-1, -2)) * (scale if scale is not None else dim ** -0.5)
    logits = logits.masked_fill(position[None, :] > position[:, None], float("-inf"))
    seen = logits.softmax(dim=-1).mean(dim=1)  # [B, L queries, L keys]
    last = torch.where(rows, position, -1).amax(dim=1, keepdim=True)
    after = position[None, :] > last
    if mask is not None:
        readable = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))[:, 0, -1, mask.shape[-1] - length:]
        after = after & (readable if readable.dtype == torch.bool else readable > MASKED_BELOW)
    after = after.to(seen.dtype)
    value = (after.unsqueeze(-1) * seen).sum(dim=1) / after.sum(dim=1, keepdim=True).clamp_min(1.0)
    order = torch.argsort((~rows).to(torch.int8), dim=1, stable=True)[:, :count]
    value = value.gather(1, order)
    total = value.sum(dim=1, keepdim=True)
    return torch.where(total > 0, value / total.clamp_min(1e-12), torch.full_like(value, 1.0 / count))


def compact_placeholders(seq: Tensor, mask: Tensor, count: int, kept: int, semantic: Tensor | None = None,
                         fusion: str = "sub", alpha: float = 0.0, beta: float = 1.0,
                         gamma: float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``seq`` [B, L, C] with each row's ``count`` placeholder tokens (``mask``) merged into
    ``kept`` tokens, ranked with ``semantic`` [B, count] when given (``merge_placeholder_tokens``). Returns (compacted [B, L - count + kept, C], size [B, L'] (1 for every text
    token), assign [B, L] (original position -> slot), position [B, L'] (float: a text token's
    own position, a merged token's mean member position))."""
    batch, length, channels = seq.shape
    rows = placeholder_rows(mask, seq)
    # Placeholders first and text after, each in position order (a stable sort of a 0/1 key).
    order = torch.argsort((~rows).to(torch.int8), dim=1, stable=True)
    visual, text = order[:, :count], order[:, count:]
    merged, size, assign_visual = merge_placeholder_tokens(_rows_at(seq, visual), kept, semantic, fusion, alpha, beta,
                                                           gamma)
    member_sum = torch.zeros(batch, kept, device=seq.device).scatter_add(1, assign_visual, visual.to(torch.float32))
    anchor = torch.cat([member_sum / size, text.to(torch.float32)], dim=1)  # items: merged, then text
    slot_item = torch.argsort(anchor, dim=1, stable=True)
    item_slot = torch.argsort(slot_item, dim=1)
    items = torch.cat([merged, _rows_at(seq, text)], dim=1)
    compacted = _rows_at(items, slot_item)
    sizes = torch.cat([size, torch.ones(batch, length - count, device=seq.device)], dim=1).gather(1, slot_item)
    position = anchor.gather(1, slot_item)
    text_items = kept + torch.arange(length - count, device=seq.device).expand(batch, -1)
    item_of_position = torch.empty(batch, length, dtype=torch.long, device=seq.device)
    item_of_position = item_of_position.scatter(1, visual, assign_visual).scatter(1, text, text_items)
    return compacted, sizes, item_slot.gather(1, item_of_position), position


def _rows_at(x: Tensor, index: Tensor) -> Tensor:
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def compact_mask(mask: Tensor | None, position: Tensor, size: Tensor, dtype: torch.dtype, causal: bool,
                 prefix: int, prop_attn: bool = True) -> Tensor:
    """The additive attention mask of a compacted sequence: ``mask`` (bool or additive, over the
    original positions: [.., Lq or 1, Lk or 1], or None) read at each slot's position (a merged
    token at its rounded mean position) for queries and keys, plus the ``log(size)`` key bias.
    ``causal``: the attention was ``is_causal=True``; it becomes the causal mask over those same
    positions, so it equals an explicit causal mask read the same way. ``prefix``: keys before the
    compacted ones (a cache's past keys), which keep their columns, are always visible to causal
    attention and take no bias. Without ``prop_attn`` the bias is 0 (every merged key counts
    once). Returns [B, H or 1, L', prefix + L']."""
    batch, slots = position.shape
    place = position.round().to(torch.long)
    low = torch.finfo(dtype).min
    weight = size.clamp_min(1.0).log() if prop_attn else torch.zeros_like(size)
    bias = torch.cat([torch.zeros(batch, prefix, device=size.device), weight], dim=1)
    bias = bias.to(dtype)[:, None, None, :]
    if mask is None:
        if not causal:
            return bias.expand(batch, 1, slots, prefix + slots)
        past = torch.full((batch, prefix), -1, dtype=torch.long, device=place.device)
        allowed = torch.cat([past, place], dim=1)[:, None, None, :] <= place[:, None, :, None]
        return torch.where(allowed, bias, low)
    full = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(batch, -1, -1, -1)
    if full.shape[-2] > 1:
        full = full.gather(2, place[:, None, :, None].expand(-1, full.shape[1], -1, full.shape[-1]))
    if full.shape[-1] > 1:
        columns = torch.cat([torch.arange(prefix, device=place.device).expand(batch, -1), prefix + place], dim=1)
        full = full.gather(3, columns[:, None, None, :].expand(-1, full.shape[1], full.shape[2], -1))
    if full.dtype == torch.bool:
        return torch.where(full, bias, low)
    return (full.to(dtype) + bias).clamp_min(low)
