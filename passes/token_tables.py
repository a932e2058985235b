"""Per-token tables that meet merged tokens: what they are and how their merged rows are built.

A *table* is a tensor built from parameters, buffers, an ``arange`` over the patch grid or
inputs of its own (Flux's position ids), not from the data the tokens come from, with one row
per original token, which an elementwise op combines with the
tokens: a position embedding added to them (YOLOS's mid-position embeddings), a rotary
cos/sin table multiplied with the queries and keys (EVA-02, DINOv3, RoPE ViTs). After a merge
the tokens are fewer and the table must follow them. ``propagate_shapes`` finds such an op as
it re-runs the graph (``table_operand``), and builds the merged table by one of two rules:

* ``"rows"``: each merged token gets the mean of its members' rows (``ops.merge_token_rows``).
  For an added embedding this equals merging after the add. For a rotary table the mean of
  cos/sin rows is a rotation scaled by less than one where members sit far apart;
* ``"position"``: where the graph computes the table from rotation angles (``cos``/``sin`` of
  a tensor with one row per token, angles linear in the position), each merged token gets
  the mean of its members' angles, which is the angle of their mean position, and the part
  of the graph from the angles to the table is re-run on it (``angle_chain``). A rotation
  stays a rotation. Where the table is stored (EVA-02 keeps cos/sin in a buffer) or the chain
  reshapes in a way that the extra batch axis would change, the rows rule is used and the
  report says why.

Guarantees: nothing here edits the graph; the caller inserts the nodes.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.fx import Node

from .graph_utils import ancestors, depends_on_data, is_attention_call

ELEMENTWISE_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv,
                         torch.add, torch.sub, torch.mul, torch.div}
ELEMENTWISE_METHODS = {"add", "sub", "mul", "div"}
ANGLE_FUNCTIONS = {torch.sin, torch.cos}
ANGLE_METHODS = {"sin", "cos"}
# Ops allowed between the angles and the table when the angles gain a leading batch axis:
# elementwise ones, and those whose axis argument counts from the end (checked per node).
CHAIN_ELEMENTWISE_METHODS = {"sin", "cos", "neg", "float", "half", "bfloat16", "to", "type_as", "contiguous",
                             "mul", "add", "sub", "div", "clone"}
CHAIN_ELEMENTWISE_FUNCTIONS = {torch.sin, torch.cos, torch.neg, operator.neg, operator.mul, operator.add,
                               operator.sub, operator.truediv, torch.mul, torch.add, torch.sub, torch.div}
CHAIN_AXIS_OPS = {"cat": 1, "stack": 1, "chunk": 2, "split": 2, "tensor_split": 2, "repeat_interleave": None}


@dataclass(frozen=True)
class TableUse:
    """An elementwise op that combines merged tokens with a table of the unmerged count."""

    tokens: Node
    table: Node
    token_axis: int  # in ``tokens`` (and in the merged table, which takes its rank)
    n_before: int  # the table's rows: tokens on that axis before merging


def is_elementwise_binary(node: Node) -> bool:
    if len(node.args) != 2 or node.kwargs:
        return False
    if node.op == "call_function":
        return node.target in ELEMENTWISE_FUNCTIONS
    return node.op == "call_method" and node.target in ELEMENTWISE_METHODS


def table_operand(node: Node, changed: set[Node], old: dict[Node, Any], new: dict[Node, Any], size) -> Optional[TableUse]:
    """The table use at ``node``, or None: one operand's token axis shrank (it is in ``changed``),
    the other operand was built without user data and still has the old count on that axis.
    ``old``/``new``: values before and after merging; ``size``: SymInt -> int."""
    if not is_elementwise_binary(node):
        return None
    moved = [a for a in node.args if isinstance(a, Node) and a in changed]
    fixed = [a for a in node.args if isinstance(a, Node) and a not in changed]
    if len(moved) != 1 or len(fixed) != 1:
        return None
    tokens, table = moved[0], fixed[0]
    before, after, value = old.get(tokens), new.get(tokens), new.get(table)
    if not all(isinstance(t, torch.Tensor) for t in (before, after, value)) or before.dim() != after.dim():
        return None
    axes = [a for a in range(before.dim()) if size(before.shape[a]) != size(after.shape[a])]
    if len(axes) != 1 or axes[0] == 0:
        return None
    axis = axes[0]
    table_axis = axis - (before.dim() - value.dim())
    n_before = size(before.shape[axis])
    if table_axis < 0 or size(value.shape[table_axis]) != n_before or n_before == 1 or shares_data(table, tokens):
        return None
    return TableUse(tokens, table, axis, n_before)


def shares_data(table: Node, tokens: Node) -> bool:
    """The table derives from user data that the tokens derive from too: then it is computed
    from the tokens (or alongside them), not a table of positions. Tables from parameters,
    shapes, or inputs of their own (Flux's position ids) do not. The tokens' inputs are
    followed around attention calls, not through them: an earlier block's rotated attention
    makes every later token depend on the position ids without making them the tokens' data."""
    inputs = _data_inputs(table)
    return bool(inputs) and bool(inputs & _data_inputs(tokens, stop=is_attention_call))


def _data_inputs(node: Node, stop=None) -> set[Node]:
    return {n for n in ancestors(node, stop=stop) | {node} if n.op == "placeholder" and depends_on_data(n)}


def angle_chain(table: Node, values: dict[Node, Any], n_rows: int, from_end: int,
                size) -> "tuple[Optional[Node], list[Node], str]":
    """``(angles, chain, why)``: the one tensor whose ``cos``/``sin`` the table is computed from
    and the nodes from it to the table (graph order, the table last), or ``(None, [], why)``
    where the table cannot be recomputed from merged angles. The angles must hold the token
    rows on the same axis as the table, ``from_end`` axes from the end."""
    above = ancestors(table) | {table}
    trig = [n for n in above if _is_angle_op(n)]
    sources = {n.args[0] for n in trig if n.args and isinstance(n.args[0], Node)}
    if not trig:
        return None, [], "the table is stored, not computed from rotation angles in the graph"
    if len(sources) != 1:
        return None, [], "the table is computed from more than one angle tensor"
    angles = sources.pop()
    angle_value = values.get(angles)
    if not isinstance(angle_value, torch.Tensor):
        return None, [], "the angles have no recorded value"
    axis = angle_value.dim() - from_end
    if axis < 0 or size(angle_value.shape[axis]) != n_rows:
        return None, [], "the angles do not hold one row per token on the table's token axis"
    below = _descendants_within(angles, above)
    chain = [n for n in table.graph.nodes if n in below]
    for node in chain:
        why = _chain_problem(node)
        if why:
            return None, [], f"{node.format_node()} {why}"
    return angles, chain, ""


def _is_angle_op(node: Node) -> bool:
    return (node.op == "call_function" and node.target in ANGLE_FUNCTIONS) or (
        node.op == "call_method" and node.target in ANGLE_METHODS)


def _descendants_within(start: Node, allowed: set[Node]) -> set[Node]:
    seen: set[Node] = set()
    todo = [u for u in start.users if u in allowed]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        todo.extend(u for u in node.users if u in allowed)
    return seen


def _chain_problem(node: Node) -> str:
    """Why ``node`` would compute something else once its input gains leading axes ('' if not)."""
    if node.op == "call_function" and node.target is operator.getitem:
        index = node.args[1]
        if isinstance(index, int):
            return ""  # an element of a tuple (chunk, split)
        items = index if isinstance(index, tuple) else (index,)
        return "" if items and items[0] is Ellipsis else "indexes by position from the first axis"
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if (node.op == "call_method" and name in CHAIN_ELEMENTWISE_METHODS) or (
            node.op == "call_function" and node.target in CHAIN_ELEMENTWISE_FUNCTIONS):
        return ""
    if name in CHAIN_AXIS_OPS:
        position = CHAIN_AXIS_OPS[name]
        dim = node.kwargs.get("dim", node.args[position] if position is not None and len(node.args) > position else None)
        if dim is None and name in ("cat", "stack"):
            dim = 0
        if isinstance(dim, int) and dim < 0:
            return ""
        return f"applies {name} along an axis counted from the front"
    if node.op == "call_method" and name == "tile":
        return ""  # repeats align from the end
    return f"reshapes the table ({name})"
