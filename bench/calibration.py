"""``turbo-fx calibration``: does the FLOP budget ``turbo_fx.calibrate`` picks keep, on held-out
images, the drift it promised on the calibration batches, and what does the probe lose?

Model: DINOv2 ViT-S/14 with real weights on Fashion-MNIST, as ``turbo-fx eval`` runs it: images
upscaled to 224 px, features = final-LayerNorm CLS ⊕ mean patch token, a logistic-regression
probe fit on the unmerged model's features of ``--train`` class-balanced training images.

1. Calibration: ``--calibration-batches`` batches of ``--calibration-batch`` further training
   images (the ones the class-balanced order gives after the probe's, so none was seen by the
   probe). ``turbo_fx.calibrate`` runs once, with ``output=`` the probe's feature vector (so the
   drift is measured on what the probe reads: the mean over images of 1 - cosine against the
   unmerged model's features, with its one-sided 95% upper bound over batches) and
   ``max_drift`` the largest of ``--max-drift``. Every candidate budget is measured in that one
   call; for each smaller ``max_drift`` the choice is read from ``.candidates`` by calibrate's
   own rule (the smallest counted FLOP ratio whose upper bound is within ``max_drift``, ties to
   the smaller bound, none: merging off), :func:`select`. The run checks that the rule gives
   calibrate's own choice at the largest ``max_drift``; the tests check it at every one against
   a calibrate call per ``max_drift``.
2. Held out: ``--test`` class-balanced test images through the unmerged model and each chosen
   budget (``--every-budget``: every candidate), compiled as calibrate compiles its candidates
   (turbo, eager inner backend). Per row: the held-out drift (mean 1 - cosine of the probe
   features against the unmerged ones, percentile bootstrap over images), probe top-1 (Wilson),
   its paired difference from the unmerged model (Newcombe, exact McNemar), agreement with the
   unmerged predictions (Wilson) and the FLOP ratio counted on the compiled graph.

Per ``max_drift`` the table says whether the held-out drift kept the promise (mean, and the
whole bootstrap interval, at most ``max_drift``) and whether calibrate's upper bound was at
least the held-out mean. ``--small``: a tiny random DINOv2 on a few images (a smoke test);
``--render JSON`` rewrites the markdown from a saved result.
"""
from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from turbo_fx.bench import output, stats, timing
from turbo_fx.bench.evaluation import Meter, VisionData, VisionProbeTask
from turbo_fx.bench.fidelity import rowwise_cosine
from turbo_fx.bench.suites import dinov2_features
from turbo_fx.calibrate import DEFAULT_BUDGETS, Candidate, calibrate

STEM = "calibration"
DEFAULT_MAX_DRIFTS = (0.002, 0.005, 0.01, 0.02)
DEFAULT_TRAIN = 2000
DEFAULT_TEST = 1000
DEFAULT_CALIBRATION_BATCHES = 4
DEFAULT_CALIBRATION_BATCH = 16
DEFAULT_BATCH = 16
RESOLUTION = 224
# The probe's training features are computed (and cached) in batches of this size, as
# ``turbo-fx eval`` computes them, so the two studies share the cache.
TRAIN_BATCH = 32
UNMERGED = "unmerged"
# --small: a DINOv2 of the same class, two narrow blocks, random weights, 8x8 patches.
SMALL = {"train": 40, "test": 20, "calibration_batches": 2, "calibration_batch": 4, "batch": 10, "resolution": 112}


def probe_input(model_output) -> torch.Tensor:
    """What the probe reads from a DINOv2 output: CLS ⊕ mean patch token of the final
    LayerNorm, before the probe's own standardisation (``calibrate``'s ``output=``)."""
    return dinov2_features(model_output)


def select(candidates: Sequence[Candidate], max_drift: float) -> dict:
    """The options calibrate would return for ``max_drift`` given these measured candidates: the
    smallest counted FLOP ratio whose one-sided upper bound is within ``max_drift`` (ties: the
    smaller bound), ``{"r": 0}`` when none is."""
    within = [c for c in candidates if c.drift_upper <= max_drift and c.flop_ratio is not None]
    if not within:
        return {"r": 0}
    return dict(min(within, key=lambda c: (c.flop_ratio, c.drift_upper)).options)


def label(options: dict) -> str:
    if options.get("r") == 0 and "flops" not in options:
        return "merging off (r=0)"
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in options.items())


