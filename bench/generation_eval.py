"""``turbo-fx diffusion-fidelity``: the Fashion-MNIST diffusion stand-in (weights trained here,
``model_zoo.fashion_diffusion``) sampled unmerged, with tomesd and with turbo's
merge-and-restore mode, every configuration from the same initial noise and labels.

Rows:
- ``baseline``: the unmerged UNet;
- ``tomesd r``: ``tomesd.apply_patch(unet, ratio=r)`` with its defaults (self-attention only,
  the top resolution, 2 x 2 cells, random destinations);
- ``turbo-sa r``: turbo merging the same components as tomesd (self-attention, the top
  resolution): the same FLOPs as tomesd at the same ratio, plus the semantic value and the
  ``log(size)`` bias;
- ``redundancy-sa r``: the same without the semantic value (``semantic=False``);
- ``turbo-all r``: the paper's choice, every component of the block (fewer FLOPs);
- ``turbo-sa r alpha a`` (``--alpha-sweep``, at ``--sweep-ratio``): ``turbo-sa`` with another
  weight on the semantic value, paired with ``redundancy-sa`` of the same ratio.

Each row has FLOPs per UNet call, FD (DINOv2-S) against real test images, class accuracy by a
DINOv2 probe, and PSNR / SSIM against the baseline image from the same noise, all with 95%
intervals (``bench.diffusion_fidelity``); each turbo row is also compared, paired, with the
tomesd row of the same ratio.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from turbo_fx.bench import diffusion_fidelity as fid
from turbo_fx.bench import output, stats, timing
from turbo_fx.bench.diffusion_speed import apply_tomesd
from turbo_fx.bench.timing import fresh_copy

SELF_ATTENTION_ONLY = {"merge_components": ("self-attention",)}
ALL_COMPONENTS = {"merge_components": ("self-attention", "cross-attention", "feed-forward")}


def row_specs(ratios: Sequence[float], alpha: float, alpha_sweep: Sequence[float] = (),
              sweep_ratio: Optional[float] = None) -> list[tuple[str, str, dict]]:
    """(name, kind, turbo options) of every row, baseline first. Every turbo row names its
    components explicitly, so that a change of turbo's default cannot turn two rows into one."""
    rows = [("baseline", "baseline", {})]
    for r in ratios:
        rows += [
            (f"tomesd {r}", "tomesd", {"ratio": r}),
            (f"turbo-sa {r}", "turbo", {"ratio": r, "alpha": alpha, **SELF_ATTENTION_ONLY}),
            (f"redundancy-sa {r}", "turbo", {"ratio": r, "semantic": False, **SELF_ATTENTION_ONLY}),
            (f"turbo-all {r}", "turbo", {"ratio": r, "alpha": alpha, **ALL_COMPONENTS}),
        ]
    if alpha_sweep:
        if sweep_ratio not in ratios:
            raise ValueError(f"the alpha sweep's ratio {sweep_ratio} must be one of the ratios {list(ratios)}")
        rows += [(f"turbo-sa {sweep_ratio} alpha {a}", "turbo",
                  {"ratio": sweep_ratio, "alpha": a, **SELF_ATTENTION_ONLY}) for a in alpha_sweep if a != alpha]
    return rows


def redundancy_partner(options: dict) -> Optional[str]:
    """The ``redundancy-sa`` row a self-attention turbo row with the semantic value is paired with."""
    if options.get("semantic", True) is False or options.get("merge_components") != SELF_ATTENTION_ONLY["merge_components"]:
        return None
    return f"redundancy-sa {options['ratio']}"


def build(kind: str, unet: torch.nn.Module, options: dict, seed: int) -> Callable:
    """The UNet callable of one row (the rewritten graph runs eagerly: fidelity, not speed)."""
    if kind == "baseline":
        return unet
    if kind == "tomesd":
        model = apply_tomesd(fresh_copy(unet), options["ratio"])
        model._tome_info["args"]["generator"] = torch.Generator().manual_seed(seed)
        return model
    torch._dynamo.reset()
    return torch.compile(fresh_copy(unet), backend="turbo", options={**options, "inner_backend": "eager"})


