"""The calibration study: its choice per max_drift is calibrate's own, the calibration images are
disjoint from the probe's, and a whole ``--small`` run (a tiny random DINOv2 on a few
Fashion-MNIST images) through the command line writes its tables and JSON."""
from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

pytest.importorskip("scipy")
pytest.importorskip("sklearn")

from turbo_fx.bench import calibration as cs  # noqa: E402
from turbo_fx.bench import cli, output  # noqa: E402
from turbo_fx.calibrate import Candidate  # noqa: E402
from turbo_fx.model_zoo.data import DatasetUnavailable, fashion_mnist, stratified_indices  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
# The package exports the function under the module's name, so the module is fetched by name.
calibrate_module = importlib.import_module("turbo_fx.calibrate")


def _fashion_or_skip():
    try:
        fashion_mnist("test", limit=10)
    except DatasetUnavailable as exc:
        pytest.skip(str(exc))


def test_the_choice_read_from_the_candidates_is_the_one_calibrate_makes(monkeypatch):
    # calibrate's own selection runs on hand-made measurements (nothing compiled): a tie in
    # FLOP ratio, a candidate without a counted ratio, and bounds on both sides of each max_drift.
    made = {0.9: (0.90, 0.0010), 0.8: (0.80, 0.0040), 0.7: (0.70, 0.0040), 0.6: (0.70, 0.0030),
            0.5: (None, 0.0001), 0.4: (0.40, 0.0500)}

    def fake_measure(model, batches, reference, options, chosen, metric, pick):
        ratio, upper = made[chosen["flops"]]
        return Candidate(chosen, ratio, upper / 2, upper, [upper / 2])

    monkeypatch.setattr(calibrate_module, "_measure", fake_measure)
    model = torch.nn.Linear(3, 2)
    for max_drift in (0.00005, 0.0005, 0.001, 0.003, 0.0035, 0.004, 0.01, 0.05, 1.0):
        result = calibrate_module.calibrate(model, [torch.randn(2, 3)], max_drift=max_drift, budgets=tuple(made),
                                            progress=False)
        assert cs.select(result.candidates, max_drift) == result.options, max_drift
    assert cs.select(result.candidates, 0.0035) == {"flops": 0.6}  # the tie goes to the smaller bound
    assert cs.select(result.candidates, 0.0005) == {"r": 0}
    assert cs.label({"r": 0}) == "merging off (r=0)" and cs.label({"flops": 0.6}) == "flops=0.6"


def test_calibration_images_follow_the_probe_images_and_never_repeat_them():
    _fashion_or_skip()
    sets = cs.split(30, 12, 10, seed=3)
    train_x, train_y = fashion_mnist("train", limit=30, seed=3)
    assert np.array_equal(sets["train"][0], train_x) and np.array_equal(sets["train"][1], train_y)
    assert len(sets["calibration"][0]) == 12 and len(sets["test"][1]) == 10
    labels = fashion_mnist("train")[1]
    order = stratified_indices(labels, 42, 3)
    assert len(set(order[:30]) & set(order[30:])) == 0
    assert np.array_equal(sets["calibration"][1], labels[order[30:]])


def test_a_bad_max_drift_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["calibration", "--small", "--max-drift", "0"])
    assert exc.value.code == 2
    assert "--max-drift" in capsys.readouterr().err


def test_small_run_writes_its_tables_and_json(tmp_path, capsys):
    _fashion_or_skip()
    out = tmp_path / "out"
    code = cli.main(["calibration", "--small", "--budgets", "0.9", "0.7", "--max-drift", "0.00001", "0.01", "1",
                     "--out", str(out)])
    assert code == 0
    stdout = capsys.readouterr().out
    payload = output.load_json(str(out / "calibration_small.json.gz"))
    s = payload["settings"]
    assert s["small"] is True and s["real_weights"] is False and s["inner_backend"] == "eager"
    assert (s["train_images"], s["test_images"], s["calibration_batches"], s["calibration_batch"]) == (40, 20, 2, 4)
    assert s["tokens"] == 65 and s["blocks"] == 2
    assert payload["command"].startswith("turbo-fx calibration --small")
    cal = payload["calibration"]
    assert [c["options"] for c in cal["candidates"]] == [{"flops": 0.9}, {"flops": 0.7}]
    assert cal["max_drift"] == 1.0 and len(cal["labels"]) == 8
    for c in cal["candidates"]:
        assert len(c["per_batch"]) == 2 and c["drift_upper"] >= c["drift"] >= 0
    assert cal["candidates"][1]["flop_ratio"] < cal["candidates"][0]["flop_ratio"] < 1
    # The largest max_drift takes calibrate's own choice, which it then checked against select().
    assert payload["choices"][-1]["options"] == cal["options"]
    assert [c["max_drift"] for c in payload["choices"]] == [0.00001, 0.01, 1.0]
    rows = {r["label"]: r for r in payload["rows"]}
    assert list(rows)[0] == "unmerged" and rows["unmerged"]["metrics"]["drift"]["value"] == 0
    assert rows["unmerged"]["metrics"]["agreement"]["value"] == 1.0
    chosen = {cs.label(c["options"]) for c in payload["choices"]}
    assert set(rows) == {"unmerged"} | chosen
    for row in payload["rows"]:
        m = row["metrics"]
        assert set(m) == {"drift", "top1", "vs_unmerged", "agreement"}
        assert len(row["samples"]["prediction"]) == len(row["samples"]["drift"]) == 20
        assert m["drift"]["low"] <= m["drift"]["value"] <= m["drift"]["high"]
        assert 0 <= m["top1"]["low"] <= m["top1"]["value"] <= m["top1"]["high"] <= 1
        assert row["fallbacks"] == []
    for v in payload["verdicts"]:
        held = v["held_out_drift"]["value"]
        assert v["kept"] == (held <= v["max_drift"]) and v["kept_interval"] == (v["held_out_drift"]["high"] <= v["max_drift"])
        if v["calibration_upper"] is not None:
            assert v["upper_covers"] == (v["calibration_upper"] >= held)
    # The markdown: printed and written, one line per max drift and per candidate.
    text = (out / "calibration_small.md").read_text()
    assert text in stdout
    lines = text.splitlines()
    assert sum(line.startswith("| -") and "unmerged" in line for line in lines) == 1
    for max_drift in ("1e-05", "0.01", "1 "):
        assert sum(line.startswith(f"| {max_drift}") for line in lines) == 1, max_drift
    assert sum(line.startswith("| flops=0.9 ") for line in lines) == 1
    assert sum(line.startswith("| flops=0.7 ") for line in lines) == 1
    assert "## Each max drift: the promise and the held-out images" in text
    # --render rebuilds the same markdown from the JSON alone.
    assert cs.render(str(out / "calibration_small.json.gz")) == text
