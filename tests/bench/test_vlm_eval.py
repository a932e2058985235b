"""The captioning evaluation: scoring greedy captions from one teacher-forced forward (checked against a
plain greedy loop), the rows' intervals and paired comparisons (hand-checked), and a whole tiny run.

The model is a tiny random Dinov2Model with a tiny decoder trained for a few seconds on synthetic
"classes" (a fixed random template per class plus noise), so that some captions are right and some
wrong; nothing needs the real weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch

tf = pytest.importorskip("transformers")
pytest.importorskip("scipy")

from turbo_fx.bench import cli, output  # noqa: E402
from turbo_fx.bench import vlm_eval as ve  # noqa: E402
from turbo_fx.model_zoo import fashion_captioner as fc  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 56  # 4 x 4 patches of 14 px + CLS = 17 tokens


def synthetic(n: int, seed: int, noise: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    templates = np.random.default_rng(0).integers(0, 256, size=(10, 28, 28))
    labels = np.arange(n) % 10
    x = templates[labels] * (1 - noise) + np.random.default_rng(seed).integers(0, 256, size=(n, 28, 28)) * noise
    return x.astype(np.uint8), labels


@pytest.fixture(scope="module")
def captioner():
    torch.manual_seed(0)
    config = tf.Dinov2Config(hidden_size=48, num_hidden_layers=3, num_attention_heads=3, intermediate_size=96,
                             image_size=SIZE, patch_size=14, use_mask_token=False)
    vision = tf.Dinov2Model(config).eval()
    images, labels = synthetic(200, seed=1)
    with torch.no_grad():
        features = vision(pixel_values=fc.preprocess(images, SIZE)).last_hidden_state
    decoder, _ = fc.train(features, torch.as_tensor(labels), steps=150, batch_size=32, warmup=10,
                          cfg=fc.DecoderConfig(image_dim=48, width=32, heads=2, layers=2), log=lambda s: None)
    return fc.FashionCaptioner(vision, decoder).eval()


def test_captions_from_one_teacher_forced_forward_equal_a_plain_greedy_loop(captioner):
    images, labels = synthetic(40, seed=2)
    pixels = fc.preprocess(images, SIZE)
    runner = ve.Runner(captioner, pixels, batch_size=8)
    samples = ve.score_row(runner, labels, batch_size=8, log=lambda s: None)
    with torch.no_grad():
        loop = fc.greedy_captions(captioner, pixels)
    loop_text = [fc.VOCAB.decode(c) + ("" if c[-1] == fc.EOS else " <no eos>") for c in loop]
    assert samples["caption"] == loop_text
    # Exact match is the loop's caption being the label's caption, first_class its first word's class.
    assert samples["exact"] == [t == fc.CAPTIONS[y] for t, y in zip(loop_text, labels)]
    assert samples["first_class"] == [fc.VOCAB.class_of(c[0]) for c in loop]
    # Both paths were exercised: right captions, and wrong ones that needed more forwards.
    assert 5 <= sum(samples["exact"]) <= 35 and samples["completed"] > 0
    # 5 batches of teacher forcing, then at most two completion steps per batch of pending images.
    assert 5 < runner.calls <= 5 + 2 * -(-samples["completed"] // 8)
    # The log-likelihood is that of the true caption: its tokens' log-probabilities summed.
    with torch.no_grad():
        input_ids, targets = fc.teacher_forcing(fc.VOCAB.caption_ids(labels[:3]))
        logp = torch.log_softmax(captioner(pixels[:3], input_ids), -1)
    for i in range(3):
        n_real = int((targets[i] != fc.PAD).sum())
        expected = sum(float(logp[i, j, targets[i, j]]) for j in range(n_real))
        assert samples["loglik"][i] == pytest.approx(expected, abs=1e-4)


def test_greedy_prefix_and_completion_on_hand_made_logits():
    t = fc.VOCAB.index
    targets = [t["ankle"], t["boot"], fc.EOS]
    assert ve.greedy_prefix(targets, targets, -1) == (targets, True)
    assert ve.greedy_prefix(targets, [t["ankle"], fc.EOS, fc.EOS], 1) == ([t["ankle"], fc.EOS], True)
    assert ve.greedy_prefix(targets, [t["bag"], t["coat"], t["coat"]], 0) == ([t["bag"]], False)
    assert ve.greedy_prefix(targets, [t["ankle"], t["boot"], t["coat"]], 2) == (targets[:2] + [t["coat"]], True)
    assert ve.prefix_inputs([[t["bag"]], []], 3).tolist() == [[fc.BOS, t["bag"], fc.PAD], [fc.BOS, fc.PAD, fc.PAD]]

    def step(indices, input_ids):  # image 0 continues "bag" with "top" then EOS; image 1 never ends
        logits = torch.zeros(len(indices), 3, len(fc.VOCAB))
        for row, i in enumerate(indices):
            for pos in range(3):
                nxt = {0: [t["bag"], t["top"], fc.EOS], 1: [t["coat"]] * 3}[int(i)][pos]
                logits[row, pos, nxt] = 1.0
        return logits

    assert ve.complete_greedy(step, [0, 1], [[t["bag"]], [t["coat"]]]) == [
        [t["bag"], t["top"], fc.EOS], [t["coat"], t["coat"], t["coat"]]]


def hand_samples(exact, first_class, loglik, agrees, labels=None):
    n = len(exact)
    return {"label": labels if labels is not None else [i % 10 for i in range(n)], "exact": exact,
            "first_class": first_class, "loglik": loglik, "agrees": agrees}


def test_row_metrics_on_hand_made_predictions():
    labels = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    samples = hand_samples(exact=[True] * 8 + [False] * 2,
                           first_class=[0, 1, 2, 3, 4, 5, 6, 7, 8, 0],  # 9 of 10 right
                           loglik=[-0.5] * 5 + [-1.5] * 5, agrees=[True] * 10, labels=labels)
    m = ve.row_metrics(samples)
    # Wilson 95% for 8 of 10: centre (0.8 + z²/20) / (1 + z²/10) = 0.7167, half-width 0.2266.
    assert m["exact_match"]["value"] == 0.8
    assert (m["exact_match"]["low"], m["exact_match"]["high"]) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert m["class_accuracy"]["value"] == 0.9
    assert (m["class_accuracy"]["low"], m["class_accuracy"]["high"]) == pytest.approx((0.5958, 0.9821), abs=1e-4)
    # 10 of 10: the upper bound is 1 and the lower 1 / (1 + z²/10) = 0.7225.
    assert (m["agreement"]["low"], m["agreement"]["high"]) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert m["loglik"]["value"] == -1.0
    assert -1.5 < m["loglik"]["low"] < -1.0 < m["loglik"]["high"] < -0.5


def test_paired_comparisons_on_hand_made_predictions():
    a = hand_samples([True] * 10, [0] * 10, [-0.5] * 10, [True] * 10)
    b = hand_samples([True] * 5 + [False] * 5, [0] * 10, [-1.0] * 10, [True] * 10)
    c = ve.compare_rows(a, b, "exact_match")
    assert (c.difference, c.a_only, c.b_only) == (0.5, 5, 0)
    assert c.p_value == pytest.approx(2 * 0.5 ** 5)  # exact McNemar: 5 discordant pairs, all one way
    # Newcombe: phi = 0 here (B's margin of wrong answers has no A-wrong images), so
    # low = 0.5 - sqrt((1 - 0.7225)² + (0.7634 - 0.5)²), high = 0.5 + (0.5 - 0.2366).
    assert (c.low, c.high) == pytest.approx((0.1174, 0.7634), abs=1e-3)
    same = ve.compare_rows(a, a, "class_accuracy")
    assert (same.difference, same.p_value, same.a_only, same.b_only) == (0.0, 1.0, 0, 0)
    ll = ve.compare_rows(a, b, "loglik")
    assert (ll.difference, ll.low, ll.high) == pytest.approx((0.5, 0.5, 0.5))
    # 3 images right under A only, 1 under B only: p = 2 (1 + 4) / 16, and the interval covers 0.
    d = ve.compare_rows(hand_samples([True, True, True, False] + [True] * 6, [0] * 10, [0.0] * 10, [True] * 10),
                        hand_samples([False, False, False, True] + [True] * 6, [0] * 10, [0.0] * 10, [True] * 10),
                        "exact_match")
    assert d.p_value == pytest.approx(0.625) and d.low < 0 < d.high
    entry = {"exact_match": {"low": d.low, "high": d.high}, "loglik": {"low": 0.5, "high": 0.5}}
    assert not ve.significant(entry, "exact_match") and ve.significant(entry, "loglik")
    with pytest.raises(ValueError, match="same images"):
        ve.compare_rows(a, hand_samples([True] * 10, [0] * 10, [0.0] * 10, [True] * 10, labels=[1] * 10), "loglik")


def test_rows_and_the_pairs_compared():
    specs = ve.row_specs([8, 16])
    assert len(specs) == 1 + 2 * 3 * 2
    turbo8 = next(s for s in specs if s.label == "turbo r=8")
    assert turbo8.options == {"r": 8, "cross_attention_bias": True}
    assert next(s for s in specs if s.label == "redundancy-only r=16, no cross-attn bias").options == {
        "semantic": False, "r": 16, "cross_attention_bias": False}
    rows = [{"label": s.label, "method": s.method, "r": s.r, "cross_bias": s.cross_bias} for s in specs]
    pairs = [(kind, a["label"], b["label"]) for kind, a, b in ve.comparison_pairs(rows)]
    kinds = [k for k, _, _ in pairs]
    # turbo vs each other ranking at 2 r x 2 biases; bias vs none for 3 rankings x 2 r; 6 biased rows vs baseline.
    assert (kinds.count("turbo vs redundancy-only"), kinds.count("turbo vs semantic-only")) == (4, 4)
    assert kinds.count("bias vs no bias") == 6 and kinds.count("vs baseline") == 6
    assert ("turbo vs semantic-only", "turbo r=16, no cross-attn bias", "semantic-only r=16, no cross-attn bias") in pairs
    assert ("bias vs no bias", "semantic-only r=8", "semantic-only r=8, no cross-attn bias") in pairs


def test_a_tiny_run_scores_every_row_checks_greedy_decoding_and_writes_its_files(captioner, tmp_path):
    images, labels = synthetic(16, seed=3)
    payload = ve.study(model=captioner, images=images, labels=labels, image_size=SIZE, r_values=[2],
                     methods=["turbo"], batch_size=8, greedy_check=4, log=lambda s: None)
    rows = payload["rows"]
    assert [r["label"] for r in rows] == ["baseline (no merging)", "turbo r=2", "turbo r=2, no cross-attn bias"]
    base, merged, unbiased = rows
    assert payload["settings"]["image_tokens"] == 17 and payload["settings"]["blocks"] == 3
    assert base["tokens_per_block"] == [17, 17, 17, 17] and merged["tokens_per_block"] == [17, 15, 13, 11]
    assert merged["cross_attention_sites"] == unbiased["cross_attention_sites"] == "2/2 reads merged"
    assert 0 < merged["gflops_per_image"] < base["gflops_per_image"]
    assert merged["gflops_per_image"] == pytest.approx(unbiased["gflops_per_image"], rel=1e-6)
    assert base["metrics"]["agreement"]["value"] == 1.0 and not any(r["fallbacks"] for r in rows)
    # The two biases read the same merged tokens differently.
    assert merged["samples"]["loglik"] != unbiased["samples"]["loglik"]
    for row in (base, merged):
        check = row["greedy_check"]
        assert check["equal"] and len(check["indices"]) == 4 and 0 < check["exact_among_them"] < 4
    # Only Turbo ran: its bias pair and its comparison with the baseline.
    assert [(c["kind"], c["a"], c["b"]) for c in payload["comparisons"]] == [
        ("bias vs no bias", "turbo r=2", "turbo r=2, no cross-attn bias"), ("vs baseline", "turbo r=2", "baseline (no merging)")]
    output.write(payload, str(tmp_path), "fashion_captioner", ve.markdown, compress=True, quiet=True)
    saved = output.load_json(str(tmp_path / "fashion_captioner.json.gz"))
    assert saved["rows"][1]["samples"]["caption"] == merged["samples"]["caption"]
    md = (tmp_path / "fashion_captioner.md").read_text()
    assert "| turbo r=2 " in md and "bias vs no bias" in md and "2/2 reads merged" in md
    # The markdown can be rebuilt from the JSON alone.
    (tmp_path / "fashion_captioner.md").unlink()
    assert cli.main(["vlm-eval", "--render", str(tmp_path / "fashion_captioner.json.gz")]) == 0
    assert (tmp_path / "fashion_captioner.md").read_text() == md
