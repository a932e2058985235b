"""Every private torch name turbo uses, each behind one small function.

turbo declares torch >= 2.11 and is pinned to 2.13 (``pyproject.toml``, ``constraints.txt``);
private names (``torch._dynamo``, ``torch._inductor``, ``torch._subclasses``, ``torch._guards``,
the shape environment of ``torch.fx.experimental.symbolic_shapes``) may be renamed or moved in
any release. Each function here uses the name those versions have and, where the name is
missing, one of:

- an older or newer spelling of the same thing (``var_to_val`` for ``backed_var_to_val``,
  ``cache_size_limit`` for ``recompile_limit``);
- a graceful degradation that keeps the model right and turbo on a slower road (no symbolic
  token counts, no sharing of compiled pieces, a setting left at torch's default);
- ``UnsupportedTorch``, a ``CannotRewrite`` whose message names the missing name and the
  installed torch: the backend then compiles the graph unchanged with that reason, and a
  symbolic rewrite gives way to the concrete one.

``docs/reliability.md`` lists the names and their fallbacks; ``tests/core/test_torch_compat.py``
checks each function on the installed torch and each fallback on a stand-in.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch

from turbo_fx.errors import CannotRewrite

DECLARED_TORCH = (2, 11)

# The logger that reports meta kernels failing on fake tensors (``backend`` silences it during
# a rewrite). If torch moves the module, silencing stops and only the log gets noisier.
FAKE_TENSOR_LOGGER = "torch._subclasses.fake_tensor"


class UnsupportedTorch(CannotRewrite):
    """A private torch name turbo needs is missing from the installed torch."""


def torch_version() -> tuple[int, int]:
    """The installed torch's (major, minor)."""
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def torch_at_least(major: int, minor: int) -> bool:
    return torch_version() >= (major, minor)


def _private(module: str, name: str) -> Any:
    """``module.name``, or ``UnsupportedTorch`` naming it."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise UnsupportedTorch(f"torch {torch.__version__} has no {module}.{name}, which turbo needs "
                               f"(turbo supports torch >= {DECLARED_TORCH[0]}.{DECLARED_TORCH[1]})") from exc


def _optional(module: str, name: str) -> Any:
    """``module.name``, or None where this torch lacks it."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


# --- The shape environment (torch.fx.experimental.symbolic_shapes) ---------------------------

def allow_dynamic_output_shapes(shape_env: Any) -> bool:
    """Let ops traced in ``shape_env`` report data-dependent output sizes (the merge op's
    unbacked token counts): ``settings.allow_dynamic_output_shape_ops``, or the same flag as a
    plain attribute. True where they may now; False where this shape environment has no such
    setting or refuses the change: the symbolic rewrite then fails on the merge op and the
    concrete token counts stay (the graph still merges)."""
    try:
        settings = getattr(shape_env, "settings", None)
        if dataclasses.is_dataclass(settings) and _has_field(settings, "allow_dynamic_output_shape_ops"):
            if not settings.allow_dynamic_output_shape_ops:
                shape_env.settings = dataclasses.replace(settings, allow_dynamic_output_shape_ops=True)
            return True
        if "allow_dynamic_output_shape_ops" in getattr(shape_env, "__dict__", {}):
            shape_env.allow_dynamic_output_shape_ops = True
            return True
    except (AttributeError, TypeError):  # a read-only or differently shaped setting
        pass
    return False


def _has_field(instance: Any, name: str) -> bool:
    return any(f.name == name for f in dataclasses.fields(instance))


def backed_symbol_values(shape_env: Any) -> Mapping:
    """Each backed symbol's value in ``shape_env``: ``backed_var_to_val`` (torch 2.11 on), or
    ``var_to_val``, its name before the rename (2.13 keeps it as a deprecated alias)."""
    for name in ("backed_var_to_val", "var_to_val"):
        values = getattr(shape_env, name, None)
        if values is not None:
            return values
    raise UnsupportedTorch(f"torch {torch.__version__}'s shape environment has neither backed_var_to_val "
                           "nor var_to_val: turbo cannot read the sizes behind symbolic token counts")


