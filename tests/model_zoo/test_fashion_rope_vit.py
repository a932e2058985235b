"""The Fashion-MNIST RoPE ViT: shapes, the rotation's math (CLS unrotated, tables are rotations,
angles from the grid), that the graph computes cos/sin from angles, a short training run and the
weights cache. Everything runs on tiny configurations; no test needs the trained weights."""
from __future__ import annotations

import json
import math

import pytest
import torch

from turbo_fx.model_zoo import fashion_rope_vit as rv

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = rv.RopeViTConfig(dim=32, depth=2, heads=2)  # head width 16: 4 frequencies per axis


def tiny_model(seed: int = 0, **overrides) -> rv.FashionRopeViT:
    cfg = rv.RopeViTConfig(**{**TINY.__dict__, **overrides})
    model = rv.build_fashion_rope_vit(seed, cfg).eval()
    with torch.no_grad():  # larger weights than the init, so that positions visibly matter
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.2)
    return model


def images(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- shapes


def test_logits_have_one_row_per_image_and_the_sequence_is_cls_plus_49_patches():
    model = tiny_model()
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    with torch.no_grad():
        logits = model(images(3))
    assert logits.shape == (3, rv.NUM_CLASSES)
    assert seen == [torch.Size([3, 50, 32])]
    assert rv.RopeViTConfig().grid == 7 and rv.RopeViTConfig().head_dim == 24


def test_default_size_is_a_small_vit():
    cfg = rv.RopeViTConfig()
    assert 96 <= cfg.dim <= 128 and cfg.depth == 6 and cfg.heads == 4 and cfg.head_dim % 4 == 0


def test_preprocess_standardises_uint8_images_into_one_channel():
    raw = torch.full((2, 28, 28), 255, dtype=torch.uint8).numpy()
    x = rv.preprocess(raw)
    assert x.shape == (2, 1, 28, 28) and x.dtype == torch.float32
    assert torch.allclose(x, torch.full_like(x, (1 - rv.PIXEL_MEAN) / rv.PIXEL_STD))
    with pytest.raises(ValueError, match="expected"):
        rv.preprocess(raw[0])


# --------------------------------------------------------------------------- the rotation


def test_tables_are_rotations_built_from_grid_angles():
    rotary = rv.GridRotary(head_dim=16, base=10.0)
    cos, sin = rotary(7, 7)
    assert cos.shape == sin.shape == (49, 16)
    assert torch.allclose(cos ** 2 + sin ** 2, torch.ones_like(cos), atol=1e-6)
    angles = rotary.angles(7, 7)
    freqs = 10.0 ** (-torch.arange(4) / 4)
    # Token 7 * i + j sits at row i, column j: row angles first, then column angles.
    for i, j in ((0, 0), (2, 5), (6, 6)):
        assert torch.allclose(angles[7 * i + j], torch.cat([i * freqs, j * freqs]))
    # Both members of a pair (c, c + D/2) turn by the same angle.
    assert torch.allclose(cos, torch.cat([angles.cos(), angles.cos()], -1))
    assert torch.allclose(sin, torch.cat([angles.sin(), angles.sin()], -1))


def test_rotation_keeps_pair_norms_and_is_relative():
    rotary = rv.GridRotary(head_dim=16)
    cos, sin = rotary(7, 7)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(49, 16, generator=g), torch.randn(49, 16, generator=g)
    rq, rk = rv.apply_rotation(q, cos, sin), rv.apply_rotation(k, cos, sin)
    pair_norm = lambda x: x[:, :8] ** 2 + x[:, 8:] ** 2  # noqa: E731
    assert torch.allclose(pair_norm(rq), pair_norm(q), atol=1e-5)
    # RoPE's point: a rotated score depends on the offset between the two positions only. The
    # same q and k placed at (0, 0)/(2, 3) and at (4, 1)/(6, 4) give the same score.
    qa, ka = rv.apply_rotation(q[:1], cos[0:1], sin[0:1]), rv.apply_rotation(k[:1], cos[17:18], sin[17:18])
    qb, kb = rv.apply_rotation(q[:1], cos[29:30], sin[29:30]), rv.apply_rotation(k[:1], cos[46:47], sin[46:47])
    assert torch.allclose((qa * ka).sum(), (qb * kb).sum(), atol=1e-5)


def test_the_cls_token_is_not_rotated_and_the_patches_are():
    cos, sin = rv.GridRotary(head_dim=16)(7, 7)
    x = torch.randn(2, 3, 50, 16, generator=torch.Generator().manual_seed(0))
    out = rv.rotate_patches(x, cos, sin)
    assert torch.equal(out[:, :, 0], x[:, :, 0])
    assert torch.allclose(out[:, :, 1:], x[:, :, 1:] * cos + rv.rotate_half(x[:, :, 1:]) * sin)
    assert not torch.allclose(out[:, :, 2:], x[:, :, 2:])  # every patch but the first (angle 0) moved


def test_zero_angles_equal_the_model_without_rotary():
    rotated, plain = tiny_model(), tiny_model(rotary=False)
    plain.load_state_dict(rotated.state_dict())
    x = images(2)
    with torch.no_grad():
        assert not torch.allclose(rotated(x), plain(x), atol=1e-4)  # positions do matter
        rotated.rotary.frequencies.zero_()  # every angle 0: cos 1, sin 0
        assert torch.allclose(rotated(x), plain(x), atol=1e-6)


def test_without_rotation_the_model_is_blind_to_patch_order_and_with_it_is_not():
    """Position enters through the rotation only: shuffling the patch tokens (their tables kept
    in grid order) leaves the CLS output of a rotary-off model unchanged and changes it with
    the rotation."""
    plain = tiny_model(rotary=False)
    x = images(2)
    patches = plain.patch_embed(x).flatten(2).transpose(1, 2)
    perm = torch.randperm(49, generator=torch.Generator().manual_seed(0))
    # Run the blocks on permuted patch tokens by hand: the same CLS output without rotation.
    def cls_out(model, tokens, cos=None, sin=None):
        h = torch.cat([model.cls_token.expand(len(tokens), -1, -1), tokens], 1)
        for block in model.blocks:
            h = block(h, cos, sin)
        return model.head(model.norm(h[:, 0]))
    with torch.no_grad():
        assert torch.allclose(cls_out(plain, patches), cls_out(plain, patches[:, perm]), atol=1e-5)
        rotated = tiny_model()
        cos, sin = rotated.rotary(7, 7)
        patches = rotated.patch_embed(x).flatten(2).transpose(1, 2)
        assert not torch.allclose(cls_out(rotated, patches, cos, sin), cls_out(rotated, patches[:, perm], cos, sin),
                                  atol=1e-4)
        assert torch.allclose(cls_out(rotated, patches, cos, sin), rotated(x), atol=1e-6)


def test_the_graph_computes_cos_and_sin_from_angles_and_no_table_is_stored():
    model = tiny_model()
    assert [name for name, _ in model.named_buffers()] == ["rotary.frequencies"]
    assert not any("cos" in k or "sin" in k or "frequencies" in k for k in model.state_dict())
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=capture)(images(2))
    assert len(graphs) == 1
    targets = {n.target for n in graphs[0].graph.nodes if n.op in ("call_method", "call_function")}
    assert {"cos", "sin"} <= {getattr(t, "__name__", t) for t in targets}
    assert any(getattr(t, "__name__", "") == "arange" for t in targets)


