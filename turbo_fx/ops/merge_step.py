"""One attention block's whole merge step as one call, and as the opaque op
``torch.ops.turbo_fx.merge_block`` that the graph calls; ``record_merges`` collects what it did."""
from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from turbo_fx import torch_compat

from .attention_bias import key_bias
from .merge import compose_assign, head_mean, merge_tokens
from .semantic import cls_attention, cls_attention_from_probs

log = logging.getLogger("turbo_fx")


def merge_step_outputs(
    x: Tensor,
    size: Tensor,
    assign: Tensor,
    metric_source: Tensor,
    metric_token_axis: int,
    semantic_q: Tensor | None,
    semantic_k: Tensor | None,
    semantic_mask: Tensor | None,
    semantic_probs: Tensor | None,
    scale: float | None,
    r: int,
    protected: int,
    fusion: str,
    alpha: float,
    beta: float,
    gamma: float,
    block: int,
    padding: bool,
    prop_attn: bool,
    bias_dtype: torch.dtype,
    symbolic_tokens: bool = False,
    use_redundancy: bool = True,
    keep_salient: int = 0,
    protected_tail: int = 0,
    traced: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Everything one attention block's merge needs, in one call: the metric (per-head
    features averaged over heads), the semantic value (from the CLS query row, or from
    materialised probabilities; none when both are None), the merge itself, the new
    assign map and the key bias the next attention blocks use.

    Returns (merged x, merged size, new assign, key bias [B, 1, 1, N-r]).
    ``traced``: this call is traced into the compiled graph (``fuse_merges``) rather than run
    by the opaque op. ``symbolic_tokens`` then routes the index of surviving tokens through
    ``token_rows``, so the merged count is symbolic and later blocks share kernels; for the
    opaque op it only matters to the shape function."""
    metric = head_mean(metric_source, metric_token_axis)
    if semantic_probs is not None:
        semantic = cls_attention_from_probs(semantic_probs)
    elif semantic_q is not None:
        semantic = cls_attention(semantic_q, semantic_k, scale, semantic_mask)
    else:
        semantic = None
    kept_rows = None
    if traced and symbolic_tokens and r > 0:
        low, high = _lower_bound(x.shape[1]) - r, assign.shape[1]
        if isinstance(high, int) and low >= 2:
            kept_rows = lambda index: torch.ops.turbo_fx.token_rows(index, low, high)  # noqa: E731
    merged, new_size, dest = merge_tokens(
        x, size, metric, semantic, r, protected, fusion, alpha, beta, gamma, block, padding, use_redundancy,
        keep_salient, protected_tail, traced, kept_rows,
    )
    if r <= 0:
        # merge_tokens hands its inputs back when nothing merges; an op's outputs must not
        # alias its inputs (functionalization and CUDA-graph memory pools rely on that).
        merged, new_size = merged.clone(), new_size.clone()
    new_assign = compose_assign(assign, dest)
    return merged, new_size, new_assign, key_bias(new_size, bias_dtype, prop_attn)


def metric_as_one_head(metric_source: Tensor, token_axis: int) -> Tensor:
    """The merge metric (``metric_source`` averaged over heads) as a one-head [B, 1, N, D]
    tensor: handed to the merge as its ``metric_source`` (token axis -2), it gives the same
    metric, since the mean over one head is the value itself. ``hoist_merge_inputs`` puts
    this call before the merge, where the attention's own code computes it."""
    return head_mean(metric_source, token_axis).unsqueeze(1)


def semantic_as_one_head(q: Tensor | None, k: Tensor | None, scale: float | None, mask: Tensor | None,
                         probs: Tensor | None) -> Tensor:
    """The semantic value as attention probabilities of one head and one (the CLS) query,
    [B, 1, 1, N] float32: the head-averaged CLS row is itself a probability row, so a merge
    handed it as ``semantic_probs`` reads the same semantic value. From the CLS query row
    (``cls_attention``) or from materialised probabilities."""
    semantic = cls_attention_from_probs(probs) if probs is not None else cls_attention(q, k, scale, mask)
    return semantic[:, None, None, :]


def _signature_with_compiled(step: inspect.Signature) -> inspect.Signature:
    """``merge_step_outputs``'s signature and one more parameter, ``compiled``: the opaque op's
    schema, spelled once (the op, its shape function and the step share it)."""
    compiled = inspect.Parameter("compiled", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=False, annotation="bool")
    return step.replace(parameters=[*step.parameters.values(), compiled])


_BLOCK_SIGNATURE = _signature_with_compiled(inspect.signature(merge_step_outputs))


