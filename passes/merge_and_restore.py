"""Pass: merge before and restore after each chosen component of generation blocks.

Matches the components ``find_grid_runs`` found (runs whose tokens return to a grid). A
component merges when its kind is in ``merge_components``, its grid is within
``max_downsample`` of the graph's largest grid, and ``ratio`` gives it at least one token to
merge. For each block with a merging component:

  * at its first merging component, one ``grid_merge`` call scores the component's input
    tokens (cosine similarity to one destination per ``sx`` x ``sy`` cell, less ``alpha``
    times the semantic value of the latest earlier cross-attention at the same grid) and
    merges them; later merging components of the block merge their own input with the same
    plan (``merge_by_plan``), as tomesd shares one plan per block;
  * inside the component every use of the input stream takes the merged tokens; a
    self-attention gets the ``log(size)`` key bias (proportional attention, with
    ``prop_attn``), which makes exact duplicates give exactly the unmerged result;
  * the component's output is restored (``restore_tokens``: each original token takes its
    merged token's value) before the residual add, so the stream keeps every token;
  * in a joint attention (SD3, Flux) only the image tokens merge: the text tokens stay whole
    in the concatenated sequence, their keys get a zero bias, and the text's share of the
    output keeps its count;
  * a local component (no closing add) restores its output for every reader; the tokens
    around its merged ones (a per-frame class token) stay whole and get a zero key bias.

With ``semantic``, every cross-attention site of a run adds one ``cross_attention_saliency``
call (the attention mass that the text keys put on each image token), which later blocks at
the same grid read.

Guarantees: outside the chosen components nothing changes, and every stream between
components has its original shape; only calls into ``turbo_fx.ops`` are inserted and only
uses inside the chosen components and SDPA masks are edited. Returns the nodes it touched,
for ``propagate_shapes``.
"""
from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.fx import GraphModule, Node

from turbo_fx import ops
from turbo_fx.config import TurboConfig
from turbo_fx.report import ComponentReport
from turbo_fx.torch_compat import real_tensors

from . import graph_utils as gu
from .find_components import CROSS_ATTENTION, SELF_ATTENTION, Component, GridRun
from .insert_merges import MergeInsertion, _apply_key_bias, _logit_dtype


@dataclass
class ComponentPlan:
    component: Component
    r: int
    reason: str = ""  # why it does not merge (empty when it does)

    @property
    def merges(self) -> bool:
        return self.r > 0 and not self.reason


def plan_components(runs: list[GridRun], config: TurboConfig) -> list[ComponentPlan]:
    """Which components merge and how many tokens each merges (from static shapes)."""
    largest = max(run.tokens for run in runs)
    plans = []
    for run in runs:
        height, width = run.grid
        destinations = ops.destination_count(height, width, config.generation.sx, config.generation.sy)
        sources = run.tokens - destinations
        downsample = round((largest / run.tokens) ** 0.5)
        for component in run.components:
            r = min(int(config.generation.ratio * run.tokens), sources)
            reason = ""
            if component.kind not in config.generation.merge_components:
                reason = f"'{component.kind}' is not in merge_components"
            elif downsample > config.generation.max_downsample:
                reason = f"grid {height}x{width} is {downsample}x smaller than the largest; max_downsample={config.generation.max_downsample}"
            elif component.site is not None and component.kind == SELF_ATTENTION and component.site.mask is not None:
                reason = "self-attention with its own mask"
            elif component.site is not None and component.site.kind == "packed":
                reason = "packed (nn.MultiheadAttention) attention in merge-and-restore mode is not supported yet"
            elif destinations == 0:
                reason = (f"its {height}x{width} tokens fill no {config.generation.sx}x{config.generation.sy} cell, "
                          "so no token is a merge destination")
            elif r == 0:
                reason = f"ratio {config.generation.ratio} merges no token of {run.tokens}"
            plans.append(ComponentPlan(component, r, reason))
    return plans


@dataclass
class _BlockState:
    assign: Optional[Node] = None
    size: Optional[Node] = None
    bias: Optional[Node] = None
    semantic: str = ""


@dataclass
class RestoreInsertion:
    touched: set[Node] = field(default_factory=set)
    reports: list[ComponentReport] = field(default_factory=list)
    replaced: dict[Node, Node] = field(default_factory=dict)  # copy -> the node it copies (local components)
    values: dict = field(default_factory=dict)  # inserted node -> its value, which merging does not change


