"""The ``turbo`` torch.compile backend: rewrite the Dynamo graph to merge tokens, then compile it.

Registered through the ``torch_dynamo_backends`` entry point, so
``torch.compile(model, backend="turbo", options={...})`` needs no import.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from typing import Any, Callable, Iterator, Optional, Union

import torch
from torch.fx import GraphModule

from turbo_fx.config import TurboConfig, TurboConfigError, resolve_config
from turbo_fx.cuda_graphs import CapturedForward, capture_refusal, captures_cuda_graphs
from turbo_fx.flops import count_flops
from turbo_fx.guarded_call import guard
from turbo_fx.passes.propagate_shapes import CannotRewrite
from turbo_fx.report import GraphReport, counters, publish, wants_flops, wants_graphs
from turbo_fx.rewrite import NothingToMerge, rewrite_graph

log = logging.getLogger("turbo_fx")


def turbo_backend(
    gm: GraphModule,
    example_inputs: list,
    options: Union[None, dict, TurboConfig] = None,
    mode: Optional[str] = None,
    **unexpected: Any,
) -> Callable:
    """Dynamo backend entry: validate options, rewrite ``gm``, hand it to the inner compiler."""
    if unexpected:
        raise TurboConfigError(f"turbo backend got unexpected arguments {sorted(unexpected)}; pass options={{...}}")
    config = resolve_config(options)
    if mode is not None and config.mode is not None and mode != config.mode:
        raise TurboConfigError(f"torch.compile asked for mode={mode!r} and turbo's options for mode={config.mode!r}")
    mode = mode or config.mode
    if captures_cuda_graphs(mode):
        config = config.for_cuda_graphs()
    report = GraphReport(graph_index=counters["graphs"], n_nodes=len(gm.graph.nodes))
    counters["graphs"] += 1

    start = time.perf_counter()
    refusal = split_refusal(gm, example_inputs) if config.compiles_by_block else None
    rewritten = _rewrite_or_fallback(gm, example_inputs, config, report, config.compiles_by_block and refusal is None)
    report.rewrite_seconds = time.perf_counter() - start

    if wants_flops():
        report.flops_before = count_flops(gm, example_inputs)
        report.flops_after = count_flops(rewritten, example_inputs) if rewritten is not gm else report.flops_before
    if wants_graphs():
        report.graph_module = rewritten
    publish(report)

    start = time.perf_counter()
    compiled = _compile_inner(rewritten, gm, example_inputs, config, mode, report, refusal)
    report.compile_seconds = time.perf_counter() - start
    return compiled


def _rewrite_or_fallback(gm: GraphModule, example_inputs: list, config: TurboConfig, report: GraphReport,
                         for_split: bool = False) -> GraphModule:
    fake_mode = graph_fake_mode(gm)
    if fake_mode is not None and config.symbolic_tokens and not for_split:
        allow_unbacked_token_counts(fake_mode)
    try:
        with torch_meta_errors_silenced():
            rewritten = rewrite_graph(gm, fake_mode, config, report, example_inputs, for_split=for_split)
    except NothingToMerge as exc:
        log.info("turbo: graph %d compiled unchanged: %s", report.graph_index, exc)
        counters["graphs_unchanged"] += 1
        return gm
    except CannotRewrite as exc:
        return _fallback(gm, report, str(exc))
    except Exception as exc:  # a pass bug must never break the user's model
        log.debug("turbo: internal error while rewriting", exc_info=True)
        return _fallback(gm, report, f"internal error in a turbo pass: {type(exc).__name__}: {exc}")
    counters["graphs_rewritten"] += 1
    counters["merges_inserted"] += report.merges
    counters["tokens_removed"] += sum(b.r_applied for b in report.blocks) + sum(c.r_applied for c in report.components)
    return rewritten


# torch logs every meta kernel that fails on fake tensors at ERROR level, with a traceback.
# During a rewrite such a failure is an expected outcome: it is how fake propagation finds
# a shape that no longer fits, and the graph then falls back with turbo's one warning (or
# keeps the concrete build). Those records are turbo's to report, not torch's to print.
_META_ERROR_LOGGERS = ("torch._subclasses.fake_tensor",)


@contextlib.contextmanager
def torch_meta_errors_silenced() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _META_ERROR_LOGGERS]
    was_disabled = [logger.disabled for logger in loggers]
    for logger in loggers:
        logger.disabled = True
    try:
        yield
    finally:
        for logger, disabled in zip(loggers, was_disabled):
            logger.disabled = disabled


def allow_unbacked_token_counts(fake_mode) -> None:
    """Let the merge op report its token count as an unbacked size. Dynamo's shape
    environment forbids data-dependent output shapes by default; this environment
    belongs to the one graph being compiled, and it stays permissive so that a later
    (lazy) compile of the same graph, such as a backward pass, sees the same rules."""
    shape_env = getattr(fake_mode, "shape_env", None)
    if shape_env is not None and not shape_env.allow_dynamic_output_shape_ops:
        shape_env.settings = dataclasses.replace(shape_env.settings, allow_dynamic_output_shape_ops=True)


def graph_fake_mode(gm: GraphModule):
    """The fake mode the graph's recorded values live in (Dynamo's), or None."""
    for node in gm.graph.nodes:
        value = node.meta.get("example_value")
        if isinstance(value, torch._subclasses.FakeTensor):
            return value.fake_mode
    return None


def _fallback(gm: GraphModule, report: GraphReport, reason: str) -> GraphModule:
    report.fallback_reason = reason
    counters["graphs_fallback"] += 1
    log.warning("turbo: graph %d compiled without token merging: %s", report.graph_index, reason)
    return gm


def _compile_inner(rewritten, original, example_inputs, config: TurboConfig, mode, report: GraphReport,
                   split_refused: Optional[str] = None):
    compiler = inner_compiler(config.inner_backend, mode)
    if rewritten is original:
        return compiler(original, example_inputs)
    if config.compiles_by_block and report.blocks:
        compiled = _compile_by_block(rewritten, example_inputs, mode, report, asked=config.compile_blocks is True,
                                     compile_merges=config.compiles_merges, refused=split_refused)
        if compiled is not None:
            if captures_cuda_graphs(mode):
                compiled = _captured(compiled, rewritten, example_inputs, report)
            return guard(compiled, original, example_inputs, compiler, report)
    built_symbolic = config.symbolic_tokens and not (config.compiles_by_block and split_refused is None)
    if captures_cuda_graphs(mode) and built_symbolic and config.inner_backend == "inductor" and report.blocks:
        log.warning("turbo: graph %d: Inductor captures no CUDA graph of it: symbolic_tokens=True makes the merged "
                    "token counts data-dependent sizes; leave symbolic_tokens unset for CUDA graphs",
                    report.graph_index)
    try:
        compiled = compiler(rewritten, example_inputs)
    except Exception as exc:
        log.debug("turbo: inner compiler failed on the rewritten graph", exc_info=True)
        _fallback(original, report, f"{config.inner_backend} failed on the rewritten graph: {type(exc).__name__}: {exc}")
        return compiler(original, example_inputs)
    return guard(compiled, original, example_inputs, compiler, report)


def _compile_by_block(rewritten, example_inputs, mode, report: GraphReport, asked: bool,
                      compile_merges: bool = False, refused: Optional[str] = None) -> Optional[Callable]:
    """``rewritten`` compiled piece by piece (``compile_blocks``), or None once the reason it
    is compiled whole instead is logged: a warning where the user ``asked`` for the split,
    an info record where it was only the default (the graph still merges; only its
    compile takes the longer road). ``refused``: the reason ``split_refusal`` already gave."""
    from turbo_fx.block_compile import BlockCompileStats, BlockCompileUnsupported, compile_by_block

    # The pieces get the mode's options but not its CUDA graphs: the whole split forward is
    # captured instead (``_captured``).
    piece_compiler = inner_compiler("inductor", mode, cuda_graphs=False)
    stats = BlockCompileStats()
    try:
        if refused is not None:
            raise BlockCompileUnsupported(refused)
        compiled = compile_by_block(rewritten, example_inputs, piece_compiler, stats, compile_merges)
    except BlockCompileUnsupported as exc:
        reason = str(exc)
    except Exception as exc:  # a failed split must not break the user's model
        log.debug("turbo: block-by-block compile failed", exc_info=True)
        reason = f"internal error: {type(exc).__name__}: {exc}"
    else:
        report.block_compile = stats.summary()
        counters["block_pieces_generated"] += stats.generated
        counters["block_pieces_shared"] += stats.shared
        counters["block_pieces_cached"] += stats.cached
        return compiled
    report.block_compile = f"compiled whole: {reason}"
    counters["graphs_compiled_whole"] += 1
    log.log(logging.WARNING if asked else logging.INFO,
            "turbo: graph %d compiled whole, not block by block (compile_blocks): %s", report.graph_index, reason)
    return None


def _captured(forward: Callable, rewritten: GraphModule, example_inputs: list, report: GraphReport) -> Callable:
    """The split ``forward`` replayed from one CUDA graph (``cuda_graphs``), or ``forward``
    itself where the graph cannot be captured (an info record says why)."""
    refusal = capture_refusal(rewritten, example_inputs)
    if refusal is None:
        return CapturedForward(forward, report.graph_index, report)
    report.cuda_graph = f"not captured: {refusal}"
    log.info("turbo: graph %d runs without a CUDA graph: %s", report.graph_index, refusal)
    return forward


def split_refusal(gm: GraphModule, example_inputs: list) -> Optional[str]:
    """Why ``gm`` will not be compiled block by block, as far as is known before the rewrite
    (the split itself can still fail later, and the graph is then compiled whole), or None.
    A CUDA-graph mode does not rule the split out: the split forward is captured whole."""
    from turbo_fx.block_compile import unsupported_reason

    return unsupported_reason(gm, example_inputs)


def inner_compiler(name: str, mode: Optional[str] = None, cuda_graphs: bool = True) -> Callable:
    """The compiler of ``name`` with Inductor's options for ``mode``; ``cuda_graphs=False``
    leaves out the mode's CUDA graphs."""
    if name == "inductor":
        from torch._inductor.compile_fx import compile_fx

        patches = dict(torch._inductor.list_mode_options(mode)) if mode else {}
        if not cuda_graphs:
            patches.pop("triton.cudagraphs", None)
        return lambda gm, inputs: compile_fx(gm, inputs, config_patches=patches)
    if name == "eager":
        return lambda gm, inputs: gm.forward
    from torch._dynamo.backends.registry import lookup_backend

    return lookup_backend(name)

