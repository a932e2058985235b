"""Pass (analysis): the merge schedule that meets a FLOP budget, solved from the graph itself.

``options={"flops": 0.6}`` asks for a merged graph that costs 60% of the unmerged one. Every
node's FLOPs are counted once, on the unmerged graph and its fake values (torch's FLOP
counter, completed by ``turbo_fx.flops``). A node costs in proportion to the tokens it sees:

* nothing, where no input or output holds the merged sequence's token count (the patch
  embedding's convolution, a head on the class token);
* linearly, where one axis holds it (projections, MLPs, norms);
* quadratically, where two do, or for an attention call (``q @ k^T``, ``probs @ v``, SDPA).
Neither the batch axis nor the feature axis counts as a token axis, except the last two axes
of a tokens x tokens score tile.

The merges cut the graph into segments: everything up to the first merge point (the end of
the first merging attention sub-block) sees all N0 tokens, everything between the i-th and
the (i+1)-th sees N_i. The merged graph's FLOPs are predicted as the sum over nodes of their
count times (N_i / N0)^p, plus each merge's own similarity matrix. A schedule of r per block
is then searched: ``schedule="constant"`` spreads a real-valued r over the blocks (one more
token in the first blocks where it does not divide evenly), ``"decreasing"`` lets r fall
linearly to a third of its first value, both clamped exactly as the merges clamp them
(``ops.merge_count``). The schedule whose predicted ratio is nearest to the budget wins; when
the budget is below what merging can reach, the largest merging is chosen and the report
says so.

Guarantees: the graph is not modified; the result holds the schedule, the predicted ratio
and, where the budget cannot be met, why.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch.fx import GraphModule, Node
from torch.utils.flop_counter import FlopCounterMode

from turbo_fx import flops as _flop_formulas  # noqa: F401  (formulas for CPU SDPA)
from turbo_fx import ops

from . import graph_utils as gu
from .find_attention import AttentionSite
from .propagate_shapes import run_node_on_fakes

SCHEDULES = ("constant", "decreasing")


@dataclass
class FlopModel:
    """The graph's FLOPs by segment and by power of the token count (see the module docstring)."""

    n_tokens: int
    fixed: float  # FLOPs that do not change with the token count
    linear: list[float]  # per segment: FLOPs proportional to its token count
    quadratic: list[float]  # per segment: FLOPs proportional to its token count squared
    merge_unit: list[float]  # per merge point: FLOPs of a merge's similarity matrix per (N/2)^2

    @property
    def total(self) -> float:
        return self.fixed + sum(self.linear) + sum(self.quadratic)

    def predict(self, counts: list[int], merging: list[bool]) -> float:
        """Predicted FLOPs with ``counts[i]`` tokens in segment i (``counts[0]`` = N0) and a
        merge at each point where ``merging``."""
        n0 = self.n_tokens
        flops = self.fixed
        for lin, quad, n in zip(self.linear, self.quadratic, counts):
            flops += lin * n / n0 + quad * (n / n0) ** 2
        for unit, n, merges in zip(self.merge_unit, counts, merging):
            if merges:
                flops += unit * (n / 2) ** 2
        return flops


@dataclass
class BudgetSolution:
    r: list[int]
    predicted: float  # predicted FLOP ratio of the merged graph
    note: str = ""  # why the budget is not met, if it is not


def node_flops(gm: GraphModule, fake_mode) -> tuple[dict[Node, float], dict[Node, Any]]:
    """Every node's FLOPs (torch's counter on the recorded fake values) and those values."""
    counts: dict[Node, float] = {}
    env: dict[Node, Any] = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        if node.op in ("placeholder", "get_attr"):
            env[node] = node.meta.get("example_value")
            continue
        with FlopCounterMode(display=False) as counter:
            env[node] = run_node_on_fakes(gm, node, env, fake_mode)
        counts[node] = float(counter.get_total_flops())
    return counts, env


def flop_model(gm: GraphModule, sites: list[AttentionSite], fake_mode) -> FlopModel:
    """Sort every node's FLOPs into segments and powers of the token count."""
    n0 = gu.tensor_shape(sites[0].stream_out)[1]
    boundary = {s.stream_out: i + 1 for i, s in enumerate(sites)}
    segments = len(sites) + 1
    linear, quadratic = [0.0] * segments, [0.0] * segments
    fixed, segment = 0.0, 0
    counts, env = node_flops(gm, fake_mode)
    for node in gm.graph.nodes:
        count = counts.get(node, 0.0)
        if count:
            power = token_power(node, env, n0)
            if power == 0:
                fixed += count
            else:
                (linear if power == 1 else quadratic)[segment] += count
        segment = boundary.get(node, segment)
    merge_unit = [_merge_unit(site) for site in sites]
    return FlopModel(n0, fixed, linear, quadratic, merge_unit)


