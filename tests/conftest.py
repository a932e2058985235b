"""Shared fixtures: a clean Dynamo state per test and a turbo compile helper that records reports."""
from __future__ import annotations

import os

import pytest
import torch

import turbo_fx
from turbo_fx.report import recording

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest-xdist worker per core: one intra-op thread each, since two
    # workers with two threads each would oversubscribe the cores (tiny-model forwards are
    # many times slower then; see one_torch_thread below).
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    turbo_fx.counters.clear()
    yield
    torch._dynamo.reset()


class Compiled:
    """A turbo-compiled model plus the reports of the graphs it compiled."""

    def __init__(self, model: torch.nn.Module, options: dict) -> None:
        self.fn = torch.compile(model, backend="turbo", options=options)
        self.graphs: list[turbo_fx.GraphReport] = []

    def __call__(self, *args, **kwargs):
        with recording() as rec, torch.no_grad():
            out = self.fn(*args, **kwargs)
        self.graphs.extend(rec.graphs)
        return out

    @property
    def report(self) -> turbo_fx.GraphReport:
        assert self.graphs, "no graph was compiled"
        return self.graphs[-1]


@pytest.fixture
def turbo():
    """turbo(model, **options) -> Compiled; runs the rewritten graph eagerly unless inner_backend is given."""

    def make(model: torch.nn.Module, **options) -> Compiled:
        options.setdefault("inner_backend", "eager")
        return Compiled(model, options)

    return make


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of tiny-model tests: their ops are too small to split,
    and on 2 shared cores two threads made a tiny UNet forward up to 70x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
