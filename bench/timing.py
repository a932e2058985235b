"""Timing helpers shared by the benchmarks (bench/) and the `turbo-fx` command line.

- ``machine()``: what the figures were measured on (CPU, cores, threads, versions, date, command).
- ``no_compile_caches()`` / ``fresh_cache()``: make every compile pay full price, with nothing
  read from the on-disk or in-memory Inductor caches that an earlier compile filled.
- ``warm_up_compilers()``: one tiny untimed compile so one-time costs (imports, the compile
  worker pool, C++ toolchain probing, turbo's op registration) are not charged to whichever
  configuration happens to be compiled first.
- ``time_first_call()``: compile seconds, as defined below.
- ``interleaved()`` / ``stats()``: steady-state latency, every configuration once per round in a
  rotating order (2 shared cores drift by tens of percent between minutes, see ENVIRONMENT.md).

Compile seconds, the definition both scripts use: the wall time of the first call of a freshly
wrapped ``torch.compile`` model (Dynamo tracing + the backend, including turbo's rewrite, +
Inductor's code generation and C++ compilation + one forward pass), with an empty Inductor cache
directory, the FX graph cache and the AOT autograd cache off, minus that configuration's median
steady-state latency (the forward pass the first call also did).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from typing import Callable, Iterator, Optional, Sequence

import torch

# Where fresh cache folders go: the cache dir the caller chose (make bench sets one under build/),
# read before Inductor sets its default (/tmp/torchinductor_$USER) into the environment.
_CACHE_ROOT = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "turbo-fx-bench")


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


def machine() -> dict:
    """A description of where and how the figures were taken (goes into every JSON)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        import timm
        timm_version = timm.__version__
    except ImportError:
        timm_version = None
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": load,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm_version,
        "platform": platform.platform(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
    }


def machine_line(info: Optional[dict] = None) -> str:
    info = info or machine()
    load = info["load_average_at_start"]
    load_text = f", load average {load[0]:.2f}" if load else ""
    return (
        f"{info['cpu']}, {info['usable_cpus']} usable cores, {info['torch_threads']} torch threads"
        f"{load_text}; torch {info['torch']}, timm {info['timm']}, {info['date_utc']}"
    )


# --------------------------------------------------------------------------- compile caches
def no_compile_caches() -> None:
    """Turn off the caches that would let one compile reuse another's work.

    The FX graph cache (Inductor's compiled-graph cache) and the AOT autograd cache are both
    keyed by graph content: two configurations that produce the same graph (turbo at r=0 and
    plain Inductor) would otherwise share one compile. ``fresh_cache`` below additionally gives
    every compile an empty cache directory and clears the in-memory code caches.
    """
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = False
    inductor_config.fx_graph_remote_cache = False
    inductor_config.autotune_local_cache = False
    inductor_config.autotune_remote_cache = False
    functorch_config.enable_autograd_cache = False
    # 4 compiled configurations of one module's forward live at once in bench_vit.py.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)


@contextlib.contextmanager
def fresh_cache(root: Optional[str] = None) -> Iterator[str]:
    """An empty ``TORCHINDUCTOR_CACHE_DIR`` (a new temporary folder under ``root``; by default
    under the ``TORCHINDUCTOR_CACHE_DIR`` set when this module was imported, e.g. by ``make bench``,
    else under $TMPDIR/turbo-fx-bench) with Inductor's in-memory code caches cleared on entry and
    exit: torch's own ``torch._inductor.utils.fresh_cache``. The folder is deleted on exit.
    Checked on DeiT-S: each compile inside it builds all its C++ kernels again (11 .so files for
    plain Inductor every time)."""
    from torch._inductor.utils import fresh_cache as inductor_fresh_cache

    if root is None:
        root = _CACHE_ROOT
    os.makedirs(root, exist_ok=True)
    with inductor_fresh_cache(dir=root):
        yield os.environ["TORCHINDUCTOR_CACHE_DIR"]


