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


# The package's layers, bottom first: a module imports only from its own layer or below, so
# that the shared types never depend on a pass and no pass depends on the backend.
LAYERS = (
    ("shared types and runtime ops", ("turbo_fx.config", "turbo_fx.errors", "turbo_fx.report", "turbo_fx.ops",
                                      "turbo_fx.ops.*", "turbo_fx.flops", "turbo_fx.reference",
                                      "turbo_fx.torch_compat")),
    ("graph passes", ("turbo_fx.passes", "turbo_fx.passes.*")),
    ("plan, rewrite and compile", ("turbo_fx.plan", "turbo_fx.rewrite", "turbo_fx.block_compile",
                                   "turbo_fx.shared_pieces", "turbo_fx.cuda_graphs", "turbo_fx.guarded_call")),
    ("public API", ("turbo_fx", "turbo_fx.backend", "turbo_fx.explain", "turbo_fx.calibrate")),
    ("tools", ("turbo_fx.model_zoo", "turbo_fx.model_zoo.*", "turbo_fx.bench", "turbo_fx.bench.*")),
)
FOLDERS = {"turbo_fx": "turbo_fx", "passes": "turbo_fx.passes", "model_zoo": "turbo_fx.model_zoo",
           "bench": "turbo_fx.bench"}


def _package_modules() -> dict[str, pathlib.Path]:
    modules = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def _import_edges(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports, at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    edges = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        edges.update(t for t in targets if t in known and t != name)
    return edges


def _layer(name: str) -> int:
    for level, (_, patterns) in enumerate(LAYERS):
        if any(name == p or (p.endswith(".*") and name.startswith(p[:-1])) for p in patterns):
            return level
    raise AssertionError(f"module {name} is in no layer of LAYERS; add it where it belongs")


def _graph() -> dict[str, set[str]]:
    modules = _package_modules()
    return {name: _import_edges(name, path, set(modules)) for name, path in modules.items()}


def test_every_import_goes_down_the_layers():
    graph = _graph()
    upward = sorted(f"{a} ({LAYERS[_layer(a)][0]}) imports {b} ({LAYERS[_layer(b)][0]})"
                    for a, targets in graph.items() for b in targets if _layer(b) > _layer(a))
    assert upward == []


def test_the_package_has_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_the_layer_check_sees_an_upward_import(tmp_path):
    """The checker itself: a pass that imported the backend would be found."""
    path = tmp_path / "bad_pass.py"
    path.write_text("from turbo_fx.backend import turbo_backend\nfrom . import graph_utils\n")
    known = {"turbo_fx.backend", "turbo_fx.passes.graph_utils", "turbo_fx.passes.bad_pass"}
    edges = _import_edges("turbo_fx.passes.bad_pass", path, known)
    assert edges == {"turbo_fx.backend", "turbo_fx.passes.graph_utils"}
    assert _layer("turbo_fx.backend") > _layer("turbo_fx.passes.bad_pass")
