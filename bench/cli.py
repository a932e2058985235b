"""The ``turbo-fx`` command line: every study, one subcommand each.

    turbo-fx bench     --model timm:deit_small_patch16_224 --r 0 8 13
    turbo-fx eval      --task fashion-mnist --suite full --train 4000 --test 2000
    turbo-fx analyze   --model dinov2-s
    turbo-fx visualize --model dinov2-s --image chelsea --r 16
    turbo-fx merge-paths | diffusion-speed | diffusion-fidelity | vlm-speed | llava-speed | llava-fidelity | vlm-eval | rotary-fidelity | joint-dit-fidelity | sweep ...
    turbo-fx calibration --max-drift 0.005 0.01

A study is one entry of ``STUDIES``: its name, what it measures, the module whose ``run(args)``
runs it, and its arguments. Every study also takes ``--out`` (where its markdown tables, JSON
and plots go), ``--option KEY=VALUE`` (a turbo option for every merging configuration) and
``--threads``; a study that can rebuild its tables from a saved JSON takes ``--render JSON``.
Bad arguments print a message naming the problem and exit with code 2.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import os
import shlex
import sys
from dataclasses import dataclass, field
from typing import Optional, Sequence

DEFAULT_OUT = "turbo-fx-results"


class UsageError(Exception):
    """A bad argument found after parsing (reported like argparse's own errors, exit 2)."""


def positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def ratio(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"a ratio must be in [0, 1), got {text}")
    return value


def arg(*flags: str, **kwargs) -> tuple:
    return flags, kwargs


DEVICE = arg("--device", default="cpu", choices=("cpu", "cuda"), help="where the model runs (default cpu)")
DTYPE = arg("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"),
            help="the model's and its float inputs' dtype (default fp32)")
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
MODE = arg("--mode", default=None, choices=MODES,
           help="Inductor's compile mode for every configuration, Inductor's too (reduce-overhead: CUDA graphs)")
COMPILER = arg("--compiler", choices=("inductor", "eager"), default="inductor",
               help="'eager': Dynamo's eager backend instead of Inductor (turbo inner_backend=eager)")
NAME = arg("--name", default=None, help="file name stem of the results")
SEED = arg("--seed", type=int, default=0)


@dataclass(frozen=True)
class Study:
    name: str
    help: str
    module: str  # turbo_fx.bench.<module>.run(args) runs it
    arguments: tuple = ()
    defaults: dict = field(default_factory=dict)
    renders: bool = False  # the module's render(json_path) rebuilds the tables from a saved JSON


