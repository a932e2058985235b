"""``turbo-fx llava-fidelity``: what compacting a language model's visual tokens costs in answers, on
``model_zoo.fashion_llava`` (frozen real DINOv2 ViT-S/14 patch tokens, a projector and a small Llama
trained here to answer with the Fashion-MNIST class name), against two baselines at the same token
counts.

Methods, at visual-token keep ratios 1, 0.5, 0.25 and 0.11 (of 256):

* ``turbo-compact``: ``torch.compile(model.forward, backend="turbo", dynamic=False,
  options={"ratio": x, "inner_backend": "eager"})``; turbo finds the placeholder scatter and
  merges the 256 projected visual tokens into ``256 - floor(x * 256)`` (128, 64, 29) before the
  first layer, by rounds of bipartite matching on cosine similarity ranked by turbo's default
  information degree (redundancy and the semantic value: how much the text after the image
  attends to each placeholder at the first layer), with the ``log(size)`` key bias.
* ``turbo-redundancy``: the same with ``semantic=False``: ranked by redundancy alone.
  Each turbo row checks from ``turbo_fx.report.recording()`` that every graph it compiled (one
  per input length of greedy decoding) was compacted: mode "compact", block row 256 -> kept.
* ``visionzip`` (VisionZip-style, eager): keep the ``k_dom`` patch tokens that DINOv2's CLS
  attends to most in its last layer (mean over heads), and merge the rest into ``k_ctx``
  contextual tokens, ``k_dom : k_ctx`` about 54 : 10 (:func:`visionzip_split`). Contextual
  tokens: ``k_ctx`` anchors evenly spaced among the remaining tokens (VisionZip's rule), every
  other remaining token assigned to its most cosine-similar anchor (on the DINOv2 output
  features; VisionZip uses the last layer's keys), each group averaged (VisionZip's code adds
  the anchor to its members' mean instead). No ``log(size)`` bias.
* ``pool`` (eager): average pooling of the 16 x 16 grid: 1 x 2 windows (128 tokens), 2 x 2 (64)
  and, for 0.11, adaptive pooling to 5 x 5 = 25 tokens (4 x 4 windows overlapping by one patch;
  keep ratio 0.098, below the others' 29).

Both baselines reduce the DINOv2 features before the projector (as VisionZip does); turbo merges
the projected tokens in the language model's input. Positions: a kept token keeps its original
position, a merged token (contextual, pooled) takes its members' mean position (fractional
rotary position ids); the visual slots are ordered by position and the text after them keeps
its original positions, so only the image span shrinks. Turbo's own compaction places merged
tokens the same way for the mask, but averages the members' rotary rows.

Prompt: ``[BOS] + visual tokens + [ANSWER]``, then greedy decoding of up to three tokens, each step
rerunning the prompt and the tokens so far (``fashion_llava.greedy_answers``): the first word
comes from the prompt alone, as ``generate()``'s prefill computes it. Per cell: exact match (greedy answer = the true
caption), agreement with the unmerged model's answer, both with Wilson 95% intervals, and the
paired difference in exact match against the unmerged model and between methods at the same keep
ratio (Newcombe's interval, exact McNemar p). Test images: a class-balanced sample of the
Fashion-MNIST test split; their features and CLS attention are cached
(``fashion_llava.evaluation_features``).
"""
from __future__ import annotations

import math
import os
import time
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from turbo_fx.bench import output, stats, timing
from turbo_fx.model_zoo import fashion_llava as fl

METHODS = ("turbo-compact", "turbo-redundancy", "visionzip", "pool")
TURBO_METHODS = {"turbo-compact": {}, "turbo-redundancy": {"semantic": False}}
DEFAULT_RATIOS = (0.5, 0.75, 0.89)
VISIONZIP_DOMINANT, VISIONZIP_CONTEXTUAL = 54, 10  # VisionZip's split of 64 tokens
# (rows, columns) of the pooled grid per ratio; a ratio not listed pools to the square grid
# nearest the kept count.
POOL_GRIDS = {0.5: (16, 8), 0.75: (8, 8), 0.89: (5, 5)}
METRICS = ("exact", "agrees")
METRIC_TITLES = {"exact": "exact match", "agrees": "agrees with unmerged"}


# ----------------------------------------------------------------------------------------
# Token counts


def kept_tokens(ratio: float, count: int = fl.VISUAL_TOKENS) -> int:
    """The tokens turbo's compaction keeps for ``ratio``: ``count - floor(ratio * count)``."""
    return count - int(math.floor(ratio * count))


