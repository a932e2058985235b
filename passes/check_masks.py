"""Pass: evaluate attention masks on the example inputs and refuse those that vary by query.

Merging rebuilds masks as per-key padding masks, which is right only when every query
row of the original mask is the same. Causal or banded masks often arrive as plain
tensors (``is_causal=False`` with an explicit mask), so the check looks at values: it
runs the part of the graph that builds each mask (usually a few ops on the input's
attention mask, before the first layer) on the real example inputs.

Masks built from shapes alone (no input, no parameter) are evaluated too: one that allows
every key is cleared, since merging drops it. That includes the masks of cross-attention
sites (BLIP-2's Q-Former builds an all-ones mask over the image tokens from their shape),
which can then read merged tokens.

Guarantees: the graph is not modified; every site whose mask rows differ gets a problem
(``AttentionSite.problems``), so its stream stays unmerged. A mask that cannot be evaluated
is left to the run-time check ``torch.ops.turbo_fx.check_key_padding_mask``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from . import graph_utils as gu
from .find_attention import CONSTANT_BIAS_PROBLEM, CROSS_ATTENTION_PROBLEM, AttentionSite


QUERY_DEPENDENT_PROBLEM = "attention mask varies by query (causal or banded); merging needs a key-padding mask"


def check_masks(gm: GraphModule, example_inputs: Sequence[Any], sites: list[AttentionSite]) -> list[int]:
    """Evaluate, in one run on the example inputs, the masks of the sites that could merge:

    * a mask from the input whose rows differ gets a problem (left to the run-time check
      when it cannot be evaluated);
    * a mask built from shapes alone (the site's only problem) that lets every query see
      every key (all True, or all zero) changes nothing: it is cleared, and the site's
      ``mask`` set to None, since merging drops it; one whose rows differ is named as the
      causal mask it is (transformers >= 5.17 builds causal masks from arange).

    Returns the cleared sites' indices (``drop_cleared_masks`` repeats the clearing on a
    fresh copy of the sites)."""
    constant = [s for s in sites if isinstance(s.mask, Node) and _built_from_shapes_alone(s.mask) and (
        (s.constant_mask and s.problems == [CONSTANT_BIAS_PROBLEM]) or s.problems == [CROSS_ATTENTION_PROBLEM])]
    from_input = [s for s in sites if not s.problems and isinstance(s.mask, Node)]
    if not constant and not from_input:
        return []
    try:
        values = _evaluate(gm, example_inputs, {s.mask for s in constant + from_input})
    except Exception:  # constant masks keep their problem; input masks are checked at run time
        return []
    cleared = [s.index for s in constant if _allows_everything(values.get(s.mask))]
    for site in constant + from_input:
        value = values.get(site.mask)
        if site.index in cleared or not (isinstance(value, torch.Tensor) and _varies_by_query(value)):
            continue
        if CROSS_ATTENTION_PROBLEM in site.problems:
            continue  # a reader keeps its mask, and reader_problem names it
        site.problems = [p for p in site.problems if p != CONSTANT_BIAS_PROBLEM] + [QUERY_DEPENDENT_PROBLEM]
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
