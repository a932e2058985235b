"""``turbo-fx rotary-fidelity``: how turbo's rules for the rotary tables of merged tokens change a
trained RoPE ViT's answers.

The model is ``model_zoo.fashion_rope_vit`` (trained here on Fashion-MNIST: 50 tokens, CLS + a
7x7 grid of patches, 6 blocks, 2D RoPE on the patches' queries and keys, cos/sin computed in the
forward from grid angles). When tokens merge, a merged token needs a rotary row of its own;
turbo's ``rotary`` option picks how it is built:

* ``"rows"``: the mean of its members' cos/sin rows (a rotation scaled by less than one where
  the members sit far apart);
* ``"position"``: the mean of its members' angles (the angle of their mean position), cos/sin
  recomputed from it; only where the graph computes the tables from angles, otherwise rows.

Rows: the unmerged model (turbo with ``r=0``, through the same compile path; checked against
the plain eager model), then for each r and each rule ``torch.compile(model, backend="turbo",
options={"r": r, "rotary": rule})``. Per row, on the same class-balanced test images: top-1
accuracy (Wilson 95% interval), its paired difference from the unmerged model (Newcombe's
interval, exact McNemar p), agreement with the unmerged model's predictions (Wilson), the mean
cosine between its logits and the unmerged logits (percentile bootstrap), FLOPs saved (counted
on the compiled graph) and the rule each rotary table actually got (from the graph report's
``token_tables``). At each r, every further rule is compared with the first one on the same
images. ``--small`` runs a tiny untrained model on a few images (a smoke test);
``--render JSON`` rewrites the markdown from a saved result.
"""
from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from turbo_fx.bench import output, stats, timing
from turbo_fx.bench.evaluation import Meter, compile_variant
from turbo_fx.bench.fidelity import rowwise_cosine
from turbo_fx.model_zoo import fashion_rope_vit as rv
from turbo_fx.report import recording

DEFAULT_RULES = ("rows", "position")
DEFAULT_R = (2, 4, 6)
DEFAULT_TEST = 2000
DEFAULT_BATCH = 100
SMALL_CONFIG = rv.RopeViTConfig(dim=32, depth=2, heads=2)
SMALL_TEST = 20
STEM = "rotary_fidelity"

# A row of the graph report's ``token_tables``: "<node> (<rows> rows from token <offset>): <rule>[ why]".
_TABLE_RULE = re.compile(r"\):\s*([A-Za-z_-]+)")


@dataclass(frozen=True)
class RowSpec:
    label: str
    rule: Optional[str]  # None: the unmerged model
    r: int
    options: dict = field(default_factory=dict)


def row_specs(r_values: Sequence[int] = DEFAULT_R, rules: Sequence[str] = DEFAULT_RULES,
              extra: Optional[dict] = None) -> list[RowSpec]:
    """The unmerged row, then every rule at each r (rules side by side at the same r).
    ``extra``: further turbo options for the merging rows."""
    extra = {k: v for k, v in (extra or {}).items() if k not in ("r", "rotary")}
    rows = [RowSpec("unmerged", None, 0, {"r": 0})]
    for r in r_values:
        for rule in rules:
            rows.append(RowSpec(f"{rule} r={r}", rule, r, {**extra, "r": r, "rotary": rule}))
    return rows


def check_rules(rules: Sequence[str]) -> Optional[str]:
    """Why turbo would refuse one of ``rules`` (an unknown value, or no ``rotary`` option at all), or None."""
    from turbo_fx.config import TurboConfigError, resolve_config

    for rule in rules:
        try:
            resolve_config({"r": 0, "rotary": rule})
        except TurboConfigError as exc:
            return f"--rules {rule!r}: {exc}"
    return None


def check(args) -> None:
    from turbo_fx.bench.cli import UsageError

    problem = check_rules(args.rules)
    if problem:
        raise UsageError(problem)
    if len(set(args.rules)) != len(args.rules):
        raise UsageError(f"--rules names a rule twice: {args.rules}")


# ----------------------------------------------------------------------------------------
# What the graph report says


def rules_that_ran(token_tables: Sequence[str]) -> list[str]:
    """The distinct rules the report's ``token_tables`` entries name, in order of appearance
    ("?" for an entry whose rule cannot be read)."""
    found = []
    for entry in token_tables:
        match = _TABLE_RULE.search(entry)
        rule = match.group(1) if match else "?"
        if rule not in found:
            found.append(rule)
    return found


@dataclass
class GraphFacts:
    tokens_per_block: list = field(default_factory=list)  # tokens into each block, then out of the last
    r_applied: list = field(default_factory=list)
    token_tables: list = field(default_factory=list)
    fallbacks: list = field(default_factory=list)
    run_time_failures: int = 0