def visionzip_split(kept: int) -> tuple[int, int]:
    """(dominant, contextual) tokens for ``kept`` in VisionZip's 54 : 10 proportion, at least one contextual."""
    contextual = max(1, round(kept * VISIONZIP_CONTEXTUAL / (VISIONZIP_DOMINANT + VISIONZIP_CONTEXTUAL)))
    return kept - contextual, contextual


def pool_grid(ratio: float, grid: int = fl.GRID) -> tuple[int, int]:
    if ratio in POOL_GRIDS and grid == fl.GRID:
        return POOL_GRIDS[ratio]
    side = max(1, round(math.sqrt(kept_tokens(ratio, grid * grid))))
    return side, side


# ----------------------------------------------------------------------------------------
# The baselines' token selection (pure: features in, shorter features and positions out)


def visionzip_select(features: torch.Tensor, cls_attention: torch.Tensor, dominant: int,
                     contextual: int) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip-style reduction of ``features`` ``[B, N, C]`` to ``dominant + contextual`` tokens.

    Dominant: the ``dominant`` tokens with the highest ``cls_attention`` ``[B, N]``. Contextual:
    ``contextual`` anchors at every ``max(1, R // contextual)``-th of the R remaining tokens (in
    index order), each other remaining token joining the anchor of highest cosine similarity,
    each group averaged. Returns the tokens ``[B, K, C]`` ordered by position and their positions
    ``[B, K]`` (token indices, a group at its members' mean index, float)."""
    b, n, c = features.shape
    if not 0 < dominant + contextual <= n or contextual < 0 or dominant < 0:
        raise ValueError(f"cannot keep {dominant} + {contextual} of {n} tokens")
    tokens_out, positions_out = [], []
    index = torch.arange(n, dtype=torch.float64)
    for row in range(b):
        x, attention = features[row].float(), cls_attention[row].float()
        order = torch.sort(torch.topk(attention, dominant).indices).values if dominant else torch.zeros(0, dtype=torch.long)
        rest = torch.ones(n, dtype=torch.bool)
        rest[order] = False
        remaining = torch.nonzero(rest).flatten()
        tokens, positions = [x[order]], [index[order]]
        if contextual and len(remaining):
            step = max(1, len(remaining) // contextual)
            anchor_slots = torch.arange(0, len(remaining), step)[:contextual]
            is_anchor = torch.zeros(len(remaining), dtype=torch.bool)
            is_anchor[anchor_slots] = True
            normed = F.normalize(x[remaining], dim=-1)
            group = torch.empty(len(remaining), dtype=torch.long)
            group[anchor_slots] = torch.arange(len(anchor_slots))
            members = ~is_anchor
            if members.any():
                group[members] = (normed[members] @ normed[anchor_slots].T).argmax(-1)
            one_hot = F.one_hot(group, len(anchor_slots)).T.to(torch.float64)  # [anchors, remaining]
            size = one_hot.sum(-1, keepdim=True)
            tokens.append(((one_hot @ x[remaining].double()) / size).to(x.dtype))
            positions.append((one_hot @ index[remaining]) / size[:, 0])
        tokens_row, positions_row = torch.cat(tokens), torch.cat(positions)
        by_position = torch.argsort(positions_row, stable=True)
        tokens_out.append(tokens_row[by_position])
        positions_out.append(positions_row[by_position])
    return torch.stack(tokens_out).to(features.dtype), torch.stack(positions_out)


def pool_select(features: torch.Tensor, rows: int, columns: int, grid: int = fl.GRID) -> tuple[torch.Tensor, torch.Tensor]:
    """Average pooling of the ``grid x grid`` token grid (row-major in ``features`` ``[B, grid^2, C]``)
    to ``rows x columns`` tokens (``adaptive_avg_pool2d``: exact windows where ``grid`` divides
    evenly). Returns the tokens ``[B, rows * columns, C]`` row-major and their mean token indices."""
    b, n, c = features.shape
    if n != grid * grid:
        raise ValueError(f"{n} tokens are not a {grid} x {grid} grid")
    image = features.float().transpose(1, 2).reshape(b, c, grid, grid)
    pooled = F.adaptive_avg_pool2d(image, (rows, columns)).reshape(b, c, rows * columns).transpose(1, 2)
    index = torch.arange(n, dtype=torch.float64).reshape(1, 1, grid, grid)
    positions = F.adaptive_avg_pool2d(index, (rows, columns)).reshape(1, rows * columns).expand(b, -1)
    return pooled.to(features.dtype).contiguous(), positions.contiguous()


def reduced_prompt(positions: torch.Tensor, answer_slots: int = fl.ANSWER_TOKENS - 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` of the prompt (BOS, K placeholders, ANSWER) whose image span holds the tokens
    at ``positions`` (token indices, ``[B, K]``), and float ``position_ids`` for it and
    ``answer_slots`` generated tokens after it: BOS at 0, token i at ``1 + i``, the text after the
    image at its original positions (``1 + N`` onwards, N = the full image's tokens)."""
    b, k = positions.shape
    ids = fl.prompt_ids(b, k)
    text = torch.arange(1 + fl.VISUAL_TOKENS, 1 + fl.VISUAL_TOKENS + 1 + answer_slots, dtype=torch.float64)
    position_ids = torch.cat([torch.zeros(b, 1, dtype=torch.float64), 1 + positions.double(),
                              text.expand(b, -1)], dim=1)
    return ids, position_ids.float()


# ----------------------------------------------------------------------------------------
# Intervals and comparisons (pure)


def cell(outcomes: Sequence[bool]) -> dict:
    """``{"value", "low", "high", "k", "n"}``: a proportion with its Wilson 95% interval."""
    right = np.asarray(outcomes, dtype=bool)
    k, n = int(right.sum()), len(right)
    low, high = stats.wilson_interval(k, n)
    return {"value": k / n, "low": low, "high": high, "k": k, "n": n}


def paired(outcomes_a: Sequence[bool], outcomes_b: Sequence[bool]) -> dict:
    """A minus B on the same images: Newcombe's interval and the exact McNemar p."""
    c = stats.paired_proportions(outcomes_a, outcomes_b)
    return {"difference": c.difference, "low": c.low, "high": c.high, "p": c.p_value,
            "a_only": c.a_only, "b_only": c.b_only}


def row_metrics(answers: Sequence[str], truth: Sequence[str], reference: Sequence[str]) -> dict:
    exact = [a == t for a, t in zip(answers, truth)]
    agrees = [a == r for a, r in zip(answers, reference)]
    return {"exact": cell(exact), "agrees": cell(agrees)}


def comparisons(rows: Sequence[dict], truth: Sequence[str]) -> list[dict]:
    """Exact match, paired: every reduced row against the unmerged one, then turbo-compact against
    each baseline at the same keep ratio."""
    def exact(row: dict) -> list[bool]:
        return [a == t for a, t in zip(row["answers"], truth)]

    base = next((r for r in rows if r["method"] == "unmerged"), None)
    out = []
    if base is not None:
        for row in rows:
            if row["method"] != "unmerged" and row["ratio"] > 0:
                out.append({"kind": "vs unmerged", "a": row["label"], "b": base["label"],
                            "exact": paired(exact(row), exact(base))})
    by = {(r["method"], r["ratio"]): r for r in rows}
    for method, others in (("turbo-compact", ("turbo-redundancy", "visionzip", "pool")),
                           ("turbo-redundancy", ("visionzip", "pool"))):
        for row in rows:
            if row["method"] == method and row["ratio"] > 0:
                for other in others:
                    if (other, row["ratio"]) in by:
                        out.append({"kind": f"{method} vs {other}", "a": row["label"],
                                    "b": by[(other, row["ratio"])]["label"],
                                    "exact": paired(exact(row), exact(by[(other, row["ratio"])]))})
    return out


# ----------------------------------------------------------------------------------------
# Running the rows


def batches(n: int, batch_size: int) -> list[np.ndarray]:
    """Index batches of exactly ``batch_size`` (the last padded by repeating its last index), so
    that every call has one shape and the compiled graph is never rebuilt."""
    out = []
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(n, start + batch_size))
        if len(idx) < batch_size:
            idx = np.concatenate([idx, np.repeat(idx[-1:], batch_size - len(idx))])
        out.append(idx)
    return out


def decode(step: Callable[[np.ndarray, torch.Tensor], torch.Tensor], prompt: Callable[[np.ndarray], torch.Tensor],
           n: int, batch_size: int) -> list[str]:
    """Greedy answers of ``n`` images: ``prompt(idx)`` the fixed-length prompt of a batch,
    ``step(idx, ids)`` its logits."""
    answers: list[Optional[str]] = [None] * n
    for idx in batches(n, batch_size):
        ids = fl.greedy_answers(lambda x, idx=idx: step(idx, x), prompt(idx))
        for i, a in zip(idx, ids):
            answers[int(i)] = fl.answer_text(a)
    return answers


def unmerged_row(model, data: dict, batch_size: int) -> dict:
    feats = data["features"]

    def step(idx, ids):
        return model(ids, feats[torch.as_tensor(idx)].float())

    return {"answers": decode(step, lambda idx: fl.prompt_ids(len(idx)), len(feats), batch_size), "tokens": fl.VISUAL_TOKENS}


def turbo_row(model, data: dict, ratio: float, batch_size: int, options: dict) -> dict:
    """turbo at ``ratio`` with ``options``, and what its compiled graphs' reports say: one graph per
    input length of greedy decoding (``dynamic=False``), each expected to compact 256 -> kept."""
    from turbo_fx.report import recording

    torch._dynamo.reset()
    fn = torch.compile(model.forward, backend="turbo", dynamic=False,
                       options={**options, "ratio": ratio, "inner_backend": "eager"})
    feats = data["features"]
    graphs: list = []

    def step(idx, ids):
        with recording() as rec:
            logits = fn(ids, feats[torch.as_tensor(idx)].float())
        graphs.extend(rec.graphs)
        return logits

    answers = decode(step, lambda idx: fl.prompt_ids(len(idx)), len(feats), batch_size)
    reports = [{"mode": g.mode, "blocks": [[b.kind, b.module, b.tokens_in, b.tokens_out] for b in g.blocks],
                "fallback_reason": g.fallback_reason, "run_time_failures": g.run_time_failures,
                "mode_note": g.mode_note} for g in graphs]
    kept = kept_tokens(ratio)
    ok = bool(reports) and all(r["mode"] == "compact" and r["blocks"][0][2:] == [fl.VISUAL_TOKENS, kept]
                               and r["fallback_reason"] is None and r["run_time_failures"] == 0 for r in reports)
    return {"answers": answers, "tokens": kept, "graphs": reports, "compacted": ok}


def baseline_row(model, data: dict, method: str, ratio: float, batch_size: int) -> dict:
    feats, attention = data["features"], data["cls_attention"]
    if method == "visionzip":
        dominant, contextual = visionzip_split(kept_tokens(ratio))

        def select(idx):
            return visionzip_select(feats[idx].float(), attention[idx], dominant, contextual)

        detail = {"dominant": dominant, "contextual": contextual}
    else:
        rows, columns = pool_grid(ratio)

        def select(idx):
            return pool_select(feats[idx].float(), rows, columns)

        detail = {"grid": [rows, columns]}
    cache: dict = {}

    def prepared(idx: np.ndarray):
        key = (int(idx[0]), len(idx))
        if key not in cache:
            cache.clear()
            tokens, positions = select(torch.as_tensor(idx))
            cache[key] = (tokens, *reduced_prompt(positions))
        return cache[key]

    def step(idx, ids):
        tokens, _, position_ids = prepared(idx)
        return model(ids, tokens, position_ids[:, : ids.shape[1]])

    answers = decode(step, lambda idx: prepared(idx)[1], len(feats), batch_size)
    return {"answers": answers, "tokens": int(prepared(np.arange(1))[0].shape[1]), **detail}


def source_state() -> str:
    """The commit turbo_fx ran from and whether its compaction code differed from it (the
    result depends on the ranking that code implements); '' outside a git checkout."""
    import subprocess

    import turbo_fx

    root = os.path.dirname(os.path.dirname(os.path.abspath(turbo_fx.__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--", "turbo_fx", "passes"], cwd=root,
                                 capture_output=True, text=True, timeout=10, check=True).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return ""
    changed = [line[3:] for line in changed if line.strip()]
    return commit + (f" (uncommitted changes in {', '.join(changed)})" if changed else "")


def label_of(method: str, ratio: float, tokens: int) -> str:
    return f"{method} keep {1 - ratio:.2f} ({tokens} tokens)"


def study(test_images: int = 1000, seed: int = 0, ratios: Sequence[float] = DEFAULT_RATIOS,
          methods: Sequence[str] = METHODS, batch_size: int = 50, options: Optional[dict] = None,
          model=None, data: Optional[dict] = None, partial: Optional[Callable[[dict], None]] = None,
          log: Callable[[str], None] = print) -> dict:
    """Every method at every ratio on the test images; ``model``/``data`` default to the trained
    stand-in and the cached test features (tests pass tiny ones)."""
    trained = model is None
    if trained:
        model = fl.load_fashion_llava(log=log)
    if data is None:
        data = fl.evaluation_features(test_images, seed, "test", log=log)
    model = model.eval()
    labels = [int(v) for v in data["labels"]]
    truth = [fl.VOCAB.captions[v] for v in labels]
    record = fl.record_path(fl.weights_path())
    payload = {
        "settings": {"test_images": len(labels), "seed": seed, "ratios": list(ratios), "methods": list(methods),
                     "batch_size": batch_size, "options": options or {}, "inner_backend": "eager",
                     "visual_tokens": fl.VISUAL_TOKENS, "source": source_state(),
                     "feature_seconds": round(float(data.get("seconds", 0.0)), 1)},
        "machine": timing.machine(),
        "training": output.load_json(str(record)) if trained and record.is_file() else None,
        "labels": labels,
        "rows": [],
    }
    # At ratio 0 the two turbo rankings have nothing to rank: one compiled row checks the path.
    specs = [("unmerged", 0.0)] + [(m, 0.0) for m in TURBO_METHODS if m in methods][:1]
    specs += [(m, r) for r in ratios for m in methods]
    reference = None
    with torch.no_grad():
        for method, ratio in specs:
            started = time.perf_counter()
            if method == "unmerged":
                row = unmerged_row(model, data, batch_size)
            elif method in TURBO_METHODS:
                row = turbo_row(model, data, ratio, batch_size, {**(options or {}), **TURBO_METHODS[method]})
            else:
                row = baseline_row(model, data, method, ratio, batch_size)
            if reference is None:
                reference = row["answers"]
            row.update(method=method, ratio=ratio, keep=round(1 - ratio, 4),
                       label="unmerged (eager)" if method == "unmerged" else label_of(method, ratio, row["tokens"]),
                       seconds=round(time.perf_counter() - started, 1))
            row["metrics"] = row_metrics(row["answers"], truth, reference)
            m = row["metrics"]
            log(f"{row['label']}: exact {m['exact']['value']:.4f} [{m['exact']['low']:.3f}, {m['exact']['high']:.3f}], "
                f"agrees {m['agrees']['value']:.4f}" + ("" if "compacted" not in row else f", compacted {row['compacted']}")
                + f", {row['seconds']:.0f} s")
            payload["rows"].append(row)
            if partial is not None:
                partial(payload)
    payload["comparisons"] = comparisons(payload["rows"], truth)
    return payload


# ----------------------------------------------------------------------------------------
# Writing


def ci(m: dict, digits: int = 3) -> str:
    """``0.812 [0.787, 0.835]``."""
    return f"{m['value']:.{digits}f} [{m['low']:.{digits}f}, {m['high']:.{digits}f}]"


def diff(c: dict) -> str:
    text = f"{output.difference(c, digits=3)}, p={output.p_value(c['p'])} ({c['a_only']}:{c['b_only']})"
    return f"**{text}**" if c["low"] > 0 or c["high"] < 0 else text


def grid_table(rows: Sequence[dict], metric: str) -> tuple[list[str], list[list[str]]]:
    """Methods down, keep ratios across; each cell the metric with its interval and token count."""
    keeps = sorted({r["keep"] for r in rows if r["method"] != "unmerged"}, reverse=True)
    base = next((r for r in rows if r["method"] == "unmerged"), None)
    head = ["method"] + [f"keep {k:g}" for k in keeps]
    body = []
    if base is not None:
        body.append(["unmerged (eager)"] + [ci(base["metrics"][metric]) + f" ({base['tokens']})" if k == 1 else "" for k in keeps])
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    for method in methods:
        line = [method]
        for k in keeps:
            found = [r for r in rows if r["method"] == method and r["keep"] == k]
            if found:
                line.append(ci(found[0]["metrics"][metric]) + f" ({found[0]['tokens']})")
            elif k == 1 and base is not None:
                line.append("= unmerged")
            else:
                line.append("-")
        body.append(line)
    return head, body


def graph_summary(graphs: Sequence[dict]) -> str:
    """``3 x mode compact, placeholders at llama.layers.0.self_attn 256 -> 64``: each distinct
    report once, with how many graphs gave it."""
    texts = []
    for g in graphs:
        blocks = ", ".join(f"{b[0]} at {b[1]} {b[2]} -> {b[3]}" for b in g["blocks"]) or "no blocks"
        texts.append(f"mode {g['mode']}, {blocks}" + (f", fallback: {g['fallback_reason']}" if g["fallback_reason"] else "")
                     + (f", {g['run_time_failures']} run-time failures" if g.get("run_time_failures") else ""))
    return "; ".join(f"{texts.count(t)} x {t}" for t in dict.fromkeys(texts))


def markdown(payload: dict) -> str:
    rows = payload["rows"]
    s = payload["settings"]
    t = payload.get("training") or {}
    turbo = [r for r in rows if r["method"] in TURBO_METHODS]
    checks = [f"- {r['label']}: " + ("compacted" if r["compacted"] else "NOT COMPACTED AS EXPECTED")
              + f"; {len(r['graphs'])} graphs (one per input length): " + graph_summary(r["graphs"]) for r in turbo]
    lines = output.header(
        "LLaVA-style visual-token compaction: answer fidelity on a stand-in trained here (DINOv2-S + Llama)",
        payload,
        f"{s['test_images']} class-balanced Fashion-MNIST test images (seed {s['seed']}), batch {s['batch_size']}, "
        f"{s['visual_tokens']} visual tokens (DINOv2 ViT-S/14 patch tokens at 224 px, CLS dropped). "
        + (f"turbo_fx at {s['source']}. " if s.get("source") else "")
        + (f"The model (`model_zoo/fashion_llava.py`: projector and a {t.get('config', {}).get('layers')}-layer "
           f"Llama of width {t.get('config', {}).get('width')}) was trained on {t.get('train_images')} images, "
           f"{t.get('steps')} steps of batch {t.get('batch_size')} in {t.get('seconds')} s; final loss "
           f"{t.get('final_loss')}, held-out exact match {t.get('validation', {}).get('exact_match')} "
           f"({t.get('validation', {}).get('n')} images)." if t else ""),
        "Cells: the proportion with its Wilson 95% interval over the test images, and in parentheses the "
        "visual tokens the language model reads. Keep 1 is the unmerged model (eager); turbo-compact at "
        "keep 1 is `ratio=0` through the compiled path. Pool at keep 0.11 reads 25 tokens (5 x 5), the others 29.",
    )
    for metric in METRICS:
        head, body = grid_table(rows, metric)
        lines += [f"## {METRIC_TITLES[metric]}", "", output.table(head, body), ""]
    comp = payload.get("comparisons", [])
    lines += ["## Paired differences in exact match (same images)", "",
              "A − B [95%, Newcombe], exact McNemar p, (x:y) = images right under A only : under B only. "
              "Bold: the interval excludes 0.", "",
              output.table(["comparison", "A", "B", "exact match A − B"],
                           [[c["kind"], c["a"], c["b"], diff(c["exact"])] for c in comp]), "",
              "Turbo graph checks (`turbo_fx.report.recording()`):", *checks, "",
              f"The rows took {sum(r['seconds'] for r in rows) / 60:.1f} min"
              + (f" after {s['feature_seconds']:.0f} s of test features." if s.get("feature_seconds") else ".")]
    return "\n".join(lines) + "\n"


def render(path: str) -> str:
    """Rewrite the markdown beside a result JSON of this study from the JSON alone."""
    return output.render_markdown(path, markdown)


def small_inputs(n: int = 10, seed: int = 0) -> tuple:
    """A tiny untrained model and random features, CLS attention and labels (a smoke test)."""
    torch.manual_seed(seed)
    model = fl.FashionLlava(fl.LlavaConfig(width=32, layers=2, heads=2, mlp=64)).eval()
    attention = torch.rand(n, fl.VISUAL_TOKENS)
    data = {"features": torch.randn(n, fl.VISUAL_TOKENS, fl.fc.IMAGE_DIM).half(),
            "cls_attention": attention / attention.sum(-1, keepdim=True),
            "labels": torch.arange(n) % 10, "seconds": 0.0}
    return model, data


def run(args) -> dict:
    stem = "llava_fidelity_small" if args.small else "llava_fidelity"

    def partial(p: dict) -> None:  # rows so far, so that a run cut short still leaves them
        output.save_json({**p, "command": args.command}, os.path.join(args.out, stem + ".json.gz"))

    model, data = small_inputs(args.test) if args.small else (None, None)
    payload = study(args.test, args.seed, args.ratios, args.methods, args.batch, args.options,
                    model=model, data=data, partial=partial, log=timing.log)
    payload["command"] = args.command
    output.write(payload, args.out, stem, markdown, compress=True)
    return payload


def check(args) -> None:
    from turbo_fx.bench.cli import UsageError

    if any(r <= 0 for r in args.ratios):
        raise UsageError("--ratios: every ratio must be in (0, 1); ratio 0 (the unmerged model) always runs")
