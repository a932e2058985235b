"""Compile a rewritten encoder graph block by block (the ``compile_blocks`` option).

After merging, every block runs at its own token count. Compiled as one graph, Inductor
either generates code per block (static counts) or reasons about a fresh unbacked size per
block (``symbolic_tokens``); both cost about twice Inductor's own compile time on CPU. Here
the graph is split at its merge ops (``passes.split_at_merges``, after
``passes.hoist_merge_inputs`` has moved each merge's metric and semantic value into the
attention's code before it) and each compute piece is
compiled on its own, with its token count a *backed* symbolic size: the pieces of two
blocks then have the same code and the same shape guards, so a later block runs the first
one's compiled callable (``shared_pieces``, checked as a Dynamo guard would), and another
compile of the same model finds it in Inductor's FX graph cache. The merge pieces run the opaque op as
it is, or, with ``compile_merges`` (the ``compile_merge_step`` option, on by default),
are compiled the same way with the traced merge in the op's place (``traced_merge_piece``):
one compiled step then serves every merge of the model.

The pieces are compiled while the split module runs once on the compile call's own inputs
(which gives each piece its real input shapes), so only graphs that this run cannot change
are accepted: inference (no gradient to record), no in-place update of an input or buffer,
no random draw (it would shift the user's random stream), and static shapes (a dynamic
batch would need every piece generic in it too). The plan checks these once per graph
(``passes.graph_traits``); a split that fails for another reason raises
``BlockCompileUnsupported``, and the caller compiles the graph whole.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch.fx import GraphModule, Interpreter, Node

from turbo_fx.passes.hoist_merge_inputs import hoist_merge_inputs
from turbo_fx.errors import CannotRewrite
from turbo_fx.passes.split_at_merges import name_positionally, split_at_merges
from turbo_fx.shared_pieces import SharedPieces

log = logging.getLogger("turbo_fx")


class BlockCompileUnsupported(Exception):
    """This graph cannot be compiled block by block; the message says why."""


@dataclass
class PieceCounts:
    generated: int = 0  # pieces Inductor generated code for (cache misses)
    shared: int = 0  # pieces that run an earlier piece's compiled code (``shared_pieces``)
    cached: int = 0  # pieces that came from Inductor's caches (AOT-autograd's or the FX graph cache)
    failed: int = 0  # merge pieces whose compile failed (they run the opaque op)

    @property
    def pieces(self) -> int:
        return self.generated + self.shared + self.cached

    def describe(self) -> str:
        return (f"{self.generated} generated, {self.shared} shared with an earlier block, "
                f"{self.cached} from Inductor's cache")


@dataclass
class BlockCompileStats(PieceCounts):
    token_counts: list = field(default_factory=list)  # each compute piece's token count (None: static)
    merge_pieces: PieceCounts = field(default_factory=PieceCounts)  # compiled merge pieces (compile_merges)

    def summary(self) -> str:
        text = f"{self.pieces} compute pieces: {self.describe()} (token counts {self.token_counts})"
        merges = self.merge_pieces
        if merges.pieces or merges.failed:
            text += (f"; {merges.pieces} compiled merge pieces: {merges.describe()}"
                     + (f", {merges.failed} failed (run as the opaque op)" if merges.failed else ""))
        return text


def compile_blocks(gm: GraphModule, example_inputs: Sequence[Any], compile_piece: Callable,
                   stats: Optional[BlockCompileStats] = None, compile_merges: bool = False) -> Callable:
    """A callable computing ``gm`` whose compute pieces were each compiled by
    ``compile_piece(piece, fake_inputs)`` (``compile_fx`` with the caller's patches). Only for
    graphs the plan lets split (``GraphPlan.split_refusal`` is None: the module docstring says
    why), which the backend decides once per graph.
    ``compile_merges``: the merge pieces too, each with the traced merge in the opaque op's
    place and its incoming token count a backed symbolic size, so that the merges share one
    compiled step (a few kernels instead of tens of ATen calls per block)."""
    try:
        split = split_at_merges(hoist_merge_inputs(gm))
    except CannotRewrite as exc:
        raise BlockCompileUnsupported(str(exc)) from exc
    stats = BlockCompileStats() if stats is None else stats
    shared = SharedPieces()
    compute = set(split.compute)
    module = split.module
    merge_outputs: set[Node] = set()
    token_counts: set[int] = set()

    class CompileOnFirstRun(Interpreter):
        def run_node(self, node: Node) -> Any:
            self.node = node
            result = super().run_node(node)
            if node.op == "call_module" and node.target not in compute:
                merge_outputs.add(node)
                token_counts.update(_token_counts(result))
            return result

        def call_module(self, target, args, kwargs):
            if target not in compute:
                merge = getattr(module, target)
                if compile_merges:
                    compiled = _compile_merge_piece(compile_piece, merge, args, stats, shared)
                    if compiled is not None:
                        setattr(module, target, compiled)
                        return compiled(*args)
                return merge(*args, **kwargs)
            dynamic = [_token_dims(a, src, merge_outputs, token_counts) for a, src in zip(args, self.node.args)]
            counts = {a.shape[d] for a, dims in zip(args, dynamic) for d in dims}
            stats.token_counts.append(min(counts) if counts else None)
            compiled = _compile_with_token_dims(compile_piece, getattr(module, target), args, dynamic, stats, shared)
            setattr(module, target, _Piece(compiled, "compute"))
            return compiled(*args)

    with torch.no_grad(), caches_on():
        CompileOnFirstRun(module).run(*example_inputs)
    module.recompile()
    return module.forward


@contextlib.contextmanager
def caches_on():
    """Inductor's FX graph cache and AOT-autograd's cache on while the pieces compile: the
    sharing between blocks is those caches, so the option asks for them even where they were
    turned off (a benchmark that wants every compile to pay full price gives each one an empty
    cache directory instead; the blocks of one compile still share)."""
    from turbo_fx import torch_compat
    from turbo_fx.ops.merge_step import (merge_source_hash, metric_as_one_head, semantic_as_one_head,
                                         traced_merge_block)

    # AOT-autograd's cache keys a graph by its code, so a call of a Python function is cached
    # only by name; marked here with the merge code's digest, which enters the key.
    # (A torch without the setting only loses the cache hits: those pieces are traced anew.)
    patches: dict[str, Any] = {"fx_graph_cache": True}
    marked = torch_compat.inductor_setting("unsafe_marked_cacheable_functions")
    if marked is not None:
        traced = {f"{f.__module__}.{f.__name__}": merge_source_hash()
                  for f in (traced_merge_block, metric_as_one_head, semantic_as_one_head)}
        patches["unsafe_marked_cacheable_functions"] = {**marked, **traced}
    with torch_compat.inductor_config_patch(patches), \
            torch_compat.functorch_config_patch({"enable_autograd_cache": True}):
        yield


def _token_counts(result: Any) -> set[int]:
    """The merged token counts a merge piece handed on (the token axis of its merged x)."""
    values = result if isinstance(result, (tuple, list)) else (result,)
    return {v.shape[1] for v in values if isinstance(v, torch.Tensor) and v.dim() == 3}


def _token_dims(value: Any, source: Any, merge_outputs: set[Node], token_counts: set[int]) -> list[int]:
    """Axes of a compute piece's input that carry a merged token count: any axis but the
    batch whose size is one, on an input that a merge piece produced."""
    if not isinstance(value, torch.Tensor) or not isinstance(source, Node):
        return []
    producer = source.args[0] if source.target is operator.getitem else source
    if producer not in merge_outputs:
        return []
    return [d for d in range(1, value.dim()) if value.shape[d] in token_counts]


def _cache_hits() -> int:
    from turbo_fx.torch_compat import compile_counters

    counters = compile_counters()
    return counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]


def _compile_merge_piece(compile_piece: Callable, merge: GraphModule, args: Sequence[Any],
                         stats: BlockCompileStats, shared: Optional[SharedPieces] = None) -> Optional[Callable]:
    """The merge piece ``merge`` compiled with the traced merge (``traced_merge_piece``), every
    axis of its tokens' count symbolic but the assign map's (whose axis is the original
    count), or None where it is not compiled (logged where the compile failed; the piece then
    runs the opaque op, which computes the same)."""
    try:
        traced = traced_merge_piece(merge)
        if traced is None:
            return None
        x = args[traced.x_input]
        dynamic = [[] if i == traced.assign_input else _axes_of_size(a, x.shape[1]) for i, a in enumerate(args)]
        with merge_codegen_options(x.device.type):
            compiled = _compile_with_token_dims(compile_piece, traced.module, args, dynamic, stats.merge_pieces,
                                                shared, example_values=False, kind="merge")
    except Exception as exc:  # the eager op is always there to fall back on
        log.info("turbo: a merge piece was not compiled and runs as the opaque op: %s: %s", type(exc).__name__, exc)
        log.debug("turbo: merge piece compile failure", exc_info=True)
        stats.merge_pieces.failed += 1
        return None
    from turbo_fx.ops.merge_step import record_merge

    def run(*piece_args):
        outputs = compiled(*piece_args)
        record_merge(traced.block, piece_args[traced.x_input].shape[1], outputs)
        return traced.outputs(outputs)

    return _Piece(run, "merge")


def merge_codegen_options(device_type: str) -> contextlib.AbstractContextManager:
    """Inductor options for a merge piece's code: on CPU, scalar C++ loops (``cpp.simdlen=1``).

    Why: with a symbolic token count, Inductor's C++ vectoriser spends most of the merge
    piece's compile simplifying index expressions with sympy (``select_tiling``,
    ``stride_at_vec_range``). Scalar code cut DeiT-S's merge piece compile from 8.6 to 4.0 s
    (2-core Xeon, fresh processes) and costs little at run time, the piece's loops
    being small: 1.18 ms per merge piece against 0.95 ms vectorised (profiled), about 1.4% of
    a DeiT-S forward, which the end-to-end rounds did not resolve. The option enters Inductor's
    cache key, so these pieces never share code with vectorised ones. Other devices get
    Inductor's defaults."""
    if device_type != "cpu":
        return contextlib.nullcontext()
    from turbo_fx.torch_compat import inductor_config_patch

    return inductor_config_patch({"cpp.simdlen": 1})


