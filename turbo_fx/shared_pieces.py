"""Compiled pieces that later pieces of the same split graph run as they are.

The blocks of a split encoder graph have the same code and differ only in their weights and
token count, which the pieces take as inputs (the token count as a backed symbolic size).
Inductor's FX graph cache and AOT-autograd's cache already hand a later block the first
block's generated code, but each lookup first fake-propagates the piece and hashes it:
about 0.15 s per DeiT-S block on 2 cores, most of a model's cache hits. A piece
whose code and inputs match one compiled earlier in the same split runs that compiled
callable instead, with no lookup at all.

What "match" means is what a Dynamo guard would check for the earlier compile: the same
graph code, the same token axes, every tensor input of the same dtype, device, layout and
gradient flag, and its sizes, strides and storage offset satisfying the earlier piece's
symbolic shapes and every shape guard the compile added (``produce_guards_expression``
with static values included). Non-tensor inputs must be equal. A piece with ``get_attr``
nodes is never shared: its code reads tensors that belong to it, not to the earlier piece.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Optional, Sequence

import torch
from torch.fx import GraphModule


@dataclass
class _Compiled:
    guards: Optional[str]  # the earlier compile's shape guards over its tensor inputs (None: none)
    shape_env: Any  # evaluates ``guards``
    compiled: Callable


@dataclass
class SharedPieces:
    """The pieces compiled so far in one split graph, by code and input signature."""

    _by_key: dict = field(default_factory=dict)

    def find(self, kind: str, piece: GraphModule, args: Sequence[Any], dynamic: list[list[int]]) -> Optional[Callable]:
        """The compiled callable of an earlier piece that computes what ``piece`` computes on
        ``args``, or None."""
        key = _key(kind, piece, args, dynamic)
        if key is None:
            return None
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        for entry in self._by_key.get(key, ()):
            if entry.guards is None or entry.shape_env.evaluate_guards_expression(entry.guards, tensors):
                return entry.compiled
        return None

    def add(self, kind: str, piece: GraphModule, args: Sequence[Any], dynamic: list[list[int]],
            fake_args: Sequence[Any], shape_env: Any, compiled: Callable) -> None:
        """Keep ``compiled`` (compiled from ``fake_args`` in ``shape_env``) for later pieces."""
        key = _key(kind, piece, args, dynamic)
        if key is None:
            return
        fakes = [a for a in fake_args if isinstance(a, torch.Tensor)]
        guards = shape_env.produce_guards_expression(fakes, ignore_static=False)
        self._by_key.setdefault(key, []).append(_Compiled(guards, shape_env, compiled))


def _key(kind: str, piece: GraphModule, args: Sequence[Any], dynamic: list[list[int]]) -> Optional[Hashable]:
    """What two pieces must share before their shapes are compared, or None where ``piece``
    may not share compiled code at all."""
    if any(node.op == "get_attr" for node in piece.graph.nodes):
        return None
    signature = []
    for value in args:
        if isinstance(value, torch.Tensor):
            signature.append(("tensor", value.dtype, value.device, value.layout, value.requires_grad, value.dim()))
        elif isinstance(value, (int, float, bool, str, type(None), torch.dtype, torch.device)):
            signature.append(("value", type(value), value))
        else:
            return None
    return kind, piece.code, tuple(signature), tuple(tuple(d) for d in dynamic)
