"""Shared helpers of notebook 06 (applications and pitfalls).

- A synthetic "scan" data set for the medical-imaging style toy case (:func:`make_scans`).
  NOTE: it is a teaching toy built from drawn ellipses and spots, not medical data, and no
  model trained on it is a diagnostic tool.
- Loading the models notebooks 01-05 saved, or retraining a small stand-in when a checkpoint
  is missing (:func:`load_or_retrain`, :func:`load_or_retrain_llava`), with short training
  loops for each kind of model (:func:`train_vqa`, :func:`train_tiny_clip`,
  :func:`train_clip_heads`, :func:`train_llava_shapes`).
- Evaluation helpers: accuracy by question type, sensitivity and specificity, caption
  positives for retrieval, batched LLaVA replies.

Model code stays in :mod:`course_utils.vlm`; this module only loads, trains and evaluates it.
"""

from __future__ import annotations

import contextlib
import math
import random
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import datasets
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter
from torch import nn

from course_utils import paths
from course_utils.checkpoints import checkpoint_exists, load_checkpoint, save_checkpoint
from course_utils.env import cpu_bf16_enabled, seed_everything
from course_utils.train import batch_indices, fit
from course_utils.vlm import clip, llava
from course_utils.vlm.sharing import CrossAttentionVQA, VQAExamples
from course_utils.vlm.text import WordTokenizer

SCAN_SPLITS = ("train", "test")
# Keeps the scan streams apart from ShapesWorld's (seed, split index, scene index) streams.
SCAN_STREAM = 7001
SCAN_QUESTION_TYPES = ("presence", "side")  # the question types of every scan, in order


def _draw_scan(rng: np.random.Generator, image_size: int, has_lesion: bool) -> tuple[Image.Image, dict[str, Any]]:
    """Draw one scan: a textured grey ellipse (the "organ") on a dark noisy background, maybe with one bright spot."""
    side = image_size * 2
    canvas = Image.new("L", (side, side), int(rng.integers(10, 30)))
    draw = ImageDraw.Draw(canvas)

    centre_x, centre_y = 0.5 + rng.uniform(-0.05, 0.05), 0.5 + rng.uniform(-0.05, 0.05)
    radius_x, radius_y = rng.uniform(0.30, 0.38), rng.uniform(0.26, 0.36)
    organ_level = int(rng.integers(105, 135))
    draw.ellipse(
        [(centre_x - radius_x) * side, (centre_y - radius_y) * side, (centre_x + radius_x) * side, (centre_y + radius_y) * side],
        fill=organ_level,
    )

    # Soft blobs of slightly different tissue: at most 12 grey levels brighter than the organ
    # (a lesion is at least 20), so that not every bright patch is a lesion.
    for _ in range(int(rng.integers(2, 5))):
        blob_x = centre_x + rng.uniform(-0.6, 0.6) * radius_x
        blob_y = centre_y + rng.uniform(-0.6, 0.6) * radius_y
        blob_radius = rng.uniform(0.06, 0.11)
        draw.ellipse([(blob_x - blob_radius) * side, (blob_y - blob_radius) * side,
                      (blob_x + blob_radius) * side, (blob_y + blob_radius) * side],
                     fill=int(organ_level + rng.uniform(-25, 12)))

    lesion: dict[str, Any] = {"has_lesion": has_lesion, "side": "none", "contrast": 0.0, "x": 0.0, "y": 0.0, "radius": 0.0}
    if has_lesion:
        radius = rng.uniform(0.035, 0.07)
        # Sample the spot inside the organ, clearly left or right of its centre line.
        while True:
            offset_x, offset_y = rng.uniform(-0.75, 0.75), rng.uniform(-0.7, 0.7)
            if abs(offset_x) > 0.2 and offset_x**2 + offset_y**2 < 0.6:
                break
        x, y = centre_x + offset_x * radius_x, centre_y + offset_y * radius_y
        contrast = float(rng.uniform(20, 90))
        draw.ellipse([(x - radius) * side, (y - radius) * side, (x + radius) * side, (y + radius) * side],
                     fill=int(organ_level + contrast))
        lesion.update(side="left" if x < centre_x else "right", contrast=contrast, x=float(x), y=float(y), radius=float(radius))

    canvas = canvas.filter(ImageFilter.GaussianBlur(radius=1.2)).resize((image_size, image_size), Image.Resampling.BILINEAR)
    pixels = np.asarray(canvas, dtype=np.float32)
    pixels = pixels + rng.normal(0.0, 9.0, size=pixels.shape)  # acquisition noise
    grey = np.clip(pixels, 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB"), lesion


def _scan_text(lesion: dict[str, Any]) -> tuple[str, list[tuple[str, str, str]]]:
    if lesion["has_lesion"]:
        report = f"bright lesion on the {lesion['side']} side of the organ"
        side_answer = lesion["side"]
    else:
        report = "normal scan with no lesion"
        side_answer = "none"
    triples = [
        ("is there a lesion?", "yes" if lesion["has_lesion"] else "no", "presence"),
        ("which side is the lesion on?", side_answer, "side"),
    ]
    return report, triples


SCAN_FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "scan_id": datasets.Value("string"),
        "has_lesion": datasets.Value("bool"),
        "lesion_side": datasets.Value("string"),
        "lesion_contrast": datasets.Value("float32"),
        "report": datasets.Value("string"),
        "questions": datasets.List(datasets.Value("string")),
        "answers": datasets.List(datasets.Value("string")),
        "question_types": datasets.List(datasets.Value("string")),
        "objects": datasets.List(
            {
                "kind": datasets.Value("string"),
                "side": datasets.Value("string"),
                "x": datasets.Value("float32"),
                "y": datasets.Value("float32"),
                "radius": datasets.Value("float32"),
                "contrast": datasets.Value("float32"),
            }
        ),
    }
)


