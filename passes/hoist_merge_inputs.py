"""Pass: compute each merge's metric and semantic value before the merge, in the model's graph.

Matches every merge call (``passes.graph_utils.is_merge``) that computes its metric from
per-head features (``metric_source``) or its semantic value from the CLS query row or from
attention probabilities. Before each it inserts the calls that compute them
(``ops.merge_step.metric_as_one_head``, ``ops.merge_step.semantic_as_one_head``) and hands the
merge their results as a one-head metric and one-head, one-query probabilities.

Why: split block by block (``compile_blocks``), these calls then fall into the compute piece
before the merge, whose generated code already reads the attention's q and k: the head mean
and the CLS softmax run in its vectorised kernels, and the merge piece (scalar code on CPU,
``block_compile.merge_codegen_options``) reads a dense [B, 1, N, D] metric and a
[B, 1, 1, N] semantic row instead of the strided q and k.

Guarantees: ``gm`` is left untouched; the returned module computes the same values (the mean
over one head, and the CLS row read back from one-head probabilities, are the values
themselves), so every merge picks the same tokens up to floating-point reassociation by the
compiler. Merges whose inputs are already in that form are left as they are.
"""
from __future__ import annotations

import copy

from torch.fx import GraphModule

from turbo_fx.ops.merge_step import block_arguments, metric_as_one_head, semantic_as_one_head

from .graph_utils import is_merge


def hoist_merge_inputs(gm: GraphModule) -> GraphModule:
    """A copy of ``gm`` with every merge's metric and semantic value computed before it."""
    out = GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
    graph = out.graph
    for node in list(graph.nodes):
        if not is_merge(node):
            continue
        step = block_arguments(node.args, node.kwargs)
        if _already_hoisted(step):
            continue
        with graph.inserting_before(node):
            metric = graph.call_function(metric_as_one_head, (step["metric_source"], step["metric_token_axis"]))
            probs = None
            if step["semantic_q"] is not None or step["semantic_probs"] is not None:
                probs = graph.call_function(semantic_as_one_head, (
                    step["semantic_q"], step["semantic_k"], step["scale"], step["semantic_mask"],
                    step["semantic_probs"]))
        step.update(metric_source=metric, metric_token_axis=-2, semantic_q=None, semantic_k=None,
                    semantic_mask=None, semantic_probs=probs, scale=None)
        node.args, node.kwargs = tuple(step.values()), {}
    graph.lint()
    out.recompile()
    return out


def _already_hoisted(step: dict) -> bool:
    """Whether this merge's inputs come from the hoisted calls already (the pass ran before)."""
    source, probs = step["metric_source"], step["semantic_probs"]
    metric_done = getattr(source, "target", None) is metric_as_one_head
    semantic_done = step["semantic_q"] is None and (probs is None or getattr(probs, "target", None)
                                                    is semantic_as_one_head)
    return metric_done and semantic_done
