"""turbo-fx: informativity-driven token merging for transformers, as a torch.compile backend.

    fast = torch.compile(model, backend="turbo", options={"r": 13})

See ``TurboConfig`` for the options (``GenerationOptions`` and ``CompileStrategy`` for the
generation mode and the compile strategy) and ``explain`` for a report of what changes.
"""
from turbo_fx.config import CompileStrategy, GenerationOptions, LinearSchedule, TurboConfig, TurboConfigError
from turbo_fx.report import GraphReport, TurboReport, counters, recording
from turbo_fx.backend import turbo_backend
from turbo_fx.calibrate import Calibration, calibrate
from turbo_fx.explain import TradeOff, explain, trade_off
from turbo_fx.ops import MergeRecord, record_merges

# The measurement tools live in turbo_fx.bench; these names are re-exported lazily, so that
# `import turbo_fx` (which every `backend="turbo"` compile does) imports none of their
# dependencies (matplotlib, scikit-learn).
_LAZY = {
    "analyze_redundancy": "turbo_fx.bench.analysis",
    "plot_redundancy": "turbo_fx.bench.analysis",
    "RedundancyReport": "turbo_fx.bench.analysis",
    "NoAttentionError": "turbo_fx.bench.analysis",
    "visualize_merges": "turbo_fx.bench.visualize",
    "NoMergesError": "turbo_fx.bench.visualize",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'turbo_fx' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "CompileStrategy",
    "GenerationOptions",
    "LinearSchedule",
    "TurboConfig",
    "TurboConfigError",
    "GraphReport",
    "TurboReport",
    "counters",
    "recording",
    "turbo_backend",
    "explain",
    "calibrate",
    "Calibration",
    "trade_off",
    "TradeOff",
    "MergeRecord",
    "record_merges",
    "analyze_redundancy",
    "plot_redundancy",
    "RedundancyReport",
    "NoAttentionError",
    "visualize_merges",
    "NoMergesError",
]
__version__ = "0.1.0"
