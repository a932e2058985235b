"""Small matchers over torch-level (Dynamo) FX nodes, shared by the passes."""
from __future__ import annotations

import inspect
import operator
import re
from collections import deque
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from turbo_fx import ops
from turbo_fx.torch_compat import is_fake, sdpa_functions

SDPA_TARGETS = sdpa_functions()
SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
PACKED_ATTENTION_TARGETS = {F.multi_head_attention_forward}
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


def is_packed_attention(node: Node) -> bool:
    """``F.multi_head_attention_forward``: nn.MultiheadAttention reaches Dynamo's graph as this one call."""
    return node.op == "call_function" and node.target in PACKED_ATTENTION_TARGETS


def packed_attention_args(node: Node) -> dict[str, Any]:
    """Every argument of a packed attention call by name, defaults filled in."""
    bound = inspect.signature(F.multi_head_attention_forward).bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def set_packed_attention_arg(node: Node, name: str, value: Any) -> None:
    _set_call_arg(node, list(inspect.signature(F.multi_head_attention_forward).parameters).index(name), name, value)


def is_attention_call(node: Node) -> bool:
    """An SDPA call, packed attention, the probabilities-times-values product of explicit
    attention (a matmul whose first operand is a softmax, or a dropout of one), or the attention
    that ranks a language model's placeholder tokens (``ops.text_attention_to_placeholders``)."""
    if is_sdpa(node) or is_packed_attention(node):
        return True
    if node.op == "call_function" and node.target is ops.text_attention_to_placeholders:
        return True
    if not is_matmul(node) or not isinstance(node.args[0], Node):
        return False
    probs = node.args[0]
    while probs.target is F.dropout or is_passthrough(probs):
        if not isinstance(probs.args[0], Node):
            return False
        probs = probs.args[0]
    return is_softmax(probs)


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
    _set_call_arg(node, SDPA_PARAMS.index(name), name, value)


def _set_call_arg(node: Node, index: int, name: str, value: Any) -> None:
    """Set a call's argument where it was passed: by position when the call has that many
    positional arguments, else by keyword."""
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


CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}


def token_cat_axis(node: Node) -> Optional[int]:
    """For a ``cat`` along a token axis ([B, N, C] tokens on axis 1, [B, H, N, D] keys on
    axis 2: a key cache's past and new keys), that axis; None for any other node."""
    if node.op != "call_function" or node.target not in CAT_FUNCTIONS:
        return None
    shape = tensor_shape(node)
    if shape is None or len(shape) not in (3, 4) or not isinstance(node.args[0], (list, tuple)):
        return None
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    if not isinstance(dim, int):
        return None
    axis = dim % len(shape)
    return axis if axis == len(shape) - 2 else None


def is_token_cat(node: Node) -> bool:
    """A ``cat`` of [B, N, C] sequences along the token axis."""
    return token_cat_axis(node) == 1


def descendants(node: Node) -> set[Node]:
    """Every node that depends on ``node`` (not including itself)."""
    return _reachable(node.users, lambda n: n.users)


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
    """The dotted path of the module a node came from, as a user writes it
    (``down_blocks.0.attentions.0.transformer_blocks.0.attn2``: a key of ``named_modules()``)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return readable_module_path(list(stack.values())[-1][0])


# One step of a Dynamo source path: a container hop (``__dict__['_modules']``, ``._modules``,
# ``._parameters``), a subscript (``['norm']``, ``[0]``) or an attribute (``.attn2``, ``.0``).
_CONTAINER = r"\.?(?:__dict__\[['\"]_(?:modules|parameters|buffers)['\"]\]|_(?:modules|parameters|buffers)\b(?!\w))"
_PATH_STEP = re.compile(
    rf"(?P<container>{_CONTAINER})|\[['\"](?P<key>[^'\"]+)['\"]\]|\[(?P<index>-?\d+)\]|\.(?P<attr>\w+)"
)
_ROOT = re.compile(r"^L\[['\"][^'\"]+['\"]\]")


def readable_module_path(path: str) -> str:
    """``L['self'].__dict__['_modules']['down_blocks'].0.attn1`` -> ``down_blocks.0.attn1``.

    Dynamo names a module by the source expression it was reached through; the root
    (``L['self']``) and the containers ``nn.Module`` keeps children in are not part of the
    name a user writes. A path this does not parse (older flattened names such as
    ``L__self___blocks_0``) comes back as it was, less the root."""
    rest = _ROOT.sub("", path, count=1)
    parts: list[str] = []
    pos = 0
    while pos < len(rest):
        step = _PATH_STEP.match(rest, pos)
        if step is None:
            return path.replace("L['self'].", "").replace("L['self']", "")
        if not step.group("container"):
            parts.append(step.group("key") or step.group("index") or step.group("attr"))
        pos = step.end()
    return ".".join(parts)


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


def graph_fake_mode(gm: GraphModule):
    """The fake mode the graph's recorded values live in (Dynamo's), or None."""
    for node in gm.graph.nodes:
        value = node.meta.get("example_value")
        if is_fake(value):
            return value.fake_mode
    return None
