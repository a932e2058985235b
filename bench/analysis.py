"""Redundancy analysis (the paper's Figure 3) for any model the turbo backend can read.

Per self-attention block, on one batch:
  * token redundancy S: the mean pairwise cosine similarity between the tokens of
    the residual stream entering the block, diagonal excluded, real tokens only
    when the attention has a padding mask;
  * attention concentration C: the CLS (first) query's attention, averaged over
    heads, summed over the ceil(N/4) tokens it attends most (N real tokens).

No per-model code: the model is compiled with a small Dynamo backend that taps
every attention site (``bench/tap_attention.py``) and runs the graph eagerly;
each tap computes the two numbers from the live tensors.

    report = analyze_redundancy(model, images)
    print(report.table()); plot_redundancy(report, "redundancy.png")
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import torch
from tabulate import tabulate
from torch import Tensor

from turbo_fx import ops
from turbo_fx.bench.tap_attention import TapSite, tap_attention

# C sums the top quarter of the CLS query's attention. The paper writes floor(n/4)
# (Eq. 14); we take ceil so that a short sequence (n < 4) still counts one token.
TOP_FRACTION = 0.25


class NoAttentionError(ValueError):
    """The model has no self-attention site the analysis can read."""


@dataclass
class BlockRedundancy:
    """S and C of one attention block, averaged over the batch."""

    block: int  # order in which the block ran (0 = first attention)
    module: str
    kind: str  # "sdpa" or "explicit"
    tokens: int  # sequence length, padding included
    real_tokens: float  # real (unpadded) tokens, averaged over the batch
    redundancy: float  # S, batch mean
    redundancy_std: float  # S, batch standard deviation (0 for one sample)
    concentration: float  # C, batch mean
    concentration_std: float


@dataclass
class RedundancyReport:
    """Per-block token redundancy and attention concentration of one model on one batch."""

    blocks: list[BlockRedundancy] = field(default_factory=list)
    label: str = ""
    skipped: list[str] = field(default_factory=list)  # attention sites the taps could not read

    @property
    def redundancy(self) -> list[float]:
        return [b.redundancy for b in self.blocks]

    @property
    def concentration(self) -> list[float]:
        return [b.concentration for b in self.blocks]

    def table(self, fmt: str = "github") -> str:
        head = ["block", "module", "attention", "tokens", "S (redundancy)", "S std", "C (concentration)", "C std"]
        rows = [
            [b.block, b.module or "-", b.kind, b.tokens, b.redundancy, b.redundancy_std,
             b.concentration, b.concentration_std]
            for b in self.blocks
        ]
        if any(b.real_tokens != b.tokens for b in self.blocks):  # padded batch: say how many were real
            head.insert(4, "real tokens (mean)")
            for row, b in zip(rows, self.blocks):
                row.insert(4, b.real_tokens)
        return tabulate(rows, headers=head, tablefmt=fmt, floatfmt=".4f")

    def to_dict(self) -> dict:
        return {"label": self.label, "blocks": [asdict(b) for b in self.blocks], "skipped": list(self.skipped)}

    def __str__(self) -> str:
        title = f"{self.label}: " if self.label else ""
        return f"{title}token redundancy S and attention concentration C per attention block\n{self.table()}"


# ---- the statistics (pure functions of tensors) ------------------------------------


def token_redundancy(x: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """S per sample [B]: mean cosine similarity over ordered pairs of distinct tokens
    of x [B, N, C], counting only tokens where ``valid`` [B, N] is True."""
    unit = torch.nn.functional.normalize(x.double(), dim=-1)
    gram = unit @ unit.transpose(-1, -2)
    n = x.shape[1]
    pair = ~torch.eye(n, dtype=torch.bool, device=x.device)
    if valid is not None:
        pair = pair & valid[:, :, None] & valid[:, None, :]
    pair = pair.expand_as(gram)
    count = pair.sum(dim=(-1, -2)).double()
    # Fewer than two real tokens: no pair, S is undefined (nan), not 0.
    return torch.where(pair, gram, 0.0).sum(dim=(-1, -2)) / count


def attention_concentration(cls_row: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """C per sample [B]: the attention mass [B, N] of the top ceil(n/4) tokens, n real tokens."""
    row = cls_row.double()
    if valid is None:
        valid = torch.ones_like(row, dtype=torch.bool)
    n_real = valid.sum(dim=-1)
    top = torch.where(valid, row, -1.0).sort(dim=-1, descending=True).values
    keep = torch.ceil(n_real.double() * TOP_FRACTION).long()
    rank = torch.arange(row.shape[-1], device=row.device)
    return torch.where(rank[None, :] < keep[:, None], top, 0.0).sum(dim=-1)


def padding_validity(mask: Optional[Tensor], stream: Tensor) -> Optional[Tensor]:
    """Which tokens are real, [B, N] bool, from the keys the CLS query may see; None
    without a mask. A mask that hides no key of any sample means no padding."""
    if mask is None:
        return None
    valid = ops.key_validity(mask, stream)
    return None if bool(valid.all()) else valid


def cls_attention_row(site: TapSite, q: Tensor, k: Tensor, mask: Optional[Tensor], probs: Optional[Tensor]) -> Tensor:
    """The CLS query's attention over the keys, averaged over heads, [B, N]."""
    if probs is not None:
        return ops.cls_attention_from_probs(probs)
    keys = k if site.k_token_axis in (-2, k.dim() - 2) else k.transpose(-1, -2)
    return ops.cls_attention(q, keys, site.scale, mask)


