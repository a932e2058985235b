"""Pass: find the attention sites of a torch-level (Dynamo) FX graph.

Matches
  * fused attention: ``scaled_dot_product_attention(q, k, v, attn_mask=..., scale=...)``;
  * explicit attention: ``matmul(q, k^T) -> (scale) -> (+ mask) -> softmax -> (dropout, cast) -> matmul(., v)``,
    also with talking heads (CaiT: a linear layer over the head axis just before and just
    after the softmax);
  * packed attention: ``F.multi_head_attention_forward(query, key, value, ...)``, the single
    call that ``nn.MultiheadAttention`` (and so ``nn.TransformerEncoderLayer``, torchvision's
    ViT, OpenAI CLIP) leaves in Dynamo's graph; its tokens are [N, B, C].
For each site it identifies q and k (k with its token axis), the mask, the residual
stream entering the sub-block and the add that closes it (and, for post-norm blocks,
the LayerNorm right after that add), plus the module the site came from.

Guarantees: the graph is not modified. Sites come back in graph order; a site that
cannot be merged safely carries the reasons in ``problems`` (cross-attention,
causal masks, grouped-query heads, biases that are not padding masks, a residual
stream that is not [batch, tokens, channels]).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.fx import GraphModule, Node

from . import graph_utils as gu


CONSTANT_BIAS_PROBLEM = "attention bias does not come from the input (e.g. a relative position bias)"
CROSS_ATTENTION_PROBLEM = "cross-attention (keys come from another sequence)"


@dataclass
class AttentionSite:
    index: int
    kind: str  # "sdpa", "explicit" or "packed" (F.multi_head_attention_forward)
    attn: Node  # the SDPA call, or the probs @ v matmul
    q: Node
    k: Node
    k_token_axis: int  # -2 for [B, H, N, D] keys, -1 for pre-transposed [B, H, D, N]
    mask: Optional[Node] = None
    scale: Optional[float] = None
    softmax: Optional[Node] = None
    logits: Optional[Node] = None  # what feeds softmax (explicit only)
    mask_add: Optional[Node] = None  # the add that applies the mask (explicit only)
    residual: Optional[Node] = None
    closing_add: Optional[Node] = None
    stream_out: Optional[Node] = None
    module: str = ""
    problems: list[str] = field(default_factory=list)
    # The mask is built from no input (a relative position bias, or an all-true mask that
    # transformers >= 5.17 builds from arange); check_masks clears the all-true kind.
    constant_mask: bool = False
    dropped_mask: Optional[Node] = None  # such an all-allowing mask, cleared by check_masks
    # packed sites: the call's in-projection weight and bias and head count
    in_proj: tuple = ()
    # joint attention (SD3, Flux): q, k and v concatenate the tokens of several sequences,
    # each with its own residual stream; one part per sequence, in the order of the concatenation
    joint: list["JointPart"] = field(default_factory=list)

    @property
    def mergeable(self) -> bool:
        return not self.problems


@dataclass
class JointPart:
    """One sequence of a joint attention: its tokens' place in the concatenated sequence and
    the residual stream (and closing add) that its share of the output returns to."""

    start: int
    count: int
    residual: Optional[Node] = None  # None: the sequence's share of the output is not added back
    closing_add: Optional[Node] = None
    stream_out: Optional[Node] = None


def find_attention_sites(gm: GraphModule) -> list[AttentionSite]:
    """All attention sites of ``gm`` in graph order (see the module docstring)."""
    sites: list[AttentionSite] = []
    for node in gm.graph.nodes:
        site = site_at(node, len(sites))
        if site is not None:
            sites.append(site)
    return sites


def site_at(node: Node, index: int) -> Optional[AttentionSite]:
    """The attention site whose call is ``node`` (numbered ``index``), or None."""
    site = None
    if gu.is_sdpa(node):
        site = _sdpa_site(node)
    elif gu.is_packed_attention(node):
        site = _packed_site(node)
    elif gu.is_softmax(node):
        site = _explicit_site(node)
    if site is not None:
        site.index = index
        site.module = gu.module_path(node)
        _find_residual(site)
        _check_site(site)
    return site


def _sdpa_site(node: Node) -> AttentionSite:
    scale = gu.sdpa_arg(node, "scale")
    site = AttentionSite(
        index=-1,
        kind="sdpa",
        attn=node,
        q=gu.sdpa_arg(node, "query"),
        k=gu.sdpa_arg(node, "key"),
        k_token_axis=-2,
        mask=gu.sdpa_arg(node, "attn_mask"),
        scale=float(scale) if isinstance(scale, (int, float)) else None,
    )
    if gu.sdpa_arg(node, "is_causal", False):
        site.problems.append("causal attention (merging would let tokens see the future)")
    if gu.sdpa_arg(node, "enable_gqa", False):
        site.problems.append("grouped-query attention")
    if scale is not None and not isinstance(scale, (int, float)):
        site.problems.append("attention scale is a tensor")
    return site


def _packed_site(node: Node) -> AttentionSite:
    """``F.multi_head_attention_forward(query, key, value, ...)`` with [N, B, C] tokens."""
    args = gu.packed_attention_args(node)
    site = AttentionSite(
        index=-1,
        kind="packed",
        attn=node,
        q=args["query"],
        k=args["key"],
        k_token_axis=0,
        mask=args["attn_mask"],
        in_proj=(args["in_proj_weight"], args["in_proj_bias"], args["num_heads"]),
    )
    if args["is_causal"]:
        site.problems.append("causal attention (merging would let tokens see the future)")
    if args["use_separate_proj_weight"] or args["in_proj_weight"] is None:
        site.problems.append("separate q/k/v projection weights (only the packed in-projection is supported)")
    if args["bias_k"] is not None or args["add_zero_attn"]:
        site.problems.append("extra key/value bias or zero attention (bias_k, add_zero_attn)")
    if args["key_padding_mask"] is not None or args["attn_mask"] is not None:
        site.problems.append("nn.MultiheadAttention with a key_padding_mask or attn_mask is not supported yet")
    if args["static_k"] is not None or args["static_v"] is not None:
        site.problems.append("static keys or values")
    if not isinstance(args["num_heads"], int):
        site.problems.append("the head count is not a constant")
    return site


def _explicit_site(softmax: Node) -> Optional[AttentionSite]:
    found = _walk_back_to_matmul(softmax.args[0] if softmax.args else None, depth=8)
    if found is None:
        return None
    score_matmul, mask_add, mask = found
    value_matmul = _walk_forward_to_matmul(softmax, depth=6)
    if value_matmul is None:
        return None
    q, k_t = score_matmul.args[0], score_matmul.args[1]
    if not isinstance(q, Node) or not isinstance(k_t, Node):
        return None
    if gu.is_call(k_t, gu.TRANSPOSE_FUNCTIONS, gu.TRANSPOSE_METHODS) and _swaps_last_two(k_t):
        k, axis = k_t.args[0], -2
    else:
        k, axis = k_t, -1
    return AttentionSite(
        index=-1,
        kind="explicit",
        attn=value_matmul,
        q=q,
        k=k,
        k_token_axis=axis,
        mask=mask,
        softmax=softmax,
        logits=softmax.args[0],
        mask_add=mask_add,
    )


def _swaps_last_two(node: Node) -> bool:
    if node.target == "mT":
        return True
    dims = [a for a in node.args[1:3]]
    shape = gu.tensor_shape(node.args[0])
    if shape is None or len(dims) != 2 or not all(isinstance(d, int) for d in dims):
        return False
    rank = len(shape)
    return sorted(d % rank for d in dims) == [rank - 2, rank - 1]


# Talking-heads attention (CaiT) mixes heads with a linear layer over the head axis, moved
# last and back, just before and after the softmax. It mixes per (query, key) pair, so
# a key's bias still adds before the softmax and the sites stay exact for duplicates.
HEADS_LAST, HEADS_BACK = (0, 2, 3, 1), (0, 3, 1, 2)


def _permute_dims(node: Node) -> Optional[tuple]:
    if node.op == "call_method" and node.target == "permute":
        dims = node.args[1:]
    elif node.op == "call_function" and node.target is torch.permute:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dims")
    else:
        return None
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = dims[0]
    return tuple(dims) if all(isinstance(d, int) for d in dims) else None


def _head_mix_input(node: Node) -> Optional[Node]:
    """For ``permute(linear(permute(x, 0,2,3,1)), 0,3,1,2)``, x; else None."""
    if not isinstance(node, Node) or _permute_dims(node) != HEADS_BACK:
        return None
    linear = node.args[0]
    if not (isinstance(linear, Node) and gu.is_call(linear, {torch.nn.functional.linear})):
        return None
    inner = linear.args[0]
    if isinstance(inner, Node) and _permute_dims(inner) == HEADS_LAST and isinstance(inner.args[0], Node):
        return inner.args[0]
    return None


def _head_mix_after(node: Node) -> Optional[Node]:
    """The closing permute of a head mix that starts at ``node``'s only user, if any."""
    users = list(node.users)
    if len(users) != 1 or _permute_dims(users[0]) != HEADS_LAST or len(users[0].users) != 1:
        return None
    linear = next(iter(users[0].users))
    if len(linear.users) != 1:
        return None
    closing = next(iter(linear.users))
    return closing if _head_mix_input(closing) is node else None