def token_power(node: Node, env: dict, n_tokens: int) -> int:
    """How a node's cost grows with the token count: 0, 1 or 2 (see the module docstring)."""
    if gu.is_sdpa(node) or gu.is_packed_attention(node):
        return 2
    most = 0
    tiles = not _is_linear(node)  # a linear layer's output is [.., tokens, features], never a tile
    for value in [env.get(i) for i in node.all_input_nodes] + [env.get(node)]:
        for tensor in _tensors(value):
            most = max(most, _token_axes(tensor.shape, n_tokens, tiles))
    return min(most, 2)


def _is_linear(node: Node) -> bool:
    if node.op == "call_module":
        return isinstance(node.graph.owning_module.get_submodule(node.target), torch.nn.Linear)
    return node.op == "call_function" and node.target in (torch._C._nn.linear, torch.nn.functional.linear)


def _token_axes(shape, n_tokens: int, tiles: bool = True) -> int:
    """Axes of ``shape`` that hold the tokens: not the batch axis, and not the last (features)
    unless the one before it holds tokens too (a tokens x tokens tile of attention scores), so
    that a width equal to the token count (BERT's 128-wide MLP at 128 tokens) is not counted."""
    sizes = [d if isinstance(d, int) else -1 for d in shape]
    if len(sizes) < 2:
        return 0
    inner = sum(1 for d in sizes[1:-1] if d == n_tokens)
    square = tiles and len(sizes) >= 3 and sizes[-1] == n_tokens and sizes[-2] == n_tokens
    return inner + (1 if square else 0)


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _merge_unit(site: AttentionSite) -> float:
    """A merge's similarity matrix costs 2 * B * |A| * |B| * d: per (N/2)^2, 2 * B * d."""
    shape = gu.tensor_shape(site.k)
    batch = gu.tensor_shape(site.stream_out)[0]
    dim = shape[-1] if shape is not None and site.k_token_axis in (-2, len(shape) - 2) else (shape[-2] if shape else 0)
    return 2.0 * batch * dim


def schedule_counts(rate: float, n_blocks: int, shape: str) -> list[int]:
    """Requested r per block for a real-valued ``rate`` (the first block's r for "decreasing")."""
    if shape == "decreasing":
        last = rate / 3.0
        values = [rate + (last - rate) * i / max(n_blocks - 1, 1) for i in range(n_blocks)]
        return [int(round(v)) for v in values]
    whole, extra = int(rate), rate - int(rate)
    ups = int(round(extra * n_blocks))
    return [whole + 1 if i < ups else whole for i in range(n_blocks)]


def clamp(requested: list[int], n_tokens: int, protected: int, min_tokens: int, keep_salient: int,
          tail: int) -> tuple[list[int], list[int]]:
    """(applied r per block, tokens per segment) as the merges will clamp them."""
    applied, counts = [], [n_tokens]
    for r in requested:
        r = ops.merge_count(counts[-1], protected, r, min_tokens, keep_salient, tail)
        applied.append(r)
        counts.append(counts[-1] - r)
    return applied, counts


def solve(model: FlopModel, budget: float, shape: str, protected: int, min_tokens: int = 0,
          keep_salient: int = 0, tail: int = 0) -> BudgetSolution:
    """The schedule whose predicted FLOP ratio is nearest to ``budget``."""
    n_blocks = len(model.merge_unit)

    def evaluate(rate: float) -> tuple[float, list[int]]:
        requested = schedule_counts(rate, n_blocks, shape)
        applied, counts = clamp(requested, model.n_tokens, protected, min_tokens, keep_salient, tail)
        return model.predict(counts, [r > 0 for r in applied]) / model.total, requested

    ceiling = float(model.n_tokens)
    low, high = 0.0, ceiling
    for _ in range(40):  # the predicted ratio falls as the rate grows (up to clamping)
        middle = (low + high) / 2
        if evaluate(middle)[0] > budget:
            low = middle
        else:
            high = middle
    candidates = [evaluate(rate) for rate in (low, high)]
    predicted, best = min(candidates, key=lambda c: abs(c[0] - budget))
    floor, _ = evaluate(ceiling)
    note = ""
    if budget < floor - 0.02:
        note = (f"the budget {budget:.3f} is below the {floor:.3f} that the most merging reaches here "
                f"({model.n_tokens} tokens, {protected} protected, min_tokens={min_tokens}); merging the most")
    return BudgetSolution(list(best), predicted, note)


