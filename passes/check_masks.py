"""Pass: evaluate attention masks on the example inputs and refuse those that vary by query.

Merging rebuilds masks as per-key padding masks, which is right only when every query
row of the original mask is the same. Causal or banded masks often arrive as plain
tensors (``is_causal=False`` with an explicit mask), so the check looks at values: it
runs the part of the graph that builds each mask (usually a few ops on the input's
attention mask, before the first layer) on the real example inputs.

Guarantees: the graph is not modified; every site whose mask rows differ gets a problem
(``AttentionSite.problems``), so its stream stays unmerged. A mask that cannot be evaluated is left to the run-time check in
``turbo_fx.ops.check_key_padding_mask``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from . import graph_utils as gu
from .find_attention import CONSTANT_BIAS_PROBLEM, AttentionSite


QUERY_DEPENDENT_PROBLEM = "attention mask varies by query (causal or banded); merging needs a key-padding mask"


def mark_query_dependent_masks(gm: GraphModule, example_inputs: Sequence[Any], sites: list[AttentionSite]) -> int:
    """Add a problem to each site of ``sites`` whose mask rows differ; returns how many."""
    masks = {site.mask for site in sites if isinstance(site.mask, Node)}
    if not masks:
        return 0
    try:
        values = _evaluate(gm, example_inputs, masks)
    except Exception:  # left to the run-time check
        return 0
    marked = 0
    for site in sites:
        mask = values.get(site.mask)
        if isinstance(mask, torch.Tensor) and _varies_by_query(mask):
            site.problems.append(QUERY_DEPENDENT_PROBLEM)
            marked += 1
    return marked


def clear_all_allowing_constant_masks(gm: GraphModule, example_inputs: Sequence[Any],
                                      sites: list[AttentionSite]) -> list[int]:
    """Sites whose only problem is a mask built from shapes alone get it cleared, and their
    ``mask`` set to None, when that mask lets every query see every key (all True, or all
    zero): such a mask changes nothing, and merging drops it. Returns the cleared sites'
    indices (``drop_cleared_masks`` repeats the clearing on a fresh copy of the sites)."""
    candidates = [s for s in sites if s.constant_mask and s.problems == [CONSTANT_BIAS_PROBLEM]
                  and _built_from_shapes_alone(s.mask)]
    if not candidates:
        return []
    try:
        values = _evaluate(gm, example_inputs, {s.mask for s in candidates})
    except Exception:  # the problem stands
        return []
    cleared = [s.index for s in candidates if _allows_everything(values.get(s.mask))]
    for site in candidates:
        value = values.get(site.mask)
        if site.index not in cleared and isinstance(value, torch.Tensor) and _varies_by_query(value):
            # Built from arange, as transformers >= 5.17 builds causal masks: say what it is.
            site.problems = [QUERY_DEPENDENT_PROBLEM if p == CONSTANT_BIAS_PROBLEM else p for p in site.problems]
    drop_cleared_masks(sites, cleared)
    return cleared


def _built_from_shapes_alone(mask: Node) -> bool:
    """No graph input at all behind the mask, parameters included: a bias read from
    parameters that happen to be zero now (BEiT's table at init) would stop being zero
    when weights load in place, without a recompile."""
    return not any(n.op in ("placeholder", "get_attr") for n in gu.ancestors(mask) | {mask})


def drop_cleared_masks(sites: list[AttentionSite], cleared: Sequence[int]) -> None:
    for site in sites:
        if site.index in cleared:
            site.problems = [p for p in site.problems if p != CONSTANT_BIAS_PROBLEM]
            site.dropped_mask, site.mask = site.mask, None


def _allows_everything(mask: Any) -> bool:
    if not isinstance(mask, torch.Tensor):
        return False
    if mask.dtype == torch.bool:
        return bool(mask.all())
    return bool((mask == 0).all())


def _varies_by_query(mask: torch.Tensor) -> bool:
    return mask.dim() >= 2 and mask.size(-2) > 1 and not bool((mask == mask[..., :1, :]).all())


def _evaluate(gm: GraphModule, example_inputs: Sequence[Any], targets: set[Node]) -> dict[Node, Any]:
    """Run only the nodes the targets depend on, on real inputs."""
    needed = set(targets)
    for node in targets:
        needed |= gu.ancestors(node)
    env: dict[Node, Any] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    env.update(zip(placeholders, example_inputs))
    with torch.no_grad():
        for node in gm.graph.nodes:
            if node not in needed or node.op == "placeholder":
                continue
            args = map_arg(node.args, env.__getitem__)
            kwargs = map_arg(node.kwargs, env.__getitem__)
            if node.op == "call_function":
                env[node] = node.target(*args, **kwargs)
            elif node.op == "call_method":
                env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
            elif node.op == "get_attr":
                env[node] = gm.get_parameter(node.target) if "." in node.target else getattr(gm, node.target)
            else:
                env[node] = gm.get_submodule(node.target)(*args, **kwargs)
    return {node: env[node] for node in targets}