def test_head_width_must_split_into_four():
    with pytest.raises(ValueError, match="divisible by 4"):
        rv.GridRotary(head_dim=18)


# --------------------------------------------------------------------------- training and the cache


def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random template per class plus noise: learnable in a few steps."""
    templates = torch.randn(10, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(n) % 10
    return templates[labels] + 0.5 * torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed)), labels


def test_a_short_training_run_lowers_the_loss_and_records_itself():
    x, y = synthetic(320, seed=1)
    logs = []
    model, record = rv.train(steps=40, batch_size=32, lr=3e-3, images=x, labels=y, cfg=TINY, warmup=5, log_every=10,
                             test=synthetic(100, seed=2), log=logs.append)
    assert not model.training
    assert [step for step, _ in record.losses] == [10, 20, 30, 40]
    first, last = record.losses[0][1], record.losses[-1][1]
    assert first > 1.5 and last < 0.7 * first
    assert record.test_images == 100 and record.test_accuracy > 0.5
    assert record.seconds > 0 and math.isfinite(record.final_loss)
    assert record.model_config["dim"] == 32 and record.threads == 1
    assert len(logs) == 5 and logs[-1].startswith("test top-1")


def test_training_is_deterministic_in_the_seed():
    x, y = synthetic(64, seed=1)
    a, _ = rv.train(steps=3, batch_size=16, images=x, labels=y, cfg=TINY, warmup=1, log=lambda s: None)
    b, _ = rv.train(steps=3, batch_size=16, images=x, labels=y, cfg=TINY, warmup=1, log=lambda s: None)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_weights_round_trip_and_the_loader_reads_the_cache_without_training(tmp_path, monkeypatch):
    model = tiny_model()
    record = rv.TrainRecord(1, 2, 0, 1e-3, 0.05, 1, 10, model_config=model.cfg.__dict__)
    path = rv.save_fashion_rope_vit(model, rv.weights_path(tmp_path), record)
    assert path.name == f"fashion_rope_vit_v{rv.WEIGHTS_VERSION}.safetensors"
    assert json.loads(rv.record_path(path).read_text())["steps"] == 1
    monkeypatch.setattr(rv, "train_and_save", lambda *a, **k: pytest.fail("must not train with a cached file"))
    loaded = rv.load_fashion_rope_vit(tmp_path)
    assert loaded.cfg == model.cfg and not loaded.training
    x = images(2)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert rv.read_record(tmp_path)["batch_size"] == 2


def test_a_file_of_another_weights_version_is_refused(tmp_path, monkeypatch):
    path = rv.save_fashion_rope_vit(tiny_model(), tmp_path / "w.safetensors")
    monkeypatch.setattr(rv, "WEIGHTS_VERSION", rv.WEIGHTS_VERSION + 1)
    with pytest.raises(ValueError, match="weights version"):
        rv.read_fashion_rope_vit(path)


def test_the_loader_trains_and_caches_when_nothing_is_cached(tmp_path, monkeypatch):
    calls = []

    def fake_train_and_save(path, steps, log):
        calls.append(steps)
        model = tiny_model()
        rec = rv.TrainRecord(steps, 2, 0, 1e-3, 0.05, 1, 10, seconds=1.0, final_loss=0.5, test_accuracy=0.9)
        rv.save_fashion_rope_vit(model, path, rec)
        return model, rec

    monkeypatch.setattr(rv, "train_and_save", fake_train_and_save)
    model = rv.load_fashion_rope_vit(tmp_path, steps=7, log=lambda s: None)
    assert calls == [7] and model.cfg == TINY
    rv.load_fashion_rope_vit(tmp_path, log=lambda s: None)
    assert calls == [7]


# --------------------------------------------------------------------------- under turbo


def test_turbo_merges_the_patch_tokens_and_protects_the_cls_token(turbo):
    model = tiny_model()
    compiled = turbo(model, r=4)
    x = images(2)
    out = compiled(x)
    report = compiled.report
    assert report.fallback_reason is None
    assert report.tokens_per_block == [50, 46]
    assert report.protected == 1
    assert out.shape == (2, rv.NUM_CLASSES)


def test_the_registry_builds_it_by_name_with_real_test_images(tmp_path):
    from turbo_fx.model_zoo import registry
    from turbo_fx.model_zoo.data import DatasetUnavailable

    assert "fashion-rope-vit" in registry.list_models()
    rv.save_fashion_rope_vit(tiny_model(), rv.weights_path(tmp_path))
    zoo = registry.build_model("fashion-rope-vit", cache_dir=tmp_path)
    assert zoo.real_weights and zoo.kind == "vision" and zoo.model.cfg == TINY
    assert (zoo.image_size, zoo.patch_size) == (28, 4)
    random = registry.build_model("fashion-rope-vit", pretrained=False)
    assert not random.real_weights and random.model.cfg == rv.RopeViTConfig()
    try:
        (x,) = zoo.example_inputs(batch=4, seed=0)
    except DatasetUnavailable as exc:
        pytest.skip(str(exc))
    assert x.shape == (4, 1, 28, 28)
    with torch.no_grad():
        assert zoo.model(x).shape == (4, rv.NUM_CLASSES)
