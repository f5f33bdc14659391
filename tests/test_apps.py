"""Helpers of notebook 06: synthetic scans, metrics, load-or-retrain and the small training loops."""

import math
import random

import numpy as np
import pytest
import torch

from course_utils import apps, paths
from course_utils.checkpoints import save_checkpoint
from course_utils.data import make_shapes_world
from course_utils.vlm import clip, llava
from course_utils.vlm.sharing import collect_vqa_examples


# ---------------------------------------------------------------------------------------------
# Synthetic scans
# ---------------------------------------------------------------------------------------------


def test_scans_are_deterministic():
    first = apps.make_scans(6, "train", seed=3)
    second = apps.make_scans(6, "train", seed=3)
    for a, b in zip(first, second):
        assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
        assert a["answers"] == b["answers"]


def test_scan_splits_differ():
    train = apps.make_scans(4, "train", seed=0)
    test = apps.make_scans(4, "test", seed=0)
    for a, b in zip(train, test):
        assert not np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))


def test_scan_answers_match_lesion():
    scans = apps.make_scans(40, "test", seed=1)
    assert 0 < sum(scans["has_lesion"]) < len(scans)
    for scan in scans:
        assert tuple(scan["question_types"]) == apps.SCAN_QUESTION_TYPES
        answers = dict(zip(scan["question_types"], scan["answers"]))
        if scan["has_lesion"]:
            assert answers["presence"] == "yes"
            assert answers["side"] == scan["lesion_side"] in ("left", "right")
            assert 20 <= scan["lesion_contrast"] <= 90
            assert len(scan["objects"]) == 1
            assert scan["objects"][0]["side"] == scan["lesion_side"]
        else:
            assert answers == {"presence": "no", "side": "none"}
            assert scan["lesion_contrast"] == 0
            assert scan["objects"] == []


def test_lesion_is_brighter_where_drawn():
    scans = apps.make_scans(30, "train", seed=2, lesion_rate=1.0)
    for scan in scans:
        grey = np.asarray(scan["image"].convert("L"), dtype=np.float32)
        size = grey.shape[0]
        lesion = scan["objects"][0]
        row, col = int(lesion["y"] * size), int(lesion["x"] * size)
        spot = grey[max(row - 1, 0) : row + 2, max(col - 1, 0) : col + 2].mean()
        assert spot > np.median(grey), scan["scan_id"]


@pytest.mark.parametrize("rate, expected", [(0.0, 0), (1.0, 12)])
def test_lesion_rate_extremes(rate, expected):
    scans = apps.make_scans(12, "train", seed=0, lesion_rate=rate)
    assert sum(scans["has_lesion"]) == expected


def test_scan_images_are_rgb_of_requested_size():
    scan = apps.make_scans(1, "train", image_size=48)[0]
    assert scan["image"].mode == "RGB"
    assert scan["image"].size == (48, 48)


def test_scans_work_with_vqa_examples():
    examples = collect_vqa_examples(apps.make_scans(5, "train"), ["presence", "side"])
    assert len(examples) == 10
    assert tuple(examples.images.shape) == (5, 3, 64, 64)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_scans=4, split="valid"), "split"),
        (dict(num_scans=0), "num_scans"),
        (dict(num_scans=2, image_size=16), "image_size"),
        (dict(num_scans=2, lesion_rate=1.5), "lesion_rate"),
    ],
)
def test_scans_reject_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        apps.make_scans(**kwargs)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def test_binary_metrics_values():
    metrics = apps.binary_metrics([True, False, True, False, False], [True, True, False, False, False])
    assert metrics["sensitivity"] == pytest.approx(1 / 2)
    assert metrics["specificity"] == pytest.approx(2 / 3)
    assert metrics["precision"] == pytest.approx(1 / 2)
    assert metrics["accuracy"] == pytest.approx(3 / 5)


def test_binary_metrics_always_negative():
    metrics = apps.binary_metrics([False] * 20, [True] + [False] * 19)
    assert metrics["sensitivity"] == 0
    assert metrics["accuracy"] == pytest.approx(0.95)
    assert math.isnan(metrics["precision"])


def test_binary_metrics_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="equally long"):
        apps.binary_metrics([True, False], [True])


