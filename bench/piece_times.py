"""Where a turbo forward's time goes when it is compiled block by block: the wall time of the
compute pieces, of the merge pieces and of everything else (the split module's own Python,
turbo's run-time guard), against plain Inductor's forward and the FLOP-ideal time.

    python -m turbo_fx.bench.piece_times --model deit_small_patch16_224 --r 13 --batch 8

One process; the two compiled models run in interleaved rounds, medians over the rounds.
Each piece is timed by wrapping ``block_compile._Piece.forward`` for the timed rounds only
(two ``perf_counter`` calls per piece, about a microsecond each, counted in the pieces).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import statistics
import time
from typing import Iterator, Optional, Sequence

import torch

from . import timing


@contextlib.contextmanager
def piece_clock() -> Iterator[collections.defaultdict]:
    """Seconds spent in compiled pieces while the block runs, by piece kind."""
    from turbo_fx import block_compile

    spent: collections.defaultdict = collections.defaultdict(float)
    real = block_compile._Piece.forward

    def timed(self, *args):
        start = time.perf_counter()
        try:
            return real(self, *args)
        finally:
            spent[self.kind] += time.perf_counter() - start

    block_compile._Piece.forward = timed
    try:
        yield spent
    finally:
        block_compile._Piece.forward = real


def measure(model: torch.nn.Module, x: torch.Tensor, r: int, rounds: int) -> dict:
    """Median milliseconds per forward: Inductor, turbo, and turbo's compute and merge
    pieces and the rest; the FLOP ratio and the FLOP-ideal time from ``turbo_fx.explain``."""
    import turbo_fx

    inductor = torch.compile(copy.deepcopy(model), backend="inductor")
    turbo = torch.compile(copy.deepcopy(model), backend="turbo", options={"r": r})
    samples: dict = collections.defaultdict(list)
    with torch.no_grad():
        for fn in (inductor, turbo):
            fn(x)
            fn(x)
        for i in range(rounds):
            order = [("inductor", inductor), ("turbo", turbo)][:: 1 if i % 2 == 0 else -1]
            for label, fn in order:
                with piece_clock() as spent:
                    start = time.perf_counter()
                    fn(x)
                    samples[label].append(time.perf_counter() - start)
                if label == "turbo":
                    for kind in ("compute", "merge"):
                        samples[kind].append(spent[kind])
                    samples["other"].append(samples["turbo"][-1] - spent["compute"] - spent["merge"])
    explained = turbo_fx.explain(model, x, r=r)
    ratio = explained.flops_after / explained.flops_before
    result = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
    result.update(flop_ratio=ratio, ideal=result["inductor"] * ratio)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    timing.add_model_arguments(p, "deit_small_patch16_224", batch=8, threads=2)
    p.add_argument("--rounds", type=int, default=10)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, x = timing.seeded_timm_model(args.model, args.batch)
    m = measure(model, x, args.r, args.rounds)
    print(timing.machine_line())
    print(f"{args.model} r={args.r} batch {args.batch}, medians of {args.rounds} interleaved rounds:")
    print(f"  Inductor {m['inductor']:.1f} ms; turbo {m['turbo']:.1f} ms "
          f"(FLOP-ideal {m['ideal']:.1f} ms, FLOP ratio {m['flop_ratio']:.3f}, "
          f"FLOP efficiency {m['ideal'] / m['turbo']:.3f})")
    print(f"  turbo's compute pieces {m['compute']:.1f} ms, merge pieces {m['merge']:.1f} ms, "
          f"the rest {m['other']:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
