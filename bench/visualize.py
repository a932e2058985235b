"""Which image patches merged together, block by block (the paper's supplementary figures).

    visualize_merges(model, image, options={"r": 8}, path="merges.png")

The model is compiled with the turbo backend (its rewritten graph run eagerly) and
run once inside ``turbo_fx.ops.record_merges()``. Each merge record's ``assign``
says where every original token is after that block; the tokens after the
protected prefix (CLS, distillation, registers) are the patch grid, so each patch
gets the index of the merged token it went into. Patches that share one are a
group: groups of one patch stay uncoloured, larger groups get a colour and a
border.
"""
from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from turbo_fx import ops
from turbo_fx.config import TurboConfig, resolve_config
from turbo_fx.report import GraphReport, recording

DEFAULT_PANELS = 4
GROUP_ALPHA = 0.55
GOLDEN = 0.618033988749895  # hue step: consecutive groups get far-apart hues


class NoMergesError(RuntimeError):
    """The turbo backend merged no token in the model (it fell back, or r merges nothing)."""


@dataclass
class MergeVisualization:
    """What ``visualize_merges`` drew: one entry per panel."""

    path: str
    blocks: list[int]
    tokens: list[int]  # tokens after each drawn block's merge, prefix included
    groups: list[np.ndarray] = field(repr=False)  # [gh, gw] group id per patch
    protected: int = 0
    grid: tuple[int, int] = (0, 0)

    @property
    def panels(self) -> int:
        return len(self.blocks)


# ---- pure functions ----------------------------------------------------------------


def merge_groups(assign_row: Any, protected: int, grid_hw: tuple[int, int]) -> np.ndarray:
    """Group id per patch, [gh, gw], from one sample's ``assign`` row [N0] (the merged
    index of every original token). Ids are 0.. in order of the merged tokens; the
    first ``protected`` original tokens are not patches and are left out."""
    row = np.asarray(assign_row, dtype=np.int64).reshape(-1)
    gh, gw = grid_hw
    patches = row[protected:]
    if patches.size != gh * gw:
        raise ValueError(f"{patches.size} patch tokens ({row.size} tokens, {protected} protected) do not fill a {gh}x{gw} grid")
    # Merged tokens keep their order, so ranking the distinct indices gives compact ids.
    _, ids = np.unique(patches, return_inverse=True)
    return ids.reshape(gh, gw)


def group_sizes(groups: np.ndarray) -> np.ndarray:
    """Patches per group id (``np.bincount`` over the grid)."""
    return np.bincount(np.asarray(groups).reshape(-1))