def test_accuracy_by_type_table():
    table = apps.accuracy_by_type(["red", "2", "yes", "blue"], ["red", "3", "yes", "red"], ["color", "count", "yes_no", "color"])
    rows = table.set_index("題型")
    assert rows.loc["color", "準確率"] == pytest.approx(0.5)
    assert rows.loc["color", "題數"] == 2
    assert rows.loc["color", "猜最常見答案"] == pytest.approx(1.0)
    assert rows.loc["count", "準確率"] == 0
    assert rows.loc["全部", "準確率"] == pytest.approx(0.5)


@pytest.mark.parametrize("predicted, answers, types", [([], [], []), (["a"], ["a", "b"], ["x", "x"])])
def test_accuracy_by_type_rejects_bad_input(predicted, answers, types):
    with pytest.raises(ValueError, match="equally long"):
        apps.accuracy_by_type(predicted, answers, types)


def test_caption_positives_marks_repeats():
    positives = apps.caption_positives(["a red circle", "a blue square", "a red circle"])
    expected = torch.tensor([[True, False, True], [False, True, False], [True, False, True]])
    assert torch.equal(positives, expected)


@pytest.mark.parametrize("text, word", [(" Red.", "red"), ("2 objects", "2"), ("", ""), ("!!", "")])
def test_first_word(text, word):
    assert apps.first_word(text) == word


# ---------------------------------------------------------------------------------------------
# Load or retrain
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def checkpoint_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "CHECKPOINT_DIR", tmp_path)
    return tmp_path


def linear_factory(config):
    return torch.nn.Linear(config["inputs"], 1)


class Retrainer:
    def __init__(self, value=1.0):
        self.calls = 0
        self.value = value

    def __call__(self):
        self.calls += 1
        model = torch.nn.Linear(3, 1)
        torch.nn.init.constant_(model.weight, self.value)
        return model, {"inputs": 3}


def test_missing_checkpoint_is_retrained_and_saved(checkpoint_dir, capsys):
    retrain = Retrainer()
    loaded = apps.load_or_retrain("demo", linear_factory, retrain, "ci", made_by="01")
    assert retrain.calls == 1
    assert loaded.source == "retrained now"
    assert (checkpoint_dir / f"demo{apps.RETRAINED_SUFFIX}.pt").exists()
    assert not (checkpoint_dir / "demo.pt").exists()
    assert "重新訓練" in capsys.readouterr().out


def test_retrained_model_is_reused(checkpoint_dir):
    retrain = Retrainer(value=0.25)
    apps.load_or_retrain("demo", linear_factory, retrain, "ci", made_by="01")
    loaded = apps.load_or_retrain("demo", linear_factory, retrain, "ci", made_by="01")
    assert retrain.calls == 1
    assert loaded.source == "retrained"
    assert torch.all(loaded.model.weight == 0.25)


def test_retrained_model_of_other_profile_is_not_reused(checkpoint_dir):
    retrain = Retrainer()
    apps.load_or_retrain("demo", linear_factory, retrain, "ci", made_by="01")
    loaded = apps.load_or_retrain("demo", linear_factory, retrain, "cpu", made_by="01")
    assert retrain.calls == 2
    assert loaded.profile == "cpu"


def test_original_checkpoint_wins(checkpoint_dir, capsys):
    original = torch.nn.Linear(3, 1)
    torch.nn.init.constant_(original.weight, 0.5)
    save_checkpoint("demo", original, {"inputs": 3}, "cpu")
    retrain = Retrainer()
    loaded = apps.load_or_retrain("demo", linear_factory, retrain, "ci", made_by="01")
    assert retrain.calls == 0
    assert loaded.source == "checkpoint"
    assert loaded.profile == "cpu"
    assert torch.all(loaded.model.weight == 0.5)
    assert "cpu" in capsys.readouterr().out


def test_damaged_checkpoint_is_retrained(checkpoint_dir):
    (checkpoint_dir / "demo.pt").write_bytes(b"not a checkpoint")
    retrain = Retrainer()
    loaded = apps.load_or_retrain("demo", linear_factory, retrain, "ci", made_by="01")
    assert retrain.calls == 1
    assert loaded.source == "retrained now"
    assert apps.stored_profile("demo") is None


