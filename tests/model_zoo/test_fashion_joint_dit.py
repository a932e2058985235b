"""The Fashion-MNIST joint rotary DiT: shapes, the rotation's grid, that turbo merges its image
tokens (ratio 0 changes nothing, duplicated cells rotated alike give the unmerged output),
a few training steps, sampling and the weights file. Tiny configurations; no test needs the
trained weights or the data."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

pytest.importorskip("diffusers")
pytest.importorskip("safetensors")

from turbo_fx.model_zoo import fashion_diffusion as fd  # noqa: E402
from turbo_fx.model_zoo import fashion_joint_dit as jd  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# 16x16 images in 2x2 patches: an 8x8 grid of 64 image tokens; head width 16.
TINY = dict(image_size=16, dim=32, depth=2, heads=2)


def tiny_model(seed: int = 0, **overrides) -> tuple[jd.FashionJointDiT, fd.ClassTokens]:
    model, tokens = jd.build_fashion_joint_dit(seed, jd.JointDiTConfig(**{**TINY, **overrides}))
    with torch.no_grad():  # the init's zero modulations would make every block the identity
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.2)
    return model.eval(), tokens.eval()


def inputs(tokens: fd.ClassTokens, images: torch.Tensor) -> tuple:
    labels = torch.arange(len(images)) % fd.NUM_CLASSES
    return images, torch.full((len(images),), 300, dtype=torch.long), tokens(labels).detach()


def cell_duplicated_images(n: int = 2, size: int = 16, block: int = 4, seed: int = 1) -> torch.Tensor:
    """Images constant on ``block`` x ``block`` pixel blocks: with 2x2 patches, the four tokens of
    each 2x2 cell of the token grid are equal."""
    cells = torch.randn(n, 1, size // block, size // block, generator=torch.Generator().manual_seed(seed))
    return cells.repeat_interleave(block, dim=2).repeat_interleave(block, dim=3)


class SDPAShapes(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.calls.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


# --------------------------------------------------------------------------- the model


def test_output_is_an_image_and_attention_is_joint_over_image_then_class_tokens():
    model, tokens = tiny_model()
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad(), SDPAShapes() as rec:
        out = model(*inputs(tokens, x))
    assert out.shape == x.shape
    # 64 image tokens + 4 class tokens in one attention per block, [B, heads, N, head width]
    assert rec.calls == [(3, 2, 64 + fd.TOKENS_PER_LABEL, 16)] * 2


def test_default_size_is_a_16x16_token_grid_with_heads_of_32():
    cfg = jd.JointDiTConfig()
    assert cfg.grid == 16 and cfg.head_dim == 32 and cfg.head_dim % 4 == 0
    model, tokens = jd.build_fashion_joint_dit(0)
    n = sum(p.numel() for p in model.parameters())
    assert 0.5e6 < n < 2e6


def test_the_untrained_model_predicts_zero_noise():
    # adaLN-Zero: zero modulations and a zero output layer at the start
    model, tokens = jd.build_fashion_joint_dit(0, jd.JointDiTConfig(**TINY))
    with torch.no_grad():
        out = model(*inputs(tokens, torch.randn(2, 1, 16, 16)))
    assert torch.equal(out, torch.zeros_like(out))


def test_grid_angles_follow_rows_then_columns_and_cells_share_them():
    freqs = torch.tensor([1.0, 0.5])
    angles = jd.grid_angles(2, 3, freqs)
    # token (row 1, column 2) is index 5: row angles 1 * freqs, column angles 2 * freqs
    assert torch.equal(angles[5], torch.tensor([1.0, 0.5, 2.0, 1.0]))
    assert torch.equal(angles[0], torch.zeros(4))
    cells = jd.grid_angles(4, 4, freqs, cell=2)
    assert torch.equal(cells[0], cells[1]) and torch.equal(cells[0], cells[4]) and torch.equal(cells[0], cells[5])
    assert not torch.equal(cells[0], cells[2])


def test_rotated_scores_depend_only_on_the_offset_between_tokens():
    model, _ = tiny_model()
    cos, sin = model.rotation(8, 8)
    q, k = torch.randn(16), torch.randn(16)

    def rotated(v, i):
        return v * cos[i] + jd.rotate_half(v) * sin[i]

    # (0,0)->(1,2) and (3,3)->(4,5): the same offset, the same score
    a = rotated(q, 0) @ rotated(k, 1 * 8 + 2)
    b = rotated(q, 3 * 8 + 3) @ rotated(k, 4 * 8 + 5)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rotated(q, 9).norm(), q.norm())


def test_head_width_must_hold_two_rotation_axes():
    with pytest.raises(ValueError, match="divisible by 4"):
        jd.FashionJointDiT(jd.JointDiTConfig(dim=40, heads=4))


# --------------------------------------------------------------------------- under turbo


def test_turbo_merges_the_image_tokens_of_every_block_and_rotates_them_by_a_rule(turbo):
    model, tokens = tiny_model()
    args = inputs(tokens, torch.randn(2, 1, 16, 16))
    compiled = turbo(model, ratio=0.5, rotary="position")
    compiled(*args)
    report = compiled.report
    assert report.fallback_reason is None
    merged = [(c.kind, c.tokens_in, c.tokens_merged) for c in report.components if c.decision == "merges"]
    assert merged == [("self-attention", 64, 32)] * 2
    assert len(report.token_tables) == 4 and all(t.endswith(": position") for t in report.token_tables)


def test_ratio_zero_is_bit_identical_to_the_model(turbo):
    model, tokens = tiny_model()
    args = inputs(tokens, torch.randn(2, 1, 16, 16))
    with torch.no_grad():
        want = model(*args)
    assert torch.equal(turbo(model, ratio=0.0)(*args), want)


@pytest.mark.parametrize("rule, cell", [("rows", 2), ("position", 2), ("position", 1)])
def test_duplicated_cells_rotated_alike_give_the_unmerged_output(turbo, rule, cell):
    # Rotated by 2x2 cell, the four equal tokens of a cell also share their rotation: merging
    # them loses nothing and the output is the unmerged one. Rotated by token, they differ.
    model, tokens = tiny_model(rotary_cell=cell)
    args = inputs(tokens, cell_duplicated_images())
    with torch.no_grad():
        want = model(*args)
    got = turbo(model, ratio=0.5, rotary=rule)(*args)
    if cell == 2:
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    else:
        assert (got - want).abs().max() > 1e-3


class ColumnRotation(jd.FashionJointDiT):
    """Rotated by the column only: the row half of every angle is 0."""

    def rotation(self, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        angles = jd.grid_angles(rows, cols, self.frequencies)
        half = angles.shape[-1] // 2
        angles = torch.cat([torch.zeros_like(angles[:, :half]), angles[:, half:]], dim=-1)
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()


def vertically_duplicated_images(n: int = 2, size: int = 16, seed: int = 1) -> torch.Tensor:
    """Images whose token rows 2i and 2i + 1 are equal (pixel rows a, b, a, b in every band of
    four), while neighbouring columns differ."""
    bands = torch.randn(n, 1, size // 4, 2, size, generator=torch.Generator().manual_seed(seed))
    return torch.cat([bands, bands], dim=3).reshape(n, 1, size, size)


@pytest.mark.parametrize("rule", ["rows", "position"])
def test_within_a_cell_a_merged_token_keeps_the_rotation_of_its_own_members(turbo, rule):
    # In each 2x2 cell the two tokens of a column are equal and, rotated by column, share their
    # rotation; a quarter merge takes exactly those pairs (similarity 1). The output is the
    # unmerged one only if every merged and restored token gets its own column's table row
    # (a row from the cell's other column would turn it by a different angle).
    torch.manual_seed(0)
    model = ColumnRotation(jd.JointDiTConfig(**TINY))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.2)
    model.eval()
    args = inputs(fd.ClassTokens(), vertically_duplicated_images())
    with torch.no_grad():
        want = model(*args)
    compiled = turbo(model, ratio=0.25, rotary=rule)
    got = compiled(*args)
    assert [(c.tokens_in, c.tokens_merged) for c in compiled.report.components if c.decision == "merges"] == [(64, 48)] * 2
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


# --------------------------------------------------------------------------- training, sampling, weights


def test_a_few_training_steps_are_deterministic_and_return_eval_models():
    images = torch.rand(8, 1, 16, 16) * 2 - 1
    labels = torch.arange(8) % 10
    cfg = jd.JointDiTConfig(**TINY)
    runs = [jd.train(steps=3, batch_size=4, images=images, labels=labels, cfg=cfg, warmup=1, log=lambda s: None)
            for _ in range(2)]
    (m1, t1, r1), (m2, _, r2) = runs
    assert not m1.training and not t1.training
    assert r1.final_loss == r2.final_loss and r1.final_loss > 0 and len(r1.losses) == 1
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert r1.model_config["image_size"] == 16 and r1.parameters > 0


def test_the_diffusion_sampler_samples_it_from_given_noise():
    model, tokens = tiny_model()
    noise = torch.randn(2, 1, 16, 16)
    a = fd.sample(model, tokens, [3, 4], noise, steps=2)
    b = fd.sample(model, tokens, [3, 4], noise, steps=2)
    assert a.shape == noise.shape and torch.equal(a, b)
    assert float(a.min()) >= -1 and float(a.max()) <= 1


def test_weights_round_trip_with_config_and_record(tmp_path):
    model, tokens = tiny_model(rotary_cell=2)
    record = jd.TrainRecord(3, 4, 0, 1e-3, 0.1, 0.99, 1, 8, model_config=dict(model.cfg.__dict__))
    path = jd.save_fashion_joint_dit(model, tokens, tmp_path / "w.safetensors", record)
    back, back_tokens = jd.read_fashion_joint_dit(path)
    assert back.cfg == model.cfg and not back.training
    x = inputs(tokens, torch.randn(2, 1, 16, 16))
    with torch.no_grad():
        assert torch.equal(back(*x), model(*x))
    assert torch.equal(back_tokens.table, tokens.table)
    assert json.loads((tmp_path / "w.json").read_text())["steps"] == 3


def test_the_loader_reads_the_cache_without_training(tmp_path, monkeypatch):
    model, tokens = tiny_model()
    jd.save_fashion_joint_dit(model, tokens, jd.weights_path(tmp_path))
    monkeypatch.setattr(jd, "train", lambda **kw: pytest.fail("trained although weights were cached"))
    back, _ = jd.load_fashion_joint_dit(tmp_path, log=lambda s: None)
    assert back.cfg == model.cfg
