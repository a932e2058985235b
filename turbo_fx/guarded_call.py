"""The rewritten graph's compiled code, with the unmerged graph behind it if it fails at run time.

Every shape the rewrite changes is checked on fake tensors before anything is compiled, but
some failures only show when the code runs: a kernel that rejects a real value, a CUDA-graph
pool check, memory. The backend promises that the user's model still runs, so a call that
raises inside the merged code is run again by the unmerged graph. Only a failure that the
unmerged graph does *not* repeat is blamed on the rewrite: from then on the graph runs
unmerged, with one warning. If the unmerged graph raises too, the error is the caller's (a
bad input, their own model's): it reaches them as the unmerged graph raised it, and the
merged code stays for the next call.

The unmerged graph is compiled when it is first needed, with the failing call's inputs as
its examples: Dynamo's example inputs are not kept alive for a failure that almost never
comes. A graph with static shapes is compiled by the inner compiler; one with dynamic
shapes runs eagerly, since a compile from one call's concrete inputs would fit only their
shapes. Graphs that update a tensor in place are not guarded at all (see ``guard``).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Sequence

from torch.fx import GraphModule

from turbo_fx.passes.graph_traits import GraphTraits
from turbo_fx.report import GraphReport, counters

log = logging.getLogger("turbo_fx")


class GuardedCompiled:
    """Calls ``merged``; after an exception there, ``compile_unmerged(args)`` (built once, on
    first need) decides as the module docstring says. Costs one Python call per forward."""

    def __init__(self, merged: Callable, compile_unmerged: Callable[[Sequence[Any]], Callable], report: GraphReport):
        self.merged = merged
        self.compile_unmerged = compile_unmerged
        self.report = report
        self.unmerged: Optional[Callable] = None
        self.fell_back = False

    def __call__(self, *args: Any) -> Any:
        if self.fell_back:
            return self.unmerged(*args)
        try:
            return self.merged(*args)
        except Exception as exc:
            # Formatted here so that neither the traceback nor its frames' tensors outlive this
            # block, and the unmerged graph's own error (if any) is not chained to this one.
            reason = f"the merged graph failed at run time: {type(exc).__name__}: {exc}"
            log.debug("turbo: merged graph %d failed at run time", self.report.graph_index, exc_info=True)
        return self._run_unmerged(args, reason)

    def _run_unmerged(self, args: tuple, reason: str) -> Any:
        if self.unmerged is None:
            self.unmerged = self.compile_unmerged(args)
        result = self.unmerged(*args)  # raises the caller's own error, if it is theirs
        log.warning("turbo: graph %d runs without token merging from now on: %s", self.report.graph_index, reason)
        self.report.fallback_reason = reason
        counters["graphs_fallback"] += 1
        counters["graphs_fallback_at_run_time"] += 1
        self.fell_back = True
        self.merged = None  # its code and buffers are not needed any more
        return result


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