def _walk_back_to_matmul(node, depth: int):
    """From softmax's input back to the q @ k^T matmul; returns (matmul, mask_add, mask)."""
    mask_add = mask = None
    while isinstance(node, Node) and depth > 0:
        depth -= 1
        mixed = _head_mix_input(node)
        if mixed is not None:
            node = mixed
            continue
        if gu.is_matmul(node):
            return node, mask_add, mask
        if gu.is_add(node) and mask_add is None:
            left, right = node.args[0], node.args[1]
            if isinstance(left, Node) and _reaches_matmul(left, 6):
                mask_add, mask, node = node, right, left
            elif isinstance(right, Node) and _reaches_matmul(right, 6):
                mask_add, mask, node = node, left, right
            else:
                return None
            continue
        if gu.is_passthrough(node):
            node = next((a for a in node.args if isinstance(a, Node)), None)
            continue
        return None
    return None


def _reaches_matmul(node: Node, depth: int) -> bool:
    while isinstance(node, Node) and depth > 0:
        if gu.is_matmul(node):
            return True
        if not gu.is_passthrough(node):
            return False
        node = next((a for a in node.args if isinstance(a, Node)), None)
        depth -= 1
    return False


def _walk_forward_to_matmul(node: Node, depth: int) -> Optional[Node]:
    while depth > 0:
        depth -= 1
        mixed = _head_mix_after(node)
        if mixed is not None:
            node = mixed
            continue
        users = list(node.users)
        if len(users) != 1:
            return None
        user = users[0]
        if gu.is_matmul(user):
            return user if user.args[0] is node else None
        if not gu.is_passthrough(user):
            return None
        node = user
    return None


