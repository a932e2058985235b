"""graph_traits: writes hidden in a call's arguments (running statistics, ``inplace=True``,
``out=``) are in-place updates like ``x.add_()``: the plan refuses the block-by-block split for
them and the run-time guard does not run them a second time. Each graph here is one node in
Dynamo's graph whose name says nothing of the write."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model_builders import dynamo_graph
from turbo_fx.config import TurboConfig
from turbo_fx.guarded_call import guard
from turbo_fx.passes.graph_traits import _writes_by_name, graph_traits
from turbo_fx.plan import analyse
from turbo_fx.report import GraphReport


class Calls(torch.nn.Module):
    """Calls ``fn`` on its input and on buffers of its own (``mean``, ``var``, ``out``)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.register_buffer("mean", torch.zeros(4))
        self.register_buffer("var", torch.ones(4))
        self.register_buffer("out", torch.zeros(3, 4))

    def forward(self, x):
        return self.fn(self, x)


def traced(model: torch.nn.Module, x: torch.Tensor):
    """Dynamo's graph of ``model(x)``, its example inputs (input and buffers, as Dynamo lifts
    them), and the node that makes the call (it must be the graph's only call)."""
    gm = dynamo_graph(model, x)
    calls = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    assert len(calls) == 1, [n.format_node() for n in calls]
    assert not _writes_by_name(calls[0])  # nothing but an argument tells of the write
    inputs = [n.meta["example_value"] for n in gm.graph.nodes if n.op == "placeholder"]
    return gm, inputs, calls[0]


def check_in_place(model: torch.nn.Module, x: torch.Tensor) -> None:
    """The graph's one call counts as an in-place update, in the traits, the plan and the guard."""
    gm, inputs, call = traced(model, x)
    reason = graph_traits(gm, inputs).in_place
    assert reason is not None and call.name in reason
    plan = analyse(gm, inputs, TurboConfig(r=2))
    assert plan.split_refusal == reason
    merged = gm.forward
    assert guard(merged, gm, None, GraphReport(graph_index=0, n_nodes=0), plan.traits) is merged


def check_pure(model: torch.nn.Module, x: torch.Tensor) -> None:
    gm, inputs, _ = traced(model, x)
    assert graph_traits(gm, inputs).in_place is None


def test_a_batch_norm_module_that_updates_running_statistics_is_in_place():
    """Without ``num_batches_tracked`` (set to None, momentum given) no ``add_`` gives it away."""
    norm = torch.nn.BatchNorm1d(4, momentum=0.1)
    norm.num_batches_tracked = None
    x = torch.randn(3, 4)
    check_in_place(norm.train(), x)
    check_pure(norm.eval(), x)


def test_functional_batch_norm_in_training_on_buffers_is_in_place():
    x = torch.randn(3, 4)
    check_in_place(Calls(lambda m, x: F.batch_norm(x, m.mean, m.var, training=True)), x)
    check_in_place(Calls(lambda m, x: F.batch_norm(x, m.mean, m.var, None, None, True)), x)
    check_in_place(Calls(lambda m, x: F.instance_norm(x, m.mean, m.var)), torch.randn(3, 4, 5))
    check_pure(Calls(lambda m, x: F.batch_norm(x, m.mean, m.var)), x)
    check_pure(Calls(lambda m, x: F.batch_norm(x, None, None, training=True)), x)  # no statistics kept


