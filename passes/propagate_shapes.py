"""Pass: re-propagate shapes after merges, rewriting size literals that carried the old token count.

Dynamo records sizes as Python ints: ``reshape(x, 8, 197, 3, 6, 64)`` must become
``reshape(x, 8, 189, 3, 6, 64)`` once 8 tokens merged. This pass re-runs every node
downstream of a change on FakeTensors (the graph's own fake mode) and, where a
shape-taking node (view, reshape, expand) sees an input whose shape differs from
the one recorded, maps each changed input axis onto the output axis that holds it
(by running products of the recorded input and output shapes) and rewrites that
entry. It never searches for the number itself, so a head dim equal to the token
count is left alone. Indexing on a token axis is allowed only where it means the
same after merging (protected tokens at the front, tokens of another sequence put in front
of them by a ``cat``, protected tokens at the end by negative index, full slices). A
per-token table combined with merged tokens (a position embedding added to them, a rotary
cos/sin table multiplied with them) is merged like them (``token_tables``).

Guarantees: on success every node's ``meta["example_value"]`` holds its new fake
value and the graph is consistent. On anything it cannot rewrite (a token axis
split into a grid, a split or unbind along it, an index into merged tokens, an op
that fails on the new shapes) it raises ``CannotRewrite`` naming the node; the
caller then discards the whole rewritten graph.
"""
from __future__ import annotations

import logging
import operator
from collections import deque
from typing import Any, Iterable, Optional

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from turbo_fx import torch_compat
from turbo_fx.errors import CannotRewrite

from turbo_fx import ops
from turbo_fx.report import counters

from .graph_utils import CAT_FUNCTIONS, is_merge, is_sdpa, is_token_cat, token_cat_axis
from .token_tables import TableUse, angle_chain, table_operand

log = logging.getLogger("turbo_fx")

RESHAPE_METHODS = {"view", "reshape"}
RESHAPE_FUNCTIONS = {torch.reshape}
EXPAND_METHODS = {"expand"}
# Where the ``dim`` argument sits (tensor first) for ops whose meaning depends on the
# token count when applied along the token axis.
DIM_ARG_POSITION = {"split": 2, "unflatten": 1, "unbind": 1, "chunk": 2, "narrow": 1, "select": 1, "tensor_split": 2}


def propagate_shapes(
    gm: GraphModule,
    fake_mode,
    old_values: dict[Node, Any],
    touched: Iterable[Node],
    protected: int,
    hints: Optional["ShapeHints"] = None,
    tail: int = 0,
    assign_by_count: Optional[dict[int, Node]] = None,
    read_sizes: bool = False,
    rotary: str = "rows",
    table_facts: Optional[list[str]] = None,
) -> set[Node]:
    """Re-run the nodes affected by ``touched`` (new or edited nodes) on fake tensors,
    rewriting shape arguments as described in the module docstring. Returns the
    nodes whose output shape changed; ``hints`` learns the unbacked token counts.
    ``tail``: protected tokens at the end (negative indices into them keep their meaning).
    ``assign_by_count``: where each original token is, by merged token count; with it, a
    per-token table combined with merged tokens is merged too (``token_tables``).
    ``read_sizes``: a rewritten size entry reads the token count from its tensor
    (``aten.sym_size``) even where the count is concrete, as it does for unbacked counts, so
    that the rewritten graph holds no literal merged count: every block then has the same
    code, which a compile that gives each block's count as a symbolic size can share.
    ``rotary``: how a per-token table that meets merged tokens is merged (``token_tables``);
    ``table_facts`` receives one line per table merged, saying which rule it got."""
    propagation = _Propagation(gm, fake_mode, old_values, protected, hints or ShapeHints())
    propagation.tail, propagation.assign_by_count = tail, assign_by_count or {}
    propagation.read_sizes, propagation.rotary = read_sizes, rotary
    if table_facts is not None:
        propagation.table_facts = table_facts
    # Unbacked token counts made here live only in this graph's metadata; the inner
    # compiler re-traces and binds its own, so ours must not stay pending.
    with torch_compat.fresh_unbacked_symbols_dropped(getattr(fake_mode, "shape_env", None)):
        return propagation.run(set(touched))


