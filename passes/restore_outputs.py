"""Pass: give graph outputs that carry the token axis their original token count back.

Matches every graph output whose shape changed because of merging (the model's
``last_hidden_state``, per-layer hidden states, attention maps). Each changed axis
is gathered through the ``assign`` map of the stage whose token count it has, so
each original token takes the value of the merged token it went into and pooling
code after the model keeps working.

Guarantees: on success every output has exactly its recorded shape. An output
axis that changed but matches no merge stage raises ``CannotRewrite``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from turbo_fx import ops
from turbo_fx.errors import CannotRewrite

from .propagate_shapes import ShapeHints, changed_axes, run_node_on_fakes


def restore_outputs(
    gm: GraphModule,
    fake_mode,
    old_values: dict[Node, Any],
    assign_by_count: dict[int, Node],
    hints: ShapeHints,
) -> int:
    """Insert ``restore_tokens`` for changed outputs; returns how many outputs were restored."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    env = {n: n.meta.get("example_value") for n in gm.graph.nodes if n.op != "output"}
    restored: dict[Node, Node] = {}

    def restore(node: Node) -> Node:
        if node in restored:
            return restored[node]
        old, new = old_values.get(node), node.meta.get("example_value")
        if not isinstance(old, torch.Tensor) or not isinstance(new, torch.Tensor):
            return node
        axes = changed_axes(old.shape, new.shape, hints)
        current = node
        for axis in axes:
            count = hints.shape(new.shape)[axis]
            assign = assign_by_count.get(count)
            if assign is None or axis == 0:
                raise CannotRewrite(
                    f"output {node.name} changed axis {axis} to {count}, which matches no merge stage"
                )
            with gm.graph.inserting_before(output):
                current = gm.graph.call_function(ops.restore_tokens, (current, assign, axis))
            value = run_node_on_fakes(gm, current, env, fake_mode)
            env[current] = value
            current.meta["example_value"] = value
        if hints.shape(current.meta["example_value"].shape) != hints.shape(old.shape):
            raise CannotRewrite(f"output {node.name} could not be restored to {tuple(old.shape)}")
        restored[node] = current
        return current

    output.args = map_arg(output.args, restore)
    return sum(1 for k, v in restored.items() if k is not v)

