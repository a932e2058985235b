"""``turbo-fx vlm-eval``: captioning fidelity under turbo on a real-weight vision-language
stand-in, ``model_zoo.fashion_captioner.FashionCaptioner`` (frozen DINOv2 ViT-S/14 at 224 px, 257
tokens, and a caption decoder trained here on its unmerged tokens), compiled whole: the DINOv2
stream merges and the decoder's cross-attention reads the merged tokens (``reads merged`` in the
site table, which every row records). Test images: a class-balanced Fashion-MNIST test sample.

**One forward per image.** The decoder's self-attention is causal, so greedy decoding produces
the true caption if and only if, fed the true caption (teacher forcing), the argmax at every
non-padding position is the next true token (by induction on the position). One teacher-forced
forward therefore gives the greedy exact match, the first generated word (position 0 sees only
BOS), the caption's log-likelihood and the greedy caption up to its first wrong token; only where
that token is not EOS does ``complete_greedy`` run further forwards, so that every row has every
image's full greedy caption. The run checks this against a plain greedy loop on a few images of
the baseline and of one merged row (``greedy_check``).

Metrics per row, each with a 95% interval: ``exact_match`` (greedy caption = true caption,
Wilson), ``class_accuracy`` (the class named by the first generated word, Wilson), ``loglik``
(mean log-likelihood of the true caption, EOS included, percentile bootstrap) and ``agreement``
(greedy caption = the unmerged model's, Wilson). Rows: the baseline (``r=0`` through the same
compile path), then at each r Turbo, redundancy-only and semantic-only, each with and without the
cross-attention size bias. Paired comparisons on the same images (Newcombe and exact McNemar for
proportions, paired bootstrap for the log-likelihood); a difference is called one only where its
interval excludes 0. With the defaults (1000 images, 19 rows, one thread) a run takes about an
hour on 2 CPU cores; ``--render JSON`` rewrites the markdown from ``fashion_captioner.json.gz``.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from turbo_fx.bench import intervals, output, stats, timing
from turbo_fx.bench.evaluation import compile_variant
from turbo_fx.model_zoo import fashion_captioner as fc
from turbo_fx.report import recording

METHODS = {
    "turbo": {},
    "redundancy-only": {"semantic": False},
    "semantic-only": {"redundancy": False},
}
DEFAULT_R = (8, 12, 16)
METRICS = ("exact_match", "class_accuracy", "loglik", "agreement")
METRIC_TITLES = {"exact_match": "exact match", "class_accuracy": "class accuracy (first word)",
                 "loglik": "mean log-lik. (nats)", "agreement": "agrees with unmerged"}


@dataclass(frozen=True)
class RowSpec:
    label: str
    method: str  # "baseline" or a METHODS key
    r: int
    cross_bias: bool
    options: dict = field(default_factory=dict)


def row_specs(r_values: Sequence[int] = DEFAULT_R, methods: Sequence[str] = tuple(METHODS),
              biases: Sequence[bool] = (True, False)) -> list[RowSpec]:
    rows = [RowSpec("baseline (no merging)", "baseline", 0, True, {"r": 0})]
    for r in r_values:
        for method in methods:
            for bias in biases:
                label = f"{method} r={r}" + ("" if bias else ", no cross-attn bias")
                rows.append(RowSpec(label, method, r, bias, {**METHODS[method], "r": r, "cross_attention_bias": bias}))
    return rows


# ----------------------------------------------------------------------------------------
# Scoring logits


def teacher_forced(logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """What one teacher-forced forward says per image (``logits`` ``[B, L, V]``, ``targets`` ``[B, L]``,
    PAD targets ignored): ``argmax`` ``[B, L]``, ``exact`` (argmax = target at every non-PAD
    position), ``first_wrong`` (index of the first position where it is not; -1 if exact),
    ``loglik`` (sum of the targets' log-probabilities)."""
    logits = logits.float()
    argmax = logits.argmax(-1)
    real = targets != fc.PAD
    wrong = (argmax != targets) & real
    exact = ~wrong.any(-1)
    first_wrong = torch.where(exact, torch.full_like(exact, -1, dtype=torch.long), wrong.long().argmax(-1))
    logp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    loglik = (logp * real).sum(-1)
    return {"argmax": argmax, "exact": exact, "first_wrong": first_wrong, "loglik": loglik}


def greedy_prefix(targets: Sequence[int], argmax: Sequence[int], first_wrong: int) -> tuple[list[int], bool]:
    """The greedy caption as far as a teacher-forced forward determines it, and whether it is complete.

    Exact (``first_wrong`` -1): the true caption through its EOS. Otherwise the true tokens
    before the first wrong position, then the model's token there: complete if that is EOS or
    the caption has reached the input length (the most tokens greedy decoding generates)."""
    targets, argmax = [int(t) for t in targets], [int(t) for t in argmax]
    if first_wrong < 0:
        return targets[: targets.index(fc.EOS) + 1], True
    prefix = targets[:first_wrong] + [argmax[first_wrong]]
    return prefix, prefix[-1] == fc.EOS or len(prefix) >= len(targets)


def prefix_inputs(prefixes: Sequence[Sequence[int]], length: int) -> torch.Tensor:
    """``[BOS] + prefix`` padded with PAD to ``length`` tokens, per prefix (``[n, length]`` int64)."""
    out = torch.full((len(prefixes), length), fc.PAD, dtype=torch.long)
    out[:, 0] = fc.BOS
    for i, p in enumerate(prefixes):
        if len(p) >= length:
            raise ValueError(f"a prefix of {len(p)} tokens leaves no position to predict in {length}")
        out[i, 1: 1 + len(p)] = torch.tensor(p, dtype=torch.long)
    return out


def complete_greedy(step: Callable[[np.ndarray, torch.Tensor], torch.Tensor], indices: Sequence[int],
                    prefixes: Sequence[Sequence[int]], length: int = fc.INPUT_LENGTH) -> list[list[int]]:
    """Continue greedy decoding of the images ``indices`` from ``prefixes`` (none of them finished).

    ``step(indices, input_ids) -> logits [len(indices), length, V]`` runs the model on those
    images with fixed-length padded ``input_ids``; the next token of a prefix of k tokens is
    the argmax at position k. Stops at EOS or at ``length`` generated tokens."""
    captions = [list(p) for p in prefixes]
    active = [i for i, c in enumerate(captions) if c[-1] != fc.EOS and len(c) < length]
    while active:
        logits = step(np.asarray([indices[i] for i in active]), prefix_inputs([captions[i] for i in active], length))
        for row, i in enumerate(active):
            captions[i].append(int(logits[row, len(captions[i])].argmax()))
        active = [i for i in active if captions[i][-1] != fc.EOS and len(captions[i]) < length]
    return captions


# ----------------------------------------------------------------------------------------
# Metrics, intervals, paired comparisons (pure functions over a row's samples)


def row_metrics(samples: dict) -> dict:
    """``{metric: {"value", "low", "high"}}`` with 95% intervals (``intervals``): Wilson for
    proportions, percentile bootstrap (2000 resamples, seed 0) of the mean for ``loglik``."""
    row, out = {"samples": samples}, {}
    for metric in METRICS:
        right = intervals.correct(row, metric)
        low, high = intervals.metric_interval(row, metric, {})
        out[metric] = {"value": float(np.mean(samples[metric] if right is None else right)), "low": low, "high": high}
    return out


def compare_rows(samples_a: dict, samples_b: dict, metric: str) -> stats.Comparison:
    """A minus B on the same images: Newcombe + exact McNemar for proportions, paired bootstrap for ``loglik``."""
    if list(samples_a["label"]) != list(samples_b["label"]):
        raise ValueError("the two rows were not scored on the same images")
    return intervals.compare({"samples": samples_a, "label": "A"}, {"samples": samples_b, "label": "B"}, metric)


def comparison_pairs(rows: Sequence[dict]) -> list[tuple[str, dict, dict]]:
    """(kind, row A, row B): Turbo vs redundancy-only / semantic-only (same r and bias), bias vs
    no bias (same ranking and r), every biased merged row vs the baseline."""
    by = {(r["method"], r["r"], r["cross_bias"]): r for r in rows}
    pairs = []
    for row in rows:
        if row["method"] == "turbo":
            for other in ("redundancy-only", "semantic-only"):
                if (other, row["r"], row["cross_bias"]) in by:
                    pairs.append((f"turbo vs {other}", row, by[(other, row["r"], row["cross_bias"])]))
    for row in rows:
        if row["method"] != "baseline" and row["cross_bias"] and (row["method"], row["r"], False) in by:
            pairs.append(("bias vs no bias", row, by[(row["method"], row["r"], False)]))
    baseline = by.get(("baseline", 0, True))
    if baseline is not None:
        for row in rows:
            if row["method"] != "baseline" and row["cross_bias"]:
                pairs.append(("vs baseline", row, baseline))
    return pairs


def comparisons(rows: Sequence[dict]) -> list[dict]:
    out = []
    for kind, a, b in comparison_pairs(rows):
        entry = {"kind": kind, "a": a["label"], "b": b["label"]}
        for metric in METRICS:
            c = compare_rows(a["samples"], b["samples"], metric)
            entry[metric] = {"difference": c.difference, "low": c.low, "high": c.high, "p": c.p_value,
                             "test": c.test, "a_only": c.a_only, "b_only": c.b_only}
        out.append(entry)
    return out


def significant(entry: dict, metric: str) -> bool:
    """The interval of the difference excludes 0."""
    c = entry[metric]
    return c["low"] > 0 or c["high"] < 0


# ----------------------------------------------------------------------------------------
# Running one row


@dataclass
class GraphInfo:
    flops_before: float = 0.0
    flops_after: float = 0.0
    tokens_per_block: list = field(default_factory=list)
    fallbacks: list = field(default_factory=list)
    sites: list = field(default_factory=list)  # [module, decision, reason]


def compile_row(model: torch.nn.Module, spec: RowSpec, inner_backend: str) -> Callable:
    return compile_variant(model, spec.options, inner_backend)


class Runner:
    """Runs one compiled row on the test pixels in fixed-size batches (the last padded by
    repetition) and records its first graph's report (FLOPs, tokens, site decisions)."""

    def __init__(self, fn: Callable, pixels: torch.Tensor, batch_size: int) -> None:
        self.fn, self.pixels, self.batch_size = fn, pixels, batch_size
        self.info: Optional[GraphInfo] = None
        self.calls = 0

    def __call__(self, indices: np.ndarray, input_ids: torch.Tensor) -> torch.Tensor:
        real = len(indices)
        if real > self.batch_size:
            raise ValueError(f"{real} images in a batch of {self.batch_size}")
        pad = self.batch_size - real
        idx = np.concatenate([indices, np.repeat(indices[-1:], pad)]) if pad else indices
        ids = torch.cat([input_ids, input_ids[-1:].expand(pad, -1)]) if pad else input_ids
        with torch.no_grad(), recording(count_flops=self.info is None) as rec:
            logits = self.fn(self.pixels[torch.as_tensor(idx)], ids)
        self.calls += 1
        if rec.graphs and self.info is None:
            self.info = graph_info(rec.graphs, self.batch_size)
        return logits[:real]


def graph_info(graphs: Sequence, batch_size: int) -> GraphInfo:
    info = GraphInfo()
    for g in graphs:
        info.flops_before += (g.flops_before or 0) / batch_size
        info.flops_after += (g.flops_after or 0) / batch_size
        if g.blocks and not info.tokens_per_block:
            info.tokens_per_block = [b.tokens_in for b in g.blocks] + [g.blocks[-1].tokens_out]
        if g.fallback_reason:
            info.fallbacks.append(g.fallback_reason)
        info.sites += [[s.module, s.decision, s.reason] for s in g.sites]
    return info


def score_row(step: Runner, labels: np.ndarray, batch_size: int,
              log: Callable[[str], None] = print, desc: str = "") -> dict:
    """Every image's teacher-forced scores and full greedy caption for one row."""
    sequences = fc.VOCAB.caption_ids(labels)
    input_ids, targets = fc.teacher_forcing(sequences)
    n = len(labels)
    exact, first, loglik, captions = [], [], [], [None] * n
    pending_idx, pending_prefix = [], []
    started = time.perf_counter()
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(n, start + batch_size))
        tf = teacher_forced(step(idx, input_ids[idx]), targets[idx])
        for j, i in enumerate(idx):
            prefix, done = greedy_prefix(targets[i].tolist(), tf["argmax"][j].tolist(), int(tf["first_wrong"][j]))
            if done:
                captions[i] = prefix
            else:
                pending_idx.append(int(i))
                pending_prefix.append(prefix)
        exact += tf["exact"].tolist()
        first += tf["argmax"][:, 0].tolist()
        loglik += [round(float(v), 5) for v in tf["loglik"]]
        if (start // batch_size) % 10 == 9:
            log(f"  {desc}: {idx[-1] + 1}/{n} images, {time.perf_counter() - started:.0f} s")
    for s in range(0, len(pending_idx), batch_size):
        done = complete_greedy(step, pending_idx[s: s + batch_size], pending_prefix[s: s + batch_size])
        for i, caption in zip(pending_idx[s: s + batch_size], done):
            captions[i] = caption
    true = [sequences[i, 1: sequences[i].tolist().index(fc.EOS) + 1].tolist() for i in range(n)]
    greedy_exact = [captions[i] == true[i] for i in range(n)]
    if greedy_exact != exact:
        raise AssertionError("greedy captions and the teacher-forced exact match disagree")
    return {
        "label": [int(v) for v in labels],
        "exact": [bool(v) for v in exact],
        "first_class": [fc.VOCAB.class_of(t) for t in first],
        "loglik": loglik,
        "caption": [fc.VOCAB.decode(c) + ("" if c and c[-1] == fc.EOS else " <no eos>") for c in captions],
        "completed": len(pending_idx),
    }


def add_agreement(samples: dict, baseline: dict) -> None:
    samples["agrees"] = [a == b for a, b in zip(samples["caption"], baseline["caption"])]


def check_greedy(model: Callable, pixels: torch.Tensor, samples: dict, indices: Sequence[int]) -> dict:
    """A plain greedy loop (growing ``input_ids``) on ``indices``, against the captions the row derived."""
    with torch.no_grad():
        ids = fc.greedy_captions(model, pixels[torch.as_tensor(list(indices))])
    loop = [fc.VOCAB.decode(c) + ("" if c and c[-1] == fc.EOS else " <no eos>") for c in ids]
    derived = [samples["caption"][i] for i in indices]
    return {"indices": [int(i) for i in indices], "greedy_loop": loop, "derived": derived,
            "equal": loop == derived, "exact_among_them": int(sum(samples["exact"][i] for i in indices))}


def check_indices(samples: dict, k: int) -> list[int]:
    """Up to k//2 images the row captioned exactly and the rest not (both paths checked)."""
    right = [i for i, e in enumerate(samples["exact"]) if e][: k // 2]
    wrong = [i for i, e in enumerate(samples["exact"]) if not e][: k - len(right)]
    return sorted(right + wrong)


# ----------------------------------------------------------------------------------------
# The whole evaluation


def study(test_images: int = 1000, seed: int = 0, r_values: Sequence[int] = DEFAULT_R, batch_size: int = 20,
        inner_backend: str = "eager", greedy_check: int = 20, methods: Sequence[str] = tuple(METHODS),
        model: Optional[torch.nn.Module] = None, images: Optional[np.ndarray] = None,
        labels: Optional[np.ndarray] = None, image_size: int = fc.IMAGE_SIZE,
        partial: Optional[Callable[[dict], None]] = None, log: Callable[[str], None] = print) -> dict:
    """Every row of :func:`row_specs` on the test images; ``model``/``images``/``labels`` default to the
    trained captioner and ``fashion_mnist("test", test_images, seed)`` (tests pass tiny ones)."""
    if model is None:
        model = fc.load_fashion_captioner(log=log)
    model = model.eval()
    if images is None:
        from turbo_fx.model_zoo.data import fashion_mnist

        images, labels = fashion_mnist("test", limit=test_images, seed=seed)
    pixels = fc.preprocess(images, image_size)
    labels = np.asarray(labels)
    specs = row_specs(r_values, methods)
    payload = {
        "settings": {"test_images": len(labels), "seed": seed, "r": list(r_values), "batch_size": batch_size,
                     "inner_backend": inner_backend, "image_size": int(pixels.shape[-1]),
                     "image_tokens": _image_tokens(model, pixels), "greedy_check": greedy_check,
                     "blocks": getattr(getattr(model.vision, "config", None), "num_hidden_layers", None)},
        "machine": timing.machine(),
        "training": _training_record(),
        "rows": [],
    }
    baseline = None
    for spec in specs:
        started = time.perf_counter()
        fn = compile_row(model, spec, inner_backend)
        runner = Runner(fn, pixels, batch_size)
        samples = score_row(runner, labels, batch_size, log=log, desc=spec.label)
        if baseline is None:
            baseline = samples
        add_agreement(samples, baseline)
        info = runner.info or GraphInfo()
        row = {"label": spec.label, "method": spec.method, "r": spec.r, "cross_bias": spec.cross_bias,
               "options": spec.options, "gflops_per_image": info.flops_after / 1e9,
               "gflops_unmerged": info.flops_before / 1e9, "tokens_per_block": info.tokens_per_block,
               "fallbacks": info.fallbacks, "sites": info.sites,
               "cross_attention_sites": _cross_sites(info.sites),
               "calls": runner.calls,
               "seconds": round(time.perf_counter() - started, 1), "samples": samples}
        row["metrics"] = row_metrics(samples)
        if greedy_check and (spec.method == "baseline" or spec == _checked_spec(specs)):
            indices = check_indices(samples, greedy_check)
            # The baseline against the plain (uncompiled) model; the merged row against its own
            # compiled model, which compiles once more per input length.
            row["greedy_check"] = check_greedy(model if spec.method == "baseline" else fn, pixels, samples, indices)
            row["greedy_check"]["model"] = "eager, uncompiled" if spec.method == "baseline" else "turbo-compiled row"
            if not row["greedy_check"]["equal"]:
                log(f"  WARNING: greedy loop and derived captions differ for {spec.label}")
        m = row["metrics"]
        log(f"{spec.label}: exact {m['exact_match']['value']:.4f}, class {m['class_accuracy']['value']:.4f}, "
            f"loglik {m['loglik']['value']:.4f}, agrees {m['agreement']['value']:.4f}; "
            f"{row['gflops_per_image']:.2f} GFLOPs/image, tokens {_tokens(info.tokens_per_block)}, "
            f"cross-attn {row['cross_attention_sites']}, {row['seconds']:.0f} s")
        payload["rows"].append(row)
        if partial is not None:
            partial(payload)
    payload["comparisons"] = comparisons(payload["rows"])
    return payload


def _image_tokens(model: torch.nn.Module, pixels: torch.Tensor) -> int:
    with torch.no_grad():
        return int(model.vision(pixel_values=pixels[:1]).last_hidden_state.shape[1])


def _checked_spec(specs: Sequence[RowSpec]) -> Optional[RowSpec]:
    """The merged row whose greedy captions are checked with a plain loop: Turbo at the largest r, with bias."""
    merged = [s for s in specs if s.method == "turbo" and s.cross_bias]
    return max(merged, key=lambda s: s.r) if merged else None


def _cross_sites(sites: Sequence) -> str:
    """``"2/2 reads merged"``: how many of the decoder's cross-attention sites read the merged tokens."""
    cross = [s for s in sites if s[0].endswith("cross_attn")]
    reading = [s for s in cross if s[1] == "reads merged"]
    return f"{len(reading)}/{len(cross)} reads merged"


def _tokens(tokens: Sequence[int]) -> str:
    return f"{tokens[0]}→{tokens[-1]}" if tokens else "-"


def _training_record() -> Optional[dict]:
    path = fc.record_path(fc.weights_path())
    return json.loads(path.read_text()) if path.is_file() else None


# ----------------------------------------------------------------------------------------
# Writing


def _ci(m: dict, digits: int = 4) -> str:
    return f"{m['value']:.{digits}f} [{m['low']:.3f}, {m['high']:.3f}]"


def _diff(c: dict) -> str:
    counts = f" ({c['a_only']}:{c['b_only']})" if c.get("a_only") is not None else ""
    text = f"{output.difference(c)}, p={output.p_value(c['p'])}{counts}"
    return f"**{text}**" if c["low"] > 0 or c["high"] < 0 else text


def markdown(payload: dict) -> str:
    rows = payload["rows"]
    s = payload["settings"]
    base = rows[0]
    head = ["configuration", "cross-attn bias", "GFLOPs/image (saved)", "tokens", "decoder cross-attn"]
    head += [METRIC_TITLES[m] for m in METRICS]
    body = []
    for r in rows:
        saved = 1 - r["gflops_per_image"] / base["gflops_per_image"] if base["gflops_per_image"] else 0.0
        body.append([r["label"], "yes" if r["cross_bias"] else "no",
                     f"{r['gflops_per_image']:.3f} ({100 * saved:.1f}%)" if r["method"] != "baseline" else f"{r['gflops_per_image']:.3f}",
                     output.tokens(r["tokens_per_block"]),
                     "-" if r["method"] == "baseline" else r["cross_attention_sites"]]
                    + [_ci(r["metrics"][m]) for m in METRICS])
    comp_head = ["comparison", "A", "B"] + [f"{METRIC_TITLES[m]}: A − B [95%], p" for m in METRICS]
    comp_body = [[c["kind"], c["a"], c["b"]] + [_diff(c[m]) for m in METRICS] for c in payload["comparisons"]]
    found = [f"- {c['a']} vs {c['b']}: {METRIC_TITLES[m]} {c[m]['difference']:+.4f} "
             f"[{c[m]['low']:+.4f}, {c[m]['high']:+.4f}]"
             for c in payload["comparisons"] for m in METRICS if significant(c, m)]
    t = payload.get("training") or {}
    checks = [f"- {r['label']} ({r['greedy_check']['model']}): {len(r['greedy_check']['indices'])} images "
              f"({r['greedy_check']['exact_among_them']} captioned exactly), greedy loop equals the derived captions: "
              f"{r['greedy_check']['equal']}" for r in rows if "greedy_check" in r]
    title = "Captioning under turbo: DINOv2 ViT-S/14 (real weights) + a caption decoder trained here, Fashion-MNIST"
    lines = output.header(title, payload) + [
        f"{s['test_images']} class-balanced test images (seed {s['seed']}), {s['image_size']} px "
        f"({s['image_tokens']} image tokens, {s['blocks']} blocks), batch {s['batch_size']}, inner backend "
        f"`{s['inner_backend']}`. The decoder (2 layers, width 256) was trained on unmerged DINOv2 tokens"
        + (f" ({t.get('train_images')} training images, {t.get('steps')} steps, seed {t.get('seed')}, final loss "
           f"{t.get('final_loss')}, held-out exact match {t.get('validation', {}).get('exact_match')})" if t else "")
        + ". Captions are the class names in words (\"ankle boot\", \"trouser\", ...).",
        "",
        "Exact match, class accuracy and agreement: Wilson 95% intervals over the test images; mean "
        "log-likelihood of the true caption (EOS included): percentile bootstrap, 2000 resamples, seed 0. "
        "Rows at the same r remove the same tokens (equal FLOPs up to the semantic row's few MFLOPs). "
        "FLOPs are counted on the compiled graph (image tower and decoder) per image.",
        "",
        output.table(head, body),
        "",
        "## Paired comparisons (same images)",
        "",
        "A − B, positive: A scores higher. Proportions: Newcombe's interval for paired proportions and "
        "the exact McNemar p, (x:y) = images right under A only : under B only. Log-likelihood: paired "
        "percentile bootstrap, p = twice the share of resampled differences beyond 0. Bold: the "
        "interval excludes 0.",
        "",
        output.table(comp_head, comp_body),
        "",
        "Differences whose 95% interval excludes 0:" if found else "No difference's 95% interval excludes 0.",
        *found,
        "",
        f"There are {len(payload['comparisons'])} comparisons of {len(METRICS)} metrics each, with no correction "
        "for multiplicity: about 1 in 20 intervals excludes 0 by chance where nothing differs, so a "
        "pattern that holds at every r weighs more than one isolated difference.",
        *([f"Exact match equals class accuracy in every row: no image got its class right and a later "
           f"word wrong."] if all(r["metrics"]["exact_match"]["value"] == r["metrics"]["class_accuracy"]["value"]
                                  for r in rows) else []),
        "",
        "Greedy-decoding check (a plain loop with growing `input_ids` against the captions derived "
        "from the teacher-forced forward and its completion):",
        *checks,
        "", f"The run took {sum(r['seconds'] for r in rows) / 60:.0f} min.",
    ]
    return "\n".join(lines) + "\n"


def render(path: str) -> str:
    """Rewrite the markdown beside a result JSON of this study from the JSON alone."""
    return output.render_markdown(path, markdown)


def run(args) -> dict:
    def partial(p: dict) -> None:  # rows so far, so that a run cut short still leaves them
        output.save_json({**p, "command": args.command}, os.path.join(args.out, "fashion_captioner.json.gz"))

    payload = study(args.test, args.seed, args.r, args.batch, args.inner_backend, args.greedy_check, args.methods,
                    partial=partial, log=timing.log)
    payload["command"] = args.command
    output.write(payload, args.out, "fashion_captioner", markdown, compress=True)
    return payload
