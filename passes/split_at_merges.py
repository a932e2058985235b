"""Pass: split a rewritten encoder graph at its merge ops, one piece per stretch of blocks.

Matches every ``torch.ops.turbo_fx.merge_block`` call (the opaque merge op) and the
``getitem`` nodes that unpack it. Each merge and its unpacking become one piece of their
own; everything between two merges (one block's attention, MLP and the next block's
attention, which all run at one token count) becomes one compute piece. The piece before
the first merge holds the stem, the last one the head.

Guarantees: the returned module computes what ``gm`` computes, op for op, in the same
order (``split_module`` with the original order kept); each compute piece contains no merge
op; node names inside the pieces are replaced by positional ones (``v0``, ``v1`` ...), so
two blocks that differ only in their weights and token count have identical code, which is
what lets Inductor's FX graph cache serve one block's compiled code to the others. Example
values are dropped from the metadata: the pieces are compiled from the values seen when
the split module first runs, not from the whole graph's fake tensors (whose unbacked token
counts ``split_module`` cannot attribute to any node).
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

from torch.fx import GraphModule, Node
from torch.fx.passes.split_module import split_module

from .graph_utils import is_merge
from turbo_fx.errors import CannotRewrite


@dataclass
class SplitGraph:
    """The split module, and the names of its compute pieces (the others are merge pieces)."""

    module: GraphModule
    compute: list[str]


def piece_index(gm: GraphModule) -> dict[Node, int]:
    """Piece of every non-placeholder, non-output node: 2k for the nodes after the k-th merge,
    2k - 1 for the k-th merge and its unpacking."""
    ids: dict[Node, int] = {}
    merges = 0
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if is_merge(node):
            merges += 1
            ids[node] = 2 * merges - 1
        elif node.target is operator.getitem and isinstance(node.args[0], Node) and is_merge(node.args[0]):
            ids[node] = ids[node.args[0]]
        else:
            ids[node] = 2 * merges
    return ids


def name_positionally(piece: GraphModule) -> None:
    """Rename every node of ``piece`` by its position, so identical computations read the same:
    its arguments too (the split module passes them by position), so that two blocks' pieces
    have the same code, line for line."""
    for i, node in enumerate(piece.graph.nodes):
        if node.op != "output":
            node._rename(f"v{i}")
            if node.op == "placeholder":
                node.target = node.name
    piece.recompile()


def split_at_merges(gm: GraphModule) -> SplitGraph:
    """``gm`` (left untouched) split into compute and merge pieces; see the module docstring."""
    work = GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
    ids = piece_index(work)
    if not any(is_merge(n) for n in work.graph.nodes):
        raise CannotRewrite("no merge op in the graph to split at")
    for node in work.graph.nodes:
        for key in ("example_value", "val", "tensor_meta"):
            node.meta.pop(key, None)
    split = split_module(work, None, lambda n: ids[n], keep_original_order=True)
    compute = []
    for node in split.graph.nodes:
        piece = getattr(split, node.target) if node.op == "call_module" else None
        if piece is not None and not any(is_merge(n) for n in piece.graph.nodes):
            name_positionally(piece)
            compute.append(node.target)
    return SplitGraph(split, compute)
