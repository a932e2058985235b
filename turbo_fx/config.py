"""The typed configuration of the turbo backend, validated once at the edge.

Every option a user can pass (as ``options={...}`` to ``torch.compile`` or as a
``TurboConfig``) is checked here, before any graph is touched. A bad value raises
``TurboConfigError`` (a ``ValueError``) that names the option and what it accepts.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

FUSIONS = ("sub", "div", "mul", "layer")
FUSION_ALIASES = {
    "R-alpha*I": "sub",
    "R/I": "div",
    "R*(1-alpha*I)": "mul",
    "R-beta**|gamma-block|*alpha*I": "layer",
}
METRICS = ("keys", "queries")
# Shapes of the r schedule that a FLOP budget solves for (``passes/flop_budget.py``).
BUDGET_SCHEDULES = ("constant", "decreasing")
# How a rotary cos/sin table follows merged tokens (``passes/token_tables.py``).
ROTARY_RULES = ("rows", "position", "destination")
INNER_BACKENDS = ("inductor", "aot_eager", "eager")
# Components of a generation block that merge-and-restore mode can merge before and restore after.
COMPONENTS = ("self-attention", "cross-attention", "feed-forward")


class TurboConfigError(ValueError):
    """An option the turbo backend does not accept; the message says what it does accept."""


@dataclass(frozen=True)
class LinearSchedule:
    """A merge count that falls linearly from ``first`` (block 0) to ``last`` (final block).

    Block ``i`` of ``n`` removes ``round(first + (last - first) * i / (n - 1))`` tokens.
    More merging early is where the paper and ToMe find the cheapest speed; the
    schedule must not increase (``first >= last >= 0``).
    """

    first: int
    last: int

    def __post_init__(self) -> None:
        for name in ("first", "last"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise TurboConfigError(
                    f"r schedule: '{name}' must be a non-negative int, got {value!r}"
                )
        if self.first < self.last:
            raise TurboConfigError(
                f"r schedule must decrease: first={self.first} < last={self.last}"
            )

    def counts(self, n_blocks: int) -> list[int]:
        if n_blocks <= 1:
            return [self.first] * n_blocks
        step = (self.last - self.first) / (n_blocks - 1)
        return [int(round(self.first + step * i)) for i in range(n_blocks)]


RSpec = Union[int, Sequence[int], LinearSchedule]


# The rewrite's passes, by name, in the order the driver runs them (``turbo_fx.rewrite.PASSES``
# holds the passes themselves; a test keeps the two lists equal). Named here, at the bottom of
# the package, so that ``disabled_passes`` is checked with every other option at the edge.
PASS_NAMES = ("explicit_as_sdpa", "insert_merges", "merge_and_restore", "compact_placeholders", "propagate_shapes",
              "weight_token_means", "restore_outputs")


@dataclass(frozen=True)
class GenerationOptions:
    """Merge-and-restore mode, for generation models: blocks whose tokens return to a spatial
    grid (diffusion UNets and DiTs). The graph decides the mode; ``r`` does not apply there.

    ratio: fraction of a block's tokens merged before each merging component, tomesd's
        meaning (0.5 halves them); clamped to the sources, 1 - 1/(sx*sy) of the tokens.
    max_downsample: only blocks whose grid is at most this many times smaller (per side)
        than the graph's largest grid merge: 1 (default) merges only the top resolution.
    merge_components: which components run on merged tokens, a subset of
        ("self-attention", "cross-attention", "feed-forward"). Default: self-attention only
        (tomesd's default). The paper merges all three; on the trained Fashion-MNIST stand-in
        that cost far more fidelity than it saved FLOPs (docs/results.md).
    sx, sy: each sx x sy cell of the grid holds one merge destination (default 2 x 2).
    use_rand: the destination's place in its cell is pseudo-random, fixed by ``seed`` and
        the block (default True); False takes each cell's top-left token.
    seed: the seed of those places.

    The information degree is the one of ``TurboConfig``: ``alpha`` weighs the semantic value,
    here taken from the latest earlier cross-attention to text at the same resolution.
    """

    ratio: float = 0.5
    max_downsample: int = 1
    merge_components: tuple = ("self-attention",)
    sx: int = 2
    sy: int = 2
    use_rand: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        ratio = self.ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
            raise TurboConfigError(f"option 'ratio' must be a number in [0, 1), got {ratio!r}")
        object.__setattr__(self, "ratio", float(ratio))
        for name in ("max_downsample", "sx", "sy"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise TurboConfigError(f"option '{name}' must be an int >= 1, got {getattr(self, name)!r}")
        if self.sx * self.sy < 2:
            raise TurboConfigError("options 'sx' and 'sy' are both 1: a 1 x 1 cell leaves no token to merge")
        if not _is_int(self.seed):
            raise TurboConfigError(f"option 'seed' must be an int, got {self.seed!r}")
        if not isinstance(self.use_rand, bool):
            raise TurboConfigError(f"option 'use_rand' must be True or False, got {self.use_rand!r}")
        components = (self.merge_components,) if isinstance(self.merge_components, str) else self.merge_components
        if not isinstance(components, (tuple, list)) or not all(c in COMPONENTS for c in components):
            raise TurboConfigError(
                f"option 'merge_components' must be a subset of {COMPONENTS}, got {self.merge_components!r}"
            )
        object.__setattr__(self, "merge_components", tuple(c for c in COMPONENTS if c in components))


@dataclass(frozen=True)
class CompileStrategy:
    """How the rewritten graph is compiled: advanced options, documented in full in
    docs/compile-paths.md. They change speed and compile time, never what the model computes.
    ``None`` means "decide from the other options"; the ``uses_*`` properties say what was decided.

    inner_backend: what compiles the rewritten graph: "inductor", "aot_eager", "eager".
    mode: Inductor's compile mode ("default", "reduce-overhead", "max-autotune",
        "max-autotune-no-cudagraphs"), as ``torch.compile(mode=...)`` gives it; torch.compile
        takes a mode or options but not both, so this is how CUDA graphs combine with turbo's
        options. Default None: the mode torch.compile passed, if any.
    fuse_merges: False (default): each block's merge is one opaque op, so compile time barely
        grows. True: Inductor traces the merge ops and fuses them among the model's own kernels;
        compile time then grows with the number of merging blocks.
    compile_merge_step: generate the merge step's kernels with Inductor instead of running it as
        about 70 ATen calls per block (on a GPU, as many kernel launches). Compiled block by
        block, each merge piece gets its token count symbolic, so all the merges of a model share
        one compiled step; compiled whole, the opaque op runs one dynamic-shape Inductor compile
        of the step, shared by every block. Default None: on for graphs compiled block by block,
        off for graphs compiled whole.
    compile_blocks: compile the merged graph piece by piece, split at its merge ops, each piece
        with its token count a backed symbolic size, so one block's compiled code serves the
        blocks after it and the graph is rewritten once. Only inference graphs with static
        shapes, no in-place updates and no random ops are split; any other is compiled whole.
        Default None: on wherever it applies (opaque merges, Inductor), with an info log where
        it does not; True: the same, with a warning; False: always compiled whole.
    symbolic_tokens: report each merged token count to Inductor as a symbolic (unbacked) size,
        so blocks that differ only in token count share shape-generic kernels (graphs compiled
        whole). Default None: on with opaque merges, off with ``fuse_merges``, and off in a
        CUDA-graph mode (Inductor captures no graph with a data-dependent size).
    explicit_as_sdpa: explicit attention (``softmax(q @ k^T * c + mask) @ v``) of the merged
        sequence and its readers is emitted as one ``scaled_dot_product_attention`` call
        (default True), so the key bias rides in its mask and Inductor keeps its fused kernel.
    disabled_passes: names of rewrite passes to skip, for debugging (``PASS_NAMES``). A
        skipped pass that the merged graph needs makes the graph fall back, naming it.
    """

    inner_backend: str = "inductor"
    mode: Optional[str] = None
    fuse_merges: bool = False
    compile_merge_step: Optional[bool] = None
    compile_blocks: Optional[bool] = None
    symbolic_tokens: Optional[bool] = None
    explicit_as_sdpa: bool = True
    disabled_passes: tuple = ()

    def __post_init__(self) -> None:
        _check_choice("inner_backend", self.inner_backend, INNER_BACKENDS)
        if self.mode is not None:
            from turbo_fx.torch_compat import inductor_mode_options

            _check_choice("mode", self.mode, tuple(inductor_mode_options()))
        for name in ("compile_blocks", "compile_merge_step", "symbolic_tokens"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise TurboConfigError(f"option '{name}' must be True, False or None, got {getattr(self, name)!r}")
        for name in ("fuse_merges", "explicit_as_sdpa"):
            if not isinstance(getattr(self, name), bool):
                raise TurboConfigError(f"option '{name}' must be True or False, got {getattr(self, name)!r}")
        if self.compile_merge_step is True and self.fuse_merges:
            raise TurboConfigError("option 'compile_merge_step' compiles the opaque merge op; with fuse_merges=True "
                                   "there is no such op (Inductor already generates the merge): set one of them")
        if self.compile_blocks is True and (self.fuse_merges or self.inner_backend != "inductor"):
            raise TurboConfigError("option 'compile_blocks' splits the graph at its opaque merge ops for Inductor: "
                                   "it needs fuse_merges=False and inner_backend='inductor'")
        disabled = (self.disabled_passes,) if isinstance(self.disabled_passes, str) else self.disabled_passes
        if not isinstance(disabled, (tuple, list)) or any(name not in PASS_NAMES for name in disabled):
            raise TurboConfigError(f"option 'disabled_passes' must name passes of {PASS_NAMES}, "
                                   f"got {self.disabled_passes!r}")
        object.__setattr__(self, "disabled_passes", tuple(disabled))

    @property
    def uses_compile_blocks(self) -> bool:
        if self.compile_blocks is None:
            return not self.fuse_merges and self.inner_backend == "inductor"
        return self.compile_blocks

    @property
    def uses_compile_merge_step(self) -> bool:
        """For graphs compiled block by block; a graph compiled whole compiles the opaque op's
        step only when ``compile_merge_step=True`` was asked for."""
        return self.compile_merge_step is not False

    @property
    def uses_symbolic_tokens(self) -> bool:
        if self.symbolic_tokens is None:
            return not self.fuse_merges
        return self.symbolic_tokens

    def for_cuda_graphs(self) -> "CompileStrategy":
        """This strategy for a compile mode that captures CUDA graphs: merged token counts stay
        concrete unless ``symbolic_tokens`` was asked for, since Inductor captures no graph
        that has a data-dependent size (the opaque op's symbolic counts are)."""
        if self.symbolic_tokens is not None:
            return self
        return dataclasses.replace(self, symbolic_tokens=False)


@dataclass(frozen=True, init=False)
class TurboConfig:
    """What the turbo backend does to a model: the algorithm's options, plus the generation
    options (``GenerationOptions``) and how the result is compiled (``CompileStrategy``).

    r: tokens removed per attention block: an int (every block), a list with one
        entry per attention block, or a ``LinearSchedule``. Clamped per block to
        half of the mergeable tokens and to ``min_tokens``.
    flops: a FLOP budget instead of ``r``: the merged graph's FLOPs as a fraction of the
        unmerged graph's, in (0, 1]. r per block is solved for each graph from the graph
        itself (``passes/flop_budget.py``); the report states the schedule and the ratio
        it predicts. Generation graphs (merge and restore) get their ``ratio`` solved instead.
    schedule: the shape of the solved r: "constant" (default; one more token in the first
        blocks where the budget falls between two constants) or "decreasing" (r falls
        linearly to a third of its first value).
    alpha: weight of the semantic value in the information degree.
    beta, gamma: the layer-wise fusion's decay and peak block (fusion="layer").
    fusion: how redundancy R and semantic value I combine into the information
        degree E: "sub" (R - alpha*I, default), "div" (R / I), "mul"
        (R * (1 - alpha*I)), "layer" (R - beta**|gamma - block| * alpha*I).
    metric: the token features whose cosine similarity is the redundancy:
        "keys" (default) or "queries", averaged over heads.
    semantic: include the semantic value; False gives redundancy-only merging
        (what ToMe does).
    redundancy: include the mutual redundancy in the ranking (default True). False
        with ``semantic`` ranks by semantic value alone (E = -I; the ablation
        "semantic only"): the least attended tokens merge, each into its most
        similar partner. ``fusion`` and ``alpha`` then have no effect.
    keep_salient: in every block, the k unprotected tokens with the highest semantic
        value neither merge nor receive merges (default 0, the paper's rule). Attention
        sinks, such as BERT's [SEP], draw most of the CLS attention and have keys similar
        to punctuation: without this they absorb other tokens and lose their role. Needs
        ``semantic``.
    prop_attn: add log(size) to the attention logits of later blocks so a merged
        token is attended as often as the tokens it stands for.
    cross_attention_bias: the same log(size) key bias for cross-attention of other sequences
        that reads the merged tokens (a text decoder over merged image tokens). None (default)
        follows ``prop_attn``; False lets them attend over the merged tokens as if each stood
        for one token (an ablation), True keeps the bias there when ``prop_attn=False``.
        Padding keys stay masked either way.
    min_tokens: never merge a sequence below this many tokens (the paper's threshold).
    protected: "auto" (prepended parameter tokens, such as CLS, distillation and
        register tokens; none in a sequence of patch tokens only) or a count of leading
        tokens that never merge.
    restore_outputs: graph outputs that carry the token axis get the original token
        count back (each original token takes its merged token's value).
    rotary: the rotary cos/sin rows of a merged token: "rows" (default: the mean of its
        members' cos/sin rows) or "position" (the mean of its members' rotation angles, the
        angle of their mean position, with cos/sin recomputed, where the graph computes the
        tables from angles; elsewhere "rows") or, in merge-and-restore mode, "destination"
        (the row of the token whose place the merged token keeps; elsewhere "rows"). On a RoPE ViT trained on Fashion-MNIST "rows"
        kept closer to the unmerged model at every merge amount (docs/results.md). Per-token
        tables that are added (position embeddings) are always averaged by rows, which
        equals merging after the add.
    generation: ``GenerationOptions`` (merge-and-restore mode).
    strategy: ``CompileStrategy`` (how the rewritten graph is compiled).

    Options are given flat, as in ``options={...}`` of torch.compile: ``TurboConfig(r=13,
    ratio=0.4, fuse_merges=True)`` routes ``ratio`` to ``generation`` and ``fuse_merges`` to
    ``strategy`` (the flat name wins over the same field of a ``generation``/``strategy`` given
    whole). Each option has that one name; it is read where it lives (``config.strategy.mode``).

    The semantic value I is the CLS query's attention over the current tokens
    multiplied by the number of tokens that can be attended (1.0 = uniform
    attention), so alpha means the same at 50 tokens as at 1000: one unit of alpha
    trades one unit of cosine similarity against attention equal to the average.
    """

    r: RSpec = 8
    flops: Optional[float] = None
    schedule: str = "constant"
    alpha: float = 0.05
    beta: float = 0.9
    gamma: float = 6.0
    fusion: str = "sub"
    metric: str = "keys"
    semantic: bool = True
    redundancy: bool = True
    keep_salient: int = 0
    prop_attn: bool = True
    cross_attention_bias: Optional[bool] = None
    min_tokens: int = 0
    protected: Union[str, int] = "auto"
    restore_outputs: bool = True
    rotary: str = "rows"
    generation: GenerationOptions = field(default_factory=GenerationOptions)
    strategy: CompileStrategy = field(default_factory=CompileStrategy)

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(OPTIONS) - {"generation", "strategy"})
        if unknown:
            raise TurboConfigError(f"unknown turbo option(s) {unknown}; allowed options: {sorted(OPTIONS)}")
        for name in ALGORITHM_OPTIONS:
            object.__setattr__(self, name, options.get(name, _ALGORITHM_DEFAULTS[name]))
        for group, cls, names in (("generation", GenerationOptions, GENERATION_OPTIONS),
                                  ("strategy", CompileStrategy, STRATEGY_OPTIONS)):
            given = options.get(group, cls())
            if isinstance(given, Mapping):
                given = cls(**given)
            if not isinstance(given, cls):
                raise TurboConfigError(f"option '{group}' must be a {cls.__name__} or a dict, got {given!r}")
            flat = {name: options[name] for name in names if name in options}
            object.__setattr__(self, group, dataclasses.replace(given, **flat) if flat else given)
        self.__post_init__()

    def __post_init__(self) -> None:
        object.__setattr__(self, "r", _validate_r(self.r))
        for name in ("alpha", "beta", "gamma"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TurboConfigError(f"option '{name}' must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.alpha < 0:
            raise TurboConfigError(f"option 'alpha' must be >= 0, got {self.alpha}")
        if self.beta <= 0:
            raise TurboConfigError(f"option 'beta' must be > 0, got {self.beta}")
        fusion = FUSION_ALIASES.get(self.fusion, self.fusion)
        if fusion not in FUSIONS:
            raise TurboConfigError(
                f"option 'fusion' must be one of {FUSIONS} (or {tuple(FUSION_ALIASES)}), got {self.fusion!r}"
            )
        object.__setattr__(self, "fusion", fusion)
        _check_choice("metric", self.metric, METRICS)
        _check_choice("rotary", self.rotary, ROTARY_RULES)
        _check_choice("schedule", self.schedule, BUDGET_SCHEDULES)
        if self.flops is not None:
            if isinstance(self.flops, bool) or not isinstance(self.flops, (int, float)) or not 0 < self.flops <= 1:
                raise TurboConfigError(f"option 'flops' must be a FLOP ratio in (0, 1], got {self.flops!r}")
            if self.r != _ALGORITHM_DEFAULTS["r"]:
                raise TurboConfigError("options 'flops' and 'r' both given: a FLOP budget solves r; give one of them")
            object.__setattr__(self, "flops", float(self.flops))
        if self.cross_attention_bias is None:
            object.__setattr__(self, "cross_attention_bias", self.prop_attn)
        for name in ("semantic", "redundancy", "prop_attn", "cross_attention_bias", "restore_outputs"):
            if not isinstance(getattr(self, name), bool):
                raise TurboConfigError(f"option '{name}' must be True or False, got {getattr(self, name)!r}")
        if not (self.semantic or self.redundancy):
            raise TurboConfigError(
                "options 'semantic' and 'redundancy' are both False: nothing left to rank tokens by"
            )
        if not _is_int(self.keep_salient) or self.keep_salient < 0:
            raise TurboConfigError(f"option 'keep_salient' must be an int >= 0, got {self.keep_salient!r}")
        if self.keep_salient and not self.semantic:
            raise TurboConfigError("option 'keep_salient' ranks tokens by semantic value; it needs semantic=True")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise TurboConfigError(f"option 'min_tokens' must be an int >= 0, got {self.min_tokens!r}")
        if self.protected != "auto" and (not _is_int(self.protected) or self.protected < 0):
            raise TurboConfigError(
                f"option 'protected' must be 'auto' or an int >= 0, got {self.protected!r}"
            )

    def r_per_block(self, n_blocks: int) -> list[int]:
        """Requested merges for each of ``n_blocks`` attention blocks (before clamping)."""
        if isinstance(self.r, int):
            return [self.r] * n_blocks
        if isinstance(self.r, LinearSchedule):
            return self.r.counts(n_blocks)
        if len(self.r) != n_blocks:
            raise TurboConfigError(
                f"option 'r' lists {len(self.r)} blocks but the graph has {n_blocks} attention blocks"
            )
        return list(self.r)

    def for_cuda_graphs(self) -> "TurboConfig":
        """This config for a compile mode that captures CUDA graphs (``CompileStrategy.for_cuda_graphs``)."""
        return dataclasses.replace(self, strategy=self.strategy.for_cuda_graphs())

    def replace(self, **changes: Any) -> "TurboConfig":
        """A copy with ``changes``, given flat as in ``options={...}``; a default that depends
        on another option (``cross_attention_bias`` on ``prop_attn``) follows the new value
        unless it is given too."""
        if "prop_attn" in changes and "cross_attention_bias" not in changes:
            changes["cross_attention_bias"] = None
        options = {name: getattr(self, name) for name in ALGORITHM_OPTIONS}
        return TurboConfig(**{**options, "generation": self.generation, "strategy": self.strategy, **changes})


ALGORITHM_OPTIONS = tuple(f.name for f in dataclasses.fields(TurboConfig) if f.name not in ("generation", "strategy"))
_ALGORITHM_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TurboConfig) if f.name in ALGORITHM_OPTIONS}
GENERATION_OPTIONS = tuple(f.name for f in dataclasses.fields(GenerationOptions))
STRATEGY_OPTIONS = tuple(f.name for f in dataclasses.fields(CompileStrategy))
OPTIONS = ALGORITHM_OPTIONS + GENERATION_OPTIONS + STRATEGY_OPTIONS


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise TurboConfigError(f"option '{name}' must be one of {tuple(allowed)}, got {value!r}")