_BLOCK_DEFAULTS = {name: p.default for name, p in _BLOCK_SIGNATURE.parameters.items()}
_BLOCK_REQUIRED = sum(p.default is inspect.Parameter.empty for p in _BLOCK_SIGNATURE.parameters.values())


def block_arguments(args: tuple, kwargs: dict) -> dict:
    """A ``merge_block`` call's arguments by name, defaults filled in, in signature order."""
    if not kwargs and _BLOCK_REQUIRED <= len(args) <= len(_BLOCK_DEFAULTS):
        # The op's dispatcher passes arguments by position, trailing defaults left out;
        # ``Signature.bind`` would cost about 25 us per block and forward, on the host-bound path.
        return {**_BLOCK_DEFAULTS, **dict(zip(_BLOCK_DEFAULTS, args))}
    bound = _BLOCK_SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def merge_block(*args, **kwargs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``merge_step_outputs`` (same arguments, plus ``compiled``), recorded for
    ``record_merges``. ``compiled`` (the opaque op's ``compile_merge_step`` option): run the
    step through ``run_compiled_step``, so a merge is a few generated kernels instead of tens
    of ATen calls. The "layer" fusion weighs each block by its own float, which would
    recompile per block, so it always runs eagerly."""
    step = block_arguments(args, kwargs)
    compiled, block, x = step.pop("compiled"), step["block"], step["x"]
    step = shared_block_step(step)
    outputs = None
    if compiled and not step["traced"] and step["r"] > 0 and not _is_fake(x) and compiles_shared_step(step):
        outputs = run_compiled_step(*{**step, "symbolic_tokens": False, "traced": True}.values())
    if outputs is None:
        outputs = merge_step_outputs(*step.values())
    record_merge(block, x.shape[1], outputs)
    return outputs


def record_merge(block: int, tokens_in: int, outputs: tuple) -> None:
    """Hand one executed merge (its four outputs) to the innermost ``record_merges``, if any."""
    merged, new_size, new_assign, _ = outputs
    if _MERGE_RECORDERS and not _is_fake(new_assign):
        _MERGE_RECORDERS[-1].append(
            MergeRecord(block, tokens_in, merged.shape[1], new_assign.detach().cpu(), new_size.detach().cpu())
        )


# torch.library reads the op's schema from this.
merge_block.__signature__ = _BLOCK_SIGNATURE


def traced_merge_block(*args, **kwargs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``merge_block``'s computation written for a compiler to trace (``compile_blocks`` compiles
    each merge piece with this in the opaque op's place): the traced merge with concrete token
    counts (the piece's own are backed symbolic sizes)."""
    step = block_arguments(args, kwargs)
    step.pop("compiled")
    step.update(traced=True, symbolic_tokens=False)
    return merge_step_outputs(*step.values())


def shared_block_step(step: dict) -> dict:
    """``step`` (a ``merge_block`` call's arguments by name) with ``block`` zeroed where the
    fusion does not read it: every block's call then reads the same, and one compiled merge
    step serves them all."""
    return step if step["fusion"] == "layer" else {**step, "block": 0}


def compiles_shared_step(step: dict) -> bool:
    """Whether one compiled merge step may serve this merge: not for the "layer" fusion (it
    weighs each block by a float of its own, so every block's step would compile apart), and
    only where Inductor computes the step exactly (``compiles_exactly``)."""
    return step["fusion"] != "layer" and compiles_exactly(step["padding"])


def merge_source_hash() -> str:
    """A digest of the merge step's source files: compiled code cached under the name of a
    Python function (``traced_merge_block``) must not outlive a change to what it computes."""
    if not _SOURCE_HASH:
        import hashlib
        import pathlib

        digest = hashlib.sha256()
        for path in sorted(pathlib.Path(__file__).parent.glob("*.py")):
            digest.update(path.read_bytes())
        _SOURCE_HASH.append(digest.hexdigest()[:16])
    return _SOURCE_HASH[0]


_SOURCE_HASH: list[str] = []


def compiles_exactly(padding: bool) -> bool:
    """Whether Inductor, compiling the merge step with a symbolic token count, computes what
    the eager step does. Not on torch < 2.13 with padding: there (2.11.0, CPU)
    the similarities' argmax came out wrong in 7 of 8 rows while their max was
    right, so merges went to the wrong partners; such steps run eagerly instead."""
    return not padding or torch_compat.torch_at_least(2, 13)


_COMPILED_STEP: list = []
COMPILED_STEP_VARIANTS = 64


def run_compiled_step(*args):
    """``merge_step_outputs(*args)`` compiled once by Inductor with dynamic shapes (batch, token
    count, channels, r and the protected counts symbolic), one compile shared by every block
    and every model of the process; Inductor's cache keeps it for later processes. Returns None
    when that compile failed once (the caller then runs the step eagerly; the failure is
    logged once, and the model's output is the same either way)."""
    if not _COMPILED_STEP:
        _COMPILED_STEP.append(torch.compile(merge_step_outputs, dynamic=True, fullgraph=True))
    step = _COMPILED_STEP[0]
    if step is None:
        return None
    try:
        # The op's kernel is entered below autograd on some call paths and not on others;
        # Dynamo's guards see the difference and would recompile. One dispatch state for all.
        # Floats (alpha, the attention scale) stay constants: as 0-d tensor inputs each call
        # would build them anew, three more library calls per block. Every configuration a
        # process runs (dtype, padding, mask or none, token-count parity) is one more variant
        # of this one function: room for many, where Dynamo's default would stop at 8.
        with torch_compat.below_autograd(), torch_compat.dynamo_config_patch(
                specialize_float=True, recompile_limit=COMPILED_STEP_VARIANTS):
            return step(*args)
    except Exception as exc:  # a compile failure must not break the user's model
        _COMPILED_STEP[0] = None
        log.warning("turbo: the compiled merge step failed (%s: %s); merges run eagerly from now on",
                    type(exc).__name__, exc)
        return None


def _lower_bound(n) -> int:
    """A token count's least possible value: itself when static; for a symbolic count (the
    previous block's ``token_rows``), the lower end of its value range (0 where torch cannot
    say: the merge then keeps its concrete count)."""
    return torch_compat.size_lower_bound(n)


@dataclass(frozen=True)
class MergeRecord:
    """One executed merge, as ``record_merges`` collects it: the attention block that
    merged, tokens before and after, where every original token went ([B, N0]) and
    the merged tokens' sizes ([B, N])."""

    block: int
    tokens_in: int
    tokens_out: int
    assign: Tensor
    size: Tensor


_MERGE_RECORDERS: list[list[MergeRecord]] = []


@contextlib.contextmanager
def record_merges() -> Iterator[list[MergeRecord]]:
    """Collect a ``MergeRecord`` for every merge that runs inside the block, eager or
    compiled: the opaque merge op records what it computed, and so do the merge pieces that
    ``compile_blocks`` compiles (from the outputs of their generated code; a copy of the assign
    map and sizes to the host each, only while recording). With ``fuse_merges=True`` the merge
    is part of the model's generated code and nothing is recorded."""
    records: list[MergeRecord] = []
    _MERGE_RECORDERS.append(records)
    try:
        yield records
    finally:
        _MERGE_RECORDERS.remove(records)


def recording_merges() -> bool:
    """Whether a ``record_merges`` block is open (merges then copy their maps to the host)."""
    return bool(_MERGE_RECORDERS)


def _is_fake(t: Tensor) -> bool:
    return torch_compat.is_fake(t) or t.device.type == "meta"


# ``merge_block`` as one opaque op: Inductor calls it instead of generating kernels for
# it. With ``symbolic_tokens`` its shape function reports the merged token count as an
# unbacked size, so the blocks after it, which differ only in token count, get
# shape-generic kernels that Inductor compiles once instead of once per block.
merge_block_op = torch.library.custom_op("turbo_fx::merge_block", merge_block, mutates_args=())


@merge_block_op.register_fake
def _merge_block_fake(*args, **kwargs):
    step = block_arguments(args, kwargs)
    x, r = step["x"], step["r"]
    batch, n_tokens, channels = x.shape
    kept = n_tokens - r
    if step["symbolic_tokens"]:
        kept = torch.library.get_ctx().new_dynamic_size(min=2)
    return (
        x.new_empty(batch, kept, channels),
        x.new_empty(batch, kept, dtype=torch.float32),
        step["assign"].new_empty(step["assign"].shape),
        x.new_empty(batch, 1, 1, kept, dtype=step["bias_dtype"]),
    )


@torch.library.custom_op("turbo_fx::token_rows", mutates_args=())
def token_rows(index: Tensor, low: int, high: int) -> Tensor:
    """The [B, N] index of the tokens that survive a merge, unchanged (a copy: an op's output
    may not alias its input). Its shape function reports N as a new symbolic size between
    ``low`` and ``high``, so that a traced merge (``fuse_merges``) hands the blocks after it a
    symbolic token count: Inductor then compiles their kernels once for every block instead
    of once per token count. ``low`` is the true count; the bounds let the compiler prove
    that later merges fit (r <= half the tokens) and keep 32-bit indexing."""
    return index.clone()


@token_rows.register_fake
def _token_rows_fake(index, low, high):
    rows = torch.library.get_ctx().new_dynamic_size(min=low, max=high)
    return index.new_empty(index.shape[0], rows)
