"""Pass: insert informativity-driven merges (and the proportional-attention bias) at attention sites.

For each attention site, in graph order, with ``r`` clamped by ``merge_count``:
  * after the first merge, the site's attention gets the key bias built from token
    sizes (``log size`` with ``prop_attn``, and the lowest value for padding keys),
    replacing the original padding mask, which no longer matches the token count;
  * when the site merges, right after the stream that leaves the attention
    sub-block (the closing residual add, or the LayerNorm after it in post-norm
    blocks) it inserts one ``merge_block`` call (the opaque op, or the plain
    function with ``fuse_merges``). That call computes the metric (keys or queries
    averaged over heads), the semantic value (the CLS row of the attention,
    recomputed as one extra row for SDPA, read from the probabilities for explicit
    attention), the merge, the updated ``assign`` map and the next key bias. Every
    later use of the stream takes the merged one.

Cross-attention sites of other sequences that read the merged tokens (``readers``) get the
key bias of the merge state they read, in place of their (absent) mask.

Guarantees: only inserts calls into ``turbo_fx.ops`` and edits the mask argument
of attention calls; the returned ``MergeInsertion`` lists every node it added or
edited (for shape propagation) and the assign map at each token count (for
restoring outputs). Shapes downstream are left stale for ``propagate_shapes``.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch.fx import GraphModule, Node

from turbo_fx import ops
from turbo_fx.config import TurboConfig
from turbo_fx.report import BlockReport

from . import graph_utils as gu
from .find_attention import AttentionSite
from .streams import reader_mask
from turbo_fx.errors import CannotRewrite


@dataclass
class MergeInsertion:
    blocks: list[BlockReport]
    touched: set[Node] = field(default_factory=set)
    assign_by_count: dict[int, Node] = field(default_factory=dict)
    replaced: dict[Node, Node] = field(default_factory=dict)  # merged stream -> stream it replaced
    padding: bool = False
    valid: Optional[Node] = None  # [B, N] the original tokens that are not padding


def plan_merges(sites: list[AttentionSite], config: TurboConfig, protected: int, tail: int = 0) -> list[BlockReport]:
    """Tokens in, requested and applied r for every site, from static shapes alone."""
    requested = config.r_per_block(len(sites))
    plans: list[BlockReport] = []
    n_tokens = gu.tensor_shape(sites[0].stream_out)[1]
    for site, r in zip(sites, requested):
        applied = ops.merge_count(n_tokens, protected, r, config.min_tokens, config.keep_salient, tail)
        plans.append(BlockReport(site.index, site.module, site.kind, n_tokens, r, applied))
        n_tokens -= applied
    return plans


def insert_merges(
    gm: GraphModule,
    sites: list[AttentionSite],
    plans: list[BlockReport],
    config: TurboConfig,
    protected: int,
    readers: Sequence[tuple[AttentionSite, int, tuple[int, int]]] = (),
    tail: int = 0,
) -> MergeInsertion:
    """Insert the merges of ``plans`` into ``gm`` (see the module docstring). ``readers``:
    cross-attention sites of other sequences over the merged one, each with the index of
    the merged sequence's site whose output they read and how many keys of other sequences
    come before and after the merged ones (which get no bias)."""
    graph = gm.graph
    result = MergeInsertion(blocks=plans, padding=any(s.mask is not None for s in sites))
    merge_fn = ops.merge_block if config.strategy.fuse_merges else torch.ops.turbo_fx.merge_block.default
    sizes = assign = bias = None

    def call(fn, *args) -> Node:
        node = graph.call_function(fn, args)
        result.touched.add(node)
        return node

    def rebias(site: AttentionSite, bias: Optional[Node], proportional: bool = config.prop_attn) -> None:
        if bias is not None and (proportional or result.padding):
            _apply_key_bias(graph, site, bias, result, call)
        elif bias is not None and site.dropped_mask is not None:
            _drop_mask(site, result)

    bias_after: dict[int, Optional[Node]] = {}
    sizes_after: dict[int, Optional[Node]] = {}
    for site, plan in zip(sites, plans):
        rebias(site, bias)
        if plan.r_applied == 0:
            bias_after[site.index], sizes_after[site.index] = bias, sizes
            continue
        stream = site.stream_out
        with graph.inserting_before(stream.next):
            if sizes is None:
                sizes, assign, result.valid = _initial_state(site, stream, result.padding, call)
                result.assign_by_count[plan.tokens_in] = assign
            merged = call(
                merge_fn, stream, sizes, assign, *_metric_args(site, config, call), *_semantic_args(site, config, call),
                plan.r_applied, protected, config.fusion, config.alpha, config.beta, config.gamma,
                site.index, result.padding, config.prop_attn, _logit_dtype(site),
                config.strategy.uses_symbolic_tokens and plan.tokens_out >= 2,
                config.redundancy, config.keep_salient, tail, config.strategy.fuse_merges,
                config.strategy.compile_merge_step is True,
            )
            new_stream, sizes, assign, bias = (call(operator.getitem, merged, i) for i in range(4))
        inserted = set(result.touched)
        stream.replace_all_uses_with(new_stream, delete_user_cb=lambda user: user not in inserted)
        result.touched.update(new_stream.users)
        result.replaced[new_stream] = stream
        result.assign_by_count[plan.tokens_out] = assign
        bias_after[site.index], sizes_after[site.index] = bias, sizes
    # Cross-attention from other sequences over the merged tokens: the key bias of the
    # merge state they read (the last merge at or before the site they read after), built
    # afresh where cross_attention_bias differs from prop_attn.
    for reader, after, (before, behind) in readers:
        bias, sizes = bias_after.get(after), sizes_after.get(after)
        with graph.inserting_before(reader.attn if reader.kind in ("sdpa", "packed") else reader.softmax):
            if bias is not None and config.cross_attention_bias != config.prop_attn:
                bias = call(ops.key_bias, sizes, _logit_dtype(reader), config.cross_attention_bias)
            if bias is not None and (before or behind):
                bias = call(ops.pad_key_bias, bias, before, behind)
            own = reader_mask(reader)
            if bias is not None and isinstance(own, Node):
                # The reader's own mask, over the original keys, is the sequence's padding
                # (streams.reader_problem): checked, then replaced by the key bias.
                bias = call(torch.ops.turbo_fx.check_reader_padding.default, own, result.valid, bias,
                            reader.kind == "packed")
                if reader.kind == "packed" and gu.packed_attention_args(reader.attn)["attn_mask"] is own:
                    gu.set_packed_attention_arg(reader.attn, "attn_mask", None)
        rebias(reader, bias, config.cross_attention_bias)
    return result


def _metric_args(site: AttentionSite, config: TurboConfig, call) -> tuple:
    if site.kind == "packed":
        weight, bias, heads = site.in_proj
        tokens, which = (site.k, 1) if config.metric == "keys" else (site.q, 0)
        return call(ops.packed_head_mean, tokens, weight, bias, heads, which), -2
    if config.metric == "keys":
        return site.k, site.k_token_axis
    return site.q, -2


def _semantic_args(site: AttentionSite, config: TurboConfig, call) -> tuple:
    """(q, k, mask, probs, scale) for the semantic value: the CLS row recomputed for
    SDPA, the materialised probabilities for explicit attention, the CLS row folded into
    the key weight for packed attention, nothing when off."""
    if not config.semantic:
        return None, None, None, None, None
    if site.kind == "explicit":
        return None, None, None, site.softmax, None
    if site.kind == "packed":
        weight, bias, heads = site.in_proj
        key_bias = gu.packed_attention_args(site.attn)["key_padding_mask"]
        return None, None, None, call(ops.packed_cls_probs, site.q, weight, bias, heads, key_bias), None
    return site.q, site.k, gu.sdpa_arg(site.attn, "attn_mask"), None, site.scale


def _initial_state(site: AttentionSite, stream: Node, padding: bool, call):
    if padding:
        if site.mask is None:
            raise CannotRewrite("attention sites disagree on masks: the first merging block has none")
        checked = call(torch.ops.turbo_fx.check_key_padding_mask.default, site.mask)
        valid = call(ops.key_validity, checked, stream)
        sizes = call(ops.initial_sizes, stream, valid)
    else:
        valid = None
        sizes = call(ops.initial_sizes, stream)
    return sizes, call(ops.initial_assign, stream), valid


def _apply_key_bias(graph, site: AttentionSite, bias: Node, result: MergeInsertion, call) -> None:
    """Give a site after the first merge the size-derived key bias in place of its mask."""
    if site.kind == "packed":
        with graph.inserting_before(site.attn):
            gu.set_packed_attention_arg(site.attn, "key_padding_mask", call(ops.key_padding_bias, bias))
        result.touched.add(site.attn)
    elif site.kind == "sdpa" or site.mask_add is not None:
        _replace_mask(site, bias, result)
    else:
        with graph.inserting_before(site.softmax):
            biased = call(ops.add_bias, site.logits, bias)
        site.softmax.replace_input_with(site.logits, biased)
        result.touched.add(site.softmax)


def _drop_mask(site: AttentionSite, result: MergeInsertion) -> None:
    """Remove an all-allowing constant mask (built for the unmerged token count) from a
    site after the first merge, when no key bias takes its place."""
    if site.kind == "sdpa" or site.mask_add is not None:
        _replace_mask(site, None, result)


def _replace_mask(site: AttentionSite, value: Optional[Node], result: MergeInsertion) -> None:
    """Put ``value`` where the site's mask (or the all-allowing one it dropped) was: the SDPA
    mask argument, or the mask operand of the add that applies it (0 for no mask)."""
    if site.kind == "sdpa":
        gu.set_sdpa_arg(site.attn, "attn_mask", value)
        result.touched.add(site.attn)
        return
    args = list(site.mask_add.args)
    args[args.index(site.mask if site.mask is not None else site.dropped_mask)] = 0.0 if value is None else value
    site.mask_add.args = tuple(args)
    result.touched.add(site.mask_add)


def _logit_dtype(site: AttentionSite) -> torch.dtype:
    value = gu.example_value(site.q if site.kind in ("sdpa", "packed") else site.logits)
    return value.dtype if isinstance(value, torch.Tensor) else torch.float32
