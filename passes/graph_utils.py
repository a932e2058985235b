"""Small matchers over torch-level (Dynamo) FX nodes, shared by the passes."""
from __future__ import annotations

import operator
from collections import deque
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch.fx import Node

SDPA_TARGETS = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
ADD_METHODS = {"add", "add_", "__add__", "__iadd__"}
MATMUL_FUNCTIONS = {torch.matmul, operator.matmul, torch.bmm}
MATMUL_METHODS = {"matmul", "bmm", "__matmul__"}
SOFTMAX_FUNCTIONS = {torch.softmax, F.softmax, torch.Tensor.softmax}
SOFTMAX_METHODS = {"softmax"}
LAYER_NORM_FUNCTIONS = {F.layer_norm, torch.layer_norm}
TRANSPOSE_FUNCTIONS = {torch.transpose}
TRANSPOSE_METHODS = {"transpose", "mT"}
# Ops that keep every axis in place and only change values or dtype: the chain
# between attention's matmul and softmax, and between softmax and the value matmul.
PASSTHROUGH_FUNCTIONS = {
    operator.mul, operator.truediv, torch.mul, torch.div, F.dropout, torch.dropout,
    torch.nn.functional.dropout,
}
PASSTHROUGH_METHODS = {"mul", "div", "to", "float", "type", "type_as", "contiguous", "__mul__", "__truediv__"}


def is_merge(node: Node) -> bool:
    """A merge inserted by turbo: the opaque op or, with ``fuse_merges``, the plain function."""
    from turbo_fx import ops

    return node.op == "call_function" and node.target in (ops.merge_block, torch.ops.turbo_fx.merge_block.default)


def is_call(node: Node, functions: set, methods: set = frozenset()) -> bool:
    if node.op == "call_function":
        return node.target in functions
    if node.op == "call_method":
        return node.target in methods
    return False


def is_sdpa(node: Node) -> bool:
    return node.op == "call_function" and node.target in SDPA_TARGETS


def is_add(node: Node) -> bool:
    return is_call(node, ADD_FUNCTIONS, ADD_METHODS)


def is_matmul(node: Node) -> bool:
    return is_call(node, MATMUL_FUNCTIONS, MATMUL_METHODS)


def is_softmax(node: Node) -> bool:
    return is_call(node, SOFTMAX_FUNCTIONS, SOFTMAX_METHODS)


def is_layer_norm(node: Node) -> bool:
    return is_call(node, LAYER_NORM_FUNCTIONS)


def is_passthrough(node: Node) -> bool:
    return is_call(node, PASSTHROUGH_FUNCTIONS, PASSTHROUGH_METHODS)


def sdpa_arg(node: Node, name: str, default: Any = None) -> Any:
    """An SDPA call's argument by name, whether passed by position or keyword."""
    index = SDPA_PARAMS.index(name)
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def set_sdpa_arg(node: Node, name: str, value: Any) -> None:
    index = SDPA_PARAMS.index(name)
    if len(node.args) > index:
        args = list(node.args)
        args[index] = value
        node.args = tuple(args)
    else:
        node.update_kwarg(name, value)


def _reachable(start: Iterable[Node], step: Callable[[Node], Iterable[Node]],
               stop: Optional[Callable[[Node], bool]] = None) -> set[Node]:
    seen: set[Node] = set()
    queue = deque(start)
    while queue:
        n = queue.popleft()
        if n in seen:
            continue
        seen.add(n)
        if stop is None or not stop(n):
            queue.extend(step(n))
    return seen


def ancestors(node: Node, stop: Optional[Callable[[Node], bool]] = None) -> set[Node]:
    """Every node ``node`` depends on (not including itself); ``stop`` ends a path at a node."""
    return _reachable(node.all_input_nodes, lambda n: n.all_input_nodes, stop)


def example_value(node: Any) -> Any:
    if isinstance(node, Node):
        return node.meta.get("example_value")
    return node


def tensor_shape(node: Any) -> Optional[tuple]:
    value = example_value(node)
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    return None


def module_path(node: Node) -> str:
    """The dotted path of the module a node came from, as Dynamo recorded it."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return _clean_path(path)


def _clean_path(path: str) -> str:
    # Dynamo records "L['self'].blocks[0].attn" or "L__self___blocks_0_attn".
    path = path.replace("L['self'].", "").replace("L['self']", "")
    return path


def placeholder_is_parameter(node: Node) -> bool:
    """A graph input that is a parameter or buffer of the model (not user data)."""
    if node.op == "get_attr":
        return True
    if node.op != "placeholder":
        return False
    grapharg = node.meta.get("grapharg")
    if grapharg is not None:
        example = getattr(grapharg, "example", None)
        if isinstance(example, torch.nn.Parameter):
            return True
        source = getattr(grapharg, "source", None)
        name = getattr(source, "name", "") if source is not None else ""
        name = name() if callable(name) else name
        return "._parameters[" in name or "._buffers[" in name
    return False


def depends_on_data(node: Node) -> bool:
    """True if any graph input the node derives from is user data rather than a parameter."""
    for n in ancestors(node) | {node}:
        if n.op == "placeholder" and not placeholder_is_parameter(n):
            value = example_value(n)
            if isinstance(value, torch.Tensor):
                return True
    return False
