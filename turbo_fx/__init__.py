"""turbo-fx: informativity-driven token merging for transformers, as a torch.compile backend.

    fast = torch.compile(model, backend="turbo", options={"r": 13})

See ``TurboConfig`` for the options and ``explain`` for a report of what changes.
"""
from turbo_fx.config import LinearSchedule, TurboConfig, TurboConfigError
from turbo_fx.report import GraphReport, TurboReport, counters, recording
from turbo_fx.backend import turbo_backend
from turbo_fx.explain import explain
from turbo_fx.ops import MergeRecord, record_merges
from turbo_fx.analysis import NoAttentionError, RedundancyReport, analyze_redundancy, plot_redundancy
from turbo_fx.visualize import NoMergesError, visualize_merges

__all__ = [
    "LinearSchedule",
    "TurboConfig",
    "TurboConfigError",
    "GraphReport",
    "TurboReport",
    "counters",
    "recording",
    "turbo_backend",
    "explain",
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