def unet_flops(fn: Callable, sample_input: tuple, kind: str) -> int:
    """FLOPs of one UNet call. A turbo model is counted by the backend on its rewritten graph
    (``recording(count_flops=True)`` at the first call): calling a compiled model under
    FlopCounterMode makes Dynamo run it eagerly, unmerged, from then on in the process."""
    from torch.utils.flop_counter import FlopCounterMode

    import turbo_fx.flops  # noqa: F401  (the CPU SDPA formula)
    from turbo_fx.report import recording

    with torch.no_grad():
        if kind == "turbo":
            with recording(count_flops=True) as rec:
                fn(*sample_input)
            return sum(g.flops_after or 0 for g in rec.graphs)
        with FlopCounterMode(display=False) as counter:
            fn(*sample_input)
    return counter.get_total_flops()


def paired_with(result: dict, other: dict, seed: int) -> dict:
    """Row minus ``other`` on the same noise: accuracy (Newcombe interval, McNemar p), FD (the
    bootstrap replicates of both drawn with the same indices) and PSNR."""
    acc = stats.paired_proportions(result["correct"], other["correct"])
    fd_diff = np.asarray(result["fd_replicates"]) - np.asarray(other["fd_replicates"])
    psnr = stats.paired_bootstrap_mean(result["psnr_per_image"], other["psnr_per_image"], seed=seed)
    return {
        "accuracy": [acc.difference, acc.low, acc.high, acc.p_value],
        "fd": [result["fd"] - other["fd"], *stats.percentile_interval(fd_diff)],
        "psnr": [psnr.difference, psnr.low, psnr.high, psnr.p_value],
    }


def study(samples: int, steps: int, guidance: float, ratios: Sequence[float], alpha: float, seed: int,
        batch: int, reference: Optional[fid.FidelityReference] = None, log: Callable[[str], None] = print,
        alpha_sweep: Sequence[float] = (), sweep_ratio: Optional[float] = None) -> dict:
    from turbo_fx.model_zoo import fashion_diffusion as fd

    unet, tokens = fd.load_fashion_diffusion()
    labels, noise = fd.balanced_labels(samples), fd.noise_for(samples, seed)
    reference = fid.fashion_reference() if reference is None else reference
    probe_input = (torch.cat([noise[:batch]] * 2), torch.full((2 * batch,), 500, dtype=torch.long),
                   torch.cat([tokens(labels[:batch]), tokens(torch.full((batch,), fd.NULL_LABEL))]))
    rows, images = {}, {}
    for name, kind, options in row_specs(ratios, alpha, alpha_sweep, sweep_ratio):
        started = time.perf_counter()
        fn = build(kind, unet, options, seed)
        flops = unet_flops(fn, probe_input, kind)
        with torch.no_grad():
            images[name] = fid.generate(fn, tokens, labels, noise, steps, guidance, batch)
        rows[name] = {"kind": kind, "options": options, "flops": flops, "seconds": time.perf_counter() - started}
        log(f"{name}: {flops / 1e9:.2f} GFLOPs per UNet call, sampled in {rows[name]['seconds']:.0f} s")
    for name, imgs in images.items():
        feats = reference.featurize(imgs)
        baseline = images["baseline"] if name != "baseline" else None
        result = fid.evaluate_images(reference, imgs, labels, baseline, features=feats, seed=seed)
        _, _, replicates = fid.frechet_bootstrap(fid.fd_part(feats, reference.fd_dims), reference.real_stats, seed=seed)
        rows[name].update(result, fd_replicates=replicates.tolist())
        log(fid.summary_line(name, result))
    for row in rows.values():
        if row["kind"] == "turbo":
            row["vs_tomesd"] = paired_with(row, rows[f"tomesd {row['options']['ratio']}"], seed)
        partner = redundancy_partner(row["options"]) if row["kind"] == "turbo" else None
        if partner in rows:
            row["vs_redundancy"] = paired_with(row, rows[partner], seed)
    return {"rows": rows, "images": images, "labels": labels.tolist(), "reference": reference.description,
            "settings": {"samples": samples, "steps": steps, "guidance": guidance, "ratios": list(ratios),
                         "alpha": alpha, "alpha_sweep": list(alpha_sweep), "sweep_ratio": sweep_ratio,
                         "seed": seed}, "machine": timing.machine()}


