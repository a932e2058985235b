"""One CUDA graph for a whole forward compiled block by block (CUDA-graph modes).

Why turbo captures the graph itself: Inductor's CUDA graphs are per compiled graph and
skip any graph with a data-dependent size, so the merged graph compiled whole (the opaque
merge op reports unbacked token counts) would silently run without them, host-bound op by
op. A graph split by ``compile_blocks`` is, on the other hand, a chain of compiled pieces
called from Python: per-piece graphs would still pay one Python call and one replay per
piece, and a piece compiled outside Dynamo has no record of which inputs are parameters,
so every weight would be copied into the graph's buffers on every replay. The split only
accepts static-shape inference graphs with no in-place update and no random draw, and its
pieces never wait for the device, so the whole forward can be captured once and replayed
with one call.

How inputs are handled: the first call runs uncaptured (it warms up the kernels) and notes
where every input lives; the second call captures. An input found at the same address in
both calls (a parameter, a buffer, an input the caller reuses) is read in place by the graph,
and every replay checks that it is still there; an input that moved gets a buffer of its own,
which each replay fills with a copy. When a replay finds an in-place input moved, it is
recaptured with that input copied from then on, at most ``MAX_CAPTURES`` times. Outputs are
cloned out of the graph's memory, so a later call never overwrites what an earlier one
returned (Inductor's own CUDA graphs do overwrite; the clone costs one copy per output).

Threads and streams: one graph has one set of input buffers and one output memory, so two
replays must not overlap. A lock is held from the input copy (or the capture) to the output
clone, and the stream that last used the graph (the capture's, then each replay's) is kept:
a replay from another stream first waits for it, and the buffers are marked as used on that
stream so that the allocator keeps them until its work is done. The lock covers only the host
launching the replay; the device work of calls from several streams runs one after another,
as it would have to with one graph. (Inductor instead keeps a graph per thread, which
multiplies the graph's memory by the threads.)

Graphs not captured, each with an info record and the reason in ``GraphReport.cuda_graph``:
inputs not all on one CUDA device; an op tagged ``cudagraph_unsafe`` (the key-padding check
waits for the device); an input laid out so that it cannot be copied into (overlapping
strides). A forward run while ``record_merges`` is recording runs uncaptured (recording
copies to the host). A capture that fails runs the forward uncaptured from then on.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Optional, Sequence

import torch
from torch.fx import GraphModule

from turbo_fx.ops.merge_step import recording_merges
from turbo_fx.torch_compat import inductor_mode_options, op_overloads, tree_map_only

log = logging.getLogger("turbo_fx")

MAX_CAPTURES = 4


def captures_cuda_graphs(mode: Optional[str]) -> bool:
    """Whether Inductor's compile ``mode`` asks for CUDA graphs ("reduce-overhead", "max-autotune")."""
    return bool(mode) and bool(inductor_mode_options(mode).get("triton.cudagraphs"))


def capture_refusal(gm: GraphModule, example_inputs: Sequence[Any]) -> Optional[str]:
    """Why the forward of ``gm`` (the rewritten graph, on ``example_inputs``) is not captured
    as a CUDA graph, or None."""
    tensors = [x for x in example_inputs if isinstance(x, torch.Tensor)]
    return device_refusal(tensors) or unsafe_op_refusal(gm) or layout_refusal(tensors)


def device_refusal(tensors: Sequence[torch.Tensor]) -> Optional[str]:
    devices = {x.device for x in tensors}
    if len(devices) == 1 and next(iter(devices)).type == "cuda":
        return None
    where = ", ".join(sorted(str(d) for d in devices)) or "no tensor inputs"
    return f"inputs on {where}: CUDA graphs need every input on one CUDA device"


def unsafe_op_refusal(gm: GraphModule) -> Optional[str]:
    """The first op of ``gm`` tagged ``cudagraph_unsafe`` (it waits for the device), or None."""
    tag = getattr(torch.Tag, "cudagraph_unsafe", None)
    for node in gm.graph.nodes:
        target = node.target
        overloads = op_overloads(target)
        if tag is not None and any(tag in op.tags for op in overloads):
            return f"node {node.name} ({target}) waits for the device, which a CUDA graph cannot capture"
    return None


def layout_refusal(tensors: Sequence[torch.Tensor]) -> Optional[str]:
    """An input no buffer can take a copy of (overlapping strides, as ``expand`` gives), or None."""
    for i, x in enumerate(tensors):
        if _may_overlap(x):
            return f"input {i} has overlapping strides {tuple(x.stride())}: no buffer can take a copy of it"
    return None


def _may_overlap(x: torch.Tensor) -> bool:
    """Whether two elements of ``x`` may share memory: each axis, in order of stride, must step
    past everything the smaller-strided axes reach (a sufficient test; exotic interleaved
    layouts that pass no such ordering count as overlapping)."""
    reach = 0
    for stride, size in sorted((st, sz) for st, sz in zip(x.stride(), x.shape) if sz > 1):
        if stride <= reach:
            return True
        reach += stride * (size - 1)
    return False


class CudaGraph:
    """``torch.cuda.CUDAGraph`` behind the two calls ``CapturedForward`` makes of a graph."""

    def __init__(self) -> None:
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, fn: Callable, args: Sequence[Any]) -> Any:
        """Record ``fn(*args)`` (``torch.cuda.graph`` synchronises first and captures on a side
        stream; nothing runs until a replay). "thread_local": another thread's CUDA calls
        during the capture are not an error."""
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            return fn(*args)

    def replay(self) -> None:
        self.graph.replay()