def graph_facts(graphs: Sequence) -> GraphFacts:
    facts = GraphFacts()
    for g in graphs:
        if g.blocks and not facts.tokens_per_block:
            facts.tokens_per_block = [b.tokens_in for b in g.blocks] + [g.blocks[-1].tokens_out]
            facts.r_applied = [b.r_applied for b in g.blocks]
        facts.token_tables += list(getattr(g, "token_tables", []) or [])
        if g.fallback_reason and g.fallback_reason not in facts.fallbacks:
            facts.fallbacks.append(g.fallback_reason)
        facts.run_time_failures += g.run_time_failures
    return facts


# ----------------------------------------------------------------------------------------
# Running one row


def logits_of(fn: Callable, pixels: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, Meter, list]:
    """``fn``'s logits on every image, in fixed-size batches (the last padded by repetition, so
    one graph serves all), with the meter (FLOPs per image) and the reports of the graphs compiled."""
    meter, graphs, out = Meter(fn), [], []
    for start in range(0, len(pixels), batch_size):
        batch = pixels[start: start + batch_size]
        real = len(batch)
        if real < batch_size:
            batch = torch.cat([batch, batch[-1:].expand(batch_size - real, *batch.shape[1:])])
        with recording() as rec:
            logits = meter(tuple(batch.shape), real, batch_size, batch)
        graphs += rec.graphs
        out.append(logits[:real].float())
    return torch.cat(out), meter, graphs


def interval(k_or_values, n: Optional[int] = None) -> dict:
    """``{"value", "low", "high"}``: Wilson for k of n, else a percentile bootstrap of the values' mean."""
    if n is not None:
        low, high = stats.wilson_interval(int(k_or_values), n)
        return {"value": int(k_or_values) / n, "low": low, "high": high}
    values = np.asarray(k_or_values, dtype=np.float64)
    low, high = stats.bootstrap_mean(values)
    return {"value": float(values.mean()), "low": low, "high": high}


def comparison(c: stats.Comparison) -> dict:
    return {"difference": c.difference, "low": c.low, "high": c.high, "p": c.p_value, "test": c.test,
            "a_only": c.a_only, "b_only": c.b_only}


def score_row(predictions: np.ndarray, cosine: np.ndarray, labels: np.ndarray, base_predictions: np.ndarray) -> dict:
    """A row's metrics against the labels and the unmerged predictions, each with its 95% interval."""
    n = len(labels)
    correct, base_correct = predictions == labels, base_predictions == labels
    return {
        "top1": interval(correct.sum(), n),
        "vs_unmerged": comparison(stats.paired_proportions(correct, base_correct)),
        "agreement": interval((predictions == base_predictions).sum(), n),
        "cosine": interval(cosine),
    }


def compare_rules(rows: Sequence[dict], labels: np.ndarray) -> list[dict]:
    """At each r, every rule after the first against the first, on the same images: top-1 and
    agreement (Newcombe + exact McNemar), logit cosine (paired bootstrap)."""
    out = []
    merged = [r for r in rows if r["rule"] is not None]
    base = next(r for r in rows if r["rule"] is None)
    base_pred = np.asarray(base["samples"]["prediction"])
    for r_value in dict.fromkeys(r["r"] for r in merged):
        at_r = [r for r in merged if r["r"] == r_value]
        for other in at_r[1:]:
            a, b = other, at_r[0]
            pa, pb = np.asarray(a["samples"]["prediction"]), np.asarray(b["samples"]["prediction"])
            out.append({
                "r": r_value, "a": a["label"], "b": b["label"],
                "top1": comparison(stats.paired_proportions(pa == labels, pb == labels)),
                "agreement": comparison(stats.paired_proportions(pa == base_pred, pb == base_pred)),
                "cosine": comparison(stats.paired_bootstrap_mean(a["samples"]["cosine"], b["samples"]["cosine"])),
            })
    return out


# ----------------------------------------------------------------------------------------
# The whole study


