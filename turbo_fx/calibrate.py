"""``turbo_fx.calibrate``: the largest FLOP saving whose output drift stays within a budget,
measured on the user's own batches.

For each candidate FLOP budget (and each ``alpha``, where given) the model is compiled with
the turbo backend, the rewritten graphs run eagerly (no Inductor compile is paid), and every
batch's output is compared with the unmerged model's. The drift of a batch is the mean over
its samples of 1 - cosine similarity (``metric="cosine"``), of the relative L2 error
(``"relative_l2"``), or what a user metric returns for the batch. Over the batches, the drift
gets its mean and a one-sided 95% upper bound (Student's t); the candidate with the smallest
counted FLOP ratio whose upper bound is within ``max_drift`` wins.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from tabulate import tabulate

from turbo_fx.backend import turbo_backend
from turbo_fx.config import TurboConfigError, resolve_config
from turbo_fx.report import recording
from turbo_fx.torch_compat import reset_compiler

METRICS = ("cosine", "relative_l2")
DEFAULT_BUDGETS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4)
# One-sided 95% quantiles of Student's t by degrees of freedom (1..30); 1.645 beyond.
_T95 = (6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812, 1.796, 1.782, 1.771, 1.761,
        1.753, 1.746, 1.740, 1.734, 1.729, 1.725, 1.721, 1.717, 1.714, 1.711, 1.708, 1.706, 1.703, 1.701,
        1.699, 1.697)
Metric = Union[str, Callable[[torch.Tensor, torch.Tensor], float]]


@dataclass
class Candidate:
    options: dict
    flop_ratio: Optional[float]
    drift: float  # mean over batches
    drift_upper: float  # one-sided 95% upper bound over batches (the mean for one batch)
    per_batch: list[float] = field(default_factory=list)
    within: bool = False


@dataclass
class Calibration:
    """What ``calibrate`` chose (``options``, ready for ``torch.compile(..., options=...)``)
    and every candidate it measured."""

    options: dict
    max_drift: float
    metric: str
    candidates: list[Candidate]
    note: str = ""

    @property
    def chosen(self) -> Optional[Candidate]:
        return next((c for c in self.candidates if c.options == self.options), None)

    def table(self, fmt: str = "github") -> str:
        rows = [[json.dumps(c.options), "-" if c.flop_ratio is None else f"{c.flop_ratio:.3f}",
                 f"{c.drift:.5f}", f"{c.drift_upper:.5f}", "yes" if c.within else "no",
                 "<-" if c.options == self.options else ""] for c in self.candidates]
        head = ["options", "FLOP ratio", f"drift ({self.metric})", "95% upper bound", f"<= {self.max_drift}", "chosen"]
        return tabulate(rows, headers=head, tablefmt=fmt)

    def __str__(self) -> str:
        return self.table() + (f"\n{self.note}" if self.note else "")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def save(self, path: Union[str, Path]) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Calibration":
        data = json.loads(Path(path).read_text())
        data["candidates"] = [Candidate(**c) for c in data["candidates"]]
        return cls(**data)


def calibrate(model: torch.nn.Module, batches: Iterable[Any], max_drift: float = 0.01, metric: Metric = "cosine",
              budgets: Sequence[float] = DEFAULT_BUDGETS, alphas: Optional[Sequence[float]] = None,
              output: Optional[Callable[[Any], torch.Tensor]] = None, progress: bool = True,
              **options: Any) -> Calibration:
    """The turbo options with the largest FLOP saving whose output drift on ``batches`` stays
    within ``max_drift`` (see the module docstring).

    ``batches``: a few of the user's inputs, each a tensor, a tuple of positional arguments or
    a dict of keyword arguments. ``output``: picks the tensor to compare from the model's
    output (default: the tensor itself, ``logits``, ``last_hidden_state``, ``sample``, or the
    first element). ``options``: further turbo options for every candidate (not ``r`` or
    ``flops``). The result's ``options`` go straight to ``torch.compile(model,
    backend="turbo", options=...)``; ``save``/``load`` keep it as JSON."""
    batches = list(batches)
    _check_arguments(batches, max_drift, metric, budgets, options)
    name = metric if isinstance(metric, str) else getattr(metric, "__name__", "user metric")
    pick = output or default_output
    say = _reporter(progress)
    with torch.no_grad():
        reference = [pick(_call(model, b)).detach() for b in batches]
    candidates = []
    for budget in budgets:
        for alpha in (alphas if alphas is not None else [None]):
            chosen = {"flops": float(budget), **({} if alpha is None else {"alpha": float(alpha)})}
            candidate = _measure(model, batches, reference, {**options, **chosen}, chosen, metric, pick)
            candidate.within = candidate.drift_upper <= max_drift
            candidates.append(candidate)
            say(f"turbo calibrate: {json.dumps(chosen)}: FLOP ratio {candidate.flop_ratio}, drift "
                f"{candidate.drift:.5f} (upper {candidate.drift_upper:.5f})")
    within = [c for c in candidates if c.within and c.flop_ratio is not None]
    if not within:
        return Calibration({"r": 0}, max_drift, name, candidates,
                           note=f"no candidate kept the drift's upper bound within {max_drift}: merging off (r=0)")
    best = min(within, key=lambda c: (c.flop_ratio, c.drift_upper))
    return Calibration(best.options, max_drift, name, candidates)


def default_output(out: Any) -> torch.Tensor:
    """The tensor of a model output that ``calibrate`` compares."""
    if isinstance(out, torch.Tensor):
        return out
    for attribute in ("logits", "last_hidden_state", "sample", "image_embeds", "text_embeds"):
        value = getattr(out, attribute, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"calibrate: cannot find a tensor in a {type(out).__name__}; pass output=<function>")


def batch_drift(merged: torch.Tensor, reference: torch.Tensor, metric: Metric) -> float:
    """One batch's drift: the mean over samples of 1 - cosine or of the relative L2 error, or
    the user metric's value."""
    if callable(metric):
        value = metric(merged, reference)
        value = float(value.item() if isinstance(value, torch.Tensor) else value)
    else:
        a, b = merged.float().flatten(1), reference.float().flatten(1)
        if metric == "cosine":
            value = float((1 - torch.nn.functional.cosine_similarity(a, b, dim=1)).mean())
        else:
            value = float(((a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-12)).mean())
    if not math.isfinite(value):
        raise ValueError(f"calibrate: the metric gave {value} (not a finite number)")
    return value


