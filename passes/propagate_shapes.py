"""Pass: re-propagate shapes after merges, rewriting size literals that carried the old token count.

Dynamo records sizes as Python ints: ``reshape(x, 8, 197, 3, 6, 64)`` must become
``reshape(x, 8, 189, 3, 6, 64)`` once 8 tokens merged. This pass re-runs every node
downstream of a change on FakeTensors (the graph's own fake mode) and, where a
shape-taking node (view, reshape, expand) sees an input whose shape differs from
the one recorded, maps each changed input axis onto the output axis that holds it
(by running products of the recorded input and output shapes) and rewrites that
entry. It never searches for the number itself, so a head dim equal to the token
count is left alone. Indexing on a token axis is allowed only where it means the
same after merging (protected tokens, full slices).

Guarantees: on success every node's ``meta["example_value"]`` holds its new fake
value and the graph is consistent. On anything it cannot rewrite (a token axis
split into a grid, a split or unbind along it, an index into merged tokens, an op
that fails on the new shapes) it raises ``CannotRewrite`` naming the node; the
caller then discards the whole rewritten graph.
"""
from __future__ import annotations

import operator
from typing import Any, Iterable, Optional

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

RESHAPE_METHODS = {"view", "reshape"}
RESHAPE_FUNCTIONS = {torch.reshape}
EXPAND_METHODS = {"expand"}
# Where the ``dim`` argument sits (tensor first) for ops whose meaning depends on the
# token count when applied along the token axis.
DIM_ARG_POSITION = {"split": 2, "unflatten": 1, "unbind": 1, "chunk": 2, "narrow": 1, "select": 1, "tensor_split": 2}


class CannotRewrite(RuntimeError):
    """The graph cannot be rewritten safely; the message says where and why."""


def propagate_shapes(
    gm: GraphModule,
    fake_mode,
    old_values: dict[Node, Any],
    touched: Iterable[Node],
    protected: int,
) -> set[Node]:
    """Re-run the nodes affected by ``touched`` (new or edited nodes) on fake tensors,
    rewriting shape arguments as described in the module docstring. Returns the
    nodes whose output shape changed."""
    dirty = set(touched)
    changed: set[Node] = set()
    env: dict[Node, Any] = {}
    for node in list(gm.graph.nodes):
        if node.op == "output":
            continue
        affected = node in dirty or any(i in changed for i in node.all_input_nodes)
        if not affected:
            env[node] = _recorded_value(gm, node, fake_mode)
            continue
        _rewrite_shape_args(gm, node, env, old_values, changed, protected, fake_mode)
        value = _run_node(gm, node, env, fake_mode)
        env[node] = value
        node.meta["example_value"] = value
        if node not in old_values or not _same_shapes(old_values[node], value):
            changed.add(node)
    return changed


def _recorded_value(gm: GraphModule, node: Node, fake_mode) -> Any:
    if "example_value" in node.meta:
        return node.meta["example_value"]
    if node.op == "get_attr":
        value = _fetch_attr(gm, node.target)
        return fake_mode.from_tensor(value) if isinstance(value, torch.Tensor) else value
    raise CannotRewrite(f"node {node.name} has no recorded value")


def _fetch_attr(gm: GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _run_node(gm: GraphModule, node: Node, env: dict, fake_mode) -> Any:
    args = map_arg(node.args, lambda n: env[n])
    kwargs = map_arg(node.kwargs, lambda n: env[n])
    grad = torch.is_grad_enabled()
    try:
        with fake_mode:
            if node.op == "call_function":
                return node.target(*args, **kwargs)
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            if node.op == "call_module":
                return gm.get_submodule(node.target)(*args, **kwargs)
            if node.op in ("placeholder", "get_attr"):
                return _recorded_value(gm, node, fake_mode)
    except CannotRewrite:
        raise
    except Exception as exc:  # any failure on the new shapes means we cannot rewrite
        raise CannotRewrite(f"{node.format_node()} fails after merging: {type(exc).__name__}: {exc}") from exc
    finally:
        torch.set_grad_enabled(grad)
    raise CannotRewrite(f"unsupported node kind {node.op}")


def _same_shapes(old: Any, new: Any) -> bool:
    if isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor):
        return _hints(old.shape) == _hints(new.shape) and old.dtype == new.dtype
    if isinstance(old, (tuple, list)) and isinstance(new, (tuple, list)):
        return len(old) == len(new) and all(_same_shapes(a, b) for a, b in zip(old, new))
    if isinstance(old, torch.Tensor) or isinstance(new, torch.Tensor):
        return False
    return True