def make_scans(num_scans: int, split: str = "train", seed: int = 0, image_size: int = 64, lesion_rate: float = 0.5) -> datasets.Dataset:
    """Build ``num_scans`` synthetic grey "scans" as a ``datasets.Dataset``.

    Each scan is a textured grey ellipse (the "organ") on a dark noisy background. With
    probability ``lesion_rate`` it contains one bright round spot (the "lesion") whose
    contrast to the organ varies from faint (20 grey levels) to obvious (90). Columns: ``image``
    (PIL RGB), ``scan_id``, ``has_lesion``, ``lesion_side`` (``left``/``right``/``none``),
    ``lesion_contrast`` (grey levels, 0 without a lesion), ``report`` (one sentence),
    ``questions``, ``answers`` and ``question_types`` (``presence``: yes/no, ``side``:
    left/right/none), and ``objects``: the lesion (kind, side, centre ``x``/``y`` and
    ``radius`` as fractions of the image side, contrast) or an empty list.

    Scan ``i`` of a split is the same for the same ``seed``, ``image_size`` and ``lesion_rate``;
    the two splits use separate random streams. Raises ``ValueError`` for an unknown split, a
    non-positive count, a size below 32 pixels or a rate outside [0, 1].

    NOTE: a teaching toy, not medical data: no model trained on it is a diagnostic tool.
    """
    if split not in SCAN_SPLITS:
        raise ValueError(f"unknown scan split {split!r}; use 'train' or 'test'.")
    if not isinstance(num_scans, int) or num_scans < 1:
        raise ValueError(f"num_scans must be a positive int, got {num_scans!r}.")
    if not isinstance(image_size, int) or image_size < 32:
        raise ValueError(f"image_size must be an int >= 32 pixels, got {image_size!r}.")
    if not 0.0 <= lesion_rate <= 1.0:
        raise ValueError(f"lesion_rate must be a probability in [0, 1], got {lesion_rate!r}.")

    rows = []
    for index in range(num_scans):
        rng = np.random.default_rng([seed, SCAN_STREAM, SCAN_SPLITS.index(split), index])
        has_lesion = bool(rng.random() < lesion_rate)
        image, lesion = _draw_scan(rng, image_size, has_lesion)
        report, triples = _scan_text(lesion)
        rows.append({
            "image": image,
            "scan_id": f"scan-{split}-{seed}-{index:06d}",
            "has_lesion": has_lesion,
            "lesion_side": lesion["side"],
            "lesion_contrast": lesion["contrast"],
            "report": report,
            "questions": [q for q, _, _ in triples],
            "answers": [a for _, a, _ in triples],
            "question_types": [t for _, _, t in triples],
            "objects": [{"kind": "lesion", **{key: lesion[key] for key in ("side", "x", "y", "radius", "contrast")}}] if has_lesion else [],
        })
    return datasets.Dataset.from_list(rows, features=SCAN_FEATURES)