def upper_bound(values: Sequence[float]) -> float:
    """One-sided 95% upper bound of the mean (Student's t); the value itself for one batch."""
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return mean
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t = _T95[n - 2] if n - 1 <= len(_T95) else 1.645
    return mean + t * sd / math.sqrt(n)


def _measure(model, batches, reference, options: dict, chosen: dict, metric: Metric, pick) -> Candidate:
    config = resolve_config(None, **{"inner_backend": "eager", "compile_blocks": False, **options})
    reset_compiler()
    compiled = torch.compile(model, backend=turbo_backend, options=config)
    drifts = []
    flop_ratio = None
    with torch.no_grad():
        for i, (batch, want) in enumerate(zip(batches, reference)):
            with recording(count_flops=i == 0) as rec:
                got = pick(_call(compiled, batch))
            if i == 0:
                counted = [g for g in rec.graphs if g.flops_before]
                if counted:
                    flop_ratio = sum(g.flops_after for g in counted) / sum(g.flops_before for g in counted)
            try:
                drifts.append(batch_drift(got, want, metric))
            except Exception as exc:  # a user metric may raise anything; say which batch
                raise ValueError(f"calibrate: the metric failed on batch {i}: {exc}") from exc
    reset_compiler()
    return Candidate(chosen, flop_ratio, sum(drifts) / len(drifts), upper_bound(drifts), drifts)


def _call(model, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _check_arguments(batches: list, max_drift: float, metric: Metric, budgets: Sequence[float], options: dict) -> None:
    if not batches:
        raise ValueError("calibrate: no batches given; pass a few of your inputs")
    if isinstance(max_drift, bool) or not isinstance(max_drift, (int, float)) or not 0 < max_drift <= 1:
        raise ValueError(f"calibrate: max_drift must be in (0, 1], got {max_drift!r}")
    if isinstance(metric, str) and metric not in METRICS:
        raise ValueError(f"calibrate: metric must be one of {METRICS} or a function, got {metric!r}")
    if not budgets:
        raise ValueError("calibrate: no budgets to try")
    if "r" in options or "flops" in options:
        raise ValueError("calibrate chooses the FLOP budget: give budgets, not r or flops")
    for budget in budgets:
        try:
            resolve_config(None, flops=budget)
        except TurboConfigError as exc:
            raise ValueError(f"calibrate: budget {budget!r}: {exc}") from exc


def _reporter(progress: bool) -> Callable[[str], None]:
    if not progress:
        return lambda line: None
    return lambda line: print(line, file=sys.stderr, flush=True)