def check(args) -> None:
    from turbo_fx.bench.cli import UsageError

    if not args.max_drift or any(not 0 < d <= 1 for d in args.max_drift):
        raise UsageError(f"--max-drift values must be in (0, 1], got {args.max_drift}")
    if any(not 0 < b < 1 for b in args.budgets):
        raise UsageError(f"--budgets must be FLOP fractions in (0, 1), got {args.budgets}")
    if "flops" in args.options or "r" in args.options:
        raise UsageError("calibrate chooses the FLOP budget: --option must not set r or flops")


# ----------------------------------------------------------------------------------------
# Models and images


def small_model(seed: int = 0) -> torch.nn.Module:
    """A tiny random ``Dinov2Model`` (2 blocks, width 32). Its matrices are drawn wider than the
    init's 0.02, so that images get distinct features and merging has something to change."""
    from transformers import Dinov2Model

    from turbo_fx.model_zoo.dinov2 import dinov2_config

    config = dinov2_config()
    config.hidden_size, config.num_hidden_layers, config.num_attention_heads = 32, 2, 2
    torch.manual_seed(seed)
    model = Dinov2Model(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def split(train: int, calibration: int, test: int, seed: int) -> dict:
    """The probe's training images, the calibration images after them in the same class-balanced
    order (so the two never share an image) and the class-balanced test images."""
    from turbo_fx.model_zoo.data import fashion_mnist

    train_x, train_y = fashion_mnist("train", limit=train + calibration, seed=seed)
    test_x, test_y = fashion_mnist("test", limit=test, seed=seed)
    return {"train": (train_x[:train], train_y[:train]), "calibration": (train_x[train:], train_y[train:]),
            "test": (test_x, test_y)}


def encode(call: Callable, images: np.ndarray, preprocess: Callable, batch_size: int) -> torch.Tensor:
    """Probe features of every image, in batches of ``batch_size`` (the last padded by repeating
    its final image, so one graph serves all); ``call(pixels, real, batch_size)`` runs the model."""
    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start: start + batch_size]
        real = len(chunk)
        if real < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - real, axis=0)])
        with torch.no_grad():
            features = probe_input(call(preprocess(chunk), real, batch_size))
        out.append(features[:real].float())
    return torch.cat(out)


def compile_like_calibrate(model: torch.nn.Module, options: dict, extra: dict) -> Callable:
    """The candidate as calibrate compiles it: turbo, rewritten graphs run eagerly."""
    torch._dynamo.reset()
    return torch.compile(model, backend="turbo", dynamic=False,
                         options={**extra, "inner_backend": "eager", "compile_blocks": False, **options})


# ----------------------------------------------------------------------------------------
# Scoring


def interval(k_or_values, n: Optional[int] = None) -> dict:
    """``{"value", "low", "high"}``: Wilson for k of n, else a percentile bootstrap of the values' mean."""
    if n is not None:
        low, high = stats.wilson_interval(int(k_or_values), n)
        return {"value": int(k_or_values) / n, "low": low, "high": high}
    values = np.asarray(k_or_values, dtype=np.float64)
    low, high = stats.bootstrap_mean(values)
    return {"value": float(values.mean()), "low": low, "high": high}


def score_row(predictions: np.ndarray, drift: np.ndarray, labels: np.ndarray, base_predictions: np.ndarray) -> dict:
    """A held-out row's metrics, each with its 95% interval."""
    n = len(labels)
    correct, base_correct = predictions == labels, base_predictions == labels
    c = stats.paired_proportions(correct, base_correct)
    return {
        "drift": interval(drift),
        "top1": interval(correct.sum(), n),
        "vs_unmerged": {"difference": c.difference, "low": c.low, "high": c.high, "p": c.p_value,
                        "test": c.test, "a_only": c.a_only, "b_only": c.b_only},
        "agreement": interval((predictions == base_predictions).sum(), n),
    }


def verdicts(payload: dict) -> list[dict]:
    """Per max_drift: what calibrate chose, what it promised and what the held-out images gave."""
    rows = {r["label"]: r for r in payload["rows"]}
    candidates = {label(c["options"]): c for c in payload["calibration"]["candidates"]}
    out = []
    for choice in payload["choices"]:
        name = label(choice["options"])
        row, cand = rows.get(name), candidates.get(name)
        held = row["metrics"]["drift"] if row else None
        out.append({
            "max_drift": choice["max_drift"], "options": choice["options"], "label": name,
            "calibration_drift": cand["drift"] if cand else None,
            "calibration_upper": cand["drift_upper"] if cand else None,
            "held_out_drift": held,
            "kept": None if held is None else held["value"] <= choice["max_drift"],
            "kept_interval": None if held is None else held["high"] <= choice["max_drift"],
            "upper_covers": None if held is None or cand is None else cand["drift_upper"] >= held["value"],
        })
    return out


