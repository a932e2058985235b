"""Restoring the original token count: each original token takes its merged token's value."""
from __future__ import annotations

import torch
from torch import Tensor


def restore_tokens(y: Tensor, assign: Tensor, axis: int, lead: int = 0, trail: int = 0) -> Tensor:
    """Give a token-axis tensor back its original token count: each original token
    takes the value of the merged token it went into. Axis 0 must be the batch. ``lead`` and
    ``trail`` tokens before and after the merged ones (of another origin) are kept as they are."""
    if lead or trail:
        merged = y.shape[axis] - lead - trail
        middle = restore_tokens(y.narrow(axis, lead, merged), assign, axis)
        return torch.cat([y.narrow(axis, 0, lead), middle, y.narrow(axis, lead + merged, trail)], dim=axis)
    moved = y.movedim(axis, 1)
    index = assign.reshape(assign.shape + (1,) * (moved.dim() - 2)).expand(
        (assign.shape[0], assign.shape[1]) + tuple(moved.shape[2:])
    )
    return moved.gather(1, index).movedim(1, axis)


def assign_after_prefix(assign: Tensor, prefix: int) -> Tensor:
    """The assignment of the tokens after ``prefix`` protected ones (which never merge and keep
    the first slots), for a sequence that sliced them off."""
    return assign[:, prefix:] - prefix


def merge_token_rows(table: Tensor, assign: Tensor, like: Tensor, token_axis: int, offset: int = 0) -> Tensor:
    """A per-token table for the merged tokens of ``like``: each merged token gets the mean of
    its members' rows, so adding the table to a merged token equals merging after the add.

    The table has one row per original token from ``offset`` on (the tokens after a protected
    prefix that the model slices off, as DINOv3 does before its rotary embedding) on the axis
    that broadcasting aligns with ``like``'s ``token_axis`` (aligned from the right); it holds
    no batch, or the batch on ``like``'s axis 0. Examples: YOLOS's mid-position embeddings,
    rotary cos/sin tables, rotation angles. The result has ``like``'s rank, ``like``'s batch on
    axis 0 and the merged count on ``token_axis``, so it broadcasts as the table did."""
    rank = like.dim()
    token_axis %= rank
    full = table.reshape((1,) * (rank - table.dim()) + tuple(table.shape)).movedim(token_axis, 1)
    batch, n_original, rest = assign.shape[0], full.shape[1], full.shape[2:]
    rows = full.expand(batch, *full.shape[1:]).reshape(batch, n_original, -1).to(torch.float32)
    n_tokens = like.shape[token_axis]
    index = assign[:, offset:] - offset
    sums = rows.new_zeros(batch, n_tokens, rows.shape[-1]).scatter_add(
        1, index.unsqueeze(-1).expand(-1, -1, rows.shape[-1]), rows)
    counts = rows.new_zeros(batch, n_tokens).scatter_add(1, index, rows.new_ones(index.shape))
    mean = sums / counts.clamp_min(1.0).unsqueeze(-1)
    return mean.to(table.dtype).reshape(batch, n_tokens, *rest).movedim(1, token_axis)


def assign_with_whole_tokens(assign: Tensor, lead: int, trail: int, merged: int) -> Tensor:
    """The assignment of a sequence that puts ``lead`` and ``trail`` tokens of another origin
    around the merged ones: those keep a slot of their own, the merged ones shift behind the
    lead. ``merged``: how many merged tokens ``assign`` maps into."""
    batch = assign.shape[0]
    before = torch.arange(lead, device=assign.device).expand(batch, lead)
    after = (lead + merged + torch.arange(trail, device=assign.device)).expand(batch, trail)
    return torch.cat([before, assign + lead, after], dim=1)


def destination_token_rows(table: Tensor, assign: Tensor, dst: Tensor, like: Tensor, token_axis: int,
                           lead: int = 0, trail: int = 0) -> Tensor:
    """A per-token table for the merged tokens of ``like`` in merge-and-restore mode, each merged
    token taking the row of the original token whose place it keeps: its destination (merged
    tokens are laid out [destinations | kept sources], ``grid_merge``) or, for a kept source,
    itself. ``lead`` and ``trail`` tokens of other sequences around the merged ones keep their
    own rows. Table layout and result shape as in ``merge_token_rows``."""
    rank = like.dim()
    token_axis %= rank
    full = table.reshape((1,) * (rank - table.dim()) + tuple(table.shape)).movedim(token_axis, 1)
    batch, n = assign.shape
    merged = like.shape[token_axis] - lead - trail
    members = torch.arange(n, device=assign.device).expand(batch, n)
    # A kept source is its slot's only member, so this scatter writes each kept slot once; the
    # destinations' slots are then set from ``dst``, whatever their members wrote.
    kept = torch.zeros(batch, merged, dtype=torch.long, device=assign.device).scatter(1, assign, members)
    place = torch.cat([dst.expand(batch, -1), kept[:, dst.numel():]], dim=1)
    rows = torch.cat([torch.arange(lead, device=assign.device).expand(batch, lead), place + lead,
                      (lead + n + torch.arange(trail, device=assign.device)).expand(batch, trail)], dim=1)
    source = full.expand(batch, *full.shape[1:])
    index = rows.reshape(rows.shape + (1,) * (source.dim() - 2)).expand(batch, rows.shape[1], *source.shape[2:])
    return source.gather(1, index).movedim(1, token_axis)
