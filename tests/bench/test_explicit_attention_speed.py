"""The explicit-attention benchmark (bench/explicit_attention_speed.py) on tiny towers, eager compiler."""
from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from turbo_fx.bench import explicit_attention_speed as eas  # noqa: E402


def quiet(_: str) -> None:
    pass


@pytest.mark.parametrize("kind", eas.MODELS)
def test_rows_emit_sdpa_only_by_default(kind, one_torch_thread):
    run = eas.run(kind, [4], batch=2, rounds=2, compiler="eager", small=True, log=quiet)
    configs = run["configs"]
    assert list(configs) == ["inductor", "turbo r=4", "turbo r=4 explicit"]
    sdpa, explicit = configs["turbo r=4"], configs["turbo r=4 explicit"]
    # 3 explicit sites: all emitted as SDPA by default, none with explicit_as_sdpa=False; with
    # the eager compiler the emitted calls run the fused kernel once per site, the explicit ones never.
    assert sdpa["sdpa_sites"] == [0, 1, 2] and explicit["sdpa_sites"] == []
    assert sdpa["fused_attention_calls"] == 3 and explicit["fused_attention_calls"] == 0
    assert sdpa["tokens_per_block"] == explicit["tokens_per_block"] == [65, 61, 57]
    assert all(len(c["latency_s"]) == 2 for c in configs.values())
    assert "vs_explicit" in sdpa and "vs_explicit" not in explicit
    assert sdpa["output_shape"] == [2, 65, 48]  # restored to the input's token count


def test_main_writes_both_files(tmp_path):
    payload = eas.main(["--small", "--compiler", "eager", "--model", "vit", "--r", "2", "--rounds", "1",
                        "--threads", "1", "--out", str(tmp_path)], log=quiet)
    assert (tmp_path / "explicit_attention_small.json").exists()
    text = (tmp_path / "explicit_attention_small.md").read_text()
    assert "turbo r=2 explicit" in text and payload["runs"][0]["model"] == "vit"


def test_bad_arguments_exit():
    with pytest.raises(SystemExit):
        eas.main(["--rounds", "0", "--small"], log=quiet)