# ---- recording through the taps --------------------------------------------------


@dataclass
class _Sample:
    site: TapSite
    tokens: int
    real_tokens: Tensor  # [B]
    s: Tensor  # [B]
    c: Tensor  # [B]


_RECORDERS: list[list[_Sample]] = []


def record_block(index: int, module: str, kind: str, k_token_axis: int, scale: Optional[float],
                 residual: Tensor, q: Tensor, k: Tensor, mask: Optional[Tensor], probs: Optional[Tensor]) -> None:
    """The tap the analysis backend inserts: S and C of one block, appended to the
    innermost active recorder (in the order the blocks run)."""
    if not _RECORDERS or ops._is_fake(residual):
        return
    site = TapSite(index, module, kind, k_token_axis, scale)
    with torch.no_grad():
        valid = padding_validity(mask, residual)
        row = cls_attention_row(site, q, k, mask, probs)
        n_real = valid.sum(dim=-1) if valid is not None else torch.full((residual.shape[0],), residual.shape[1])
        _RECORDERS[-1].append(
            _Sample(site, residual.shape[1], n_real.cpu(), token_redundancy(residual, valid).cpu(),
                    attention_concentration(row, valid).cpu())
        )


@contextlib.contextmanager
def _recording() -> Iterator[list[_Sample]]:
    samples: list[_Sample] = []
    _RECORDERS.append(samples)
    try:
        yield samples
    finally:
        _RECORDERS.remove(samples)


class _TapBackend:
    """A Dynamo backend: tap the attention sites of each graph, run it eagerly."""

    def __init__(self) -> None:
        self.tapped = 0
        self.skipped: list[str] = []
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        gm, result = tap_attention(gm, record_block)
        self.tapped += len(result.tapped)
        self.skipped.extend(f"graph {self.graphs - 1} {s}" for s in result.skipped)
        return gm.forward


def _summarise(samples: list[_Sample]) -> list[BlockRedundancy]:
    rows = []
    for order, sample in enumerate(samples):
        rows.append(BlockRedundancy(
            block=order,
            module=sample.site.module,
            kind=sample.site.kind,
            tokens=sample.tokens,
            real_tokens=float(sample.real_tokens.double().mean()),
            redundancy=float(sample.s.mean()),
            redundancy_std=_std(sample.s),
            concentration=float(sample.c.mean()),
            concentration_std=_std(sample.c),
        ))
    return rows


def _std(values: Tensor) -> float:
    # Population std: one sample gives 0 rather than nan.
    return float(values.std(correction=0)) if values.numel() else math.nan


