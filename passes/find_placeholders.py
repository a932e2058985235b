"""Pass: find a language model's input sequence whose placeholder tokens are filled from another sequence.

Matches the way vision-language models (LLaVA and its kin) put an image into a language model:
the token embeddings [B, L, C] of a prompt that holds a run of placeholder tokens per image,
and a ``masked_scatter`` that writes the vision tower's projected features into the
placeholder positions (``inputs_embeds.masked_scatter(mask, image_features)``). The scatter's
result must be the sequence the graph's attention sites read (it reaches their queries), and
the features must fill the same number of placeholders in every row (their count divides
evenly by the batch), which is what a static input shape gives.

Such a sequence is compacted, not merged block by block (``compact_placeholders``): the
placeholder tokens merge into fewer tokens once, before the first layer, and the text tokens
stay as they are, which no causal mask can object to.

Guarantees: the graph is not modified. Returns the scatter, its mask and features, the
placeholder count per row and the sites that read the sequence, or None with no such scatter.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.fx import GraphModule, Node

from . import graph_utils as gu
from .find_attention import AttentionSite
from .propagate_shapes import ShapeHints

_SCATTER_TARGETS = {"masked_scatter", torch.Tensor.masked_scatter, torch.masked_scatter}


@dataclass
class PlaceholderScatter:
    node: Node  # the filled sequence [B, L, C]
    mask: Node  # the placeholder positions ([B, L], [B, L, 1] or [B, L, C] bool)
    features: Node
    length: int  # L
    count: int  # placeholders per row
    sites: list[AttentionSite] = field(default_factory=list)  # the sites that read the sequence

    @property
    def batch(self) -> int:
        return gu.tensor_shape(self.node)[0]


def is_masked_scatter(node: Node) -> bool:
    if node.op == "call_method":
        return node.target == "masked_scatter"
    return node.op == "call_function" and node.target in _SCATTER_TARGETS


def find_placeholder_scatter(gm: GraphModule, sites: list[AttentionSite]) -> Optional[PlaceholderScatter]:
    """The first placeholder scatter that the attention sites read (see the module docstring)."""
    for node in gm.graph.nodes:
        if not is_masked_scatter(node) or len(node.args) < 3:
            continue
        found = _scatter(node, sites)
        if found is not None:
            return found
    return None


def scatter_leaving_graph(gm: GraphModule) -> Optional[Node]:
    """A placeholder-shaped scatter ([B, L, C] filled from features) whose result is an output of
    this graph: the language model that reads it runs in another graph, which sees only a plain
    sequence (Dynamo cut between them), so nothing there marks the placeholders."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    for node in gm.graph.nodes:
        if is_masked_scatter(node) and len(gu.tensor_shape(node) or ()) == 3 and node in output.all_input_nodes:
            return node
    return None


def _scatter(node: Node, sites: list[AttentionSite]) -> Optional[PlaceholderScatter]:
    seq, mask, features = node.args[:3]
    shape, feature_shape = gu.tensor_shape(node), gu.tensor_shape(features)
    if shape is None or len(shape) != 3 or feature_shape is None or not isinstance(mask, Node):
        return None
    batch, length, channels = shape
    if not isinstance(batch, int) or not isinstance(channels, int):
        return None
    total = 1
    for size in feature_shape:
        total *= size
    if feature_shape[-1] != channels or total % (batch * channels):
        return None
    count = total // (batch * channels)
    readers = gu.descendants(node)
    reading = [s for s in sites if s.q in readers]
    if not reading or count < 2 or count > ShapeHints()(length):
        return None
    return PlaceholderScatter(node, mask, features, length, count, reading)