def _find_residual(site: AttentionSite, max_visits: int = 200) -> None:
    """The add that closes the attention sub-block: the nearest add downstream of the
    attention whose other operand is the stream that fed q (an ancestor of q that
    does not depend on the attention). For joint attention, one such add per sequence whose
    tokens the queries concatenate (``AttentionSite.joint``)."""
    q_ancestors = gu.ancestors(site.q) | {site.q}
    pieces, counts = _query_pieces(site.q)
    lineage = [gu.ancestors(p) | {p} for p in pieces]
    parts: dict[int, JointPart] = {}
    queue, seen = deque([site.attn]), {site.attn}
    downstream = {site.attn}
    visits = 0
    while queue and visits < max_visits:
        node = queue.popleft()
        visits += 1
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            downstream.add(user)
            if gu.is_add(user) and len(user.args) >= 2:
                left, right = user.args[0], user.args[1]
                for mine, other in ((left, right), (right, left)):
                    if mine in downstream and isinstance(other, Node) and other in q_ancestors:
                        if site.closing_add is None:
                            site.closing_add, site.residual = user, other
                            site.stream_out = _post_norm(user)
                        owners = [i for i, above in enumerate(lineage) if other in above]
                        if len(owners) == 1 and owners[0] not in parts:
                            start = sum(counts[:owners[0]])
                            parts[owners[0]] = JointPart(start, counts[owners[0]], other, user, _post_norm(user))
                        break
            if site.closing_add is not None and (not pieces or len(parts) == len(pieces)):
                break
            queue.append(user)
        if site.closing_add is not None and (not pieces or len(parts) == len(pieces)):
            break
    if pieces and parts:
        site.joint = [parts.get(i, JointPart(sum(counts[:i]), counts[i])) for i in range(len(pieces))]