def study(test_images: int = DEFAULT_TEST, seed: int = 0, r_values: Sequence[int] = DEFAULT_R,
          rules: Sequence[str] = DEFAULT_RULES, batch_size: int = DEFAULT_BATCH, inner_backend: str = "eager",
          extra_options: Optional[dict] = None, model: Optional[torch.nn.Module] = None,
          images: Optional[np.ndarray] = None, labels: Optional[np.ndarray] = None,
          training: Optional[dict] = None, log: Callable[[str], None] = print) -> dict:
    """Every row of :func:`row_specs` on the test images. ``model`` defaults to the trained
    stand-in (trained first if not cached), ``images``/``labels`` to
    ``fashion_mnist("test", test_images, seed)`` (uint8 ``[n, 28, 28]``)."""
    problem = check_rules(rules)
    if problem:
        raise ValueError(problem)
    if model is None:
        model = rv.load_fashion_rope_vit(log=log)
        training = rv.read_record() if training is None else training
    model = model.eval()
    if images is None:
        from turbo_fx.model_zoo.data import fashion_mnist

        images, labels = fashion_mnist("test", limit=test_images, seed=seed)
    pixels, labels = rv.preprocess(images), np.asarray(labels, dtype=np.int64)
    with torch.no_grad():
        eager = torch.cat([model(pixels[s: s + batch_size]) for s in range(0, len(pixels), batch_size)]).float()
    payload = {
        "settings": {"test_images": len(labels), "seed": seed, "r": list(r_values), "rules": list(rules),
                     "batch_size": batch_size, "inner_backend": inner_backend, "extra_options": extra_options or {},
                     "tokens": 1 + model.cfg.grid ** 2, "blocks": model.cfg.depth, "model_config": asdict(model.cfg)},
        "machine": timing.machine(),
        "training": training,
        "labels": labels.tolist(),
        "rows": [],
    }
    base_logits = base_pred = None
    for spec in row_specs(r_values, rules, extra_options):
        started = time.perf_counter()
        fn = compile_variant(model, spec.options, inner_backend)
        logits, meter, graphs = logits_of(fn, pixels, batch_size)
        facts = graph_facts(graphs)
        predictions = logits.argmax(-1).numpy()
        if base_logits is None:
            base_logits, base_pred = logits, predictions
            payload["unmerged_check"] = {
                "max_abs_logit_difference_vs_eager": float((logits - eager).abs().max()),
                "argmax_equal_to_eager": bool((predictions == eager.argmax(-1).numpy()).all()),
            }
        cosine = rowwise_cosine(logits, base_logits)
        gflops, gflops_unmerged = meter.flops_after / meter.samples / 1e9, meter.flops_before / meter.samples / 1e9
        row = {
            "label": spec.label, "rule": spec.rule, "r": spec.r, "options": spec.options,
            "rule_ran": rules_that_ran(facts.token_tables), "token_tables": facts.token_tables,
            "tokens_per_block": facts.tokens_per_block, "r_applied": facts.r_applied,
            "gflops_per_image": gflops, "gflops_unmerged": gflops_unmerged,
            "flops_saved": 1 - gflops / gflops_unmerged if gflops_unmerged else None,
            "fallbacks": facts.fallbacks, "run_time_failures": facts.run_time_failures,
            "seconds": round(time.perf_counter() - started, 1),
            "samples": {"prediction": predictions.tolist(), "cosine": [round(float(c), 7) for c in cosine]},
        }
        row["metrics"] = score_row(predictions, cosine, labels, base_pred)
        m = row["metrics"]
        log(f"{spec.label}: top-1 {m['top1']['value']:.4f}, agrees {m['agreement']['value']:.4f}, "
            f"cosine {m['cosine']['value']:.5f}, FLOPs saved {100 * (row['flops_saved'] or 0):.1f}%, "
            f"tokens {output.tokens(facts.tokens_per_block)}, rule ran {row['rule_ran'] or '-'}, {row['seconds']:.0f} s")
        payload["rows"].append(row)
    payload["comparisons"] = compare_rules(payload["rows"], labels)
    return payload


def small_model(seed: int = 0) -> torch.nn.Module:
    """The tiny untrained model of ``--small`` (same classes and graph shape as the trained one).

    Its matrices are drawn ten times wider than the training init: at the init's scale every
    image gets nearly the same logits, and merging could change nothing worth checking."""
    model = rv.build_fashion_rope_vit(seed, SMALL_CONFIG).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model


# ----------------------------------------------------------------------------------------
# Writing


def _ci(m: dict, digits: int = 4) -> str:
    return f"{m['value']:.{digits}f} [{m['low']:.{digits}f}, {m['high']:.{digits}f}]"


def _diff(c: dict, digits: int = 4) -> str:
    counts = f" ({c['a_only']}:{c['b_only']})" if c.get("a_only") is not None else ""
    text = f"{output.difference(c, digits)}, p={output.p_value(c['p'])}{counts}"
    return f"**{text}**" if c["low"] > 0 or c["high"] < 0 else text