def insert_merge_and_restore(gm: GraphModule, plans: list[ComponentPlan], config: TurboConfig,
                             fake_mode) -> RestoreInsertion:
    """Insert the merges and restores of ``plans`` into ``gm`` (see the module docstring)."""
    graph = gm.graph
    result = RestoreInsertion()
    keys = MergeInsertion(blocks=[])  # what _apply_key_bias records its edits in
    blocks: dict[tuple[int, int], _BlockState] = {}
    saliency: dict[tuple[int, int], tuple[Node, str]] = {}  # grid -> latest cross-attention saliency
    n_blocks = 0
    needed = _saliency_consumed(plans, config)

    def call(fn, *args) -> Node:
        node = graph.call_function(fn, args)
        result.touched.add(node)
        return node

    for plan in plans:
        c = plan.component
        state = blocks.setdefault((c.run, c.block), _BlockState())
        if plan.merges:
            with graph.inserting_before(c.stream_in.next):
                body = _merged_part(graph, c, result, fake_mode)
                if state.assign is None:
                    state.semantic, semantic = _semantic_source(saliency.get(c.grid), config)
                    seed = config.generation.seed + n_blocks if config.generation.use_rand else None
                    dst, src = _partition_constants(gm, c, config, seed, n_blocks, fake_mode)
                    n_blocks += 1
                    merged = call(ops.grid_merge, body, dst, src, plan.r, semantic, config.alpha, config.redundancy, config.prop_attn,
                                  _bias_dtype(c))
                    tokens, state.assign, state.size, state.bias = (call(operator.getitem, merged, i) for i in range(4))
                else:
                    tokens = call(ops.merge_by_plan, body, state.assign, state.size)
                tokens = _with_whole_tokens(graph, c, tokens, result, fake_mode)
            original = c
            if c.closing_add is None:
                c = _copy_local(graph, c, tokens, result)
            else:
                _feed_branch(c, tokens, result)
            if c.kind == SELF_ATTENTION and config.prop_attn:
                _apply_key_bias(graph, c.site, _joint_key_bias(graph, c, state.bias, call), keys, call)
            _restore_output(graph, c, original, state.assign, call, result)
        if c.index in needed:
            assign, size = (state.assign, state.size) if plan.merges else (None, None)
            with graph.inserting_after(c.site.attn):
                saliency[c.grid] = (call(ops.cross_attention_saliency, c.site.q, c.site.k, c.site.scale, assign, size),
                                    c.module or f"component {c.index}")
        result.reports.append(ComponentReport(
            c.index, c.module, c.kind, c.block, c.grid, c.tokens, plan.r if plan.merges else 0,
            "merges" if plan.merges else "untouched", plan.reason, state.semantic if plan.merges else ""))
    result.touched |= keys.touched
    return result


def _restore_output(graph, c: Component, original: Component, assign: Node, call, result: RestoreInsertion) -> None:
    """The component's output restored to every original token, for the closing add or, in a
    local component (``c`` its merged copy), for every reader of the original output; the
    original nodes that nothing reads any more are removed."""
    if c.closing_add is not None:
        with graph.inserting_before(c.closing_add):
            restored = call(ops.restore_tokens, c.branch_out, assign, 1, c.lead, c.trail)
        c.closing_add.replace_input_with(c.branch_out, restored)
        result.touched.add(c.closing_add)
        return
    with graph.inserting_after(c.branch_out):
        restored = call(ops.restore_tokens, c.branch_out, assign, 1, c.lead, c.trail)
    for reader in list(original.branch_out.users):
        reader.replace_input_with(original.branch_out, restored)
        result.touched.add(reader)
    for node in reversed(_local_nodes(original, graph)):
        if not node.users:
            graph.erase_node(node)
            result.touched.discard(node)


def _merged_part(graph, c: Component, result: RestoreInsertion, fake_mode) -> Node:
    """What merges of a closed component's stream: all of it, or where the stream holds other
    sequences around the merged one (``lead``, ``trail``: Flux's text before its image tokens
    in the single-stream blocks), the slice between them."""
    if c.closing_add is None or not (c.lead or c.trail):
        return c.stream_in
    return _slice(graph, c.stream_in, c.lead, c.tokens, result, fake_mode)


def _with_whole_tokens(graph, c: Component, tokens: Node, result: RestoreInsertion, fake_mode) -> Node:
    """The merged slice put back between the stream's other sequences, which stay whole."""
    if c.closing_add is None or not (c.lead or c.trail):
        return tokens
    n = gu.tensor_shape(c.stream_in)[1]
    head = _slice(graph, c.stream_in, 0, c.lead, result, fake_mode)
    tail = _slice(graph, c.stream_in, n - c.trail, c.trail, result, fake_mode)
    node = graph.call_function(torch.cat, ([head, tokens, tail], 1))
    result.touched.add(node)
    return node


def _slice(graph, stream: Node, start: int, length: int, result: RestoreInsertion, fake_mode) -> Node:
    """``stream.narrow(1, start, length)``; its value is known before any merge (the stream keeps
    every token), so shape propagation sees it unchanged."""
    node = graph.call_function(torch.narrow, (stream, 1, start, length))
    with fake_mode:
        node.meta["example_value"] = torch.narrow(gu.example_value(stream), 1, start, length)
    result.values[node] = node.meta["example_value"]
    result.touched.add(node)
    return node


