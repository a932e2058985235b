"""``turbo_fx.explain``: what the turbo backend would do to a model, in the spirit of ``torch._dynamo.explain``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from tabulate import tabulate

from turbo_fx.backend import turbo_backend
from turbo_fx.config import TurboConfig, resolve_config
from turbo_fx.report import TurboReport, recording
from turbo_fx.torch_compat import reset_compiler


def explain(model: torch.nn.Module, *inputs: Any, model_kwargs: Optional[dict] = None,
            config: Optional[TurboConfig] = None, **options: Any) -> TurboReport:
    """Compile ``model`` with the turbo backend, run it once on ``inputs`` and report, per
    graph: attention sites, merges, tokens per block, FLOPs before and after, and any
    fallback reason. Unless ``inner_backend`` is given, the rewritten graph runs eagerly
    (the report is about the rewrite, not Inductor's code); ``compile_blocks`` then has
    nothing to split for, and the rewrite it reports is the same either way."""
    if config is None and "inner_backend" not in options:
        options["inner_backend"] = "eager"
        options["compile_blocks"] = False
    config = resolve_config(config, **options)
    reset_compiler()
    compiled = torch.compile(model, backend=turbo_backend, options=config)
    with recording(count_flops=True) as recorder, torch.no_grad():
        compiled(*inputs, **(model_kwargs or {}))
    reset_compiler()
    return TurboReport(graphs=list(recorder.graphs))


@dataclass
class TradeOffRow:
    budget: float
    schedule: str  # what the budget solved: r per block, or the merge ratio
    flop_ratio: Optional[float]  # counted on the rewritten graph
    tokens_per_block: list[int] = field(default_factory=list)
    fallback: str = ""


@dataclass
class TradeOff:
    """FLOPs against merging for one model and input: one row per FLOP budget."""

    rows: list[TradeOffRow]

    def table(self, fmt: str = "github") -> str:
        head = ["flops asked", "solved", "FLOP ratio counted", "tokens per block"]
        rows = [[f"{r.budget:.2f}", r.fallback or r.schedule,
                 "-" if r.flop_ratio is None else f"{r.flop_ratio:.3f}",
                 " -> ".join(str(n) for n in r.tokens_per_block)] for r in self.rows]
        return tabulate(rows, headers=head, tablefmt=fmt)

    def __str__(self) -> str:
        return self.table()


def trade_off(model: torch.nn.Module, *inputs: Any, budgets: Sequence[float] = (0.9, 0.75, 0.6, 0.5),
              model_kwargs: Optional[dict] = None, **options: Any) -> TradeOff:
    """For each FLOP budget, what the backend would merge (``explain`` with ``flops=budget``,
    the rewritten graph run eagerly, never compiled by Inductor): the schedule solved for the
    model's main graph, the FLOP ratio counted on the rewritten graph and the tokens per block."""
    if "r" in options or "flops" in options:
        raise TypeError("trade_off solves r from each budget: give budgets, not r or flops")
    rows = []
    for budget in budgets:
        report = explain(model, *inputs, model_kwargs=model_kwargs, flops=budget, **options)
        graph = max(report.graphs, key=lambda g: (bool(g.budget), g.flops_before or 0), default=None)
        if graph is None:
            rows.append(TradeOffRow(budget, "", None, fallback="no graph was compiled"))
            continue
        solved = graph.budget.split(": ", 1)[-1] if graph.budget else ""
        rows.append(TradeOffRow(budget, solved, graph.flop_ratio, graph.tokens_per_block,
                                graph.fallback_reason or ""))
    return TradeOff(rows)