def _ci(value: float, ci: Sequence[float], spec: str) -> str:
    return f"{value:{spec}} [{ci[0]:{spec}}, {ci[1]:{spec}}]"


def markdown(payload: dict) -> str:
    rows = payload["rows"]
    base_flops = rows["baseline"]["flops"]
    table = []
    for name, row in rows.items():
        table.append([
            name, f"{row['flops'] / 1e9:.2f} ({row['flops'] / base_flops:.3f})",
            _ci(row["fd"], row["fd_ci"], ".1f"), _ci(100 * row["accuracy"], [100 * v for v in row["accuracy_ci"]], ".1f"),
            _ci(row["psnr"], row["psnr_ci"], ".2f") if name != "baseline" else "-",
            _ci(row["ssim"], row["ssim_ci"], ".3f") if name != "baseline" else "-",
        ])
    head = ["configuration", "GFLOPs per call (ratio)", "FD", "class accuracy %", "PSNR to baseline dB", "SSIM to baseline"]
    paired = []
    for name, row in rows.items():
        for key, other in (("vs_tomesd", "tomesd"), ("vs_redundancy", "redundancy-sa")):
            if key in row:
                v = {k: dict(zip(("difference", "low", "high", "p"), x)) for k, x in row[key].items()}
                paired.append([f"{name} - {other}", f"{output.difference(v['accuracy'], 1, 100)}, p={v['accuracy']['p']:.2f}",
                               output.difference(v["fd"], 1), f"{output.difference(v['psnr'], 2)}, p={v['psnr']['p']:.3f}"])
    s = payload["settings"]
    title = (f"Generation fidelity: Fashion-MNIST diffusion stand-in ({s['samples']} samples, {s['steps']} DDIM "
             f"steps, guidance {s['guidance']}, alpha {s['alpha']})")
    return "\n".join(output.header(title, payload, payload["reference"]) + [
        output.table(head, table), "",
        "Paired on the same noise and labels, at the same ratio (first minus second, 95% interval; "
        "accuracy: Newcombe interval and exact McNemar p; FD: the two bootstraps drawn with the same "
        "indices; PSNR to baseline: paired bootstrap):", "",
        output.table(["comparison", "accuracy points", "FD", "PSNR dB"], paired), ""])


def check(args) -> None:
    from turbo_fx.bench.cli import UsageError

    try:  # the rows' own check, before the model loads (or trains, when not cached)
        row_specs(args.ratios, args.alpha, args.alpha_sweep, args.sweep_ratio)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def run(args) -> dict:
    payload = study(args.samples, args.steps, args.guidance, args.ratios, args.alpha, args.seed, args.batch,
                    alpha_sweep=args.alpha_sweep, sweep_ratio=args.sweep_ratio, log=timing.log)
    payload["command"] = args.command
    data = {k: v for k, v in payload.items() if k != "images"}
    data["rows"] = {name: {k: v for k, v in row.items() if k != "fd_replicates"} for name, row in payload["rows"].items()}
    output.write(data, args.out, "generation_fidelity", markdown, compress=True)
    labels = np.asarray(payload["labels"])
    first = [int(np.flatnonzero(labels == c)[0]) for c in range(10)]
    grid = {name: np.asarray(imgs)[first] for name, imgs in payload["images"].items()
            if name == "baseline" or name.endswith(" 0.5")}
    fid.save_grid(grid, os.path.join(args.out, "generation_samples.png"))
    return payload