def warm_up_compilers(turbo: bool = True) -> float:
    """Compile and run a 2-block, 17-token ViT with Inductor (and turbo), untimed by the
    callers: pays the process's one-time compile costs up front. Returns its seconds."""
    from timm.models.vision_transformer import VisionTransformer

    start = time.perf_counter()
    tiny = VisionTransformer(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2,
                             num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), fresh_cache():
        torch._dynamo.reset()
        torch.compile(tiny)(x)
        if turbo:
            torch._dynamo.reset()
            torch.compile(tiny, backend="turbo", options={"r": 2})(x)
    torch._dynamo.reset()
    return time.perf_counter() - start


def time_first_call(fn: Callable, *args) -> float:
    """Wall seconds of ``fn(*args)`` under ``torch.no_grad()``: for a freshly wrapped
    ``torch.compile`` model, compile + one forward pass."""
    with torch.no_grad():
        start = time.perf_counter()
        fn(*args)
        return time.perf_counter() - start


# --------------------------------------------------------------------------- steady state
def interleaved(fns: dict, x: torch.Tensor, rounds: int, warmup: int = 2,
                progress: Optional[Callable[[str], None]] = None) -> dict:
    """Seconds per call of every function in ``fns`` (name -> callable on ``x``).

    ``warmup`` untimed calls each, then ``rounds`` rounds; round i runs every function once,
    starting at the i-th (a rotating order, so none is always first or last after a pause).
    ``x`` is one tensor, or a tuple of positional inputs.
    Returns name -> list of ``rounds`` timings, in round order."""
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
                progress(f"round {i + 1}/{rounds}: "
                         + ", ".join(f"{n} {times[n][-1] * 1e3:.0f} ms" for n in names))
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


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def log(message: str) -> None:
    """A progress line with the wall-clock time, flushed at once."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def option_pair(text: str) -> tuple[str, object]:
    """``--option KEY=VALUE`` for argparse: the value as a Python literal when it is one."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--option expects KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def write_json_and_markdown(payload: dict, out_dir: str, name: str, render: Callable[[dict], str]) -> tuple[str, str]:
    """``<out_dir>/<name>.json`` and ``<name>.md`` (``render(payload)``); returns both paths."""
    os.makedirs(out_dir, exist_ok=True)
    json_path, md_path = os.path.join(out_dir, f"{name}.json"), os.path.join(out_dir, f"{name}.md")
    with open(json_path, "w") as f:
        json.dump(payload, f, indent=1)
    with open(md_path, "w") as f:
        f.write(render(payload))
    return json_path, md_path


# --------------------------------------------------------------------------- devices
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_model_arguments(parser, model: str, batch: int, threads: int) -> None:
    """The arguments every timm benchmark here takes: --model, --r, --batch, --threads."""
    parser.add_argument("--model", default=model, help="a timm model name (random weights)")
    parser.add_argument("--r", type=int, default=13)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--threads", type=int, default=threads)


def seeded_timm_model(name: str, batch: int, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A timm model with random weights (seed 0), in eval mode, and a random input batch at
    its default resolution."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval().to(device, dtype)
    return model, torch.randn(batch, *model.default_cfg["input_size"], device=device, dtype=dtype)


def device_error(device: str) -> Optional[str]:
    """Why ``device`` cannot run here (a usage error for the command line), or None."""
    if device == "cuda" and not torch.cuda.is_available():
        return "--device cuda: no CUDA device is available"
    return None


def synchronised(fn, device: torch.device):
    """``fn`` that returns only once the device has finished its work (a GPU runs ahead of the
    host, so an unsynchronised call times the launches, not the forward)."""
    if device.type != "cuda":
        return fn

    def call(*args):
        out = fn(*args)
        torch.cuda.synchronize(device)
        return out

    return call


def write_and_print(payload: dict, out_dir: str, name: str, render: Callable[[dict], str]) -> tuple[str, str]:
    """``write_json_and_markdown``, then the tables and where they went on stdout."""
    json_path, md_path = write_json_and_markdown(payload, out_dir, name, render)
    print(render(payload))
    print(f"wrote {json_path} and {md_path}")
    return json_path, md_path
