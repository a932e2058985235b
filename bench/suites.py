"""``turbo-fx eval``: ready-made evaluation tasks and the sets of rows (suites) it and the demo run.

Vision: DINOv2 ViT-S/14 (real weights) on Fashion-MNIST, probe features = the final
LayerNorm's CLS token concatenated with the mean of its patch tokens (DINOv2's linear-probe
recipe). Text: MiniLM-L6 (real weights) on Lee's documents and Pang-Lee polarity sentences.

Suites (``r`` values are per attention block; DINOv2-S at 224 px has 257 tokens and 12 blocks,
MiniLM 6 blocks on texts of 20-256 tokens):
  demo        baseline, redundancy-only and Turbo at a few r
  components  + semantic-only: the paper's Table 7 / Figure 4
  full        components + fusions (Table 8) + alpha sweep (Figure 5) + min_tokens (Table 9)
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from turbo_fx.bench import evaluation as ev
from turbo_fx.bench.results import rerender as render  # noqa: F401  (turbo-fx eval --render JSON)

SUITES = ("demo", "components", "alpha", "fusion", "threshold", "full")
VISION_DEFAULTS = {"r": [8, 12, 16, 20], "demo_r": [8, 12, 16], "r_ref": 16, "threshold_r": [20, 24],
                   "min_tokens": 64}
TEXT_DEFAULTS = {"r": [4, 8, 12, 16], "demo_r": [4, 8, 16], "r_ref": 8, "threshold_r": [16, 24],
                 "min_tokens": 32}
ALPHAS = (0.01, 0.05, 0.3, 1.0)
FUSION_GRID = {
    "mul": [{"alpha": 0.3}],
    "div": [{}],
    "layer": [{"alpha": 0.3, "beta": 0.9, "gamma": 6.0}],
}


def variants_for(suite: str, defaults: dict, turbo_options: dict, r_values: Optional[Sequence[int]] = None,
                 alphas: Sequence[float] = ALPHAS, methods: Optional[Sequence[str]] = None) -> list[ev.Variant]:
    """The rows of ``suite`` (see the module docstring); ``turbo_options`` apply to every Turbo row."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; choose from {SUITES}")
    r_ref = defaults["r_ref"]
    rows: list[ev.Variant] = []
    if suite == "demo":
        rows += ev.component_variants(r_values or defaults["demo_r"], turbo_options,
                                      methods or ("redundancy-only", "turbo"))
    if suite in ("components", "full"):
        rows += ev.component_variants(r_values or defaults["r"], turbo_options,
                                      methods or ("redundancy-only", "semantic-only", "turbo"))
    if suite in ("alpha", "full"):
        base = {k: v for k, v in turbo_options.items() if k != "alpha"}
        rows += [ev.Variant(v.label, v.method, v.group, {**base, **v.options}) for v in ev.alpha_variants(r_ref, alphas)]
    if suite in ("fusion", "full"):
        rows += ev.fusion_variants(r_ref, FUSION_GRID)
    if suite in ("threshold", "full"):
        rows += ev.threshold_variants(defaults["threshold_r"], defaults["min_tokens"], turbo_options)
    return _unique(rows)


def _unique(rows: list[ev.Variant]) -> list[ev.Variant]:
    """Drop a row that repeats another row of the same table. (Equal options in different
    tables are kept: ``evaluate`` computes them once.)"""
    seen, out = set(), []
    for row in rows:
        key = (row.group, ev.options_key(row.options))
        if key in seen:
            continue
        seen.add(key)
        out.append(row)
    return out


def dinov2_features(output) -> torch.Tensor:
    """CLS token and mean patch token of the final (layer-normed) hidden state, concatenated."""
    hidden = output.last_hidden_state
    return torch.cat([hidden[:, 0], hidden[:, 1:].mean(dim=1)], dim=1)


def fashion_mnist_task(train: int, test: int, batch_size: int = 32, resolution: int = 224,
                       seed: int = 0) -> ev.VisionProbeTask:
    """DINOv2-S (real weights) on a class-balanced Fashion-MNIST sample of ``train`` + ``test`` images."""
    from turbo_fx.model_zoo import data, dinov2

    model = dinov2.load_dinov2_small()
    train_x, train_y = data.fashion_mnist("train", limit=train, seed=seed)
    test_x, test_y = data.fashion_mnist("test", limit=test, seed=seed)
    vision = ev.VisionData("Fashion-MNIST", train_x, train_y, test_x, test_y, data.FASHION_MNIST_CLASSES)
    return ev.VisionProbeTask(
        model, vision, lambda images: dinov2.dinov2_preprocess(images, size=resolution), dinov2_features,
        batch_size=batch_size, input_name="pixel_values", cache_key=f"dinov2-s/{resolution}px/seed{seed}",
    )


def text_task(max_length: int = 256, limit: Optional[int] = None, bucket: int = 8) -> ev.TextSimilarityTask:
    """MiniLM-L6 (real weights) on Lee's documents and the Pang-Lee polarity sentences;
    ``limit``: only the first ``limit`` documents and ``limit`` sentences of each polarity."""
    import numpy as np

    from turbo_fx.model_zoo import data, minilm

    model, tokenizer = minilm.load_minilm()
    docs, sims = data.lee_corpus()
    sentences, labels = data.polarity()
    if limit is not None:
        docs, sims = docs[:limit], sims[:limit, :limit]
        keep = np.concatenate([np.flatnonzero(labels == c)[:limit] for c in (0, 1)])
        sentences, labels = [sentences[i] for i in keep], labels[keep]
    return ev.TextSimilarityTask(model, tokenizer, ev.TextData(docs, sims, sentences, labels), max_length, bucket)


def check(args) -> None:
    from turbo_fx.bench.cli import UsageError

    if args.suite not in SUITES:
        raise UsageError(f"--suite must be one of {', '.join(SUITES)}, got {args.suite!r}")
    if args.resolution % 14:
        raise UsageError(f"--resolution must be a multiple of 14 (DINOv2's patch), got {args.resolution}")


def run(args) -> ev.EvalResults:
    from turbo_fx.bench import results, timing
    from turbo_fx.model_zoo.dinov2 import default_cache_dir

    timing.log(f"machine: {timing.machine_line()}")
    if args.task == "fashion-mnist":
        task = fashion_mnist_task(args.train, args.test, args.batch, args.resolution)
        defaults, plot_metrics = VISION_DEFAULTS, ["probe_top1", "knn_top1"]
        model = f"DINOv2 ViT-S/14 (real weights) on Fashion-MNIST at {args.resolution} px"
    else:
        task = text_task(limit=args.texts, bucket=args.bucket)
        defaults, plot_metrics, model = TEXT_DEFAULTS, ["lee_spearman", "polarity_probe"], "MiniLM-L6 (real weights)"
    variants = variants_for(args.suite, defaults, args.options, args.r, args.alphas or ALPHAS, args.methods)
    timing.log(f"{model}: {len(variants)} configurations + the baseline; {task.describe()}")
    stem = args.name or f"eval_{args.task.replace('-', '_')}_{args.suite}"

    def write(partial):
        return results.write_results(partial, args.out, stem, timing.machine(), timing.machine_line(),
                                     args.command, plot_metrics)

    out = ev.evaluate(task, variants, model, inner_backend=args.inner_backend, progress=not args.no_progress,
                      cache_dir=str(default_cache_dir(args.cache)), log=timing.log, on_row=write)
    paths = write(out)
    print(results.markdown(out, timing.machine_line(), args.command))
    timing.log(results.SPEED_NOTE)
    timing.log("wrote " + ", ".join(sorted(paths.values())))
    return out

