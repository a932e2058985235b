"""``turbo_fx.torch_compat``: each accessor of a private torch name works on the installed torch,
and each fallback works where the name is missing (simulated with stand-in objects and
monkeypatched torch modules)."""
from __future__ import annotations

import collections
import dataclasses
import logging
import operator
import types

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from model_builders import images, small_vit
from turbo_fx import torch_compat
from turbo_fx.errors import CannotRewrite
from turbo_fx.passes.propagate_shapes import ShapeHints


def fake_sizes(n: int = 5):
    """(fake mode, a fake [n, 3] tensor whose first size is a backed symbol)."""
    fake_mode = torch_compat.new_fake_mode()
    return fake_mode, torch_compat.fake_with_symbolic_dims(fake_mode, torch.empty(n, 3), [0])


class OlderShapeEnv:
    """A shape environment as a torch before the ``backed_var_to_val`` rename spells it."""

    def __init__(self, env: ShapeEnv) -> None:
        self._env = env

    def __getattr__(self, name: str):
        if name == "backed_var_to_val":
            raise AttributeError(name)
        if name == "var_to_val":
            return self._env.backed_var_to_val
        return getattr(self._env, name)


# --- On the installed torch ------------------------------------------------------------------

def test_the_installed_torch_is_in_the_declared_range():
    assert torch_compat.torch_version() >= torch_compat.DECLARED_TORCH
    assert torch_compat.torch_at_least(*torch_compat.DECLARED_TORCH)


@pytest.mark.parametrize("version, expected", [("2.11.0+cu128", (2, 11)), ("2.13.0a0+git1234", (2, 13)),
                                               ("2.14.0.dev20260101", (2, 14))])
def test_torch_versions_parse_with_local_and_pre_release_parts(monkeypatch, version, expected):
    monkeypatch.setattr(torch, "__version__", version)
    assert torch_compat.torch_version() == expected


def test_the_shape_environment_accessors():
    env = ShapeEnv(allow_dynamic_output_shape_ops=False)  # as Dynamo makes it by default
    assert torch_compat.allow_dynamic_output_shapes(env) and env.allow_dynamic_output_shape_ops
    assert torch_compat.allow_dynamic_output_shapes(env)  # already allowed: still True
    assert torch_compat.backed_symbol_values(env) is env.backed_var_to_val
    fake_mode, x = fake_sizes(5)
    size = x.shape[0]
    assert torch_compat.size_hint(size) == 5 and torch_compat.size_hint(7) == 7
    assert not torch_compat.is_unbacked(size) and not torch_compat.is_unbacked(7)
    assert torch_compat.size_lower_bound(size) >= 2 and torch_compat.size_lower_bound(9) == 9
    unbacked = fake_mode.shape_env.create_unbacked_symint()
    assert torch_compat.is_unbacked(unbacked) and torch_compat.size_hint(unbacked) is None
    assert torch_compat.concrete_size(unbacked + size, {torch_compat.size_expr(unbacked): 3}) == 8


def test_unbacked_symbols_made_in_the_block_are_not_left_pending():
    env = ShapeEnv()
    before = env.create_unbacked_symint()
    with torch_compat.fresh_unbacked_symbols_dropped(env):
        env.create_unbacked_symint()
        assert len(env.pending_fresh_unbacked_symbols) == 2
    assert env.pending_fresh_unbacked_symbols == [before.node.expr]


def test_shape_guards_hold_for_tensors_of_the_compiled_shapes_only():
    fake_mode, x = fake_sizes(5)
    guards = torch_compat.shape_guards(fake_mode.shape_env, [x])
    assert guards not in (None, torch_compat.NEVER)
    assert torch_compat.shape_guards_hold(fake_mode.shape_env, guards, [torch.empty(6, 3)])
    assert not torch_compat.shape_guards_hold(fake_mode.shape_env, guards, [torch.empty(6, 4)])


def test_the_fake_tensor_accessors():
    fake_mode, x = fake_sizes(4)
    assert torch_compat.is_fake(x) and not torch_compat.is_fake(torch.empty(2)) and not torch_compat.is_fake(None)
    with fake_mode, torch_compat.real_tensors():
        assert not torch_compat.is_fake(torch.ones(2))
    gm = torch.fx.symbolic_trace(lambda t: (t * 2).sum(0))
    torch_compat.propagate_fakes(gm, fake_mode, [x])
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert torch_compat.is_fake(out.meta["val"]) and tuple(out.meta["val"].shape) == (3,)
    with torch_compat.python_dispatcher(), torch_compat.tracing(fake_mode):
        assert torch._guards.TracingContext.try_get().fake_mode is fake_mode