def _recorded_value(gm: GraphModule, node: Node, fake_mode) -> Any:
    if "example_value" in node.meta:
        return node.meta["example_value"]
    if node.op == "get_attr":
        value = _fetch_attr(gm, node.target)
        return fake_mode.from_tensor(value) if isinstance(value, torch.Tensor) else value
    if node.op in ("call_function", "call_method") and not node.users:
        return None  # a call kept for its side effect (torch._C._log_api_usage_once): nothing reads it
    raise CannotRewrite(f"node {node.name} has no recorded value")


def _fetch_attr(gm: GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def run_node_on_fakes(gm: GraphModule, node: Node, env: dict, fake_mode) -> Any:
    """``node`` run on the fake values of ``env`` (its inputs); any failure on the new shapes
    becomes a ``CannotRewrite`` naming the node."""
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
        # The reason names the structure; the exception itself is for debugging only.
        log.debug("turbo: %s fails on the merged shapes", node.format_node(), exc_info=True)
        raise CannotRewrite(f"{node.format_node()} cannot take the merged token count: its inputs have "
                            f"shapes {_shapes(args, kwargs)} once tokens merge, and the op was recorded "
                            "for the unmerged ones") from exc
    finally:
        torch.set_grad_enabled(grad)
    raise CannotRewrite(f"unsupported node kind {node.op}")


def _shapes(args: Any, kwargs: dict) -> str:
    found: list[str] = []

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            found.append(str(tuple(int(d) if isinstance(d, int) else d for d in value.shape)))
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    visit(list(args) + list(kwargs.values()))
    return ", ".join(found) if found else "(no tensor)"


def _same_shapes(old: Any, new: Any, hints: ShapeHints) -> bool:
    if isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor):
        return hints.shape(old.shape) == hints.shape(new.shape) and old.dtype == new.dtype
    if isinstance(old, (tuple, list)) and isinstance(new, (tuple, list)):
        return len(old) == len(new) and all(_same_shapes(a, b, hints) for a, b in zip(old, new))
    if isinstance(old, torch.Tensor) or isinstance(new, torch.Tensor):
        return False
    return True


class ShapeHints:
    """Concrete ints for sizes. Backed SymInts use the shape environment's hints; the
    unbacked token counts that merges create (so Inductor can share kernels between
    blocks) use the values the pass knows they will have."""

    def __init__(self) -> None:
        self.known: dict = {}

    def __call__(self, value: Any) -> int:
        if isinstance(value, torch.SymInt):
            return torch_compat.concrete_size(value, self.known)
        return int(value)

    def shape(self, shape) -> tuple[int, ...]:
        return tuple(self(d) for d in shape)

    def learn(self, value: Any, known: int) -> None:
        if torch_compat.is_unbacked(value):
            self.known[torch_compat.size_expr(value)] = known


def changed_axes(old_shape, new_shape, hints: ShapeHints) -> list[int]:
    if len(old_shape) != len(new_shape):
        raise CannotRewrite(f"rank changed from {tuple(old_shape)} to {tuple(new_shape)}")
    return [a for a, (o, n) in enumerate(zip(hints.shape(old_shape), hints.shape(new_shape))) if o != n]


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


def _prefix_products(shape) -> list[int]:
    out = [1]
    for d in shape:
        out.append(out[-1] * d)
    return out


def _covering_axis(out_pre: list[int], lo: int, hi: int) -> Optional[int]:
    for j in range(len(out_pre) - 1):
        if out_pre[j] <= lo and out_pre[j + 1] >= hi and lo % out_pre[j] == 0 and out_pre[j + 1] % hi == 0:
            return j
    return None