IN_PLACE_ACTIVATIONS = {
    "relu": lambda x: F.relu(x, inplace=True),
    "relu by position": lambda x: F.relu(x, True),
    "relu6": lambda x: F.relu6(x, inplace=True),
    "leaky_relu": lambda x: F.leaky_relu(x, 0.1, True),
    "elu": lambda x: F.elu(x, inplace=True),
    "selu": lambda x: F.selu(x, inplace=True),
    "celu": lambda x: F.celu(x, inplace=True),
    "hardtanh": lambda x: F.hardtanh(x, inplace=True),
    "hardsigmoid": lambda x: F.hardsigmoid(x, inplace=True),
    "hardswish": lambda x: F.hardswish(x, inplace=True),
    "silu": lambda x: F.silu(x, inplace=True),
    "mish": lambda x: F.mish(x, inplace=True),
    "rrelu in eval": lambda x: F.rrelu(x, training=False, inplace=True),
    "nn.ReLU(inplace=True)": torch.nn.ReLU(inplace=True),
    "dropout": lambda x: F.dropout(x, 0.5, True, inplace=True),
    "dropout1d": lambda x: F.dropout1d(x, 0.5, True, True),
    "alpha_dropout": lambda x: F.alpha_dropout(x, 0.5, True, True),
    "feature_alpha_dropout": lambda x: F.feature_alpha_dropout(x, 0.5, True, True),
}


@pytest.mark.parametrize("name", IN_PLACE_ACTIVATIONS)
def test_an_in_place_activation_on_an_input_is_in_place(name):
    activation = IN_PLACE_ACTIVATIONS[name]
    check_in_place(Calls(lambda m, x: activation(x)), torch.randn(3, 4))
    if name == "relu":
        check_pure(Calls(lambda m, x: F.relu(x)), torch.randn(3, 4))


def in_place_reason_of(fn, x: torch.Tensor):
    gm = dynamo_graph(Calls(fn), x)
    return graph_traits(gm, [n.meta["example_value"] for n in gm.graph.nodes if n.op == "placeholder"]).in_place


@pytest.mark.parametrize("name", ["relu", "leaky_relu", "nn.ReLU(inplace=True)", "hardswish"])
def test_an_in_place_activation_on_a_tensor_the_graph_made_is_not_a_write_that_outlives_it(name):
    """A stem's ``conv -> ReLU(inplace=True)`` rewrites a tensor made in the same call: a second
    run repeats it exactly, so the graph keeps its split and its guard. A view of an input is
    the input."""
    activation = IN_PLACE_ACTIVATIONS[name]
    assert in_place_reason_of(lambda m, x: activation(x * 2.0), torch.randn(3, 4)) is None
    assert in_place_reason_of(lambda m, x: activation(x.view(4, 3)), torch.randn(3, 4)) is not None
    assert in_place_reason_of(lambda m, x: activation(x[1:]), torch.randn(3, 4)) is not None


def test_an_out_keyword_into_a_fresh_tensor_is_not_a_lasting_write():
    assert in_place_reason_of(lambda m, x: torch.add(x, 1.0, out=torch.empty(3, 4)), torch.randn(3, 4)) is None


def test_an_in_place_dropout_that_draws_nothing_writes_nothing():
    """In eval or with p=0 ATen's in-place dropouts return their input untouched; in training
    they write (and draw, which the random trait reports too)."""
    x = torch.randn(3, 4)
    check_pure(Calls(lambda m, x: F.dropout(x, 0.5, False, True)), x)
    check_pure(Calls(lambda m, x: F.dropout(x, 0.0, True, True)), x)
    gm, inputs, call = traced(Calls(lambda m, x: F.dropout(x, 0.5, True, True)), x)
    traits = graph_traits(gm, inputs)
    assert call.name in traits.in_place and call.name in traits.random


def test_an_out_keyword_is_in_place():
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    check_in_place(Calls(lambda m, x: torch.add(x, b, out=m.out)), a)
    check_in_place(Calls(lambda m, x: torch.mul(x, 2.0, out=x)), a)


def test_rrelu_in_training_draws_random_numbers():
    gm, inputs, call = traced(Calls(lambda m, x: F.rrelu(x, training=True)), torch.randn(3, 4))
    assert call.name in graph_traits(gm, inputs).random
    gm, inputs, _ = traced(Calls(lambda m, x: F.rrelu(x)), torch.randn(3, 4))
    assert graph_traits(gm, inputs).random is None