class CapturedForward:
    """``forward`` replayed from one captured graph; see the module docstring."""

    def __init__(self, forward: Callable, graph_index: int, report: Any = None,
                 new_graph: Optional[Callable[[], Any]] = None) -> None:
        self.forward = forward
        self.graph_index = graph_index
        self.report = report
        self.new_graph = new_graph or CudaGraph  # something with capture(fn, args) and replay()
        self.graph = None
        self.captures = 0
        self.replays = 0
        self.disabled = False
        self.last_addresses: Optional[list] = None
        self.in_place: list[int] = []  # input positions the graph reads where they are
        self.copied: list[int] = []  # input positions copied into ``buffers`` before each replay
        self.addresses: list[int] = []  # the in-place inputs' addresses at capture
        self.buffers: list[torch.Tensor] = []
        self.outputs: Any = None
        self.lock = threading.Lock()  # held from the input copy (or the capture) to the output clone
        self.home_stream: Any = None  # the CUDA stream the buffers were made on (None on the CPU)
        self.stream: Any = None  # the CUDA stream that last used the buffers and outputs

    def __call__(self, *args: Any) -> Any:
        if self.disabled or recording_merges():
            return self.forward(*args)
        with self.lock:
            return self._call(args)

    def _call(self, args: tuple) -> Any:
        if self.disabled:  # another thread gave up on the graph while this one waited
            return self.forward(*args)
        if self.graph is None:
            return self._warm_up_or_capture(args)
        if [_address(args[i]) for i in self.in_place] != self.addresses:
            moved = {i for i, a in zip(self.in_place, self.addresses) if _address(args[i]) != a}
            if not self._capture(args, moved_to_copied=moved):
                return self.forward(*args)
        return self._replay(args)

    def _warm_up_or_capture(self, args: tuple) -> Any:
        addresses = [_address(a) for a in args]
        if self.last_addresses is None:
            self.last_addresses = addresses
            return self.forward(*args)
        moved = {i for i, (a, b) in enumerate(zip(addresses, self.last_addresses)) if a != b}
        if not self._capture(args, moved_to_copied=moved, first=True):
            return self.forward(*args)
        return self._replay(args)

    def _capture(self, args: tuple, moved_to_copied: set, first: bool = False) -> bool:
        """Capture ``forward`` with the inputs at ``moved_to_copied`` (and those copied before)
        read from buffers; False, with the forward left uncaptured from now on, where it cannot
        be (too many captures, or the capture failed)."""
        if self.captures >= MAX_CAPTURES:
            return self._disable(f"its inputs moved {self.captures} times; a graph reads them where it was captured")
        tensors = {i for i, a in enumerate(args) if isinstance(a, torch.Tensor)}
        copied = sorted((set(self.copied) | moved_to_copied) & tensors)
        self.graph = self.outputs = None
        self.buffers = [torch.empty_strided(args[i].size(), args[i].stride(), dtype=args[i].dtype,
                                            device=args[i].device) for i in copied]
        graph_args = list(args)
        for i, buffer in zip(copied, self.buffers):
            graph_args[i] = buffer
        graph = self.new_graph()
        try:
            outputs = graph.capture(self.forward, graph_args)
        except Exception as exc:
            log.debug("turbo: CUDA graph capture failed", exc_info=True)
            self.buffers = []
            return self._disable(f"the capture failed: {type(exc).__name__}: {exc}")
        self.graph, self.outputs, self.captures = graph, outputs, self.captures + 1
        # The capture waited for the whole device, so nothing queued before it is pending.
        self.home_stream = self.stream = _current_stream(args)
        self.copied = copied
        self.in_place = sorted(tensors - set(copied))
        self.addresses = [_address(args[i]) for i in self.in_place]
        self._note(f"captured ({self.captures} capture{'s' if self.captures > 1 else ''}; "
                   f"{len(self.in_place)} inputs read in place, {len(self.copied)} copied per call)")
        if not first:
            log.info("turbo: graph %d: CUDA graph captured again: an input read in place had moved",
                     self.graph_index)
        return True

    def _replay(self, args: tuple) -> Any:
        stream = _current_stream(args)
        _order_after(stream, self.stream, self.home_stream, self.buffers)
        for buffer, i in zip(self.buffers, self.copied):
            buffer.copy_(args[i])
        self.graph.replay()
        self.replays += 1
        outputs = tree_map_only(torch.Tensor, torch.clone, self.outputs)
        self.stream = stream
        return outputs

    def _disable(self, reason: str) -> bool:
        self.disabled = True
        self.graph = self.outputs = None
        self.buffers = []
        self._note(f"not captured: {reason}")
        log.info("turbo: graph %d runs without a CUDA graph: %s", self.graph_index, reason)
        return False

    def _note(self, text: str) -> None:
        if self.report is not None:
            self.report.cuda_graph = text


def _current_stream(args: Sequence[Any]) -> Any:
    """The calling thread's current stream on the device of the first tensor in ``args``, or
    None where that is not a CUDA device (the CPU stand-in graphs of the tests)."""
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
    return torch.cuda.current_stream(device) if device is not None and device.type == "cuda" else None


def _order_after(stream: Any, previous: Any, home: Any, buffers: Sequence[torch.Tensor]) -> None:
    """Order work about to be queued on ``stream`` after what ``previous`` queued with the
    same buffers and outputs. Buffers made on ``home`` and used on another stream are
    recorded as used there: otherwise the allocator could hand their memory out again, once
    they are freed, while that stream still reads them."""
    if stream is None or previous is None:
        return
    if stream != previous:
        stream.wait_stream(previous)
    if stream != home:
        for buffer in buffers:
            buffer.record_stream(stream)


def _address(value: Any) -> Optional[int]:
    return value.data_ptr() if isinstance(value, torch.Tensor) else None
