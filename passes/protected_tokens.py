"""Pass: count the protected tokens (CLS, distillation, registers) in front of a sequence.

Matches the ``cat`` along the token axis that builds the sequence entering the
first attention block (``cat([cls.expand(B,-1,-1), dist.expand(..), patches], 1)``
in timm, ``cat((cls_tokens, embeddings), 1)`` in transformers). Leading pieces
that do not derive from the user's input are protected, as is a leading slice
``x[:, :k]`` of an already-protected prefix (register tokens inserted after CLS).

Guarantees: the graph is not modified. When no such ``cat`` exists the sequence's
origin decides: tokens looked up in an embedding table (text, whose [CLS] comes from
the tokenizer) protect the first token; tokens that come only from a convolution over
the input (patch embeddings with no class token: SigLIP, MAP-pooled and CaiT-style
ViTs) protect none and have no class token (``has_class_token`` is False), so no row
of their attention can give a semantic value. The returned note says which.
"""
from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from . import graph_utils as gu



CONV_FUNCTIONS = {torch.conv1d, torch.conv2d, torch.conv3d, torch.nn.functional.conv1d,
                  torch.nn.functional.conv2d, torch.nn.functional.conv3d, torch.convolution}
EMBEDDING_FUNCTIONS = {torch.nn.functional.embedding, torch.embedding}
NO_CLASS_TOKEN_NOTE = "none: the sequence holds only patch tokens (a convolution's output, no class token)"


def count_protected_tokens(gm: GraphModule, stream: Node) -> tuple[int, str]:
    """(count, how it was found) for the sequence ``stream`` [B, N, C]."""
    shape = gu.tensor_shape(stream)
    if shape is None or len(shape) != 3:
        return 1, "first token (sequence shape unknown)"
    count = _prefix_count(stream, shape[1], depth=12)
    if count is not None:
        return count, f"{count} prepended parameter token(s)"
    if not has_class_token(stream):
        return 0, NO_CLASS_TOKEN_NOTE
    return 1, "first token (no prepended parameter tokens found)"


def count_trailing_tokens(stream: Node) -> int:
    """Parameter tokens appended after the data tokens by the same ``cat`` (YOLOS's
    detection tokens): they never merge either."""
    shape = gu.tensor_shape(stream)
    if shape is None or len(shape) != 3:
        return 0
    cat = _find_token_cat(stream, shape[1], depth=12)
    if cat is None:
        return 0
    total = 0
    for piece in reversed(list(cat.args[0])[1:]):
        width = _token_width(piece)
        if width is None or gu.depends_on_data(piece):
            break
        total += width
    return total


def _find_token_cat(node: Node, n_tokens: int, depth: int):
    while isinstance(node, Node) and depth > 0:
        depth -= 1
        if gu.is_token_cat(node):
            return node
        node = _token_carrying_input(node, n_tokens)
    return None


def has_class_token(stream: Node) -> bool:
    """False when the sequence is made of patch tokens only: no token ``cat`` builds it and
    its origin is a convolution, with no embedding lookup (whose first token a tokenizer
    fills with [CLS]) among its ancestors. Unknown origins count as having one."""
    shape = gu.tensor_shape(stream)
    if shape is not None and len(shape) == 3 and (_prefix_count(stream, shape[1], depth=12) or 0) > 0:
        return True
    upstream = gu.ancestors(stream)
    if any(_looks_up_input_ids(n) for n in upstream):
        return True
    return not any(gu.is_call(n, CONV_FUNCTIONS) for n in upstream)


def _looks_up_input_ids(node: Node) -> bool:
    """An embedding lookup whose indices come from the input (token ids), not from a buffer
    of positions (SigLIP's patch positions are an nn.Embedding too)."""
    if not gu.is_call(node, EMBEDDING_FUNCTIONS):
        return False
    indices = node.args[1] if node.target is torch.embedding else node.args[0]
    return isinstance(indices, Node) and gu.depends_on_data(indices)


def _prefix_count(node: Node, n_tokens: int, depth: int):
    while isinstance(node, Node) and depth > 0:
        depth -= 1
        if gu.is_token_cat(node):
            return _cat_prefix(node, n_tokens, depth)
        node = _token_carrying_input(node, n_tokens)
    return None


def _cat_prefix(cat: Node, n_tokens: int, depth: int) -> int:
    pieces = list(cat.args[0])
    total = 0
    for piece in pieces[:-1]:
        width = _token_width(piece)
        if width is None:
            break
        if not gu.depends_on_data(piece):
            total += width
            continue
        prefix = _leading_slice_of_prefix(piece, depth)
        if prefix is not None and prefix >= width:
            total += width
            continue
        break
    return total


def _leading_slice_of_prefix(piece: Node, depth: int):
    """For ``x[:, :k]``, the protected count of x when k fits inside it."""
    if piece.op != "call_function" or piece.target is not operator.getitem:
        return None
    source, index = piece.args
    if not (isinstance(index, tuple) and len(index) >= 2 and isinstance(index[1], slice)):
        return None
    sl = index[1]
    if sl.start not in (None, 0) or not isinstance(sl.stop, int) or sl.step not in (None, 1):
        return None
    shape = gu.tensor_shape(source)
    if shape is None or len(shape) != 3:
        return None
    inner = _prefix_count(source, shape[1], depth)
    return inner if inner is not None and sl.stop <= inner else None


def _token_width(piece) -> int | None:
    shape = gu.tensor_shape(piece)
    if shape is None or len(shape) != 3 or not isinstance(shape[1], int):
        return None
    return shape[1]


def _token_carrying_input(node: Node, n_tokens: int):
    """The one input that carries the data sequence with the same token count."""
    candidates = []
    for inp in node.all_input_nodes:
        shape = gu.tensor_shape(inp)
        if shape is not None and len(shape) == 3 and shape[1] == n_tokens and gu.depends_on_data(inp):
            candidates.append(inp)
    return candidates[0] if len(candidates) == 1 else None
