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

import functools
import inspect
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
    """Whether ``node`` writes into a tensor, by its name or by an argument that asks it to."""
    if node.op not in ("call_function", "call_method"):
        return False
    return _writes_by_name(node) or _writes_by_argument(node)


def _writes_by_name(node: Node) -> bool:
    """``x.add_()``, ``torch.relu_(x)``, an op whose schema says so, ``x[i] = v`` or ``x += y``
    as Dynamo records them."""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        return schema.is_mutable
    name = getattr(node.target, "__name__", "")
    if getattr(node.target, "__module__", None) in ("_operator", "operator"):
        # operator.and_ / or_ are not in place; operator.iadd, iand ... and setitem are.
        return name in ("setitem", "delitem") or (
            name.startswith("i") and (hasattr(operator, name[1:]) or hasattr(operator, name[1:] + "_")))
    return name.endswith("_") and not name.endswith("__")


# Norms that update the running statistics they are given, and the flag that makes them do so.
_RUNNING_STATISTICS = {"batch_norm": "training", "instance_norm": "use_input_stats"}
# Parameter names of torch functions that Dynamo may record and ``inspect`` cannot read (the
# functional forms above are Python functions, read by their signatures).
_BUILTIN_PARAMETERS = {
    torch.batch_norm: ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps",
                       "cudnn_enabled"),
    torch.instance_norm: ("input", "weight", "bias", "running_mean", "running_var", "use_input_stats", "momentum",
                          "eps", "cudnn_enabled"),
}


def _writes_by_argument(node: Node) -> bool:
    """A call that is one node in Dynamo's graph but writes into a tensor it is given:
    ``out=``, ``inplace=True`` (``nn.functional``'s activations and dropouts), and a norm that
    updates running statistics (``F.batch_norm(..., training=True)``)."""
    if node.kwargs.get("out") is not None:
        return _outlives_the_call(node.kwargs["out"])
    arguments = _arguments(node)
    if arguments is None:
        return False
    name = getattr(node.target, "__name__", "")
    if _may_be_true(arguments.get("inplace")):
        # An in-place dropout that draws nothing returns its input untouched.
        writes = name not in _DROPOUT_TRAINING_DEFAULT or _draws_random(node)
        return writes and _outlives_the_call(arguments.get("input", node.args[0] if node.args else None))
    flag = _RUNNING_STATISTICS.get(name)
    return (flag is not None and _may_be_true(arguments.get(flag))
            and any(arguments.get(s) is not None for s in ("running_mean", "running_var")))


# Calls whose result may share memory with their first argument: a write into the result is a
# write into that argument.
_ALIASING_METHODS = frozenset({"view", "view_as", "reshape", "reshape_as", "transpose", "permute", "expand",
                               "expand_as", "unsqueeze", "squeeze", "narrow", "select", "t", "flatten", "unflatten",
                               "contiguous", "detach", "as_strided", "unfold", "diagonal", "movedim", "swapaxes",
                               "split", "chunk", "unbind", "to", "type_as", "float", "half", "bfloat16", "double",
                               "__getitem__"})


def _outlives_the_call(written: Any) -> bool:
    """Whether a tensor written in place lives beyond one call of the graph: a graph input, a
    parameter or buffer, or a view of one. A write into a tensor the graph made in the same
    call (``F.relu(conv(x), inplace=True)``) is repeated by a second run exactly."""
    seen = 0
    while isinstance(written, Node) and seen < 64:
        if written.op in ("placeholder", "get_attr"):
            return True
        name = written.target if isinstance(written.target, str) else getattr(written.target, "__name__", "")
        if name not in _ALIASING_METHODS and name != "getitem" or not written.args:
            return False
        written, seen = written.args[0], seen + 1
    return isinstance(written, Node)


def _may_be_true(value: Any) -> bool:
    """Whether an argument may be true when the graph runs: anything but a literal false
    value (an argument computed in the graph counts as true)."""
    return not (value is None or (isinstance(value, (bool, int)) and not value))


def _arguments(node: Node) -> Optional[dict]:
    """``node``'s arguments by parameter name, defaults included, or None where its target's
    parameters are unknown (a Tensor method, a builtin outside ``_BUILTIN_PARAMETERS``)."""
    if node.op != "call_function":
        return None
    try:
        names = _BUILTIN_PARAMETERS.get(node.target)
        signature = None if names is not None else _signature(node.target)
    except TypeError:  # an unhashable target: in no table, and its signature is not kept
        return None
    if names is not None:
        return {**dict(zip(names, node.args)), **node.kwargs}
    if signature is None:
        return None
    try:
        bound = signature.bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return bound.arguments


@functools.lru_cache(maxsize=256)
def _signature(target: Any) -> Optional[inspect.Signature]:
    """The signature of a Python function (kept: a graph calls the same few many times), or
    None for builtins, whose parameters ``inspect`` could only guess from their text."""
    try:
        if not callable(target) or not inspect.isfunction(inspect.unwrap(target)):
            return None
        return inspect.signature(target)
    except (TypeError, ValueError):
        return None


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
    if name in ("rrelu", "rrelu_"):  # draws its slopes when training, which is not its default
        return _may_be_true(node.kwargs.get("training", node.args[3] if len(node.args) > 3 else False))
    if name in _DROPOUT_TRAINING_DEFAULT:
        p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
        training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else _DROPOUT_TRAINING_DEFAULT[name])
        return training is not False and p != 0
    return False