def _query_pieces(q: Node, depth: int = 12) -> tuple[list[Node], list[int]]:
    """The pieces of a concatenation along the token axis that the queries come from, and
    their token counts, within a few steps that keep their elements (a transpose to
    [B, H, N, D], Flux's rotation of the concatenated queries); ([], []) if there is none."""
    n_tokens, numel = _token_count(q), _numel(q)
    queue, seen = deque([(q, 0)]), {q}
    while queue:
        node, steps = queue.popleft()
        pieces = _cat_pieces(node, n_tokens)
        if pieces and _numel(node) == numel:
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0) % 4
            return pieces, [gu.tensor_shape(p)[dim] for p in pieces]
        if steps < depth:
            for parent in node.all_input_nodes:
                if parent not in seen and _numel(parent) == numel:
                    seen.add(parent)
                    queue.append((parent, steps + 1))
    return [], []


def _cat_pieces(node: Node, n_tokens: int) -> list[Node]:
    """The pieces of ``node`` if it concatenates two or more tensors along an axis of
    ``n_tokens`` ([B, N, H, D] on axis 1, [B, H, N, D] on axis 2)."""
    if node.op != "call_function" or node.target not in gu.CAT_FUNCTIONS or not isinstance(node.args[0], (list, tuple)):
        return []
    shape = gu.tensor_shape(node)
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    if shape is None or len(shape) != 4 or not isinstance(dim, int) or shape[dim % 4] != n_tokens or dim % 4 not in (1, 2):
        return []
    pieces = list(node.args[0])
    if len(pieces) < 2 or not all(isinstance(p, Node) and len(gu.tensor_shape(p) or ()) == 4 for p in pieces):
        return []
    return pieces


def _numel(node: Node) -> int:
    shape = gu.tensor_shape(node)
    if shape is None or not all(isinstance(d, int) for d in shape):
        return -1
    count = 1
    for d in shape:
        count *= d
    return count


def _token_count(node: Node) -> int:
    shape = gu.tensor_shape(node)
    return shape[2] if shape is not None and len(shape) == 4 and isinstance(shape[2], int) else 0


def _post_norm(add: Node) -> Node:
    users = list(add.users)
    if len(users) == 1 and gu.is_layer_norm(users[0]) and users[0].args[0] is add:
        return users[0]
    return add


# No Dynamo setting is named: for Qwen2-VL's tower (attention split per image by a
# ``lengths.tolist()``), capturing scalar outputs makes Dynamo raise instead of breaking.
GRAPH_BREAK_HINT = "torch._dynamo.explain(model)(*inputs) lists the breaks and their causes"


