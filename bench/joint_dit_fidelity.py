"""``turbo-fx joint-dit-fidelity``: turbo's rotary rules on a trained diffusion transformer with
2D rotary positions and joint attention (``model_zoo.fashion_joint_dit``, trained here on
Fashion-MNIST: 256 image tokens in a 16x16 grid beside 4 class tokens, MMDiT-style blocks).

Merge-and-restore merges the image tokens before each joint attention and restores them after
it; a merged token needs a rotary row of its own, built by turbo's ``rotary`` rule:

* ``"rows"``: the mean of its members' cos/sin rows;
* ``"position"``: cos/sin of the mean of its members' angles (the graph computes the tables from
  angles in this model, so the rule applies).

Rows: the unmerged model (eager), then for each ratio and each rule
``torch.compile(model, backend="turbo", options={"ratio": ratio, "rotary": rule})`` with the
rewritten graph run eagerly (fidelity, not speed). Every row samples the same labels from the
same initial noise (``fashion_diffusion.sample``: DDIM with classifier-free guidance). Per row:
FLOPs per model call (counted on the compiled graph), FD to real test images in DINOv2-S space
(re-centred bootstrap interval), the class accuracy of a DINOv2-S linear probe (Wilson), and
PSNR / SSIM to the unmerged image from the same noise (bootstrap intervals)
(``bench.diffusion_fidelity``). At each ratio every further rule is compared with the first on
the same images: PSNR and SSIM (paired bootstrap), FD (both bootstraps drawn with the same
indices) and accuracy (Newcombe, exact McNemar).

Per-call error, apart from sampling: the relative L2 error of one model call against the
unmerged call, per image, on class-balanced test images noised to a few timesteps (mean over
the timesteps, then over images with a bootstrap interval). A control repeats it on the same
weights with the rotation removed (frequencies zeroed: cos 1, sin 0, where the rule cannot
matter), which separates what merging costs through positions from what it costs otherwise.
``--small`` runs a tiny untrained model
against a pixel-space reference (a smoke test of the plumbing); ``--render JSON`` rewrites the
markdown from a saved result.
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from turbo_fx.bench import diffusion_fidelity as fid
from turbo_fx.bench import output, stats, timing
from turbo_fx.bench.evaluation import compile_variant
from turbo_fx.bench.rotary_fidelity import check_rules, rules_that_ran
from turbo_fx.model_zoo import fashion_diffusion as fd
from turbo_fx.model_zoo import fashion_joint_dit as jd
from turbo_fx.report import recording

DEFAULT_RATIOS = (0.1, 0.25, 0.5, 0.75)
DEFAULT_RULES = ("rows", "position")
SMALL_CONFIG = jd.JointDiTConfig(dim=32, depth=2, heads=2)
STEM = "joint_dit_fidelity"


@dataclass(frozen=True)
class RowSpec:
    label: str
    rule: Optional[str]  # None: the unmerged model
    ratio: float
    options: dict = field(default_factory=dict)


def row_specs(ratios: Sequence[float] = DEFAULT_RATIOS, rules: Sequence[str] = DEFAULT_RULES,
              extra: Optional[dict] = None) -> list[RowSpec]:
    """The unmerged row, then every rule at each ratio (rules side by side at the same ratio).
    ``extra``: further turbo options for the merging rows."""
    extra = {k: v for k, v in (extra or {}).items() if k not in ("ratio", "rotary")}
    rows = [RowSpec("unmerged", None, 0.0)]
    for ratio in ratios:
        rows += [RowSpec(f"{rule} {ratio:g}", rule, ratio, {**extra, "ratio": ratio, "rotary": rule}) for rule in rules]
    return rows


def check(args) -> None:
    from turbo_fx.bench.cli import UsageError

    problem = check_rules(args.rules)
    if problem:
        raise UsageError(problem)
    if len(set(args.rules)) != len(args.rules):
        raise UsageError(f"--rules names a rule twice: {args.rules}")
    if args.samples % args.batch:
        raise UsageError(f"--samples {args.samples} must be a multiple of --batch {args.batch} (one graph per row)")


# ----------------------------------------------------------------------------------------
# What the compiled graph says


def graph_summary(graphs: Sequence) -> dict:
    """FLOPs before and after the rewrite (summed over the graphs), the rules the rotary
    tables got, the merging components (kind, tokens in, tokens merged) and the fallbacks."""
    tables = [t for g in graphs for t in (getattr(g, "token_tables", None) or [])]
    merges = [[c.kind, c.tokens_in, c.tokens_merged] for g in graphs for c in (g.components or [])
              if c.decision == "merges"]
    fallbacks = list(dict.fromkeys(g.fallback_reason for g in graphs if g.fallback_reason))
    return {"flops_before": float(sum(g.flops_before or 0 for g in graphs)),
            "flops_after": float(sum(g.flops_after or 0 for g in graphs)),
            "rule_ran": rules_that_ran(tables), "token_tables": len(tables), "merges": merges,
            "fallbacks": fallbacks, "run_time_failures": int(sum(g.run_time_failures for g in graphs))}


def flop_ratio(flops: Optional[float], unmerged: Optional[float]) -> Optional[float]:
    """A row's FLOPs per call as a share of the unmerged model's (None when either is unknown or 0)."""
    return flops / unmerged if flops and unmerged else None


def probe_input(tokens: fd.ClassTokens, labels: torch.Tensor, noise: torch.Tensor, batch: int) -> tuple:
    """One model call's inputs as ``fashion_diffusion.sample`` makes them: the first ``batch``
    samples twice (conditional, then null label), at timestep 500."""
    null = torch.full((batch,), tokens.null_label, dtype=torch.long)
    with torch.no_grad():
        context = torch.cat([tokens(labels[:batch]), tokens(null)])
    return torch.cat([noise[:batch]] * 2), torch.full((2 * batch,), 500, dtype=torch.long), context


def first_call_facts(fn: Callable, inputs: tuple) -> tuple[torch.Tensor, dict]:
    """Call a compiled model once (compiling it) and read its graph reports with FLOPs counted."""
    with torch.no_grad(), recording(count_flops=True) as rec:
        out = fn(*inputs)
    return out, graph_summary(rec.graphs)


def unmerged_check(model: torch.nn.Module, inputs: tuple) -> dict:
    """turbo at ratio 0 against the eager model on one call: the rewrite must change nothing."""
    with torch.no_grad():
        eager = model(*inputs)
    out, facts = first_call_facts(compile_variant(model, {"ratio": 0.0}, "eager"), inputs)
    return {"max_abs_difference": float((out - eager).abs().max()), "bit_identical": bool(torch.equal(out, eager)),
            "flops": facts["flops_before"]}


# ----------------------------------------------------------------------------------------
# Scoring


def paired_fd(fd_a: float, fd_b: float, replicates_a: Sequence[float], replicates_b: Sequence[float]) -> dict:
    """FD of A minus FD of B, with the central 95% of the replicate differences (both bootstraps
    drawn with the same indices), re-centred on the estimate as the per-row intervals are."""
    diff = np.asarray(replicates_a, dtype=np.float64) - np.asarray(replicates_b, dtype=np.float64)
    estimate = fd_a - fd_b
    low, high = stats.percentile_interval(diff - (diff.mean() - estimate))
    return {"difference": float(estimate), "low": low, "high": high, "p": stats.bootstrap_p(diff - (diff.mean() - estimate))}


def as_dict(c: stats.Comparison) -> dict:
    return {"difference": c.difference, "low": c.low, "high": c.high, "p": c.p_value, "a_only": c.a_only,
            "b_only": c.b_only}


def compare(a: dict, b: dict, seed: int = stats.SEED) -> dict:
    """Row A minus row B on the same noise: PSNR and SSIM to the unmerged images (paired
    bootstrap), FD (:func:`paired_fd`) and class accuracy (Newcombe, McNemar)."""
    out = {key: as_dict(stats.paired_bootstrap_mean(a[f"{key}_per_image"], b[f"{key}_per_image"], seed=seed))
           for key in ("psnr", "ssim")}
    out["fd"] = paired_fd(a["fd"], b["fd"], a["fd_replicates"], b["fd_replicates"])
    out["accuracy"] = as_dict(stats.paired_proportions(a["correct"], b["correct"]))
    if "call_error" in a and "call_error" in b:
        out["call_error"] = as_dict(stats.paired_bootstrap_mean(a["call_error"]["per_image"],
                                                                b["call_error"]["per_image"], seed=seed))
    return out


def compare_rules(rows: Sequence[dict], seed: int = stats.SEED) -> list[dict]:
    """At each ratio, every rule after the first against the first (A = the later rule, B = the first)."""
    merged = [r for r in rows if r["rule"] is not None]
    out = []
    for ratio in dict.fromkeys(r["ratio"] for r in merged):
        at = [r for r in merged if r["ratio"] == ratio]
        out += [{"ratio": ratio, "a": other["label"], "b": at[0]["label"], **compare(other, at[0], seed)}
                for other in at[1:]]
    return out


def score(reference: fid.FidelityReference, images: np.ndarray, labels: np.ndarray,
          baseline: Optional[np.ndarray], seed: int) -> dict:
    """``evaluate_images``' metrics plus the FD bootstrap replicates (for paired FD differences)."""
    feats = reference.featurize(images)
    result = fid.evaluate_images(reference, images, labels, baseline, features=feats, seed=seed)
    _, _, replicates = fid.frechet_bootstrap(fid.fd_part(feats, reference.fd_dims), reference.real_stats, seed=seed)
    return {**result, "fd_replicates": replicates.tolist()}


