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

Guarantees: the graph is not modified. Only runs that end in a grid are returned, with the
grid, the token count and each component's module path.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Optional

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
    closing_add: Node  # stream_in + branch
    branch_out: Node  # the operand of closing_add that the component computed
    stream_out: Node  # the stream leaving it (closing_add, or the LayerNorm after it)
    module: str
    site: Optional[AttentionSite] = None
    run: int = -1
    block: int = -1
    tokens: int = 0
    grid: tuple[int, int] = (0, 0)
    problems: list[str] = field(default_factory=list)


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
