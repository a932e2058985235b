"""The Fashion-MNIST caption decoder on DINOv2: vocabulary, shapes, causality, turbo's cross-attention
path, training and caching. Everything runs on a tiny random Dinov2Model and a tiny decoder; no
test needs the real weights or the cached features."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

tf = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from turbo_fx.model_zoo import fashion_captioner as fc  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = fc.DecoderConfig(image_dim=48, width=32, heads=2, layers=2)


def tiny_vision(patch: int = 14, image: int = 56, zero_positions: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    config = tf.Dinov2Config(hidden_size=48, num_hidden_layers=3, num_attention_heads=3, intermediate_size=96,
                             image_size=image, patch_size=patch, use_mask_token=False)
    model = tf.Dinov2Model(config).eval()
    if zero_positions:
        with torch.no_grad():
            model.embeddings.position_embeddings.zero_()
    return model


def tiny_captioner(**vision) -> fc.FashionCaptioner:
    decoder = fc.init_decoder(seed=1, cfg=TINY)
    return fc.FashionCaptioner(tiny_vision(**vision), decoder).eval()


# --------------------------------------------------------------------------- vocabulary


def test_vocabulary_holds_the_twelve_caption_words_after_the_special_tokens():
    v = fc.VOCAB
    assert v.words[:3] == ("<pad>", "<bos>", "<eos>") and (fc.PAD, fc.BOS, fc.EOS) == (0, 1, 2)
    assert v.words[3:] == ("t-shirt", "top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                           "sneaker", "bag", "ankle", "boot")
    assert len(v) == 15 and v.sequence_length == fc.SEQUENCE_LENGTH == 4


def test_every_caption_encodes_and_decodes_back_and_its_first_word_names_its_class():
    v = fc.VOCAB
    assert v.encode("ankle boot") == [fc.BOS, 13, 14, fc.EOS]
    assert v.encode("bag") == [fc.BOS, 12, fc.EOS, fc.PAD]
    for label, caption in enumerate(fc.CAPTIONS):
        ids = v.encode(caption)
        assert v.decode(ids) == caption
        assert v.class_of(ids[1]) == label
    assert v.class_of(v.index["top"]) == -1 and v.class_of(fc.EOS) == -1
    # Generated ids: reading stops at EOS; stray special tokens stay visible.
    assert v.decode([v.index["coat"], fc.EOS, v.index["bag"]]) == "coat"
    assert v.decode([v.index["coat"], fc.PAD]) == "coat <pad>"
    with pytest.raises(ValueError, match="not in the vocabulary"):
        v.encode("hat")
    with pytest.raises(ValueError, match="1 to 2 words"):
        v.encode("ankle boot top")


def test_teacher_forcing_shifts_the_encoded_captions_by_one():
    seq = fc.VOCAB.caption_ids([9, 1])
    assert seq.tolist() == [[1, 13, 14, 2], [1, 5, 2, 0]]
    input_ids, targets = fc.teacher_forcing(seq)
    assert input_ids.tolist() == [[1, 13, 14], [1, 5, 2]]
    assert targets.tolist() == [[13, 14, 2], [5, 2, 0]]


# --------------------------------------------------------------------------- the model


def test_the_default_decoder_is_a_few_megabytes_and_cross_attends_to_384_wide_tokens():
    decoder = fc.CaptionDecoder()
    params = sum(p.numel() for p in decoder.parameters())
    assert 1.5e6 < params < 3e6, params  # 2 layers of width 256: about 9 MB in fp32
    assert decoder.layers[0].cross_attn.kv.in_features == 384
    logits = decoder(torch.tensor([[fc.BOS, 5, 2]]), torch.randn(1, 257, 384))
    assert logits.shape == (1, 3, 15)


def test_forward_gives_logits_per_position_and_only_earlier_tokens_reach_a_position():
    model = tiny_captioner()
    pixels = torch.randn(2, 3, 56, 56)
    ids = torch.tensor([[fc.BOS, 5, 2], [fc.BOS, 13, 14]])
    with torch.no_grad():
        logits = model(pixels, ids)
        changed_last = model(pixels, torch.tensor([[fc.BOS, 5, 9], [fc.BOS, 13, 3]]))
        other_image = model(torch.randn(2, 3, 56, 56), ids)
    assert logits.shape == (2, 3, len(fc.VOCAB))
    # Causal self-attention: the last token changes only the last position's logits.
    assert torch.allclose(logits[:, :2], changed_last[:, :2], atol=1e-6)
    assert not torch.allclose(logits[:, 2], changed_last[:, 2], atol=1e-4)
    # Cross-attention: every position reads the image.
    assert not torch.allclose(logits[:, 0], other_image[:, 0], atol=1e-4)
    assert not any(p.requires_grad for p in model.vision.parameters())


def test_under_turbo_the_image_merges_and_both_cross_attention_sites_read_the_merged_tokens(turbo):
    model = tiny_captioner()
    pixels, ids = torch.randn(2, 3, 56, 56), fc.teacher_forcing(fc.VOCAB.caption_ids([0, 9]))[0]
    compiled = turbo(model, r=2)
    out = compiled(pixels, ids)
    report = compiled.report
    assert report.fallback_reason is None
    assert report.tokens_per_block == [17, 15, 13]
    decisions = {s.module: s.decision for s in report.sites}
    assert decisions == {
        "vision.encoder.layer.0.attention": "merges", "vision.encoder.layer.1.attention": "merges",
        "vision.encoder.layer.2.attention": "merges",
        "decoder.layers.0.self_attn": "untouched", "decoder.layers.1.self_attn": "untouched",
        "decoder.layers.0.cross_attn": "reads merged", "decoder.layers.1.cross_attn": "reads merged",
    }
    assert "log-size key bias" in {s.module: s.reason for s in report.sites}["decoder.layers.0.cross_attn"]
    assert out.shape == (2, 3, len(fc.VOCAB))
    with torch.no_grad():
        assert not torch.allclose(out, model(pixels, ids), atol=1e-5)  # merged tokens do change the logits


def two_pattern_pixels(batch: int = 2) -> torch.Tensor:
    """32x32 pixels in 4-px patches: pattern A in 48 patches, pattern B in the top 16 (two rows)."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(batch, 3, 4, 4, generator=g), torch.randn(batch, 3, 4, 4, generator=g)
    grid = a.repeat(1, 1, 8, 8)
    grid[:, :, :8, :] = b.repeat(1, 1, 2, 8)
    return grid


