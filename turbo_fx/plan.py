"""The plan of one graph: everything the rewrite and the compile need to know, found once.

``analyse`` reads the Dynamo graph (it never changes it) and decides, in this order: the
attention sites; whether the graph is a generation graph (blocks whose tokens return to a
grid: merge-and-restore mode) or an encoder (merge mode); for an encoder, the masks that
vary by query, the sequence that merges and the sites of other sequences that read it, the
protected tokens, the ranking the sequence allows and the tokens each block merges; and for
every graph the traits that decide how it is compiled and guarded (``passes.graph_traits``).

Where the graph cannot or need not merge, the plan says why in ``stop`` and keeps every fact
found up to there, so that the report can show the sites and their reasons.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

from torch.fx import GraphModule

from turbo_fx.config import TurboConfig
from turbo_fx.errors import CannotRewrite, NothingToMerge
from turbo_fx.passes.check_masks import check_masks
from turbo_fx.passes.find_attention import AttentionSite, find_attention_sites
from turbo_fx.passes.compact_placeholders import compaction_problem
from turbo_fx.passes.find_components import GridRun, find_grid_runs, find_local_runs
from turbo_fx.passes.find_placeholders import PlaceholderScatter, find_placeholder_scatter, scatter_leaving_graph
from turbo_fx.passes.flop_budget import component_costs, solve_for_graph, solve_generation
from turbo_fx.passes.graph_traits import GraphTraits, graph_traits
from turbo_fx.passes.graph_utils import graph_fake_mode
from turbo_fx.passes.insert_merges import plan_merges
from turbo_fx.passes.merge_and_restore import ComponentPlan, plan_components
from turbo_fx.passes.protected_tokens import count_protected_tokens, count_trailing_tokens, has_class_token
from turbo_fx.passes.streams import StreamPlan, plan_streams
from turbo_fx.report import PLACEHOLDERS, BlockReport, ComponentReport, SiteReport

log = logging.getLogger("turbo_fx")

MERGE = "merge"
GENERATION = "merge-and-restore"
COMPACT = "compact"


@dataclass
class GraphPlan:
    """What ``analyse`` found in one graph. Node references point into the analysed graph;
    ``turbo_fx.rewrite`` maps them onto each copy it rewrites."""

    config: TurboConfig  # as the graph allows it (no class token: redundancy only)
    traits: GraphTraits
    mode: str = MERGE
    sites: list[AttentionSite] = field(default_factory=list)  # every site, in graph order
    site_reports: list[SiteReport] = field(default_factory=list)
    stop: Optional[Union[CannotRewrite, NothingToMerge]] = None  # why the graph is compiled unchanged
    # merge mode
    merging: list[AttentionSite] = field(default_factory=list)  # the sites of the merged sequence
    readers: list[tuple] = field(default_factory=list)  # (site, merged site it reads after, (keys before, after))
    blocks: list[BlockReport] = field(default_factory=list)
    protected: Optional[int] = None
    protected_note: str = ""
    tail: int = 0  # protected tokens at the end of the sequence (YOLOS's detection tokens)
    semantic_source: str = ""
    padding: bool = False
    budget: str = ""  # the FLOP budget asked, the schedule solved for it and the ratio it predicts
    # merge-and-restore mode
    runs: list[GridRun] = field(default_factory=list)
    components: list[ComponentPlan] = field(default_factory=list)
    mode_note: str = ""  # why merge-and-restore mode serves a graph that is not a generation graph
    no_stream: bool = False  # merge mode found no sequence that can merge whole (not a refused option)
    # compact mode
    scatter: Optional[PlaceholderScatter] = None
    kept: int = 0  # placeholder tokens per row after the compaction

    @property
    def split_refusal(self) -> Optional[str]:
        """Why the rewritten graph will not be compiled block by block, or None."""
        if self.mode == COMPACT:
            return "a compacted language model merges once, before its first layer: there are no blocks to split at"
        return self.traits.split_refusal


def analyse(gm: GraphModule, example_inputs: Optional[Sequence[Any]], config: TurboConfig) -> GraphPlan:
    """The plan of ``gm`` (see the module docstring). It raises nothing: a failure of the
    analysis itself becomes the plan's ``stop``, so the user's graph still compiles unchanged."""
    plan = GraphPlan(config=config, traits=graph_traits(gm, example_inputs or []))
    try:
        plan.sites = find_attention_sites(gm)
        if not plan.sites:
            scatter = scatter_leaving_graph(gm)
            plan.stop = CannotRewrite(
                f"placeholder tokens filled here ({scatter.name}) leave the graph: the language model that reads "
                "them is compiled in another graph (a graph break between them), where nothing marks the "
                "placeholders, so they are not compacted" if scatter is not None else
                "no attention site found in the graph")
            return plan
        scatter = find_placeholder_scatter(gm, plan.sites)
        # A graph that also holds the tower (BLIP-2 compiles as one) merges the tower's sequence
        # instead; compaction takes a language model compiled in a graph of its own.
        if scatter is not None and len(scatter.sites) == len(plan.sites):
            _plan_compaction(plan, scatter)
            return _checked(gm, plan)
        plan.runs = find_grid_runs(gm, plan.sites)
        if plan.runs:
            _plan_generation(gm, plan)
        else:
            _plan_merges(gm, example_inputs, plan)
            if plan.no_stream:
                _plan_local(gm, plan, config)
    except CannotRewrite as exc:
        plan.stop = exc
    except Exception as exc:  # an analysis bug must never break the user's model
        log.debug("turbo: internal error while analysing the graph", exc_info=True)
        plan.stop = CannotRewrite(f"internal error in a turbo pass: {type(exc).__name__}: {exc}")
    return _checked(gm, plan)


def _checked(gm: GraphModule, plan: GraphPlan) -> GraphPlan:
    if plan.stop is None and graph_fake_mode(gm) is None:
        plan.stop = CannotRewrite("no fake tensor mode to re-propagate shapes with (graph not from Dynamo)")
    return plan


def _plan_compaction(plan: GraphPlan, scatter: PlaceholderScatter) -> None:
    """A language model whose placeholder tokens are filled from a vision tower: they merge once
    into fewer tokens (``ratio`` of them merged away), the rest of the sequence stays whole."""
    plan.mode, plan.scatter = COMPACT, scatter
    config = plan.config
    removed = int(config.generation.ratio * scatter.count + 1e-9)
    plan.kept = scatter.count - removed
    reading = {s.index for s in scatter.sites}
    plan.site_reports = [
        SiteReport(s.index, s.module, s.kind, 0 if s.index in reading else -1,
                   "merges" if s.index in reading else "untouched",
                   "" if s.index in reading else "does not read the placeholder sequence")
        for s in plan.sites
    ]
    first = scatter.sites[0]
    plan.blocks = [BlockReport(first.index, first.module, PLACEHOLDERS, scatter.count, removed, removed)]
    plan.semantic_source = (
        f"the text after the placeholders: how much it attends to each of them at site {first.index}, computed on "
        "the uncompacted sequence" if config.semantic else "off (semantic=False: redundancy only)")
    slots = scatter.length - removed
    plan.mode_note = (f"placeholder compaction: each row's {scatter.count} placeholder tokens (filled from "
                      f"'{scatter.features.name}') merge into {plan.kept} before the first layer, the other "
                      f"{scatter.length - scatter.count} tokens stay whole ({scatter.length} -> {slots} tokens); "
                      f"outputs, key/value caches among them, are restored to {scatter.length} tokens")
    problem = compaction_problem(scatter)
    if problem:
        plan.stop = CannotRewrite(problem)
    elif config.flops is not None:
        plan.stop = CannotRewrite("a FLOP budget is not solved for placeholder compaction: give 'ratio', the "
                                  "fraction of placeholder tokens merged away")
    elif not config.restore_outputs:
        plan.stop = CannotRewrite("placeholder compaction restores the outputs (a key/value cache must keep the "
                                  "length the caller counts); restore_outputs=False is refused here")
    elif removed == 0:
        plan.stop = NothingToMerge("the configuration merges no placeholder token (ratio 0)")


def _plan_merges(gm: GraphModule, example_inputs: Optional[Sequence[Any]], plan: GraphPlan) -> None:
    config = plan.config
    if example_inputs is not None:
        check_masks(gm, example_inputs, plan.sites)
    streams = plan_streams(plan.sites)
    plan.site_reports = site_reports(plan.sites, streams)
    if streams.chosen is None:
        plan.stop = CannotRewrite(streams.problems())
        plan.no_stream = True
        return
    plan.merging = sites = streams.chosen.sites
    plan.readers = [(plan.sites[i], after, streams.chosen.key_layout.get(i, (0, 0)))
                    for i, after in sorted(streams.chosen.read_after.items())]
    if config.protected == "auto":
        plan.protected, plan.protected_note = count_protected_tokens(gm, sites[0].residual)
        plan.tail = count_trailing_tokens(sites[0].residual)
        if plan.tail:
            plan.protected_note += f"; and {plan.tail} appended parameter token(s) at the end"
    else:
        plan.protected, plan.protected_note = config.protected, "set by the 'protected' option"
    if config.semantic and not has_class_token(sites[0].residual):
        if not config.redundancy:
            plan.stop = CannotRewrite("semantic-only ranking (redundancy=False) needs a class token, and this "
                                      "sequence has none (only patch tokens)")
            return
        plan.config = config = config.replace(semantic=False, keep_salient=0)
        plan.semantic_source = ("off: the sequence has no class token (only patch tokens), so no attention "
                                "row ranks them; redundancy only")
    else:
        plan.semantic_source = semantic_source(config, streams)
    plan.padding = any(s.mask is not None for s in sites)
    if config.flops is not None:
        plan.config = config = _solve_budget(gm, plan, config)
    try:
        plan.blocks = plan_merges(sites, config, plan.protected, plan.tail)
    except ValueError as exc:  # a per-block r list of the wrong length
        plan.stop = CannotRewrite(str(exc))
        return
    if not any(b.r_applied for b in plan.blocks):
        plan.site_reports = [dataclasses.replace(s, decision="untouched", reason="the configuration merges no token "
                                                 "(r = 0 after clamping)") for s in plan.site_reports]
        plan.stop = NothingToMerge("the configuration merges no token in this graph")


def _solve_budget(gm: GraphModule, plan: GraphPlan, config: TurboConfig) -> TurboConfig:
    """``config`` with r solved from the graph for its FLOP budget (``passes.flop_budget``)."""
    try:
        solution = solve_for_graph(gm, plan.merging, config.flops, config.schedule, plan.protected,
                                   config.min_tokens, config.keep_salient, plan.tail, graph_fake_mode(gm))
    except CannotRewrite as exc:
        raise CannotRewrite(f"the FLOP budget needs every node's FLOPs, and one cannot be counted: {exc}") from exc
    if solution is None:
        raise CannotRewrite("the FLOP budget needs the graph's FLOPs, and the graph counts none")
    plan.budget = (f"flops={config.flops:.3f} asked ({config.schedule} schedule): r={solution.r} "
                   f"predicts {solution.predicted:.3f}")
    if solution.note:
        plan.budget += f"; {solution.note}"
    return config.replace(r=solution.r, flops=None)


def _solve_generation_budget(gm: GraphModule, plan: GraphPlan, config: TurboConfig) -> TurboConfig:
    """``config`` with the merge ratio solved from the graph for its FLOP budget."""
    try:
        total, costs = component_costs(gm, plan.runs, graph_fake_mode(gm))
    except CannotRewrite as exc:
        raise CannotRewrite(f"the FLOP budget needs every node's FLOPs, and one cannot be counted: {exc}") from exc
    if total <= 0:
        raise CannotRewrite("the FLOP budget needs the graph's FLOPs, and the graph counts none")
    options = config.generation
    ratio, predicted, note = solve_generation(
        total, costs, lambda x: plan_components(plan.runs, config.replace(ratio=x, flops=None)), config.flops,
        options.sx, options.sy)
    plan.budget = f"flops={config.flops:.3f} asked: ratio={ratio} predicts {predicted:.3f}"
    if note:
        plan.budget += f"; {note}"
    return config.replace(ratio=ratio, flops=None)


def _plan_local(gm: GraphModule, plan: GraphPlan, config: TurboConfig) -> None:
    """Where merge mode finds no sequence that can merge whole, each attention sub-block that can merge and
    restore on its own (``find_local_runs``: regrouped around the attention, or a joint
    attention whose tokens are never reshaped to a grid) does; the plan keeps merge mode's
    reason in ``mode_note``. Unchanged when there is no such sub-block."""
    runs = find_local_runs(gm, plan.sites)
    if not runs:
        return
    reason = str(plan.stop)
    fresh = GraphPlan(config=config, traits=plan.traits, sites=plan.sites, runs=runs)
    count = sum(len(run.components) for run in runs)
    fresh.mode_note = (f"merge-and-restore of {count} component(s) (each merges its tokens and restores them), "
                       f"since the whole sequence cannot merge: {reason}")
    _plan_generation(gm, fresh)
    for name in ("mode", "config", "runs", "components", "site_reports", "stop", "budget", "mode_note"):
        setattr(plan, name, getattr(fresh, name))
    plan.merging, plan.readers, plan.blocks = [], [], []


def _plan_generation(gm: GraphModule, plan: GraphPlan) -> None:
    plan.mode = GENERATION
    if plan.config.flops is not None:
        plan.config = _solve_generation_budget(gm, plan, plan.config)
    plan.components = plan_components(plan.runs, plan.config)
    in_runs = {c.site.index: c for run in plan.runs for c in run.components if c.site is not None}
    merging = {p.component.site.index for p in plan.components if p.merges and p.component.site is not None}
    plan.site_reports = [
        SiteReport(s.index, s.module, s.kind, in_runs[s.index].run if s.index in in_runs else -1,
                   "merges" if s.index in merging else "untouched",
                   "" if s.index in merging else _generation_untouched_reason(s, in_runs, plan.components))
        for s in plan.sites
    ]
    if not any(p.merges for p in plan.components):
        plan.stop = NothingToMerge("the configuration merges no token of this generation graph")


def component_report(plan: ComponentPlan) -> ComponentReport:
    """The report of a component that does not merge."""
    c = plan.component
    return ComponentReport(c.index, c.module, c.kind, c.block, c.grid, c.tokens, 0, "untouched", plan.reason)


def _generation_untouched_reason(site, in_runs, plans) -> str:
    if site.index not in in_runs:
        return "not in a block whose tokens return to a grid"
    component = in_runs[site.index]
    return next(p.reason for p in plans if p.component is component) or "untouched"


def semantic_source(config: TurboConfig, streams: StreamPlan) -> str:
    """Which attention map ranks the merged sequence's tokens by semantic value. The paper
    also allows a text token's cross-attention map; that needs text attending to the tokens
    before they merge, and a reader here reads them only after the merges it follows."""
    if not config.semantic:
        return "off (semantic=False: redundancy only)"
    source = "the first token's (CLS) self-attention row at each merging block"
    if streams.chosen is not None and streams.chosen.readers:
        readers = ", ".join(str(r.index) for r in streams.chosen.readers)
        source += (f"; the cross-attention of site(s) {readers} reads the tokens only after they merge, "
                   "so its map cannot rank them")
    return source


def site_reports(sites: list[AttentionSite], streams: StreamPlan) -> list[SiteReport]:
    by_index = {s.index: s for s in sites}
    return [
        SiteReport(d.site, by_index[d.site].module, by_index[d.site].kind, d.stream,
                   "merges" if d.merge else ("reads merged" if d.reads is not None else "untouched"), d.reason)
        for d in streams.decisions
    ]
