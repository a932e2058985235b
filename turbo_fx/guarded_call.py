"""The rewritten graph's compiled code, with the unmerged graph behind it if it fails at run time.

Every shape the rewrite changes is checked on fake tensors before anything is compiled, but
some failures only show when the code runs: a kernel that rejects a real value, a CUDA-graph
pool check, memory, a mask that turns out to vary by query. The backend promises that the
user's model still runs, so a call that raises inside the merged code is run again by the
unmerged graph.

If the unmerged graph raises too, the error is the caller's (a bad input, their own model's):
it reaches them as the unmerged graph raised it, and nothing else changes.

If the unmerged graph succeeds, that call is blamed on the rewrite and returns the unmerged
output, but one failure does not decide the graph's future: it may have been transient (memory
taken by another job, a race, one odd mask). The next call tries the merged code again. Only
``MAX_CONSECUTIVE_FAILURES`` failed calls in a row turn merging off for the graph, for the life
of the process; a merged call that succeeds resets the count. Every failed call is counted
(``GraphReport.run_time_failures`` and ``last_run_time_failure``, the counter
"merged_calls_failed") and logged: an info record while merging stays on, one warning when it
turns off (with ``GraphReport.fallback_reason`` and the counters "graphs_fallback" and
"graphs_fallback_at_run_time"). Merging again after failures gets an info record. A caller who must know which calls merged reads the report or
the counters; one who wants the first failure to turn merging off sets
``MAX_CONSECUTIVE_FAILURES`` to 1 before compiling (each guard reads it when it is made).

The unmerged graph is compiled when it is first needed, with the failing call's inputs as
its examples: Dynamo's example inputs are not kept alive for a failure that almost never
comes. A graph with static shapes is compiled by the inner compiler; one with dynamic
shapes runs eagerly, since a compile from one call's concrete inputs would fit only their
shapes. Graphs that update a tensor in place are not guarded at all (see ``guard``).
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Optional, Sequence

from torch.fx import GraphModule

from turbo_fx.passes.graph_traits import GraphTraits
from turbo_fx.report import GraphReport, counters

log = logging.getLogger("turbo_fx")

# Failed merged calls in a row (each rerun unmerged with success) that turn merging off. Three
# lets a transient failure (memory, one odd input) pass, yet a rewrite that fails on every call
# costs only two wasted merged attempts.
MAX_CONSECUTIVE_FAILURES = 3


class GuardedCompiled:
    """Calls ``merged``; after an exception there, ``compile_unmerged(args)`` (built once, on
    first need) decides as the module docstring says. Costs one Python call per forward.
    ``max_failures``: the failed calls in a row that turn merging off (``MAX_CONSECUTIVE_FAILURES``
    by default)."""

    def __init__(self, merged: Callable, compile_unmerged: Callable[[Sequence[Any]], Callable], report: GraphReport,
                 max_failures: Optional[int] = None):
        self.merged = merged
        self.compile_unmerged = compile_unmerged
        self.report = report
        self.max_failures = max_failures or MAX_CONSECUTIVE_FAILURES
        self.unmerged: Optional[Callable] = None
        self.failures = 0  # merged calls in a row that failed where the unmerged graph did not
        self.fell_back = False
        self.lock = threading.Lock()  # the unmerged graph is compiled once, and counts stay whole

    def __call__(self, *args: Any) -> Any:
        merged = self.merged  # read once: another thread may turn merging off meanwhile
        if merged is None:
            return self.unmerged(*args)
        try:
            result = merged(*args)
        except Exception as exc:
            # Formatted here so that neither the traceback nor its frames' tensors outlive this
            # block, and the unmerged graph's own error (if any) is not chained to this one.
            reason = f"{type(exc).__name__}: {exc}"
            log.debug("turbo: merged graph %d failed at run time", self.report.graph_index, exc_info=True)
        else:
            if self.failures:
                self._merged_again()
            return result
        return self._run_unmerged(args, reason)

    def _merged_again(self) -> None:
        with self.lock:
            if not self.failures or self.fell_back:
                return
            log.info("turbo: graph %d merges again after %d failed call(s)", self.report.graph_index, self.failures)
            self.failures = 0

    def _run_unmerged(self, args: tuple, reason: str) -> Any:
        with self.lock:
            if self.unmerged is None:
                self.unmerged = self.compile_unmerged(args)
        result = self.unmerged(*args)  # raises the caller's own error, if it is theirs
        with self.lock:
            self._count_failure(reason)
        return result

    def _count_failure(self, reason: str) -> None:
        """One more merged call failed where the unmerged graph did not."""
        self.failures += 1
        self.report.run_time_failures += 1
        self.report.last_run_time_failure = reason
        counters["merged_calls_failed"] += 1
        if self.fell_back:  # another thread's failure already turned merging off
            return
        if self.failures < self.max_failures:
            log.info("turbo: graph %d: one call ran without token merging (%d failed in a row; merging stops "
                     "at %d): the merged graph failed at run time: %s", self.report.graph_index, self.failures,
                     self.max_failures, reason)
        else:
            self._turn_merging_off(reason)

    def _turn_merging_off(self, reason: str) -> None:
        in_a_row = f" {self.failures} calls in a row" if self.failures > 1 else ""
        self.report.fallback_reason = f"the merged graph failed at run time{in_a_row}: {reason}"
        log.warning("turbo: graph %d runs without token merging from now on: %s", self.report.graph_index,
                    self.report.fallback_reason)
        counters["graphs_fallback"] += 1
        counters["graphs_fallback_at_run_time"] += 1
        self.fell_back = True
        self.merged = None  # its code and buffers are not needed any more


def guard(merged: Callable, original: GraphModule, compiler: Callable[[GraphModule, list], Callable],
          report: GraphReport, traits: GraphTraits) -> Callable:
    """``merged`` behind a ``GuardedCompiled`` whose fallback is ``original`` compiled by
    ``compiler`` (or run eagerly, for dynamic shapes), or ``merged`` itself where ``original``
    updates a tensor in place (``traits``, from the plan): after a partial first run, a second
    could apply an update twice, which is worse than the error."""
    if traits.in_place is not None:
        return merged
    static = traits.dynamic_shapes is None

    def compile_unmerged(args: Sequence[Any]) -> Callable:
        if static:
            try:
                return compiler(original, list(args))
            except Exception:
                log.debug("turbo: compiling the unmerged graph %d failed; it runs eagerly", report.graph_index,
                          exc_info=True)
        return original.forward

    return GuardedCompiled(merged, compile_unmerged, report)
