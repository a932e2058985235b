"""The opaque merge op as torch's custom-op machinery sees it: its schema, its fake (meta)
implementation and aliasing checked by ``torch.library.opcheck``, and outputs that never
share memory with inputs (what functionalization and CUDA-graph memory pools rely on)."""
from __future__ import annotations

import pytest
import torch

from turbo_fx import ops

B, N, C, H = 2, 17, 16, 2


def op_args(r: int, symbolic: bool, *, dtype=torch.float32, padding=False, probs=False, keep_salient=0, tail=0):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, N, C, generator=g).to(dtype)
    size = torch.ones(B, N)
    if padding:
        size[1, -4:] = 0
    assign = ops.initial_assign(x).contiguous()
    q = torch.randn(B, H, N, C // H, generator=g).to(dtype)
    k = torch.randn(B, H, N, C // H, generator=g).to(dtype)
    attn = torch.softmax(q @ k.transpose(-1, -2), dim=-1) if probs else None
    semantic_q, semantic_k = (None, None) if probs else (q, k)
    return (x, size, assign, k, -2, semantic_q, semantic_k, None, attn, None, r, 1, "sub", 0.05, 0.9, 6.0,
            0, padding, True, dtype, symbolic, True, keep_salient, tail)


CASES = {
    "r=0": dict(r=0, symbolic=False),
    "r=3": dict(r=3, symbolic=False),
    "r=3 symbolic": dict(r=3, symbolic=True),
    "r=0 symbolic": dict(r=0, symbolic=True),
    "padding": dict(r=3, symbolic=True, padding=True),
    "from probabilities": dict(r=4, symbolic=False, probs=True),
    "keep_salient": dict(r=2, symbolic=True, keep_salient=1),
    "bf16": dict(r=3, symbolic=True, dtype=torch.bfloat16),
    "protected tail": dict(r=3, symbolic=True, tail=4),
}


@pytest.mark.parametrize("case", list(CASES))
def test_opcheck(case):
    torch.library.opcheck(ops.merge_block_op, op_args(**CASES[case]))


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_never_alias_inputs(case):
    args = op_args(**CASES[case])
    inputs = [a for a in args if isinstance(a, torch.Tensor)]
    outputs = ops.merge_block_op(*args)
    for out in outputs:
        for t in inputs:
            assert out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outputs_keep_the_model_dtype_except_sizes(dtype):
    args = op_args(r=3, symbolic=False, dtype=dtype)
    merged, size, assign, bias = ops.merge_block_op(*args)
    assert merged.dtype == dtype and bias.dtype == dtype
    assert size.dtype == torch.float32 and assign.dtype == torch.int64
    assert merged.shape == (B, N - 3, C) and bias.shape == (B, 1, 1, N - 3)


# Ops that make the host wait for the device (a value read back) or whose output shape
# depends on data; a merge step with any of them cannot run ahead of the GPU or be captured
# in a CUDA graph.
HOST_SYNCING = {"_local_scalar_dense", "nonzero", "unique", "_unique", "_unique2", "unique_consecutive",
                "unique_dim", "masked_select", "item", "repeat_interleave"}


class AtenLog(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func.overloadpacket.__name__, args))
        return func(*args, **(kwargs or {}))


def _bool_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


@pytest.mark.parametrize("case", list(CASES))
def test_the_merge_step_never_syncs_with_the_host(case):
    args = op_args(**CASES[case])
    with AtenLog() as log:
        ops.merge_block(*args)
    names = [name for name, _ in log.calls]
    assert not HOST_SYNCING & set(names), sorted(HOST_SYNCING & set(names))
    # Boolean-mask indexing hides a nonzero.
    assert not any(name in ("index", "index_put", "index_put_") and _bool_index(a) for name, a in log.calls)


# The traced merge (fuse_merges): with symbolic tokens the index of surviving tokens passes
# through the token_rows op, whose fake reports a fresh symbolic count bounded by the true one.

def test_token_rows_copies_and_passes_opcheck():
    index = torch.arange(12).reshape(2, 6)
    rows = torch.ops.turbo_fx.token_rows(index, 6, 9)
    assert torch.equal(rows, index)
    assert rows.untyped_storage().data_ptr() != index.untyped_storage().data_ptr()
    torch.library.opcheck(torch.ops.turbo_fx.token_rows.default, (index, 6, 9))


def _fake_step(n_tokens: int, r: int, symbolic: bool, traced: bool = True):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    shape_env = ShapeEnv()
    shape_env.settings = __import__("dataclasses").replace(shape_env.settings, allow_dynamic_output_shape_ops=True)
    with FakeTensorMode(shape_env=shape_env):
        x, k = torch.empty(B, n_tokens, C), torch.empty(B, H, n_tokens, C // H)
        args = (x, torch.ones(B, n_tokens), torch.zeros(B, n_tokens, dtype=torch.long), k, -2, None, None, None, None,
                None, r, 1, "sub", 0.1, 1.0, 0.0, 0, False, True, torch.float32, symbolic, True, 0, 0, traced)
        first = ops.merge_block(*args)
        # A second block on the first one's output: its input count is already symbolic.
        k2 = torch.empty(B, H, first[0].shape[1], C // H)
        second = ops.merge_block(first[0], first[1], first[2], k2, -2, None, None, None, None, None, r, 1, "sub",
                                 0.1, 1.0, 0.0, 1, False, True, torch.float32, symbolic, True, 0, 0, traced)
    return first, second


@pytest.mark.skipif(torch.__version__ < "2.13", reason=(
    "torch 2.11's fake propagation of the traced merge guards on its unbacked count "
    "(GuardOnDataDependentSymNode: (u0//2)); the rewrite then keeps its concrete build"))
def test_traced_merge_reports_a_fresh_bounded_token_count_per_block():
    first, second = _fake_step(N, 3, symbolic=True)
    counts = [first[0].shape[1], second[0].shape[1]]
    assert all(isinstance(c, torch.SymInt) and c.node.hint is None for c in counts)
    # Each block its own symbol (not "u0 - 3"), so the blocks' kernels are textually the same.
    assert counts[0].node.expr.is_symbol and counts[1].node.expr.is_symbol
    assert counts[0].node.expr != counts[1].node.expr
    env = counts[0].node.shape_env
    assert [int(env.bound_sympy(c.node.expr).lower) for c in counts] == [N - 3, N - 6]
    assert [int(env.bound_sympy(c.node.expr).upper) for c in counts] == [N, N]
    for outputs, count in ((first, counts[0]), (second, counts[1])):
        assert outputs[1].shape[1].node.expr == count.node.expr == outputs[3].shape[-1].node.expr


def test_traced_merge_keeps_static_counts_without_symbolic_tokens():
    first, second = _fake_step(N, 3, symbolic=False)
    assert (first[0].shape[1], second[0].shape[1]) == (N - 3, N - 6)


@pytest.mark.parametrize("case", ["r=3", "padding", "keep_salient", "protected tail", "from probabilities"])
def test_traced_kept_positions_equal_the_cumsum_ones(case):
    """The traced merge counts kept positions by comparison instead of a cumsum: same outputs."""
    args = list(op_args(**CASES[case]))
    eager = ops.merge_block(*args)
    traced = ops.merge_block(*args, True)
    for a, b in zip(eager, traced):
        assert torch.equal(a, b)


def test_a_failed_merge_step_compile_runs_the_step_eagerly(monkeypatch, caplog):
    from turbo_fx.ops import merge_step

    def broken(*args):
        raise RuntimeError("inductor is unavailable")

    monkeypatch.setattr(merge_step, "_COMPILED_STEP", [broken])
    args = op_args(r=3, symbolic=False)
    expected = ops.merge_block(*args)
    with caplog.at_level("WARNING", logger="turbo_fx"):
        first = ops.merge_block(*args, False, True)
        second = ops.merge_block(*args, False, True)
    for a, b, c in zip(expected, first, second):
        assert torch.equal(a, b) and torch.equal(a, c)
    warnings = [r for r in caplog.records if "compiled merge step failed" in r.getMessage()]
    assert len(warnings) == 1 and "inductor is unavailable" in warnings[0].getMessage()