def _validate_r(r: Any) -> RSpec:
    if _is_int(r):
        if r < 0:
            raise TurboConfigError(f"option 'r' must be >= 0, got {r}")
        return r
    if isinstance(r, LinearSchedule):
        return r
    if isinstance(r, Mapping):
        unknown = set(r) - {"first", "last"}
        if unknown or not {"first", "last"} <= set(r):
            raise TurboConfigError(
                f"option 'r' as a schedule must be {{'first': int, 'last': int}}, got {dict(r)!r}"
            )
        return LinearSchedule(first=r["first"], last=r["last"])
    if isinstance(r, (list, tuple)):
        if not r:
            raise TurboConfigError("option 'r' as a list must not be empty")
        for v in r:
            if not _is_int(v) or v < 0:
                raise TurboConfigError(f"option 'r' list entries must be ints >= 0, got {v!r}")
        return tuple(r)
    raise TurboConfigError(
        "option 'r' must be an int, a list of ints (one per attention block) or a "
        f"schedule {{'first': int, 'last': int}} / LinearSchedule, got {r!r}"
    )


def resolve_config(options: Union[None, TurboConfig, Mapping[str, Any]] = None, **extra: Any) -> TurboConfig:
    """Turn whatever the user passed (None, a dict of flat options, a TurboConfig, keywords)
    into a TurboConfig."""
    if isinstance(options, TurboConfig):
        return options.replace(**extra) if extra else options
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise TurboConfigError(
            f"turbo options must be a dict or turbo_fx.TurboConfig, got {type(options).__name__}"
        )
    return TurboConfig(**{**options, **extra})
