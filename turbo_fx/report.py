"""What the backend did to each graph: a report object users and tests can read, and counters."""
from __future__ import annotations

import collections
import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Optional

from tabulate import tabulate

# Like Inductor's counters: totals since import (or ``counters.clear()``), for tests and logs.
counters: collections.Counter = collections.Counter()


@dataclass
class PassRecord:
    """One rewrite pass of one graph: whether it ran ("ran", or "off (<why>)"), its time, and
    how many nodes it inserted or edited."""

    name: str
    status: str
    seconds: float = 0.0
    changes: int = 0


PLACEHOLDERS = "placeholders"  # BlockReport.kind of a placeholder compaction (one per graph)


@dataclass
class BlockReport:
    index: int
    module: str
    kind: str
    tokens_in: int
    r_requested: int
    r_applied: int

    @property
    def tokens_out(self) -> int:
        return self.tokens_in - self.r_applied


@dataclass
class SiteReport:
    """What happened at one attention site: ``merges`` (its sequence is the merged one; the
    block table says how many tokens) or ``untouched`` (its sequence runs exactly as before),
    with the reason for the latter."""

    index: int
    module: str
    kind: str
    stream: int
    decision: str
    reason: str = ""


@dataclass
class ComponentReport:
    """One component of a generation block (merge-and-restore mode): whether it runs on merged
    tokens (``merges``) or exactly as before (``untouched``, with the reason), how many of its
    tokens merge, and where the block's semantic value came from."""

    index: int
    module: str
    kind: str  # "self-attention", "cross-attention" or "feed-forward"
    block: int
    grid: tuple
    tokens_in: int
    r_applied: int
    decision: str
    reason: str = ""
    semantic: str = ""

    @property
    def tokens_merged(self) -> int:
        return self.tokens_in - self.r_applied


@dataclass
class GraphReport:
    """One graph Dynamo handed to the backend."""

    graph_index: int
    n_nodes: int
    blocks: list[BlockReport] = field(default_factory=list)
    sites: list[SiteReport] = field(default_factory=list)
    components: list[ComponentReport] = field(default_factory=list)  # merge-and-restore mode
    protected: Optional[int] = None
    protected_note: str = ""
    protected_tail: int = 0  # protected tokens at the end of the sequence (YOLOS's detection tokens)
    semantic_source: str = ""  # where the semantic value came from (merge mode)
    padding: bool = False
    budget: str = ""  # a FLOP budget: the schedule solved for it and the FLOP ratio it predicts
    mode_note: str = ""  # why merge-and-restore serves a graph that is not a generation graph; what compaction did
    sdpa_sites: list[int] = field(default_factory=list)  # explicit attention sites emitted as one SDPA call
    outputs_restored: int = 0
    reductions_weighted: int = 0  # token-axis means/sums made size-weighted
    reductions_unweighted: int = 0  # token-axis means/sums over merged tokens left unweighted
    # per-token tables merged with the tokens (rotary cos/sin, position embeddings): "<node> (<rows>
    # rows from token <offset>): <rule>", the rule "position" or "rows", with why rows where
    # position was asked for
    token_tables: list[str] = field(default_factory=list)
    passes: list[PassRecord] = field(default_factory=list)  # the rewrite's passes, in order
    fallback_reason: Optional[str] = None
    run_time_failures: int = 0  # merged calls that failed at run time and ran unmerged (``guarded_call``)
    last_run_time_failure: str = ""  # the latest of those failures, as "<error type>: <message>"
    block_compile: str = ""  # compile_blocks: the pieces compiled, or why the graph was compiled whole
    cuda_graph: str = ""  # CUDA-graph modes, split graphs: "captured (...)" or "not captured: <why>"
    flops_before: Optional[int] = None
    flops_after: Optional[int] = None
    rewrite_seconds: float = 0.0
    compile_seconds: float = 0.0
    graph_module: Optional[object] = field(default=None, repr=False)  # kept with recording(keep_graphs=True)

    @property
    def rewritten(self) -> bool:
        applied = any(b.r_applied for b in self.blocks) or any(c.r_applied for c in self.components)
        return self.fallback_reason is None and applied

    @property
    def mode(self) -> str:
        """"merge-and-restore" for generation graphs, "compact" for a language model whose
        placeholder tokens merge once, "merge" for encoders."""
        if self.components:
            return "merge-and-restore"
        return "compact" if self.blocks and self.blocks[0].kind == PLACEHOLDERS else "merge"

    @property
    def tokens_per_block(self) -> list[int]:
        return [b.tokens_in for b in self.blocks]

    @property
    def merges(self) -> int:
        """Merges inserted: one per merging block (merge mode) or per merging component
        (merge-and-restore mode, each with its restore)."""
        return sum(1 for b in self.blocks if b.r_applied > 0) + sum(1 for c in self.components if c.r_applied > 0)

    @property
    def flop_ratio(self) -> Optional[float]:
        if self.flops_before and self.flops_after is not None:
            return self.flops_after / self.flops_before
        return None

    def table(self, fmt: str = "github") -> str:
        rows = [
            [b.index, b.module or "-", b.kind, b.tokens_in, b.r_requested, b.r_applied, b.tokens_out]
            for b in self.blocks
        ]
        head = ["block", "module", "attention", "tokens in", "r asked", "r applied", "tokens out"]
        return tabulate(rows, headers=head, tablefmt=fmt)

    def components_table(self, fmt: str = "github") -> str:
        rows = [[c.index, c.module or "-", c.kind, c.block, f"{c.grid[0]}x{c.grid[1]}", c.tokens_in,
                 c.tokens_merged if c.decision == "merges" else "-", c.decision, c.semantic or "-", c.reason or "-"]
                for c in self.components]
        head = ["component", "module", "kind", "block", "grid", "tokens", "merged to", "decision", "semantic value", "reason"]
        return tabulate(rows, headers=head, tablefmt=fmt)

    @property
    def untouched_sites(self) -> list[SiteReport]:
        return [s for s in self.sites if s.decision == "untouched"]

    def passes_table(self, fmt: str = "github") -> str:
        rows = [[p.name, p.status, f"{p.seconds * 1e3:.1f}", p.changes] for p in self.passes]
        return tabulate(rows, headers=["pass", "status", "ms", "nodes changed"], tablefmt=fmt)

    def sites_table(self, fmt: str = "github") -> str:
        rows = [[s.index, s.module or "-", s.kind, s.stream, s.decision, s.reason or "-"] for s in self.sites]
        head = ["site", "module", "attention", "sequence", "decision", "reason"]
        return tabulate(rows, headers=head, tablefmt=fmt)

    def summary(self) -> str:
        if self.components:
            merging = [c for c in self.components if c.decision == "merges"]
            lines = [f"graph {self.graph_index}: {self.n_nodes} nodes, merge-and-restore: {len(merging)} of "
                     f"{len(self.components)} generation components merge and restore"]
        else:
            lines = [f"graph {self.graph_index}: {self.n_nodes} nodes, {len(self.blocks)} attention sites, {self.merges} merges"]
        if self.fallback_reason:
            lines.append(f"  FALLBACK (compiled unchanged): {self.fallback_reason}")
        elif self.untouched_sites and self.merges:
            streams = sorted({s.stream for s in self.untouched_sites})
            lines.append(f"  untouched (exact): {len(self.untouched_sites)} site(s) in sequence(s) {streams}; see the sites table")
        if self.run_time_failures and not self.fallback_reason:
            lines.append(f"  run-time failures: {self.run_time_failures} call(s) ran unmerged, the latest: "
                         f"{self.last_run_time_failure}")
        if self.protected is not None:
            lines.append(f"  protected tokens: {self.protected} ({self.protected_note})")
        if self.mode_note:
            lines.append(f"  mode: {self.mode_note}")
        if self.budget:
            lines.append(f"  FLOP budget: {self.budget}")
        if self.semantic_source:
            lines.append(f"  semantic value: {self.semantic_source}")
        if self.token_tables:
            lines.append(f"  per-token tables merged with the tokens: {'; '.join(self.token_tables)}")
        if self.padding:
            lines.append("  padding mask: followed through merges (padding never merges into real tokens)")
        if self.sdpa_sites:
            lines.append(f"  explicit attention emitted as scaled_dot_product_attention: site(s) {self.sdpa_sites}")
        if self.reductions_weighted or self.reductions_unweighted:
            lines.append(
                f"  token-axis means/sums: {self.reductions_weighted} size-weighted, "
                f"{self.reductions_unweighted} left unweighted (their tokens could not be traced to a merge)"
            )
        if self.outputs_restored:
            lines.append(f"  outputs restored to the original token count: {self.outputs_restored}")
        ran = [p for p in self.passes if p.status == "ran"]
        if ran:
            lines.append("  passes (nodes changed, time): " + ", ".join(
                f"{p.name} {p.changes} ({p.seconds * 1e3:.0f} ms)" for p in ran))
        if self.flops_before is not None and self.flops_after is not None:
            lines.append(
                f"  FLOPs: {self.flops_before / 1e9:.3f} G -> {self.flops_after / 1e9:.3f} G "
                f"(ratio {self.flop_ratio:.3f})"
            )
        return "\n".join(lines)


