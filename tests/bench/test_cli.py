"""The turbo-fx command line: help, argument errors (exit 2) and small end-to-end runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from turbo_fx.bench import cli, output

PNG = b"\x89PNG\r\n\x1a\n"


def run_cli(args, capsys):
    try:
        code = cli.main(args)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("command", [study.name for study in cli.STUDIES])
def test_help_of_every_command(command, capsys):
    code, out, _ = run_cli([command, "--help"], capsys)
    assert code == 0
    assert "--out" in out and "--option" in out


@pytest.mark.parametrize("args, message", [
    (["eval", "--suite", "everything"], "--suite must be one of"),
    (["eval", "--option", "alhpa=0.1"], "unknown turbo option(s) ['alhpa']"),
    (["eval", "--option", "alpha"], "--option expects KEY=VALUE"),
    (["eval", "--option", "fusion=max"], "option 'fusion' must be one of"),
    (["eval", "--resolution", "100"], "--resolution must be a multiple of 14"),
    (["eval", "--task", "audio"], "invalid choice: 'audio'"),
    (["bench", "--r", "-1"], "must be >= 0"),
    (["bench", "--mode", "fast"], "invalid choice: 'fast'"),
    (["bench", "--model", "dinov2-s", "--image-size", "224"], "--image-size applies to timm models only"),
    (["eval", "--train", "0"], "must be a positive integer"),
    (["compress"], "invalid choice: 'compress'"),
    ([], "required: COMMAND"),
])
def test_bad_arguments_exit_2_with_a_message(args, message, capsys):
    code, _, err = run_cli(args, capsys)
    assert code == 2
    assert message in err


def test_unknown_image_is_a_usage_error(tmp_path, capsys):
    code, _, err = run_cli(["visualize", "--image", "no-such-photo", "--out", str(tmp_path)], capsys)
    assert code == 2
    assert "is not a file, 'fashion-mnist:<i>' or one of" in err


def test_console_script_is_installed():
    exe = os.path.join(os.path.dirname(sys.executable), "turbo-fx")
    result = subprocess.run([exe, "eval", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--suite" in result.stdout


def test_eval_fashion_mnist_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, _ = run_cli(["eval", "--suite", "demo", "--r", "2", "--train", "20", "--test", "8", "--batch", "4",
                               "--resolution", "56", "--out", str(out), "--cache", str(tmp_path / "cache"),
                               "--no-progress"], capsys)
    assert code == 0
    payload = output.load_json(str(out / "eval_fashion_mnist_demo.json.gz"))
    assert [r["label"] for r in payload["rows"]] == ["baseline (no merging)", "redundancy-only r=2", "turbo r=2"]
    # 56 px / 14 = 4x4 patches + CLS; r=2 in each of 12 blocks until the bipartite limit.
    assert payload["rows"][2]["tokens_per_block"][:3] == [17, 15, 13]
    assert payload["task"]["test_samples"] == 8
    text = open(out / "eval_fashion_mnist_demo.md").read()
    assert "| turbo r=2" in text
    # The demo's eager timings on shared cores say nothing about speed: no time column, a pointer instead.
    assert "speed-up" not in text and "ms/sample" not in text and "`make bench`" in text
    for name in ("eval_fashion_mnist_demo_tradeoff_probe_top1.png", "eval_fashion_mnist_demo_tradeoff_knn_top1.png"):
        assert (out / name).read_bytes()[:8] == PNG
    # The second run reads the unmerged train features from the cache.
    code, stdout, _ = run_cli(["eval", "--suite", "demo", "--r", "2", "--train", "20", "--test", "8", "--batch", "4",
                               "--resolution", "56", "--out", str(out), "--cache", str(tmp_path / "cache"),
                               "--no-progress"], capsys)
    assert code == 0 and "train features from cache" in stdout


def test_eval_text_end_to_end(tmp_path, capsys):
    code, _, _ = run_cli(["eval", "--task", "text", "--suite", "demo", "--r", "4", "--texts", "5",
                          "--out", str(tmp_path), "--no-progress"], capsys)
    assert code == 0
    payload = output.load_json(str(tmp_path / "eval_text_demo.json.gz"))
    assert payload["task"]["lee_documents"] == 5 and payload["task"]["polarity_sentences"] == 10
    base, red, tur = payload["rows"]
    assert base["metrics"]["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert 0 < tur["flop_reduction"] < 0.7
    assert -1 <= tur["metrics"]["lee_spearman"] <= 1


def test_analyze_and_visualize_real_dinov2(tmp_path, capsys):
    code, stdout, _ = run_cli(["analyze", "--model", "dinov2-s", "--batch", "2", "--out", str(tmp_path)], capsys)
    assert code == 0
    report = json.load(open(tmp_path / "redundancy.json"))["reports"]["dinov2-s"]
    assert len(report["blocks"]) == 12
    assert all(-1 <= b["redundancy"] <= 1 and 0 < b["concentration"] <= 1 for b in report["blocks"])
    assert (tmp_path / "redundancy.png").read_bytes()[:8] == PNG
    code, _, _ = run_cli(["visualize", "--model", "dinov2-s", "--image", "chelsea", "fashion-mnist:0", "--r", "16",
                          "--blocks", "0", "11", "--out", str(tmp_path)], capsys)
    assert code == 0
    pngs = sorted(p.name for p in tmp_path.glob("merges_*.png"))
    assert pngs == ["merges_dinov2-s_chelsea_r16.png", "merges_dinov2-s_fashion-mnist_0_r16.png"]


def test_bench_small_model(tmp_path, capsys):
    # timm's own 6-block test ViT (160 px: 100 patches + CLS): the same CLI path as ViT-Tiny
    # at a fraction of the three Inductor compiles.
    code, stdout, _ = run_cli(["bench", "--model", "timm:test_vit", "--r", "0", "12", "--batch", "1",
                               "--rounds", "1", "--warmup", "0", "--out", str(tmp_path)], capsys)
    assert code == 0
    payload = json.load(open(tmp_path / "bench_timm_test_vit.json"))
    configs = payload["results"][0]["configs"]
    assert set(configs) == {"eager", "inductor", "turbo r=0", "turbo r=12"}
    assert configs["turbo r=0"]["flops"] == configs["inductor"]["flops"]
    assert configs["turbo r=12"]["tokens_per_block"][:2] == [101, 89]
    assert configs["turbo r=12"]["flops"] < 0.8 * configs["inductor"]["flops"]
    assert (tmp_path / "bench_timm_test_vit.png").read_bytes()[:8] == PNG
    assert (payload["settings"]["device"], payload["settings"]["dtype"]) == ("cpu", "fp32")
    turbo = configs["turbo r=12"]
    assert turbo["samples_per_s"] == 1 / turbo["latency"]["median"]  # batch 1
    assert turbo["flop_ratio"] == turbo["flops"] / configs["inductor"]["flops"]
    # One round: the interval collapses onto the ratio of the two timings.
    low, high = turbo["speedup_interval"]
    assert low == turbo["speedup"] == high == configs["inductor"]["latency_s"][0] / turbo["latency_s"][0]
    text = (tmp_path / "bench_timm_test_vit.md").read_text()
    assert "batch 1, cpu fp32" in text and "FLOP-ideal speed-up" in text and "samples/s" in text


def test_bench_inputs_move_to_the_device_and_floats_take_the_dtype():
    import torch

    from turbo_fx.bench.timing import on_device

    ids, pixels = torch.arange(4).reshape(1, 4), torch.randn(1, 3, 2, 2)
    moved = on_device((ids, pixels), "cpu", torch.bfloat16)
    assert moved[0].dtype == torch.int64 and torch.equal(moved[0], ids)
    assert moved[1].dtype == torch.bfloat16 and torch.equal(moved[1], pixels.to(torch.bfloat16))


def test_bench_on_cuda_without_a_gpu_is_a_usage_error(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code, _, err = run_cli(["bench", "--device", "cuda", "--out", str(tmp_path)], capsys)
    assert code == 2 and "no CUDA device" in err
