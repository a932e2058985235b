"""The ``turbo`` torch.compile backend: rewrite the Dynamo graph to merge tokens, then compile it.

Registered through the ``torch_dynamo_backends`` entry point, so
``torch.compile(model, backend="turbo", options={...})`` needs no import.

One flow per graph, each step entered once:
    resolve the config -> analyse the graph into a plan (``plan.analyse``) -> rewrite it
    (``rewrite.rewrite``: the pass list) -> report -> compile (whole, or block by block, and
    captured as one CUDA graph in a CUDA-graph mode) -> guard (``guarded_call``).
Whatever fails on the way, the user's graph still compiles and runs, unchanged, with one
warning that names the reason.
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Callable, Iterator, Optional, Union

import torch
from torch.fx import GraphModule

from turbo_fx import torch_compat
from turbo_fx.config import TurboConfig, TurboConfigError, resolve_config
from turbo_fx.cuda_graphs import CapturedForward, capture_refusal, captures_cuda_graphs
from turbo_fx.errors import CannotRewrite, NothingToMerge
from turbo_fx.flops import count_flops
from turbo_fx.guarded_call import guard
from turbo_fx.passes.graph_utils import graph_fake_mode
from turbo_fx.plan import GraphPlan, analyse
from turbo_fx.report import GraphReport, counters, publish, wants_flops, wants_graphs
from turbo_fx.rewrite import report_facts, rewrite

log = logging.getLogger("turbo_fx")


def turbo_backend(
    gm: GraphModule,
    example_inputs: list,
    options: Union[None, dict, TurboConfig] = None,
    mode: Optional[str] = None,
    **unexpected: Any,
) -> Callable:
    """Dynamo backend entry: validate options, rewrite ``gm``, hand it to the inner compiler."""
    config, mode = resolve_options(options, mode, unexpected)
    report = GraphReport(graph_index=counters["graphs"], n_nodes=len(gm.graph.nodes))
    counters["graphs"] += 1

    start = time.perf_counter()
    plan = analyse(gm, example_inputs, config)
    split = config.strategy.uses_compile_blocks and plan.split_refusal is None
    rewritten = rewrite_or_fallback(gm, plan, split, report)
    report.rewrite_seconds = time.perf_counter() - start

    if wants_flops():
        report.flops_before = count_flops(gm, example_inputs)
        report.flops_after = count_flops(rewritten, example_inputs) if rewritten is not gm else report.flops_before
    if wants_graphs():
        report.graph_module = rewritten
    publish(report)

    start = time.perf_counter()
    compiled = compile_rewritten(rewritten, gm, example_inputs, plan, split, mode, report)
    report.compile_seconds = time.perf_counter() - start
    return compiled


def resolve_options(options: Union[None, dict, TurboConfig], mode: Optional[str],
                    unexpected: dict) -> tuple[TurboConfig, Optional[str]]:
    """The config and compile mode of one compile, from what torch.compile passed."""
    if unexpected:
        raise TurboConfigError(f"turbo backend got unexpected arguments {sorted(unexpected)}; pass options={{...}}")
    config = resolve_config(options)
    if mode is not None and config.strategy.mode is not None and mode != config.strategy.mode:
        raise TurboConfigError(f"torch.compile asked for mode={mode!r} and turbo's options for "
                               f"mode={config.strategy.mode!r}")
    mode = mode or config.strategy.mode
    if captures_cuda_graphs(mode):
        config = config.for_cuda_graphs()
    return config, mode


def rewrite_or_fallback(gm: GraphModule, plan: GraphPlan, split: bool, report: GraphReport) -> GraphModule:
    """The rewritten graph, or ``gm`` itself where it stays unchanged (with the reason logged);
    the report gets the plan's and the passes' facts either way."""
    fake_mode = graph_fake_mode(gm)
    done = None
    try:
        if fake_mode is not None and plan.config.strategy.uses_symbolic_tokens and not split:
            allow_unbacked_token_counts(fake_mode)
        with torch_meta_errors_silenced():
            done = rewrite(gm, plan, fake_mode, split)
    except NothingToMerge as exc:
        log.info("turbo: graph %d compiled unchanged: %s", report.graph_index, exc)
        counters["graphs_unchanged"] += 1
    except CannotRewrite as exc:
        _fallback(report, str(exc))
    except Exception as exc:  # a pass bug must never break the user's model
        log.debug("turbo: internal error while rewriting", exc_info=True)
        _fallback(report, f"internal error in a turbo pass: {type(exc).__name__}: {exc}")
    for name, value in report_facts(plan, done).items():
        setattr(report, name, value)
    if done is None:
        return gm
    counters["graphs_rewritten"] += 1
    counters["merges_inserted"] += report.merges
    counters["tokens_removed"] += sum(b.r_applied for b in report.blocks) + sum(c.r_applied for c in report.components)
    return done.module


# torch logs every meta kernel that fails on fake tensors at ERROR level, with a traceback.
# During a rewrite such a failure is an expected outcome: it is how fake propagation finds
# a shape that no longer fits, and the graph then falls back with turbo's one warning (or
# keeps the concrete build). Those records are turbo's to report, not torch's to print.
_META_ERROR_LOGGERS = (torch_compat.FAKE_TENSOR_LOGGER,)


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
    (lazy) compile of the same graph, such as a backward pass, sees the same rules. On a
    torch without that setting the counts stay concrete: the graph still merges."""
    shape_env = getattr(fake_mode, "shape_env", None)
    if shape_env is not None and not torch_compat.allow_dynamic_output_shapes(shape_env):
        log.info("turbo: torch %s cannot report merged token counts as symbolic sizes; they stay concrete",
                 torch.__version__)


