"""The Fashion-MNIST diffusion stand-in: architecture, class tokens, training objective, sampling, caching.

No test trains to completion or needs the cached weights: the models here are freshly initialised.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

pytest.importorskip("diffusers")
pytest.importorskip("safetensors")

from turbo_fx.model_zoo import fashion_diffusion as fd  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models():
    unet, tokens = fd.init_models(seed=0)
    return unet.eval(), tokens.eval()


class SDPAShapes(TorchFunctionMode):
    """Records (query tokens, key tokens, heads, head dim) of every scaled_dot_product_attention call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            q, k = args[0], args[1]
            self.calls.append((q.shape[-2], k.shape[-2], q.shape[1], q.shape[-1]))
        return func(*args, **(kwargs or {}))


def test_unet_cross_attends_to_class_tokens_at_1024_and_256_tokens(models):
    unet, tokens = models
    labels = torch.tensor([0, 7])
    with torch.no_grad(), SDPAShapes() as rec:
        out = unet(torch.zeros(2, 1, 32, 32), torch.tensor([10, 10]), tokens(labels)).sample
    assert out.shape == (2, 1, 32, 32)
    counts = {}
    for q, k, heads, dim in rec.calls:
        counts[(q, k)] = counts.get((q, k), 0) + 1
    t = fd.TOKENS_PER_LABEL
    # One transformer block per down layer (1) and per up layer (layers_per_block + 1 = 2) at each of
    # 32x32 and 16x16, one in the 8x8 mid block; each has a self- and a cross-attention.
    assert counts == {(1024, 1024): 3, (1024, t): 3, (256, 256): 3, (256, t): 3, (64, 64): 1, (64, t): 1}
    # Heads: 16 channels at 32x32 in one head, 32 at 16x16 in one, 64 at 8x8 in two of 32.
    assert {(q, heads, dim) for q, _, heads, dim in rec.calls} == {(1024, 1, 16), (256, 1, 32), (64, 2, 32)}
    n_params = sum(p.numel() for p in unet.parameters())
    assert 0.5e6 < n_params < 2e6  # a few MB of float32 weights


def test_class_tokens_shapes_null_label_and_range():
    tokens = fd.ClassTokens()
    assert tokens.null_label == fd.NULL_LABEL == 10
    out = tokens(torch.tensor([0, 3, 10, 3]))
    assert out.shape == (4, fd.TOKENS_PER_LABEL, fd.CROSS_ATTENTION_DIM) == (4, 4, 64)
    assert torch.equal(out[1], out[3])  # same label, same tokens
    assert not torch.allclose(out[0], out[2])  # the null label has its own tokens
    assert torch.equal(out[2], tokens.table[10])
    assert sum(p.numel() for p in tokens.parameters()) == 11 * 4 * 64
    with pytest.raises(ValueError):
        tokens(torch.tensor([11]))
    with pytest.raises(ValueError):
        tokens(torch.tensor([-1]))


def test_to_model_range_pads_fashion_images_with_background():
    img = np.zeros((2, 28, 28), dtype=np.uint8)
    img[0, 0, 0], img[1, 27, 27] = 255, 255
    x = fd.to_model_range(img)
    assert x.shape == (2, 1, 32, 32) and x.dtype == torch.float32
    assert x[0, 0, 2, 2] == 1.0 and x[1, 0, 29, 29] == 1.0  # 2-pixel border on each side
    assert float(x.sum()) == pytest.approx(-1.0 * (2 * 1024 - 2) + 2.0)  # everything else is -1


def test_label_dropout_rate_and_learning_rate_schedule():
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(20000) % 10
    dropped = fd.drop_labels(labels, 0.1, gen)
    null = dropped == fd.NULL_LABEL
    assert abs(float(null.float().mean()) - 0.1) < 0.01  # 3 standard errors at n = 20000 is 0.006
    assert torch.equal(dropped[~null], labels[~null])
    assert fd.learning_rate(0, 100, 1.0, warmup=10) == pytest.approx(0.1)
    assert fd.learning_rate(10, 100, 1.0, warmup=10) == pytest.approx(1.0)
    assert fd.learning_rate(100, 100, 1.0, warmup=10) == pytest.approx(0.05)


def test_diffusion_loss_is_the_epsilon_objective():
    scheduler = fd.ddpm_scheduler()
    gen = torch.Generator().manual_seed(1)
    x0, noise = torch.rand(3, 1, 32, 32, generator=gen) * 2 - 1, torch.randn(3, 1, 32, 32, generator=gen)
    t = torch.tensor([0, 500, 999])
    seen = {}

    def fake_unet(noisy, timesteps, context):
        seen["noisy"], seen["t"], seen["context"] = noisy, timesteps, context
        return torch.zeros_like(noisy)

    loss = fd.diffusion_loss(fake_unet, fd.ClassTokens(), scheduler, x0, torch.tensor([1, 2, 10]), noise, t)
    assert float(loss) == pytest.approx(float((noise ** 2).mean()), rel=1e-6)
    # The noised input is sqrt(abar) x0 + sqrt(1 - abar) noise with abar from the cosine schedule
    # (Nichol & Dhariwal): abar(t) = f(t) / f(0), f(t) = cos^2(((t + 1) / 1000 + 0.008) / 1.008 * pi / 2).
    def f(s):
        return math.cos((s / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - f(i + 1) / f(i), 0.999) for i in range(1000)]
    abar = np.cumprod(1 - np.array(betas))
    for row, step in enumerate(t.tolist()):
        expected = math.sqrt(abar[step]) * x0[row] + math.sqrt(1 - abar[step]) * noise[row]
        torch.testing.assert_close(seen["noisy"][row], expected.float(), atol=1e-5, rtol=1e-5)
    assert seen["context"].shape == (3, 4, 64)


