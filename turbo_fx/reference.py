"""A slow, plain reference implementation of Turbo token merging for timm ViTs.

This module is the executable specification that the graph passes are tested
against. It patches nothing in the graph sense: it re-runs a timm
``VisionTransformer`` block by block, one sample at a time, with explicit
attention, and applies the Turbo algorithm (understanding mode) between the
attention and the MLP sub-block of every block. Clarity beats speed here.

Per block ``i`` and per sample, with ``x`` [N, C] the tokens, ``s`` [N] their
sizes (how many original tokens each one stands for) and ``p`` protected
leading tokens (``protected="auto"``: the model's prefix tokens, none in a
sequence of patch tokens only):

1. Attention with proportional attention: logits ``q k^T * scale + log s_j``
   (the bias only when ``config.prop_attn``; before the first merge all sizes
   are 1 and the bias is exactly 0). ``x = x + ls1(proj(attn @ v))``.
2. Metric: keys (or queries) averaged over heads -> [N, Dh].
3. Semantic value: the attention row of token 0 (CLS), averaged over heads,
   times N, so 1.0 means "attended like the average token". A sequence of
   patch tokens only (no class or register token) has no such row: it ranks by
   redundancy alone (``semantic=False``, ``keep_salient=0``), and semantic-only
   ranking (``redundancy=False``) is refused (``sequence_config``).
4. ``r_eff = max(0, min(r_i, (N - p) // 2, N - min_tokens))``.
5. Bipartite split of the unprotected tokens: A = p, p+2, ..., B = p+1, p+3, ...
   Each a in A finds its most cosine-similar b in B: redundancy R_a, match_a.
6. Information degree E_a from R_a and I_a (``config.fusion``).
7. The ``r_eff`` tokens of A with the highest E merge into their matches by a
   size-weighted average (computed in float32, float64 for float64 models);
   sources disappear.
8. Survivors keep their relative order; then ``x = x + ls2(mlp(norm2(x)))``.

After the last block: ``model.norm`` and the model's own head; "avg" pooling is a
size-weighted mean over the remaining non-prefix tokens (each merged token counts
as the tokens it stands for, so the mean is the unmerged model's mean for duplicates).
The head finds tokens by position (the class token, or the prefix that "avg" skips), so
those must be protected once any token merges; ``reference_forward`` refuses a
``protected`` count below them.

Tie-breaking (only matters for exactly equal scores): a token of A matches the
first (lowest-index) most similar token of B; among equal information degrees
the earlier token of A is chosen first.

Public entry points:
    apply_reference(model, config)                     patch a model in place
    reference_forward(model, images, config)           -> logits
    reference_forward_tokens(model, images, config)    -> (tokens, sizes, assign)
    reference_blocks(model, tokens, config)            -> (tokens, sizes, assign)
the rules a model's sequence and head impose (protected_count, has_class_token,
sequence_config, head_positions, check_head_positions),
and the per-sequence building blocks (attention_probs, token_metric,
semantic_value, merge_count, bipartite_redundancy, information_degree,
choose_merges, merge_tokens, block_forward).
"""
from __future__ import annotations

import types
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from turbo_fx.config import TurboConfig

__all__ = [
    "apply_reference",
    "reference_forward",
    "reference_forward_tokens",
    "reference_blocks",
    "protected_count",
    "has_class_token",
    "sequence_config",
    "head_positions",
    "check_head_positions",
    "embed_tokens",
    "attention_probs",
    "token_metric",
    "semantic_value",
    "merge_count",
    "bipartite_redundancy",
    "information_degree",
    "choose_merges",
    "merge_tokens",
    "block_forward",
    "run_sequence",
]


# --------------------------------------------------------------------------------------
# Model-level glue
# --------------------------------------------------------------------------------------


def protected_count(model: nn.Module, config: TurboConfig) -> int:
    """Number of leading tokens that never merge.

    ``config.protected == "auto"``: the model's prefix tokens (CLS, distillation,
    registers); none when the sequence is patch tokens only, as TurboConfig
    documents and the backend finds. An int is used as given.
    """
    if config.protected == "auto":
        return _prefix_tokens(model)
    return int(config.protected)


