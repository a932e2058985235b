"""Property: on any small timm ViT and any options, the turbo backend gives the reference's output.

Hypothesis draws the model (class token or not, registers, pooling, depth, heads, head width,
image and patch size, position embeddings on the prefix or not, qk norm, layer scale) and the
options (r as an int, a list or a {'first', 'last'} schedule; alpha; the four fusions; metric;
semantic; redundancy; keep_salient; prop_attn; min_tokens; protected; opaque or fused merges).
The compiled model must never fall back and must agree with ``turbo_fx.reference`` within 1e-4.
Where the reference refuses a configuration (semantic-only ranking without a class token; a
head that finds an unprotected token by position) the backend must refuse it too, for the same
reason, and compile the model unchanged.

The draws are derandomised so that CI sees the same cases on every run. A failure prints the
case as ``case=({model kwargs}, {options})``: ``random_vit(**model_kwargs)`` and
``TurboConfig(**options)`` rebuild it.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("hypothesis")
pytest.importorskip("timm")
from hypothesis import HealthCheck, Phase, event, example, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from turbo_fx import recording  # noqa: E402
from turbo_fx.config import TurboConfig  # noqa: E402
from turbo_fx.reference import merge_count, protected_count, reference_forward, sequence_config  # noqa: E402

TOL = 1e-4
BATCH = 2
FUSIONS = ("sub", "div", "mul", "layer")
GRID_SIDES = (2, 3, 4, 5, 6)
# Sized for CI on 2 cores: each example compiles a fresh model (one to three seconds with the
# eager inner backend) and runs the per-sample reference.
EAGER_EXAMPLES = 50


# ----------------------------------------------------------------------------------------
# What is drawn
# ----------------------------------------------------------------------------------------


@st.composite
def vit_kwargs(draw) -> dict:
    """Keyword arguments of ``random_vit``: 4 to 36 patches, embed dim = heads * 8 or 16."""
    class_token = draw(st.booleans())
    # sampled_from draws small ranges evenly; integers() favours their ends.
    heads = draw(st.sampled_from([1, 2, 3]))
    patch = draw(st.sampled_from([2, 4, 8]))
    grid = (draw(st.sampled_from(GRID_SIDES)), draw(st.sampled_from(GRID_SIDES)))
    return dict(
        class_token=class_token,
        reg_tokens=draw(st.integers(0, 2)),
        # timm reads the class token for "token" pooling, so only a model with one may pool so.
        global_pool=draw(st.sampled_from(["token", "avg"] if class_token else ["avg"])),
        depth=draw(st.sampled_from([1, 2, 3])),
        num_heads=heads,
        embed_dim=heads * draw(st.sampled_from([8, 16])),
        img_size=(grid[0] * patch, grid[1] * patch),
        patch_size=patch,
        no_embed_class=draw(st.booleans()),
        qk_norm=draw(st.booleans()),
        init_values=draw(st.sampled_from([None, 0.5])),
        seed=draw(st.integers(0, 2**16)),
    )


def r_options(depth: int) -> st.SearchStrategy:
    """r as an int, one int per block, or a falling schedule; r = 0 only in a list or a schedule's
    end, since a model that merges nothing checks little."""
    schedule = st.integers(1, 12).flatmap(
        lambda first: st.fixed_dictionaries({"first": st.just(first), "last": st.integers(0, first)})
    )
    return st.one_of(st.integers(1, 12), st.lists(st.integers(0, 10), min_size=depth, max_size=depth), schedule)


@st.composite
def turbo_options(draw, depth: int) -> dict:
    """Options of ``torch.compile(..., backend="turbo")`` for a model of ``depth`` blocks."""
    semantic = draw(st.booleans())
    options = dict(
        r=draw(r_options(depth)),
        alpha=draw(st.floats(0.0, 2.0, allow_subnormal=False)),
        fusion=draw(st.sampled_from(FUSIONS)),
        metric=draw(st.sampled_from(["keys", "queries"])),
        semantic=semantic,
        prop_attn=draw(st.booleans()),
        # Sequences hold 4 to 39 tokens: a larger floor would stop every merge.
        min_tokens=draw(st.one_of(st.just(0), st.integers(0, 16))),
        protected=draw(st.one_of(st.just("auto"), st.integers(0, 3))),
    )
    if options["fusion"] == "layer":
        options.update(beta=draw(st.floats(0.5, 1.0)), gamma=draw(st.floats(0.0, 3.0)))
    if semantic:
        # Semantic-only ranking is an ablation: drawn once in four.
        options.update(redundancy=draw(st.sampled_from([True, True, True, False])),
                       keep_salient=draw(st.integers(0, 2)))
    if draw(st.sampled_from([False, False, False, True])):
        # Merge ops traced into the graph instead of one opaque op per block: a second rewrite.
        options["fuse_merges"] = True
    return options


@st.composite
def cases(draw) -> tuple[dict, dict]:
    model = draw(vit_kwargs())
    return model, draw(turbo_options(model["depth"]))


# ----------------------------------------------------------------------------------------
# Models, inputs and the check
# ----------------------------------------------------------------------------------------


def random_vit(seed: int, **kwargs) -> torch.nn.Module:
    """A timm ViT with weights spread wide enough that attention is far from uniform, so that
    semantic values and similarities differ from token to token (as in ``model_builders``)."""
    torch.manual_seed(seed)
    model = VisionTransformer(num_classes=5, mlp_ratio=2.0, **kwargs)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 or "token" in name:
                param.normal_(0.0, 0.3 if "qkv" in name else 0.15)
    return model.eval()


def random_images(model_kwargs: dict) -> torch.Tensor:
    height, width = model_kwargs["img_size"]
    return torch.randn(BATCH, 3, height, width, generator=torch.Generator().manual_seed(model_kwargs["seed"] + 1))


def compile_and_run(model: torch.nn.Module, x: torch.Tensor, options: dict) -> tuple[torch.Tensor, list]:
    """The turbo-compiled model's output on x and the reports of the graphs it compiled."""
    # Each example is a new model: Dynamo's caches must not carry one example's guards and
    # recompile counts into the next (the suite's per-test reset runs once for all examples).
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="turbo", options=options)
    with recording() as rec, torch.no_grad():
        out = compiled(x)
    return out, rec.graphs


