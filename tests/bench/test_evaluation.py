"""The evaluation loop: rows, FLOP accounting, metrics, against independent computations."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import turbo_fx
from turbo_fx.bench import evaluation as ev
from turbo_fx.bench import fidelity, output, results, suites

from model_builders import small_hf, small_vit


def vision_task(n_train=12, n_test=10, batch=4):
    rng = np.random.default_rng(0)
    data = ev.VisionData("synthetic", rng.normal(size=(n_train, 3, 32, 32)).astype(np.float32),
                         rng.integers(0, 3, n_train), rng.normal(size=(n_test, 3, 32, 32)).astype(np.float32),
                         rng.integers(0, 3, n_test))
    model = small_vit("vit", patch_size=8)
    return ev.VisionProbeTask(model, data, lambda a: torch.from_numpy(np.ascontiguousarray(a)), lambda out: out,
                              batch_size=batch, knn_k=3)


def test_vision_rows_flops_and_metrics_match_independent_computation():
    task = vision_task()
    variants = ev.component_variants([3], {}, ("redundancy-only", "turbo"))
    out = ev.evaluate(task, variants, "small vit", progress=False, log=lambda _: None)
    assert [r["label"] for r in out.rows] == ["baseline (no merging)", "redundancy-only r=3", "turbo r=3"]
    base, red, tur = out.rows

    # FLOPs per image equal explain's count on one batch divided by the batch, although the
    # 10 test images fill the last batch of 4 only half (padding must not be counted).
    x = torch.from_numpy(task.data.test_images[:4])
    report = turbo_fx.explain(task.model, x, r=3)
    assert tur["gflops_per_sample"] * 1e9 == pytest.approx(report.flops_after / 4, rel=1e-9)
    assert base["gflops_per_sample"] * 1e9 == pytest.approx(report.flops_before / 4, rel=1e-9)
    assert tur["flop_reduction"] == pytest.approx(1 - report.flops_after / report.flops_before)
    # Matched FLOPs: the two rankings merge the same counts; only the CLS row differs.
    assert abs(red["gflops_per_sample"] - tur["gflops_per_sample"]) < 0.01 * tur["gflops_per_sample"]
    assert tur["tokens_per_block"] == [17, 14, 11, 8]

    # Metrics, recomputed here from the models directly.
    with torch.no_grad():
        train = task.model(torch.from_numpy(task.data.train_images))
        test = task.model(torch.from_numpy(task.data.test_images))
        torch._dynamo.reset()
        merged_fn = torch.compile(task.model, backend="turbo", options={"r": 3, "inner_backend": "eager"})
        merged = torch.cat([merged_fn(torch.from_numpy(np.concatenate([c, np.repeat(c[-1:], 4 - len(c), 0)])))[: len(c)]
                            for c in np.array_split(task.data.test_images, [4, 8])])
    probe = fidelity.fit_linear_probe(train, task.data.train_labels)
    assert base["metrics"]["probe_top1"] == probe.top1(test, task.data.test_labels)
    assert tur["metrics"]["probe_top1"] == probe.top1(merged, task.data.test_labels)
    assert tur["metrics"]["knn_top1"] == fidelity.knn_top1(train, task.data.train_labels, merged, task.data.test_labels, k=3)
    assert tur["metrics"]["cosine"] == pytest.approx(float(np.mean(fidelity.rowwise_cosine(merged, test))), abs=1e-6)
    assert base["metrics"]["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert tur["drop"]["probe_top1"] == pytest.approx(base["metrics"]["probe_top1"] - tur["metrics"]["probe_top1"])


def test_same_options_in_two_tables_run_once(monkeypatch):
    calls = []
    real = ev.compile_variant
    monkeypatch.setattr(ev, "compile_variant", lambda model, options, inner: calls.append(dict(options)) or real(model, options, inner))
    task = vision_task(n_train=8, n_test=4)
    variants = (ev.component_variants([2], {}, ("turbo",)) + ev.threshold_variants([2], 12, {})
                + ev.alpha_variants(2, [0.05]))  # the default alpha spelled out: the same model
    partial_sizes = []
    out = ev.evaluate(task, variants, "small vit", progress=False, log=lambda _: None,
                      on_row=lambda partial: partial_sizes.append(len(partial.rows)))
    assert calls == [{"r": 0}, {"r": 2}, {"r": 2, "min_tokens": 12}]
    assert partial_sizes == [2, 3, 4, 5]  # baseline + each finished row, reported as it finishes
    rows = {(r["group"], r["label"]): r for r in out.rows}
    assert rows[("threshold", "turbo r=2")]["metrics"] == rows[("components", "turbo r=2")]["metrics"]
    assert rows[("threshold", "turbo r=2 min_tokens=12")]["tokens_per_block"] == [17, 15, 13, 12]


class WordTokenizer:
    """Words to ids (stable across calls), with [CLS]/[SEP] ids 1 and 2."""

    def __call__(self, text, truncation=True, max_length=256):
        ids = [1] + [3 + (sum(map(ord, w)) % 90) for w in text.split()] + [2]
        return {"input_ids": ids[:max_length]}


def text_task(bucket=1):
    docs = ["alpha beta gamma delta epsilon zeta eta theta", "alpha beta gamma delta epsilon zeta eta iota",
            "kappa lambda mu nu xi omicron pi rho sigma tau", "kappa lambda mu nu xi omicron pi rho sigma upsilon"]
    human = np.array([[1, .9, .1, .2], [.9, 1, .2, .1], [.1, .2, 1, .8], [.2, .1, .8, 1]])
    sentences = [f"good fine nice great {w}" for w in "abcde"] + [f"bad awful poor terrible sad {w}" for w in "abcde"]
    data = ev.TextData(docs, human, sentences, np.array([1] * 5 + [0] * 5))
    model = small_hf("bert", layers=3)
    return ev.TextSimilarityTask(model, WordTokenizer(), data, bucket=bucket)


def test_text_task_counts_real_tokens_and_scores_against_eager():
    task = text_task(bucket=1)
    assert task.describe()["graphs_per_row"] == 4  # 10, 12, 7 and 8 tokens
    assert task.describe()["padding_fraction"] == 0.0
    out = ev.evaluate(task, ev.component_variants([2], {}, ("turbo",)), "small bert", progress=False, log=lambda _: None)
    base, tur = out.rows
    with torch.no_grad():
        eager, flops_by_text = [], []
        for ids in task.ids:
            with FlopCounterMode(display=False) as counter:
                hidden = task.model(input_ids=torch.tensor([ids])).last_hidden_state
            flops_by_text.append(counter.get_total_flops())
            eager.append(hidden.mean(dim=1)[0])
    flops = sum(flops_by_text)
    eager = torch.stack(eager)
    assert base["gflops_per_sample"] * 1e9 == pytest.approx(flops / len(task.ids), rel=1e-9)
    assert task.unmerged_flops_per_sample() == pytest.approx(flops / len(task.ids), rel=1e-9)
    assert base["flop_reduction"] == pytest.approx(0.0, abs=1e-12)
    assert base["metrics"]["lee_spearman"] == pytest.approx(fidelity.similarity_spearman(eager[:4], task.data.lee_similarity))
    assert base["metrics"]["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert 0 < tur["flop_reduction"] < 0.6
    # Per corpus: Lee's documents alone (10 and 12 tokens) against their own unpadded cost.
    assert base["extra"]["lee_flop_reduction"] == pytest.approx(0.0, abs=1e-12)
    assert base["extra"]["lee_gflops_per_text"] * 1e9 == pytest.approx(
        sum(flops_by_text[:4]) / 4, rel=1e-9)
    assert 0 < tur["extra"]["lee_flop_reduction"] < 0.6

    # Padded buckets: one graph, the same unmerged embeddings, and the padding is charged as cost.
    padded = text_task(bucket=16)
    assert padded.describe()["graphs_per_row"] == 2  # Lee and polarity are batched apart
    out16 = ev.evaluate(padded, ev.component_variants([2], {}, ("turbo",)), "small bert", progress=False,
                        log=lambda _: None)
    base16 = out16.rows[0]
    assert base16["metrics"]["lee_spearman"] == pytest.approx(base["metrics"]["lee_spearman"], abs=1e-6)
    assert torch.allclose(padded.reference, task.reference, atol=1e-5)
    assert base16["flop_reduction"] < -0.3  # 16 tokens per text instead of 7-12


def test_suites_build_the_documented_rows():
    full = suites.variants_for("full", suites.VISION_DEFAULTS, {"alpha": 0.1})
    groups = {v.group for v in full}
    assert groups == {"components", "alpha", "fusion", "threshold"}
    components = [v for v in full if v.group == "components"]
    assert len(components) == 3 * len(suites.VISION_DEFAULTS["r"])
    assert {v.options.get("redundancy", True) for v in components if v.method == "semantic-only"} == {False}
    assert all(v.options["alpha"] == 0.1 for v in components if v.method == "turbo")
    alphas = [v.options["alpha"] for v in full if v.group == "alpha"]
    assert alphas == list(suites.ALPHAS)  # the alpha rows override the common alpha
    demo = suites.variants_for("demo", suites.VISION_DEFAULTS, {})
    assert {v.method for v in demo} == {"redundancy-only", "turbo"}
    with pytest.raises(ValueError, match="unknown suite"):
        suites.variants_for("everything", suites.VISION_DEFAULTS, {})


def test_results_written_as_markdown_json_and_plots(tmp_path):
    task = vision_task(n_train=8, n_test=4)
    variants = ev.component_variants([2, 4], {}, ("redundancy-only", "turbo")) + ev.alpha_variants(2, [0.1, 1.0])
    out = ev.evaluate(task, variants, "small vit", progress=False, log=lambda _: None)
    paths = results.write_results(out, str(tmp_path), "t", {"cpu": "x"}, "test machine", "cmd", ["probe_top1"])
    text = open(paths["markdown"]).read()
    assert "| turbo r=4" in text and "Balancing coefficient alpha" in text
    payload = output.load_json(paths["json"])
    assert len(payload["rows"]) == 1 + len(variants)
    for key in ("tradeoff_probe_top1", "alpha_probe_top1"):
        with open(paths[key], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
