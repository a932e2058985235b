"""A graph that Dynamo cut inside an attention sub-block: the reason names the graph break."""
from __future__ import annotations

import torch

from model_builders import dynamo_graph
from turbo_fx.passes.find_attention import find_attention_sites


def test_a_graph_that_starts_inside_an_attention_sub_block_names_the_graph_break():
    # Qwen2-VL's tower splits q/k/v per image in Python: Dynamo breaks the graph there, so the
    # attention's graph receives the queries as inputs and has no residual add.
    def attend(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, 8, 16)

    q, k, v = (torch.randn(1, 2, 8, 8) for _ in range(3))
    gm = dynamo_graph(attend, q, k, v)
    (site,) = find_attention_sites(gm)
    assert "its queries are an input of this graph" in site.problems[0]
    assert "torch._dynamo.explain" in site.problems[0]