class _Propagation:
    """One re-propagation over a graph: the fake values so far and what changed."""

    def __init__(self, gm: GraphModule, fake_mode, old_values: dict, protected: int, hints: ShapeHints) -> None:
        self.gm, self.fake_mode, self.old_values = gm, fake_mode, old_values
        self.protected, self.hints = protected, hints
        self.env: dict[Node, Any] = {}
        self.changed: set[Node] = set()
        self.tail = 0
        self.assign_by_count: dict[int, Node] = {}
        self.read_sizes = False
        self.rotary = "rows"
        self.tables: dict[tuple, Node] = {}
        self.whole_token_assigns: dict[tuple, Node] = {}
        self.layouts: dict[tuple, tuple[int, int]] = {}  # token_layout's answers; ancestors no longer change
        self.table_facts: list[str] = []

    def run(self, dirty: set[Node]) -> set[Node]:
        for node in list(self.gm.graph.nodes):
            if node.op == "output":
                continue
            if not (node in dirty or any(i in self.changed for i in node.all_input_nodes)):
                self.env[node] = _recorded_value(self.gm, node, self.fake_mode)
                continue
            self.restore_before_batch_fold(node)
            self.rewrite_shape_args(node)
            self.merge_token_table(node)
            value = self.evaluate(node)
            if is_merge(node):
                self.learn_merged_count(node, value)
            if node not in self.old_values or not _same_shapes(self.old_values[node], value, self.hints):
                self.changed.add(node)
        return self.changed

    def evaluate(self, node: Node) -> Any:
        value = run_node_on_fakes(self.gm, node, self.env, self.fake_mode)
        self.env[node] = value
        node.meta["example_value"] = value
        return value

    def learn_merged_count(self, node: Node, value: Any) -> None:
        tokens_in = self.hints(self.env[node.args[0]].shape[1])
        r = node.args[10]
        self.hints.learn(value[0].shape[1], tokens_in - r)

    def insert(self, before: Node, target, args: tuple) -> Node:
        with self.gm.graph.inserting_before(before):
            new = self.gm.graph.call_function(target, args)
        self.evaluate(new)
        return new

    def restore_before_batch_fold(self, node: Node) -> None:
        """A node that takes merged tokens out of their [B, N, ...] layout into one where the
        token axis no longer follows the batch (one sample picked, ``unbind`` over the batch,
        batch and tokens flattened together: LLaVA lists each image's tokens and concatenates
        them) reads them restored: what follows it runs on every original token, as readers
        after the graph would."""
        if not self.assign_by_count or not node.args or not _folds_batch(node):
            return
        src = node.args[0]
        if not isinstance(src, Node) or src not in self.changed:
            return
        old, new = self.old_values.get(src), self.env.get(src)
        if not isinstance(old, torch.Tensor) or not isinstance(new, torch.Tensor) or new.dim() < 3:
            return
        if changed_axes(old.shape, new.shape, self.hints) != [1]:
            return
        count = self.hints(new.shape[1])
        assign = self.assign_by_count.get(count)
        dropped = next((c - count for c in self.assign_by_count if 0 < c - count <= self.protected), None)
        if assign is None and dropped is not None:  # the protected tokens in front were sliced off
            assign = self.insert(node, ops.assign_after_prefix, (self.assign_by_count[count + dropped], dropped))
        if assign is None:
            return
        restored = self.insert(node, ops.restore_tokens, (src, assign, 1))
        node.replace_input_with(src, restored)

    def rewrite_shape_args(self, node: Node) -> None:
        if node.op not in ("call_method", "call_function") or not node.args:
            return
        src = node.args[0]
        if not isinstance(src, Node) or src not in self.changed:
            return
        old, new = self.old_values.get(src), self.env.get(src)
        if not isinstance(old, torch.Tensor) or not isinstance(new, torch.Tensor):
            return
        axes = changed_axes(old.shape, new.shape, self.hints)
        if not axes:
            return
        is_method = node.op == "call_method"
        if (is_method and node.target in RESHAPE_METHODS) or (not is_method and node.target in RESHAPE_FUNCTIONS):
            self.rewrite_reshape(node, src, old.shape, new.shape, axes)
        elif is_method and node.target in EXPAND_METHODS:
            self.rewrite_expand(node, src, old.shape, new.shape, axes)
        elif not is_method and node.target is operator.getitem:
            lead, trail = self.token_layout(src)
            _check_and_fix_index(node, self.hints.shape(old.shape), axes, lead, self.tail, trail)
        elif is_method and node.target in ("split", "split_with_sizes") and isinstance(_split_sizes(node), (list, tuple)):
            self.rewrite_split(node, src, old.shape, new.shape, axes)
        else:
            _check_axis_ops(node, old.shape, axes, self.fixed_prefix(src))

    def merge_token_table(self, node: Node) -> None:
        """An elementwise op of merged tokens and a table that still has one row per original
        token (``token_tables``): the op reads the table merged like the tokens."""
        use = table_operand(node, self.changed, self.old_values, self.env, self.hints)
        if use is None:
            return
        counts = sorted(self.assign_by_count)
        if not counts:
            self.merge_generation_table(node, use)
            return
        new_n = self.hints(self.env[use.tokens].shape[use.token_axis])
        offset = counts[-1] - use.n_before  # tokens the model sliced off the front before the op
        if not 0 <= offset <= self.protected or (offset and self.tail):
            raise CannotRewrite(f"{node.format_node()} combines merged tokens with a per-token table of "
                                f"{use.n_before} rows, which is not the sequence after its protected tokens")
        assign = self.assign_by_count.get(new_n + offset)
        if assign is None:
            raise CannotRewrite(f"{node.format_node()} combines merged tokens with a per-token table, and no "
                                f"merge state has {new_n + offset} tokens")
        if self.hints(self.env[use.tokens].shape[0]) != self.hints(self.env[assign].shape[0]):
            raise CannotRewrite(f"{node.format_node()} combines a per-token table with tokens whose first axis "
                                "is not the batch")
        merged = self.merged_table(node, use, assign, offset)
        node.replace_input_with(use.table, merged)

    def merge_generation_table(self, node: Node, use: TableUse) -> None:
        """Merge-and-restore mode: the table follows the merge of the component the tokens
        are in (found by walking back to its ``grid_merge`` or ``merge_by_plan`` call), whose
        input holds one row per table row."""
        merge = _producing_merge(use.tokens, self.changed)
        if merge is None:
            raise CannotRewrite(f"{node.format_node()} combines merged tokens with a per-token table, and no "
                                "merge they come from was found")
        assign, tokens_in = merge
        n_in = self.hints(self.env[tokens_in].shape[1])
        lead, trail = self.token_layout(use.tokens) if n_in != use.n_before else (0, 0)
        if self.rotary == "destination" and lead + n_in + trail == use.n_before:
            key = (use.table, assign, use.token_axis, self.env[use.tokens].dim())
            if key not in self.tables:
                dst = assign.args[0].args[1]  # getitem(grid_merge(x, dst, ...), 1)
                self.tables[key] = self.insert(node, ops.destination_token_rows,
                                               (use.table, assign, dst, use.tokens, use.token_axis, lead, trail))
                self.table_facts.append(f"{use.table.name} ({use.n_before} rows from token 0): destination")
                counters["token_table.destination"] += 1
            node.replace_input_with(use.table, self.tables[key])
            return
        if n_in != use.n_before:
            # Tokens of another sequence concatenated around the merged ones (Flux's text before
            # its image tokens) have rows of their own in the table, which they keep.
            if lead + n_in + trail != use.n_before:
                raise CannotRewrite(f"{node.format_node()} combines merged tokens with a per-token table of "
                                    f"{use.n_before} rows, which is not the merged sequence")
            merged_count = self.hints(self.env[use.tokens].shape[use.token_axis]) - lead - trail
            key = (assign, lead, trail)
            if key not in self.whole_token_assigns:
                self.whole_token_assigns[key] = self.insert(node, ops.assign_with_whole_tokens,
                                                            (assign, lead, trail, merged_count))
            assign = self.whole_token_assigns[key]
        node.replace_input_with(use.table, self.merged_table(node, use, assign, 0))

    def merged_table(self, node: Node, use: TableUse, assign: Node, offset: int) -> Node:
        key = (use.table, assign, use.token_axis, self.env[use.tokens].dim())
        if key not in self.tables:
            merged, rule = None, "rows"
            if self.rotary == "position":
                merged, why = self.merged_from_angles(node, use, assign, offset)
                rule = "position" if merged is not None else f"rows ({why})"
            elif self.rotary == "destination":
                rule = "rows (the destination rule applies in merge-and-restore mode only)"
            if merged is None:
                merged = self.insert(node, ops.merge_token_rows, (use.table, assign, use.tokens, use.token_axis, offset))
            self.tables[key] = merged
            self.table_facts.append(f"{use.table.name} ({use.n_before} rows from token {offset}): {rule}")
            counters[f"token_table.{rule.split(' ')[0]}"] += 1
        return self.tables[key]

    def merged_from_angles(self, node: Node, use: TableUse, assign: Node, offset: int) -> "tuple[Optional[Node], str]":
        """The table recomputed from its members' mean angles (``token_tables.angle_chain``), or
        (None, why) where it cannot be."""
        from_end = self.env[use.tokens].dim() - use.token_axis
        angles, chain, why = angle_chain(use.table, self.env, use.n_before, from_end, self.hints)
        if angles is None:
            return None, why
        inserted: list[Node] = []
        try:
            merged_angles = self.insert(node, ops.merge_token_rows, (angles, assign, use.tokens, use.token_axis, offset))
            inserted.append(merged_angles)
            copies = {angles: merged_angles}
            for original in chain:
                with self.gm.graph.inserting_before(node):
                    copy = self.gm.graph.node_copy(original, lambda n: copies.get(n, n))
                inserted.append(copy)
                copies[original] = copy
                self.evaluate(copy)
            result = self.env[copies[use.table]]
            expected = self.hints.shape(self.env[use.tokens].shape)
            if (result.dim() != len(expected) or self.hints(result.shape[use.token_axis]) != expected[use.token_axis]
                    or self.hints(result.shape[0]) != expected[0]):
                raise CannotRewrite(f"the recomputed table has shape {tuple(result.shape)}")
            return copies[use.table], ""
        except CannotRewrite as exc:
            for copy in reversed(inserted):
                self.gm.graph.erase_node(copy)
                self.env.pop(copy, None)
            return None, f"recomputing it from the angles failed: {exc}"

    def fixed_prefix(self, node: Node) -> int:
        """How many leading tokens of ``node`` are the same tokens as before merging: the
        protected ones, after any tokens of another sequence that a token ``cat`` put in
        front of the merged ones (CaiT's class token before the patches)."""
        return self.token_layout(node)[0]

    def token_layout(self, node: Node, depth: int = 24) -> tuple[int, int]:
        """(fixed leading tokens, tokens of other sequences after the merged ones) on ``node``'s
        token axis: a token ``cat`` puts other sequences' tokens around the merged ones (CaiT's
        class token before the patches; SD3's text tokens after the image tokens in its joint
        attention, whose output follows the queries)."""
        key = (node, depth)
        if key not in self.layouts:  # a residual add reads two changed inputs: without this, 2**depth walks
            self.layouts[key] = self._token_layout(node, depth)
        return self.layouts[key]

    def _token_layout(self, node: Node, depth: int) -> tuple[int, int]:
        while isinstance(node, Node) and depth > 0:
            depth -= 1
            axis = _sequence_cat_axis(node)
            if axis is not None:
                pieces = list(node.args[0])
                counts = [getattr(self.env.get(piece), "shape", None) for piece in pieces]
                counts = [shape[axis] if shape is not None and len(shape) > axis and isinstance(shape[axis], int)
                          else None for shape in counts]
                moved = [i for i, piece in enumerate(pieces) if piece in self.changed]
                if len(moved) != 1 or any(c is None for i, c in enumerate(counts) if i != moved[0]):
                    return self.protected, 0
                at = moved[0]
                return sum(counts[:at]) + self.protected, sum(counts[at + 1:])
            changed = [i for i in node.all_input_nodes if i in self.changed]
            if is_sdpa(node) and node.args and node.args[0] in self.changed:
                changed = [node.args[0]]  # the output's token axis is the queries'
            if len(changed) > 1:  # a rotation stacking two halves of the same tokens, or tokens times a table
                default = (self.protected, 0)
                layouts = {self.token_layout(c, depth) for c in changed} - {default}
                return layouts.pop() if len(layouts) == 1 else default
            if not changed:
                return self.protected, 0
            node = changed[0]
        return self.protected, 0

    def new_size(self, node: Node, src: Node, axis: int, value: Any):
        """A plain int, or (for an unbacked token count, or any with ``read_sizes``) a sym_size
        node read from ``src``."""
        if self.read_sizes or torch_compat.is_unbacked(value):
            return self.insert(node, torch.ops.aten.sym_size.int, (src, axis))
        return self.hints(value)

    def rewrite_reshape(self, node: Node, src: Node, old_in, new_in, axes: list[int]) -> None:
        old_out_value = self.old_values.get(node)
        if not isinstance(old_out_value, torch.Tensor):
            raise CannotRewrite(f"{node.name}: no recorded output shape")
        old_out = self.hints.shape(old_out_value.shape)
        old_in_h = self.hints.shape(old_in)
        in_pre, out_pre = _prefix_products(old_in_h), _prefix_products(old_out)
        factors: dict[int, tuple[int, list[int]]] = {}
        for a in axes:
            j = _covering_axis(out_pre, in_pre[a], in_pre[a + 1])
            if j is None:
                raise CannotRewrite(
                    f"{node.format_node()} splits the token axis {a} of {old_in_h} into {old_out} "
                    "(e.g. back into an image grid); merged tokens have no grid position"
                )
            old_f, new_axes = factors.get(j, (1, []))
            factors[j] = (old_f * old_in_h[a], new_axes + [a])
        spec, packed = _shape_spec(node)
        if len(spec) != len(old_out):
            raise CannotRewrite(f"{node.name}: shape spec {spec} does not match output rank {len(old_out)}")
        for j, (old_f, new_axes) in factors.items():
            new_sizes = [self.new_size(node, src, a, new_in[a]) for a in new_axes]
            spec[j] = self.scaled_entry(node, spec[j], old_f, new_sizes)
        _set_shape_spec(node, spec, packed)

    def scaled_entry(self, node: Node, entry, old_f: int, new_sizes: list):
        """``entry`` with the old token count ``old_f`` it contains replaced by the new sizes."""
        if isinstance(entry, int) and not isinstance(entry, bool) and entry == -1:
            return entry
        if isinstance(entry, int) and not isinstance(entry, bool):
            if entry % old_f != 0:
                raise CannotRewrite(f"{node.name}: size {entry} is not a multiple of the token count {old_f}")
            result = entry // old_f
        elif isinstance(entry, Node):
            # a symbolic size such as batch * 197: entry // 197 * (new count) in the graph
            result = self.insert(node, operator.floordiv, (entry, old_f))
        else:
            raise CannotRewrite(f"{node.name}: cannot rewrite size entry {entry!r}")
        for size in new_sizes:
            if isinstance(result, int) and isinstance(size, int):
                result *= size
            else:
                result = self.insert(node, operator.mul, (result, size))
        return result

    def rewrite_split(self, node: Node, src: Node, old_in, new_in, axes: list[int]) -> None:
        """``split(sizes, dim)`` along the token axis where one piece holds every merged token and
        the others only tokens that keep their place (DINOv3 splits its class and register
        tokens off before the rotation; Flux splits its joint attention's output into text and
        image): that piece shrinks by the number of tokens merged."""
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
        if not isinstance(dim, int) or dim % len(old_in) not in axes:
            return
        axis = dim % len(old_in)
        sizes = list(_split_sizes(node))
        lead, trail = self.token_layout(src)
        old_n = self.hints(old_in[axis])
        starts = [sum(sizes[:i]) for i in range(len(sizes))] if all(isinstance(x, int) for x in sizes) else []
        holding = [i for i, start in enumerate(starts) if start <= lead and start + sizes[i] >= old_n - trail]
        if not holding:
            raise CannotRewrite(f"{node.format_node()}: split along the token axis into pieces that cut "
                                "through the merged tokens")
        piece = holding[0]
        new_n = self.new_size(node, src, axis, new_in[axis])
        rest = old_n - sizes[piece]
        sizes[piece] = new_n - rest if isinstance(new_n, int) else self.insert(node, operator.sub, (new_n, rest))
        key = next((k for k in ("split_size", "split_sizes") if k in node.kwargs), None)
        if key is not None:
            node.update_kwarg(key, tuple(sizes))
        else:
            node.args = (node.args[0], tuple(sizes), *node.args[2:])

    def rewrite_expand(self, node: Node, src: Node, old_in, new_in, axes: list[int]) -> None:
        spec, packed = _shape_spec(node)
        offset = len(spec) - len(old_in)
        old_in_h = self.hints.shape(old_in)
        for a in axes:
            j = a + offset
            entry = spec[j]
            if isinstance(entry, int) and entry == -1:
                continue
            if isinstance(entry, int) and entry == old_in_h[a]:
                spec[j] = self.new_size(node, src, a, new_in[a])
                continue
            raise CannotRewrite(f"{node.format_node()}: cannot map expand size {entry!r} on token axis {a}")
        _set_shape_spec(node, spec, packed)


