"""Analysis: properties of a Dynamo graph that decide how it may be compiled and guarded.

Matches nothing and changes nothing: each function reads ``gm`` and returns the reason a
property holds (a string naming the node), or None. The plan (``turbo_fx.plan``) asks once per
graph; the block-by-block compile and the run-time guard act on its answers:

  * dynamic shapes: a compile from one call's concrete inputs fits only their shapes;
  * in-place updates: a graph that writes into an input or buffer must not run twice for
    one call (a compile-time run, or a re-run after a failure, would apply the update again);
  * random draws: a compile-time run would consume the user's random stream;
  * gradients: the block-by-block compile is for inference.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch.fx import GraphModule, Node


@dataclass(frozen=True)
class GraphTraits:
    """The answers for one graph, each a reason or None."""

    dynamic_shapes: Optional[str] = None
    in_place: Optional[str] = None
    random: Optional[str] = None
    gradients: Optional[str] = None

    @property
    def split_refusal(self) -> Optional[str]:
        """Why the graph cannot be compiled block by block, or None."""
        return self.dynamic_shapes or self.in_place or self.random or self.gradients


def graph_traits(gm: GraphModule, example_inputs: Sequence[Any]) -> GraphTraits:
    grads = torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs)
    return GraphTraits(
        dynamic_shapes=dynamic_shape_reason(gm, example_inputs),
        in_place=in_place_reason(gm),
        random=random_reason(gm),
        gradients="gradients are recorded (block-by-block compile is for inference)" if grads else None,
    )


def dynamic_shape_reason(gm: GraphModule, example_inputs: Sequence[Any]) -> Optional[str]:
    """Why ``gm`` (a Dynamo graph) has dynamic shapes, or None where every input is static."""
    if any(not isinstance(x, torch.Tensor) for x in example_inputs):
        return "the graph takes non-tensor (symbolic) inputs: dynamic shapes"
    for node in gm.graph.nodes:
        value = node.meta.get("example_value")
        if node.op == "placeholder" and isinstance(value, torch.Tensor) and any(
                isinstance(s, torch.SymInt) for s in value.shape):
            return f"input {node.name} has a dynamic shape"
    return None


def random_reason(gm: GraphModule) -> Optional[str]:
    """Which node of ``gm`` draws random numbers, or None."""
    for node in gm.graph.nodes:
        if _draws_random(node):
            return f"node {node.name} ({node.target}) draws random numbers (the compile run would consume them)"
    return None


def in_place_reason(gm: GraphModule) -> Optional[str]:
    """Which node of ``gm`` updates a tensor in place, or None."""
    for node in gm.graph.nodes:
        if _mutates(node):
            return f"node {node.name} ({node.target}) updates a tensor in place"
    return None


def _mutates(node: Node) -> bool:
    """Whether ``node`` writes into a tensor: ``x.add_()``, ``torch.relu_(x)``, an op whose
    schema says so, ``x[i] = v`` or ``x += y`` as Dynamo records them."""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op != "call_function":
        return False
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        return schema.is_mutable
    name = getattr(node.target, "__name__", "")
    if getattr(node.target, "__module__", None) in ("_operator", "operator"):
        # operator.and_ / or_ are not in place; operator.iadd, iand ... and setitem are.
        return name in ("setitem", "delitem") or (
            name.startswith("i") and (hasattr(operator, name[1:]) or hasattr(operator, name[1:] + "_")))
    return name.endswith("_") and not name.endswith("__")


# Random draws by name as Dynamo records them (torch functions, Tensor methods); aten
# overloads say so with a tag. Dropouts draw only when training, and their defaults differ.
_RANDOM_FUNCTIONS = frozenset({"rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like",
                               "bernoulli", "multinomial", "normal", "poisson", "native_dropout"})
_DROPOUT_TRAINING_DEFAULT = {"dropout": True, "dropout1d": True, "dropout2d": True, "dropout3d": True,
                             "alpha_dropout": False, "feature_alpha_dropout": False}


def _draws_random(node: Node) -> bool:
    """Whether ``node`` consumes the random number generator: running it once at compile
    time would change every random number the user draws afterwards."""
    if node.op not in ("call_function", "call_method"):
        return False
    if torch.Tag.nondeterministic_seeded in getattr(node.target, "tags", ()):
        return True
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if name in _RANDOM_FUNCTIONS:
        return True
    if name in _DROPOUT_TRAINING_DEFAULT:
        p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
        training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else _DROPOUT_TRAINING_DEFAULT[name])
        return training is not False and p != 0
    return False
