"""FLOP accounting with torch.utils.flop_counter, completed for what it does not count.

torch's counter has no formula for the CPU flash-attention kernel (so on CPU every
SDPA call counted as zero, hiding the quadratic part merging saves) and cannot see
inside the opaque merge op. Both get formulas here: 2 FLOPs per multiply-add.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch.fx import GraphModule
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula, sdpa_flop_count

from turbo_fx import ops  # noqa: F401  (defines torch.ops.turbo_fx.merge_block)

log = logging.getLogger("turbo_fx")
aten = torch.ops.aten
_CPU_SDPA = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)

if _CPU_SDPA is not None and _CPU_SDPA.default not in flop_registry:

    @register_flop_formula(_CPU_SDPA)
    def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)


def merge_block_flops(x_shape, metric_shape, metric_token_axis: int, semantic_q_shape, protected: int) -> int:
    """FLOPs of one merge: the A x B similarity matrix and, when the semantic value is
    recomputed for SDPA, the CLS query row q_0 k^T."""
    batch, n_tokens = x_shape[0], x_shape[1]
    dim = metric_shape[-1] if metric_token_axis in (-2, len(metric_shape) - 2) else metric_shape[-2]
    rest = n_tokens - protected
    flops = 2 * batch * ((rest + 1) // 2) * (rest // 2) * dim
    if semantic_q_shape is not None:
        _, heads, _, head_dim = semantic_q_shape
        flops += 2 * batch * heads * n_tokens * head_dim
    return flops


@register_flop_formula(torch.ops.turbo_fx.merge_block)
def _merge_block_flop_formula(x_shape, size_shape, assign_shape, metric_shape, metric_token_axis,
                              semantic_q_shape, semantic_k_shape, semantic_mask_shape, semantic_probs_shape,
                              scale, r, protected, *rest, out_shape=None, **kwargs) -> int:
    return merge_block_flops(x_shape, metric_shape, metric_token_axis, semantic_q_shape, protected)


def count_flops(gm: GraphModule, example_inputs: list) -> Optional[int]:
    """FLOPs of one run of ``gm`` on the example inputs; None (logged) when the counter
    cannot run the graph: counting is a report, and must never stop a compile."""
    # Inputs that require grad without being leaves (Dynamo lifts such tensors from the
    # model, e.g. BLIP-2's expanded query tokens) make the counter's module tracker assert.
    inputs = [t.detach() if isinstance(t, torch.Tensor) and t.requires_grad else t for t in example_inputs]
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            gm(*inputs)
    except Exception as exc:  # noqa: BLE001 - any failure only costs the FLOP figure
        log.warning("turbo: FLOPs not counted for this graph: %s: %s", type(exc).__name__, exc)
        return None
    return counter.get_total_flops()