def _folds_batch(node: Node) -> bool:
    """Whether ``node`` moves a [B, N, ...] tensor's token axis away from behind the batch:
    an integer index on the batch axis, ``unbind`` over it, or ``flatten`` from axis 0."""
    if node.op == "call_function" and node.target is operator.getitem:
        index = node.args[1]
        first = index[0] if isinstance(index, tuple) and index else index
        return isinstance(first, int) and not isinstance(first, bool)
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if name == "unbind":
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        return dim == 0
    if name == "flatten":
        start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
        return start == 0
    return False


def _sequence_cat_axis(node: Node) -> Optional[int]:
    """The token axis of a ``cat`` that joins sequences: axis 1 of [B, N, C] or [B, N, H, D]
    (Flux's text and image queries before the heads move), axis 2 of [B, H, N, D]."""
    if is_token_cat(node) or token_cat_axis(node) == 2:
        return token_cat_axis(node)
    if node.op != "call_function" or node.target not in CAT_FUNCTIONS or not isinstance(node.args[0], (list, tuple)):
        return None
    value = node.meta.get("example_value")
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    if not isinstance(value, torch.Tensor) or value.dim() != 4 or not isinstance(dim, int):
        return None
    return 1 if dim % 4 == 1 else None


def _producing_merge(node: Node, changed: set[Node], depth: int = 40) -> Optional[tuple[Node, Node]]:
    """(assign, tokens merged) of the merge-and-restore merge that ``node``'s tokens come from:
    ``getitem(grid_merge(x, ...), 0)`` (its assign is item 1) or ``merge_by_plan(x, assign, size)``."""
    queue, seen = deque([(node, 0)]), {node}
    while queue:
        node, steps = queue.popleft()
        if node.op == "call_function" and node.target is ops.merge_by_plan:
            return node.args[1], node.args[0]
        if (node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0
                and isinstance(node.args[0], Node) and node.args[0].target is ops.grid_merge):
            call = node.args[0]
            assign = next((u for u in call.users if u.target is operator.getitem and u.args[1] == 1), None)
            return (assign, call.args[0]) if assign is not None else None
        if steps < depth:
            for parent in node.all_input_nodes:
                if parent in changed and parent not in seen:
                    seen.add(parent)
                    queue.append((parent, steps + 1))
    return None