def _axes_of_size(value: Any, count: int) -> list[int]:
    """Axes of a merge piece's input that carry the incoming token count (any but the batch)."""
    if not isinstance(value, torch.Tensor):
        return []
    return [d for d in range(1, value.dim()) if value.shape[d] == count]


@dataclass
class TracedMerge:
    """A merge piece rewritten for Inductor (``traced_merge_piece``) and how to call it in the
    original piece's place."""

    module: GraphModule
    picks: list  # which of the four outputs the split module expects, in its order
    single: bool  # it expects one value, not a tuple
    x_input: int  # the input position of the tokens
    assign_input: Optional[int]  # the input position of the assign map (None: not an input)
    block: int  # the merge's block number, for record_merges (the traced call reads 0 in its place)

    def outputs(self, outputs: tuple) -> Any:
        return outputs[self.picks[0]] if self.single else tuple(outputs[i] for i in self.picks)


def traced_merge_piece(piece: GraphModule) -> Optional[TracedMerge]:
    """A merge piece for Inductor to generate: a copy with the traced merge
    (``traced_merge_block``) in the opaque op's place, its arguments those every block shares,
    returning all four of the merge's outputs, so that the last block's piece (whose later
    graph needs fewer of them) reads like the others. Its metric and semantic value come in
    ready (``passes.hoist_merge_inputs``), so the first merge of a model without a mask reads
    like the merges after it, whose semantic value saw the merged tokens' key bias. None for the
    "layer" fusion (it weighs each block by a float of its own, so no two blocks' pieces would
    share code) and where Inductor would not compute the step exactly (``compiles_exactly``):
    those run the opaque op, as the compiled step of ``merge_block`` does too."""
    from turbo_fx.ops.merge_step import block_arguments, compiles_shared_step, shared_block_step, traced_merge_block
    from turbo_fx.passes.graph_utils import is_merge

    traced = GraphModule(piece, copy.deepcopy(piece.graph), class_name="MergePiece")
    graph = traced.graph
    (merge,) = [n for n in graph.nodes if is_merge(n)]
    step = block_arguments(merge.args, merge.kwargs)
    if not compiles_shared_step(step):
        return None
    block, step = step["block"], shared_block_step(step)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    merge.target, merge.args, merge.kwargs = traced_merge_block, tuple(step.values()), {}
    items = {n.args[1]: n for n in merge.users if n.target is operator.getitem}
    output = next(n for n in graph.nodes if n.op == "output")
    returned = output.args[0]
    single = isinstance(returned, Node)
    picks = [n.args[1] for n in ([returned] if single else returned)]
    with graph.inserting_before(output):
        for i in range(4):
            if i not in items:
                items[i] = graph.call_function(operator.getitem, (merge, i))
    output.args = (tuple(items[i] for i in range(4)),)
    graph.eliminate_dead_code()
    assign_input = placeholders.index(step["assign"]) if step["assign"] in placeholders else None
    name_positionally(traced)
    return TracedMerge(traced, picks, single, placeholders.index(step["x"]), assign_input, block)


