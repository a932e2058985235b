"""Pass: find the components of generation blocks, whose tokens return to a spatial grid.

Matches residual *components* on a [batch, tokens, channels] stream: an add ``s + f(s)``
whose other operand ``f(s)`` derives from ``s``. An attention site's closing add is a
self-attention component (its keys derive from the stream) or a cross-attention one (keys
from another sequence, such as text states); any other such add that follows on the same
stream, with no attention inside, is a feed-forward component. Components that follow each
other on one stream form a *run*; a run is a generation run when, within a few per-token
steps after its last component, the token axis is split back into a ``height`` x ``width``
grid (diffusers' Transformer2DModel reshapes [B, H*W, C] to [B, H, W, C]; DiT unpatchifies
[B, h*w, p*p*C] to [B, h, w, p, p, C]). Every token of such a run is needed again, so it
cannot keep a shorter sequence: it merges before each component and restores after it.

A joint attention (SD3, Flux: the queries, keys and values concatenate the image tokens
with the text tokens) closes one residual add per sequence; each can be a component of its
own sequence's run. The image sequence's one is a self-attention component (its keys derive
from the stream); the text tokens stay whole inside it.

Blocks: within a run, a new block starts at each self-attention component; the components
that follow it (cross-attention, feed-forward) belong to its block and share its merge plan.

*Local* components (``find_local_runs``) serve graphs that neither merge mode nor the grid
runs above can take: an attention sub-block whose tokens are regrouped before and after it,
so that no residual add closes it on the sequence it attends over (TimeSformer's divided
space-time attention regroups the video's tokens by frame for the spatial attention and by
place for the temporal one; window attention regroups by window). The component runs from
the sequence its query, key and value projections read (before a LayerNorm, and before a
token ``cat`` that puts tokens of other origin, such as a per-frame class token, around it:
those are its protected ``lead`` and ``trail`` tokens) to the output projection's result on
the same tokens. Its grid is the (height, width) that a reshape before it split the tokens
into, or one row of tokens when none did. Each is a run of its own.

Guarantees: the graph is not modified. Only runs that end in a grid are returned, with the
grid, the token count and each component's module path.
"""
from __future__ import annotations

import math
import operator
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from . import graph_utils as gu
from .find_attention import AttentionSite

SELF_ATTENTION = "self-attention"
CROSS_ATTENTION = "cross-attention"
FEED_FORWARD = "feed-forward"
COMPONENT_KINDS = (SELF_ATTENTION, CROSS_ATTENTION, FEED_FORWARD)

_GRID_SEARCH_NODES = 12


@dataclass
class Component:
    index: int
    kind: str
    stream_in: Node  # the [B, N, C] stream entering the component
    closing_add: Optional[Node]  # stream_in + branch; None for a local component (every reader is restored)
    branch_out: Node  # the operand of closing_add that the component computed
    stream_out: Node  # the stream leaving it (closing_add, or the LayerNorm after it)
    module: str
    site: Optional[AttentionSite] = None
    run: int = -1
    block: int = -1
    tokens: int = 0
    grid: tuple[int, int] = (0, 0)
    problems: list[str] = field(default_factory=list)
    # Tokens of other sequences around the merged ones, which stay whole: in a local component,
    # those a ``cat`` inside it adds (a frame's class token); in a closed one, those its stream
    # holds around the merged slice (Flux's text in the single-stream blocks).
    lead: int = 0
    trail: int = 0


@dataclass
class GridRun:
    index: int
    components: list[Component]
    grid: tuple[int, int]

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]


def find_grid_runs(gm: GraphModule, sites: list[AttentionSite]) -> list[GridRun]:
    """The generation runs of ``gm`` in graph order (see the module docstring)."""
    by_add = {add: s for s in sites for add, _ in _closings(s)}
    runs: list[GridRun] = []
    claimed: set[Node] = set()
    for site, (add, residual) in ((s, c) for s in sites for c in _closings(s)):
        if add in claimed or not _is_token_stream(residual):
            continue
        components = _follow_run(residual, by_add)
        claimed.update(c.closing_add for c in components)
        if not components:
            continue
        grid = _grid_after(components[-1].stream_out)
        if grid is None:
            continue
        run = GridRun(len(runs), components, grid)
        _number(run, start=sum(len(r.components) for r in runs))
        runs.append(run)
    return runs


def _closings(site: AttentionSite) -> list[tuple[Node, Node]]:
    """(closing add, residual stream) of each sequence the site's output returns to: one, or
    one per sequence of a joint attention."""
    if site.joint:
        return [(part.closing_add, part.residual) for part in site.joint if part.closing_add is not None]
    return [(site.closing_add, site.residual)] if site.closing_add is not None else []