def _split_sizes(node: Node) -> Any:
    for key in ("split_size", "split_sizes"):
        if key in node.kwargs:
            return node.kwargs[key]
    return node.args[1] if len(node.args) > 1 else None


def _check_and_fix_index(node: Node, old_h: tuple, axes, protected: int, tail: int = 0, trail: int = 0) -> None:
    index = node.args[1]
    items = list(index) if isinstance(index, tuple) else [index]
    consuming = [i for i in items if i is not None and i is not Ellipsis]
    rank = len(old_h)
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
            item = _token_axis_index(node, item, old_h[axis], protected, tail, trail)
        new_items.append(item)
        axis += 1
    node.args = (node.args[0], tuple(new_items) if isinstance(index, tuple) else new_items[0])


def _token_axis_index(node: Node, item: Any, old_n: int, protected: int, tail: int = 0, trail: int = 0) -> Any:
    """The index as it reads the merged tokens: leading protected tokens by position,
    trailing protected ones (``tail``) by negative position, the rest only whole. ``trail``
    tokens of another sequence after the merged ones (SD3's text tokens in the joint
    attention's output) are read from the end: a bound at their start becomes ``-trail``."""
    where = f"{node.format_node()} indexes the token axis"
    boundary = old_n - trail if trail else None

    def from_end(i: int) -> Optional[int]:
        """``i`` as a position from the end, where it lies among the trailing tokens."""
        if trail and boundary <= i < old_n:
            return i - old_n
        return None

    if isinstance(item, int) and not isinstance(item, bool):
        if 0 <= item < protected or -(tail or trail) <= item < 0:
            return item
        if from_end(item) is not None:
            return from_end(item)
        raise CannotRewrite(f"{where} at {item}, which is not a protected token")
    if isinstance(item, slice):
        if item.step not in (None, 1):
            raise CannotRewrite(f"{where} with a step")
        start, stop = item.start, item.stop
        if isinstance(start, int) and from_end(start) is not None:
            start = from_end(start)
        elif start is not None and not (isinstance(start, int) and (0 <= start <= protected or -(tail or trail) <= start < 0)):
            raise CannotRewrite(f"{where} from {start}, inside the merged tokens")
        if stop is not None:
            if not isinstance(stop, int):
                raise CannotRewrite(f"{where} with a symbolic end")
            if stop >= old_n:
                stop = None
            elif from_end(stop) is not None:
                stop = from_end(stop)
            elif not (0 <= stop <= protected or -(tail or trail) <= stop < 0):
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
