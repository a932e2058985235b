"""The rotary-fidelity study: reading the rule that ran from the graph report, the rows' metrics
and rule comparisons on hand-made predictions, and a whole ``--small`` run (a tiny untrained RoPE
ViT on 20 Fashion-MNIST test images) through the command line, checking its table and JSON."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("scipy")

from turbo_fx.bench import cli, output, stats  # noqa: E402
from turbo_fx.bench import rotary_fidelity as rf  # noqa: E402
from turbo_fx.model_zoo.data import DatasetUnavailable, fashion_mnist  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_rows_put_the_rules_side_by_side_at_each_r_after_the_unmerged_row():
    specs = rf.row_specs([2, 4], ["rows", "position"], extra={"alpha": 0.1, "r": 9, "rotary": "x"})
    assert [s.label for s in specs] == ["unmerged", "rows r=2", "position r=2", "rows r=4", "position r=4"]
    assert specs[0].options == {"r": 0} and specs[0].rule is None
    assert specs[2].options == {"alpha": 0.1, "r": 2, "rotary": "position"}


def test_the_rule_that_ran_is_read_from_the_token_table_entries():
    entries = ["cos (49 rows from token 1): position", "sin (49 rows from token 1): position",
               "mul_3 (49 rows from token 1): rows (the table is stored, not computed from angles)"]
    assert rf.rules_that_ran(entries) == ["position", "rows"]
    assert rf.rules_that_ran(entries[:2]) == ["position"]
    assert rf.rules_that_ran([]) == [] and rf.rules_that_ran(["something else"]) == ["?"]


def test_row_metrics_and_rule_comparisons_on_hand_made_predictions():
    labels = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    base = labels.copy()
    base[9] = 0  # the unmerged model gets 9 of 10
    merged = base.copy()
    merged[:2] = [5, 5]  # wrong on two more, and disagrees with the unmerged model there
    cosine = np.linspace(0.9, 1.0, 10)
    m = rf.score_row(merged, cosine, labels, base)
    assert m["top1"]["value"] == 0.7 and (m["top1"]["low"], m["top1"]["high"]) == stats.wilson_interval(7, 10)
    assert m["vs_unmerged"]["difference"] == pytest.approx(-0.2)
    assert (m["vs_unmerged"]["a_only"], m["vs_unmerged"]["b_only"]) == (0, 2)
    assert m["agreement"]["value"] == 0.8
    assert m["cosine"]["value"] == pytest.approx(0.95) and m["cosine"]["low"] < 0.95 < m["cosine"]["high"]

    def row(label, rule, r, prediction, cos):
        return {"label": label, "rule": rule, "r": r,
                "samples": {"prediction": list(prediction), "cosine": list(cos)}}

    rows = [row("unmerged", None, 0, base, np.ones(10)), row("rows r=2", "rows", 2, merged, cosine),
            row("position r=2", "position", 2, base, np.ones(10))]
    (c,) = rf.compare_rules(rows, labels)
    assert (c["r"], c["a"], c["b"]) == (2, "position r=2", "rows r=2")
    assert c["top1"]["difference"] == pytest.approx(0.2) and c["agreement"]["difference"] == pytest.approx(0.2)
    assert c["cosine"]["difference"] == pytest.approx(0.05) and c["cosine"]["test"] == "paired bootstrap"


def test_an_unknown_rule_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["rotary-fidelity", "--rules", "diagonal", "--small"])
    assert exc.value.code == 2
    assert "--rules 'diagonal'" in capsys.readouterr().err


def test_small_run_writes_its_table_and_json(tmp_path, capsys):
    try:
        fashion_mnist("test", limit=10)
    except DatasetUnavailable as exc:
        pytest.skip(str(exc))
    out = tmp_path / "out"
    code = cli.main(["rotary-fidelity", "--small", "--r", "1", "3", "--out", str(out)])
    assert code == 0
    stdout = capsys.readouterr().out
    payload = output.load_json(str(out / "rotary_fidelity_small.json.gz"))
    rows = payload["rows"]
    assert [r["label"] for r in rows] == ["unmerged", "rows r=1", "position r=1", "rows r=3", "position r=3"]
    assert payload["settings"]["test_images"] == 20 and payload["settings"]["small"] is True
    assert payload["settings"]["rules"] == ["rows", "position"] and payload["settings"]["tokens"] == 50
    assert len(payload["labels"]) == 20 and payload["command"].startswith("turbo-fx rotary-fidelity --small")
    assert payload["unmerged_check"]["max_abs_logit_difference_vs_eager"] < 1e-4
    assert payload["unmerged_check"]["argmax_equal_to_eager"] is True
    for row in rows:
        assert set(row["metrics"]) == {"top1", "vs_unmerged", "agreement", "cosine"}
        assert len(row["samples"]["prediction"]) == len(row["samples"]["cosine"]) == 20
        assert row["fallbacks"] == [] and row["run_time_failures"] == 0
        for key in ("value", "low", "high"):
            assert 0.0 <= row["metrics"]["top1"][key] <= 1.0
    base = rows[0]
    assert base["rule_ran"] == [] and base["flops_saved"] == pytest.approx(0.0)
    assert base["metrics"]["agreement"]["value"] == 1.0 and base["metrics"]["cosine"]["value"] == pytest.approx(1.0)
    # 2 blocks; CLS is protected, so r tokens of the 49 patches go per block.
    assert [r["tokens_per_block"] for r in rows[1:]] == [[50, 49, 48]] * 2 + [[50, 47, 44]] * 2
    for row in rows[1:]:
        assert row["rule_ran"] and set(row["rule_ran"]) <= {"rows", "position"}
        assert row["token_tables"] and 0 < row["flops_saved"] < 0.5
    assert rows[1]["rule_ran"] == ["rows"] and rows[3]["rule_ran"] == ["rows"]
    # More merging saves more.
    assert rows[3]["flops_saved"] > rows[1]["flops_saved"]
    assert [(c["r"], c["a"], c["b"]) for c in payload["comparisons"]] == [
        (1, "position r=1", "rows r=1"), (3, "position r=3", "rows r=3")]
    # The markdown: printed and written, one table line per row, the rule comparison table.
    text = (out / "rotary_fidelity_small.md").read_text()
    assert text in stdout
    for label in ("unmerged", "rows r=1", "position r=1", "rows r=3", "position r=3"):
        assert sum(line.startswith(f"| {label} ") for line in text.splitlines()) == 1
    assert "## Rules compared on the same images" in text and "| 3 " in text
    # --render rebuilds the same markdown from the JSON alone.
    assert rf.render(str(out / "rotary_fidelity_small.json.gz")) == text