# ---------------------------------------------------------------------------------------------
# Loading a model an earlier notebook trained, or retraining it
# ---------------------------------------------------------------------------------------------

# A model retrained here is saved under its own name, so it never passes for the original.
RETRAINED_SUFFIX = "-retrained-in-06"


@dataclass
class LoadedModel:
    """A model ready for notebook 06: where it came from and the config it was built with.

    ``source`` is ``"checkpoint"`` (loaded from ``name``), ``"retrained"`` (a stand-in that
    notebook 06 trained in an earlier run because the original checkpoint was missing),
    ``"retrained now"`` or ``"trained now"``; ``profile`` is the profile its weights were
    trained in.
    """

    name: str
    model: Any
    config: dict[str, Any]
    source: str
    profile: str | None
    tokenizer: Any = None


def stored_profile(name: str) -> str | None:
    """Return the profile a checkpoint was trained in, or None when it does not exist or is unreadable."""
    path = paths.CHECKPOINT_DIR / f"{name}.pt"
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True).get("profile")
    except Exception:  # a damaged file raises many types; load_checkpoint rejects it as well
        return None


def load_or_retrain(
    name: str,
    factory: Callable[[dict[str, Any]], nn.Module],
    retrain: Callable[[], tuple[nn.Module, dict[str, Any]]],
    profile: str,
    made_by: str | None = None,
) -> LoadedModel:
    """Load checkpoint ``name``; when it is missing, train with ``retrain()`` and print that it did.

    ``made_by`` names the notebook that trains and saves ``name`` (e.g. "01"). Then the order
    is: that notebook's checkpoint, from any profile; a model this notebook retrained earlier
    in the same ``profile``, saved under ``name + RETRAINED_SUFFIX``; ``retrain()``, saved
    under that name for the next run. With ``made_by=None`` the model belongs to notebook 06
    itself: it is loaded from ``name`` when it was trained in the same ``profile``, and
    otherwise trained and saved under ``name``.

    ``retrain()`` returns ``(model, config)``; ``factory(config)`` rebuilds an untrained model
    from a stored config. Prints one line saying what happened.
    """
    if made_by is None:
        loaded = load_checkpoint(name, factory, profile=profile)
        if loaded is not None:
            print(f"✓ 載入本 notebook 之前在 profile {profile} 訓練的「{name}」")
            return LoadedModel(name, loaded[0].eval(), loaded[1], "checkpoint", profile)
        print(f"⏳ 還沒有「{name}」：現在用 profile {profile} 的設定訓練，之後直接載入……")
        return _train_and_save(name, retrain, profile, "trained now")

    loaded = load_checkpoint(name, factory)
    if loaded is not None:
        trained_in = stored_profile(name)
        print(f"✓ 載入 {made_by} 存的 checkpoint「{name}」（在 profile {trained_in} 訓練）")
        return LoadedModel(name, loaded[0].eval(), loaded[1], "checkpoint", trained_in)

    fallback = name + RETRAINED_SUFFIX
    loaded = load_checkpoint(fallback, factory, profile=profile)
    if loaded is not None:
        print(f"✓ 找不到「{name}」，載入本 notebook 之前在 profile {profile} 重新訓練的「{fallback}」")
        return LoadedModel(fallback, loaded[0].eval(), loaded[1], "retrained", profile)

    _announce_retraining(name, made_by, profile)
    return _train_and_save(fallback, retrain, profile, "retrained now")


def _announce_retraining(name: str, made_by: str, profile: str) -> None:
    """Print why checkpoint ``name`` cannot be used (missing, or saved by incompatible code) and that retraining starts."""
    if checkpoint_exists(name):
        reason = f"checkpoint「{name}」存在，但和目前的程式不相容（例如是舊版程式存的）；重新執行 notebook {made_by} 可以更新它"
    else:
        reason = f"找不到 checkpoint「{name}」（執行 notebook {made_by} 會產生它）"
    print(f"⚠ {reason}，現在用 profile {profile} 的小設定重新訓練……")


