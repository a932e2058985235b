"""Pass: emit explicit attention as one ``scaled_dot_product_attention`` call.

Matches explicit attention sites (``find_attention_sites`` kind "explicit") whose path is
only what SDPA itself computes:

    matmul(q, k^T) -> (* c | / c)... -> (+ mask) -> (cast) -> softmax(-1) -> (cast, inert dropout) -> matmul(., v)

with Python-number scale factors, a mask added after every scale factor, dropout with
``p == 0`` or ``training=False``, every intermediate used only by the next step, and q, k,
v, the mask and the result of one dtype. Talking-heads mixes, masks added before a scale,
tensor scales, active dropout and materialised probabilities read elsewhere (e.g.
``output_attentions``) do not match and keep their explicit form.

Why: once turbo adds its ``log(size)`` bias after the first merge and reads the CLS row of
the probabilities, Inductor's attention pattern no longer matches, so explicit models
(BLIP's vision tower, every transformers model with ``attn_implementation="eager"``) lose
the fused attention kernel that plain Inductor gives them. As SDPA the bias becomes its
``attn_mask`` and the CLS row is recomputed from q and k, as for models that call SDPA.

Guarantees: the SDPA call computes the same function (up to floating-point rounding:
softmax(scale * q k^T + mask) v); it takes the value matmul's place and its example
value, every node of the replaced path that nothing else reads is erased, and no other
node changes. Returns each converted site found anew at its SDPA call, under its old index.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from . import graph_utils as gu
from .find_attention import AttentionSite, site_at

CAST_METHODS = {"to", "float", "type", "type_as", "contiguous"}
DROPOUT_FUNCTIONS = {F.dropout, torch.dropout}


@dataclass
class SdpaForm:
    """What one SDPA call needs to replace an explicit site, and the nodes it makes dead."""

    q: Node
    k: Node  # keys [B, H, N, D], or pre-transposed [B, H, D, N] when k_transposed
    k_transposed: bool
    v: Node
    mask: Optional[Node]
    scale: float
    path: list[Node]  # score matmul ... value matmul, in graph order


def explicit_as_sdpa(gm: GraphModule, sites: Iterable[AttentionSite]) -> dict[int, AttentionSite]:
    """Replace every matching explicit site of ``sites`` by an SDPA call (in place, see the
    module docstring); returns the converted sites as SDPA sites, by index."""
    converted = {}
    for site in sites:
        form = sdpa_form(site)
        if form is None:
            continue
        sdpa = _emit(gm.graph, site, form)
        converted[site.index] = site_at(sdpa, site.index)
    if converted:
        gm.graph.lint()
        gm.recompile()
    return converted


def sdpa_form(site: AttentionSite) -> Optional[SdpaForm]:
    """The SDPA form of an explicit site, or None when its path holds anything SDPA does not compute."""
    if site.kind != "explicit" or site.softmax is None or not _softmax_over_last_axis(site.softmax):
        return None
    before = _scores_path(site)
    if before is None:
        return None
    after = _probs_path(site.softmax, site.attn)
    if after is None:
        return None
    score_matmul, scale = before[0], before[1]
    path = [score_matmul, *before[2], site.softmax, *after]
    if any(len(node.users) != 1 for node in path[:-1]):
        return None  # the scores or probabilities are read elsewhere
    q, k_t, v = score_matmul.args[0], score_matmul.args[1], site.attn.args[1]
    k_transposed = site.k_token_axis == -1
    k = k_t if k_transposed else site.k
    mask = site.mask if site.mask is not None else site.dropped_mask
    if not all(isinstance(n, Node) for n in (q, k, v)) or (mask is not None and not isinstance(mask, Node)):
        return None
    if not _same_dtype_4d(q, k, v, site.attn, mask):
        return None
    return SdpaForm(q, k, k_transposed, v, mask, scale, path)


def _softmax_over_last_axis(softmax: Node) -> bool:
    dim = softmax.kwargs.get("dim", softmax.args[1] if len(softmax.args) > 1 else None)
    shape = gu.tensor_shape(softmax)
    return isinstance(dim, int) and shape is not None and dim % len(shape) == len(shape) - 1


def _scores_path(site: AttentionSite):
    """Back from the softmax to the score matmul: (matmul, scale, the nodes in between in
    graph order), or None. Scale factors must all come before the mask add (SDPA adds its
    mask to the scaled scores)."""
    mask = site.mask if site.mask is not None else site.dropped_mask
    scale, visited = 1.0, []
    mask_pending, scaled_after_mask = site.mask_add is not None, False
    node = site.softmax.args[0]
    while isinstance(node, Node):
        if gu.is_matmul(node):
            return node, scale, visited[::-1]
        visited.append(node)
        if node is site.mask_add:
            if scaled_after_mask:  # (scores + mask) * c: SDPA would not scale the mask
                return None
            mask_pending = False
            node = _other_operand(node, mask)
        elif _is_cast(node):
            node = node.args[0]
        else:
            scaled = _scaled_input(node)
            if scaled is None:
                return None
            node, factor = scaled
            scale *= factor
            scaled_after_mask = scaled_after_mask or mask_pending
    return None


def _other_operand(add: Node, mask) -> Optional[Node]:
    left, right = add.args[0], add.args[1]
    return right if left is mask else left


def _scaled_input(node: Node) -> Optional[tuple[Node, float]]:
    """(x, c) for ``x * c`` or ``c * x``, (x, 1/c) for ``x / c``, with c a Python number; else None."""
    if len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if gu.is_call(node, {operator.mul, torch.mul}, {"mul", "__mul__"}):
        if _is_number(a) and isinstance(b, Node):
            a, b = b, a
        if isinstance(a, Node) and _is_number(b):
            return a, float(b)
    if gu.is_call(node, {operator.truediv, torch.div}, {"div", "__truediv__"}):
        if isinstance(a, Node) and _is_number(b) and b != 0:
            return a, 1.0 / float(b)
    return None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_cast(node: Node) -> bool:
    return node.op == "call_method" and node.target in CAST_METHODS and isinstance(node.args[0], Node)


def _probs_path(softmax: Node, value_matmul: Node) -> Optional[list[Node]]:
    """Forward from the softmax to the value matmul through casts and inert dropout: the
    nodes after the softmax up to and including the matmul, or None."""
    path, node = [], softmax
    while True:
        users = list(node.users)
        if len(users) != 1:
            return None
        user = users[0]
        path.append(user)
        if user is value_matmul:
            return path if user.args[0] is node else None
        if not (_is_cast(user) or _is_inert_dropout(user)) or user.args[0] is not node:
            return None
        node = user


def _is_inert_dropout(node: Node) -> bool:
    if not gu.is_call(node, DROPOUT_FUNCTIONS):
        return False
    p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
    training = node.kwargs.get("train", node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True))
    return training is False or p == 0 or p == 0.0


def _same_dtype_4d(q: Node, k: Node, v: Node, out: Node, mask: Optional[Node]) -> bool:
    values = [gu.example_value(n) for n in (q, k, v, out)]
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in values):
        return False
    if len({t.dtype for t in values}) != 1 or not values[0].is_floating_point():
        return False
    if mask is not None:
        m = gu.example_value(mask)
        # An added bool mask adds 0/1; SDPA would read the same tensor as keep/drop.
        if not isinstance(m, torch.Tensor) or m.dtype != values[0].dtype:
            return False
    return True


def _emit(graph, site: AttentionSite, form: SdpaForm) -> Node:
    with graph.inserting_before(site.attn):
        k = form.k
        if form.k_transposed:
            k = graph.call_method("transpose", (form.k, -2, -1))
            k.meta["example_value"] = gu.example_value(form.k).transpose(-2, -1)
        sdpa = graph.call_function(
            F.scaled_dot_product_attention, (form.q, k, form.v),
            {"attn_mask": form.mask, "dropout_p": 0.0, "is_causal": False, "scale": form.scale},
        )
    sdpa.meta.update(site.attn.meta)
    site.attn.replace_all_uses_with(sdpa)
    for node in reversed(form.path):
        if not node.users:
            graph.erase_node(node)
    return sdpa