def _compile_with_token_dims(compile_piece: Callable, piece: GraphModule, args: Sequence[Any],
                             dynamic: list[list[int]], stats: PieceCounts, shared: Optional[SharedPieces] = None,
                             example_values: bool = True, kind: str = "compute") -> Callable:
    """``piece`` compiled for ``args`` with the ``dynamic`` axes of each a backed symbolic size,
    or, where ``shared`` holds an earlier piece that matches (``shared_pieces``), that piece's
    compiled callable."""
    from turbo_fx import torch_compat

    earlier = shared.find(kind, piece, args, dynamic) if shared is not None else None
    if earlier is not None:
        stats.shared += 1
        return earlier
    fake_mode = torch_compat.new_fake_mode()
    fake_args = []
    for value, dims in zip(args, dynamic):
        if not isinstance(value, torch.Tensor):
            fake_args.append(value)
            continue
        if type(value) not in (torch.Tensor, torch.nn.Parameter):
            # A subclass (torchao's quantised weights) would need a symbolic context per inner
            # tensor; static, it compiles for its own sizes, and shared_pieces matches it so.
            fake_args.append(fake_mode.from_tensor(value, static_shapes=True))
            continue
        fake_args.append(torch_compat.fake_with_symbolic_dims(fake_mode, value, dims))
    hits = _cache_hits()
    with torch_compat.tracing(fake_mode):
        if example_values:
            record_example_values(piece, fake_mode, fake_args)
        compiled = compile_piece(piece, fake_args)
    if _cache_hits() > hits:
        stats.cached += 1
    else:
        stats.generated += 1
    if shared is not None:
        shared.add(kind, piece, args, dynamic, fake_args, fake_mode.shape_env, compiled)
    return compiled


def record_example_values(piece: GraphModule, fake_mode, fake_args: Sequence[Any]) -> None:
    """Give every node of ``piece`` its fake value as ``example_value``, as Dynamo's graphs
    carry them: AOT-autograd's cache refuses method calls on values it cannot see are
    tensors, and without that cache every block's piece would be traced anew."""
    from turbo_fx.torch_compat import propagate_fakes, python_dispatcher

    # The Python dispatcher runs composite ops (matmul) by their symbolic decompositions, as
    # tracing does: torch 2.11's C++ matmul reads concrete sizes, which would specialise the
    # token count and give every block its own compile.
    with torch.no_grad(), python_dispatcher():
        propagate_fakes(piece, fake_mode, fake_args)
    for node in piece.graph.nodes:
        if "val" in node.meta:
            node.meta["example_value"] = node.meta["val"]


class _Piece(torch.nn.Module):
    """A compiled piece in the split module's place of the piece; ``kind`` is "compute" or "merge"."""

    def __init__(self, compiled: Callable, kind: str = "compute"):
        super().__init__()
        self.compiled = compiled
        self.kind = kind

    def forward(self, *args):
        return self.compiled(*args)
