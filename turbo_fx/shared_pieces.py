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

A tensor's Python type is part of the match. A tensor subclass (torchao's quantised and
float8 weights) reports the dtype, layout and sizes of the tensor it stands for, but the
compiled code was generated for what ``__tensor_flatten__`` gives: its inner tensors and its
metadata (block size, scale dtype, kernel choice). So a subclass input matches only the same
subclass, with equal flatten metadata and inner tensors equal in type, dtype, device,
layout, sizes, strides and storage offset, all compared as static values (the block compile
makes a subclass input static, and the symbolic shape guards cover plain tensors only).
Anything else that is not a plain tensor or parameter (a subclass that cannot be flattened,
a quantised ``torch.quint8`` tensor) is never shared.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Optional, Sequence

import torch
from torch.fx import GraphModule

from turbo_fx.torch_compat import shape_guards, shape_guards_hold


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
        tensors = [a for a in args if _is_plain(a)]
        for entry in self._by_key.get(key, ()):
            if entry.guards is None or shape_guards_hold(entry.shape_env, entry.guards, tensors):
                return entry.compiled
        return None

    def add(self, kind: str, piece: GraphModule, args: Sequence[Any], dynamic: list[list[int]],
            fake_args: Sequence[Any], shape_env: Any, compiled: Callable) -> None:
        """Keep ``compiled`` (compiled from ``fake_args`` in ``shape_env``) for later pieces."""
        key = _key(kind, piece, args, dynamic)
        if key is None:
            return
        fakes = [fake for value, fake in zip(args, fake_args) if _is_plain(value)]
        guards = shape_guards(shape_env, fakes)
        self._by_key.setdefault(key, []).append(_Compiled(guards, shape_env, compiled))


def _key(kind: str, piece: GraphModule, args: Sequence[Any], dynamic: list[list[int]]) -> Optional[Hashable]:
    """What two pieces must share before their shapes are compared, or None where ``piece``
    may not share compiled code at all."""
    if any(node.op == "get_attr" for node in piece.graph.nodes):
        return None
    signature = []
    for value, dims in zip(args, dynamic):
        if isinstance(value, torch.Tensor):
            entry = _tensor_signature(value, dims)
        elif isinstance(value, (int, float, bool, str, type(None), torch.dtype, torch.device)):
            entry = ("value", type(value), value)
        else:
            entry = None
        if entry is None:
            return None
        signature.append(entry)
    return kind, piece.code, tuple(signature), tuple(tuple(d) for d in dynamic)


def _is_plain(value: Any) -> bool:
    """Whether ``value`` is a tensor whose sizes and strides the shape guards check: a plain
    tensor or parameter, not a subclass."""
    return type(value) in (torch.Tensor, torch.nn.Parameter)


def _is_flattenable(value: torch.Tensor) -> bool:
    """Whether ``value`` is a wrapper subclass that compiles as its inner tensors (what
    ``torch.utils._python_dispatch.is_traceable_wrapper_subclass`` checks)."""
    return hasattr(value, "__tensor_flatten__") and hasattr(type(value), "__tensor_unflatten__")


def _tensor_signature(value: torch.Tensor, dims: Sequence[int]) -> Optional[Hashable]:
    """What a tensor input must share with the earlier piece's, besides its shape guards;
    None where no earlier compiled code may be trusted with it."""
    if value.is_quantized:
        return None  # its scale and zero point are values the code may have been generated for
    common = (type(value), value.dtype, value.device, value.layout, value.requires_grad, value.is_conj(),
              value.is_neg())
    if _is_plain(value):
        return ("tensor", *common, value.dim())
    if dims or not _is_flattenable(value):
        return None
    return ("subclass", *common, _subclass_metadata(value))


def _subclass_metadata(value: torch.Tensor) -> Optional[Hashable]:
    """Everything of a wrapper subclass that its compiled code may depend on, as static
    values: its own sizes and strides, its flatten metadata and each inner tensor's."""
    names, context = value.__tensor_flatten__()
    inner = []
    for name in names:
        tensor = getattr(value, name)
        if _is_plain(tensor):
            entry = ("tensor", type(tensor), tensor.dtype, tensor.device, tensor.layout, tensor.requires_grad,
                     tuple(tensor.shape), tensor.stride(), tensor.storage_offset())
        else:
            entry = _tensor_signature(tensor, ())
        if entry is None:
            return None
        inner.append((name, entry))
    try:
        context = _hashable(context)
    except TypeError:
        return None  # metadata that cannot be compared by value
    return tuple(value.shape), value.stride(), value.storage_offset(), context, tuple(inner)


def _hashable(value: Any) -> Hashable:
    """``value`` (a subclass's flatten metadata) in a form equal exactly where ``value`` is,
    containers and dataclasses compared by their items; TypeError where part of it is
    unhashable. An object without its own equality is equal only to itself, which can only
    lose a share, never make a wrong one."""
    if isinstance(value, (list, tuple)):
        return type(value), tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return dict, tuple((_hashable(k), _hashable(v)) for k, v in value.items())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return type(value), tuple((f.name, _hashable(getattr(value, f.name))) for f in dataclasses.fields(value))
    hash(value)
    return type(value), value  # True, 1 and 1.0 are equal as Python values, not as metadata
