"""shared_pieces: a piece runs an earlier piece's compiled code exactly when a Dynamo guard on
that earlier compile would pass: same code and input kinds, sizes and strides that fit its
symbolic shapes, and every shape guard its compile added."""
from __future__ import annotations

import pytest
import torch
from torch.fx import GraphModule, Graph

from turbo_fx import block_compile
from turbo_fx.block_compile import PieceCounts
from turbo_fx.shared_pieces import SharedPieces


def scaled_by_count(x: torch.Tensor) -> torch.Tensor:
    """Branches on the token count: tracing it with a symbolic count adds a shape guard."""
    return x * 2.0 if x.shape[1] > 16 else x + 1.0


torch.fx.wrap("scaled_by_count")


def piece_calling(fn) -> GraphModule:
    graph = Graph()
    x, w = graph.placeholder("v0"), graph.placeholder("v1")
    y = graph.call_function(fn, (x,))
    graph.output((graph.call_function(torch.add, (y, w)),))
    return GraphModule(torch.nn.Module(), graph)


def eager_compile(gm, fake_inputs):
    """A compile_piece that traces like Inductor's front end (so guards land in the shape
    environment) and runs the traced graph as it is."""
    from torch._functorch.aot_autograd import aot_module_simplified

    return aot_module_simplified(gm, fake_inputs, fw_compiler=lambda g, _: g.forward)


def compile_into(shared: SharedPieces, piece, args, counts: PieceCounts):
    return block_compile._compile_with_token_dims(eager_compile, piece, args, [[1], []], counts, shared,
                                                  example_values=False)


def tokens(n: int, channels: int = 4, dtype=torch.float32) -> tuple:
    return torch.randn(2, n, channels, dtype=dtype), torch.randn(channels, dtype=dtype)


def test_a_matching_piece_runs_the_earlier_compiled_code_and_computes_its_own_result():
    shared, counts = SharedPieces(), PieceCounts()
    first = compile_into(shared, piece_calling(scaled_by_count), tokens(20), counts)
    args = tokens(24)  # another token count past the guard's threshold: the same code serves
    second = compile_into(shared, piece_calling(scaled_by_count), args, counts)
    assert second is first
    assert (counts.generated + counts.cached, counts.shared) == (1, 1)
    assert torch.allclose(second(*args)[0], args[0] * 2.0 + args[1])


def test_a_token_count_that_fails_the_earlier_compile_s_guards_is_compiled_anew():
    shared, counts = SharedPieces(), PieceCounts()
    first = compile_into(shared, piece_calling(scaled_by_count), tokens(20), counts)
    args = tokens(8)  # the other branch: the earlier code would compute x * 2
    second = compile_into(shared, piece_calling(scaled_by_count), args, counts)
    assert second is not first and counts.shared == 0
    assert torch.allclose(second(*args)[0], args[0] + 1.0 + args[1])


def test_other_static_sizes_strides_dtypes_or_code_are_not_shared():
    shared, counts = SharedPieces(), PieceCounts()
    compile_into(shared, piece_calling(scaled_by_count), tokens(20), counts)
    x, w = tokens(24)
    others = {
        "channels": tokens(24, channels=8),
        "batch": (torch.randn(3, 24, 4), w),
        "strides": (torch.randn(2, 4, 24).transpose(1, 2), w),
        "offset": (torch.randn(2, 25, 4)[:, 1:], w),
        "dtype": tokens(24, dtype=torch.float64),
    }
    for name, args in others.items():
        assert shared.find("compute", piece_calling(scaled_by_count), args, [[1], []]) is None, name
    assert shared.find("compute", piece_calling(torch.neg), (x, w), [[1], []]) is None
    assert shared.find("merge", piece_calling(scaled_by_count), (x, w), [[1], []]) is None
    assert shared.find("compute", piece_calling(scaled_by_count), (x, w), [[1], []]) is not None