def _check_site(site: AttentionSite) -> None:
    if site.closing_add is None:
        site.problems.append(_unclosed_reason(site))
        return
    if site.residual is not site.k and site.residual not in gu.ancestors(site.k):
        # Shape checks below compare against the site's own sequence; they mean nothing here.
        site.problems.append(CROSS_ATTENTION_PROBLEM)
        return
    q_shape, k_shape = gu.tensor_shape(site.q), gu.tensor_shape(site.k)
    stream_shape = gu.tensor_shape(site.stream_out)
    if q_shape is None or k_shape is None or stream_shape is None:
        site.problems.append("missing shape information")
        return
    if site.kind == "packed":
        _check_packed_shapes(site, q_shape, k_shape, stream_shape)
        return
    if len(q_shape) != 4 or len(k_shape) != 4:
        site.problems.append(f"attention is not [batch, heads, tokens, dim] (q {q_shape})")
        return
    if q_shape[1] != k_shape[1]:
        site.problems.append("grouped-query attention (q and k head counts differ)")
    n_keys = k_shape[site.k_token_axis]
    if _dynamic_tokens(site, stream_shape):
        return
    if site.joint:
        for part in (p for p in site.joint if p.residual is not None):
            shape = gu.tensor_shape(part.residual)
            if shape is None or len(shape) != 3 or shape[1] != part.count:
                site.problems.append(f"joint attention: residual stream {shape} does not hold the {part.count} "
                                     f"tokens its sequence puts into the attention")
    elif len(stream_shape) != 3 or not isinstance(stream_shape[1], int) or stream_shape[1] != n_keys:
        site.problems.append(
            f"residual stream {stream_shape} is not [batch, tokens, channels] with {n_keys} tokens"
        )
    if q_shape[2] != n_keys:
        site.problems.append("query and key token counts differ")
    if isinstance(site.mask, Node) and not gu.depends_on_data(site.mask):
        site.constant_mask = True
        site.problems.append(CONSTANT_BIAS_PROBLEM)
    elif site.mask is not None and not isinstance(site.mask, Node):
        site.problems.append("attention mask is a constant")


def _unclosed_reason(site: AttentionSite) -> str:
    """Why no residual add closes the site, naming a graph break where the graph's edges cut
    the sub-block: its queries are an input of this graph, or its output is returned from it
    before any add."""
    if _is_graph_input(site.q):
        return ("no residual add closes the attention sub-block: its queries are an input of this graph, so "
                f"Dynamo split the model inside the sub-block (a graph break; {GRAPH_BREAK_HINT})")
    reaches_output = any(u.op == "output" for n in gu.descendants(site.attn) | {site.attn} for u in n.users)
    adds_after = any(gu.is_add(n) for n in gu.descendants(site.attn))
    if reaches_output and not adds_after:
        return ("no residual add closes the attention sub-block: its output leaves this graph before any add, so "
                f"Dynamo split the model inside the sub-block (a graph break; {GRAPH_BREAK_HINT})")
    return "no residual add closes the attention sub-block"


def _is_graph_input(node: Node, depth: int = 6) -> bool:
    """``node`` is a graph input, or a view of one (transpose, reshape, contiguous, a cast)."""
    while depth > 0 and isinstance(node, Node):
        if node.op == "placeholder":
            return True
        if len(node.all_input_nodes) != 1 or not (gu.is_passthrough(node) or node.target in VIEW_METHODS):
            return False
        node, depth = node.all_input_nodes[0], depth - 1
    return False


VIEW_METHODS = {"transpose", "reshape", "view", "permute", "contiguous", "unsqueeze", "squeeze", "flatten"}


def _check_packed_shapes(site: AttentionSite, q_shape: tuple, k_shape: tuple, stream_shape: tuple) -> None:
    """Packed attention sees [N, B, C] tokens; the stream must be [B, N, C] (``batch_first``)."""
    if len(q_shape) != 3 or len(k_shape) != 3:
        site.problems.append(f"packed attention input is not [tokens, batch, channels] (query {q_shape})")
        return
    if _dynamic_tokens(site, stream_shape):
        return
    n_keys = k_shape[0]
    if len(stream_shape) != 3 or stream_shape[1] != n_keys or stream_shape[0] != q_shape[1]:
        site.problems.append(
            f"residual stream {stream_shape} is not [batch, tokens, channels] with {n_keys} tokens "
            "(a sequence-first model: nn.MultiheadAttention without batch_first)"
        )
    if q_shape[0] != n_keys:
        site.problems.append("query and key token counts differ")


def _dynamic_tokens(site: AttentionSite, stream_shape: tuple) -> bool:
    if len(stream_shape) == 3 and isinstance(stream_shape[1], torch.SymInt):
        site.problems.append(
            f"the token count is dynamic ({stream_shape[1]}): Dynamo made the sequence length symbolic after "
            "calls with different lengths, and a merge plan needs a fixed count; compile with "
            "torch.compile(..., dynamic=False) (one graph per length) or pad inputs to fixed lengths"
        )
        return True
    return False