def _train_and_save(name: str, train: Callable[[], tuple[nn.Module, dict[str, Any]]], profile: str, source: str) -> LoadedModel:
    start = time.time()
    model, config = train()
    save_checkpoint(name, model, config, profile)
    print(f"  訓練完成（{time.time() - start:.0f} 秒），存成「{name}」")
    return LoadedModel(name, model.eval(), config, source, profile)


# ---------------------------------------------------------------------------------------------
# Visual question answering with CrossAttentionVQA
# ---------------------------------------------------------------------------------------------


def encode_vqa_examples(examples: VQAExamples, tokenizer: WordTokenizer, answers: Sequence[str]):
    """Return ``(input_ids, attention_mask, labels)`` for ``examples``: (Q, T) long, (Q, T) bool, (Q,) long.

    An answer outside ``answers`` gets the label -100, so it can never count as correct.
    """
    answer_to_id = {answer: index for index, answer in enumerate(answers)}
    input_ids, attention_mask = tokenizer(examples.questions)
    labels = torch.tensor([answer_to_id.get(answer, -100) for answer in examples.answers])
    return input_ids, attention_mask, labels


def train_vqa(
    examples: VQAExamples,
    model_config: dict[str, Any],
    steps: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    device: torch.device | str = "cpu",
    desc: str = "訓練 VQA",
    progress: bool = True,
) -> tuple[CrossAttentionVQA, dict[str, Any], dict[str, list[float]]]:
    """Train a :class:`CrossAttentionVQA` from scratch on ``examples`` (images in uint8, scaled to [0, 1] here).

    ``model_config`` holds the keyword arguments of the model except ``vocab_size`` and
    ``num_answers``, which come from the questions and answers. Returns ``(model, config,
    history)`` with the model in eval mode; ``config`` has the keys ``model``, ``tokenizer``,
    ``answers`` and ``question_types`` (the layout notebook 02 saves), so
    :func:`vqa_from_config` rebuilds it.
    """
    tokenizer = WordTokenizer.from_texts(examples.questions, max_length=model_config.get("max_question_len", 16))
    answers = sorted(set(examples.answers))
    input_ids, text_mask, labels = encode_vqa_examples(examples, tokenizer, answers)

    seed_everything(seed)
    model = CrossAttentionVQA(tokenizer.vocab_size, len(answers), **model_config).to(device)
    next_rows = batch_indices(len(examples), batch_size, seed=seed)

    def make_batch(step: int):
        rows = next_rows(step)
        images = examples.images[examples.image_index[rows]].float().div(255)  # (B, 3, S, S) in [0, 1]
        return [tensor.to(device) for tensor in (images, input_ids[rows], text_mask[rows], labels[rows])]

    def loss_fn(batch):
        images, ids, mask, targets = batch
        logits = model(images, ids, mask)
        return F.cross_entropy(logits, targets), {"accuracy": (logits.argmax(-1) == targets).float().mean().item()}

    model.train()
    history = fit(loss_fn, make_batch, model.parameters(), steps, lr=lr, weight_decay=0.01, desc=desc, progress=progress)
    model.eval()
    config = {"model": model.config, "tokenizer": tokenizer.to_config(), "answers": answers,
              "question_types": sorted(set(examples.question_types))}
    return model, config, history


def vqa_from_config(config: dict[str, Any]) -> CrossAttentionVQA:
    """Rebuild an untrained :class:`CrossAttentionVQA` from a checkpoint config (the layout of :func:`train_vqa`)."""
    return CrossAttentionVQA(**config["model"])