def _local_nodes(c: Component, graph) -> list[Node]:
    """The nodes of a local component that read its input stream, in graph order."""
    inside = (gu.ancestors(c.branch_out, stop=lambda n: n is c.stream_in) | {c.branch_out}) & gu.descendants(c.stream_in)
    return [n for n in graph.nodes if n in inside]


def _copy_local(graph, c: Component, merged: Node, result: RestoreInsertion) -> Component:
    """A copy of the local component's nodes that read its stream, reading the merged tokens
    instead: the originals may have readers outside the component (Flux's concatenated stream
    and its normalised copy also feed the residual and the feed-forward), which keep every
    token. Returns the component as its copy."""
    copies: dict[Node, Node] = {c.stream_in: merged}
    for node in _local_nodes(c, graph):
        with graph.inserting_after(node):
            copy = graph.node_copy(node, lambda n: copies.get(n, n))
        copies[node] = copy
        result.replaced[copy] = node
        result.touched.add(copy)
    site = dataclasses.replace(c.site, **{f.name: copies[getattr(c.site, f.name)] for f in dataclasses.fields(c.site)
                                          if isinstance(getattr(c.site, f.name), Node) and getattr(c.site, f.name) in copies})
    return dataclasses.replace(c, branch_out=copies[c.branch_out], stream_out=copies[c.branch_out], site=site)


def _joint_key_bias(graph, c: Component, bias: Node, call) -> Node:
    """The key bias of a joint attention's keys: the merged sequence's bias at its place in the
    concatenation, zero on the keys of the other sequences (which stay whole); likewise around
    a local component's merged tokens."""
    part = next((p for p in c.site.joint if p.residual is c.stream_in), None)
    if part is None:
        if not (c.lead or c.trail):
            return bias
        with graph.inserting_after(bias):  # before every use: explicit attention adds it to the logits
            return call(ops.pad_key_bias, bias, c.lead, c.trail)
    total = sum(p.count for p in c.site.joint)
    with graph.inserting_after(bias):
        return call(ops.pad_key_bias, bias, part.start, total - part.start - part.count)


def _partition_constants(gm: GraphModule, c: Component, config: TurboConfig, seed: Optional[int], block: int,
                         fake_mode) -> tuple[Node, Node]:
    """The block's destination and source token indices as buffers of ``gm`` (on the device
    of its tokens), read by get_attr nodes: constants, so the compiled graph never rebuilds them."""
    device = gu.example_value(c.stream_in).device
    with real_tensors():
        tensors = [t.to(device) for t in ops.grid_partition(c.grid[0], c.grid[1], config.generation.sx, config.generation.sy, seed)]
    nodes = []
    for name, tensor in zip(("dst", "src"), tensors):
        attr = f"_turbo_grid_{name}_{block}"
        gm.register_buffer(attr, tensor)
        first_op = next(n for n in gm.graph.nodes if n.op != "placeholder")
        with gm.graph.inserting_before(first_op):
            node = gm.graph.get_attr(attr)
        node.meta["example_value"] = fake_mode.from_tensor(tensor)
        nodes.append(node)
    return nodes[0], nodes[1]


def _gives_saliency(c: Component) -> bool:
    return (c.kind == CROSS_ATTENTION and c.site is not None and c.site.mask is None
            and c.site.kind in ("sdpa", "explicit"))


def _saliency_consumed(plans: list[ComponentPlan], config: TurboConfig) -> set[int]:
    """The cross-attention components whose saliency a later block's merge reads: the latest
    one before each block's first merging component, at the same grid."""
    if not config.semantic:
        return set()
    latest: dict[tuple[int, int], int] = {}
    planned: set[tuple[int, int]] = set()
    needed = set()
    for plan in plans:
        c = plan.component
        if plan.merges and (c.run, c.block) not in planned:
            planned.add((c.run, c.block))
            if c.grid in latest:
                needed.add(latest[c.grid])
        if _gives_saliency(c):
            latest[c.grid] = c.index
    return needed


def _semantic_source(found: Optional[tuple[Node, str]], config: TurboConfig) -> tuple[str, Optional[Node]]:
    if not config.semantic:
        return "off (semantic=False)", None
    if found is None:
        return "none: no earlier cross-attention at this grid (redundancy only)", None
    node, module = found
    return f"cross-attention {module}", node


def _feed_branch(c: Component, merged: Node, result: RestoreInsertion) -> None:
    """Every node of the component that reads the input stream reads the merged tokens."""
    inside = gu.ancestors(c.branch_out, stop=lambda n: n is c.stream_in) | {c.branch_out}
    for user in list(c.stream_in.users):
        if user in inside and user is not c.closing_add and user is not merged and user not in result.touched:
            user.replace_input_with(c.stream_in, merged)
            result.touched.add(user)


def _bias_dtype(c: Component) -> torch.dtype:
    if c.site is not None:
        return _logit_dtype(c.site)
    value = gu.example_value(c.stream_in)
    return value.dtype if isinstance(value, torch.Tensor) else torch.float32