@contextlib.contextmanager
def fresh_unbacked_symbols_dropped(shape_env: Any) -> Iterator[None]:
    """Unbacked symbols created inside the block leave ``shape_env``'s list of pending ones as
    it was (``pending_fresh_unbacked_symbols``): those a rewrite makes live only in its own
    graph's metadata, and the inner compiler re-traces and binds its own. A shape environment
    without the list has nothing to restore."""
    pending = getattr(shape_env, "pending_fresh_unbacked_symbols", None)
    saved = list(pending) if pending is not None else None
    try:
        yield
    finally:
        if saved is not None:
            pending[:] = saved


def size_hint(value: Any) -> Optional[int]:
    """The int a size stands for: itself, a symbolic size's hint (``SymNode.hint``), or None
    for an unbacked size (no hint)."""
    if not isinstance(value, torch.SymInt):
        return int(value)
    hint = getattr(value.node, "hint", None)
    return None if hint is None else int(hint)


def is_unbacked(value: Any) -> bool:
    """Whether ``value`` is a symbolic size with no hint (a data-dependent size)."""
    return isinstance(value, torch.SymInt) and size_hint(value) is None


def size_expr(value: torch.SymInt) -> Any:
    """A symbolic size's sympy expression (``SymNode.expr``)."""
    return value.node.expr


def concrete_size(value: Any, known: Mapping) -> int:
    """The int ``value`` stands for: its hint, or for an unbacked size its expression with
    the backed symbols' values and ``known`` (values of unbacked symbols) put in."""
    hint = size_hint(value)
    if hint is not None:
        return hint
    values = {**backed_symbol_values(value.node.shape_env), **known}
    return int(size_expr(value).xreplace(values))


def size_lower_bound(value: Any) -> int:
    """The least value a size may take: itself when concrete; for a symbolic size, the lower
    end of the shape environment's range for it (``ShapeEnv.bound_sympy``), or 0 where this
    torch cannot say (the caller then assumes nothing about it)."""
    if not isinstance(value, torch.SymInt):
        return int(value)
    node = value.node
    try:
        return int(node.shape_env.bound_sympy(node.expr).lower)
    except (AttributeError, TypeError, ValueError, OverflowError):
        return 0


# A guard expression that never holds: where the shape environment cannot write or check
# guards, no compiled piece is ever handed to another.
NEVER = "False"


def shape_guards(shape_env: Any, fakes: Sequence[torch.Tensor]) -> Optional[str]:
    """Every shape guard ``shape_env`` added for ``fakes``, static values included, as one
    expression (``ShapeEnv.produce_guards_expression``; None: no guard), or ``NEVER``."""
    produce = getattr(shape_env, "produce_guards_expression", None)
    if produce is None or not hasattr(shape_env, "evaluate_guards_expression"):
        return NEVER
    return produce(fakes, ignore_static=False)


def shape_guards_hold(shape_env: Any, guards: str, tensors: Sequence[torch.Tensor]) -> bool:
    """Whether ``tensors`` satisfy ``guards`` (``ShapeEnv.evaluate_guards_expression``); False
    where this shape environment cannot check them."""
    evaluate = getattr(shape_env, "evaluate_guards_expression", None)
    return evaluate is not None and guards != NEVER and bool(evaluate(guards, tensors))


# --- Fake tensors (torch._subclasses) ---------------------------------------------------------

def is_fake(value: Any) -> bool:
    """Whether ``value`` is a fake tensor (``torch._subclasses.fake_tensor.FakeTensor``); False
    where this torch has no such class (a graph without fake values is then left unchanged)."""
    fake = _optional("torch._subclasses.fake_tensor", "FakeTensor")
    return fake is not None and isinstance(value, fake)


def new_fake_mode() -> Any:
    """A fake tensor mode with a fresh shape environment of its own."""
    fake_mode = _private("torch._subclasses.fake_tensor", "FakeTensorMode")
    shape_env = _private("torch.fx.experimental.symbolic_shapes", "ShapeEnv")
    return fake_mode(shape_env=shape_env())


