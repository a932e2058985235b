"""The merge-path study's table (bench/merge_paths.py). Its measurements compile five
configurations with fresh Inductor caches (minutes); the counts it reports are held by
tests/ops/test_aten_overhead.py, which shares its counter."""
from __future__ import annotations

import pytest
import torch

from turbo_fx.bench import cli, merge_paths, timing


def test_table_has_one_row_per_path_with_its_figures():
    rows = [{"path": name, "compile_s": 10.0 + i, "median_ms": 100.0 + i, "q1_ms": 90.0, "q3_ms": 110.0,
             "aten_calls": 62 + i, "max_abs_diff_to_default": 1e-7, "fallbacks": [],
             "speedup": {"speedup": 1.5, "low": 1.25, "high": 1.75}}
            for i, name in enumerate(["Inductor, no merging", *merge_paths.MERGE_PATHS])]
    text = merge_paths.render({"model": "m", "r": 13, "batch": 8, "machine": timing.machine(), "rows": rows})
    lines = [" ".join(line.split()) for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(lines) == 7  # header + Inductor + five merge paths
    assert lines[2] == "| opaque op | 11.0 | 101 (90-110) | 1.50 [1.25, 1.75] | 63 | 1.0e-07 |"
    assert [line.split(" | ")[0][2:] for line in lines[1:]] == ["Inductor, no merging", "opaque op",
                                                                 "compile_merge_step=True", "fuse_merges=True",
                                                                 "compile_blocks=True", "compiled merge pieces"]


@pytest.mark.parametrize("argv", [["--r", "many"], ["--paths", "no-such-path"]])
def test_bad_arguments_exit(argv):
    with pytest.raises(SystemExit):
        cli.main(["merge-paths", *argv])


def test_cuda_without_a_gpu_is_refused_clearly(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit):
        cli.main(["merge-paths", "--device", "cuda"])
    assert "no CUDA device is available" in capsys.readouterr().err