def solve_for_graph(gm: GraphModule, sites: list[AttentionSite], budget: float, shape: str, protected: int,
                    min_tokens: int, keep_salient: int, tail: int, fake_mode) -> Optional[BudgetSolution]:
    """``solve`` on the graph's own FLOP model; None where the model cannot be built."""
    model = flop_model(gm, sites, fake_mode)
    if model.total <= 0:
        return None
    return solve(model, budget, shape, protected, min_tokens, keep_salient, tail)


# ----------------------------------------------------------------------------- merge and restore


@dataclass
class ComponentCost:
    """FLOPs of one generation component that change when its tokens merge."""

    linear: float  # grows with the component's token count
    quadratic: float  # grows with its square (self-attention over the merged tokens)
    merge: float  # a block's destination similarity, per source x destination pair


def component_costs(gm: GraphModule, runs: list, fake_mode) -> tuple[float, list[ComponentCost]]:
    """The graph's FLOPs and, per component (in ``runs`` order), the part that merging scales:
    the nodes between the component's input stream and its branch output that read the
    stream. A self-attention's attention call is quadratic, a cross-attention's linear (its
    keys are the text's)."""
    counts, env = node_flops(gm, fake_mode)
    costs = []
    for run in runs:
        for c in run.components:
            inside = (gu.ancestors(c.branch_out, stop=lambda n, c=c: n is c.stream_in) | {c.branch_out})
            inside &= gu.descendants(c.stream_in)
            linear = quadratic = 0.0
            for node in inside:
                count = counts.get(node, 0.0)
                if not count:
                    continue
                attention = c.site is not None and node is c.site.attn
                power = (2 if c.kind == "self-attention" else 1) if attention else min(token_power(node, env, run.tokens), 1)
                if power == 2:
                    quadratic += count
                elif power == 1:
                    linear += count
            batch, channels = gu.tensor_shape(c.stream_in)[0], gu.tensor_shape(c.stream_in)[2]
            costs.append(ComponentCost(linear, quadratic, 2.0 * batch * channels))
    return sum(counts.values()), costs


def predict_generation(total: float, costs: list[ComponentCost], plans: list, sx: int = 2, sy: int = 2) -> float:
    """Predicted FLOPs when each component of ``plans`` (``merge_and_restore.plan_components``,
    same order as ``costs``) merges its ``r`` tokens; one similarity per merging block."""
    flops = total
    planned = set()
    for cost, plan in zip(costs, plans):
        if not plan.merges:
            continue
        c = plan.component
        kept = (c.tokens - plan.r) / c.tokens
        flops -= cost.linear * (1 - kept) + cost.quadratic * (1 - kept * kept)
        if (c.run, c.block) not in planned:
            planned.add((c.run, c.block))
            destinations = ops.destination_count(c.grid[0], c.grid[1], sx, sy)
            flops += cost.merge * (c.tokens - destinations) * destinations
    return flops


def solve_generation(total: float, costs: list[ComponentCost], plan_for: Callable[[float], list], budget: float,
                     sx: int = 2, sy: int = 2) -> tuple[float, float, str]:
    """(ratio, predicted FLOP ratio, note): the merge ratio whose predicted FLOPs are nearest
    to ``budget``; ``plan_for(ratio)`` gives the component plans at that ratio."""

    def evaluate(ratio: float) -> float:
        return predict_generation(total, costs, plan_for(ratio), sx, sy) / total

    low, high = 0.0, 0.99
    for _ in range(30):  # the predicted ratio falls as the merge ratio grows
        middle = (low + high) / 2
        if evaluate(middle) > budget:
            low = middle
        else:
            high = middle
    ratio = min((low, high), key=lambda x: abs(evaluate(x) - budget))
    floor = evaluate(0.99)
    note = ""
    if budget < floor - 0.02:
        note = (f"the budget {budget:.3f} is below the {floor:.3f} that merging reaches here (only the "
                f"components in merge_components merge); merging the most")
    return round(ratio, 4), evaluate(round(ratio, 4)), note
