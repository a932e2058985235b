"""What every speed study shares: the machine, models on a device, compile caches, timing.

Compile seconds, the definition every study uses: the wall time of the first call of a freshly
wrapped ``torch.compile`` model (Dynamo tracing + the backend, including turbo's rewrite, +
Inductor's code generation and C++ compilation + one forward pass), with an empty Inductor
cache directory and the FX graph and AOT autograd caches off, minus that configuration's
median steady-state latency (the forward pass the first call also did).

Steady-state latency: ``interleaved`` runs every configuration once per round in a rotating
order, so that the drift of shared cores (tens of percent between minutes) falls on all of
them alike; ``stats`` summarises the rounds and ``stats.speedup_interval`` compares two.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import itertools
import math
import os
import platform
import statistics
import tempfile
import time
from typing import Callable, Iterator, Optional, Sequence

import torch

# Where fresh cache folders go: the cache dir the caller chose (make bench sets one under build/),
# read before Inductor sets its default (/tmp/torchinductor_$USER) into the environment.
_CACHE_ROOT = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "turbo-fx-bench")
PACKAGES = ("timm", "transformers", "diffusers", "tomesd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------- the machine
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _version(package: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def machine() -> dict:
    """Where and how the figures were taken (goes into every JSON)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    info = {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "usable_cpus": usable,
            "torch_threads": torch.get_num_threads(), "load_average_at_start": load,
            "python": platform.python_version(), "torch": torch.__version__,
            **{package: _version(package) for package in PACKAGES},
            "platform": platform.platform(),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def machine_line(info: Optional[dict] = None) -> str:
    info = info or machine()
    load = info.get("load_average_at_start")
    load_text = f", load average {load[0]:.2f}" if load else ""
    extra = "".join(f", {p} {info[p]}" for p in PACKAGES[1:] if info.get(p))
    gpu = f"; {info['gpu']}" if info.get("gpu") else ""
    return (f"{info['cpu']}, {info['usable_cpus']} usable cores, {info['torch_threads']} torch threads"
            f"{load_text}{gpu}; torch {info['torch']}, timm {info.get('timm')}{extra}, {info['date_utc']}")


def log(message: str) -> None:
    """A progress line with the wall-clock time, flushed at once."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------- models and devices
def device_error(device: str) -> Optional[str]:
    """Why ``device`` cannot run here (a usage error for the command line), or None."""
    if device == "cuda" and not torch.cuda.is_available():
        return "--device cuda: no CUDA device is available"
    return None


def on_device(inputs: tuple, device: str, dtype: torch.dtype) -> tuple:
    """The inputs on ``device``; floating ones in ``dtype`` (token ids and masks keep theirs)."""
    return tuple(t.to(device, dtype) if t.is_floating_point() else t.to(device) for t in inputs)


def load_model(name: str, batch: int, device: str = "cpu", dtype: str = "fp32", **build_kwargs):
    """The model_zoo model ``name`` (weights seeded where random) on ``device`` in ``dtype``, and
    its example inputs of ``batch`` rows there. ``build_kwargs`` go to ``build_model`` (for a
    timm name, to ``timm.create_model``: ``img_size=224``)."""
    from turbo_fx.model_zoo.registry import build_model

    torch.manual_seed(0)
    zoo = build_model(name, **build_kwargs)
    zoo.model.to(device, DTYPES[dtype])
    return zoo, on_device(zoo.example_inputs(batch), device, DTYPES[dtype])


def fresh_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deepcopy of ``model``'s modules that shares its parameter and buffer tensors."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def synchronised(fn: Callable, device: torch.device) -> Callable:
    """``fn`` that returns only once the device has finished its work (a GPU runs ahead of the
    host, so an unsynchronised call times the launches, not the forward)."""
    if device.type != "cuda":
        return fn

    def call(*args):
        out = fn(*args)
        torch.cuda.synchronize(device)
        return out

    return call


def count_flops(fn: Callable, *args, **kwargs) -> int:
    """FLOPs of one eager call (turbo_fx.flops adds the CPU SDPA formula torch lacks)."""
    from torch.utils.flop_counter import FlopCounterMode

    import turbo_fx.flops  # noqa: F401  (registers the formula)

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


def closeness(output: torch.Tensor, reference: torch.Tensor) -> dict:
    """Relative L2 error ``|y - y_ref| / |y_ref|`` and cosine similarity, in float64 over all
    elements. Identical tensors give exactly 0 and 1 (``sqrt(d * d) == d`` in IEEE arithmetic)."""
    y = output.detach().double().flatten()
    ref = reference.detach().double().flatten()
    ref_norm2, y_norm2 = torch.dot(ref, ref).item(), torch.dot(y, y).item()
    diff = y - ref
    rel_l2 = math.sqrt(torch.dot(diff, diff).item() / ref_norm2) if ref_norm2 > 0 else float("nan")
    denom = math.sqrt(y_norm2 * ref_norm2)
    cosine = torch.dot(y, ref).item() / denom if denom > 0 else float("nan")
    return {"rel_l2": rel_l2, "cosine": max(-1.0, min(1.0, cosine))}


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# --------------------------------------------------------------------------- compiling
class GraphCounter:
    """A backend that counts the graphs Dynamo hands it and delegates.

    A distinct callable per configuration, so that Dynamo never reuses a frame another
    configuration compiled (its BACKEND_MATCH guard compares backend callables, and copies made
    by ``fresh_copy`` share weight tensors, so every other guard would pass)."""

    def __init__(self, inner: Callable, **kwargs) -> None:
        self.inner, self.kwargs, self.graphs = inner, kwargs, 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self.inner(gm, example_inputs, **self.kwargs)


def counted_backend(turbo_options: Optional[dict] = None, compiler: str = "inductor") -> GraphCounter:
    """Turbo with ``turbo_options`` (None: no merging, the compiler alone) as a ``GraphCounter``.
    ``compiler="eager"``: Dynamo's eager backend instead of Inductor, inside turbo too."""
    lookup = torch._dynamo.lookup_backend
    if turbo_options is None:
        return GraphCounter(lookup("inductor" if compiler == "inductor" else "eager"))
    options = dict(turbo_options)
    if compiler == "eager":
        options.setdefault("inner_backend", "eager")
    return GraphCounter(lookup("turbo"), options=options)


def raise_recompile_limits(limit: int = 64) -> None:
    """Several compiled configurations of one model's frames live at once in a study."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), limit))


def no_compile_caches() -> None:
    """Turn off the caches that would let one compile reuse another's work: the FX graph cache
    and the AOT autograd cache are keyed by graph content, so turbo at r=0 and plain Inductor
    (the same graph) would share one compile. ``fresh_cache`` also gives every compile an
    empty cache directory."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = False
    inductor_config.fx_graph_remote_cache = False
    inductor_config.autotune_local_cache = False
    inductor_config.autotune_remote_cache = False
    functorch_config.enable_autograd_cache = False
    raise_recompile_limits()


@contextlib.contextmanager
def fresh_cache(root: Optional[str] = None, delete: bool = True, enabled: bool = True) -> Iterator[Optional[str]]:
    """An empty ``TORCHINDUCTOR_CACHE_DIR`` (a new folder under ``root``; by default under the
    ``TORCHINDUCTOR_CACHE_DIR`` set when this module was imported, e.g. by ``make bench``) with
    Inductor's in-memory code caches cleared on entry and exit (torch's own
    ``torch._inductor.utils.fresh_cache``); each compile inside it builds all its kernels again.
    ``delete=False`` keeps the folder until ``root`` is removed; ``enabled=False`` does nothing."""
    if not enabled:
        yield None
        return
    from torch._inductor.utils import fresh_cache as inductor_fresh_cache

    root = root or _CACHE_ROOT
    os.makedirs(root, exist_ok=True)
    with inductor_fresh_cache(dir=root, delete=delete):
        yield os.environ["TORCHINDUCTOR_CACHE_DIR"]


_WARMED: set = set()


def warm_up_compilers(turbo: bool = True) -> float:
    """Compile and run a 2-block, 17-token ViT with Inductor (and turbo), once per process and
    untimed by the callers: pays the one-time compile costs (imports, the compile worker pool,
    C++ toolchain probing, turbo's op registration) up front. Returns its seconds."""
    if turbo in _WARMED or (not turbo and True in _WARMED):
        return 0.0
    from timm.models.vision_transformer import VisionTransformer

    start = time.perf_counter()
    tiny = VisionTransformer(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), fresh_cache():
        torch._dynamo.reset()
        torch.compile(tiny)(x)
        if turbo:
            torch._dynamo.reset()
            torch.compile(tiny, backend="turbo", options={"r": 2})(x)
    torch._dynamo.reset()
    _WARMED.add(turbo)
    return time.perf_counter() - start


def time_first_call(fn: Callable, *args) -> float:
    """Wall seconds of ``fn(*args)`` under ``torch.no_grad()``: for a freshly wrapped
    ``torch.compile`` model, compile + one forward pass."""
    with torch.no_grad():
        start = time.perf_counter()
        fn(*args)
        return time.perf_counter() - start


# --------------------------------------------------------------------------- steady state
def interleaved(fns: dict, x, rounds: int, warmup: int = 2, progress: Optional[Callable[[str], None]] = None) -> dict:
    """Seconds per call of every function in ``fns`` (name -> callable on ``x``, one tensor or a
    tuple of positional inputs): ``warmup`` untimed calls each, then ``rounds`` rounds; round i
    runs every function once, starting at the i-th. Returns name -> ``rounds`` timings."""
    args = x if isinstance(x, tuple) else (x,)
    names = list(fns)
    times: dict = {name: [] for name in names}
    with torch.no_grad():
        for _ in range(warmup):
            for name in names:
                fns[name](*args)
        for i in range(rounds):
            k = i % len(names)
            for name in names[k:] + names[:k]:
                start = time.perf_counter()
                fns[name](*args)
                times[name].append(time.perf_counter() - start)
            if progress:
                progress(f"round {i + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1] * 1e3:.0f} ms" for n in names))
    return times


def stats(samples: Sequence[float]) -> dict:
    """Median, min, max and interquartile range (inclusive quartiles) of some timings."""
    data = sorted(samples)
    if len(data) >= 2:
        q1, _, q3 = statistics.quantiles(data, n=4, method="inclusive")
    else:
        q1 = q3 = data[0]
    return {"median": statistics.median(data), "min": data[0], "max": data[-1],
            "q1": q1, "q3": q3, "iqr": q3 - q1, "n": len(data)}
