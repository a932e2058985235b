"""The ``turbo-fx`` command line.

    turbo-fx bench     --model timm:deit_small_patch16_224 --r 0 8 13
    turbo-fx eval      --task fashion-mnist --suite full --train 4000 --test 2000
    turbo-fx analyze   --model dinov2-s
    turbo-fx visualize --model dinov2-s --image chelsea --r 16

Every command writes markdown (tables), JSON (every number) and PNG plots into ``--out``.
Bad arguments print a message naming the problem and exit with code 2.
"""
from __future__ import annotations

import argparse
import ast
import os
import shlex
import sys
from typing import Optional, Sequence

from turbo_fx.bench import timing

DEFAULT_OUT = "turbo-fx-results"


class UsageError(Exception):
    """A bad argument found after parsing (reported like argparse's own errors, exit 2)."""


def _options(pairs: Sequence[str]) -> dict:
    """KEY=VALUE pairs into turbo options (values parsed as Python literals when they are)."""
    options = {}
    for item in pairs:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--option expects KEY=VALUE, got {item!r}")
        try:
            options[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            options[key] = text
    from turbo_fx.config import TurboConfigError, resolve_config

    try:
        resolve_config({"r": 0, **options})
    except TurboConfigError as exc:
        raise UsageError(str(exc)) from exc
    return options


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="turbo-fx", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: ./{DEFAULT_OUT})")
    common.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a turbo option for every merging configuration, e.g. alpha=0.1 (repeatable)")
    common.add_argument("--no-progress", action="store_true", help="no progress bars")
    common.add_argument("--threads", type=_positive, default=None, help="torch.set_num_threads")

    b = sub.add_parser("bench", parents=[common], help="time eager, Inductor and turbo; FLOPs and compile time",
                       description="Eager vs Inductor vs turbo at each r: FLOPs, compile seconds (fresh "
                                   "cache), steady-state latency (interleaved rounds, median).")
    b.add_argument("--model", default="timm:deit_small_patch16_224",
                   help="a model_zoo name (turbo-fx bench --list-models shows them)")
    b.add_argument("--list-models", action="store_true", help="list model names and exit")
    b.add_argument("--r", nargs="+", type=_non_negative, default=[0, 8, 13], help="r values (default 0 8 13)")
    b.add_argument("--batch", type=_positive, default=8, help="batch size (default 8)")
    b.add_argument("--rounds", type=_positive, default=5, help="interleaved timing rounds (default 5)")
    b.add_argument("--warmup", type=_non_negative, default=2, help="untimed calls per configuration (default 2)")
    b.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the model runs (default cpu)")
    b.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="the model's and its float inputs' dtype (default fp32)")
    b.add_argument("--mode", default=None,
                   choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                   help="Inductor's compile mode for Inductor and every turbo row (reduce-overhead: CUDA graphs)")

    e = sub.add_parser("eval", parents=[common], help="fidelity of merged models on real weights and data",
                       description="Accuracy kept at each FLOP budget: baseline, redundancy-only, "
                                   "semantic-only and Turbo rows (see bench/suites.py).")
    e.add_argument("--task", choices=("fashion-mnist", "text"), default="fashion-mnist",
                   help="fashion-mnist: DINOv2-S linear probe / k-NN / cosine; text: MiniLM on Lee "
                        "(Spearman vs human scores) and polarity (probe)")
    e.add_argument("--suite", default="demo", help="demo, components, alpha, fusion, threshold or full")
    e.add_argument("--r", nargs="+", type=_positive, default=None, help="r values for the component rows")
    e.add_argument("--alphas", nargs="+", type=float, default=None, help="alpha values for the alpha rows")
    e.add_argument("--methods", nargs="+", default=None,
                   choices=("redundancy-only", "semantic-only", "turbo", "turbo + keep_salient"),
                   help="rankings for the component rows (default: demo two, components all three)")
    e.add_argument("--train", type=_positive, default=2000, help="training images for the probe (default 2000)")
    e.add_argument("--test", type=_positive, default=1000, help="test images (default 1000)")
    e.add_argument("--texts", type=_positive, default=None,
                   help="text task: only the first N Lee documents and N sentences per polarity (default: all)")
    e.add_argument("--bucket", type=_positive, default=8,
                   help="text task: pad texts to multiples of this many tokens, one graph per bucket "
                        "(default 8; 1 = no padding, one graph per distinct length)")
    e.add_argument("--batch", type=_positive, default=32, help="images per batch (default 32)")
    e.add_argument("--resolution", type=_positive, default=224, help="image side in pixels, a multiple of 14")
    e.add_argument("--inner-backend", choices=("eager", "inductor", "aot_eager"), default="eager",
                   help="what runs the rewritten graphs (default eager; see bench/evaluation.py)")
    e.add_argument("--cache", default=None, help="folder for cached unmerged train features "
                                                  "(default: $TURBO_FX_CACHE or ~/.cache/turbo_fx)")
    e.add_argument("--name", default=None, help="file name stem (default eval_<task>_<suite>)")

    a = sub.add_parser("analyze", parents=[common], help="token redundancy S and attention concentration C per block",
                       description="Per attention block: S = mean pairwise cosine of the tokens, C = CLS "
                                   "attention mass on the top quarter of tokens (the paper's Figure 3).")
    a.add_argument("--model", nargs="+", default=["dinov2-s"], help="model_zoo names (several: one plot)")
    a.add_argument("--batch", type=_positive, default=8, help="inputs per model (default 8)")

    v = sub.add_parser("visualize", parents=[common], help="draw which image patches were merged",
                       description="Draw, over the image, which patches turbo merged together at chosen blocks.")
    v.add_argument("--model", default="dinov2-s", help="a vision model_zoo name (default dinov2-s)")
    v.add_argument("--image", nargs="+", default=["chelsea"],
                   help="photo names (model_zoo.data.sample_photos), 'fashion-mnist:<index>' or image file paths")
    v.add_argument("--r", type=_non_negative, default=16, help="tokens merged per block (default 16)")
    v.add_argument("--blocks", nargs="+", type=_non_negative, default=None, help="blocks to draw (default: 4 spread)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.options = _options(args.option)
        if getattr(args, "resolution", 14) % 14:
            raise UsageError(f"--resolution must be a multiple of 14 (DINOv2's patch), got {args.resolution}")
        if args.command == "eval":
            from turbo_fx.bench.suites import SUITES

            if args.suite not in SUITES:
                raise UsageError(f"--suite must be one of {', '.join(SUITES)}, got {args.suite!r}")
    except UsageError as exc:
        parser.error(str(exc))  # exits with code 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    command = "turbo-fx " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    from turbo_fx.model_zoo.registry import MissingDependency

    if args.command == "bench" and timing.device_error(args.device):
        parser.error(timing.device_error(args.device))
    try:
        if args.command == "bench":
            from turbo_fx.bench import speed

            return speed.run(args, command)
        if args.command == "eval":
            return run_eval(args, command)
        if args.command == "analyze":
            return run_analyze(args, command)
        return run_visualize(args, command)
    except MissingDependency as exc:
        print(f"turbo-fx: {exc}", file=sys.stderr)
        return 1
    except UsageError as exc:
        parser.error(str(exc))
    return 0


def run_eval(args, command: str) -> int:
    from turbo_fx.bench import evaluation as ev
    from turbo_fx.bench import results, suites

    timing.log(f"machine: {timing.machine_line()}")
    if args.task == "fashion-mnist":
        task = suites.fashion_mnist_task(args.train, args.test, args.batch, args.resolution)
        defaults, plot_metrics, model = suites.VISION_DEFAULTS, ["probe_top1", "knn_top1"], "DINOv2 ViT-S/14"
        model += f" (real weights) on Fashion-MNIST at {args.resolution} px"
    else:
        task = suites.text_task(limit=args.texts, bucket=args.bucket)
        defaults, plot_metrics, model = suites.TEXT_DEFAULTS, ["lee_spearman", "polarity_probe"], "MiniLM-L6 (real weights)"
    variants = suites.variants_for(args.suite, defaults, args.options, args.r, args.alphas or suites.ALPHAS,
                                   args.methods)
    timing.log(f"{model}: {len(variants)} configurations + the baseline; {task.describe()}")
    from turbo_fx.model_zoo.dinov2 import default_cache_dir

    cache = str(default_cache_dir(args.cache))
    stem = args.name or f"eval_{args.task.replace('-', '_')}_{args.suite}"

    def write(partial):
        return results.write_results(partial, args.out, stem, timing.machine(), timing.machine_line(), command,
                                     plot_metrics)

    out = ev.evaluate(task, variants, model, inner_backend=args.inner_backend, progress=not args.no_progress,
                      cache_dir=cache, log=timing.log, on_row=write)
    paths = write(out)
    print(results.markdown(out, timing.machine_line(), command))
    timing.log("wrote " + ", ".join(sorted(paths.values())))
    return 0


def run_analyze(args, command: str) -> int:
    import json

    from turbo_fx.bench import analysis
    from turbo_fx.model_zoo.registry import build_model

    reports = {}
    for name in args.model:
        zoo = build_model(name)
        timing.log(f"analyzing {name}: {zoo.description}")
        inputs = zoo.example_inputs(args.batch)
        reports[name] = analysis.analyze_redundancy(zoo.model, *inputs, label=name)
        print(f"\n## {name} ({'real' if zoo.real_weights else 'RANDOM'} weights)\n")
        print(reports[name].table())
    png = analysis.plot_redundancy(reports, os.path.join(args.out, "redundancy.png"))
    md = ["# Token redundancy S and attention concentration C per block", "",
          f"Machine: {timing.machine_line()}.", f"Command: `{command}`", ""]
    for name, report in reports.items():
        md += [f"## {name}", "", report.table(), ""]
    md += ["S: mean pairwise cosine similarity of the tokens entering the block (real tokens only). "
           "C: the first token's attention (averaged over heads) on the top quarter of tokens.", "",
           f"![redundancy]({os.path.basename(png)})", ""]
    with open(os.path.join(args.out, "redundancy.md"), "w") as f:
        f.write("\n".join(md))
    with open(os.path.join(args.out, "redundancy.json"), "w") as f:
        json.dump({"command": command, "machine": timing.machine(),
                   "reports": {k: r.to_dict() for k, r in reports.items()}}, f, indent=1)
    timing.log(f"wrote {png}, redundancy.md and redundancy.json in {args.out}")
    return 0


def _load_image(spec: str):
    import numpy as np

    from turbo_fx.model_zoo import data

    if spec.startswith("fashion-mnist:"):
        images, _ = data.fashion_mnist("test")
        return images[int(spec.split(":", 1)[1])]
    if os.path.exists(spec):
        from skimage import io

        return np.asarray(io.imread(spec))
    photos = data.sample_photos()
    if spec not in photos:
        raise UsageError(f"--image {spec!r} is not a file, 'fashion-mnist:<i>' or one of {sorted(photos)}")
    return photos[spec]


def run_visualize(args, command: str) -> int:
    from turbo_fx.bench import visualize
    from turbo_fx.model_zoo import dinov2
    from turbo_fx.model_zoo.registry import build_model

    zoo = build_model(args.model)
    if zoo.kind != "vision":
        raise UsageError(f"--model {args.model} is not a vision model")
    size = zoo.image_size or 224
    for spec in args.image:
        picture = _load_image(spec)
        pixels = dinov2.dinov2_preprocess(picture, size=size)
        name = os.path.splitext(os.path.basename(spec))[0].replace(":", "_")
        path = os.path.join(args.out, f"merges_{args.model.replace(':', '_')}_{name}_r{args.r}.png")
        result = visualize.visualize_merges(zoo.model, pixels, options={**args.options, "r": args.r},
                                            blocks=args.blocks, display_image=picture, path=path)
        timing.log(f"{spec}: blocks {result.blocks}, tokens {result.tokens}; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
