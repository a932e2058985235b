"""The rewrite: an ordered list of named passes, run by one driver over a copy of the graph.

Every pass has one signature, ``run(gm, plan, ctx) -> PassResult``: it edits ``gm`` (a copy of
the Dynamo graph; the plan's node references already point into it), reads and extends the
shared ``RewriteContext``, and returns how many nodes it changed and the facts it found. The
driver (``run_passes``) times each pass, counts its changes (``counters["pass.<name>"]``),
records both in the report, and skips the passes named in ``disabled_passes``: a skipped pass
that the merged graph needs (``required``) stops the rewrite there, naming it, and the graph
is compiled unchanged.

A build is one run of the list over a fresh copy (``build``). ``rewrite`` builds the graph
with concrete token counts first, so fake propagation catches every shape that no longer
fits; only a graph compiled whole by a code generator is then built again with symbolic
(unbacked) counts, keeping the concrete build if that fails.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from torch.fx import GraphModule, Node

from turbo_fx.config import PASS_NAMES, TurboConfig
from turbo_fx.errors import CannotRewrite
from turbo_fx.passes.compact_placeholders import insert_compaction
from turbo_fx.passes.explicit_as_sdpa import explicit_as_sdpa
from turbo_fx.passes.insert_merges import insert_merges
from turbo_fx.passes.merge_and_restore import insert_merge_and_restore
from turbo_fx.passes.propagate_shapes import ShapeHints, propagate_shapes
from turbo_fx.passes.restore_outputs import restore_outputs
from turbo_fx.passes.weight_token_means import weight_token_means
from turbo_fx.plan import COMPACT, GENERATION, MERGE, GraphPlan, component_report
from turbo_fx.report import PassRecord, counters
from turbo_fx.torch_compat import empty_graph_like

log = logging.getLogger("turbo_fx")


@dataclass
class RewriteContext:
    """What the passes of one build share: the fake mode, the build's config, the values each
    node had before the rewrite, the learnt sizes, and what the merge-inserting pass did."""

    fake_mode: Any
    config: TurboConfig
    read_sizes: bool = False  # rewritten sizes read from tensors (``propagate_shapes``)
    old_values: dict[Node, Any] = field(default_factory=dict)
    hints: ShapeHints = field(default_factory=ShapeHints)
    insertion: Any = None  # MergeInsertion (merge mode) or RestoreInsertion (merge-and-restore)


@dataclass
class PassResult:
    changes: int  # nodes inserted or edited
    facts: dict[str, Any] = field(default_factory=dict)  # GraphReport fields this pass decides


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[GraphModule, GraphPlan, RewriteContext], PassResult]
    modes: frozenset
    required: bool = True  # the merged graph is wrong or fails without it
    applies: Callable[[TurboConfig], bool] = lambda config: True  # else skipped: an option turned it off


def _explicit_as_sdpa(gm: GraphModule, plan: GraphPlan, ctx: RewriteContext) -> PassResult:
    """Explicit attention of the merged sequence and its readers as SDPA calls; the plan's
    sites follow the converted calls."""
    wanted = sorted([*plan.merging, *(reader for reader, _, _ in plan.readers)], key=lambda s: s.index)
    converted = explicit_as_sdpa(gm, wanted)
    for index, site in converted.items():
        old = plan.sites[index]
        if site is None or site.kind != "sdpa" or site.module != old.module:
            raise CannotRewrite("emitting explicit attention as SDPA changed the attention sites found")
        if old.dropped_mask is not None:  # a mask that allows every key, cleared by the analysis
            site.dropped_mask, site.mask = site.mask, None
            site.problems = list(old.problems)
        plan.sites[index] = site
    plan.merging = [plan.sites[s.index] for s in plan.merging]
    plan.readers = [(plan.sites[r.index], after, layout) for r, after, layout in plan.readers]
    return PassResult(len(converted), {"sdpa_sites": sorted(converted)})


def _insert_merges(gm: GraphModule, plan: GraphPlan, ctx: RewriteContext) -> PassResult:
    ctx.old_values = recorded_values(gm)
    insertion = insert_merges(gm, plan.merging, plan.blocks, ctx.config, plan.protected, plan.readers, plan.tail)
    for merged, original in insertion.replaced.items():
        ctx.old_values[merged] = ctx.old_values[original]
    ctx.insertion = insertion
    return PassResult(len(insertion.touched))


def _merge_and_restore(gm: GraphModule, plan: GraphPlan, ctx: RewriteContext) -> PassResult:
    ctx.old_values = recorded_values(gm)
    ctx.insertion = insert_merge_and_restore(gm, plan.components, ctx.config, ctx.fake_mode)
    for copy, original in ctx.insertion.replaced.items():
        ctx.old_values[copy] = ctx.old_values[original]
    ctx.old_values.update(ctx.insertion.values)
    return PassResult(len(ctx.insertion.touched), {"components": ctx.insertion.reports})


def _compact_placeholders(gm: GraphModule, plan: GraphPlan, ctx: RewriteContext) -> PassResult:
    ctx.old_values = recorded_values(gm)
    ctx.insertion = insert_compaction(gm, plan.scatter, plan.kept, ctx.config)
    for compacted, filled in ctx.insertion.replaced.items():
        ctx.old_values[compacted] = ctx.old_values[filled]
    return PassResult(len(ctx.insertion.touched))


def _propagate_shapes(gm: GraphModule, plan: GraphPlan, ctx: RewriteContext) -> PassResult:
    merge_mode = plan.mode == MERGE
    tables: list[str] = []
    changed = propagate_shapes(gm, ctx.fake_mode, ctx.old_values, ctx.insertion.touched,
                               plan.protected if merge_mode else 0, ctx.hints, tail=plan.tail if merge_mode else 0,
                               assign_by_count=getattr(ctx.insertion, "assign_by_count", None),
                               read_sizes=ctx.read_sizes, rotary=ctx.config.rotary, table_facts=tables)
    return PassResult(len(changed), {"token_tables": tables})


def _weight_token_means(gm: GraphModule, plan: GraphPlan, ctx: RewriteContext) -> PassResult:
    weighted, unweighted = weight_token_means(gm, ctx.fake_mode, ctx.old_values, ctx.hints)
    return PassResult(weighted, {"reductions_weighted": weighted, "reductions_unweighted": unweighted})


def _restore_outputs(gm: GraphModule, plan: GraphPlan, ctx: RewriteContext) -> PassResult:
    restored = restore_outputs(gm, ctx.fake_mode, ctx.old_values, ctx.insertion.assign_by_count, ctx.hints)
    return PassResult(restored, {"outputs_restored": restored})


_ALL = frozenset({MERGE, GENERATION, COMPACT})
# Order matters: shapes are re-propagated after every insertion, and the passes after it read
# the new shapes.
PASSES: tuple[Pass, ...] = (
    Pass("explicit_as_sdpa", _explicit_as_sdpa, frozenset({MERGE}), required=False,
         applies=lambda config: config.strategy.explicit_as_sdpa),
    Pass("insert_merges", _insert_merges, frozenset({MERGE})),
    Pass("merge_and_restore", _merge_and_restore, frozenset({GENERATION})),
    Pass("compact_placeholders", _compact_placeholders, frozenset({COMPACT})),
    Pass("propagate_shapes", _propagate_shapes, _ALL),
    Pass("weight_token_means", _weight_token_means, frozenset({MERGE}), required=False),
    Pass("restore_outputs", _restore_outputs, frozenset({MERGE, COMPACT}), required=False,
         applies=lambda config: config.restore_outputs),
)
assert tuple(p.name for p in PASSES) == PASS_NAMES, "config.PASS_NAMES must list PASSES in order"


def run_passes(gm: GraphModule, plan: GraphPlan, ctx: RewriteContext) -> tuple[list[PassRecord], dict[str, Any]]:
    """Run ``PASSES`` for the plan's mode over ``gm`` in place (see the module docstring);
    returns each pass's record and the facts they found."""
    records: list[PassRecord] = []
    facts: dict[str, Any] = {}
    disabled = ctx.config.strategy.disabled_passes
    for p in PASSES:
        if plan.mode not in p.modes:
            continue
        if p.name in disabled:
            if p.required:
                raise CannotRewrite(f"pass '{p.name}' is switched off (disabled_passes) and the merged graph "
                                    "needs it")
            records.append(PassRecord(p.name, "off (disabled_passes)"))
            continue
        if not p.applies(ctx.config):
            records.append(PassRecord(p.name, "off (an option turns it off)"))
            continue
        start = time.perf_counter()
        result = p.run(gm, plan, ctx)
        records.append(PassRecord(p.name, "ran", time.perf_counter() - start, result.changes))
        counters[f"pass.{p.name}"] += result.changes
        facts.update(result.facts)
    gm.graph.lint()
    gm.recompile()
    return records, facts