def test_a_piece_that_reads_its_own_tensors_is_never_shared():
    def with_attribute() -> GraphModule:
        root = torch.nn.Module()
        root.register_buffer("offset", torch.randn(4))
        graph = Graph()
        x, w = graph.placeholder("v0"), graph.placeholder("v1")
        y = graph.call_function(torch.add, (x, graph.get_attr("offset")))
        graph.output((graph.call_function(torch.add, (y, w)),))
        return GraphModule(root, graph)

    shared, counts = SharedPieces(), PieceCounts()
    first_piece = with_attribute()
    first = compile_into(shared, first_piece, tokens(20), counts)
    second = compile_into(shared, with_attribute(), tokens(24), counts)
    assert second is not first and counts.shared == 0


def linear_piece() -> GraphModule:
    graph = Graph()
    x, w = graph.placeholder("v0"), graph.placeholder("v1")
    graph.output((graph.call_function(torch.nn.functional.linear, (x, w)),))
    return GraphModule(torch.nn.Module(), graph)


def quantised_weight(config_name: str, seed: int = 0, **options) -> torch.Tensor:
    """A torchao tensor subclass standing for a (4, 4) float32 weight (``config_name`` with
    ``options``), made without torchao's changes to the global Inductor settings."""
    import torchao.quantization as ao

    torch.manual_seed(seed)
    layer = torch.nn.Linear(4, 4, bias=False)
    ao.quantize_(layer, getattr(ao, config_name)(set_inductor_config=False, **options))
    return layer.weight.detach()


def test_a_piece_with_quantised_weights_never_runs_code_compiled_for_plain_weights():
    """A subclass reports the dtype, sizes and strides of the tensor it stands for, so only its
    type and inner tensors tell it from a plain weight."""
    pytest.importorskip("torchao")
    quantised = quantised_weight("Int8WeightOnlyConfig")
    plain = quantised.dequantize()
    assert (quantised.dtype, quantised.shape, quantised.stride()) == (plain.dtype, plain.shape, plain.stride())
    x = torch.randn(2, 20, 4)
    shared, counts = SharedPieces(), PieceCounts()
    for_plain = compile_into(shared, linear_piece(), (x, plain), counts)
    assert shared.find("compute", linear_piece(), (x, quantised), [[1], []]) is None
    for_quantised = compile_into(shared, linear_piece(), (torch.randn(2, 24, 4), quantised), counts)
    assert for_quantised is not for_plain and counts.shared == 0
    assert shared.find("compute", linear_piece(), (x, plain), [[1], []]) is for_plain
    assert torch.allclose(for_quantised(x, quantised)[0], torch.nn.functional.linear(x, quantised), atol=1e-6)


def test_quantised_weights_share_code_only_with_the_same_subclass_and_metadata():
    pytest.importorskip("torchao")
    from torchao.quantization.granularity import PerGroup

    first = quantised_weight("Int8WeightOnlyConfig")
    shared, counts = SharedPieces(), PieceCounts()
    compiled = compile_into(shared, linear_piece(), (torch.randn(2, 20, 4), first), counts)
    x, other = torch.randn(2, 24, 4), quantised_weight("Int8WeightOnlyConfig", seed=1)
    assert shared.find("compute", linear_piece(), (x, other), [[1], []]) is compiled
    assert torch.allclose(compiled(x, other)[0], torch.nn.functional.linear(x, other), atol=1e-6)
    others = {
        "float8 for int8": quantised_weight("Float8WeightOnlyConfig"),
        "another block size": quantised_weight("Int8WeightOnlyConfig", granularity=PerGroup(2)),
        "inner strides": _rebuilt(other, column_major_data=True),
        "flatten metadata": _rebuilt(other, reduce_range=True),
    }
    for name, weight in others.items():
        assert shared.find("compute", linear_piece(), (x, weight), [[1], []]) is None, name
    assert shared.find("compute", linear_piece(), (x, _rebuilt(other)), [[1], []]) is compiled


def _rebuilt(weight: torch.Tensor, column_major_data: bool = False, **metadata) -> torch.Tensor:
    """``weight`` flattened and built again: its int8 data held column-major where asked,
    ``metadata`` in place of the flatten metadata's entries of those names."""
    names, context = weight.__tensor_flatten__()
    inner = {name: getattr(weight, name) for name in names}
    if column_major_data:
        inner["qdata"] = inner["qdata"].t().contiguous().t()
    return type(weight).__tensor_unflatten__(inner, {**context, **metadata}, weight.shape, weight.stride())