STUDIES = (
    Study("bench", "time eager, Inductor and turbo: compile seconds, latency, FLOPs", "speed", (
        arg("--model", nargs="+", default=["timm:deit_small_patch16_224"],
            help="model_zoo names (turbo-fx bench --list-models shows them)"),
        arg("--list-models", action="store_true", help="list model names and exit"),
        arg("--r", nargs="+", type=non_negative, default=[0, 8, 13], help="r values (default 0 8 13)"),
        arg("--batch", type=positive, default=8, help="batch size (default 8)"),
        arg("--image-size", type=positive, default=None,
            help="timm models only: build at this input side in pixels (timm's img_size; default: the model's own)"),
        arg("--rounds", type=positive, default=5, help="interleaved timing rounds (default 5)"),
        arg("--warmup", type=non_negative, default=2, help="untimed calls per configuration (default 2)"),
        arg("--compile-repeats", type=positive, default=1,
            help="compiles per configuration for the compile seconds, in a rotating order, median (default 1)"),
        DEVICE, DTYPE, MODE, NAME), renders=True),
    Study("eval", "fidelity of merged models on real weights and data", "suites", (
        arg("--task", choices=("fashion-mnist", "text"), default="fashion-mnist",
            help="fashion-mnist: DINOv2-S linear probe / k-NN / cosine; text: MiniLM on Lee "
                 "(Spearman vs human scores) and polarity (probe)"),
        arg("--suite", default="demo", help="demo, components, alpha, fusion, threshold or full"),
        arg("--r", nargs="+", type=positive, default=None, help="r values for the component rows"),
        arg("--alphas", nargs="+", type=float, default=None, help="alpha values for the alpha rows"),
        arg("--methods", nargs="+", default=None,
            choices=("redundancy-only", "semantic-only", "turbo", "turbo + keep_salient"),
            help="rankings for the component rows (default: demo two, components all three)"),
        arg("--train", type=positive, default=2000, help="training images for the probe (default 2000)"),
        arg("--test", type=positive, default=1000, help="test images (default 1000)"),
        arg("--texts", type=positive, default=None,
            help="text task: only the first N Lee documents and N sentences per polarity (default: all)"),
        arg("--bucket", type=positive, default=8,
            help="text task: pad texts to multiples of this many tokens, one graph per bucket (default 8)"),
        arg("--batch", type=positive, default=32, help="images per batch (default 32)"),
        arg("--resolution", type=positive, default=224, help="image side in pixels, a multiple of 14"),
        arg("--inner-backend", choices=("eager", "inductor", "aot_eager"), default="eager",
            help="what runs the rewritten graphs (default eager: fidelity, not speed)"),
        arg("--cache", default=None,
            help="folder for cached unmerged train features (default: $TURBO_FX_CACHE or ~/.cache/turbo_fx)"),
        arg("--no-progress", action="store_true", help="no progress bars"),
        NAME), renders=True),
    Study("analyze", "token redundancy S and attention concentration C per block", "analysis", (
        arg("--model", nargs="+", default=["dinov2-s"], help="model_zoo names (several: one plot)"),
        arg("--batch", type=positive, default=8, help="inputs per model (default 8)"))),
    Study("visualize", "draw which image patches were merged", "visualize", (
        arg("--model", default="dinov2-s", help="a vision model_zoo name (default dinov2-s)"),
        arg("--image", nargs="+", default=["chelsea"],
            help="photo names (model_zoo.data.sample_photos), 'fashion-mnist:<index>' or image file paths"),
        arg("--r", type=non_negative, default=16, help="tokens merged per block (default 16)"),
        arg("--blocks", nargs="+", type=non_negative, default=None, help="blocks to draw (default: 4 spread)"))),
    Study("merge-paths", "the ways a merge step can run, side by side against Inductor", "merge_paths", (
        arg("--model", default="timm:deit_tiny_patch16_224", help="a model_zoo name"),
        arg("--r", type=non_negative, default=13),
        arg("--batch", type=positive, default=8),
        arg("--rounds", type=positive, default=20),
        arg("--paths", nargs="+", default=None,
            help="merge paths to measure (merge_paths.MERGE_PATHS), the first the reference of the "
                 "differences (default: all)"),
        DEVICE, DTYPE, MODE, NAME), defaults={"threads": 1}),
    Study("diffusion-speed", "SD-1.5 / DiT / SD3-sized models: eager, Inductor, tomesd and turbo", "diffusion_speed", (
        arg("--model", nargs="+", choices=("unet", "dit", "sd3", "flux"), default=["unet"]),
        arg("--small", action="store_true", help="tiny configurations of the same classes (a smoke test)"),
        arg("--sd3-blocks", type=positive, default=4,
            help="sd3: how many of SD3-medium's 24 joint blocks to build (default 4)"),
        arg("--flux-blocks", type=positive, default=2,
            help="flux: double-stream blocks to build, with twice as many single-stream ones (default 2)"),
        arg("--ratio", nargs="+", type=ratio, default=[0.3, 0.5, 0.6]),
        arg("--configs", nargs="+",
            choices=("eager", "inductor", "tomesd", "tomesd-eager", "turbo", "turbo-sa", "turbo-all"),
            default=["eager", "inductor", "tomesd", "turbo"], help="eager and inductor always run"),
        arg("--rounds", type=positive, default=5, help="timed interleaved rounds"),
        arg("--ddim-steps", type=non_negative, default=10, help="0 skips the denoising loop"),
        arg("--guidance", type=float, default=7.5),
        arg("--no-tomesd-shim", dest="tomesd_shim", action="store_false",
            help="compile tomesd as it is (graph breaks; they also fragment the other compiled rows)"),
        SEED, COMPILER, NAME)),
    Study("diffusion-fidelity", "generated images: FD, class accuracy, PSNR and SSIM vs tomesd", "generation_eval", (
        arg("--samples", type=positive, default=200),
        arg("--steps", type=positive, default=20, help="DDIM steps"),
        arg("--guidance", type=float, default=2.5),
        arg("--ratios", type=ratio, nargs="+", default=[0.3, 0.5, 0.6]),
        arg("--alpha", type=float, default=0.05),
        arg("--alpha-sweep", type=float, nargs="*", default=[],
            help="further alphas for the self-attention turbo row at --sweep-ratio"),
        arg("--sweep-ratio", type=float, default=0.5),
        arg("--batch", type=positive, default=50), SEED), defaults={"threads": 1}),
    Study("vlm-speed", "CLIP scoring and BLIP captioning with generate(): eager, Inductor, turbo", "vlm_speed", (
        arg("--part", nargs="+", choices=("clip", "blip"), default=["clip", "blip"]),
        arg("--small", action="store_true", help="tiny configurations of the same classes (a smoke test)"),
        arg("--r", nargs="+", type=non_negative, default=[8, 13, 16], help="turbo rows (tokens merged per block)"),
        arg("--clip-batch", type=positive, default=4, help="images and captions per CLIP call"),
        arg("--caption-tokens", type=positive, default=24, help="tokens per CLIP caption"),
        arg("--blip-batch", nargs="+", type=positive, default=[1], help="BLIP batch sizes"),
        arg("--new-tokens", type=positive, default=20, help="tokens per BLIP caption"),
        arg("--rounds", type=positive, default=None, help="timed rounds (default: CLIP 5, BLIP 3)"),
        arg("--warmup", type=non_negative, default=1, help="untimed calls per configuration before the rounds"),
        arg("--decoder", choices=("compiled", "eager"), default="compiled",
            help="BLIP's decoder in the compiled rows: its forward compiled (shared), or eager"),
        arg("--compare-explicit", action="store_true",
            help="BLIP: also a 'turbo r=R explicit' row per r (explicit_as_sdpa=False)"),
        arg("--note", default=None, help="a line for the result files"),
        SEED, COMPILER)),
    Study("llava-speed", "LLaVA-style time to first token: Inductor vs turbo (tower merged, visual tokens compacted)",
          "llava_speed", (
              arg("--small", action="store_true", help="tiny configurations of the same classes (a smoke test)"),
              arg("--batch", nargs="+", type=positive, default=[1]),
              arg("--r", type=non_negative, default=8, help="tokens the tower merges per block (default 8)"),
              arg("--ratio", type=ratio, default=0.75,
                  help="fraction of the language model's visual tokens merged away (default 0.75: keep 0.25)"),
              arg("--rounds", type=positive, default=5, help="interleaved timing rounds (default 5)"))),
    Study("vlm-eval", "captioning fidelity: DINOv2-S + a trained decoder on Fashion-MNIST", "vlm_eval", (
        arg("--test", type=positive, default=1000, help="class-balanced test images (default 1000)"),
        arg("--r", type=non_negative, nargs="+", default=[8, 12, 16]),
        arg("--methods", nargs="+", default=["turbo", "redundancy-only", "semantic-only"],
            choices=("turbo", "redundancy-only", "semantic-only")),
        arg("--batch", type=positive, default=20),
        arg("--inner-backend", default="eager", choices=("eager", "aot_eager", "inductor")),
        arg("--greedy-check", type=non_negative, default=20,
            help="images whose derived captions are checked with a plain greedy loop (0: none)"),
        SEED), defaults={"threads": 1}, renders=True),
    Study("rotary-fidelity", "a RoPE ViT trained on Fashion-MNIST: accuracy and agreement under each rotary rule",
          "rotary_fidelity", (
              arg("--test", type=positive, default=2000, help="class-balanced test images (default 2000)"),
              arg("--r", type=non_negative, nargs="+", default=[2, 4, 6],
                  help="tokens merged per block (default 2 4 6)"),
              arg("--rules", nargs="+", default=["rows", "position"],
                  help="values of turbo's rotary option, each compared with the first (default rows position)"),
              arg("--batch", type=positive, default=100, help="images per batch (default 100)"),
              arg("--inner-backend", default="eager", choices=("eager", "aot_eager", "inductor"),
                  help="what runs the rewritten graphs (default eager: fidelity, not speed)"),
              arg("--small", action="store_true", help="a tiny untrained model on 20 images (a smoke test)"),
              SEED), defaults={"threads": 1}, renders=True),
    Study("joint-dit-fidelity", "a joint-attention rotary DiT trained on Fashion-MNIST: generated images under "
          "each rotary rule", "joint_dit_fidelity", (
              arg("--samples", type=positive, default=200, help="generated images per row (default 200)"),
              arg("--steps", type=positive, default=20, help="DDIM steps (default 20)"),
              arg("--guidance", type=float, default=2.5, help="classifier-free guidance (default 2.5)"),
              arg("--ratios", type=ratio, nargs="+", default=[0.1, 0.25, 0.5, 0.75],
                  help="merge-and-restore ratios (default 0.1 0.25 0.5 0.75)"),
              arg("--rules", nargs="+", default=["rows", "position"],
                  help="values of turbo's rotary option, each compared with the first (default rows position)"),
              arg("--batch", type=positive, default=50, help="samples per model call, doubled by guidance (default 50)"),
              arg("--small", action="store_true", help="a tiny untrained model, pixel-space reference (a smoke test)"),
              SEED), defaults={"threads": 1}, renders=True),
    Study("llava-fidelity", "a LLaVA-style stand-in trained here: answers under visual-token compaction vs "
          "VisionZip-style selection and pooling", "llava_fidelity", (
              arg("--test", type=positive, default=1000, help="class-balanced test images (default 1000)"),
              arg("--ratios", type=ratio, nargs="+", default=[0.5, 0.75, 0.89],
                  help="fractions of the 256 visual tokens merged away (default 0.5 0.75 0.89: keep 0.5 0.25 "
                       "0.11); the unmerged model always runs"),
              arg("--methods", nargs="+", default=["turbo-compact", "turbo-redundancy", "visionzip", "pool"],
                  choices=("turbo-compact", "turbo-redundancy", "visionzip", "pool"),
                  help="turbo-compact: turbo's default ranking; turbo-redundancy: semantic=False (default: all)"),
              arg("--batch", type=positive, default=50, help="images per batch (default 50)"),
              arg("--small", action="store_true", help="a tiny untrained model on random features (a smoke test)"),
              SEED), defaults={"threads": 1}, renders=True),
    Study("calibration", "turbo_fx.calibrate on DINOv2-S: does the chosen budget keep its drift on held-out images",
          "calibration", (
              arg("--max-drift", type=float, nargs="+", default=[0.002, 0.005, 0.01, 0.02],
                  help="drift bounds to calibrate for (mean 1 - cosine of the probe features; default "
                       "0.002 0.005 0.01 0.02)"),
              arg("--budgets", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6, 0.5, 0.4],
                  help="candidate FLOP budgets (default calibrate's: 0.9 0.8 0.7 0.6 0.5 0.4)"),
              arg("--train", type=positive, default=2000, help="training images for the probe (default 2000)"),
              arg("--calibration-batches", type=positive, default=4,
                  help="calibration batches, of further training images (default 4)"),
              arg("--calibration-batch", type=positive, default=16, help="images per calibration batch (default 16)"),
              arg("--test", type=positive, default=1000, help="class-balanced held-out test images (default 1000)"),
              arg("--batch", type=positive, default=16, help="held-out images per batch (default 16)"),
              arg("--every-budget", action="store_true",
                  help="score every candidate budget on the held-out images, not only the chosen ones"),
              arg("--cache", default=None,
                  help="folder for cached unmerged train features (default: $TURBO_FX_CACHE or ~/.cache/turbo_fx)"),
              arg("--small", action="store_true", help="a tiny random DINOv2 on a few images (a smoke test)"),
              SEED), defaults={"threads": 1}, renders=True),
    Study("sweep", "recent architectures, tiny: which merge, and why the others fall back", "sweep", (
        arg("--models", nargs="+", default=None, help="library class or timm names of sweep.CASES (default: all)"),
        arg("--inner-backend", default="eager", choices=("eager", "aot_eager", "inductor"),
            help="what runs the rewritten graphs (default eager: whether it merges, not speed)"),
        NAME), defaults={"threads": 1, "out": "bench/results"}, renders=True),
)
BY_NAME = {study.name: study for study in STUDIES}