@torch.no_grad()
def predict_vqa(
    model: CrossAttentionVQA,
    examples: VQAExamples,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    batch_size: int = 256,
) -> torch.Tensor:
    """Return the answer logits (Q, num_answers) of ``model`` for every question of ``examples``, on the CPU."""
    device = next(model.parameters()).device
    outputs = []
    for start in range(0, len(examples), batch_size):
        rows = slice(start, start + batch_size)
        images = examples.images[examples.image_index[rows]].float().div(255).to(device)
        outputs.append(model(images, input_ids[rows].to(device), attention_mask[rows].to(device)).float().cpu())
    return torch.cat(outputs)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def accuracy_by_type(predicted: Sequence[str], answers: Sequence[str], question_types: Sequence[str]) -> pd.DataFrame:
    """Return one row per question type: count, accuracy, and the accuracy of always giving that type's most common answer.

    Raises ``ValueError`` when the three sequences differ in length or are empty.
    """
    if not len(predicted) == len(answers) == len(question_types) or len(answers) == 0:
        raise ValueError(
            f"predicted, answers and question_types must be non-empty and equally long, got "
            f"{len(predicted)}, {len(answers)} and {len(question_types)}."
        )
    rows = []
    for kind in sorted(set(question_types)):
        picked = [index for index, value in enumerate(question_types) if value == kind]
        truth = [answers[index] for index in picked]
        correct = sum(predicted[index] == answers[index] for index in picked)
        majority = max(truth.count(answer) for answer in set(truth))
        rows.append({"題型": kind, "題數": len(picked), "準確率": correct / len(picked), "猜最常見答案": majority / len(picked)})
    total_correct = sum(p == a for p, a in zip(predicted, answers))
    rows.append({"題型": "全部", "題數": len(answers), "準確率": total_correct / len(answers), "猜最常見答案": float("nan")})
    return pd.DataFrame(rows)


