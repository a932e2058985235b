"""Fidelity evaluation: what accuracy each turbo configuration keeps, at what FLOPs.

Every configuration (a ``Variant``) runs through the same path: ``torch.compile`` with the
turbo backend and ``dynamic=False``, the rewritten graph run by ``inner_backend`` (default
"eager": the rewrite is what changes accuracy, and Inductor's CPU code was within 1-7% of
eager on DINOv2-S while compiling 4x slower). The baseline is the same path with r=0, which
compiles the unmerged graph. Each row records

* FLOPs per sample, counted on the compiled graphs (``turbo_fx.recording(count_flops=True)``:
  torch's FlopCounterMode plus turbo's CPU SDPA and merge-op formulas); rows at the same r
  merge the same number of tokens, so their FLOPs match to within the semantic row's cost;
* the task's metrics (``VisionProbeTask``, ``TextSimilarityTask``) and their drop from the baseline;
* ``samples``: what the metrics are computed from, per test sample (the tasks' ``score_samples``),
  so that intervals and paired tests can be had from the JSON alone (``bench/intervals.py``).
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch

from turbo_fx.bench import fidelity
from turbo_fx.report import recording

METHOD_OPTIONS = {
    "redundancy-only": {"semantic": False},
    "semantic-only": {"redundancy": False},
    "turbo": {},
    "turbo + keep_salient": {"keep_salient": 1},
}


@dataclass(frozen=True)
class Variant:
    """One row: a label, the method family it belongs to, the table it goes in and the
    turbo options (r=0: the unmerged baseline)."""

    label: str
    method: str
    group: str
    options: dict = field(default_factory=dict)

    @property
    def is_baseline(self) -> bool:
        return self.options.get("r", 0) == 0


def baseline_variant() -> Variant:
    return Variant("baseline (no merging)", "baseline", "components", {"r": 0})


def component_variants(r_values: Sequence[int], turbo_options: dict,
                       methods: Sequence[str] = ("redundancy-only", "semantic-only", "turbo")) -> list[Variant]:
    """The paper's Table 7 / Figure 4: each ranking (R only, I only, R and I) at each r."""
    rows = []
    for r in r_values:
        for method in methods:
            options = {**turbo_options, **METHOD_OPTIONS[method], "r": r}
            if not method.startswith("turbo"):  # fusion settings mean nothing without both terms; ToMe-style keeps no sinks
                dropped = ("fusion", "beta", "gamma") + (("keep_salient",) if method == "redundancy-only" else ())
                options = {k: v for k, v in options.items() if k not in dropped}
            rows.append(Variant(f"{method} r={r}", method, "components", options))
    return rows


def fusion_variants(r: int, grid: dict[str, Sequence[dict]]) -> list[Variant]:
    """The paper's Table 8: each fusion of R and I with its coefficients, at one r."""
    rows = []
    for fusion, settings in grid.items():
        for extra in settings:
            name = ", ".join(f"{k}={v}" for k, v in extra.items())
            rows.append(Variant(f"fusion={fusion} {name}".strip(), f"turbo ({fusion})", "fusion",
                                {"r": r, "fusion": fusion, **extra}))
    return rows


def alpha_variants(r: int, alphas: Sequence[float], fusion: str = "sub") -> list[Variant]:
    """The paper's Figure 5: the balancing coefficient alpha at one r."""
    return [Variant(f"alpha={a:g} r={r}", "turbo", "alpha", {"r": r, "fusion": fusion, "alpha": a}) for a in alphas]


def threshold_variants(r_values: Sequence[int], min_tokens: int, turbo_options: dict) -> list[Variant]:
    """The paper's Table 9: large r with and without a floor on the token count."""
    rows = []
    for r in r_values:
        rows.append(Variant(f"turbo r={r}", "turbo", "threshold", {**turbo_options, "r": r}))
        rows.append(Variant(f"turbo r={r} min_tokens={min_tokens}", "turbo + min_tokens", "threshold",
                            {**turbo_options, "r": r, "min_tokens": min_tokens}))
    return rows