def infer_grid(n_patches: int, image_hw: tuple[int, int], patch_size: Optional[int] = None) -> tuple[int, int]:
    """(rows, columns) of the patch grid: from the patch size when given, else the
    grid whose shape matches the image's aspect ratio (square images: sqrt)."""
    height, width = image_hw
    if patch_size is not None:
        grid = (height // patch_size, width // patch_size)
    else:
        rows = max(1, round(math.sqrt(n_patches * height / width)))
        grid = (rows, n_patches // rows)
    if grid[0] * grid[1] != n_patches:
        raise ValueError(
            f"cannot lay {n_patches} patch tokens on a grid for a {height}x{width} image "
            f"(tried {grid[0]}x{grid[1]}); pass patch_size="
        )
    return grid


def group_colours(groups: np.ndarray) -> np.ndarray:
    """RGBA [gh, gw, 4]: transparent for single patches, one hue per larger group."""
    sizes = group_sizes(groups)
    rgba = np.zeros(groups.shape + (4,), dtype=np.float64)
    for rank, gid in enumerate(np.flatnonzero(sizes > 1)):
        rgb = colorsys.hsv_to_rgb((rank * GOLDEN) % 1.0, 0.85, 0.95)
        rgba[groups == gid] = (*rgb, GROUP_ALPHA)
    return rgba


def group_borders(groups: np.ndarray, cell_hw: tuple[float, float]) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """Line segments (in pixels) between neighbouring patches of different groups
    where at least one side is a group of several patches."""
    sizes = group_sizes(groups)
    multi = sizes[groups] > 1
    ch, cw = cell_hw
    segments = []
    rows, cols = groups.shape
    for i in range(rows):
        for j in range(cols):
            if j + 1 < cols and groups[i, j] != groups[i, j + 1] and (multi[i, j] or multi[i, j + 1]):
                x = (j + 1) * cw
                segments.append(((x, i * ch), (x, (i + 1) * ch)))
            if i + 1 < rows and groups[i, j] != groups[i + 1, j] and (multi[i, j] or multi[i + 1, j]):
                y = (i + 1) * ch
                segments.append(((j * cw, y), ((j + 1) * cw, y)))
    return segments


def displayable(image: torch.Tensor) -> np.ndarray:
    """A model input [C, H, W] as an image to draw: each channel stretched to [0, 1]."""
    pixels = image.detach().float().cpu()
    low = pixels.amin(dim=(-1, -2), keepdim=True)
    high = pixels.amax(dim=(-1, -2), keepdim=True)
    pixels = (pixels - low) / (high - low).clamp_min(1e-12)
    if pixels.shape[0] == 3:
        return pixels.permute(1, 2, 0).numpy()
    return pixels[0].numpy()  # one channel (or an odd count): draw the first in grey


def default_blocks(merged_blocks: Sequence[int], count: int = DEFAULT_PANELS) -> list[int]:
    """Up to ``count`` merging blocks spread over depth, first and last included."""
    if len(merged_blocks) <= count:
        return list(merged_blocks)
    picks = np.linspace(0, len(merged_blocks) - 1, count).round().astype(int)
    return [merged_blocks[i] for i in dict.fromkeys(picks.tolist())]


# ---- running the model -----------------------------------------------------------------


def _eager_config(options: Union[None, dict, TurboConfig]) -> TurboConfig:
    # The rewritten graph runs as Python: merges record, and nothing waits on Inductor.
    return resolve_config(options).replace(inner_backend="eager")


def _run_and_record(model: Any, batch: torch.Tensor, config: TurboConfig):
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend="turbo", options=config)
        with recording() as rec, ops.record_merges() as merges, torch.no_grad():
            compiled(batch)
    finally:
        torch._dynamo.reset()
    return rec.graphs, merges


def _merging_graph(graphs: list[GraphReport], merges: list) -> GraphReport:
    rewritten = [g for g in graphs if g.rewritten]
    if merges and rewritten:
        return rewritten[0]
    if not graphs:
        why = "no graph was compiled"
    elif any(g.fallback_reason for g in graphs):
        why = "; ".join(f"graph {g.graph_index} fell back: {g.fallback_reason}" for g in graphs if g.fallback_reason)
    elif rewritten:
        why = "the rewritten graph ran no merge (fuse_merges=True generates merges that cannot be recorded)"
    else:
        why = "the options merge no token in this model (r=0, or min_tokens above the token count)"
    raise NoMergesError(f"visualize_merges: turbo merged no token: {why}")


def _assign_after(block: int, merges: list, n_tokens: int) -> tuple[np.ndarray, int]:
    """Sample 0's assign row and token count after attention block ``block``."""
    done = [m for m in merges if m.block <= block]
    if not done:
        return np.arange(n_tokens), n_tokens
    last = done[-1]
    return last.assign[0].numpy(), last.tokens_out


# ---- drawing ---------------------------------------------------------------------------


def _draw_panel(ax, picture: np.ndarray, groups: np.ndarray, title: str) -> None:
    from matplotlib.collections import LineCollection

    height, width = picture.shape[:2]
    cell = (height / groups.shape[0], width / groups.shape[1])
    ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None, extent=(0, width, height, 0))
    ax.imshow(group_colours(groups), extent=(0, width, height, 0), interpolation="nearest")
    borders = group_borders(groups, cell)
    if borders:
        ax.add_collection(LineCollection(borders, colors="white", linewidths=1.2))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_title(title, fontsize="medium")
    ax.set_axis_off()