def hint(value: Any) -> int:
    """A concrete int for a size, using the shape environment's hint for SymInts."""
    if isinstance(value, torch.SymInt):
        node = value.node
        if node.hint is not None:
            return int(node.hint)
        return int(node.shape_env.size_hint(node.expr))
    return int(value)


def _hints(shape) -> tuple[int, ...]:
    return tuple(hint(d) for d in shape)


def _input_shapes(node: Node, src: Any, env: dict, old_values: dict):
    old = old_values.get(src)
    new = env.get(src)
    if not isinstance(old, torch.Tensor) or not isinstance(new, torch.Tensor):
        return None
    return old.shape, new.shape


def _changed_axes(old_shape, new_shape) -> list[int]:
    if len(old_shape) != len(new_shape):
        raise CannotRewrite(f"rank changed from {tuple(old_shape)} to {tuple(new_shape)}")
    return [a for a, (o, n) in enumerate(zip(_hints(old_shape), _hints(new_shape))) if o != n]


def _rewrite_shape_args(gm, node, env, old_values, changed, protected, fake_mode) -> None:
    if node.op not in ("call_method", "call_function") or not node.args:
        return
    src = node.args[0]
    if not isinstance(src, Node) or src not in changed:
        return
    shapes = _input_shapes(node, src, env, old_values)
    if shapes is None:
        return
    old_in, new_in = shapes
    axes = _changed_axes(old_in, new_in)
    if not axes:
        return
    is_method = node.op == "call_method"
    if (is_method and node.target in RESHAPE_METHODS) or (not is_method and node.target in RESHAPE_FUNCTIONS):
        _rewrite_reshape(gm, node, old_in, new_in, axes, old_values, env, fake_mode)
    elif is_method and node.target in EXPAND_METHODS:
        _rewrite_expand(node, old_in, new_in, axes)
    elif not is_method and node.target is operator.getitem:
        _check_and_fix_index(node, old_in, axes, protected)
    else:
        _check_axis_ops(node, old_in, axes, protected)


def _shape_spec(node: Node) -> tuple[list, bool]:
    """The requested shape of a view/reshape/expand and whether it was passed as one sequence."""
    rest = list(node.args[1:])
    if "size" in node.kwargs or "shape" in node.kwargs:
        return list(node.kwargs.get("size", node.kwargs.get("shape"))), True
    if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)):
        return list(rest[0]), True
    return rest, False


def _set_shape_spec(node: Node, spec: list, packed: bool) -> None:
    if "size" in node.kwargs or "shape" in node.kwargs:
        key = "size" if "size" in node.kwargs else "shape"
        node.update_kwarg(key, tuple(spec))
    elif packed:
        node.args = (node.args[0], tuple(spec))
    else:
        node.args = (node.args[0], *spec)


def _prefix_products(shape: list[int]) -> list[int]:
    out = [1]
    for d in shape:
        out.append(out[-1] * d)
    return out


def _rewrite_reshape(gm, node, old_in, new_in, axes, old_values, env, fake_mode) -> None:
    old_out_value = old_values.get(node)
    if not isinstance(old_out_value, torch.Tensor):
        raise CannotRewrite(f"{node.name}: no recorded output shape")
    old_out = _hints(old_out_value.shape)
    old_in_h, new_in_h = _hints(old_in), _hints(new_in)
    in_pre, out_pre = _prefix_products(list(old_in_h)), _prefix_products(list(old_out))
    factors: dict[int, list[int]] = {}
    for a in axes:
        lo, hi = in_pre[a], in_pre[a + 1]
        j = _covering_axis(out_pre, lo, hi)
        if j is None:
            raise CannotRewrite(
                f"{node.format_node()} splits the token axis {a} of {tuple(old_in_h)} into {tuple(old_out)} "
                "(e.g. back into an image grid); merged tokens have no grid position"
            )
        old_f, new_f = factors.setdefault(j, [1, 1])
        factors[j] = [old_f * old_in_h[a], new_f * new_in_h[a]]
    spec, packed = _shape_spec(node)
    if len(spec) != len(old_out):
        raise CannotRewrite(f"{node.name}: shape spec {spec} does not match output rank {len(old_out)}")
    for j, (old_f, new_f) in factors.items():
        spec[j] = _scaled_entry(gm, node, spec[j], old_f, new_f, env, fake_mode)
    _set_shape_spec(node, spec, packed)


