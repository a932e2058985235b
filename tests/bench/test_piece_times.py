"""The piece-time benchmark (bench/piece_times.py): its clock sees every compiled piece of a
split forward by kind, and puts the pieces back as they were."""
from __future__ import annotations

import torch

from model_builders import images, small_vit
from turbo_fx import block_compile
from turbo_fx.bench import piece_times

DEPTH, R = 4, 3


def test_the_clock_times_every_compute_and_merge_piece_and_then_lets_go(monkeypatch):
    model = small_vit("vit", patch_size=4, depth=DEPTH)
    compiled = torch.compile(model, backend="turbo", options={"r": R})
    x = images(2)
    calls = []
    real = block_compile._Piece.forward

    def counting(self, *args):
        calls.append(self.kind)
        return real(self, *args)

    with torch.no_grad():
        compiled(x)
        monkeypatch.setattr(block_compile._Piece, "forward", counting)
        with piece_times.piece_clock() as spent:
            compiled(x)
        assert block_compile._Piece.forward is counting  # the clock's wrapper is gone
    # DEPTH merges; DEPTH + 1 compute pieces (the stem with the first attention, one per block, the head).
    assert sorted(calls) == ["compute"] * (DEPTH + 1) + ["merge"] * DEPTH
    assert spent["compute"] > 0 and spent["merge"] > 0 and set(spent) == {"compute", "merge"}