# ----------------------------------------------------------------------------------------
# The whole study


def study(max_drifts: Sequence[float] = DEFAULT_MAX_DRIFTS, budgets: Sequence[float] = DEFAULT_BUDGETS,
          train: int = DEFAULT_TRAIN, test: int = DEFAULT_TEST,
          calibration_batches: int = DEFAULT_CALIBRATION_BATCHES,
          calibration_batch: int = DEFAULT_CALIBRATION_BATCH, batch_size: int = DEFAULT_BATCH,
          seed: int = 0, every_budget: bool = False, extra_options: Optional[dict] = None,
          model: Optional[torch.nn.Module] = None, resolution: int = RESOLUTION,
          cache_dir: Optional[str] = None, log: Callable[[str], None] = print) -> dict:
    """Calibrate on training images the probe never saw, then score the chosen budgets on
    held-out test images (see the module docstring). ``model`` defaults to DINOv2-S with real
    weights (its probe features cached under ``cache_dir``)."""
    from turbo_fx.model_zoo import data, dinov2

    extra = dict(extra_options or {})
    real_weights = model is None
    if real_weights:
        model = dinov2.load_dinov2_small()
    model = model.eval()
    sets = split(train, calibration_batches * calibration_batch, test, seed)

    def preprocess(images):
        return dinov2.dinov2_preprocess(images, size=resolution)

    started = time.perf_counter()
    (train_x, train_y), (cal_x, cal_y), (test_x, test_y) = sets["train"], sets["calibration"], sets["test"]
    task = VisionProbeTask(model, VisionData("Fashion-MNIST", train_x, train_y, test_x, test_y,
                                             data.FASHION_MNIST_CLASSES),
                           preprocess, dinov2_features, batch_size=TRAIN_BATCH, input_name="pixel_values",
                           cache_key=f"dinov2-s/{resolution}px/seed{seed}" if real_weights else None)
    task.prepare(Meter(compile_like_calibrate(model, {"r": 0}, {})), False, cache_dir if real_weights else None)
    log(f"probe fit on {len(train_y)} training images' unmerged features ({task.cache_note or 'computed'}), "
        f"{time.perf_counter() - started:.0f} s")

    started = time.perf_counter()
    batches = [preprocess(cal_x[i: i + calibration_batch]) for i in range(0, len(cal_x), calibration_batch)]
    largest = max(max_drifts)
    result = calibrate(model, batches, max_drift=largest, metric="cosine", budgets=budgets,
                       output=probe_input, progress=True, **extra)
    if select(result.candidates, largest) != result.options:
        raise RuntimeError(f"the selection rule gave {select(result.candidates, largest)} where calibrate "
                           f"chose {result.options} at max_drift {largest}")
    calibration_seconds = round(time.perf_counter() - started, 1)
    choices = [{"max_drift": d, "options": select(result.candidates, d)} for d in max_drifts]
    log(f"calibrated in {calibration_seconds:.0f} s: " +
        "; ".join(f"{c['max_drift']:g} -> {label(c['options'])}" for c in choices))

    to_run = [c.options for c in result.candidates] if every_budget else [c["options"] for c in choices]
    to_run = [dict(o) for o in {label(o): o for o in to_run}.values()]
    labels = np.asarray(test_y, dtype=np.int64)
    payload = {
        "settings": {"max_drifts": list(max_drifts), "budgets": list(budgets), "train_images": len(train_y),
                     "calibration_batches": len(batches), "calibration_batch": calibration_batch,
                     "test_images": len(labels), "batch_size": batch_size, "seed": seed, "resolution": resolution,
                     "tokens": 1 + (resolution // dinov2.PATCH_SIZE) ** 2,
                     "blocks": model.config.num_hidden_layers, "real_weights": real_weights,
                     "every_budget": every_budget, "extra_options": extra, "inner_backend": "eager",
                     "selection": "calibrate called once at the largest max_drift; each max_drift's choice read "
                                  "from its candidates by calibrate's rule (bench.calibration.select)"},
        "machine": timing.machine(),
        "calibration": {"options": result.options, "max_drift": result.max_drift, "metric": result.metric,
                        "note": result.note, "seconds": calibration_seconds,
                        "candidates": [{"options": c.options, "flop_ratio": c.flop_ratio, "drift": c.drift,
                                        "drift_upper": c.drift_upper, "per_batch": c.per_batch}
                                       for c in result.candidates],
                        "labels": [int(v) for v in cal_y]},
        "choices": choices,
        "labels": labels.tolist(),
        "rows": [],
    }

    started = time.perf_counter()
    reference = encode(lambda pixels, real, n: model(pixels), test_x, preprocess, batch_size)
    base_pred = task.probe.predict(reference)
    payload["rows"].append(_row(UNMERGED, {}, 1.0, base_pred, np.zeros(len(labels)), labels, base_pred,
                                time.perf_counter() - started, [], log))
    for options in to_run:
        started = time.perf_counter()
        if options == {"r": 0}:  # merging off is the unmerged model
            features, ratio, facts = reference, 1.0, []
        else:
            meter = Meter(compile_like_calibrate(model, options, extra))
            features = encode(lambda pixels, real, n: meter(tuple(pixels.shape), real, n, pixels),
                              test_x, preprocess, batch_size)
            ratio = meter.flops_after / meter.flops_before if meter.flops_before else None
            facts = meter.fallbacks
        drift = 1.0 - rowwise_cosine(features, reference)
        payload["rows"].append(_row(label(options), options, ratio, task.probe.predict(features), drift, labels,
                                    base_pred, time.perf_counter() - started, facts, log))
    payload["verdicts"] = verdicts(payload)
    return payload


def _row(name: str, options: dict, ratio: Optional[float], predictions: np.ndarray, drift: np.ndarray,
         labels: np.ndarray, base_pred: np.ndarray, seconds: float, fallbacks: list, log) -> dict:
    metrics = score_row(predictions, drift, labels, base_pred)
    row = {"label": name, "options": options, "flop_ratio": ratio, "fallbacks": list(fallbacks),
           "seconds": round(seconds, 1), "metrics": metrics,
           "samples": {"prediction": [int(p) for p in predictions], "drift": [round(float(d), 8) for d in drift]}}
    log(f"{name}: held-out drift {metrics['drift']['value']:.5f}, top-1 {metrics['top1']['value']:.4f}, "
        f"agrees {metrics['agreement']['value']:.4f}, FLOP ratio {output.f(ratio, '.3f')}, {seconds:.0f} s")
    return row


# ----------------------------------------------------------------------------------------
# Writing


def _ci(m: Optional[dict], digits: int = 4) -> str:
    if not m:
        return "-"
    return f"{m['value']:.{digits}f} [{m['low']:.{digits}f}, {m['high']:.{digits}f}]"


def _diff(c: dict, digits: int = 4) -> str:
    text = f"{output.difference(c, digits)}, p={output.p_value(c['p'])} ({c['a_only']}:{c['b_only']})"
    return f"**{text}**" if c["low"] > 0 or c["high"] < 0 else text


def _yes(value: Optional[bool]) -> str:
    return "-" if value is None else ("yes" if value else "**no**")


VERDICT_HEADERS = ["max drift", "chosen", "FLOP ratio (held out)", "calibration drift (95% upper)",
                   "held-out drift [95%]", "held-out mean ≤ max", "held-out interval ≤ max",
                   "upper ≥ held-out mean", "probe top-1 [95%]", "top-1 − unmerged [95%], p (x:y)",
                   "agrees with unmerged [95%]"]
CANDIDATE_HEADERS = ["budget", "FLOP ratio (calibration)", "calibration drift", "95% upper bound",
                     "per batch", "held-out drift [95%]", "upper ≥ held-out mean", "chosen for max drift"]


def verdict_rows(payload: dict) -> list[list[str]]:
    rows = {r["label"]: r for r in payload["rows"]}
    base = rows[UNMERGED]
    body = [["-", UNMERGED, "1.000", "-", "0", "-", "-", "-", _ci(base["metrics"]["top1"]), "-", "-"]]
    for v in payload["verdicts"]:
        row = rows.get(v["label"])
        m = row["metrics"] if row else {}
        upper = ("-" if v["calibration_drift"] is None
                 else f"{v['calibration_drift']:.5f} ({v['calibration_upper']:.5f})")
        merged = row is not None and row["options"] != {"r": 0}
        body.append([
            f"{v['max_drift']:g}", v["label"], output.f(row["flop_ratio"] if row else None, ".3f"), upper,
            _ci(v["held_out_drift"], 5), _yes(v["kept"]), _yes(v["kept_interval"]), _yes(v["upper_covers"]),
            _ci(m.get("top1")), _diff(m["vs_unmerged"]) if merged else "-",
            _ci(m.get("agreement")) if merged else "-",
        ])
    return body


def candidate_rows(payload: dict) -> list[list[str]]:
    rows = {r["label"]: r for r in payload["rows"]}
    body = []
    for c in payload["calibration"]["candidates"]:
        name = label(c["options"])
        row = rows.get(name)
        held = row["metrics"]["drift"] if row else None
        chosen = [f"{ch['max_drift']:g}" for ch in payload["choices"] if label(ch["options"]) == name]
        body.append([name, output.f(c["flop_ratio"], ".3f"), f"{c['drift']:.5f}", f"{c['drift_upper']:.5f}",
                     " ".join(f"{d:.5f}" for d in c["per_batch"]), _ci(held, 5),
                     "-" if held is None else _yes(c["drift_upper"] >= held["value"]), ", ".join(chosen) or "-"])
    return body


def markdown(payload: dict) -> str:
    s, cal = payload["settings"], payload["calibration"]
    weights = "DINOv2 ViT-S/14 with real weights" if s["real_weights"] else "a tiny DINOv2 with random weights"
    lines = output.header(
        "Calibration: DINOv2-S on Fashion-MNIST", payload,
        f"Model: {weights}, Fashion-MNIST upscaled to {s['resolution']} px ({s['tokens']} tokens, {s['blocks']} "
        f"blocks). Probe: logistic regression on the unmerged model's features (final-LayerNorm CLS ⊕ mean "
        f"patch token) of {s['train_images']} class-balanced training images.",
        f"Calibration: `turbo_fx.calibrate` on {s['calibration_batches']} batches of {s['calibration_batch']} "
        f"further training images (none used by the probe), metric cosine on the probe's feature vector, "
        f"budgets {', '.join(f'{b:g}' for b in s['budgets'])}, inner backend `{s['inner_backend']}` "
        f"({cal['seconds']:.0f} s). Selection: {s['selection']}.",
        f"Held out: {s['test_images']} class-balanced test images (seed {s['seed']}), batch {s['batch_size']}, "
        f"compiled as calibrate compiles its candidates. Drift: the mean over images of 1 - cosine between a "
        "row's and the unmerged probe features (percentile bootstrap, 2000 resamples). Top-1 and agreement: "
        "Wilson 95%. Top-1 − unmerged: Newcombe's interval and the exact McNemar p, (x:y) = images right only "
        "merged : only unmerged. \"upper ≥ held-out mean\": calibrate's one-sided 95% upper bound was at least "
        "the held-out mean drift.",
    )
    lines += ["## Each max drift: the promise and the held-out images", "",
              output.table(VERDICT_HEADERS, verdict_rows(payload)), "",
              "## Every candidate budget on the calibration batches", "",
              output.table(CANDIDATE_HEADERS, candidate_rows(payload)), ""]
    if cal.get("note"):
        lines += [f"calibrate at max drift {cal['max_drift']:g}: {cal['note']}", ""]
    fallbacks = [f"- {r['label']}: " + "; ".join(r["fallbacks"]) for r in payload["rows"] if r["fallbacks"]]
    if fallbacks:
        lines += ["Fallbacks:", *fallbacks, ""]
    total = cal["seconds"] + sum(r["seconds"] for r in payload["rows"])
    lines += [f"Calibration and held-out rows took {total / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def render(path: str) -> str:
    """Rewrite the markdown beside a result JSON of this study from the JSON alone."""
    return output.render_markdown(path, markdown)


def run(args) -> dict:
    from turbo_fx.model_zoo.dinov2 import default_cache_dir

    small = getattr(args, "small", False)
    sizes = {"train": args.train, "test": args.test, "calibration_batches": args.calibration_batches,
             "calibration_batch": args.calibration_batch, "batch": args.batch, "resolution": RESOLUTION}
    if small:
        sizes = {k: min(v, SMALL[k]) for k, v in sizes.items()}
    timing.log(f"machine: {timing.machine_line()}")
    payload = study(args.max_drift, args.budgets, sizes["train"], sizes["test"], sizes["calibration_batches"],
                    sizes["calibration_batch"], min(sizes["batch"], sizes["test"]), args.seed, args.every_budget,
                    getattr(args, "options", None), model=small_model(args.seed) if small else None,
                    resolution=sizes["resolution"], cache_dir=str(default_cache_dir(args.cache)), log=timing.log)
    payload["command"] = args.command
    payload["settings"]["small"] = small
    output.write(payload, args.out, STEM + ("_small" if small else ""), markdown, compress=True)
    return payload
