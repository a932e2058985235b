"""bench/vlm_speed.py on tiny CLIP and BLIP configurations: the harness end to end with Dynamo's
eager backend (turbo's inner_backend eager), the report checks, the FLOP ratios, the writer.
No timing assertions: speed targets never live in tests."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from turbo_fx.bench import cli, output, timing  # noqa: E402
from turbo_fx.bench import vlm_speed as vs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def quiet(_message: str) -> None:
    pass


@pytest.fixture(scope="module")
def clip_run():
    case = vs.build_clip(small=True, batch=2, caption_tokens=6)
    return vs.run_clip(case, [0, 8], rounds=2, warmup=0, compiler="eager", log=quiet)


@pytest.fixture(scope="module")
def blip_run():
    case = vs.build_blip(small=True)
    return vs.run_blip(case, [2], [0, 8], new_tokens=3, rounds=2, warmup=0, compiler="eager", log=quiet)


def test_clip_rows_flop_ratios_and_site_checks(clip_run):
    configs = clip_run["configs"]
    assert list(configs) == ["eager", "inductor", "turbo r=0", "turbo r=8"]
    assert configs["turbo r=0"]["flop_ratio"] == 1.0
    assert configs["eager"]["flop_ratio"] == configs["inductor"]["flop_ratio"] == 1.0
    assert 0 < configs["turbo r=8"]["flop_ratio"] < 1
    for name in ("turbo r=0", "turbo r=8"):
        checks = configs[name]["checks"]
        assert checks["merging_ok"] and checks["untouched_ok"], checks["problems"]
        assert checks["merging_sites"] == 2 and checks["untouched_sites"] == 2
    # One graph holds both towers; at r=8 it is rewritten and the image tokens shrink per block.
    compiled = configs["turbo r=8"]["compiled_report"]
    assert len(compiled) == 1 and compiled[0]["rewritten"] and compiled[0]["tokens_per_block"] == [65, 57]
    assert not configs["turbo r=0"]["compiled_report"][0]["rewritten"]
    # r=0 and the plain compiled model give the eager logits; merging moves them.
    assert configs["turbo r=0"]["output"]["rel_l2"] < 1e-6
    assert configs["inductor"]["output"]["rel_l2"] < 1e-6
    assert configs["turbo r=8"]["output"]["rel_l2"] > 0
    for e in configs.values():
        assert len(e["latency_s"]) == 2 and e["latency"]["median"] > 0
        assert e["vs_inductor"]["low"] <= e["vs_inductor"]["speedup"] <= e["vs_inductor"]["high"]
    assert configs["eager"]["compile_s"] is None and configs["inductor"]["compile_s"] is not None


def test_blip_rows_flop_ratios_reports_and_decoder_graphs(blip_run):
    assert [b["batch"] for b in blip_run["batches"]] == [2]
    fl = blip_run["flops"]
    assert fl["caption"] == fl["vision"] + fl["decoder_per_caption"] and fl["decoder_per_caption"] > 0
    for entry in blip_run["batches"]:
        configs = entry["configs"]
        assert list(configs) == ["eager", "eager vision + compiled decoder", "inductor", "turbo r=0", "turbo r=8"]
        assert entry["caption_shape"] == [entry["batch"], 1 + 3]
        assert configs["turbo r=0"]["vision_flop_ratio"] == 1.0 and configs["turbo r=0"]["caption_flop_ratio"] == 1.0
        merged = configs["turbo r=8"]
        assert 0 < merged["vision_flop_ratio"] < 1
        assert merged["vision_flop_ratio"] < merged["caption_flop_ratio"] < 1  # the decoder's share is unchanged
        assert merged["checks"]["merging_ok"] and merged["checks"]["merging_sites"] == 2
        assert merged["merged"] and configs["turbo r=0"]["merged"]
        assert merged["compiled_report"][0]["tokens_per_block"] == [65, 57]
        assert merged["compiled_report"][0]["outputs_restored"] >= 1
        # The unmerged rows caption exactly as eager does.
        for name in ("eager vision + compiled decoder", "inductor", "turbo r=0"):
            assert configs[name]["agreement"]["tokens_equal"] == 1.0
        # Every compiled vision tower compiles one graph per batch size; the shared decoder three,
        # all during the first row's first calls and none in the timed rounds.
        assert all(configs[n]["vision_graphs"] == 1 for n in ("inductor", "turbo r=0", "turbo r=8"))
        assert configs["eager vision + compiled decoder"]["decoder_graphs_compiled"] == 3
        assert configs["inductor"]["decoder_graphs_compiled"] == 0
        assert entry["decoder_graphs_during_timing"] == 0
        # The towers timed alone: every row but the decoder-only one, with no new graph.
        assert "vision_latency" not in configs["eager vision + compiled decoder"]
        for name in ("eager", "inductor", "turbo r=0", "turbo r=8"):
            assert len(configs[name]["vision_latency_s"]) == 2
        assert all(configs[n]["vision_graphs_during_timing"] == 0 for n in ("inductor", "turbo r=0", "turbo r=8"))
        assert merged["ms_per_caption"] == pytest.approx(merged["latency"]["median"] * 1e3 / entry["batch"])


def test_compare_explicit_adds_an_explicit_row_per_r():
    case = vs.build_blip(small=True)
    run = vs.run_blip(case, [1], [8], new_tokens=2, rounds=1, warmup=0, compiler="eager", decoder="eager",
                      compare_explicit=True, log=quiet)
    configs = run["batches"][0]["configs"]
    assert list(configs) == ["eager", "inductor", "turbo r=8", "turbo r=8 explicit"]
    assert run["settings"]["compare_explicit"] is True
    sdpa, explicit = configs["turbo r=8"], configs["turbo r=8 explicit"]
    assert sdpa["merged"] and explicit["merged"]
    assert sdpa["compiled_report"][0]["tokens_per_block"] == explicit["compiled_report"][0]["tokens_per_block"]
    assert sdpa["compiled_report"][0]["sdpa_sites"] == [0, 1] and explicit["compiled_report"][0]["sdpa_sites"] == []


def test_the_writers_render_every_row(clip_run, blip_run, tmp_path):
    machine = timing.machine()
    clip_payload = {"machine": machine, "command": "c", "run": clip_run}
    blip_payload = {"machine": machine, "command": "c", "run": blip_run}
    json_path, md_path = output.write(clip_payload, str(tmp_path), "clip_speed_small", vs.clip_markdown, quiet=True)
    md = open(md_path).read()
    assert "RANDOM weights" in md and machine["cpu"] in md and "| turbo r=8" in md
    assert "every image-tower attention site merges" in md
    assert json.load(open(json_path))["run"]["configs"]["turbo r=8"]["flop_ratio"] < 1
    _, md_path = output.write(blip_payload, str(tmp_path), "blip_generate_small", vs.blip_markdown, quiet=True)
    md = open(md_path).read()
    assert "## batch 2" in md and "| eager vision + compiled decoder" in md
    assert "not as expected" not in md


def test_main_writes_both_files_and_an_eager_decoder_has_no_decoder_row(tmp_path):
    assert cli.main(["vlm-speed", "--small", "--compiler", "eager", "--r", "4", "--rounds", "1", "--warmup", "0",
                     "--blip-batch", "1", "--new-tokens", "2", "--decoder", "eager", "--clip-batch", "2",
                     "--caption-tokens", "4", "--out", str(tmp_path)]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    out = {part: output.load_json(str(tmp_path / f"{stem}_small.json"))
           for part, stem in (("clip", "clip_speed"), ("blip", "blip_generate"))}
    assert names == ["blip_generate_small.json", "blip_generate_small.md", "clip_speed_small.json",
                     "clip_speed_small.md"]
    entry = out["blip"]["run"]["batches"][0]
    assert list(entry["configs"]) == ["eager", "inductor", "turbo r=4"]
    assert entry["decoder_graphs_total"] is None
    assert list(out["clip"]["run"]["configs"]) == ["eager", "inductor", "turbo r=4"]


def test_bad_arguments_exit_with_code_2():
    for argv in (["--r", "-1"], ["--blip-batch", "0"], ["--part", "vit"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(["vlm-speed", *argv])
        assert exc.value.code == 2
