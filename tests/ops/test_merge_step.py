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
