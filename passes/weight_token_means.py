"""Pass: make means and sums over the merged token axis size-weighted.

Matches ``mean``/``sum`` over axis 1 of a [B, N, C] tensor whose token axis merging
shortened, such as the ``x[:, 1:].mean(1)`` of average-pooling heads. Walking back
from the reduced tensor through token-preserving ops and leading slices, it finds the
merge whose sizes describe those tokens, and replaces the reduction with one that
counts each merged token as the number of original tokens it stands for. For exact
duplicates this gives the unmerged model's result; an unweighted mean would not.

Guarantees: output shapes are unchanged; a reduction whose tokens cannot be traced
to one merge is left as it is (an unweighted reduction, as ToMe computes it) and
reported.
"""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch
from torch.fx import GraphModule, Node

from turbo_fx import ops

from .graph_utils import is_merge
from .propagate_shapes import ShapeHints, run_node_on_fakes, changed_axes

REDUCTIONS = {"mean": ops.weighted_token_mean, "sum": ops.weighted_token_sum}


def weight_token_means(gm: GraphModule, fake_mode, old_values: dict[Node, Any], hints: ShapeHints) -> tuple[int, int]:
    """Returns (reductions weighted, reductions left unweighted)."""
    weighted = unweighted = 0
    env = {n: n.meta.get("example_value") for n in gm.graph.nodes if n.op != "output"}
    for node in list(gm.graph.nodes):
        kind = _token_reduction(node, old_values, hints)
        if kind is None:
            continue
        found = _sizes_for(node.args[0], hints)
        if found is None:
            unweighted += 1
            continue
        sizes, offset = found
        keepdim = bool(node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False))
        with gm.graph.inserting_before(node):
            replacement = gm.graph.call_function(REDUCTIONS[kind], (node.args[0], sizes, offset, keepdim))
        env[replacement] = replacement.meta["example_value"] = run_node_on_fakes(gm, replacement, env, fake_mode)
        node.replace_all_uses_with(replacement)
        gm.graph.erase_node(node)
        weighted += 1
    return weighted, unweighted


def _token_reduction(node: Node, old_values: dict, hints: ShapeHints) -> Optional[str]:
    if node.op == "call_method" and node.target in REDUCTIONS:
        kind = node.target
    elif node.op == "call_function" and node.target in (torch.mean, torch.sum):
        kind = node.target.__name__
    else:
        return None
    source = node.args[0] if node.args else None
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    if not isinstance(source, Node) or dim not in (1, -2, (1,), [1], (-2,), [-2]):
        return None
    old, new = old_values.get(source), source.meta.get("example_value")
    if not isinstance(old, torch.Tensor) or not isinstance(new, torch.Tensor) or new.dim() != 3:
        return None
    if not new.dtype.is_floating_point or "dtype" in node.kwargs:
        return None
    return kind if changed_axes(old.shape, new.shape, hints) == [1] else None


def _sizes_for(node: Node, hints: ShapeHints, depth: int = 64) -> Optional[tuple[Node, int]]:
    """The merge sizes node and leading offset that describe ``node``'s token axis."""
    offset = 0
    while isinstance(node, Node) and depth > 0:
        depth -= 1
        if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], Node):
            source, index = node.args
            if is_merge(source) and index == 0:
                sizes = next((u for u in source.users if u.target is operator.getitem and u.args[1] == 1), None)
                return (sizes, offset) if sizes is not None else None
            leading = _leading_slice(index)
            if leading is None:
                return None
            offset += leading
            node = source
            continue
        node = _same_tokens_input(node, hints)
    return None


def _leading_slice(index: Any) -> Optional[int]:
    """For ``x[:, s:]`` (s may be 0 or None), the start s; None for anything else."""
    if not isinstance(index, tuple) or len(index) < 2 or index[0] != slice(None):
        return None
    token = index[1]
    if not isinstance(token, slice) or token.stop is not None or token.step not in (None, 1):
        return None
    if any(i not in (slice(None), Ellipsis) for i in index[2:]):
        return None
    return token.start or 0


def _same_tokens_input(node: Node, hints: ShapeHints) -> Optional[Node]:
    """The first input with the same [B, N] leading shape (the token stream through a pointwise op)."""
    value = node.meta.get("example_value")
    if not isinstance(value, torch.Tensor) or value.dim() != 3:
        return None
    want = hints.shape(value.shape[:2])
    for inp in node.all_input_nodes:
        v = inp.meta.get("example_value")
        if isinstance(v, torch.Tensor) and v.dim() == 3 and hints.shape(v.shape[:2]) == want:
            return inp
    return None