def _is_token_stream(node) -> bool:
    shape = gu.tensor_shape(node)
    return shape is not None and len(shape) == 3 and all(isinstance(d, int) for d in shape)


def _follow_run(start: Node, by_add: dict[Node, AttentionSite]) -> list[Component]:
    """Components chained on one stream from ``start``: each one's output is the next one's input."""
    components: list[Component] = []
    stream = start
    while True:
        found = _closing_add(stream)
        if found is None:
            return components
        add, branch = found
        site = by_add.get(add)
        if site is not None:
            kind = SELF_ATTENTION if _keys_from(site, stream) else CROSS_ATTENTION
            module = site.module
        else:
            if _contains_attention(branch, stream, by_add):
                return components
            kind, module = FEED_FORWARD, gu.module_path(branch)
        out = _post_norm(add)
        components.append(Component(len(components), kind, stream, add, branch, out, module, site))
        stream = out


def _keys_from(site: AttentionSite, stream: Node) -> bool:
    return site.k is stream or stream in gu.ancestors(site.k)


def _closing_add(stream: Node, max_visits: int = 400) -> Optional[tuple[Node, Node]]:
    """The first add (in graph order) of ``stream`` and something computed from it."""
    downstream = _descendants(stream, max_visits)
    candidates = []
    for user in stream.users:
        if gu.is_add(user) and len(user.args) >= 2:
            left, right = user.args[0], user.args[1]
            other = right if left is stream else left
            if isinstance(other, Node) and other is not stream and other in downstream:
                candidates.append((user, other))
    if not candidates:
        return None
    order = {n: i for i, n in enumerate(stream.graph.nodes)}
    return min(candidates, key=lambda pair: order[pair[0]])


def _descendants(node: Node, limit: int) -> set[Node]:
    seen, queue = {node}, deque([node])
    while queue and len(seen) < limit:
        for user in queue.popleft().users:
            if user not in seen:
                seen.add(user)
                queue.append(user)
    return seen


def _contains_attention(branch: Node, stream: Node, by_add: dict[Node, AttentionSite]) -> bool:
    inside = gu.ancestors(branch, stop=lambda n: n is stream) | {branch}
    return any(s.attn in inside for s in by_add.values())


def _post_norm(add: Node) -> Node:
    users = list(add.users)
    if len(users) == 1 and gu.is_layer_norm(users[0]) and users[0].args[0] is add:
        return users[0]
    return add


def _grid_after(stream: Node) -> Optional[tuple[int, int]]:
    """(height, width) when, within a few nodes after ``stream``, a node turns a [B, N, ...]
    tensor into [B, height, width, ...] with height * width == N."""
    shape = gu.tensor_shape(stream)
    if shape is None:
        return None
    batch, n = shape[0], shape[1]
    seen, queue = {stream}, deque([stream])
    while queue and len(seen) < _GRID_SEARCH_NODES:
        node = queue.popleft()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            before, after = gu.tensor_shape(node), gu.tensor_shape(user)
            if (before is not None and after is not None and len(before) >= 2 and before[:2] == (batch, n)
                    and len(after) >= 4 and after[0] == batch and after[1] * after[2] == n and after[1] > 1):
                return int(after[1]), int(after[2])
            queue.append(user)
    return None


def _number(run: GridRun, start: int) -> None:
    block = -1
    for i, component in enumerate(run.components):
        if component.kind == SELF_ATTENTION or block < 0:
            block += 1
        component.index, component.run, component.block = start + i, run.index, block
        component.tokens, component.grid = run.tokens, run.grid


_VIEW_METHODS = {"view", "reshape", "permute", "transpose", "contiguous", "flatten", "unflatten"}
_PER_TOKEN_STEPS = 8
# The site problems that only say the sub-block is not closed on a [B, N, C] stream: the
# structure a local component is for. Any other problem (causal, cross-attention, a bias)
# rules the site out.
_LOCAL_PROBLEMS = ("no residual add closes the attention sub-block", "residual stream ",
                   "joint attention: residual stream ")  # nodes between a projection and the attention (head split, rotation)


