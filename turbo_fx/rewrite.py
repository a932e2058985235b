"""The pass pipeline: find sites, check masks, insert merges, re-propagate shapes, restore outputs."""
from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any, Optional, Sequence

from torch.fx import GraphModule

from turbo_fx.config import TurboConfig
from turbo_fx.passes.check_masks import check_masks, drop_cleared_masks
from turbo_fx.passes.explicit_as_sdpa import explicit_as_sdpa
from turbo_fx.passes.find_attention import find_attention_sites
from turbo_fx.passes.find_components import GridRun, find_grid_runs
from turbo_fx.passes.merge_and_restore import insert_merge_and_restore, plan_components
from turbo_fx.passes.insert_merges import insert_merges, plan_merges
from turbo_fx.passes.propagate_shapes import CannotRewrite, ShapeHints, propagate_shapes
from turbo_fx.passes.protected_tokens import count_protected_tokens, count_trailing_tokens, has_class_token
from turbo_fx.passes.restore_outputs import restore_outputs
from turbo_fx.passes.weight_token_means import weight_token_means
from turbo_fx.passes.streams import StreamPlan, plan_streams
from turbo_fx.report import ComponentReport, GraphReport, SiteReport

log = logging.getLogger("turbo_fx")


class NothingToMerge(Exception):
    """The graph is fine but the configuration merges nothing in it (e.g. r=0)."""


def copy_graph_module(gm: GraphModule) -> GraphModule:
    """A new GraphModule over a copy of ``gm``'s graph (node metadata copied, modules shared),
    so a failed rewrite leaves the original untouched."""
    new = GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
    new.meta.update(gm.meta)
    return new


def rewrite_graph(
    gm: GraphModule,
    fake_mode,
    config: TurboConfig,
    report: GraphReport,
    example_inputs: Optional[Sequence[Any]] = None,
    for_split: bool = False,
) -> GraphModule:
    """Return a rewritten copy of ``gm`` that merges tokens as ``config`` says, filling ``report``.

    The merges are first built with concrete token counts: fake propagation then catches
    every shape that no longer fits. Only when that succeeds is the graph built again
    with symbolic (unbacked) counts, where a mismatch could only surface at run time;
    if that second build fails, the concrete one is kept.

    ``for_split``: the graph will be compiled block by block (``block_compile``), which
    compiles each piece from the values it runs on, its token count a backed symbolic size.
    The concrete build then serves alone, its rewritten sizes read from the tensors
    (``propagate_shapes(read_sizes=True)``) so that the blocks' pieces have the same code;
    the symbolic build, most of a rewrite's time (1.9 of 2.2 s on DeiT-S, 2 cores), is skipped.

    Raises ``CannotRewrite`` (the caller compiles ``gm`` unchanged and says why) or
    ``NothingToMerge``.
    """
    sites = find_attention_sites(gm)
    if not sites:
        raise CannotRewrite("no attention site found in the graph")
    runs = find_grid_runs(gm, sites)
    if runs:
        return rewrite_generation(gm, fake_mode, config, report, sites, runs)
    cleared = check_masks(gm, example_inputs, sites) if example_inputs is not None else []
    plan = plan_streams(sites)
    report.sites = site_reports(sites, plan)
    if plan.chosen is None:
        raise CannotRewrite(plan.problems())
    sites = plan.chosen.sites
    tail = 0
    if config.protected == "auto":
        protected, note = count_protected_tokens(gm, sites[0].residual)
        tail = count_trailing_tokens(sites[0].residual)
        if tail:
            note += f"; and {tail} appended parameter token(s) at the end"
    else:
        protected, note = config.protected, "set by the 'protected' option"
    report.protected, report.protected_note, report.protected_tail = protected, note, tail
    if config.semantic and not has_class_token(sites[0].residual):
        config = _without_class_token(config)
        report.semantic_source = ("off: the sequence has no class token (only patch tokens), so no attention "
                                  "row ranks them; redundancy only")
    else:
        report.semantic_source = semantic_source(config, plan)
    report.padding = any(s.mask is not None for s in sites)
    try:
        report.blocks = plan_merges(sites, config, protected, tail)
    except ValueError as exc:  # a per-block r list of the wrong length
        raise CannotRewrite(str(exc)) from exc
    if not any(b.r_applied for b in report.blocks):
        report.sites = [dataclasses.replace(s, decision="untouched", reason="the configuration merges no token "
                                            "(r = 0 after clamping)") for s in report.sites]
        raise NothingToMerge("the configuration merges no token in this graph")
    if fake_mode is None:
        raise CannotRewrite("no fake tensor mode to re-propagate shapes with (graph not from Dynamo)")

    chosen = {s.index for s in sites}
    readers = {i: (after, plan.chosen.key_layout.get(i, (0, 0))) for i, after in plan.chosen.read_after.items()}
    rewritten = _build(gm, fake_mode, config.replace(symbolic_tokens=False), (protected, tail), report, chosen, cleared,
                       readers, read_sizes=for_split)
    if for_split:
        return rewritten
    # Symbolic token counts only serve a compiler that generates kernels; "eager" runs the
    # graph as it is, so the second build would be wasted work.
    if config.symbolic_tokens and config.inner_backend != "eager":
        try:
            rewritten = _build(gm, fake_mode, config, (protected, tail), report, chosen, cleared, readers)
        except CannotRewrite as exc:
            log.info("turbo: kept concrete token counts; symbolic ones failed: %s", exc)
    return rewritten