def _fallback(report: GraphReport, reason: str) -> None:
    report.fallback_reason = reason
    counters["graphs_fallback"] += 1
    log.warning("turbo: graph %d compiled without token merging: %s", report.graph_index, reason)


def compile_rewritten(rewritten: GraphModule, original: GraphModule, example_inputs: list, plan: GraphPlan,
                      split: bool, mode: Optional[str], report: GraphReport) -> Callable:
    """``rewritten`` compiled as the plan's strategy says, behind the run-time guard; ``original``
    compiled by the inner compiler where nothing was rewritten."""
    strategy = plan.config.strategy
    compiler = inner_compiler(strategy.inner_backend, mode)
    if rewritten is original:
        return compiler(original, example_inputs)
    compiled = None
    if strategy.uses_compile_blocks and report.blocks:
        compiled = _split_and_compile(rewritten, example_inputs, mode, report, strategy.compile_blocks is True,
                                      strategy.uses_compile_merge_step, None if split else plan.split_refusal)
        if compiled is not None and captures_cuda_graphs(mode):
            compiled = _captured(compiled, rewritten, example_inputs, report)
    if compiled is None:
        if captures_cuda_graphs(mode) and not split and strategy.uses_symbolic_tokens \
                and strategy.inner_backend == "inductor" and report.blocks:
            log.warning("turbo: graph %d: Inductor captures no CUDA graph of it: symbolic_tokens=True makes the "
                        "merged token counts data-dependent sizes; leave symbolic_tokens unset for CUDA graphs",
                        report.graph_index)
        try:
            compiled = compiler(rewritten, example_inputs)
        except Exception as exc:
            log.debug("turbo: inner compiler failed on the rewritten graph", exc_info=True)
            _fallback(report, f"{strategy.inner_backend} failed on the rewritten graph: {type(exc).__name__}: {exc}")
            return compiler(original, example_inputs)
    return guard(compiled, original, compiler, report, plan.traits)


def _split_and_compile(rewritten: GraphModule, example_inputs: list, mode: Optional[str], report: GraphReport,
                       asked: bool, compile_merges: bool, refused: Optional[str]) -> Optional[Callable]:
    """``rewritten`` compiled piece by piece (``compile_blocks``), or None once the reason it
    is compiled whole instead is logged: a warning where the user ``asked`` for the split,
    an info record where it was only the default (the graph still merges; only its
    compile takes the longer road). ``refused``: the plan's reason it cannot be split."""
    from turbo_fx.block_compile import BlockCompileStats, BlockCompileUnsupported, compile_blocks

    # The pieces get the mode's options but not its CUDA graphs: the whole split forward is
    # captured instead (``_captured``).
    piece_compiler = inner_compiler("inductor", mode, cuda_graphs=False)
    stats = BlockCompileStats()
    try:
        if refused is not None:
            raise BlockCompileUnsupported(refused)
        compiled = compile_blocks(rewritten, example_inputs, piece_compiler, stats, compile_merges)
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


def inner_compiler(name: str, mode: Optional[str] = None, cuda_graphs: bool = True) -> Callable:
    """The compiler of ``name`` with Inductor's options for ``mode``; ``cuda_graphs=False``
    leaves out the mode's CUDA graphs."""
    if name == "inductor":
        compile_fx = torch_compat.inductor_compile_fx()
        patches = torch_compat.inductor_mode_options(mode) if mode else {}
        if not cuda_graphs:
            patches.pop("triton.cudagraphs", None)
        return lambda gm, inputs: compile_fx(gm, inputs, config_patches=patches)
    if name == "eager":
        return lambda gm, inputs: gm.forward
    return torch_compat.lookup_backend(name)