def find_local_runs(gm: GraphModule, sites: list[AttentionSite], start: int = 0) -> list[GridRun]:
    """The runs that merge and restore where neither merge mode nor a grid run takes the graph
    (see the module docstring), in graph order: for a joint attention, the run of its largest
    sequence (attention and feed-forward components on that stream, block after block); for a
    stream that concatenates sequences (Flux's single-stream blocks), the run of its residual
    components, each merging only its largest piece; for any other site, its local component.
    Sites whose structure is none of these are left out."""
    by_add = {add: s for s in sites for add, _ in _closings(s)}
    runs: list[GridRun] = []
    claimed: set[int] = set()
    for site in sites:
        if site.index in claimed or not _local_site(site):
            continue
        components = _fallback_components(site, by_add)
        if not components:
            continue
        claimed.update(c.site.index for c in components if c.site is not None)
        run = GridRun(start + len(runs), components, components[0].grid)
        _number(run, start=sum(len(r.components) for r in runs))
        runs.append(run)
    return runs


def _local_site(site: AttentionSite) -> bool:
    return (site.kind in ("sdpa", "explicit") and site.mask is None
            and all(p.startswith(_LOCAL_PROBLEMS) for p in site.problems))  # not causal, cross, biased...


def _fallback_components(site: AttentionSite, by_add: dict[Node, AttentionSite]) -> list[Component]:
    if site.joint:
        return _joint_run(site, by_add)
    if site.closing_add is not None and _is_token_stream(site.residual):
        layout = _concatenated_layout(site.residual)
        if layout is not None:
            return _concatenated_run(site.residual, layout, by_add)
    component = local_component(site)
    return [component] if component is not None else []


def _joint_run(site: AttentionSite, by_add: dict[Node, AttentionSite]) -> list[Component]:
    """The run on a joint attention's largest sequence (the image tokens of an MMDiT), from its
    residual stream: the attention closed by that stream's own add, and the components that
    follow on the stream; the other sequences stay whole. Its grid is one row unless a reshape
    above the stream names one."""
    largest = max(site.joint, key=lambda p: p.count)
    if largest.closing_add is None or not _is_token_stream(largest.residual):
        return []
    if gu.tensor_shape(largest.residual)[1] != largest.count or sum(p.count == largest.count for p in site.joint) > 1:
        return []  # two sequences of one size: nothing says which holds the image
    components = _follow_run(largest.residual, by_add)
    if not components or components[0].closing_add is not largest.closing_add:
        return []
    grid = _grid_before(largest.residual) or (1, largest.count)
    for component in components:
        component.grid = grid
    return components


def _concatenated_layout(stream: Node, depth: int = 64) -> Optional[tuple[int, int, int]]:
    """(lead, merged, trail): where ``stream`` [B, N, C] comes, through residual adds, from a
    token ``cat`` of sequences, the tokens before its largest piece, that piece's and those after."""
    node = stream
    while depth > 0:
        depth -= 1
        if gu.is_token_cat(node):
            counts = [gu.tensor_shape(p)[1] for p in node.args[0]]
            largest = max(range(len(counts)), key=lambda i: counts[i])
            if sum(c == counts[largest] for c in counts) > 1:
                return None
            return sum(counts[:largest]), counts[largest], sum(counts[largest + 1:])
        if not gu.is_add(node) or len(node.args) < 2:
            return None
        left, right = node.args[0], node.args[1]
        if isinstance(right, Node) and isinstance(left, Node) and left in gu.ancestors(right):
            node = left
        elif isinstance(right, Node) and isinstance(left, Node) and right in gu.ancestors(left):
            node = right
        else:
            return None
    return None


def _concatenated_run(stream: Node, layout: tuple[int, int, int], by_add: dict[Node, AttentionSite]) -> list[Component]:
    lead, merged, trail = layout
    components = _follow_run(stream, by_add)
    for component in components:
        component.lead, component.trail, component.grid = lead, trail, (1, merged)
    return components


def local_component(site: AttentionSite) -> Optional[Component]:
    """The local component of ``site``, or None where its structure is not the one described."""
    if not _local_site(site) or site.joint:
        return None
    q_shape, k_shape = gu.tensor_shape(site.q), gu.tensor_shape(site.k)
    if q_shape is None or k_shape is None or len(q_shape) != 4 or q_shape[1] != k_shape[1]:
        return None
    n_tokens = q_shape[2]
    sequence = _projection_input(site.q, n_tokens)
    if sequence is None or _projection_input(site.k, n_tokens) is not sequence:
        return None
    batch = gu.tensor_shape(sequence)[0]
    output = _projection_output(site.attn, batch, n_tokens)
    if output is None:
        return None
    stream, lead, trail = _merged_piece(sequence)
    tokens = gu.tensor_shape(stream)[1]
    if tokens < 2:
        return None
    component = Component(-1, SELF_ATTENTION, stream, None, output, output, site.module, site, lead=lead, trail=trail)
    component.grid = _grid_before(stream) or (1, tokens)
    return component