@dataclass
class TurboReport:
    """Every graph of one compiled model, printable as tables."""

    graphs: list[GraphReport] = field(default_factory=list)

    @property
    def fallbacks(self) -> list[str]:
        return [g.fallback_reason for g in self.graphs if g.fallback_reason]

    @property
    def flops_before(self) -> int:
        return sum(g.flops_before or 0 for g in self.graphs)

    @property
    def flops_after(self) -> int:
        return sum(g.flops_after or 0 for g in self.graphs)

    @property
    def flop_ratio(self) -> Optional[float]:
        return self.flops_after / self.flops_before if self.flops_before else None

    def __str__(self) -> str:
        if not self.graphs:
            return "turbo: no graph was compiled"
        parts = []
        for g in self.graphs:
            parts.append(g.summary())
            if g.blocks:
                parts.append(g.table())
            if g.components:
                parts.append(g.components_table())
            if g.untouched_sites and g.blocks:
                parts.append(g.sites_table())
        return "\n\n".join(parts)


class _Recorder:
    def __init__(self, count_flops: bool, keep_graphs: bool) -> None:
        self.count_flops = count_flops
        self.keep_graphs = keep_graphs
        self.graphs: list[GraphReport] = []


_recorders: list[_Recorder] = []


@contextlib.contextmanager
def recording(count_flops: bool = False, keep_graphs: bool = False) -> Iterator[_Recorder]:
    """Collect the GraphReport of every graph compiled inside the block; ``count_flops``
    runs each graph once before and after rewriting under a FLOP counter, and
    ``keep_graphs`` keeps the rewritten GraphModule in ``GraphReport.graph_module``."""
    recorder = _Recorder(count_flops, keep_graphs)
    _recorders.append(recorder)
    try:
        yield recorder
    finally:
        _recorders.remove(recorder)


def wants_flops() -> bool:
    return any(r.count_flops for r in _recorders)


def wants_graphs() -> bool:
    return any(r.keep_graphs for r in _recorders)


def publish(report: GraphReport) -> None:
    for recorder in _recorders:
        recorder.graphs.append(report)
