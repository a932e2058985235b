"""Pass: compact a language model's placeholder tokens once, right after they are filled in.

Matches the scatter ``find_placeholders`` found. Right after it the graph gets one
``compact_placeholders`` call: each row's placeholder tokens (the image's visual tokens) merge
into ``kept`` tokens by rounds of bipartite matching ranked by the information degree (the
semantic value: how much the text after the image attends to each placeholder at the first
attention site, whose query and key paths are copied to run over the uncompacted sequence), the
text tokens keep a slot each, and every slot stays in position order (a merged token at its
members' mean position). Every later use of the filled sequence takes the compacted one. A
run-time check first makes sure every row holds the placeholder count the graph was built for
(else the guard runs the call unmerged).

Each attention site that reads the sequence gets the mask of the shorter sequence: its own
mask (causal, padding, prefix) read at each slot's position for queries and keys, or a causal
mask over slots where it was ``is_causal``, plus the ``log(size)`` key bias of proportional
attention (``prop_attn``). Per-token tables (rotary cos/sin built for the original positions)
are left to ``propagate_shapes``, which merges them with the compaction's ``assign``; outputs, the key/value
caches among them, are restored to the original length by ``restore_outputs``, so a cache
holds each merged key once per member, and a later decode step attending over it sees exactly
the merged key with its ``log(size)`` bias.

Guarantees: inserts calls into ``turbo_fx.ops`` and copies of the first site's query and key
paths, moves the position tables those read ahead of them, and edits the mask arguments of the
reading SDPA calls; returns every node it added or edited and the assign map at the compacted
length. Shapes downstream are left stale for ``propagate_shapes``.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from turbo_fx import ops
from turbo_fx.config import TurboConfig
from turbo_fx.errors import CannotRewrite

from . import graph_utils as gu
from .find_placeholders import PlaceholderScatter
from .propagate_shapes import ShapeHints

hint = ShapeHints()  # concrete lengths: a symbolic prompt length keys the maps by its hint


@dataclass
class CompactionInsertion:
    touched: set[Node] = field(default_factory=set)
    assign_by_count: dict[int, Node] = field(default_factory=dict)
    replaced: dict[Node, Node] = field(default_factory=dict)  # compacted sequence -> the filled one


def compaction_problem(scatter: PlaceholderScatter) -> str:
    """Why the sites reading ``scatter``'s sequence cannot take the compacted one, or ''."""
    for site in scatter.sites:
        if site.kind != "sdpa":
            return (f"site {site.index} ({site.module}) reads the placeholder sequence through {site.kind} attention; "
                    "compaction rewrites scaled_dot_product_attention masks only")
        if site.k not in gu.descendants(scatter.node):
            return (f"site {site.index} ({site.module}) reads the placeholder sequence as queries over keys of "
                    "another sequence; compaction needs every such site to attend over the sequence itself")
    return ""


def insert_compaction(gm: GraphModule, scatter: PlaceholderScatter, kept: int, config: TurboConfig) -> CompactionInsertion:
    """Insert the compaction of ``scatter``'s placeholders into ``kept`` tokens (module docstring)."""
    graph = gm.graph
    result = CompactionInsertion()

    def call(fn, *args) -> Node:
        node = graph.call_function(fn, args)
        result.touched.add(node)
        return node

    filled = scatter.node
    with graph.inserting_after(filled):
        rows = call(ops.placeholder_rows, scatter.mask, filled)
    with graph.inserting_after(rows):
        checked = call(torch.ops.turbo_fx.check_placeholder_count.default, rows, scatter.count)
    reads_whole: set[Node] = set()  # the copies that compute the semantic value on every token
    semantic = _text_semantic(graph, scatter, checked, call, reads_whole) if config.semantic else None
    after = semantic if semantic is not None else checked
    with graph.inserting_after(after):
        out = call(ops.compact_placeholders, filled, checked, scatter.count, kept, semantic, config.fusion,
                   config.alpha, config.beta, config.gamma)
    with graph.inserting_after(out):
        compacted = call(operator.getitem, out, 0)
    with graph.inserting_after(compacted):
        size, assign, position = (call(operator.getitem, out, i) for i in (1, 2, 3))
        # The original count's (identity) map, by which per-token tables know their row count.
        result.assign_by_count[hint(scatter.length)] = call(ops.initial_assign, filled)
    inserted = set(result.touched) | reads_whole
    filled.replace_all_uses_with(compacted, delete_user_cb=lambda user: user not in inserted)
    result.touched.update(compacted.users)
    result.replaced[compacted] = filled
    result.assign_by_count[hint(scatter.length) - scatter.count + kept] = assign
    for site in scatter.sites:
        _compact_site_mask(graph, site, scatter.length, position, size, config.prop_attn, call)
        result.touched.add(site.attn)
    return result


def _text_semantic(graph, scatter: PlaceholderScatter, rows: Node, call, copied: set[Node]) -> Node:
    """The placeholders' semantic value from the first attention site: its queries and keys
    recomputed over the uncompacted sequence (copies of their path from the filled sequence; the
    position tables and weights that path also reads are moved up to be computed first), then how
    much the text after the placeholders attends to each (``ops.text_attention_to_placeholders``)."""
    site, filled = scatter.sites[0], scatter.node
    mask = gu.sdpa_arg(site.attn, "attn_mask")
    needed = gu.ancestors(site.q) | gu.ancestors(site.k) | {site.q, site.k}
    if isinstance(mask, Node):  # it marks padding, which is no text to rank by
        needed |= gu.ancestors(mask) | {mask}
    from_filled = gu.descendants(filled)
    order = {n: i for i, n in enumerate(graph.nodes)}
    anchor = rows
    for node in sorted(needed - from_filled - {filled}, key=order.get):
        if node.op not in ("placeholder", "get_attr") and order[node] > order[rows]:
            anchor.append(node)
            anchor = node
    copies: dict[Node, Node] = {}
    for node in sorted(needed & from_filled, key=order.get):
        with graph.inserting_after(anchor):
            copies[node] = anchor = graph.node_copy(node, lambda n: copies.get(n, n))
    copied.update(copies.values())
    with graph.inserting_after(anchor):
        return call(ops.text_attention_to_placeholders, copies[site.q], copies[site.k], rows, scatter.count,
                    site.scale, copies.get(mask, mask))


def _compact_site_mask(graph, site, length, position: Node, size: Node, prop_attn: bool, call) -> None:
    keys = gu.tensor_shape(site.k)
    if keys is None:
        raise CannotRewrite(f"site {site.index} ({site.module}): the keys' shape is unknown")
    try:
        prefix = int(keys[site.k_token_axis] - length)  # a cache's past keys in front of the sequence's own
    except Exception:
        raise CannotRewrite(f"site {site.index} ({site.module}): its keys hold a past of unknown length in front "
                            "of the placeholder sequence") from None
    dtype = gu.example_value(site.q).dtype
    causal = bool(gu.sdpa_arg(site.attn, "is_causal", False))
    with graph.inserting_before(site.attn):
        mask = call(ops.compact_mask, gu.sdpa_arg(site.attn, "attn_mask"), position, size, dtype, causal, prefix,
                    prop_attn)
    gu.set_sdpa_arg(site.attn, "attn_mask", mask)
    if causal:
        gu.set_sdpa_arg(site.attn, "is_causal", False)