def _is_linear(node: Node) -> bool:
    return node.op == "call_function" and node.target is F.linear or (
        node.op == "call_module" and isinstance(node.graph.owning_module.get_submodule(node.target), torch.nn.Linear))


def _projection_input(node: Node, n_tokens: int) -> Optional[Node]:
    """The [B, N, C] input of the nearest linear projection above ``node`` (queries or keys),
    with N its token count."""
    queue, seen = deque([(node, 0)]), {node}
    while queue:
        current, steps = queue.popleft()
        if _is_linear(current):
            source = current.args[0]
            shape = gu.tensor_shape(source)
            if isinstance(source, Node) and shape is not None and len(shape) == 3 and shape[1] == n_tokens:
                return source
            return None
        if steps < _PER_TOKEN_STEPS:
            for parent in current.all_input_nodes:
                if parent not in seen:
                    seen.add(parent)
                    queue.append((parent, steps + 1))
    return None


def _projection_output(attn: Node, batch: int, n_tokens: int) -> Optional[Node]:
    """The last [B, N, C] node of the chain after the attention call that only regroups heads,
    projects and drops out (each node the only reader of the one before): the output
    projection's result, or the regrouped heads where the model has none of its own (Flux's
    single-stream blocks project attention and feed-forward together)."""
    node, found = attn, None
    for _ in range(_PER_TOKEN_STEPS):
        users = list(node.users)
        if len(users) != 1:
            break
        user = users[0]
        if not (_is_linear(user) or user.target in _VIEW_METHODS or user.target is F.dropout or gu.is_passthrough(user)
                or user.target in (torch.transpose, torch.reshape, torch.flatten, torch.permute)):
            break
        shape = gu.tensor_shape(user)
        if shape is not None and len(shape) == 3 and shape[:2] == (batch, n_tokens):
            found = user
        node = user
    return found


def _merged_piece(sequence: Node) -> tuple[Node, int, int]:
    """(the tokens that merge, tokens before them, tokens after them): ``sequence`` itself, or
    above a LayerNorm and a token ``cat``, the concatenation's largest piece, the other pieces
    staying whole."""
    node = sequence
    while True:
        if gu.is_layer_norm(node) or node.target is F.dropout:
            node = node.args[0]
            continue
        tokens = _modulated_tokens(node)
        if tokens is None:
            break
        node = tokens
    if not gu.is_token_cat(node):
        return node, 0, 0
    pieces = list(node.args[0])
    counts = [gu.tensor_shape(p)[1] for p in pieces]
    largest = max(range(len(pieces)), key=lambda i: counts[i])
    return pieces[largest], sum(counts[:largest]), sum(counts[largest + 1:])


def _modulated_tokens(node: Node) -> Optional[Node]:
    """The token operand of a per-sample modulation ``x * scale`` or ``x + shift`` (AdaLN), whose
    other operand has one row for all tokens ([B, 1, C] or [C]); None for anything else."""
    if not (gu.is_add(node) or node.target in (operator.mul, torch.mul, "mul")) or len(node.args) != 2:
        return None
    shape = gu.tensor_shape(node)
    if shape is None or len(shape) != 3:
        return None
    tokens = [a for a in node.args if isinstance(a, Node) and gu.tensor_shape(a) == shape]
    others = [a for a in node.args if a not in tokens]
    if len(tokens) != 1 or len(others) != 1:
        return None
    other = gu.tensor_shape(others[0]) if isinstance(others[0], Node) else ()
    if other is None or (len(other) >= 2 and other[-2] != 1):
        return None
    return tokens[0]


def _grid_before(stream: Node, depth: int = 6) -> Optional[tuple[int, int]]:
    """(height, width) when a few regrouping steps above ``stream`` [B, N, C] a tensor held its
    tokens as two adjacent axes height x width, both above 1, with the axes before them
    holding B and those after them C."""
    shape = gu.tensor_shape(stream)
    batch, n, channels = shape
    node = stream
    for _ in range(depth):
        if not (node.target in _VIEW_METHODS or node.target in (torch.reshape, torch.flatten, torch.permute)):
            return None
        node = node.args[0]
        if not isinstance(node, Node):
            return None
        dims = gu.tensor_shape(node)
        if dims is None:
            return None
        for a in range(len(dims) - 2):
            if (dims[a] * dims[a + 1] == n and dims[a] > 1 and dims[a + 1] > 1 and dims[-1] == channels
                    and math.prod(dims[:a]) == batch and math.prod(dims[a + 2:-1]) == 1):
                return int(dims[a]), int(dims[a + 1])
    return None