@dataclass
class Build:
    """One rewritten copy of the graph, with its plan (nodes of the copy) and what the passes found."""

    module: GraphModule
    plan: GraphPlan
    passes: list[PassRecord]
    facts: dict[str, Any]
    symbolic: bool


def rewrite(gm: GraphModule, plan: GraphPlan, fake_mode, split: bool) -> Build:
    """The rewritten copy of ``gm`` that ``plan`` describes (see the module docstring).

    ``split``: the graph will be compiled block by block, which compiles each piece from the
    values it runs on, its token count a backed symbolic size. The concrete build then serves
    alone, its rewritten sizes read from the tensors (``propagate_shapes(read_sizes=True)``) so
    that the blocks' pieces have the same code, and the symbolic build is skipped.

    Raises ``plan.stop`` or ``CannotRewrite``; the caller compiles ``gm`` unchanged."""
    if plan.stop is not None:
        raise plan.stop
    strategy = plan.config.strategy
    concrete = build(gm, plan, fake_mode, symbolic=False, read_sizes=split and plan.mode == MERGE)
    # Symbolic token counts only serve a compiler that generates kernels for a graph compiled
    # whole; "eager" runs the graph as it is.
    if split or plan.mode != MERGE or not strategy.uses_symbolic_tokens or strategy.inner_backend == "eager":
        return concrete
    try:
        return build(gm, plan, fake_mode, symbolic=True)
    except CannotRewrite as exc:
        log.info("turbo: kept concrete token counts; symbolic ones failed: %s", exc)
        return concrete


