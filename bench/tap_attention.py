"""Tap every self-attention site so a Python function sees what enters it (the redundancy
analysis, ``bench/analysis.py``, is built on it).

Matches the attention sites ``find_attention_sites`` finds (SDPA calls and explicit
``matmul -> softmax -> matmul`` attention) that look like self-attention over a
token sequence: a residual stream was found, it is [batch, tokens, channels], q and
k are [batch, heads, tokens, dim], and the stream, the queries and the keys have
the same number of tokens. Other sites (windowed or cross-attention, blocks
without a residual add) are left alone and reported as skipped.

Guarantees: no existing node is changed, removed or reordered, and the graph's
outputs are the same. For each matched site one call is inserted right after the
attention node (when every input the tap reads already exists):

    tap(index, module, kind, k_token_axis, scale, residual, q, k, mask, probs)

The first five are constants (the site's index in this graph, its module path,
"sdpa" or "explicit", the keys' token axis, the attention scale or None; plain
values, because the generated code writes constants by their repr); ``mask`` is the attention mask or None; ``probs`` is
the softmax output for explicit attention, None for SDPA (which never
materialises probabilities). The call's result is unused: the tap is for its side
effect, and the graph is meant to run eagerly (a GraphModule's own forward), where
an opaque Python call is fine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch.fx import GraphModule

from turbo_fx.passes import graph_utils as gu
from turbo_fx.passes.find_attention import AttentionSite, find_attention_sites


@dataclass(frozen=True)
class TapSite:
    """The constant facts of one tapped site (the tap's first five arguments)."""

    index: int  # site index within this graph
    module: str
    kind: str  # "sdpa" or "explicit"
    k_token_axis: int
    scale: Optional[float]


@dataclass
class TapResult:
    tapped: list[TapSite]
    skipped: list[str]  # "site i (module): why", one per site left alone


def tap_attention(gm: GraphModule, tap: Callable, sites: Optional[list[AttentionSite]] = None) -> tuple[GraphModule, TapResult]:
    """Insert ``tap(index, module, kind, k_token_axis, scale, residual, q, k, mask, probs)``
    after every self-attention site of ``gm`` (in place) and recompile; returns ``gm``
    and what was tapped."""
    if sites is None:
        sites = find_attention_sites(gm)
    result = TapResult(tapped=[], skipped=[])
    for site in sites:
        why = _unsuitable(site)
        if why:
            result.skipped.append(f"site {site.index} ({site.module or site.kind}): {why}")
            continue
        info = TapSite(site.index, site.module, site.kind, site.k_token_axis, site.scale)
        # Right after the attention node: q, k, the mask, the residual and the
        # softmax all feed it (directly or through the value matmul), so they exist.
        with gm.graph.inserting_after(site.attn):
            constants = (info.index, info.module, info.kind, info.k_token_axis, info.scale)
            gm.graph.call_function(tap, constants + (site.residual, site.q, site.k, site.mask, site.softmax))
        result.tapped.append(info)
    gm.graph.lint()
    gm.recompile()
    return gm, result


def _unsuitable(site: AttentionSite) -> str:
    """Why a site cannot be tapped as self-attention over a token sequence ('' if it can)."""
    if site.residual is None:
        return "no residual stream (no add closes the attention sub-block)"
    stream, q, k = gu.tensor_shape(site.residual), gu.tensor_shape(site.q), gu.tensor_shape(site.k)
    if stream is None or q is None or k is None:
        return "missing shape information"
    if len(stream) != 3 or len(q) != 4 or len(k) != 4:
        return f"not a [batch, tokens, channels] stream with [batch, heads, tokens, dim] q/k (stream {stream}, q {q})"
    n_keys = k[site.k_token_axis]
    if not (stream[1] == q[2] == n_keys):
        return f"stream, queries and keys have different token counts ({stream[1]}, {q[2]}, {n_keys})"
    if site.mask is not None and not hasattr(site.mask, "op"):
        return "attention mask is a constant"
    return ""
