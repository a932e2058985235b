"""bench/diffusion_speed.py on the tiny (--small) models: the harness end to end (Dynamo's eager
backend instead of Inductor), tomesd's patch and its compile shim, and the JSON / Markdown writer.
No timing assertions."""
from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("diffusers")
tomesd = pytest.importorskip("tomesd")

from turbo_fx.bench import cli, output, timing  # noqa: E402
from turbo_fx.bench import diffusion_speed as ds  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small_unet():
    return ds.build_unet(small=True, seed=0)


def max_rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# --------------------------------------------------------------------------- tomesd
def test_tomesd_ratio_zero_is_the_unmerged_model_and_half_changes_it(small_unet):
    reference = ds.forward(small_unet.model, small_unet.inputs)
    plain = timing.fresh_copy(small_unet.model)
    tomesd.apply_patch(plain, ratio=0.0)  # tomesd itself, no shim
    assert type(plain.down_blocks[0].attentions[0].transformer_blocks[0]).__name__ == "ToMeBlock"
    assert max_rel(ds.forward(plain, small_unet.inputs), reference) < 1e-5
    with ds.tomesd_compile_shim():
        zero = ds.apply_tomesd(timing.fresh_copy(small_unet.model), 0.0)
        assert max_rel(ds.forward(zero, small_unet.inputs), reference) < 1e-5
        half = ds.apply_tomesd(timing.fresh_copy(small_unet.model), 0.5)
        assert max_rel(ds.forward(half, small_unet.inputs), reference) > 1e-3
    # The copies share weights with the base model, which tomesd left unpatched.
    assert type(small_unet.model.down_blocks[0].attentions[0].transformer_blocks[0]).__name__ == "BasicTransformerBlock"
    assert half.conv_in.weight is small_unet.model.conv_in.weight


def test_tomesd_compiles_to_one_graph_with_the_shim(small_unet):
    import tomesd.merge

    original = tomesd.merge.torch
    with ds.tomesd_compile_shim():
        config = ds.Config("tomesd r=0.5", "tomesd", 0.5)
        fn, counter = ds.make_model(config, small_unet.model, "eager", {})
        breaks = ds._graph_breaks()
        torch.manual_seed(0)
        compiled = ds.forward(fn, small_unet.inputs)
        ds.forward(fn, small_unet.inputs)
        assert counter.graphs == 1 and ds._graph_breaks() == breaks
        eager = ds.apply_tomesd(timing.fresh_copy(small_unet.model), 0.5)
        torch.manual_seed(0)
        assert max_rel(compiled, ds.forward(eager, small_unet.inputs)) < 1e-5  # same offsets, same output
    assert tomesd.merge.torch is original


def test_tomesd_is_not_run_on_dit():
    dit = ds.build_dit(small=True)
    configs, notes = ds.configurations(["eager", "inductor", "tomesd", "turbo"], [0.5], dit)
    assert [c.name for c in configs] == ["eager", "inductor", "turbo r=0.5"]
    assert any("tomesd does not apply to DiT" in n for n in notes)


def test_tomesd_finds_no_block_to_patch_in_sd3():
    sd3 = ds.build_sd3(small=True)
    patched = tomesd.apply_patch(timing.fresh_copy(sd3.model), ratio=0.5)
    assert not any(type(m).__name__ == "ToMeBlock" for m in patched.modules())
    configs, notes = ds.configurations(["eager", "inductor", "tomesd", "turbo"], [0.5], sd3)
    assert [c.name for c in configs] == ["eager", "inductor", "turbo r=0.5"]
    assert any("tomesd does not apply to SD3" in n for n in notes)


def test_sd3_case_inputs_and_denoising_step():
    sd3 = ds.build_sd3(small=True)
    latents, text, pooled, timesteps = sd3.inputs
    assert latents.shape == (2, 4, 16, 16) and text.shape == (2, 7, 32) and pooled.shape == (2, 16)
    assert timesteps.dtype == torch.float32 and sd3.cond is text
    step = sd3.step_inputs(latents, torch.tensor(750.0))
    assert step[1] is text and step[2] is pooled and step[3].tolist() == [750.0, 750.0]
    out = ds.forward(sd3.model, sd3.inputs)
    assert sd3.noise_prediction(out).shape == latents.shape
    predictions, final = ds.ddim_loop(sd3.model, sd3, torch.randn(sd3.latent_shape), 2, 4.0)
    assert len(predictions) == 2 and final.shape == sd3.latent_shape and torch.isfinite(final).all()