def test_own_model_is_trained_once_per_profile(checkpoint_dir, capsys):
    retrain = Retrainer()
    first = apps.load_or_retrain("own", linear_factory, retrain, "ci")
    second = apps.load_or_retrain("own", linear_factory, retrain, "ci")
    third = apps.load_or_retrain("own", linear_factory, retrain, "cpu")
    assert retrain.calls == 2
    assert (first.source, second.source, third.source) == ("trained now", "checkpoint", "trained now")
    assert (checkpoint_dir / "own.pt").exists()
    assert not (checkpoint_dir / f"own{apps.RETRAINED_SUFFIX}.pt").exists()
    assert apps.stored_profile("own") == "cpu"


# ---------------------------------------------------------------------------------------------
# Training loops
# ---------------------------------------------------------------------------------------------


def test_train_vqa_round_trip(checkpoint_dir):
    examples = collect_vqa_examples(apps.make_scans(16, "train", image_size=32), ["presence", "side"])
    model, config, history = apps.train_vqa(
        examples, dict(image_size=32, patch_size=8, d_model=16, d_context=16, n_heads=2, depth=1), steps=3, batch_size=8, progress=False
    )
    assert len(history["loss"]) == 3
    assert config["answers"] == sorted(set(examples.answers))
    assert config["question_types"] == ["presence", "side"]

    rebuilt = apps.vqa_from_config(config)
    rebuilt.load_state_dict(model.state_dict())
    tokenizer = apps.WordTokenizer.from_config(config["tokenizer"])
    ids, mask, labels = apps.encode_vqa_examples(examples, tokenizer, config["answers"])
    logits = apps.predict_vqa(rebuilt, examples, ids, mask, batch_size=5)
    assert tuple(logits.shape) == (len(examples), len(config["answers"]))
    torch.testing.assert_close(logits, apps.predict_vqa(model, examples, ids, mask))


def test_unknown_answer_gets_ignore_label():
    examples = collect_vqa_examples(apps.make_scans(4, "train"), ["presence"])
    tokenizer = apps.WordTokenizer.from_texts(examples.questions)
    _, _, labels = apps.encode_vqa_examples(examples, tokenizer, ["yes"])
    for answer, label in zip(examples.answers, labels.tolist()):
        assert label == (0 if answer == "yes" else -100)


def test_train_clip_heads_uses_given_loss():
    generator = torch.Generator().manual_seed(0)
    images, texts = torch.randn(32, 12, generator=generator), torch.randn(32, 6, generator=generator)
    calls = []

    def loss_fn(heads, image_batch, text_batch):
        calls.append(len(image_batch))
        return heads.loss(image_batch, text_batch)

    heads, history = apps.train_clip_heads(images, texts, clip.CLIPHeadsConfig(image_dim=12, text_dim=6, embed_dim=8),
                                           steps=4, batch_size=16, loss_fn=loss_fn, progress=False)
    assert calls == [16, 16, 16, 16]
    assert len(history["loss"]) == 4
    assert not heads.training


def test_train_clip_heads_prepare_can_share_head():
    def tie(heads):
        heads.text_head = heads.image_head
        return heads

    features = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    heads, _ = apps.train_clip_heads(features, features.flip(0), clip.CLIPHeadsConfig(image_dim=6, text_dim=6, embed_dim=4),
                                     steps=2, batch_size=8, prepare=tie, progress=False)
    assert heads.text_head is heads.image_head
    assert sum(p.numel() for p in heads.parameters()) == 6 * 4 + 4 + 1  # one linear head and logit_scale


def test_train_clip_heads_rejects_unpaired_features():
    with pytest.raises(ValueError, match="pairs"):
        apps.train_clip_heads(torch.zeros(4, 3), torch.zeros(5, 3), clip.CLIPHeadsConfig(image_dim=3, text_dim=3), steps=1)


def test_train_tiny_clip_round_trip():
    scenes = make_shapes_world(8, "train", image_size=32)
    model_config = dict(max_length=24, image_size=32, patch_size=16, vision_dim=16, vision_depth=1, vision_heads=2,
                        text_dim=16, text_depth=1, text_heads=2, embed_dim=8)
    model, config = apps.train_tiny_clip(scenes, model_config, steps=2, batch_size=4)
    rebuilt = apps.tiny_clip_from_config(config)
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    images = clip.images_to_tensor(scenes["image"][:2])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.encode_image(images), model.encode_image(images))
    assert apps.WordTokenizer.from_config(config["tokenizer"]).vocab_size == model.config.vocab_size