def test_a_few_training_steps_reduce_the_loss_on_a_fixed_batch_and_repeat_exactly():
    gen = torch.Generator().manual_seed(2)
    images = (torch.rand(8, 1, 32, 32, generator=gen) > 0.5).float() * 2 - 1
    labels = torch.arange(8) % 10
    noise = torch.randn(8, 1, 32, 32, generator=gen)
    t = torch.randint(100, 900, (8,), generator=gen)
    scheduler = fd.ddpm_scheduler()

    def loss_of(unet, tokens):
        with torch.no_grad():
            return float(fd.diffusion_loss(unet, tokens, scheduler, images, labels, noise, t))

    before = loss_of(*fd.init_models(seed=0))
    kwargs = dict(batch_size=8, lr=3e-3, seed=0, images=images, labels=labels, label_dropout=0.0, ema_decay=0.0,
                  warmup=1, log=lambda _: None)
    unet, tokens, record = fd.train(steps=12, **kwargs)
    after = loss_of(unet, tokens)
    assert after < 0.7 * before, (before, after)
    assert record.steps == 12 and record.seed == 0 and len(record.losses) == 1 and math.isfinite(record.final_loss)
    assert not unet.training and not tokens.training

    a, _, _ = fd.train(steps=2, **kwargs)
    b, _, _ = fd.train(steps=2, **kwargs)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


class CountingUNet:
    """Wraps a UNet and records the batch size and timestep type of every call."""

    def __init__(self, unet):
        self.unet, self.calls = unet, []

    def __call__(self, sample, timestep, encoder_hidden_states):
        self.calls.append((sample.shape[0], type(timestep), tuple(timestep.shape), encoder_hidden_states.shape[0]))
        return self.unet(sample, timestep, encoder_hidden_states)


def test_sampling_is_deterministic_batched_with_the_null_half_and_in_range(models):
    unet, tokens = models
    noise = fd.noise_for(2, seed=3)
    assert torch.equal(noise, fd.noise_for(2, seed=3))
    counting = CountingUNet(unet)
    images, outputs = fd.sample(counting, tokens, [4, 9], noise, steps=3, guidance=2.0, return_steps=True)
    assert images.shape == (2, 1, 32, 32)
    assert float(images.min()) >= -1.0 and float(images.max()) <= 1.0
    assert counting.calls == [(4, torch.Tensor, (4,), 4)] * 3  # one call of batch 2B per step, timestep a tensor
    assert len(outputs) == 3 and all(o.shape == (4, 1, 32, 32) for o in outputs)
    again = fd.sample(unet, tokens, [4, 9], noise, steps=3, guidance=2.0)
    assert torch.equal(images, again)
    assert not torch.equal(noise, fd.noise_for(2, seed=4))
    # Guidance 0 keeps only the null half, so the labels stop mattering: it equals sampling with
    # the null label itself (whose conditional and null halves coincide) at any guidance.
    zero = fd.sample(unet, tokens, [4, 9], noise, steps=2, guidance=0.0)
    null = fd.sample(unet, tokens, [10, 10], noise, steps=2, guidance=3.0)
    torch.testing.assert_close(zero, null, atol=1e-5, rtol=0)


def test_sampling_accepts_a_unet_returning_a_tensor_and_first_steps_from_pure_noise(models):
    unet, tokens = models
    timesteps = []

    def tensor_unet(sample, timestep, context):
        timesteps.append(int(timestep[0]))
        return unet(sample, timestep, context).sample

    images = fd.sample(tensor_unet, tokens, [1], fd.noise_for(1), steps=2)
    assert timesteps == [999, 499]  # "trailing" DDIM spacing starts at the last training step
    assert torch.equal(images, fd.sample(unet, tokens, [1], fd.noise_for(1), steps=2))
    with pytest.raises(ValueError):
        fd.sample(unet, tokens, [1, 2], fd.noise_for(1), steps=2)


def test_saved_weights_load_back_without_training(tmp_path, models, monkeypatch):
    unet, tokens = models
    record = fd.TrainRecord(steps=0, batch_size=1, seed=0, lr=0.0, label_dropout=0.1, ema_decay=0.0, threads=1,
                            train_images=0, seconds=1.5, final_loss=0.25)
    path = fd.save_fashion_diffusion(unet, tokens, fd.weights_path(tmp_path), record)
    assert path == tmp_path / fd.WEIGHTS_NAME and path.stat().st_size < 8e6
    info = json.loads(fd.record_path(path).read_text())
    assert info["steps"] == 0 and info["seed"] == 0 and info["final_loss"] == 0.25 and info["seconds"] == 1.5
    monkeypatch.setattr(fd, "train", lambda **kw: pytest.fail("must not train when weights are cached"))
    unet2, tokens2 = fd.load_fashion_diffusion(cache_dir=tmp_path, log=lambda _: None)
    assert not unet2.training and not tokens2.training
    for (name, a), b in zip(unet.state_dict().items(), unet2.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(tokens.table, tokens2.table)


def test_a_compiled_unet_compiles_once_for_all_sampling_steps(models):
    unet, tokens = models
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(unet, backend=counting_backend)
    images = fd.sample(compiled, tokens, [2, 5], fd.noise_for(2), steps=3)
    assert len(graphs) == 1  # the timestep is a tensor input, not a constant baked into the graph
    torch.testing.assert_close(images, fd.sample(unet, tokens, [2, 5], fd.noise_for(2), steps=3), atol=1e-5, rtol=0)