def table_rows(payload: dict) -> list[list[str]]:
    """The main table's cells, one list per row of the payload."""
    body = []
    for r in payload["rows"]:
        m = r["metrics"]
        merged = r["rule"] is not None
        saved = f" ({100 * r['flops_saved']:.1f}%)" if merged and r["flops_saved"] is not None else ""
        body.append([
            r["label"], r["rule"] or "-", ", ".join(r["rule_ran"]) or "-", output.tokens(r["tokens_per_block"]),
            f"{1e3 * r['gflops_per_image']:.2f}{saved}", _ci(m["top1"]),
            _diff(m["vs_unmerged"]) if merged else "-",
            _ci(m["agreement"]) if merged else "-", _ci(m["cosine"], 5) if merged else "-",
        ])
    return body


HEADERS = ["configuration", "rule asked", "rule ran", "tokens", "MFLOPs/image (saved)", "top-1 [95%]",
           "top-1 − unmerged [95%], p (x:y)", "agrees with unmerged [95%]", "logit cosine [95%]"]
COMPARISON_HEADERS = ["r", "A", "B", "top-1: A − B [95%], p (x:y)", "agreement: A − B [95%], p (x:y)",
                      "logit cosine: A − B [95%], p"]


def markdown(payload: dict) -> str:
    s, t = payload["settings"], payload.get("training") or {}
    check = payload.get("unmerged_check") or {}
    comp_body = [[str(c["r"]), c["a"], c["b"], _diff(c["top1"]), _diff(c["agreement"]), _diff(c["cosine"], 5)]
                 for c in payload["comparisons"]]
    trained = (f"Trained here ({t.get('train_images')} training images, {t.get('steps')} steps of "
               f"{t.get('batch_size')}, {t.get('seconds')} s, final loss {t.get('final_loss')}, test top-1 "
               f"{t.get('test_accuracy')} on {t.get('test_images')} images)." if t else "Untrained weights.")
    cfg = s["model_config"]
    failures = [f"- {r['label']}: " + "; ".join(r["fallbacks"]) for r in payload["rows"] if r["fallbacks"]]
    lines = output.header(
        "Rotary rules under turbo: a RoPE ViT trained on Fashion-MNIST", payload,
        f"Model: `model_zoo.fashion_rope_vit` ({s['tokens']} tokens = CLS + {s['tokens'] - 1} patches, "
        f"{s['blocks']} blocks, width {cfg['dim']}, {cfg['heads']} heads, 2D RoPE on the patches' queries and "
        f"keys, cos/sin computed from grid angles in the forward). {trained}",
        f"{s['test_images']} class-balanced test images (seed {s['seed']}), batch {s['batch_size']}, inner "
        f"backend `{s['inner_backend']}`; rules {', '.join(f'`{x}`' for x in s['rules'])} at r = "
        f"{', '.join(map(str, s['r']))} per block. The unmerged row is turbo with r=0 through the same compile "
        f"path (largest |logit| difference from the plain eager model "
        f"{check.get('max_abs_logit_difference_vs_eager', float('nan')):.2e}, same argmax on every image: "
        f"{check.get('argmax_equal_to_eager')}).",
        "Top-1 and agreement: Wilson 95% intervals. Top-1 − unmerged: Newcombe's interval for paired "
        "proportions and the exact McNemar p, (x:y) = images right only merged : only unmerged. Logit "
        "cosine: the mean over images of the cosine between a row's and the unmerged logits, percentile "
        "bootstrap (2000 resamples, seed 0). FLOPs are counted on the compiled graph, per image. "
        "\"rule ran\": the rule the graph report names for the rotary tables (`token_tables`).",
    )
    lines += [output.table(HEADERS, table_rows(payload)), ""]
    if comp_body:
        lines += ["## Rules compared on the same images", "",
                  "A − B, positive: A scores higher. Proportions: Newcombe and exact McNemar, (x:y) = images "
                  "only A gets right (agrees on) : only B does. Cosine: paired bootstrap. Bold: the interval "
                  "excludes 0.", "", output.table(COMPARISON_HEADERS, comp_body), ""]
    if failures:
        lines += ["Fallbacks (compiled unmerged):", *failures, ""]
    lines += [f"The run took {sum(r['seconds'] for r in payload['rows']) / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def render(path: str) -> str:
    """Rewrite the markdown beside a result JSON of this study from the JSON alone."""
    return output.render_markdown(path, markdown)


def run(args) -> dict:
    small = getattr(args, "small", False)
    model = small_model(args.seed) if small else None
    test = min(args.test, SMALL_TEST) if small else args.test
    payload = study(test, args.seed, args.r, args.rules, min(args.batch, test), args.inner_backend,
                    getattr(args, "options", None), model=model, log=timing.log)
    payload["command"] = args.command
    payload["settings"]["small"] = small
    output.write(payload, args.out, STEM + ("_small" if small else ""), markdown, compress=True)
    return payload