def rewrite_generation(gm: GraphModule, fake_mode, config: TurboConfig, report: GraphReport,
                       sites, runs: list[GridRun]) -> GraphModule:
    """Merge-and-restore mode: a copy of ``gm`` whose chosen generation components run on
    merged tokens and restore them, so every stream between components keeps its shape."""
    plans = plan_components(runs, config)
    in_runs = {c.site.index: c for run in runs for c in run.components if c.site is not None}
    merging = {p.component.site.index for p in plans if p.merges and p.component.site is not None}
    report.sites = [
        SiteReport(s.index, s.module, s.kind, in_runs[s.index].run if s.index in in_runs else -1,
                   "merges" if s.index in merging else "untouched",
                   "" if s.index in merging else _generation_untouched_reason(s, in_runs, plans))
        for s in sites
    ]
    if not any(p.merges for p in plans):
        report.components = [_component_report(p) for p in plans]
        raise NothingToMerge("the configuration merges no token of this generation graph")
    if fake_mode is None:
        raise CannotRewrite("no fake tensor mode to re-propagate shapes with (graph not from Dynamo)")
    work = copy_graph_module(gm)
    work_runs = find_grid_runs(work, find_attention_sites(work))
    work_plans = plan_components(work_runs, config)
    old_values = {n: n.meta.get("example_value") for n in work.graph.nodes}
    insertion = insert_merge_and_restore(work, work_plans, config, fake_mode)
    report.components = insertion.reports
    propagate_shapes(work, fake_mode, old_values, insertion.touched, 0, ShapeHints())
    work.graph.lint()
    work.recompile()
    return work


def _without_class_token(config: TurboConfig) -> TurboConfig:
    """The ranking a sequence without a class token allows: redundancy alone."""
    if not config.redundancy:
        raise CannotRewrite("semantic-only ranking (redundancy=False) needs a class token, and this sequence "
                            "has none (only patch tokens)")
    return config.replace(semantic=False, keep_salient=0)


def _component_report(plan) -> ComponentReport:
    c = plan.component
    return ComponentReport(c.index, c.module, c.kind, c.block, c.grid, c.tokens, 0, "untouched", plan.reason)


def _generation_untouched_reason(site, in_runs, plans) -> str:
    if site.index not in in_runs:
        return "not in a block whose tokens return to a grid"
    component = in_runs[site.index]
    return next(p.reason for p in plans if p.component is component) or "untouched"


def _build(gm: GraphModule, fake_mode, config: TurboConfig, protected: tuple[int, int], report: GraphReport,
           chosen: set[int], cleared_masks: list[int], readers: dict[int, tuple],
           read_sizes: bool = False) -> GraphModule:
    """One rewrite of a fresh copy of ``gm``: insert merges at the ``chosen`` sites (one
    stream) and the key bias at the cross-attention sites that read it, re-propagate,
    restore outputs (``read_sizes``: see ``rewrite_graph``'s ``for_split``)."""
    work = copy_graph_module(gm)
    every_site = find_attention_sites(work)
    if config.explicit_as_sdpa:
        every_site = _explicit_sites_as_sdpa(work, every_site, chosen | set(readers), report)
    drop_cleared_masks(every_site, cleared_masks)
    sites = [s for s in every_site if s.index in chosen]
    reading = [(every_site[i], after, layout) for i, (after, layout) in sorted(readers.items())]
    old_values = {n: n.meta.get("example_value") for n in work.graph.nodes}
    head, tail = protected
    insertion = insert_merges(work, sites, report.blocks, config, head, reading, tail)
    for merged, original in insertion.replaced.items():
        old_values[merged] = old_values[original]
    hints = ShapeHints()
    propagate_shapes(work, fake_mode, old_values, insertion.touched, head, hints, tail=tail,
                     assign_by_count=insertion.assign_by_count, read_sizes=read_sizes)
    report.reductions_weighted, report.reductions_unweighted = weight_token_means(work, fake_mode, old_values, hints)
    if config.restore_outputs:
        report.outputs_restored = restore_outputs(work, fake_mode, old_values, insertion.assign_by_count, hints)
    work.graph.lint()
    work.recompile()
    return work


def _explicit_sites_as_sdpa(work: GraphModule, every_site, wanted: set[int], report: GraphReport):
    """Emit the ``wanted`` explicit sites that SDPA can express as SDPA calls and find the
    sites again (the converted ones are now "sdpa" sites with the same indices)."""
    converted = explicit_as_sdpa(work, [s for s in every_site if s.index in wanted])
    report.sdpa_sites = converted
    if not converted:
        return every_site
    found = find_attention_sites(work)
    if [s.module for s in found] != [s.module for s in every_site] or any(
            found[i].kind != "sdpa" for i in converted):
        raise CannotRewrite("emitting explicit attention as SDPA changed the attention sites found")
    return found


def semantic_source(config: TurboConfig, plan: StreamPlan) -> str:
    """Which attention map ranks the merged sequence's tokens by semantic value. The paper
    also allows a text token's cross-attention map; that needs text attending to the tokens
    before they merge, and a reader here reads them only after the merges it follows."""
    if not config.semantic:
        return "off (semantic=False: redundancy only)"
    source = "the first token's (CLS) self-attention row at each merging block"
    if plan.chosen is not None and plan.chosen.readers:
        readers = ", ".join(str(r.index) for r in plan.chosen.readers)
        source += (f"; the cross-attention of site(s) {readers} reads the tokens only after they merge, "
                   "so its map cannot rank them")
    return source


def site_reports(sites, plan: StreamPlan) -> list[SiteReport]:
    by_index = {s.index: s for s in sites}
    return [
        SiteReport(d.site, by_index[d.site].module, by_index[d.site].kind, d.stream,
                   "merges" if d.merge else ("reads merged" if d.reads is not None else "untouched"), d.reason)
        for d in plan.decisions
    ]