def test_sd3_full_size_config_is_sd3_medium_but_for_depth():
    assert ds.SD3_MEDIUM["num_attention_heads"] * ds.SD3_MEDIUM["attention_head_dim"] == 1536
    assert ds.SD3_MEDIUM["num_layers"] == 24 and ds.SD3_TEXT_TOKENS == 333
    assert (ds.SD3_LATENT // ds.SD3_MEDIUM["patch_size"]) ** 2 == 1024


# --------------------------------------------------------------------------- the harness
@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("diffusion")
    assert cli.main(["diffusion-speed", "--small", "--compiler", "eager", "--model", "unet", "dit", "sd3", "--ratio", "0.5",
                     "--configs", "eager", "inductor", "tomesd", "turbo", "turbo-all",
                     "--rounds", "1", "--ddim-steps", "2", "--out", str(out), "--name", "t"]) == 0
    torch._dynamo.reset()
    payload = output.load_json(str(out / "t.json"))
    return payload, out


def test_harness_runs_end_to_end(small_run):
    payload, out = small_run
    assert [run["model"] for run in payload["runs"]] == ["unet-small", "dit-small", "sd3-small"]
    unet, dit, sd3 = payload["runs"]
    assert list(unet["configs"]) == ["eager", "inductor", "tomesd r=0.5", "turbo r=0.5", "turbo-all r=0.5"]
    assert list(dit["configs"]) == list(sd3["configs"]) == ["eager", "inductor", "turbo r=0.5", "turbo-all r=0.5"]
    for run in payload["runs"]:
        for name, e in run["configs"].items():
            assert e["latency"]["n"] == 1 and e["latency"]["median"] > 0
            # One round: the interval collapses onto the speed-up itself.
            assert e["speedup_interval"] == pytest.approx([e["speedup_vs_inductor"]] * 2)
            assert len(e["ddim"]["per_step"]) == 2
            assert 0 <= e["output"]["rel_l2"] and -1 <= e["output"]["cosine"] <= 1
            if e["kind"] in ("eager", "tomesd-eager"):
                assert e["compile_s"] is None and "dynamo_graphs" not in e
            else:
                assert e["dynamo_graphs"] >= 1
        # Dynamo's eager backend runs the same ops as the eager model: exactly the reference.
        ind = run["configs"]["inductor"]
        assert ind["output"] == {"rel_l2": 0.0, "cosine": 1.0}
        assert ind["ddim"]["final_latent"] == {"rel_l2": 0.0, "cosine": 1.0}
        assert ind["dynamo_graphs"] == 1 and ind["graph_breaks"] == 0
        assert ind["flops"] == run["baseline_flops"] > 0
    tm = unet["configs"]["tomesd r=0.5"]
    assert tm["dynamo_graphs"] == 1 and tm["graph_breaks"] == 0
    assert tm["output"]["rel_l2"] > 1e-3 and 0 < tm["flops"] < unet["baseline_flops"]
    turbo = unet["configs"]["turbo r=0.5"]
    assert turbo["flops"] is not None or turbo["flops_note"].startswith(("unavailable", "explain failed"))
    assert unet["settings"]["tomesd_shim"] is True and dit["settings"]["tomesd_shim"] is None
    assert any("tomesd does not apply to DiT" in n for n in dit["notes"])
    # SD3's joint attention merges its image tokens: fewer FLOPs, the same output shape.
    merged = sd3["configs"]["turbo r=0.5"]
    assert any(g["rewritten"] and g["merges"] for g in merged["turbo_report"]), merged["turbo_report"]
    assert 0 < merged["flops"] < sd3["baseline_flops"] and merged["flop_ideal_speedup"] == 1 / merged["flop_ratio"]
    assert sd3["scheduler"] == "FlowMatchEulerDiscreteScheduler" and 0 < merged["output"]["rel_l2"] < 1
    assert any("tomesd does not apply to SD3" in n for n in sd3["notes"])
    # Merging the feed-forward too leaves fewer FLOPs than the default (self-attention only).
    assert 0 < sd3["configs"]["turbo-all r=0.5"]["flops"] < merged["flops"]
    machine = payload["machine"]
    assert machine["cpu"] and machine["logical_cpus"] >= 1 and machine["diffusers"] and machine["tomesd"] == "0.1.3"


def test_written_files(small_run):
    payload, out = small_run
    with open(out / "t.json") as f:
        stored = json.load(f)
    assert stored["runs"][0]["configs"].keys() == payload["runs"][0]["configs"].keys()
    text = (out / "t.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| config") and "compile s" in line)
    assert [h.strip() for h in header.strip("|").split("|")] == ds.TABLE_HEADERS
    for name in ["eager", "inductor", "tomesd r=0.5", "turbo r=0.5", "## unet-small", "## dit-small",
                 "## sd3-small", "FlowMatchEulerDiscreteScheduler 2 steps", "step 1", "step 2", "RANDOM weights"]:
        assert name in text


