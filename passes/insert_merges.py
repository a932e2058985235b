"""Pass: insert informativity-driven merges (and the proportional-attention bias) at attention sites.

For each attention site, in graph order, with ``r`` clamped by ``merge_count``:
  * after the first merge, the site's attention gets the key bias built from token
    sizes (``log size`` with ``prop_attn``, and the lowest value for padding keys),
    replacing the original padding mask, which no longer matches the token count;
  * when the site merges, right after the stream that leaves the attention
    sub-block (the closing residual add, or the LayerNorm after it in post-norm
    blocks) it inserts: the metric (keys or queries averaged over heads), the
    semantic value (the CLS row of the attention, computed as one extra row for
    SDPA, read from the probabilities for explicit attention), ``merge_tokens`` and
    the updated ``assign`` map; every later use of the stream takes the merged one.

Guarantees: only inserts calls into ``turbo_fx.ops`` and edits the mask argument
of attention calls; the returned ``MergeInsertion`` lists every node it added or
edited (for shape propagation) and the assign map at each token count (for
restoring outputs). Shapes downstream are left stale for ``propagate_shapes``.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.fx import GraphModule, Node

from turbo_fx import ops
from turbo_fx.config import TurboConfig
from turbo_fx.report import BlockReport

from . import graph_utils as gu
from .find_attention import AttentionSite
from .propagate_shapes import CannotRewrite


@dataclass
class MergeInsertion:
    blocks: list[BlockReport]
    touched: set[Node] = field(default_factory=set)
    assign_by_count: dict[int, Node] = field(default_factory=dict)
    replaced: dict[Node, Node] = field(default_factory=dict)  # merged stream -> stream it replaced
    padding: bool = False

    @property
    def merges(self) -> int:
        return sum(1 for b in self.blocks if b.r_applied > 0)


def plan_merges(sites: list[AttentionSite], config: TurboConfig, protected: int) -> list[BlockReport]:
    """Tokens in, requested and applied r for every site, from static shapes alone."""
    requested = config.r_per_block(len(sites))
    plans: list[BlockReport] = []
    n_tokens = gu.tensor_shape(sites[0].stream_out)[1]
    for site, r in zip(sites, requested):
        applied = ops.merge_count(n_tokens, protected, r, config.min_tokens)
        plans.append(BlockReport(site.index, site.module, site.kind, n_tokens, r, applied))
        n_tokens -= applied
    return plans


def insert_merges(
    gm: GraphModule,
    sites: list[AttentionSite],
    plans: list[BlockReport],
    config: TurboConfig,
    protected: int,
) -> MergeInsertion:
    """Insert the merges of ``plans`` into ``gm`` (see the module docstring)."""
    graph = gm.graph
    result = MergeInsertion(blocks=plans, padding=any(s.mask is not None for s in sites))
    sizes: Optional[Node] = None
    assign: Optional[Node] = None

    def call(fn, *args, **kwargs) -> Node:
        node = graph.call_function(fn, args, kwargs)
        result.touched.add(node)
        return node

    for site, plan in zip(sites, plans):
        if sizes is not None:
            _apply_key_bias(graph, site, sizes, config, result, call)
        if plan.r_applied == 0:
            continue
        stream = site.stream_out
        with graph.inserting_before(stream.next):
            if sizes is None:
                sizes, assign = _initial_state(site, stream, result.padding, call)
                result.assign_by_count[plan.tokens_in] = assign
            metric_source = site.k if config.metric == "keys" else site.q
            metric_axis = site.k_token_axis if config.metric == "keys" else -2
            metric = call(ops.head_mean, metric_source, metric_axis)
            semantic = _semantic_value(site, call) if config.semantic else None
            merged = call(
                ops.merge_tokens, stream, sizes, metric, semantic, plan.r_applied, protected,
                config.fusion, config.alpha, config.beta, config.gamma, site.index, result.padding,
            )
            new_stream = call(operator.getitem, merged, 0)
            sizes = call(operator.getitem, merged, 1)
            dest = call(operator.getitem, merged, 2)
            assign = call(ops.compose_assign, assign, dest)
        inserted = set(result.touched)
        stream.replace_all_uses_with(new_stream, delete_user_cb=lambda user: user not in inserted)
        result.touched.update(new_stream.users)
        result.replaced[new_stream] = stream
        result.assign_by_count[plan.tokens_out] = assign
    return result


def _initial_state(site: AttentionSite, stream: Node, padding: bool, call):
    if padding:
        if site.mask is None:
            raise CannotRewrite("attention sites disagree on masks: the first merging block has none")
        checked = call(ops.check_key_padding_mask, site.mask)
        valid = call(ops.key_validity, checked, stream)
        sizes = call(ops.initial_sizes, stream, valid)
    else:
        sizes = call(ops.initial_sizes, stream)
    return sizes, call(ops.initial_assign, stream)


def _semantic_value(site: AttentionSite, call) -> Node:
    if site.kind == "explicit":
        return call(ops.cls_attention_from_probs, site.softmax)
    mask = gu.sdpa_arg(site.attn, "attn_mask")
    return call(ops.cls_attention, site.q, site.k, site.scale, mask)


def _apply_key_bias(graph, site: AttentionSite, sizes: Node, config: TurboConfig, result: MergeInsertion, call) -> None:
    """Give a site after the first merge the size-derived key bias in place of its mask."""
    if not config.prop_attn and not result.padding:
        return
    dtype = _logit_dtype(site)
    with graph.inserting_before(site.attn if site.kind == "sdpa" else site.softmax):
        bias = call(ops.key_bias, sizes, dtype, config.prop_attn)
        if site.kind == "sdpa":
            gu.set_sdpa_arg(site.attn, "attn_mask", bias)
            result.touched.add(site.attn)
        elif site.mask_add is not None:
            args = list(site.mask_add.args)
            args[args.index(site.mask)] = bias
            site.mask_add.args = tuple(args)
            result.touched.add(site.mask_add)
        else:
            biased = call(ops.add_bias, site.logits, bias)
            site.softmax.replace_input_with(site.logits, biased)
            result.touched.add(site.softmax)


def _logit_dtype(site: AttentionSite) -> torch.dtype:
    value = gu.example_value(site.q if site.kind == "sdpa" else site.logits)
    return value.dtype if isinstance(value, torch.Tensor) else torch.float32