def test_the_dynamo_and_config_accessors():
    torch_compat.reset_compiler()
    assert torch_compat.compile_counters()["inductor"]["no_such_event"] == 0
    assert callable(torch_compat.lookup_backend("eager"))
    with torch_compat.dynamo_config_patch(recompile_limit=17, specialize_float=True, no_such_setting=1):
        assert torch._dynamo.config.recompile_limit == 17 and torch._dynamo.config.specialize_float
    with torch_compat.below_autograd():
        pass
    assert torch_compat.inductor_mode_options("reduce-overhead")["triton.cudagraphs"]
    assert {"default", "reduce-overhead", "max-autotune"} <= set(torch_compat.inductor_mode_options())
    assert callable(torch_compat.inductor_compile_fx())
    assert torch_compat.inductor_setting("no_such_setting", "absent") == "absent"
    with torch_compat.inductor_config_patch({"cpp.simdlen": 1, "no_such_setting": 2}), \
            torch_compat.functorch_config_patch({"enable_autograd_cache": True}):
        assert torch_compat.inductor_setting("cpp.simdlen") == 1
        assert torch._functorch.config.enable_autograd_cache


def test_the_op_pytree_and_fx_accessors():
    assert torch_compat.op_overloads(torch.ops.aten.add.Tensor) == [torch.ops.aten.add.Tensor]
    assert torch.ops.aten.add.Tensor in torch_compat.op_overloads(torch.ops.aten.add)
    assert torch_compat.op_overloads(operator.add) == []
    assert torch_compat.cudagraph_unsafe_tags() == (torch.Tag.cudagraph_unsafe,)
    assert F.scaled_dot_product_attention in torch_compat.sdpa_functions()
    doubled = torch_compat.tree_map_only(torch.Tensor, lambda t: t * 2, (torch.ones(1), [2, {"a": torch.ones(1)}]))
    assert doubled[0].item() == 2 and doubled[1][0] == 2 and doubled[1][1]["a"].item() == 2
    gm = torch.fx.symbolic_trace(lambda t: t + 1)
    assert isinstance(torch_compat.empty_graph_like(gm.graph), torch.fx.Graph)


# --- Fallbacks where a name is missing -------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SettingsWithoutTheFlag:
    assume_static_by_default: bool = True


@pytest.mark.parametrize("shape_env, allowed", [
    (types.SimpleNamespace(settings=SettingsWithoutTheFlag()), False),
    (types.SimpleNamespace(allow_dynamic_output_shape_ops=False), True),  # a plain attribute
    (object(), False),
], ids=["settings without the flag", "plain attribute", "nothing"])
def test_dynamic_output_shapes_are_allowed_where_the_shape_environment_can_say_so(shape_env, allowed):
    assert torch_compat.allow_dynamic_output_shapes(shape_env) is allowed
    if allowed:
        assert shape_env.allow_dynamic_output_shape_ops is True


def test_the_backend_degrades_on_a_shape_environment_without_the_setting():
    from turbo_fx.backend import allow_unbacked_token_counts

    fake_mode = types.SimpleNamespace(shape_env=types.SimpleNamespace(settings=SettingsWithoutTheFlag()))
    allow_unbacked_token_counts(fake_mode)  # no error: the token counts stay concrete


def test_a_graph_merges_with_concrete_counts_where_symbolic_ones_are_not_allowed(turbo, monkeypatch, caplog):
    """The end of that road: the symbolic rewrite fails on the merge op, the concrete one stays
    and the graph still merges, as it does with symbolic counts."""
    model, x = small_vit(depth=2), images(2)
    expected = turbo(model, r=3, inner_backend="aot_eager", compile_blocks=False)(x)
    torch._dynamo.reset()
    monkeypatch.setattr(torch_compat, "allow_dynamic_output_shapes", lambda shape_env: False)
    with caplog.at_level(logging.INFO, logger="turbo_fx"):
        compiled = turbo(model, r=3, inner_backend="aot_eager", compile_blocks=False)
        out = compiled(x)
    assert compiled.report.fallback_reason is None and compiled.report.merges == 2
    assert "kept concrete token counts" in caplog.text
    torch.testing.assert_close(out, expected)


def test_backed_values_fall_back_to_var_to_val_and_name_what_is_missing():
    values = {"s0": 3}
    assert torch_compat.backed_symbol_values(types.SimpleNamespace(var_to_val=values)) is values
    with pytest.raises(CannotRewrite, match="backed_var_to_val"):
        torch_compat.backed_symbol_values(object())