def has_class_token(model: nn.Module) -> bool:
    """Whether the sequence starts with a prefix token whose attention row can rank the others.

    A timm ViT built with ``class_token=False`` and no registers feeds its blocks patch
    tokens only: token 0 is an ordinary patch, so its attention row is no semantic value.
    """
    return _prefix_tokens(model) > 0


def sequence_config(model: nn.Module, config: TurboConfig) -> TurboConfig:
    """``config`` as ``model``'s sequence allows it: without a class token the ranking is
    by redundancy alone (semantic value and ``keep_salient`` off), whatever ``protected``
    says. Raises ``ValueError`` for semantic-only ranking there, which has nothing to rank by.
    """
    if has_class_token(model) or not config.semantic:
        return config
    if not config.redundancy:
        raise ValueError(
            "semantic-only ranking (redundancy=False) needs a class token, and this model's "
            "sequence has none (only patch tokens)"
        )
    return config.replace(semantic=False, keep_salient=0)


def _prefix_tokens(model: nn.Module) -> int:
    # A model that does not say is taken to have one, as the backend takes an unknown origin.
    return int(getattr(model, "num_prefix_tokens", 1))


def embed_tokens(model: nn.Module, images: Tensor) -> Tensor:
    """The token sequence [B, N0, C] that enters the first block, using the model's own layers."""
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    x = model.norm_pre(x)
    return x


def reference_blocks(
    model: nn.Module, tokens: Tensor, config: TurboConfig
) -> Tuple[Tensor, Tensor, Tensor]:
    """Run ``model.blocks`` with Turbo merging on tokens [B, N0, C] (no final norm).

    Returns ``(tokens [B, N', C], sizes [B, N'] float32, assign [B, N0] int64)``
    where ``assign[b, j]`` is the index of the final token that original token j
    ended in. Every sample ends with the same N' (r_eff depends only on N).
    """
    config = sequence_config(model, config)
    blocks = list(model.blocks)
    r_list = config.r_per_block(len(blocks))
    p = protected_count(model, config)
    outs = [run_sequence(blocks, tokens[b], r_list, p, config) for b in range(tokens.shape[0])]
    x = torch.stack([o[0] for o in outs])
    sizes = torch.stack([o[1] for o in outs])
    assign = torch.stack([o[2] for o in outs])
    return x, sizes, assign


def reference_forward_tokens(
    model: nn.Module, images: Tensor, config: TurboConfig
) -> Tuple[Tensor, Tensor, Tensor]:
    """Images -> (final merged tokens after ``model.norm`` [B, N', C], sizes [B, N'], assign [B, N0])."""
    x, sizes, assign = reference_blocks(model, embed_tokens(model, images), config)
    return model.norm(x), sizes, assign


def reference_forward(model: nn.Module, images: Tensor, config: TurboConfig) -> Tensor:
    """Images -> the model's output (logits) with Turbo merging, via the model's own head.

    Raises ``ValueError`` when the head finds by position a token that is not protected
    and tokens did merge (see ``head_positions``): another token may stand in its place.
    """
    tokens, sizes, assign = reference_forward_tokens(model, images, config)
    check_head_positions(model, config, merged=tokens.shape[1] < assign.shape[1])
    if getattr(model, "global_pool", None) == "avg":
        p = model.num_prefix_tokens
        weight = sizes[:, p:, None].to(tokens.dtype)
        pooled = (tokens[:, p:] * weight).sum(dim=1) / weight.sum(dim=1)
        return model.head(model.head_drop(model.fc_norm(pooled)))
    return model.forward_head(tokens)


def head_positions(model: nn.Module) -> int:
    """How many leading tokens the head finds by position: the class (and distillation) token
    that "token" pooling reads, or the prefix that "avg" pooling skips."""
    pool = getattr(model, "global_pool", "token")
    if pool == "avg":
        return int(model.num_prefix_tokens)
    if pool == "token":
        return 2 if getattr(model, "head_dist", None) is not None else 1
    return 0