def build(gm: GraphModule, plan: GraphPlan, fake_mode, symbolic: bool, read_sizes: bool = False) -> Build:
    """One run of the pass list over a fresh copy of ``gm``."""
    work, nodes = copy_graph_module(gm)
    local = remap_nodes(plan, nodes)
    config = plan.config if symbolic else plan.config.replace(symbolic_tokens=False)
    ctx = RewriteContext(fake_mode, config, read_sizes)
    records, facts = run_passes(work, local, ctx)
    return Build(work, local, records, facts, symbolic)


def report_facts(plan: GraphPlan, done: Optional[Build] = None) -> dict[str, Any]:
    """The GraphReport fields of the plan and, where the graph was rewritten, of its build:
    the one place the rewrite's facts become the report."""
    facts: dict[str, Any] = {
        "sites": plan.site_reports, "blocks": plan.blocks, "protected": plan.protected,
        "protected_note": plan.protected_note, "protected_tail": plan.tail,
        "semantic_source": plan.semantic_source, "padding": plan.padding, "budget": plan.budget,
        "mode_note": plan.mode_note,
    }
    if plan.mode == GENERATION:
        facts["components"] = [component_report(p) for p in plan.components]
    if done is not None:
        facts.update(done.facts)
        facts["passes"] = done.passes
    return facts


def recorded_values(gm: GraphModule) -> dict[Node, Any]:
    """Each node's value as Dynamo recorded it (before the rewrite changes any shape)."""
    return {n: n.meta.get("example_value") for n in gm.graph.nodes}


def copy_graph_module(gm: GraphModule) -> tuple[GraphModule, dict[Node, Node]]:
    """A new GraphModule over a copy of ``gm``'s graph (node metadata copied, modules shared),
    so a failed rewrite leaves the original untouched, and the map from each node to its copy."""
    nodes: dict[Node, Node] = {}
    graph = empty_graph_like(gm.graph)
    value, old_output = graph.graph_copy(gm.graph, val_map=nodes, return_output_node=True)
    output = graph.output(value, type_expr=getattr(old_output, "type", None))
    output.meta = copy.copy(old_output.meta)
    nodes[old_output] = output
    new = GraphModule(gm, graph, class_name=type(gm).__name__)
    new.meta.update(gm.meta)
    return new, nodes


def remap_nodes(value: Any, nodes: dict[Node, Node], memo: Optional[dict[int, Any]] = None) -> Any:
    """``value`` with every Node replaced by ``nodes[node]``: dataclasses, lists, tuples, dicts
    and sets that hold nodes are copied (an object reached twice is copied once, so the plan's
    objects that refer to each other still do); everything else is returned as it is."""
    memo = {} if memo is None else memo
    if isinstance(value, Node):
        return nodes[value]
    if id(value) in memo:
        return memo[id(value)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = {f.name: remap_nodes(getattr(value, f.name), nodes, memo) for f in dataclasses.fields(value)}
        if all(items[name] is getattr(value, name) for name in items):
            result = value
        else:
            result = copy.copy(value)
            for name, item in items.items():
                object.__setattr__(result, name, item)
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = [remap_nodes(v, nodes, memo) for v in value]
        changed = any(a is not b for a, b in zip(items, value))
        if not changed and not isinstance(value, list):
            result = value
        else:
            result = type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    elif isinstance(value, dict):
        result = {remap_nodes(k, nodes, memo): remap_nodes(v, nodes, memo) for k, v in value.items()}
    else:
        return value
    memo[id(value)] = result
    return result