# ----------------------------------------------------------------------------------------
# Per-call error


CALL_TIMESTEPS = (900, 500, 100)


def noised_calls(tokens: fd.ClassTokens, images: torch.Tensor, labels: torch.Tensor,
                 timesteps: Sequence[int] = CALL_TIMESTEPS, seed: int = 0) -> list[tuple]:
    """One model call's inputs per timestep: ``images`` noised to it (DDPM's forward process,
    one seeded noise for all), the timestep, the labels' context tokens."""
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    scheduler = fd.ddpm_scheduler()
    with torch.no_grad():
        context = tokens(labels)
    calls = []
    for t in timesteps:
        steps = torch.full((len(images),), int(t), dtype=torch.long)
        calls.append((scheduler.add_noise(images, noise, steps), steps, context))
    return calls


def relative_errors(outputs: Sequence[torch.Tensor], references: Sequence[torch.Tensor]) -> np.ndarray:
    """Per image, ``|out - ref| / |ref|`` (L2 over the image) averaged over the calls."""
    errors = [((o - r).flatten(1).norm(dim=1) / r.flatten(1).norm(dim=1).clamp_min(1e-12)).double().numpy()
              for o, r in zip(outputs, references)]
    return np.mean(errors, axis=0)


def call_outputs(fn: Callable, calls: Sequence[tuple]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [fn(*c).float() for c in calls]


def without_rotation(model: jd.FashionJointDiT) -> jd.FashionJointDiT:
    """The same weights with every rotation angle 0 (the control of the per-call error)."""
    control = copy.deepcopy(model)
    control.frequencies.zero_()
    return control.eval()


def error_summary(errors: Sequence[float], seed: int = stats.SEED) -> dict:
    mean, interval = fid.mean_interval(errors, seed)
    return {"mean": mean, "ci": list(interval), "per_image": [float(e) for e in errors]}


def control_errors(model: jd.FashionJointDiT, calls: Sequence[tuple], ratios: Sequence[float],
                   seed: int = stats.SEED) -> list[dict]:
    """Per ratio, the per-call error of merging the rotation-free copy of ``model``."""
    control = without_rotation(model)
    reference = call_outputs(control, calls)
    out = []
    for ratio in ratios:
        errors = relative_errors(call_outputs(compile_variant(control, {"ratio": ratio}, "eager"), calls), reference)
        out.append({"ratio": ratio, **error_summary(errors, seed)})
    return out


# ----------------------------------------------------------------------------------------
# The whole study


def call_images(n: int, seed: int, given: Optional[tuple] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Model-range test images ``[n, 1, 32, 32]`` and their labels for the per-call error."""
    if given is not None:
        return torch.as_tensor(given[0], dtype=torch.float32), torch.as_tensor(given[1], dtype=torch.long)
    from turbo_fx.model_zoo.data import fashion_mnist

    images, labels = fashion_mnist("test", limit=n, seed=seed + 1)
    return fd.to_model_range(images), torch.from_numpy(labels).long()


def sample_row(fn: Callable, tokens: fd.ClassTokens, labels: torch.Tensor, noise: torch.Tensor, steps: int,
               guidance: float, batch: int) -> np.ndarray:
    with torch.no_grad():
        return fid.generate(fn, tokens, labels, noise, steps, guidance, batch)


def study(samples: int = 200, steps: int = 20, guidance: float = 2.5, ratios: Sequence[float] = DEFAULT_RATIOS,
          rules: Sequence[str] = DEFAULT_RULES, seed: int = 0, batch: int = 50, extra_options: Optional[dict] = None,
          model: Optional[torch.nn.Module] = None, tokens: Optional[fd.ClassTokens] = None,
          reference: Optional[fid.FidelityReference] = None, training: Optional[dict] = None,
          call_samples: int = 50, images_for_calls: Optional[tuple] = None,
          log: Callable[[str], None] = print) -> dict:
    """Every row of :func:`row_specs`, sampled from the same noise and scored (see the module
    docstring). ``model``/``tokens`` default to the trained stand-in (trained first if not
    cached), ``reference`` to ``fashion_reference`` at 112 px. The per-call error uses
    ``call_samples`` class-balanced test images, or ``images_for_calls`` (model-range images
    ``[n, 1, H, W]``, labels) when given."""
    problem = check_rules(rules)
    if problem:
        raise ValueError(problem)
    if model is None:
        model, tokens = jd.load_fashion_joint_dit(log=log)
        training = jd.read_record() if training is None else training
    model = model.eval()
    labels, noise = fd.balanced_labels(samples), fd.noise_for(samples, seed)
    inputs = probe_input(tokens, labels, noise, batch)
    payload = {"settings": {"samples": samples, "steps": steps, "guidance": guidance, "ratios": list(ratios),
                            "rules": list(rules), "seed": seed, "batch": batch, "extra_options": extra_options or {},
                            "model_config": dict(model.cfg.__dict__), "tokens": model.cfg.grid ** 2},
               "machine": timing.machine(), "training": training, "labels": labels.tolist(),
               "unmerged_check": unmerged_check(model, inputs), "rows": []}
    calls = noised_calls(tokens, *call_images(call_samples, seed, images_for_calls), seed=seed)
    call_reference = call_outputs(model, calls)
    images = {}
    for spec in row_specs(ratios, rules, extra_options):
        started = time.perf_counter()
        facts = {}
        fn = model
        if spec.rule is not None:
            fn = compile_variant(model, spec.options, "eager")
            _, facts = first_call_facts(fn, inputs)
        images[spec.label] = sample_row(fn, tokens, labels, noise, steps, guidance, batch)
        if spec.rule is not None:
            facts["call_error"] = error_summary(relative_errors(call_outputs(fn, calls), call_reference), seed)
        row = {"label": spec.label, "rule": spec.rule, "ratio": spec.ratio, "options": spec.options, **facts,
               "sample_seconds": round(time.perf_counter() - started, 1)}
        payload["rows"].append(row)
        log(f"{spec.label}: sampled in {row['sample_seconds']:.0f} s, rule ran {facts.get('rule_ran', '-')}, "
            f"merges {len(facts.get('merges', []))}, fallbacks {facts.get('fallbacks', [])}")
    reference = fid.fashion_reference(resolution=112, n_train=1000, log=log) if reference is None else reference
    payload["reference"] = reference.description
    base = images["unmerged"]
    unmerged_flops = payload["unmerged_check"]["flops"]
    for row in payload["rows"]:
        started = time.perf_counter()
        row.update(score(reference, images[row["label"]], labels.numpy(), None if row["rule"] is None else base, seed))
        row["flop_ratio"] = 1.0 if row["rule"] is None else flop_ratio(row.get("flops_after"), unmerged_flops)
        row["score_seconds"] = round(time.perf_counter() - started, 1)
        log(fid.summary_line(row["label"], row))
    payload["comparisons"] = compare_rules(payload["rows"], seed)
    payload["control"] = control_errors(model, calls, ratios, seed)
    payload["call_timesteps"], payload["call_images"] = list(CALL_TIMESTEPS), len(calls[0][0])
    payload["images"] = images
    return payload


def pixel_reference(seed: int = 0, n: int = 40, pool: int = 8) -> fid.FidelityReference:
    """A reference in pixel space for the smoke test: ``pool`` x ``pool`` average-pooled pixels as
    features, random real statistics and a probe fit on random features (no data, no DINOv2)."""
    rng = np.random.default_rng(seed)
    dims = pool * pool

    def featurize(images: Any) -> np.ndarray:
        x = torch.as_tensor(fid.as_images(images))[:, None]
        return torch.nn.functional.adaptive_avg_pool2d(x, pool).flatten(1).numpy()

    labels = np.arange(n) % fd.NUM_CLASSES
    return fid.make_reference(rng.normal(size=(n, dims)), rng.normal(size=(n, dims)), labels, featurize, None,
                              f"pixel space ({pool}x{pool} pooled), random reference statistics: a smoke test")


def small_model(seed: int = 0) -> tuple[jd.FashionJointDiT, fd.ClassTokens]:
    """The tiny untrained model of ``--small``: every matrix drawn at 0.2 (the init's zero
    modulations would make every block the identity, and merging change nothing)."""
    model, tokens = jd.build_fashion_joint_dit(seed, SMALL_CONFIG)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model.eval(), tokens.eval()


# ----------------------------------------------------------------------------------------
# Writing


def ci(value: float, interval: Sequence[float], spec: str, scale: float = 1.0) -> str:
    return f"{scale * value:{spec}} [{scale * interval[0]:{spec}}, {scale * interval[1]:{spec}}]"


def diff(c: dict, digits: int, scale: float = 1.0, with_p: bool = True) -> str:
    """``+0.12 [-0.03, +0.27], p=0.110``, bold when the interval excludes 0."""
    text = output.difference(c, digits, scale) + (f", p={output.p_value(c['p'])}" if with_p else "")
    return f"**{text}**" if c["low"] > 0 or c["high"] < 0 else text


def table_rows(payload: dict) -> list[list[str]]:
    body = []
    for r in payload["rows"]:
        merged = r["rule"] is not None
        flops = r.get("flops_after") if merged else payload["unmerged_check"]["flops"]
        share = f" ({r['flop_ratio']:.3f})" if r.get("flop_ratio") is not None else ""
        body.append([
            r["label"], ", ".join(r.get("rule_ran") or []) or "-",
            f"{flops / 1e9:.3f}{share}" if flops else "-",
            ci(r["fd"], r["fd_ci"], ".1f"), ci(r["accuracy"], r["accuracy_ci"], ".1f", 100),
            ci(r["psnr"], r["psnr_ci"], ".2f") if merged else "-",
            ci(r["ssim"], r["ssim_ci"], ".3f") if merged else "-",
            ci(r["call_error"]["mean"], r["call_error"]["ci"], ".3f") if "call_error" in r else "-",
        ])
    return body


HEADERS = ["configuration", "rule ran", "GFLOPs per call (ratio)", "FD [95%]", "class accuracy % [95%]",
           "PSNR to unmerged dB [95%]", "SSIM to unmerged [95%]", "per-call error [95%]"]
COMPARISON_HEADERS = ["ratio", "A − B", "PSNR dB [95%], p", "SSIM [95%], p", "FD [95%]",
                      "accuracy points [95%], p (x:y)", "per-call error [95%], p"]


def comparison_rows(payload: dict) -> list[list[str]]:
    return [[f"{c['ratio']:g}", f"{c['a']} − {c['b']}", diff(c["psnr"], 2), diff(c["ssim"], 4),
             diff(c["fd"], 1, with_p=False),
             diff(c["accuracy"], 1, 100) + f" ({c['accuracy']['a_only']}:{c['accuracy']['b_only']})",
             diff(c["call_error"], 3) if "call_error" in c else "-"]
            for c in payload["comparisons"]]


def control_rows(payload: dict) -> list[list[str]]:
    """Per ratio: the per-call error of each rule, and of the rotation-free control."""
    body = []
    for c in payload.get("control", []):
        merged = [r for r in payload["rows"] if r["rule"] is not None and r["ratio"] == c["ratio"] and "call_error" in r]
        body.append([f"{c['ratio']:g}", *(ci(r["call_error"]["mean"], r["call_error"]["ci"], ".3f") for r in merged),
                     ci(c["mean"], c["ci"], ".3f")])
    return body


def markdown(payload: dict) -> str:
    s, t, check_ = payload["settings"], payload.get("training") or {}, payload["unmerged_check"]
    cfg = s["model_config"]
    trained = (f"Trained here ({t.get('steps')} steps of {t.get('batch_size')} images, {t.get('seconds')} s, final "
               f"loss {t.get('final_loss')})." if t else "Untrained weights.")
    fallbacks = [f"- {r['label']}: " + "; ".join(r["fallbacks"]) for r in payload["rows"] if r.get("fallbacks")]
    lines = output.header(
        "Rotary rules under merge-and-restore: a joint-attention rotary DiT trained on Fashion-MNIST", payload,
        f"Model: `model_zoo.fashion_joint_dit` ({s['tokens']} image tokens in a {cfg['image_size'] // cfg['patch_size']}"
        f"-square grid beside 4 class tokens in joint attention, {cfg['depth']} blocks, width {cfg['dim']}, "
        f"{cfg['heads']} heads, 2D RoPE on the image queries and keys from grid angles). {trained}",
        f"{s['samples']} samples (labels 0-9 in turn, noise seed {s['seed']}), {s['steps']} DDIM steps, guidance "
        f"{s['guidance']}, every row from the same noise; merged rows compiled with `inner_backend=eager`. "
        f"Reference: {payload.get('reference', '')}. turbo at ratio 0 against the eager model on one call: "
        f"bit-identical {check_['bit_identical']} (largest difference {check_['max_abs_difference']:.1e}).",
        "FD: re-centred bootstrap over the generated images (200 resamples). Class accuracy: Wilson. PSNR and "
        "SSIM to the unmerged image from the same noise: mean and percentile bootstrap. GFLOPs per model call "
        f"(a batch of {2 * s['batch']}: conditional and null halves), counted on the compiled graph.",
    )
    lines += [output.table(HEADERS, table_rows(payload)), ""]
    if payload["comparisons"]:
        lines += ["## Rules compared on the same noise", "",
                  "A − B: positive means A is higher (for FD, further from the real images). PSNR, SSIM: paired "
                  "bootstrap; FD: both bootstraps drawn with the same indices; accuracy: Newcombe and exact "
                  "McNemar, (x:y) = samples only A / only B gets right. Bold: the interval excludes 0.", "",
                  output.table(COMPARISON_HEADERS, comparison_rows(payload)), ""]
    if payload.get("control"):
        rules = s["rules"]
        lines += ["## Per-call error with and without the rotation", "",
                  "Relative L2 error of one model call against the unmerged call, per image (mean over timesteps "
                  f"{', '.join(map(str, payload.get('call_timesteps', CALL_TIMESTEPS)))}), on "
                  f"{payload.get('call_images', '')} class-balanced test images noised to each timestep; mean and "
                  "bootstrap 95% interval. Control: the same weights with every rotation angle 0 (cos 1, sin 0), "
                  "merged at the same ratio and compared with its own unmerged call.", "",
                  output.table(["ratio", *(f"`{r}`" for r in rules), "no rotation (control)"], control_rows(payload)),
                  ""]
    if fallbacks:
        lines += ["Fallbacks (compiled unmerged):", *fallbacks, ""]
    seconds = sum(r.get("sample_seconds", 0) + r.get("score_seconds", 0) for r in payload["rows"])
    lines += [f"Sampling and scoring took {seconds / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def render(path: str) -> str:
    """Rewrite the markdown beside a result JSON of this study from the JSON alone."""
    return output.render_markdown(path, markdown)


def first_of_each_class(labels: Sequence[int], classes: int = fd.NUM_CLASSES) -> list[int]:
    """The index of the first sample of each class present, in class order."""
    labels = np.asarray(labels)
    return [int(np.flatnonzero(labels == c)[0]) for c in range(classes) if np.any(labels == c)]


def run(args) -> dict:
    small = getattr(args, "small", False)
    model = tokens = reference = given = None
    if small:
        model, tokens = small_model(args.seed)
        reference = pixel_reference(args.seed)
        gen = torch.Generator().manual_seed(args.seed)
        given = (torch.rand(4, 1, 32, 32, generator=gen) * 2 - 1, torch.arange(4))
    payload = study(args.samples, args.steps, args.guidance, args.ratios, args.rules, args.seed, args.batch,
                    getattr(args, "options", None), model=model, tokens=tokens, reference=reference,
                    images_for_calls=given, log=timing.log)
    payload["command"] = args.command
    payload["settings"]["small"] = small
    images = payload.pop("images")
    stem = STEM + ("_small" if small else "")
    output.write(payload, args.out, stem, markdown, compress=True)
    first = first_of_each_class(payload["labels"])
    fid.save_grid({name: np.asarray(imgs)[first] for name, imgs in images.items()},
                  os.path.join(args.out, stem + "_samples.png"))
    return payload