def test_over_duplicate_image_tokens_the_size_bias_gives_the_unmerged_logits_and_no_bias_does_not(turbo):
    # No position embeddings: patches of one pattern give identical tokens, which merge exactly.
    model = tiny_captioner(patch=4, image=32, zero_positions=True)
    pixels, ids = two_pattern_pixels(), fc.teacher_forcing(fc.VOCAB.caption_ids([3, 9]))[0]
    with torch.no_grad():
        plain = model(pixels, ids)
    biased = turbo(model, r=8)
    out = biased(pixels, ids)
    assert biased.report.tokens_per_block == [65, 57, 49]
    assert torch.allclose(out, plain, atol=1e-4), (out - plain).abs().max()
    unbiased = turbo(model, r=8, cross_attention_bias=False)
    out_unbiased = unbiased(pixels, ids)
    assert unbiased.report.tokens_per_block == [65, 57, 49]
    assert not torch.allclose(out_unbiased, plain, atol=1e-3)


# --------------------------------------------------------------------------- training and caching


def class_features(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image tokens [n, 9, 48] whose mean carries the label, plus noise."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(10, 1, 48, generator=torch.Generator().manual_seed(99))
    labels = torch.arange(n) % 10
    return centres[labels] + 0.5 * torch.randn(n, 9, 48, generator=g), labels


def test_training_a_few_steps_lowers_the_caption_loss_and_is_deterministic():
    features, labels = class_features(200, seed=0)
    held_out = class_features(50, seed=1)
    untrained = fc.score_features(fc.init_decoder(seed=0, cfg=TINY), *held_out)
    decoder, record = fc.train(features, labels, steps=60, batch_size=32, cfg=TINY, validation=held_out,
                               warmup=5, log_every=20, log=lambda s: None)
    assert untrained["loss"] > 2.0  # about log(15) before training
    assert record.validation["loss"] < 0.7 * untrained["loss"]
    assert record.validation["exact_match"] > untrained["exact_match"] + 0.3
    assert [step for step, _ in record.losses] == [20, 40, 60]
    assert record.losses[-1][1] < record.losses[0][1]
    assert record.train_images == 200 and record.validation_images == 50 and record.steps == 60
    again, _ = fc.train(features, labels, steps=60, batch_size=32, cfg=TINY, warmup=5, log=lambda s: None)
    for (name, p), q in zip(decoder.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), name


def test_saved_weights_load_back_identically_with_their_record(tmp_path, monkeypatch):
    features, labels = class_features(64, seed=0)
    decoder, record = fc.train(features, labels, steps=3, batch_size=16, cfg=TINY, log=lambda s: None)
    path = fc.save_decoder(decoder, tmp_path / "d.safetensors", record)
    loaded = fc.read_decoder(path)
    assert loaded.cfg == TINY and not loaded.training
    for (name, p), q in zip(decoder.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(p, q), name
    ids = torch.tensor([[fc.BOS, 5, 2]])
    with torch.no_grad():
        assert torch.equal(decoder(ids, features[:1]), loaded(ids, features[:1]))
    saved = json.loads(fc.record_path(path).read_text())
    assert saved["steps"] == 3 and saved["seed"] == 0 and saved["final_loss"] == record.final_loss
    assert saved["decoder_config"]["width"] == 32
    # The cache is read as it is: no training when the file exists.
    fc.save_decoder(decoder, fc.weights_path(tmp_path))
    monkeypatch.setattr(fc, "train_and_save", lambda *a, **k: pytest.fail("trained although cached"))
    assert torch.equal(fc.load_decoder(tmp_path, log=lambda s: None).embed.weight, decoder.embed.weight)


def test_weights_of_another_version_are_refused(tmp_path, monkeypatch):
    decoder = fc.init_decoder(cfg=TINY)
    path = fc.save_decoder(decoder, tmp_path / "d.safetensors")
    monkeypatch.setattr(fc, "WEIGHTS_VERSION", fc.WEIGHTS_VERSION + 1)
    with pytest.raises(ValueError, match="weights version"):
        fc.read_decoder(path)


def test_greedy_captions_stop_at_eos_and_at_the_input_length():
    class Scripted(torch.nn.Module):
        """Logits that spell a fixed token sequence per image, whatever the image."""

        def __init__(self, scripts):
            super().__init__()
            self.scripts = scripts
            self.calls = []

        def forward(self, pixels, ids):
            self.calls.append(ids.shape[1])
            logits = torch.zeros(len(pixels), ids.shape[1], len(fc.VOCAB))
            for b, script in enumerate(self.scripts):
                for pos in range(ids.shape[1]):
                    logits[b, pos, script[pos]] = 1.0
            return logits

    bag, ankle, boot, coat = (fc.VOCAB.index[w] for w in ("bag", "ankle", "boot", "coat"))
    model = Scripted([[bag, fc.EOS, coat], [ankle, boot, fc.EOS], [coat, coat, coat]])
    captions = fc.greedy_captions(model, torch.zeros(3, 1))
    assert captions == [[bag, fc.EOS], [ankle, boot, fc.EOS], [coat, coat, coat]]
    assert model.calls == [1, 2, 3]