def binary_metrics(predicted: Sequence[bool] | np.ndarray, truth: Sequence[bool] | np.ndarray) -> dict[str, float]:
    """Return sensitivity, specificity, precision and accuracy of yes/no predictions.

    Sensitivity is the share of true positives found (NaN without positives), specificity the
    share of true negatives kept negative (NaN without negatives), precision the share of
    predicted positives that are real (NaN when nothing is predicted positive).
    """
    predicted = np.asarray(predicted, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if predicted.shape != truth.shape or predicted.ndim != 1:
        raise ValueError(f"predicted and truth must be 1-d and equally long, got shapes {predicted.shape} and {truth.shape}.")

    def ratio(numerator: int, denominator: int) -> float:
        return numerator / denominator if denominator else float("nan")

    true_positive = int((predicted & truth).sum())
    true_negative = int((~predicted & ~truth).sum())
    return {
        "sensitivity": ratio(true_positive, int(truth.sum())),
        "specificity": ratio(true_negative, int((~truth).sum())),
        "precision": ratio(true_positive, int(predicted.sum())),
        "accuracy": ratio(true_positive + true_negative, len(truth)),
    }


# ---------------------------------------------------------------------------------------------
# The LLaVA-style model of notebook 05
# ---------------------------------------------------------------------------------------------


def shapes_conversation(scene: dict[str, Any], rng: random.Random, turns: int) -> list[dict[str, str]]:
    """Return a chat about one ShapesWorld scene: up to ``turns`` question-answer pairs, the image in the first message."""
    pairs = rng.sample(list(zip(scene["questions"], scene["answers"])), k=min(turns, len(scene["questions"])))
    messages = []
    for turn, (question, answer) in enumerate(pairs):
        messages.append({"role": "user", "content": (llava.IMAGE_MARKER + "\n" if turn == 0 else "") + question})
        messages.append({"role": "assistant", "content": answer})
    return messages


def scene_answer(scene: dict[str, Any], question: str) -> str | None:
    """Return the true answer to ``question`` about a ShapesWorld scene, or None when the scene has none.

    A question the scene was generated with returns its stored answer. "is there a/an COLOR SHAPE?"
    is decided from the scene's objects for any colour and shape. Notebooks use this to mark chat
    replies right or wrong.
    """
    question = question.strip().lower()
    for known_question, answer in zip(scene["questions"], scene["answers"]):
        if known_question == question:
            return answer
    match = re.fullmatch(r"is there an? (\w+) (\w+)\?", question)
    if match:
        color, shape = match.groups()
        return "yes" if any(o["color"] == color and o["shape"] == shape for o in scene["objects"]) else "no"
    return None


def language_model_autocast(device: torch.device | str):
    """Return the autocast context for training or running a language model on ``device``.

    It is bf16 autocast on CUDA in every profile, and on a CPU when
    :func:`~course_utils.env.cpu_bf16_enabled` is True (bf16 matrix instructions, or
    ``COURSE_CPU_BF16=1``). Elsewhere it is a no-op context.
    """
    device_type = torch.device(device).type
    if device_type == "cuda" or (device_type == "cpu" and cpu_bf16_enabled()):
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_llava_shapes(
    scenes: datasets.Dataset,
    image_tokens: torch.Tensor,
    steps: int,
    caption_steps: int = 0,
    batch_size: int = 16,
    lr: float = 3e-3,
    caption_lr: float = 3e-3,
    lora_rank: int = 8,
    turns: int = 6,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[llava.MiniLlava, Any, dict[str, Any]]:
    """Train a :class:`~course_utils.vlm.llava.MiniLlava` on ShapesWorld, as notebook 05 does in short.

    The vision tokens are first standardized with statistics of ``image_tokens``. Stage 1 then
    trains the projector alone on the scenes' captions for ``caption_steps`` steps (notebook 05
    also mixes in OpenMoji names). Stage 2 trains the projector and LoRA adapters on
    question-answer chats of ``turns`` turns for ``steps`` steps. As in notebook 05, SmolLM2 runs
    with eager attention, and on a CPU the steps run under bf16 autocast when
    :func:`~course_utils.env.cpu_bf16_enabled` says so (weights stay float32).
    ``image_tokens`` (num_scenes, N, vision_dim) are the frozen vision tokens of ``scenes``,
    already pooled. Returns ``(model, tokenizer, config)``
    with the model in eval mode and ``config`` in the layout
    :func:`~course_utils.vlm.llava.save_mini_llava` expects.
    """
    from course_utils.pretrained import load_language_model

    if len(scenes) != len(image_tokens):
        raise ValueError(f"got {len(scenes)} scenes but {len(image_tokens)} rows of image tokens; pass one row per scene.")
    if steps < 1 or caption_steps < 0:
        raise ValueError(f"steps must be >= 1 and caption_steps >= 0, got steps={steps}, caption_steps={caption_steps}.")
    language_model, tokenizer = load_language_model(device, attn_implementation="eager")
    image_token_id = llava.image_placeholder_id(tokenizer)
    num_image_tokens = image_tokens.shape[1]
    captions = scenes["captions"]

    seed_everything(seed)
    model = llava.MiniLlava(language_model, image_tokens.shape[-1], image_token_id).to(device)
    model.standardize.fit(image_tokens.flatten(0, 1))
    rng = random.Random(seed)

    def to_device(samples, rows):
        batch = llava.pad_batch(samples, tokenizer.pad_token_id)
        labels = llava.build_labels(batch["input_ids"], batch["answer_mask"], batch["attention_mask"], image_token_id)
        return [tensor.to(device) for tensor in (batch["input_ids"], batch["attention_mask"], image_tokens[rows], labels)]

    def caption_batch(step: int):
        rows = [rng.randrange(len(scenes)) for _ in range(batch_size)]
        samples = [llava.build_chat_prompt(tokenizer, [{"role": "user", "content": f"{llava.IMAGE_MARKER}\nDescribe the image."},
                                                       {"role": "assistant", "content": rng.choice(captions[row])}],
                                           image_token_id, num_image_tokens) for row in rows]
        return to_device(samples, rows)

    def chat_batch(step: int):
        rows = [rng.randrange(len(scenes)) for _ in range(batch_size)]
        samples = [llava.build_chat_prompt(tokenizer, shapes_conversation(scenes[row], rng, turns), image_token_id, num_image_tokens)
                   for row in rows]
        return to_device(samples, rows)

    def loss(batch):
        with language_model_autocast(device):
            return model(*batch)

    model.train()
    if caption_steps:
        fit(loss, caption_batch, model.projector.parameters(), caption_steps, lr=caption_lr, desc="重新訓練 LLaVA：stage 1")
    lora = model.add_lora(rank=lora_rank, alpha=2 * lora_rank)
    trainable = [p for p in model.parameters() if p.requires_grad]
    fit(loss, chat_batch, trainable, steps, lr=lr, desc="重新訓練 LLaVA：stage 2")
    model.eval()
    config = {"vision_dim": image_tokens.shape[-1], "projector_kind": "mlp", "grid": math.isqrt(num_image_tokens),
              "lora_rank": lora_rank, "lora_alpha": 2 * lora_rank, "lora_targets": sorted(lora.target_modules),
              "stage1_steps": caption_steps, "stage1_data": "shapesworld",
              "standardized": bool((model.standardize.std != 1).any()), "stage2_steps": steps}
    return model, tokenizer, config


def load_or_retrain_llava(
    profile: str,
    retrain: Callable[[], tuple[llava.MiniLlava, Any, dict[str, Any]]],
    device: torch.device | str = "cpu",
    name: str = "llava_shapes",
) -> LoadedModel:
    """Like :func:`load_or_retrain` for the LLaVA model, whose checkpoint holds only the projector and LoRA adapters.

    ``LoadedModel.model`` is the :class:`~course_utils.vlm.llava.MiniLlava` and
    ``LoadedModel.tokenizer`` SmolLM2's tokenizer. ``retrain()`` returns ``(model, tokenizer,
    config)``, as :func:`train_llava_shapes` does.
    """
    loaded = llava.load_mini_llava(name, device)
    if loaded is not None:
        trained_in = stored_profile(name)
        print(f"✓ 載入 05 存的 checkpoint「{name}」（在 profile {trained_in} 訓練）")
        return LoadedModel(name, loaded[0], loaded[2], "checkpoint", trained_in, loaded[1])

    fallback = name + RETRAINED_SUFFIX
    loaded = llava.load_mini_llava(fallback, device, profile=profile)
    if loaded is not None:
        print(f"✓ 找不到「{name}」，載入本 notebook 之前在 profile {profile} 重新訓練的「{fallback}」")
        return LoadedModel(fallback, loaded[0], loaded[2], "retrained", profile, loaded[1])

    _announce_retraining(name, "05", profile)
    start = time.time()
    model, tokenizer, config = retrain()
    llava.save_mini_llava(fallback, model, config, profile)
    print(f"  訓練完成（{time.time() - start:.0f} 秒），存成「{fallback}」")
    return LoadedModel(fallback, model.eval(), config, "retrained now", profile, tokenizer)


def generate_replies(
    model: llava.MiniLlava,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    image_tokens: torch.Tensor,
    max_new_tokens: int = 4,
    batch_size: int = 64,
) -> list[str]:
    """Greedy replies of ``model`` to prompt ids (one image per prompt, rows of ``image_tokens``), decoded without special tokens.

    Prompts are left-padded in batches; decoding stops at ``<|im_end|>``. Raises
    ``ValueError`` when the numbers of prompts and images differ.
    """
    if len(prompts) != len(image_tokens):
        raise ValueError(f"got {len(prompts)} prompts but {len(image_tokens)} images; pass one image per prompt.")
    device = next(model.projector.parameters()).device
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    replies = []
    for start in range(0, len(prompts), batch_size):
        input_ids, attention_mask, _ = llava.batch_for_generation(prompts[start : start + batch_size], tokenizer.pad_token_id)
        output = model.generate(input_ids.to(device), attention_mask.to(device),
                                image_tokens[start : start + batch_size].to(device), max_new_tokens, end_id)
        replies += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in output]
    return replies


def first_word(text: str) -> str:
    """Return the first lowercase word (letters and digits) of ``text``, or "" when there is none."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return words[0] if words else ""


# ---------------------------------------------------------------------------------------------
# CLIP models of notebook 01
# ---------------------------------------------------------------------------------------------


def caption_positives(captions: Sequence[str]) -> torch.Tensor:
    """Return the (N, N) bool matrix that is True where two captions are equal (repeated captions both count as matches)."""
    index = {caption: number for number, caption in enumerate(dict.fromkeys(captions))}
    ids = torch.tensor([index[caption] for caption in captions])
    return ids[:, None] == ids[None, :]


def train_tiny_clip(
    scenes: datasets.Dataset,
    model_config: dict[str, Any],
    steps: int,
    batch_size: int = 96,
    lr: float = 2e-3,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[clip.TinyCLIP, dict[str, Any]]:
    """Train a :class:`~course_utils.vlm.clip.TinyCLIP` from scratch on ShapesWorld scenes.

    Each step pairs every scene of the batch with one of its captions, drawn at random.
    ``model_config`` holds :class:`~course_utils.vlm.clip.TinyCLIPConfig` fields except
    ``vocab_size``. Returns ``(model, config)`` with the model in eval mode and
    ``config = {"model": ..., "tokenizer": ...}``, the layout notebook 01 saves.
    """
    captions = list(scenes["captions"])
    tokenizer = WordTokenizer.from_texts([c for options in captions for c in options], max_length=model_config.get("max_length", 24))
    images = clip.images_to_tensor(scenes["image"])  # (N, 3, S, S) in [-1, 1]

    seed_everything(seed)
    model = clip.TinyCLIP(clip.TinyCLIPConfig(vocab_size=tokenizer.vocab_size, **model_config)).to(device)
    next_rows = batch_indices(len(images), batch_size, seed=seed)
    rng = random.Random(seed)

    def make_batch(step: int):
        rows = next_rows(step)
        input_ids, attention_mask = tokenizer([rng.choice(captions[row]) for row in rows.tolist()])
        return images[rows].to(device), input_ids.to(device), attention_mask.to(device)

    model.train()
    fit(lambda batch: model.loss(*batch), make_batch, model.parameters(), steps, lr=lr, weight_decay=0.05, desc="重新訓練 tiny CLIP")
    model.eval()
    return model, {"model": model.config_dict(), "tokenizer": tokenizer.to_config()}


def tiny_clip_from_config(config: dict[str, Any]) -> clip.TinyCLIP:
    """Rebuild an untrained :class:`~course_utils.vlm.clip.TinyCLIP` from a checkpoint config."""
    return clip.TinyCLIP.from_config(config["model"])


def clip_heads_from_config(config: dict[str, Any]) -> clip.CLIPHeads:
    """Rebuild an untrained :class:`~course_utils.vlm.clip.CLIPHeads` from a checkpoint config."""
    return clip.CLIPHeads.from_config(config["model"])


_ENCODERS: dict[str, Any] = {}


def frozen_encoders(device: torch.device | str = "cpu") -> tuple[Any, Any]:
    """Return the frozen image and text encoders, loaded once per process."""
    from course_utils.pretrained import load_image_encoder, load_text_encoder

    if not _ENCODERS:
        _ENCODERS["image"] = load_image_encoder(device)
        _ENCODERS["text"] = load_text_encoder(device)
    return _ENCODERS["image"], _ENCODERS["text"]


def openmoji_features(dataset: datasets.Dataset, split: str, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Return the frozen features of an OpenMoji split: ``image`` (N, 1280) pooled and ``text`` (N, 384) sentence embeddings.

    Cached under the key notebook 01 uses for the same split and size, so each set of
    features is computed once for the whole course.
    """
    from course_utils.pretrained import cached_features

    def compute() -> dict[str, torch.Tensor]:
        image_encoder, text_encoder = frozen_encoders(device)
        return {"image": image_encoder.encode(list(dataset["image"])).pooled.float().cpu(),
                "text": text_encoder.encode(list(dataset["caption"])).sentence.float().cpu()}

    return cached_features(f"openmoji-{split}-{len(dataset)}-64px-effnetlite0-pooled-minilm-sentence", compute)


def train_clip_heads(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    config: clip.CLIPHeadsConfig,
    steps: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    loss_fn: Callable[[clip.CLIPHeads, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    desc: str = "CLIP heads",
    progress: bool = True,
    prepare: Callable[[clip.CLIPHeads], clip.CLIPHeads] | None = None,
) -> tuple[clip.CLIPHeads, dict[str, list[float]]]:
    """Train :class:`~course_utils.vlm.clip.CLIPHeads` on frozen pairs (N, image_dim) and (N, text_dim).

    ``loss_fn(heads, image_batch, text_batch)`` replaces the default ``heads.loss`` (CLIP's
    loss), e.g. to show what a wrong loss does. ``prepare(heads)``, when given, changes the
    freshly built heads before training (for example to share one head between both
    modalities) and returns them. Returns ``(heads, history)`` with the heads in eval mode.
    """
    if len(image_features) != len(text_features):
        raise ValueError(f"got {len(image_features)} image features but {len(text_features)} text features; pass pairs.")
    seed_everything(seed)
    heads = clip.CLIPHeads(config)
    if prepare is not None:
        heads = prepare(heads)
    next_rows = batch_indices(len(image_features), min(batch_size, len(image_features)), seed=seed)
    compute = loss_fn or (lambda model, images, texts: model.loss(images, texts))

    heads.train()
    history = fit(lambda rows: compute(heads, image_features[rows], text_features[rows]), next_rows, heads.parameters(),
                  steps, lr=lr, weight_decay=0.05, desc=desc, progress=progress)
    heads.eval()
    return heads, history