def fake_with_symbolic_dims(fake_mode: Any, value: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """``value`` as a fake tensor of ``fake_mode`` whose ``dims`` are symbolic sizes (duck
    sized: equal sizes share a symbol) and whose other dims are static."""
    dim_dynamic = _private("torch.fx.experimental.symbolic_shapes", "DimDynamic")
    context_type = _private("torch.fx.experimental.symbolic_shapes", "StatelessSymbolicContext")
    sizes = [dim_dynamic.DUCK if d in dims else dim_dynamic.STATIC for d in range(value.dim())]
    context = context_type(dynamic_sizes=sizes, constraint_sizes=[None] * value.dim())
    return fake_mode.from_tensor(value, symbolic_context=context)


def real_tensors() -> contextlib.AbstractContextManager:
    """A block in which tensors are real even inside a fake mode (``unset_fake_temporarily``)."""
    return _private("torch._subclasses.fake_tensor", "unset_fake_temporarily")()


def propagate_fakes(gm: torch.fx.GraphModule, fake_mode: Any, fake_args: Sequence[Any]) -> None:
    """Run ``gm`` on ``fake_args`` (already fake), recording each node's fake value as
    ``meta["val"]`` (``torch.fx.passes.fake_tensor_prop.FakeTensorProp``)."""
    prop = _private("torch.fx.passes.fake_tensor_prop", "FakeTensorProp")
    prop(gm, fake_mode).propagate_dont_convert_inputs(*fake_args)


# --- Dynamo, AOT autograd and the dispatcher --------------------------------------------------

def reset_compiler() -> None:
    """Forget every compiled graph (``torch.compiler.reset``, else ``torch._dynamo.reset``)."""
    reset = getattr(getattr(torch, "compiler", None), "reset", None) or _private("torch._dynamo", "reset")
    reset()


def compile_counters() -> Mapping:
    """Dynamo's event counters by category (``torch._dynamo.utils.counters``); an empty
    stand-in where this torch has none (cache hits then read as 0)."""
    counters = _optional("torch._dynamo.utils", "counters")
    return counters if counters is not None else collections.defaultdict(collections.Counter)


def lookup_backend(name: str) -> Callable:
    """The torch.compile backend registered as ``name``."""
    lookup = _optional("torch._dynamo.backends.registry", "lookup_backend")
    return (lookup or _private("torch._dynamo", "lookup_backend"))(name)


def dynamo_config_patch(**settings: Any) -> contextlib.AbstractContextManager:
    """``torch._dynamo.config.patch`` with the settings this torch knows (``known_settings``)."""
    config = importlib.import_module("torch._dynamo.config")
    return config.patch(known_settings(config, settings))


# Settings that torch renamed: the name turbo uses, and the one an older torch knows.
_RENAMED_SETTINGS = {"recompile_limit": "cache_size_limit"}


def known_settings(config: Any, settings: Mapping[str, Any]) -> dict:
    """``settings`` under the names the config module ``config`` knows: a renamed one under its
    other name, an unknown one left out (at torch's default it costs speed or cache hits,
    never results)."""
    known = {}
    for name, value in settings.items():
        for spelling in (name, _RENAMED_SETTINGS.get(name)):
            if spelling is not None and _has_setting(config, spelling):
                known[spelling] = value
                break
    return known


def below_autograd() -> contextlib.AbstractContextManager:
    """Dispatch below autograd (``torch._C._AutoDispatchBelowADInplaceOrView``), as an op's
    kernel is entered; a plain block where this torch lacks it (only costs a recompile)."""
    guard = getattr(torch._C, "_AutoDispatchBelowADInplaceOrView", None)
    return guard() if guard is not None else contextlib.nullcontext()


def python_dispatcher() -> contextlib.AbstractContextManager:
    """Composite ops run by their Python (symbolic) decompositions, as tracing runs them
    (``torch._dispatch.python.enable_python_dispatcher``); a plain block where this torch
    lacks it (a symbolic size may then be specialised, which costs compiles, not results)."""
    enable = _optional("torch._dispatch.python", "enable_python_dispatcher")
    return enable() if enable is not None else contextlib.nullcontext()


def tracing(fake_mode: Any) -> contextlib.AbstractContextManager:
    """A tracing context over ``fake_mode``, as Dynamo opens one around its backend
    (``torch._guards.tracing``, ``torch._guards.TracingContext``)."""
    context = _private("torch._guards", "TracingContext")
    return _private("torch._guards", "tracing")(context(fake_mode))


# --- Inductor and the config modules ----------------------------------------------------------

# torch.compile's documented modes, by whether they capture CUDA graphs: the stand-in for
# ``list_mode_options`` on a torch without it.
_MODES = {"default": {}, "reduce-overhead": {"triton.cudagraphs": True},
          "max-autotune-no-cudagraphs": {"max_autotune": True},
          "max-autotune": {"max_autotune": True, "triton.cudagraphs": True}}


def inductor_mode_options(mode: Optional[str] = None) -> dict:
    """Inductor's options for a torch.compile ``mode``, or every mode's options by name
    (``torch._inductor.list_mode_options``)."""
    list_modes = _optional("torch._inductor", "list_mode_options")
    if list_modes is not None:
        return dict(list_modes(mode) if mode else list_modes())
    return dict(_MODES.get(mode, {})) if mode else {name: dict(o) for name, o in _MODES.items()}


def inductor_compile_fx() -> Callable:
    """Inductor's graph compiler (``torch._inductor.compile_fx.compile_fx``)."""
    return _private("torch._inductor.compile_fx", "compile_fx")


def inductor_setting(name: str, default: Any = None) -> Any:
    """An Inductor config value (``torch._inductor.config``), or ``default`` where unknown."""
    config = importlib.import_module("torch._inductor.config")
    return _setting(config, name) if _has_setting(config, name) else default


def inductor_config_patch(settings: Mapping[str, Any]) -> contextlib.AbstractContextManager:
    """``torch._inductor.config.patch`` with the settings this torch knows (``known_settings``)."""
    config = importlib.import_module("torch._inductor.config")
    return config.patch(known_settings(config, settings))


def functorch_config_patch(settings: Mapping[str, Any]) -> contextlib.AbstractContextManager:
    """``torch._functorch.config.patch`` (AOT autograd's settings) with the ones this torch knows."""
    config = importlib.import_module("torch._functorch.config")
    return config.patch(known_settings(config, settings))


def _has_setting(config: Any, dotted: str) -> bool:
    try:
        _setting(config, dotted)
    except AttributeError:
        return False
    return True


def _setting(config: Any, dotted: str) -> Any:
    value = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


# --- Ops, pytrees and FX ----------------------------------------------------------------------

def op_overloads(target: Any) -> list:
    """The overloads of an op target of a graph node: itself for one overload
    (``torch._ops.OpOverload``), each overload of a packet (``OpOverloadPacket``), or none."""
    overload = _optional("torch._ops", "OpOverload")
    packet = _optional("torch._ops", "OpOverloadPacket")
    if overload is not None and isinstance(target, overload):
        return [target]
    if packet is not None and isinstance(target, packet):
        return [getattr(target, name) for name in target.overloads()]
    return []


def cudagraph_unsafe_tags() -> tuple:
    """``(torch.Tag.cudagraph_unsafe,)``, or () on a torch without that tag."""
    tag = getattr(torch.Tag, "cudagraph_unsafe", None)
    return (tag,) if tag is not None else ()


def sdpa_functions() -> set:
    """The callables a graph may hold for scaled dot-product attention: the public function
    and its C binding (``torch._C._nn.scaled_dot_product_attention``) where there is one."""
    binding = getattr(getattr(torch._C, "_nn", None), "scaled_dot_product_attention", None)
    public = torch.nn.functional.scaled_dot_product_attention
    return {public} if binding is None else {public, binding}


def tree_map_only(cls: type, fn: Callable, tree: Any) -> Any:
    """``fn`` applied to every leaf of ``tree`` that is a ``cls`` (``torch.utils._pytree``);
    where this torch lacks it, a walk over tuples, lists and dicts."""
    mapper = _optional("torch.utils._pytree", "tree_map_only")
    if mapper is not None:
        return mapper(cls, fn, tree)
    return _walk_only(cls, fn, tree)


def _walk_only(cls: type, fn: Callable, tree: Any) -> Any:
    if isinstance(tree, (tuple, list)):
        items = [_walk_only(cls, fn, item) for item in tree]
        return type(tree)(*items) if hasattr(tree, "_fields") else type(tree)(items)
    if isinstance(tree, dict):
        return {key: _walk_only(cls, fn, value) for key, value in tree.items()}
    return fn(tree) if isinstance(tree, cls) else tree


def empty_graph_like(graph: torch.fx.Graph) -> torch.fx.Graph:
    """An empty FX graph with ``graph``'s tracer class and a copy of its code generator
    (``Graph._tracer_cls``, ``Graph._codegen``), so that a copy of ``graph`` generates the same
    Python signature; a plain graph where this torch has neither."""
    import copy

    new = torch.fx.Graph(tracer_cls=getattr(graph, "_tracer_cls", None))
    if hasattr(graph, "_codegen"):
        new._codegen = copy.deepcopy(graph._codegen)
    return new
