"""Attention masks after merging: per-key validity, the run-time check that a mask is a
key-padding mask (the op ``torch.ops.turbo_fx.check_key_padding_mask``), and the additive key
bias that carries proportional attention."""
from __future__ import annotations

import torch
from torch import Tensor

from turbo_fx import torch_compat


# An additive mask value at or below this excludes a key: exp(-1000) is 0 in any float dtype.
MASKED_BELOW = -1000.0


def key_validity(mask: Tensor, like: Tensor) -> Tensor:
    """Which keys an attention mask lets the first (CLS) query see, as [B, N] bool
    (B and N taken from ``like``, the [B, N, C] token sequence)."""
    m = mask
    while m.dim() > 2:
        m = m[:, 0] if m.dim() > 3 else m[:, 0, :]
    if m.dim() == 1:
        m = m.unsqueeze(0)
    valid = m if m.dtype == torch.bool else m > MASKED_BELOW
    return valid.expand(like.shape[0], like.shape[1])


QUERY_DEPENDENT_MASK = "turbo_fx: the attention mask varies by query; token merging needs a key-padding mask"


def _has_query_rows(mask: Tensor) -> bool:
    return mask.dim() >= 2 and mask.size(-2) > 1


@torch.library.custom_op("turbo_fx::check_key_padding_mask", mutates_args=(),
                         tags=torch_compat.cudagraph_unsafe_tags())
def check_key_padding_mask(mask: Tensor) -> Tensor:
    """The mask's first query row ([..., 1, N], a copy: what ``key_validity`` reads), after
    raising ``RuntimeError`` if any row differs from it (a causal or banded mask): merging
    rewrites masks as per-key padding masks, which would be wrong for those.

    The check runs on the host, so on a GPU it waits for the mask once per forward. A device
    assert (``torch._assert_async``) would not wait, but when it fails the CUDA context is
    lost for the whole process; a plain error reaches turbo's run-time guard instead, which
    runs the call unmerged (``turbo_fx.guarded_call``). An opaque op, so that compilers keep
    the host check; unsafe inside a CUDA graph, which cannot wait."""
    if not _has_query_rows(mask):
        return mask.clone()
    first = mask[..., :1, :]
    if not bool((mask == first).all()):
        raise RuntimeError(QUERY_DEPENDENT_MASK)
    return first.clone()


@check_key_padding_mask.register_fake
def _check_key_padding_mask_fake(mask: Tensor) -> Tensor:
    if not _has_query_rows(mask):
        return torch.empty_like(mask)
    return mask.new_empty((*mask.shape[:-2], 1, mask.shape[-1]))


def key_bias(size: Tensor, dtype: torch.dtype, prop_attn: bool) -> Tensor:
    """Additive attention bias [B, 1, 1, N]: log(size) (proportional attention) or 0,
    and the dtype's lowest value for size-0 (padding) keys."""
    if prop_attn:
        value = size.clamp_min(1.0).log()
    else:
        value = torch.zeros_like(size)
    bias = torch.where(size > 0, value, torch.finfo(dtype).min)
    return bias.to(dtype)[:, None, None, :]


def pad_key_bias(bias: Tensor, before: int, after: int) -> Tensor:
    """A [B, 1, 1, N] key bias widened with zeros for ``before`` and ``after`` keys of another
    sequence around the merged ones (each stands for itself)."""
    return torch.nn.functional.pad(bias, (before, after))


def add_bias(logits: Tensor, bias: Tensor) -> Tensor:
    """Logits plus a [B, 1, 1, N] bias (explicit attention)."""
    return logits + bias.to(logits.dtype)


READER_MASK_DIFFERS = ("turbo_fx: a reader's own attention mask does not mask the same keys as the merged "
                       "sequence's padding")


@torch.library.custom_op("turbo_fx::check_reader_padding", mutates_args=(),
                         tags=torch_compat.cudagraph_unsafe_tags())
def check_reader_padding(mask: Tensor, valid: Tensor, bias: Tensor, masked_when_true: bool) -> Tensor:
    """``bias`` (a copy), after raising ``RuntimeError`` unless ``mask``, a reader's own mask
    over the original keys ([B, N], or with head and query axes), lets every query see exactly
    the keys that ``valid`` [B, N] (the merged sequence's padding) marks valid. The key bias
    then stands in for the mask: it masks the merged padding tokens. A boolean mask means
    "masked" where True for ``nn.MultiheadAttention`` (``masked_when_true``) and "allowed"
    for SDPA. A host check, like ``check_key_padding_mask``, so that a mismatch reaches
    turbo's run-time guard, which runs the call unmerged."""
    batch, n_keys = valid.shape
    rows = mask.reshape(batch, -1, n_keys) if mask.numel() % (batch * n_keys) == 0 else None
    if rows is None:
        raise RuntimeError(READER_MASK_DIFFERS)
    if rows.dtype == torch.bool:
        allowed = ~rows if masked_when_true else rows
    else:
        allowed = rows > MASKED_BELOW
    if not bool((allowed == valid[:, None, :]).all()):
        raise RuntimeError(READER_MASK_DIFFERS)
    return bias.clone()


@check_reader_padding.register_fake
def _check_reader_padding_fake(mask: Tensor, valid: Tensor, bias: Tensor, masked_when_true: bool) -> Tensor:
    return torch.empty_like(bias)
