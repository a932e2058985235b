"""The model zoo's modules import one way: registry on top, deps at the bottom, no circle."""
from __future__ import annotations

import ast
from pathlib import Path

ZOO = Path(__file__).resolve().parents[2] / "model_zoo"

# Lower number = lower layer. A module may import only from strictly lower layers.
LAYERS = {
    "deps": 0,
    "training": 0,
    "data": 1,
    "dinov2": 1,
    "minilm": 1,
    "fashion_diffusion": 2,
    "fashion_captioner": 2,
    "fashion_rope_vit": 2,
    "fashion_joint_dit": 3,  # builds on fashion_diffusion's training and sampling
    "fashion_llava": 3,  # builds on fashion_captioner's features, vocabulary and scoring
    "registry": 3,
    "__init__": 4,
}


def zoo_imports(module: str) -> set[str]:
    """Zoo modules that ``module`` imports anywhere in its file (inside functions too)."""
    tree = ast.parse((ZOO / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("turbo_fx.model_zoo."):
                found.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("turbo_fx.model_zoo."):
                    found.add(alias.name.split(".")[2])
    return found


def test_every_zoo_module_has_a_layer():
    modules = {path.stem for path in ZOO.glob("*.py")}
    assert modules == set(LAYERS), "place new model_zoo modules in LAYERS of this test"


def test_zoo_modules_import_only_from_lower_layers():
    upward = [
        f"{module} (layer {LAYERS[module]}) imports {target} (layer {LAYERS[target]})"
        for module in LAYERS
        for target in sorted(zoo_imports(module))
        if target in LAYERS and LAYERS[target] >= LAYERS[module]
    ]
    assert not upward, upward


def test_public_names_stay_importable_from_registry_and_package():
    from turbo_fx.model_zoo import MissingDependency, build_model, list_models
    from turbo_fx.model_zoo import registry
    from turbo_fx.model_zoo.deps import MissingDependency as bottom

    assert MissingDependency is registry.MissingDependency is bottom
    assert build_model is registry.build_model and list_models is registry.list_models