def fake_entry(kind, ratio=None, flops=100, compile_s=None, graphs=None):
    e = {"kind": kind, "ratio": ratio, "flops": flops, "flops_note": None if flops else "unavailable: fell back",
         "latency": {"median": 0.5, "iqr": 0.01, "n": 3}, "speedup_vs_inductor": 1.25, "compile_s": compile_s,
         "flop_ratio": flops / 100 if flops else None, "output": {"rel_l2": 0.0125, "cosine": 0.99875},
         "ddim": {"per_step": [{"rel_l2": 0.5, "cosine": 0.75}], "final_latent": {"rel_l2": 0.25, "cosine": 0.5}}}
    if graphs is not None:
        e.update(dynamo_graphs=graphs, graph_breaks=0)
    return e


def test_markdown_columns_and_missing_values():
    run = {"model": "m", "description": "a model", "notes": ["a note"], "baseline_flops": 100,
           "settings": {"compiler": "inductor", "rounds": 3, "torch_threads": 2, "ddim_steps": 1, "guidance": 7.5,
                        "turbo_options": {}},
           "configs": {"eager": fake_entry("eager"), "turbo r=0.5": fake_entry("turbo", 0.5, None, 12.25, 1)}}
    machine = {"cpu": "cpu x", "usable_cpus": 2, "torch_threads": 2, "load_average_at_start": None, "torch": "t",
               "timm": None, "date_utc": "d", "command": "c", "diffusers": "0.42.1", "tomesd": "0.1.3"}
    rows = ds.table_rows(run)
    assert len(rows) == 2 and all(len(r) == len(ds.TABLE_HEADERS) for r in rows)
    eager, turbo = (dict(zip(ds.TABLE_HEADERS, r)) for r in rows)
    assert eager["compile s"] == "-" and eager["Dynamo graphs"] == "-" and eager["GFLOPs"] == "1e-07"
    assert turbo["compile s"] == "12.2" and turbo["GFLOPs"] == "unavailable" and turbo["FLOP ratio"] == "-"
    assert turbo["FLOP-ideal speed-up"] == "-" and turbo["95% interval"] == "-" and eager["FLOP-ideal speed-up"] == "1.00x"
    run["configs"]["turbo r=0.5"]["speedup_interval"] = [1.125, 1.375]
    assert dict(zip(ds.TABLE_HEADERS, ds.table_rows(run)[1]))["95% interval"] == "[1.12, 1.38]"
    assert turbo["median ms"] == "500.0" and turbo["speed-up vs Inductor"] == "1.25x"
    assert turbo["output rel L2"] == "1.25e-02" and turbo["DDIM final cosine"] == "0.500000"
    assert ds.ddim_rows(run) == [["turbo r=0.5", "5.00e-01 / 0.7500"]]
    text = ds.markdown({"machine": machine, "runs": [run]})
    assert "## m" in text and "- a note" in text and "tomesd 0.1.3" in text and "| step 1" in text


def test_fresh_copy_shares_weights_not_modules(small_unet):
    copy = timing.fresh_copy(small_unet.model)
    assert copy is not small_unet.model and copy.conv_in is not small_unet.model.conv_in
    assert all(a is b for a, b in zip(copy.parameters(), small_unet.model.parameters()))
    assert math.isclose(max_rel(ds.forward(copy, small_unet.inputs), ds.forward(small_unet.model, small_unet.inputs)), 0.0)