def test_shape_hints_read_an_unbacked_size_through_the_older_spelling(monkeypatch):
    fake_mode, x = fake_sizes(5)
    unbacked = fake_mode.shape_env.create_unbacked_symint()
    total = unbacked + x.shape[0]
    monkeypatch.setattr(total.node, "shape_env", OlderShapeEnv(fake_mode.shape_env))
    hints = ShapeHints()
    hints.learn(unbacked, 3)
    assert hints(total) == 8


def test_sizes_and_guards_degrade_without_the_shape_environment_methods(monkeypatch):
    _, x = fake_sizes(5)
    monkeypatch.delattr(ShapeEnv, "bound_sympy")
    size = x.shape[0]
    assert torch_compat.size_lower_bound(size) == 0
    bare = object()
    assert torch_compat.shape_guards(bare, [x]) == torch_compat.NEVER
    assert not torch_compat.shape_guards_hold(bare, torch_compat.NEVER, [torch.empty(5, 3)])
    with torch_compat.fresh_unbacked_symbols_dropped(bare), torch_compat.fresh_unbacked_symbols_dropped(None):
        pass


def test_a_missing_private_name_raises_a_rewrite_error_naming_it(monkeypatch):
    import torch._subclasses.fake_tensor as fake_tensor

    monkeypatch.delattr(fake_tensor, "FakeTensorMode")
    with pytest.raises(torch_compat.UnsupportedTorch, match="FakeTensorMode") as info:
        torch_compat.new_fake_mode()
    assert isinstance(info.value, CannotRewrite) and torch.__version__ in str(info.value)


def test_fake_tensors_are_not_recognised_without_the_class(monkeypatch):
    import torch._subclasses.fake_tensor as fake_tensor

    _, x = fake_sizes(4)
    monkeypatch.delattr(fake_tensor, "FakeTensor")
    assert not torch_compat.is_fake(x)


def test_dynamo_and_dispatcher_fallbacks(monkeypatch):
    import torch._dispatch.python as dispatch_python
    import torch._dynamo.backends.registry as registry
    import torch._dynamo.utils as dynamo_utils

    monkeypatch.delattr(dynamo_utils, "counters")
    assert torch_compat.compile_counters()["inductor"]["fxgraph_cache_hit"] == 0
    monkeypatch.delattr(registry, "lookup_backend")
    assert callable(torch_compat.lookup_backend("eager"))
    monkeypatch.delattr(torch._C, "_AutoDispatchBelowADInplaceOrView")
    monkeypatch.delattr(dispatch_python, "enable_python_dispatcher")
    with torch_compat.below_autograd(), torch_compat.python_dispatcher():
        pass


def test_a_renamed_setting_is_patched_under_its_other_name_and_an_unknown_one_left_out():
    class OlderDynamoConfig:
        cache_size_limit = 8

    settings = {"recompile_limit": 64, "specialize_float": True}
    assert torch_compat.known_settings(OlderDynamoConfig, settings) == {"cache_size_limit": 64}
    assert torch_compat.known_settings(torch._dynamo.config, settings) == settings


def test_inductor_modes_fall_back_to_the_documented_ones(monkeypatch):
    import torch._inductor

    monkeypatch.delattr(torch._inductor, "list_mode_options")
    assert torch_compat.inductor_mode_options("reduce-overhead") == {"triton.cudagraphs": True}
    assert not torch_compat.inductor_mode_options("default").get("triton.cudagraphs")
    assert set(torch_compat.inductor_mode_options()) == {"default", "reduce-overhead", "max-autotune",
                                                         "max-autotune-no-cudagraphs"}


def test_op_pytree_and_fx_fallbacks(monkeypatch):
    import torch._ops
    import torch.utils._pytree as pytree

    monkeypatch.delattr(torch._ops, "OpOverload")
    monkeypatch.delattr(torch._ops, "OpOverloadPacket")
    assert torch_compat.op_overloads(torch.ops.aten.add.Tensor) == []
    monkeypatch.delattr(pytree, "tree_map_only")
    Pair = collections.namedtuple("Pair", "a b")
    doubled = torch_compat.tree_map_only(torch.Tensor, lambda t: t * 2, [Pair(torch.ones(1), 5), {"k": torch.ones(1)}])
    assert isinstance(doubled[0], Pair) and doubled[0].a.item() == 2 and doubled[0].b == 5
    assert doubled[1]["k"].item() == 2
    monkeypatch.setattr(torch, "Tag", types.SimpleNamespace())
    assert torch_compat.cudagraph_unsafe_tags() == ()
    monkeypatch.setattr(torch._C, "_nn", types.SimpleNamespace())
    assert torch_compat.sdpa_functions() == {F.scaled_dot_product_attention}
    assert isinstance(torch_compat.empty_graph_like(object()), torch.fx.Graph)