def analyze_redundancy(model: Any, *inputs: Any, model_kwargs: Optional[dict] = None, label: str = "") -> RedundancyReport:
    """Run ``model(*inputs, **model_kwargs)`` once and report S and C per attention block.

    The model is compiled (without ``torch.compile`` options that change its maths)
    with a backend that taps every self-attention site; Dynamo's caches are reset
    before and after, so no compiled state outlives the call. Raises
    ``NoAttentionError`` when no attention block ran."""
    backend = _TapBackend()
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend=backend, dynamic=False)
        with _recording() as samples, torch.no_grad():
            compiled(*inputs, **(model_kwargs or {}))
    finally:
        torch._dynamo.reset()
    if not samples:
        why = "; ".join(backend.skipped) if backend.skipped else "no scaled_dot_product_attention or softmax attention in the graph"
        raise NoAttentionError(
            f"analyze_redundancy found no self-attention block to read in {type(model).__name__} "
            f"({backend.graphs} graph(s) captured): {why}"
        )
    return RedundancyReport(blocks=_summarise(samples), label=label, skipped=list(backend.skipped))


# ---- the figure ----------------------------------------------------------------------

ReportsArg = Union[RedundancyReport, Sequence[RedundancyReport], Mapping[str, RedundancyReport]]


def _labelled(reports: ReportsArg) -> list[tuple[str, RedundancyReport]]:
    if isinstance(reports, RedundancyReport):
        reports = [reports]
    if isinstance(reports, Mapping):
        return [(str(name), rep) for name, rep in reports.items()]
    return [(rep.label or f"model {i}", rep) for i, rep in enumerate(reports)]


def plot_redundancy(reports: ReportsArg, path: str, title: str = "Token redundancy and attention concentration") -> str:
    """Write a PNG with S (left) and C (right) per attention block, one line per model,
    like the paper's Figure 3. ``reports``: one report, a list, or {label: report}.
    Returns ``path``."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, Agg canvas

    labelled = _labelled(reports)
    if not labelled:
        raise ValueError("plot_redundancy needs at least one report")
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_s, ax_c = fig.subplots(1, 2)
    for name, rep in labelled:
        blocks = [b.block for b in rep.blocks]
        ax_s.plot(blocks, rep.redundancy, marker="o", label=name)
        ax_c.plot(blocks, rep.concentration, marker="o", label=name)
    ax_s.set_title("token redundancy S (mean pairwise cosine)")
    ax_c.set_title("attention concentration C (CLS mass on top 1/4)")
    for ax in (ax_s, ax_c):
        ax.set_xlabel("attention block")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    # Both are fractions; cosines can be negative, so only the top is pinned.
    ax_s.set_ylim(top=1.02)
    ax_c.set_ylim(0.0, 1.02)
    ax_c.legend(loc="best", fontsize="small")
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    return path


# ---- ``turbo-fx analyze`` --------------------------------------------------------------------


def run(args) -> dict:
    """S and C of each model in ``args.model`` on ``args.batch`` example inputs, one plot for all."""
    import os

    from turbo_fx.bench import output, timing
    from turbo_fx.model_zoo.registry import build_model

    reports, weights = {}, {}
    for name in args.model:
        zoo = build_model(name)
        timing.log(f"analyzing {name}: {zoo.description}")
        weights[name] = "real" if zoo.real_weights else "RANDOM"
        reports[name] = analyze_redundancy(zoo.model, *zoo.example_inputs(args.batch), label=name)
    png = plot_redundancy(reports, os.path.join(args.out, "redundancy.png"))
    payload = {"command": args.command, "machine": timing.machine(),
               "reports": {k: r.to_dict() for k, r in reports.items()}}

    def render(_: dict) -> str:
        lines = output.header("Token redundancy S and attention concentration C per block", payload)
        for name, report in reports.items():
            lines += [f"## {name} ({weights[name]} weights)", "", report.table(), ""]
        return "\n".join(lines + [
            "S: mean pairwise cosine similarity of the tokens entering the block (real tokens only). "
            "C: the first token's attention (averaged over heads) on the top quarter of tokens.", "",
            f"![redundancy]({os.path.basename(png)})", ""])

    output.write(payload, args.out, "redundancy", render)
    return payload