def check_head_positions(model: nn.Module, config: TurboConfig, merged: bool = True) -> None:
    """Raise ``ValueError`` unless every token the head finds by position is protected; a
    sequence where nothing ``merged`` still holds every token where the head looks."""
    needed, protected = head_positions(model), protected_count(model, config)
    if merged and protected < needed:
        raise ValueError(
            f"the head finds the first {needed} token(s) by position, and protected={config.protected!r} "
            f"protects {protected}: a merged token could take the place of one it reads"
        )


def apply_reference(model: nn.Module, config: TurboConfig) -> nn.Module:
    """Patch ``model`` IN PLACE so that ``model(images)`` runs the reference; returns the same object.

    ``forward_features`` (merged tokens) and ``forward`` (logits, with size-weighted
    average pooling) are replaced as instance attributes; the weights are untouched.
    ``remove_reference(model)`` undoes the patch. Only eval-mode timm
    ``Block``/``Attention`` stacks are supported; anything else raises
    ``NotImplementedError`` when run.
    """

    def forward_features(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("the Turbo reference does not take attention masks")
        tokens, _, _ = reference_forward_tokens(self, x, config)
        return tokens

    def forward(self, x: Tensor) -> Tensor:
        return reference_forward(self, x, config)

    model.forward_features = types.MethodType(forward_features, model)
    model.forward = types.MethodType(forward, model)
    model.turbo_reference_config = config
    return model


def remove_reference(model: nn.Module) -> nn.Module:
    """Undo ``apply_reference``."""
    for name in ("forward_features", "forward", "turbo_reference_config"):
        model.__dict__.pop(name, None)
    return model


# --------------------------------------------------------------------------------------
# One sequence through all blocks
# --------------------------------------------------------------------------------------


def run_sequence(
    blocks: List[nn.Module], x: Tensor, r_list: List[int], p: int, config: TurboConfig
) -> Tuple[Tensor, Tensor, Tensor]:
    """One sample x [N0, C] through ``blocks``; returns (x [N', C], sizes [N'], assign [N0])."""
    n0 = x.shape[0]
    sizes = torch.ones(n0, dtype=torch.float32, device=x.device)
    assign = torch.arange(n0, device=x.device)
    for i, (block, r) in enumerate(zip(blocks, r_list)):
        x, sizes, new_index = block_forward(block, x, sizes, r, p, config, i)
        assign = new_index[assign]
    return x, sizes, assign


def block_forward(
    block: nn.Module, x: Tensor, sizes: Tensor, r: int, p: int, config: TurboConfig, block_index: int
) -> Tuple[Tensor, Tensor, Tensor]:
    """One timm ``Block`` on one sequence x [N, C] with sizes [N].

    Returns (x [N - r_eff, C], sizes, new_index [N]) where ``new_index[j]`` is the
    position after this block of the token at position j before it.
    """
    _check_block(block)
    attn = block.attn
    q, k, v = _qkv(attn, block.norm1(x[None])[0])  # each [H, N, Dh]
    # Before the first merge all sizes are 1 and the log-size bias is exactly 0.
    probs = attention_probs(q, k, attn.scale, sizes if config.prop_attn else None)  # [H, N, N]
    x = x + block.ls1(_attention_output(attn, probs, v))

    n = x.shape[0]
    r_eff = merge_count(n, r, p, config.min_tokens, config.keep_salient)
    if r_eff > 0:
        metric = token_metric(q, k, config.metric)
        semantic = semantic_value(probs)
        src, dst = choose_merges(metric, semantic, p, r_eff, config, block_index)
        x, sizes, new_index = merge_tokens(x, sizes, src, dst)
    else:
        new_index = torch.arange(n, device=x.device)

    x = x + block.ls2(block.mlp(block.norm2(x[None])))[0]
    return x, sizes, new_index


def _check_block(block: nn.Module) -> None:
    from timm.layers import Attention
    from timm.models.vision_transformer import Block

    if type(block) is not Block or type(block.attn) is not Attention:
        raise NotImplementedError(
            f"the Turbo reference handles timm Block/Attention, got {type(block).__name__}"
            f"/{type(getattr(block, 'attn', None)).__name__}"
        )
    if getattr(block.attn, "gate", None) is not None:
        raise NotImplementedError("the Turbo reference does not handle gated attention")
    if block.training:
        raise NotImplementedError("the Turbo reference runs in eval mode only (call model.eval())")


def _qkv(attn: nn.Module, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """q, k, v [H, N, Dh] for one sequence x [N, C], exactly as timm's Attention makes them."""
    n = x.shape[0]
    qkv = attn.qkv(x).reshape(n, 3, attn.num_heads, attn.head_dim).permute(1, 2, 0, 3)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def _attention_output(attn: nn.Module, probs: Tensor, v: Tensor) -> Tensor:
    """The attention sub-layer's output [N, C] from probs [H, N, N] and values [H, N, Dh]."""
    out = (probs @ v).transpose(0, 1).reshape(v.shape[1], attn.attn_dim)  # [N, H*Dh]
    return attn.proj(attn.norm(out))


# --------------------------------------------------------------------------------------
# The algorithm on one sequence (pure functions)
# --------------------------------------------------------------------------------------


def attention_probs(q: Tensor, k: Tensor, scale: float, sizes: Optional[Tensor] = None) -> Tensor:
    """softmax over keys of ``q k^T * scale (+ log s_key)``; q, k [H, N, Dh] -> [H, N, N].

    With ``sizes`` (proportional attention) a key of size s weighs as much as s
    identical keys of size 1. Without, plain attention.
    """
    logits = (q @ k.transpose(-2, -1)) * scale
    if sizes is not None:
        logits = logits + torch.log(sizes.to(logits.dtype))  # same for every head and query
    return logits.softmax(dim=-1)


def token_metric(q: Tensor, k: Tensor, metric: str = "keys") -> Tensor:
    """The similarity features [N, Dh]: keys (or queries) averaged over heads."""
    feats = {"keys": k, "queries": q}[metric]
    return feats.mean(dim=0)


def semantic_value(probs: Tensor) -> Tensor:
    """Normalised semantic value I [N]: token 0's attention row averaged over heads, times N."""
    n = probs.shape[-1]
    return probs[:, 0, :].mean(dim=0) * n


def merge_count(n: int, r: int, p: int, min_tokens: int, salient: int = 0) -> int:
    """Tokens actually removed from a sequence of n: r clamped to half the mergeable tokens
    (less the salient tokens kept out of merging) and to min_tokens."""
    return max(0, min(r, (n - p) // 2 - salient, n - min_tokens))


def bipartite_redundancy(metric: Tensor, p: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Split tokens p.. alternately into A (p, p+2, ...) and B (p+1, p+3, ...).

    Returns ``(a_idx, redundancy, match)``: the positions of A, each one's highest
    cosine similarity to a token of B, and the position of that B token.
    """
    n = metric.shape[0]
    a_idx = torch.arange(p, n, 2, device=metric.device)
    b_idx = torch.arange(p + 1, n, 2, device=metric.device)
    unit = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cosine = unit[a_idx] @ unit[b_idx].T  # [|A|, |B|]
    best = cosine.argmax(dim=-1)  # first maximum on ties
    redundancy = cosine.gather(1, best[:, None])[:, 0]
    return a_idx, redundancy, b_idx[best]


def information_degree(
    redundancy: Tensor, semantic: Tensor, config: TurboConfig, block_index: int
) -> Tensor:
    """E from R and I by ``config.fusion``; tokens with the highest E merge first."""
    R, I = redundancy, semantic
    if not config.semantic:
        return R
    if not config.redundancy:
        return -I
    alpha = config.alpha
    if config.fusion == "sub":
        return R - alpha * I
    if config.fusion == "div":
        return R / I.clamp_min(1e-6)
    if config.fusion == "mul":
        return R * (1 - alpha * I)
    if config.fusion == "layer":
        weight = config.beta ** abs(config.gamma - block_index)
        return R - weight * alpha * I
    raise ValueError(f"unknown fusion {config.fusion!r}")


def choose_merges(
    metric: Tensor, semantic: Tensor, p: int, r: int, config: TurboConfig, block_index: int
) -> Tuple[Tensor, Tensor]:
    """Pick r merges for one sequence: (sources [r], destinations [r]) as positions.

    ``metric`` [N, D] are the similarity features, ``semantic`` [N] the normalised
    semantic values I; ``r`` must already be clamped (see ``merge_count``).
    """
    if config.keep_salient:
        return _choose_merges_keeping_salient(metric, semantic, p, r, config, block_index)
    a_idx, redundancy, match = bipartite_redundancy(metric, p)
    degree = information_degree(redundancy, semantic[a_idx], config, block_index)
    order = torch.sort(degree, descending=True, stable=True).indices[:r]
    return a_idx[order], match[order]


def _choose_merges_keeping_salient(
    metric: Tensor, semantic: Tensor, p: int, r: int, config: TurboConfig, block_index: int
) -> Tuple[Tensor, Tensor]:
    """``choose_merges`` when the ``keep_salient`` tokens of highest I (after the p protected
    ones) may be neither a source nor a destination; written as loops over plain lists."""
    n = metric.shape[0]
    order_by_i = sorted(range(p, n), key=lambda t: (-float(semantic[t]), t))
    salient = set(order_by_i[: config.keep_salient])
    unit = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a_tokens = list(range(p, n, 2))
    b_tokens = [t for t in range(p + 1, n, 2) if t not in salient]
    candidates = []
    for a in a_tokens:
        if a in salient or not b_tokens:
            continue
        sims = [float(unit[a] @ unit[b]) for b in b_tokens]
        best = max(range(len(b_tokens)), key=lambda j: (sims[j], -j))
        degree = information_degree(torch.tensor([sims[best]], dtype=metric.dtype),
                                    semantic[a : a + 1], config, block_index)
        candidates.append((float(degree[0]), a, b_tokens[best]))
    candidates.sort(key=lambda c: -c[0])  # stable: equal degrees keep A order
    chosen = candidates[:r]
    return (torch.tensor([c[1] for c in chosen], dtype=torch.long),
            torch.tensor([c[2] for c in chosen], dtype=torch.long))


def merge_tokens(x: Tensor, sizes: Tensor, src: Tensor, dst: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Merge tokens ``src`` into ``dst`` (positions; dst may repeat) by size-weighted average.

    x [N, C], sizes [N]. Returns (x [N - len(src), C], sizes, new_index [N]):
    survivors keep their order and (exactly) their values; each destination
    becomes ``(s_b x_b + sum s_a x_a) / (s_b + sum s_a)``, computed in float32
    (float64 stays float64) and cast back to x's dtype; sizes come back float32.
    ``new_index`` maps every old position to its new one (a source to its
    destination's).
    """
    n = x.shape[0]
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    xa, sa = x.to(acc_dtype), sizes.to(acc_dtype)
    weighted_sum = (xa * sa[:, None]).index_add(0, dst, xa[src] * sa[src, None])
    summed_sizes = sa.index_add(0, dst, sa[src])  # integers: exact in any float dtype
    new_sizes = summed_sizes.float()

    merged = x.clone()
    dests = torch.unique(dst)
    merged[dests] = (weighted_sum[dests] / summed_sizes[dests, None]).to(x.dtype)

    keep = torch.ones(n, dtype=torch.bool, device=x.device)
    keep[src] = False
    new_index = torch.cumsum(keep.long(), 0) - 1  # position among survivors
    new_index[src] = new_index[dst]
    return merged[keep], new_sizes[keep], new_index
