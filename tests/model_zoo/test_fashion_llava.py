"""The LLaVA-style stand-in: prompts, shapes, turbo's placeholder compaction of its forward, greedy
decoding, training and caching, and the baselines' token selection of the fidelity study. Every
model is a tiny untrained instance on random features; no test needs DINOv2 or cached features."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from turbo_fx.bench import llava_fidelity as lf  # noqa: E402
from turbo_fx.model_zoo import fashion_llava as fl  # noqa: E402
from turbo_fx.report import recording  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = fl.LlavaConfig(image_dim=24, width=32, layers=2, heads=2, mlp=64)


def tiny_model(seed: int = 0) -> fl.FashionLlava:
    return fl.init_model(seed, TINY).eval()


# --------------------------------------------------------------------------- prompts


def test_prompt_is_bos_the_placeholders_and_answer():
    ids = fl.prompt_ids(2, visual_tokens=3)
    assert ids.tolist() == [[fl.BOS, fl.IMAGE, fl.IMAGE, fl.IMAGE, fl.ANSWER]] * 2
    assert fl.prompt_ids(1, answer_slots=2)[0, -3:].tolist() == [fl.ANSWER, fl.PAD, fl.PAD]
    assert fl.prompt_ids(1, answer_slots=2).shape == (1, fl.INPUT_LENGTH) == (1, 260)
    assert (fl.IMAGE, fl.ANSWER, fl.VOCAB_SIZE) == (15, 16, 17)


def test_teacher_forcing_scores_the_answer_tokens_only():
    input_ids, targets = fl.teacher_forcing([9, 1], visual_tokens=3)  # "ankle boot", "trouser"
    ankle, boot, trouser = (fl.VOCAB.index[w] for w in ("ankle", "boot", "trouser"))
    assert input_ids.tolist() == [[fl.BOS, fl.IMAGE, fl.IMAGE, fl.IMAGE, fl.ANSWER, ankle, boot],
                                  [fl.BOS, fl.IMAGE, fl.IMAGE, fl.IMAGE, fl.ANSWER, trouser, fl.EOS]]
    assert targets.tolist() == [[fl.PAD] * 4 + [ankle, boot, fl.EOS], [fl.PAD] * 4 + [trouser, fl.EOS, fl.PAD]]


# --------------------------------------------------------------------------- the model


def test_forward_shapes_and_fractional_positions_equal_to_the_default_ones():
    model = tiny_model()
    ids, features = fl.prompt_ids(2, answer_slots=2), torch.randn(2, fl.VISUAL_TOKENS, 24)
    with torch.no_grad():
        logits = model(ids, features)
        positions = torch.arange(ids.shape[1], dtype=torch.float32).expand(2, -1)
        again = model(ids, features, positions)
    assert logits.shape == (2, fl.INPUT_LENGTH, fl.VOCAB_SIZE)
    torch.testing.assert_close(again, logits, rtol=0, atol=1e-5)


def test_the_projected_features_fill_the_placeholders_in_order():
    model = tiny_model()
    ids = fl.prompt_ids(1, visual_tokens=4)
    features = torch.randn(1, 4, 24)
    with torch.no_grad():
        reversed_logits = model(ids, features.flip(1))
        logits = model(ids, features)
    # The causal model reads the image in order: reversing the features changes the answer logits.
    assert (logits[0, -3] - reversed_logits[0, -3]).abs().max() > 1e-4


def test_turbo_compacts_the_placeholders_before_the_first_layer():
    model = tiny_model()
    ids, features = fl.prompt_ids(2), torch.randn(2, fl.VISUAL_TOKENS, 24)
    fn = torch.compile(model.forward, backend="turbo", options={"ratio": 0.5, "inner_backend": "eager"})
    with recording() as rec, torch.no_grad():
        out = fn(ids, features)
        want = model(ids, features)
    assert out.shape == want.shape == (2, 258, fl.VOCAB_SIZE)
    (graph,) = rec.graphs
    assert graph.mode == "compact" and graph.fallback_reason is None
    assert [(b.kind, b.tokens_in, b.tokens_out) for b in graph.blocks] == [("placeholders", 256, 128)]
    assert lf.kept_tokens(0.5) == 128
    # The BOS token precedes every placeholder, so compaction cannot change what it computes.
    torch.testing.assert_close(out[:, 0], want[:, 0], rtol=0, atol=1e-5)


def test_greedy_answers_grow_the_input_and_stop_at_eos():
    coat, ankle, boot = (fl.VOCAB.index[w] for w in ("coat", "ankle", "boot"))
    script = {0: [coat, ankle], 1: [fl.EOS, boot], 2: [coat, fl.EOS]}  # per step, per row
    seen = []

    def step(ids):
        seen.append(ids.clone())
        logits = torch.zeros(2, ids.shape[1], fl.VOCAB_SIZE)
        for row, token in enumerate(script[len(seen) - 1]):
            logits[row, -1, token] = 1.0  # the argmax is read at the last position only
        return logits

    answers = fl.greedy_answers(step, fl.prompt_ids(2, visual_tokens=3))
    # row 0 is done after "coat <eos>": its third token is PAD, whatever the model says
    assert answers == [[coat, fl.EOS], [ankle, boot, fl.EOS]]
    assert [s.shape[1] for s in seen] == [5, 6, 7]
    assert seen[2][:, 5:].tolist() == [[coat, fl.EOS], [ankle, boot]]
    assert [fl.answer_text(a) for a in answers] == ["coat", "ankle boot"]
    assert fl.answer_text([coat]) == "coat <no eos>"


def test_training_lowers_the_loss_and_the_weights_round_trip(tmp_path):
    torch.manual_seed(0)
    labels = torch.arange(20) % 10
    # Features that name the class in their mean, so that a few steps can learn it.
    features = torch.randn(20, fl.VISUAL_TOKENS, 24) * 0.1 + torch.nn.functional.one_hot(labels, 24)[:, None].float()
    model, record = fl.train(features.half(), labels, steps=12, batch_size=10, lr=3e-3, cfg=TINY, warmup=2,
                             validation=(features[:10], labels[:10]), log_every=6, log=lambda s: None)
    assert record.losses[-1][1] < record.losses[0][1]
    assert set(record.validation) == {"loss", "exact_match", "first_word", "n"}
    path = fl.save_model(model, tmp_path / "w.safetensors", record)
    again = fl.read_model(path)
    ids = fl.prompt_ids(1)
    with torch.no_grad():
        torch.testing.assert_close(again(ids, features[:1]), model(ids, features[:1]))
    assert fl.record_path(path).is_file()


# --------------------------------------------------------------------------- the baselines' selection


def test_visionzip_keeps_the_most_attended_tokens_and_merges_the_rest_around_anchors():
    # 8 tokens; CLS attends most to 6, 1 and 3. The remaining 0, 2, 4, 5, 7 get anchors at every
    # 5 // 2 = 2nd of them (0 and 4); 2 and 5 lean to 0's direction, 7 to 4's.
    attention = torch.tensor([[0.0, 0.3, 0.0, 0.2, 0.0, 0.0, 0.4, 0.1]])
    x, y = [1.0, 0.0], [0.0, 1.0]
    features = torch.tensor([[x, [5.0, 5.0], [2.0, 0.1], [7.0, 7.0], y, [3.0, 0.2], [9.0, 9.0], [0.1, 2.0]]])
    tokens, positions = lf.visionzip_select(features, attention, dominant=3, contextual=2)
    assert tokens.shape == (1, 5, 2)
    # groups {0, 2, 5} (mean position 7/3) and {4, 7} (5.5), ordered by position with 1, 3, 6
    torch.testing.assert_close(positions[0], torch.tensor([1.0, 7 / 3, 3.0, 5.5, 6.0], dtype=torch.float64))
    want = torch.tensor([[5.0, 5.0], [2.0, 0.1], [7.0, 7.0], [0.05, 1.5], [9.0, 9.0]])
    torch.testing.assert_close(tokens[0], want)


def test_visionzip_token_counts_follow_the_54_to_10_split():
    assert [lf.visionzip_split(lf.kept_tokens(r)) for r in (0.5, 0.75, 0.89)] == [(108, 20), (54, 10), (24, 5)]
    features, attention = torch.randn(2, 256, 8), torch.rand(2, 256)
    for dominant, contextual in [(108, 20), (54, 10), (24, 5)]:
        tokens, positions = lf.visionzip_select(features, attention, dominant, contextual)
        assert tokens.shape == (2, dominant + contextual, 8)
        assert bool((positions[:, 1:] >= positions[:, :-1]).all())
        top = torch.topk(attention, dominant).indices
        for row in range(2):
            assert set(top[row].tolist()) <= set(positions[row].tolist())  # dominant tokens keep their place
    everything, _ = lf.visionzip_select(features, attention, 256, 0)
    assert torch.equal(everything, features)


def test_pooling_averages_windows_of_the_grid():
    features = torch.arange(16, dtype=torch.float32).reshape(1, 16, 1)  # a 4 x 4 grid, value = index
    tokens, positions = lf.pool_select(features, 2, 2, grid=4)
    assert tokens[0, :, 0].tolist() == [2.5, 4.5, 10.5, 12.5] == positions[0].tolist()
    tokens, positions = lf.pool_select(features, 4, 2, grid=4)  # pairs of neighbours in a row
    assert tokens[0, :, 0].tolist() == [0.5, 2.5, 4.5, 6.5, 8.5, 10.5, 12.5, 14.5]
    tokens, _ = lf.pool_select(torch.randn(3, 256, 8), *lf.pool_grid(0.89))
    assert tokens.shape == (3, 25, 8)
    assert [lf.pool_grid(r) for r in (0.5, 0.75, 0.89)] == [(16, 8), (8, 8), (5, 5)]


def test_a_shortened_prompt_keeps_the_text_at_its_original_positions():
    ids, position_ids = lf.reduced_prompt(torch.tensor([[0.5, 2.5, 255.0]]))
    assert ids.tolist() == [[fl.BOS, fl.IMAGE, fl.IMAGE, fl.IMAGE, fl.ANSWER]]
    assert position_ids.tolist() == [[0.0, 1.5, 3.5, 256.0, 257.0, 258.0, 259.0]]


def test_answer_text_writes_special_tokens_out():
    assert fl.answer_text([fl.IMAGE, fl.ANSWER, fl.EOS]) == "<image> <answer>"
    assert fl.answer_text([fl.VOCAB.index["bag"], fl.EOS, fl.PAD]) == "bag"