# ----------------------------------------------------------------------------------------
# Running a model and metering its calls


class Meter:
    """Calls a compiled model and keeps what each call cost: FLOPs (from the graphs compiled for
    that input shape, per real sample), fallbacks, token counts."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self.flops_by_shape: dict[Any, tuple[float, float]] = {}
        self.flops_before = self.flops_after = 0.0
        self.samples = 0
        self.fallbacks: list[str] = []
        self.tokens_per_block: Optional[list[int]] = None

    def __call__(self, shape_key: Any, n_real: int, n_batch: int, *args, **kwargs):
        with torch.no_grad(), recording(count_flops=True) as rec:
            out = self.fn(*args, **kwargs)
        if rec.graphs:
            self.flops_by_shape[shape_key] = (float(sum(g.flops_before or 0 for g in rec.graphs)),
                                              float(sum(g.flops_after or 0 for g in rec.graphs)))
            for g in rec.graphs:
                if g.fallback_reason and g.fallback_reason not in self.fallbacks:
                    self.fallbacks.append(g.fallback_reason)
                if g.blocks and self.tokens_per_block is None:
                    self.tokens_per_block = g.tokens_per_block
        if shape_key not in self.flops_by_shape:
            raise RuntimeError(f"no compiled graph was recorded for input shape {shape_key}")
        before, after = self.flops_by_shape[shape_key]
        self.flops_before += before * n_real / n_batch
        self.flops_after += after * n_real / n_batch
        self.samples += n_real
        return out


def compile_variant(model: torch.nn.Module, options: dict, inner_backend: str = "eager") -> Callable:
    """A fresh turbo compile of ``model`` (Dynamo reset first, so nothing is reused across rows)."""
    torch._dynamo.reset()
    return torch.compile(model, backend="turbo", options={**options, "inner_backend": inner_backend}, dynamic=False)


def batched(n: int, batch_size: int) -> Iterable[tuple[int, int]]:
    for start in range(0, n, batch_size):
        yield start, min(n, start + batch_size)


def progress_bar(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


# ----------------------------------------------------------------------------------------
# Tasks


@dataclass
class VisionData:
    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: Sequence[str] = ()


class VisionProbeTask:
    """Image features of an encoder, scored three ways against the unmerged encoder:
    linear-probe top-1 (probe fit on unmerged train features), weighted k-NN top-1 (the
    unmerged train features as the index) and cosine to the unmerged test features.

    ``preprocess(uint8 images) -> pixel tensor``; ``features(model output) -> [B, D]``.
    Every batch has ``batch_size`` images (the last is padded by repeating its final image
    and the padding is dropped), so one graph serves the whole set.
    """

    def __init__(self, model: torch.nn.Module, data: VisionData, preprocess: Callable, features: Callable,
                 batch_size: int = 32, knn_k: int = 20, input_name: Optional[str] = None,
                 cache_key: Optional[str] = None) -> None:
        self.model, self.data, self.preprocess, self.features = model, data, preprocess, features
        self.batch_size, self.knn_k, self.input_name = batch_size, knn_k, input_name
        self.cache_key = cache_key
        self.train_features = self.test_features = self.probe = None

    def metric_names(self) -> list[str]:
        return ["probe_top1", "knn_top1", "cosine"]

    def describe(self) -> dict:
        d = self.data
        return {"task": "vision probe", "dataset": d.name, "train_samples": len(d.train_labels),
                "test_samples": len(d.test_labels), "batch_size": self.batch_size, "knn_k": self.knn_k}

    def encode(self, meter: Meter, images: np.ndarray, desc: str, progress: bool) -> torch.Tensor:
        out = []
        n = len(images)
        for start, stop in progress_bar(batched(n, self.batch_size), -(-n // self.batch_size), desc, progress):
            chunk = images[start:stop]
            real = len(chunk)
            if real < self.batch_size:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch_size - real, axis=0)])
            pixels = self.preprocess(chunk)
            args, kwargs = ((), {self.input_name: pixels}) if self.input_name else ((pixels,), {})
            output = meter(tuple(pixels.shape), real, self.batch_size, *args, **kwargs)
            out.append(self.features(output)[:real].float())
        return torch.cat(out)

    def prepare(self, baseline: Meter, progress: bool, cache_dir: Optional[str] = None) -> None:
        """Unmerged train features (the probe and the k-NN index) and unmerged test features."""
        cached = _load_cached(cache_dir, self._cache_name())
        if cached is not None:
            self.train_features = cached["train"]
            log_line = "train features from cache"
        else:
            self.train_features = self.encode(baseline, self.data.train_images, "train features (unmerged)", progress)
            _save_cached(cache_dir, self._cache_name(), {"train": self.train_features})
            log_line = None
        self.probe = fidelity.fit_linear_probe(self.train_features, self.data.train_labels)
        self.cache_note = log_line

    def run(self, meter: Meter, progress: bool, desc: str) -> torch.Tensor:
        return self.encode(meter, self.data.test_images, desc, progress)

    def set_reference(self, test_features: torch.Tensor) -> None:
        self.test_features = test_features

    def score_samples(self, features: torch.Tensor) -> tuple[dict, dict]:
        """The metrics, and per test image what they are computed from (for intervals and
        paired tests): the label, the probe's and the k-NN's predictions, the cosine."""
        labels = fidelity.as_numpy(self.data.test_labels)
        probe = self.probe.predict(features)
        knn = fidelity.knn_predict(self.train_features, self.data.train_labels, features, self.knn_k)
        cosine = fidelity.rowwise_cosine(features, self.test_features)
        metrics = {
            "probe_top1": float(np.mean(probe == labels)),
            "knn_top1": float(np.mean(knn == labels)),
            "cosine": float(np.mean(cosine)),
        }
        samples = {"label": _ints(labels), "probe": _ints(probe), "knn": _ints(knn), "cosine": _rounded(cosine)}
        return metrics, samples

    def _cache_name(self) -> Optional[str]:
        if self.cache_key is None:
            return None
        h = hashlib.sha256()
        h.update(self.cache_key.encode())
        h.update(np.ascontiguousarray(self.data.train_images).tobytes())
        h.update(str(self.batch_size).encode())
        return f"train-features-{h.hexdigest()[:16]}.pt"


@dataclass
class TextData:
    lee_documents: Sequence[str]
    lee_similarity: np.ndarray  # [n, n] human similarity, symmetric
    polarity_sentences: Sequence[str]
    polarity_labels: np.ndarray


class TextSimilarityTask:
    """Sentence embeddings (mean of the last hidden state over the real tokens, as
    sentence-transformers pools MiniLM) scored against human judgements and the unmerged model:
    Spearman correlation of embedding cosine with the human scores on Lee's documents (all
    pairs), polarity probe accuracy (k-fold; each probe fit on unmerged embeddings, scored on
    the variant's) and cosine to the unmerged embeddings.

    Texts (at most ``max_length`` tokens) are grouped by length into buckets ``bucket`` tokens
    wide and each bucket runs as one batch padded to its longest text, with an attention mask;
    each bucket compiles its own graph (``bucket=1``: no padding at all, one graph per
    distinct length). FLOPs saved are reported against the *unpadded* unmerged model (each
    text at its own length), so the padding's cost is charged to every row, never credited.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, data: TextData, max_length: int = 256,
                 bucket: int = 16) -> None:
        self.model, self.tokenizer, self.data, self.max_length = model, tokenizer, data, max_length
        self.bucket = bucket
        self.texts = list(data.lee_documents) + list(data.polarity_sentences)
        self.n_lee = len(data.lee_documents)
        self.ids = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in self.texts]
        # Lee documents and polarity sentences never share a batch, so each corpus's FLOPs
        # are known on their own (the Lee target is stated in Lee's FLOPs).
        self.groups: dict[tuple[str, int], list[int]] = {}
        for i, ids in enumerate(self.ids):
            padded = min(-(-len(ids) // bucket) * bucket, max_length)
            self.groups.setdefault((self.corpus(i), padded), []).append(i)
        self.reference = None
        self._unpadded_flops: Optional[dict[str, float]] = None
        self.corpus_flops: dict[str, float] = {}

    def corpus(self, i: int) -> str:
        return "lee" if i < self.n_lee else "polarity"

    def metric_names(self) -> list[str]:
        return ["lee_spearman", "polarity_probe", "cosine"]

    def describe(self) -> dict:
        lee_lengths = [len(self.ids[i]) for i in range(self.n_lee)]
        real = sum(len(i) for i in self.ids)
        padded = sum(length * len(members) for (_, length), members in self.groups.items())
        return {"task": "text similarity", "lee_documents": self.n_lee,
                "polarity_sentences": len(self.texts) - self.n_lee, "max_length": self.max_length,
                "lee_tokens_mean": float(np.mean(lee_lengths)), "lee_tokens_max": int(max(lee_lengths)),
                "bucket": self.bucket, "graphs_per_row": len(self.groups),
                "padding_fraction": 1.0 - real / padded}

    def batch(self, length: int, members: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.zeros(len(members), length, dtype=torch.long)
        mask = torch.zeros(len(members), length, dtype=torch.long)
        for row, i in enumerate(members):
            ids[row, : len(self.ids[i])] = torch.tensor(self.ids[i])
            mask[row, : len(self.ids[i])] = 1
        return ids, mask

    def run(self, meter: Meter, progress: bool, desc: str) -> torch.Tensor:
        out = torch.zeros(len(self.texts), self.model.config.hidden_size)
        flops = {"lee": 0.0, "polarity": 0.0}
        for (corpus, length), members in progress_bar(sorted(self.groups.items()), len(self.groups), desc, progress):
            ids, mask = self.batch(length, members)
            kwargs = {"input_ids": ids} if bool(mask.all()) else {"input_ids": ids, "attention_mask": mask}
            before = meter.flops_after
            hidden = meter(tuple(ids.shape), len(members), len(members), **kwargs).last_hidden_state.float()
            flops[corpus] += meter.flops_after - before
            weight = mask[:, :, None].float()
            out[members] = (hidden * weight).sum(dim=1) / weight.sum(dim=1)
        counts = {"lee": self.n_lee, "polarity": len(self.texts) - self.n_lee}
        self.corpus_flops = {c: flops[c] / max(counts[c], 1) for c in flops}
        return out

    def row_extras(self) -> dict:
        """Per corpus: GFLOPs per text and FLOPs saved against that corpus's unpadded unmerged model."""
        reference = self._unmerged_by_corpus()
        extras = {}
        for corpus, value in self.corpus_flops.items():
            extras[f"{corpus}_gflops_per_text"] = value / 1e9
            extras[f"{corpus}_flop_reduction"] = 1.0 - value / reference[corpus] if reference[corpus] else None
        return extras

    def unmerged_flops_per_sample(self) -> float:
        """FLOPs of the unmerged model with every text at its own length, no padding (eager)."""
        by_corpus = self._unmerged_by_corpus()
        n_pol = len(self.texts) - self.n_lee
        return (by_corpus["lee"] * self.n_lee + by_corpus["polarity"] * n_pol) / len(self.texts)

    def _unmerged_by_corpus(self) -> dict[str, float]:
        if self._unpadded_flops is None:
            from torch.utils.flop_counter import FlopCounterMode

            import turbo_fx.flops  # noqa: F401  (registers the CPU SDPA formula)

            by_length: dict[int, int] = {}
            totals = {"lee": 0.0, "polarity": 0.0}
            for i, ids in enumerate(self.ids):
                if len(ids) not in by_length:
                    with torch.no_grad(), FlopCounterMode(display=False) as counter:
                        self.model(input_ids=torch.tensor([ids]))
                    by_length[len(ids)] = counter.get_total_flops()
                totals[self.corpus(i)] += by_length[len(ids)]
            n_pol = len(self.texts) - self.n_lee
            self._unpadded_flops = {"lee": totals["lee"] / max(self.n_lee, 1),
                                    "polarity": totals["polarity"] / max(n_pol, 1)}
        return self._unpadded_flops

    def prepare(self, baseline: Meter, progress: bool, cache_dir: Optional[str] = None) -> None:
        self.cache_note = None

    def set_reference(self, embeddings: torch.Tensor) -> None:
        self.reference = embeddings

    def score_samples(self, embeddings: torch.Tensor) -> tuple[dict, dict]:
        """The metrics, and what they are computed from: each Lee pair's embedding cosine and
        human score (upper triangles, row by row, so documents can be resampled), each
        polarity sentence's cross-validated prediction, label and fold, each text's cosine."""
        lee = embeddings[: self.n_lee]
        labels = fidelity.as_numpy(self.data.polarity_labels)
        folds = int(min(5, np.bincount(labels).min()))
        predictions, fold_of = fidelity.cross_validated_predictions(
            self.reference[self.n_lee:], embeddings[self.n_lee:], labels, folds=folds)
        lee_cosine = fidelity.upper_triangle(fidelity.pairwise_cosine(lee))
        lee_human = fidelity.upper_triangle(np.asarray(self.data.lee_similarity, dtype=np.float64))
        cosine = fidelity.rowwise_cosine(embeddings, self.reference)
        metrics = {
            "lee_spearman": fidelity.spearman(lee_cosine, lee_human),
            "polarity_probe": fidelity.fold_mean_accuracy(predictions, labels, fold_of),
            "cosine": float(np.mean(cosine)),
        }
        samples = {"lee_cosine": _rounded(lee_cosine), "lee_human": _rounded(lee_human),
                   "polarity_label": _ints(labels), "polarity_prediction": _ints(predictions),
                   "polarity_fold": _ints(fold_of), "cosine": _rounded(cosine)}
        return metrics, samples


# Per-sample values go into the results JSON: plain ints, and floats at 6 decimals (cosines of
# merged features differ from 1 by 1e-3 and more, so 1e-6 keeps every difference that matters).
def _ints(values) -> list[int]:
    return [int(v) for v in np.asarray(values).ravel()]


def _rounded(values, decimals: int = 6) -> list[float]:
    return [round(float(v), decimals) for v in np.asarray(values).ravel()]


# ----------------------------------------------------------------------------------------
# The evaluation loop


@dataclass
class EvalResults:
    model: str
    task: dict
    rows: list[dict]
    metric_names: list[str]
    inner_backend: str
    seconds_total: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def row(self, label: str) -> dict:
        for r in self.rows:
            if r["label"] == label:
                return r
        raise KeyError(label)


def evaluate(task, variants: Sequence[Variant], model_name: str, inner_backend: str = "eager",
             progress: bool = True, cache_dir: Optional[str] = None,
             log: Callable[[str], None] = print,
             on_row: Optional[Callable[[EvalResults], None]] = None) -> EvalResults:
    """Run the baseline, then every variant, on ``task``; one row per variant plus the baseline.

    Texts compile one graph per distinct length, more than Dynamo's default recompile limit
    (8, after which it would silently run the model unmerged), so the limit is lifted here."""
    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, accumulated_recompile_limit=RECOMPILE_LIMIT):
        return _evaluate(task, variants, model_name, inner_backend, progress, cache_dir, log, on_row)


RECOMPILE_LIMIT = 4096


def _evaluate(task, variants, model_name, inner_backend, progress, cache_dir, log, on_row) -> EvalResults:
    started = time.perf_counter()
    variants = [v for v in variants if not v.is_baseline]
    baseline = Meter(compile_variant(task.model, {"r": 0}, inner_backend))
    task.prepare(baseline, progress, cache_dir)
    if task.cache_note:
        log(f"  {task.cache_note}")
    base_meter = Meter(baseline.fn)
    base_meter.flops_by_shape = dict(baseline.flops_by_shape)
    reference = task.run(base_meter, progress, "baseline (no merging)")
    task.set_reference(reference)
    base_row = _row(baseline_variant(), base_meter, *task.score_samples(reference), None, task)
    log(_row_line(base_row, task.metric_names()))
    rows = [base_row]
    done: dict[tuple, dict] = {}

    def partial() -> EvalResults:
        return EvalResults(model_name, task.describe(), list(rows), task.metric_names(), inner_backend,
                           time.perf_counter() - started)

    for variant in variants:
        key = options_key(variant.options)
        if key in done:  # the same computation in another table: reuse it
            row = {**done[key], "label": variant.label, "method": variant.method, "group": variant.group}
        else:
            meter = Meter(compile_variant(task.model, variant.options, inner_backend))
            features = task.run(meter, progress, variant.label)
            row = done[key] = _row(variant, meter, *task.score_samples(features), base_row, task)
        rows.append(row)
        log(_row_line(row, task.metric_names()))
        if on_row is not None:  # results so far, so a long run that is cut short still leaves them
            on_row(partial())
    return partial()


def options_key(options: dict) -> str:
    """Options that compile to the same model get the same key (explicit defaults included)."""
    from turbo_fx.config import resolve_config

    return repr(resolve_config(options))


def _row(variant: Variant, meter: Meter, metrics: dict, samples: dict, base: Optional[dict], task) -> dict:
    flops = meter.flops_after / max(meter.samples, 1)
    flops_unmerged = meter.flops_before / max(meter.samples, 1)
    if hasattr(task, "unmerged_flops_per_sample"):
        flops_unmerged = task.unmerged_flops_per_sample()
    row = {
        "label": variant.label, "method": variant.method, "group": variant.group, "options": variant.options,
        "gflops_per_sample": flops / 1e9,
        "flop_reduction": 1.0 - flops / flops_unmerged if flops_unmerged else None,
        "tokens_per_block": meter.tokens_per_block,
        "fallbacks": meter.fallbacks,
        "metrics": metrics,
    }
    if hasattr(task, "row_extras"):
        row["extra"] = task.row_extras()
    row["drop"] = {k: (base["metrics"][k] if base is not None else v) - v for k, v in metrics.items()}
    row["samples"] = samples
    return row


def _row_line(row: dict, metric_names: Sequence[str]) -> str:
    metrics = "  ".join(f"{k} {row['metrics'][k]:.4f}" for k in metric_names)
    red = f"{row['flop_reduction'] * 100:.1f}%" if row["flop_reduction"] is not None else "-"
    fb = f"  FALLBACK: {'; '.join(row['fallbacks'])}" if row["fallbacks"] else ""
    return f"  {row['label']:<40} {row['gflops_per_sample']:.2f} GFLOPs ({red} fewer)  {metrics}{fb}"


def _load_cached(cache_dir: Optional[str], name: Optional[str]):
    if not cache_dir or not name:
        return None
    path = os.path.join(cache_dir, name)
    if os.path.exists(path):
        return torch.load(path)
    return None


def _save_cached(cache_dir: Optional[str], name: Optional[str], value) -> None:
    if not cache_dir or not name:
        return
    os.makedirs(cache_dir, exist_ok=True)
    tmp = os.path.join(cache_dir, name + ".tmp")
    torch.save(value, tmp)
    os.replace(tmp, os.path.join(cache_dir, name))
