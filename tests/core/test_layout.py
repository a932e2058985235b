"""The backend stands apart from the measurement tools: ``import turbo_fx`` (which every
``backend="turbo"`` compile does) loads none of ``turbo_fx.bench`` or its plotting and
statistics dependencies, while the public names of the tools still resolve."""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import turbo_fx

ROOT = pathlib.Path(__file__).resolve().parents[2]
HEAVY = ("turbo_fx.bench", "matplotlib", "sklearn", "scipy", "skimage", "onnx", "gensim")


def test_import_turbo_fx_loads_no_measurement_tools():
    probe = (
        "import sys, torch\n"
        "import turbo_fx\n"
        "torch.compile(torch.nn.Linear(2, 2), backend='turbo')\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == ""


def test_lazy_names_resolve_to_the_bench_package():
    from turbo_fx.bench import analysis, visualize

    assert turbo_fx.analyze_redundancy is analysis.analyze_redundancy
    assert turbo_fx.plot_redundancy is analysis.plot_redundancy
    assert turbo_fx.visualize_merges is visualize.visualize_merges
    assert "analyze_redundancy" in dir(turbo_fx)
    try:
        turbo_fx.no_such_name
    except AttributeError as err:
        assert "no_such_name" in str(err)
    else:
        raise AssertionError("an unknown attribute must raise AttributeError")


def _imported_modules(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_core_and_passes_never_import_the_bench_package():
    offenders = {}
    for folder in ("turbo_fx", "passes"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            bad = {m for m in _imported_modules(path) if m == "turbo_fx.bench" or m.startswith("turbo_fx.bench.")}
            if bad:
                offenders[str(path.relative_to(ROOT))] = bad
    assert offenders == {}


def test_each_runtime_concern_has_its_module():
    from turbo_fx import ops
    from turbo_fx.ops import attention_bias, merge, merge_step, reductions, restore, semantic

    assert ops.merge_tokens is merge.merge_tokens
    assert ops.restore_tokens is restore.restore_tokens
    assert ops.weighted_token_mean is reductions.weighted_token_mean
    assert ops.key_bias is attention_bias.key_bias
    assert ops.cls_attention is semantic.cls_attention
    assert ops.record_merges is merge_step.record_merges
    assert ops.merge_block is merge_step.merge_block