def test_shapes_conversation_layout():
    scene = make_shapes_world(1, "test")[0]
    messages = apps.shapes_conversation(scene, random.Random(0), turns=3)
    assert [m["role"] for m in messages] == ["user", "assistant"] * 3
    assert messages[0]["content"].startswith(llava.IMAGE_MARKER)
    assert all(llava.IMAGE_MARKER not in m["content"] for m in messages[1:])
    pairs = dict(zip(scene["questions"], scene["answers"]))
    for question, answer in zip(messages[0::2], messages[1::2]):
        assert pairs[question["content"].replace(llava.IMAGE_MARKER + "\n", "")] == answer["content"]


def test_generate_replies_rejects_mismatched_images():
    with pytest.raises(ValueError, match="one image per prompt"):
        apps.generate_replies(None, None, [[1, 2], [3]], torch.zeros(1, 4, 8))


@pytest.mark.parametrize("setting, expected", [("1", True), ("0", False)])
def test_lm_autocast_follows_switch(monkeypatch, setting, expected):
    monkeypatch.setenv("COURSE_CPU_BF16", setting)
    with apps.language_model_autocast("cpu"):
        assert torch.is_autocast_enabled("cpu") is expected
        if expected:
            assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


def test_train_llava_shapes_standardizes_and_trains(monkeypatch):
    monkeypatch.setenv("COURSE_CPU_BF16", "1")
    autocast_seen = []
    forward = llava.MiniLlava.forward

    def recording_forward(self, *args, **kwargs):
        autocast_seen.append(torch.is_autocast_enabled("cpu"))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(llava.MiniLlava, "forward", recording_forward)
    scenes = make_shapes_world(6, "train", seed=0, image_size=32)
    tokens = torch.randn(6, 4, 1280, generator=torch.Generator().manual_seed(0)) * 5 + 2
    model, tokenizer, config = apps.train_llava_shapes(scenes, tokens, steps=1, caption_steps=1, batch_size=2, turns=1, lora_rank=2)

    assert autocast_seen == [True, True], "stage 1 and stage 2 should each run one step under CPU bf16 autocast"
    assert model.language_model.config._attn_implementation == "eager"
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    torch.testing.assert_close(model.standardize.mean, tokens.flatten(0, 1).mean(0))
    assert config["grid"] == 2
    assert config["stage1_steps"] == 1
    assert config["stage2_steps"] == 1
    assert config["standardized"]
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert lora_b
    assert all(p.abs().sum() > 0 for p in lora_b), "stage 2 did not move the LoRA adapters"
    base = [p for name, p in model.language_model.named_parameters() if "lora_" not in name]
    assert all(not p.requires_grad for p in base)


def test_train_llava_shapes_rejects_bad_input():
    scenes = make_shapes_world(3, "train", seed=0, image_size=32)
    with pytest.raises(ValueError, match="3 scenes but 2 rows"):
        apps.train_llava_shapes(scenes, torch.zeros(2, 4, 8), steps=1)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        apps.train_llava_shapes(scenes, torch.zeros(3, 4, 8), steps=0)


def test_load_or_retrain_llava_outdated_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(paths, "CHECKPOINT_DIR", tmp_path)
    (tmp_path / "llava_shapes.pt").write_bytes(b"not a checkpoint of the current code")

    def retrain():
        raise RuntimeError("retrain called")

    with pytest.raises(RuntimeError, match="retrain called"):
        apps.load_or_retrain_llava("ci", retrain, "cpu")
    assert "不相容" in capsys.readouterr().out

    (tmp_path / "llava_shapes.pt").unlink()
    with pytest.raises(RuntimeError, match="retrain called"):
        apps.load_or_retrain_llava("ci", retrain, "cpu")
    assert "找不到 checkpoint" in capsys.readouterr().out


def test_scene_answer_looks_up_and_derives_answers():
    scene = make_shapes_world(1, split="test", seed=0)[0]
    assert apps.scene_answer(scene, scene["questions"][0]) == scene["answers"][0]
    first = scene["objects"][0]
    assert apps.scene_answer(scene, f"Is there a {first['color']} {first['shape']}?") == "yes"
    present = {(o["color"], o["shape"]) for o in scene["objects"]}
    absent = next((c, s) for c in ("red", "green", "blue", "yellow", "purple", "orange")
                  for s in ("circle", "square", "triangle", "diamond") if (c, s) not in present)
    assert apps.scene_answer(scene, f"is there a {absent[0]} {absent[1]}?") == "no"
    assert apps.scene_answer(scene, "what is the meaning of this?") is None