def visualize_merges(
    model: Any,
    image: torch.Tensor,
    *,
    options: Union[None, dict, TurboConfig] = None,
    blocks: Optional[Sequence[int]] = None,
    display_image: Optional[np.ndarray] = None,
    patch_size: Optional[int] = None,
    path: str,
) -> MergeVisualization:
    """Draw which patches of ``image`` ([C, H, W] or [1, C, H, W], as the model takes
    it) turbo merged together, one panel per attention block in ``blocks`` (default:
    up to four merging blocks spread over depth). ``display_image`` (uint8 HxWx3 or
    HxW) is drawn instead of the stretched input. Raises ``NoMergesError`` when the
    backend merged nothing, with the reason from its report."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, Agg canvas

    batch = image if image.dim() == 4 else image.unsqueeze(0)
    graphs, merges = _run_and_record(model, batch, _eager_config(options))
    graph = _merging_graph(graphs, merges)
    protected = graph.protected or 0
    n_tokens = merges[0].assign.shape[1]
    grid = infer_grid(n_tokens - protected, tuple(batch.shape[-2:]), patch_size)

    n_blocks = len(graph.blocks)
    chosen = list(blocks) if blocks is not None else default_blocks(sorted({m.block for m in merges}))
    bad = [b for b in chosen if not 0 <= b < n_blocks]
    if bad or not chosen:
        raise ValueError(f"blocks {bad or chosen} not in the model's attention blocks 0..{n_blocks - 1}")

    picture = np.asarray(display_image) if display_image is not None else displayable(batch[0])
    cols = min(len(chosen), DEFAULT_PANELS)
    rows = math.ceil(len(chosen) / cols)
    fig = Figure(figsize=(3.0 * cols, 3.2 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).reshape(-1)
    groups, tokens = [], []
    for ax, block in zip(axes, chosen):
        row, count = _assign_after(block, merges, n_tokens)
        grid_groups = merge_groups(row, protected, grid)
        groups.append(grid_groups)
        tokens.append(count)
        _draw_panel(ax, picture, grid_groups, f"block {block}: {count} tokens")
    for ax in axes[len(chosen):]:
        ax.set_axis_off()
    fig.savefig(path, dpi=100)
    return MergeVisualization(str(path), chosen, tokens, groups, protected, grid)


# ---- ``turbo-fx visualize`` ------------------------------------------------------------------


def load_image(spec: str) -> np.ndarray:
    """A photo name (``model_zoo.data.sample_photos``), ``fashion-mnist:<index>`` or an image file."""
    import os

    from turbo_fx.model_zoo import data

    if spec.startswith("fashion-mnist:"):
        images, _ = data.fashion_mnist("test")
        return images[int(spec.split(":", 1)[1])]
    if os.path.exists(spec):
        from skimage import io

        return np.asarray(io.imread(spec))
    photos = data.sample_photos()
    if spec not in photos:
        from turbo_fx.bench.cli import UsageError

        raise UsageError(f"--image {spec!r} is not a file, 'fashion-mnist:<i>' or one of {sorted(photos)}")
    return photos[spec]


def run(args) -> None:
    """One PNG per ``--image``: the merges of ``--model`` at ``--r`` over the picture."""
    import os

    from turbo_fx.bench import output, timing
    from turbo_fx.bench.cli import UsageError
    from turbo_fx.model_zoo import dinov2
    from turbo_fx.model_zoo.registry import build_model

    zoo = build_model(args.model)
    if zoo.kind != "vision":
        raise UsageError(f"--model {args.model} is not a vision model")
    for spec in args.image:
        picture = load_image(spec)
        pixels = dinov2.dinov2_preprocess(picture, size=zoo.image_size or 224)
        name = os.path.splitext(os.path.basename(spec))[0].replace(":", "_")
        path = os.path.join(args.out, f"merges_{output.file_stem(args.model)}_{name}_r{args.r}.png")
        result = visualize_merges(zoo.model, pixels, options={**args.options, "r": args.r}, blocks=args.blocks,
                                  display_image=picture, path=path)
        timing.log(f"{spec}: blocks {result.blocks}, tokens {result.tokens}; wrote {path}")