def options(pairs: Sequence[str]) -> dict:
    """KEY=VALUE pairs into turbo options (values parsed as Python literals when they are),
    checked against the config now rather than after minutes of measuring."""
    result = {}
    for item in pairs:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--option expects KEY=VALUE, got {item!r}")
        try:
            result[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            result[key] = text
    from turbo_fx.config import TurboConfigError, resolve_config

    try:
        resolve_config({"r": 0, **result})
    except TurboConfigError as exc:
        raise UsageError(str(exc)) from exc
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="turbo-fx", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="study", metavar="COMMAND", required=True)
    for study in STUDIES:
        p = sub.add_parser(study.name, help=study.help, description=study.help)
        out = study.defaults.get("out", DEFAULT_OUT)
        p.add_argument("--out", default=out, help=f"output folder (default: ./{out})")
        p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                       help="a turbo option for every merging configuration, e.g. alpha=0.1 (repeatable)")
        p.add_argument("--threads", type=positive, default=None, help="torch.set_num_threads")
        if study.renders:
            p.add_argument("--render", metavar="JSON", default=None,
                           help="measure nothing: rebuild the tables beside a saved result JSON")
        for flags, kwargs in study.arguments:
            p.add_argument(*flags, **kwargs)
        p.set_defaults(**study.defaults)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    study = BY_NAME[args.study]
    module = importlib.import_module(f"turbo_fx.bench.{study.module}")
    from turbo_fx.model_zoo.registry import MissingDependency

    try:
        args.options = options(args.option)
        if getattr(args, "device", "cpu") == "cuda":
            from turbo_fx.bench.timing import device_error

            if device_error("cuda"):
                raise UsageError(device_error("cuda"))
        if hasattr(module, "check"):  # the study's own argument checks, before anything loads
            module.check(args)
        if getattr(args, "render", None):
            module.render(args.render)
            return 0
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        os.makedirs(args.out, exist_ok=True)
        args.command = "turbo-fx " + " ".join(shlex.quote(a) for a in argv)
        module.run(args)
    except MissingDependency as exc:
        print(f"turbo-fx: {exc}", file=sys.stderr)
        return 1
    except UsageError as exc:
        parser.error(str(exc))  # exits with code 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