def _covering_axis(out_pre: list[int], lo: int, hi: int) -> Optional[int]:
    for j in range(len(out_pre) - 1):
        if out_pre[j] <= lo and out_pre[j + 1] >= hi and lo % out_pre[j] == 0 and out_pre[j + 1] % hi == 0:
            return j
    return None


def _scaled_entry(gm, node, entry, old_f: int, new_f: int, env, fake_mode):
    if isinstance(entry, int) and not isinstance(entry, bool):
        if entry == -1:
            return entry
        if entry % old_f != 0:
            raise CannotRewrite(f"{node.name}: size {entry} is not a multiple of the token count {old_f}")
        return entry // old_f * new_f
    if isinstance(entry, Node):
        # A symbolic size such as batch * 197: rewrite as entry // 197 * 189 in the graph.
        with gm.graph.inserting_before(node):
            div = gm.graph.call_function(operator.floordiv, (entry, old_f))
            mul = gm.graph.call_function(operator.mul, (div, new_f))
        for n in (div, mul):
            value = _run_node(gm, n, env, fake_mode)
            env[n] = value
            n.meta["example_value"] = value
        return mul
    raise CannotRewrite(f"{node.name}: cannot rewrite size entry {entry!r}")


def _rewrite_expand(node: Node, old_in, new_in, axes) -> None:
    spec, packed = _shape_spec(node)
    offset = len(spec) - len(old_in)
    old_in_h = _hints(old_in)
    for a in axes:
        j = a + offset
        entry = spec[j]
        if isinstance(entry, int) and entry == -1:
            continue
        if isinstance(entry, int) and entry == old_in_h[a]:
            spec[j] = new_in[a]
            continue
        raise CannotRewrite(f"{node.format_node()}: cannot map expand size {entry!r} on token axis {a}")
    _set_shape_spec(node, spec, packed)


def _check_and_fix_index(node: Node, old_in, axes, protected: int) -> None:
    index = node.args[1]
    items = list(index) if isinstance(index, tuple) else [index]
    consuming = [i for i in items if i is not None and i is not Ellipsis]
    rank = len(old_in)
    old_h = _hints(old_in)
    axis = 0
    new_items = []
    for item in items:
        if item is None:
            new_items.append(item)
            continue
        if item is Ellipsis:
            axis += rank - len(consuming)
            new_items.append(item)
            continue
        if axis in axes:
            item = _token_axis_index(node, item, old_h[axis], protected)
        new_items.append(item)
        axis += 1
    node.args = (node.args[0], tuple(new_items) if isinstance(index, tuple) else new_items[0])


def _token_axis_index(node: Node, item: Any, old_n: int, protected: int) -> Any:
    where = f"{node.format_node()} indexes the token axis"
    if isinstance(item, int) and not isinstance(item, bool):
        if 0 <= item < protected:
            return item
        raise CannotRewrite(f"{where} at {item}, which is not a protected token")
    if isinstance(item, slice):
        if item.step not in (None, 1):
            raise CannotRewrite(f"{where} with a step")
        start, stop = item.start, item.stop
        if start is not None and not (isinstance(start, int) and 0 <= start <= protected):
            raise CannotRewrite(f"{where} from {start}, inside the merged tokens")
        if stop is not None:
            if not isinstance(stop, int):
                raise CannotRewrite(f"{where} with a symbolic end")
            if stop >= old_n:
                stop = None
            elif not 0 <= stop <= protected:
                raise CannotRewrite(f"{where} up to {stop}, inside the merged tokens")
        return slice(start, stop, item.step)
    raise CannotRewrite(f"{where} with {type(item).__name__}")


def _check_axis_ops(node: Node, old_in, axes, protected: int) -> None:
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if name not in DIM_ARG_POSITION:
        return
    position = DIM_ARG_POSITION[name]
    dim = node.kwargs.get("dim", node.args[position] if len(node.args) > position else 0)
    if not isinstance(dim, int):
        raise CannotRewrite(f"{node.format_node()}: non-constant dim")
    dim %= len(old_in)
    if dim not in axes:
        return
    if name == "select":
        index = node.args[2] if len(node.args) > 2 else node.kwargs.get("index")
        if isinstance(index, int) and 0 <= index < protected:
            return
    raise CannotRewrite(f"{node.format_node()}: {name} along the token axis depends on the token count")