def tokens_per_block(model: torch.nn.Module, config: TurboConfig) -> list[int]:
    """The sequence length entering each block, as the reference merges it."""
    n = model.patch_embed.num_patches + model.num_prefix_tokens
    p = protected_count(model, config)
    counts = []
    for r in config.r_per_block(len(model.blocks)):
        counts.append(n)
        n -= merge_count(n, r, p, config.min_tokens, config.keep_salient)
    return counts


# What the backend's fallback reason says where the reference refuses, by the reference's words.
REFUSALS = {
    "needs a class token": "needs a class token",
    "the head finds": "indexes the token axis",
}


def check_case(model_kwargs: dict, options: dict, inner_backend: str) -> None:
    model = random_vit(**model_kwargs)
    x = random_images(model_kwargs)
    out, graphs = compile_and_run(model, x, {**options, "inner_backend": inner_backend})
    assert graphs, "the backend compiled no graph"
    for report in graphs:
        note(report.table())
    config = TurboConfig(**options)
    try:
        with torch.no_grad():
            expected = reference_forward(model, x, config)
    except ValueError as exc:
        note(f"the reference refuses: {exc}")
        event("refused", backend_reason(str(exc)))
        assert_refused_unchanged(model, x, out, graphs, backend_reason(str(exc)))
        return
    event("merges", "some" if graphs[0].merges else "none")
    assert [g.fallback_reason for g in graphs] == [None] * len(graphs)
    error = (out - expected).abs().max().item()
    note(f"max |compiled - reference| = {error:.3g}")
    assert error <= TOL
    allowed = sequence_config(model, config)
    assert graphs[0].protected == protected_count(model, allowed)
    assert graphs[0].tokens_per_block == tokens_per_block(model, allowed)


def backend_reason(refusal: str) -> str:
    return next(reason for words, reason in REFUSALS.items() if words in refusal)


def assert_refused_unchanged(model: torch.nn.Module, x: torch.Tensor, out: torch.Tensor, graphs: list,
                             reason: str) -> None:
    assert all(reason in (g.fallback_reason or "") for g in graphs)
    with torch.no_grad():
        assert (out - model(x)).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------------------
# The properties
# ----------------------------------------------------------------------------------------

# Always run, whatever the draws: a patch-only sequence (class_token=False, no registers)
# protects no token and ranks by redundancy alone, and refuses semantic-only ranking; a head
# that reads an unprotected class token is refused.
PATCH_ONLY = dict(class_token=False, reg_tokens=0, global_pool="avg", depth=2, num_heads=2, embed_dim=32,
                  img_size=(24, 24), patch_size=4, no_embed_class=False, qk_norm=False, init_values=None, seed=0)
PATCH_ONLY_OPTIONS = dict(r=4, alpha=1.0, fusion="sub", metric="keys", semantic=True, prop_attn=True,
                          min_tokens=0, protected="auto")


@settings(max_examples=EAGER_EXAMPLES, deadline=None, derandomize=True, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=cases())
@example(case=(PATCH_ONLY, PATCH_ONLY_OPTIONS))
@example(case=(PATCH_ONLY, {**PATCH_ONLY_OPTIONS, "redundancy": False}))
@example(case=(dict(PATCH_ONLY, class_token=True, global_pool="token"), {**PATCH_ONLY_OPTIONS, "protected": 0}))
def test_compiled_graph_equals_the_reference(case):
    check_case(*case, inner_backend="eager")


# Through Inductor, compile_blocks and the opaque merge op (the default path): about half a
# minute a case on 2 cores, so two cases chosen to merge in every block, not drawn.
DEFAULT_PATH_CASES = [
    (dict(class_token=True, reg_tokens=2, global_pool="token", depth=3, num_heads=2, embed_dim=32, img_size=(24, 20),
          patch_size=4, no_embed_class=True, qk_norm=True, init_values=0.5, seed=1),
     dict(r=[4, 3, 2], alpha=0.5, fusion="layer", beta=0.8, gamma=1.0, metric="queries", semantic=True,
          prop_attn=True, min_tokens=0, protected="auto")),
    (dict(PATCH_ONLY, depth=3),
     dict(r={"first": 5, "last": 2}, alpha=1.0, fusion="div", metric="keys", semantic=True, prop_attn=True,
          min_tokens=10, protected="auto")),
]


@settings(deadline=None, database=None, phases=[Phase.explicit])
@given(case=cases())
@example(case=DEFAULT_PATH_CASES[0])
@example(case=DEFAULT_PATH_CASES[1])
def test_default_compile_path_equals_the_reference(case):
    check_case(*case, inner_backend="inductor")
