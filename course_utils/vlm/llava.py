"""LLaVA: project frozen vision features into a language model's embedding space and chat about images.

The pieces, in the order a sample flows through them:

1. :class:`LlavaProjector` maps vision tokens (width ``vision_dim``) to the language model's
   hidden width: one linear layer (LLaVA) or two with a GELU between them (LLaVA-1.5).
2. :func:`build_chat_prompt` writes a conversation in SmolLM2's chat template (ChatML) as token
   ids. Each ``<image>`` in a message becomes ``num_image_tokens`` copies of a placeholder id
   (:func:`expand_image_tokens`), and an answer mask marks the assistant's tokens.
3. :func:`merge_image_features` writes the projected features into the placeholder positions
   of the token embeddings, and raises when the counts differ instead of misaligning silently.
4. :func:`build_labels` keeps the real ids on answer tokens only and puts the ignore index
   (-100) everywhere else: system, prompt, image and padding positions.
5. :func:`causal_lm_loss` shifts by one position, once: the logits at position ``t`` predict
   the label at ``t + 1``. Labels therefore stay aligned with ``input_ids``, which is also
   what transformers' causal LM loss expects, because it shifts internally.
6. :func:`greedy_generate` decodes a left-padded batch, with position ids counted from each
   row's first real token.

:class:`MiniLlava` ties these together around a frozen (optionally LoRA-adapted) causal LM.
The vision tower is not part of it: its features are computed once and cached, because it
stays frozen in both training stages.

Mask convention: ``attention_mask`` is 1/True on real tokens and 0/False on padding
(transformers' convention); ``answer_mask`` is True on the tokens the model learns to produce.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from course_utils.vlm.sharing import count_parameters  # noqa: F401  (notebooks call llava.count_parameters)

IGNORE_INDEX = -100
IMAGE_MARKER = "<image>"

# SmolLM2's vocabulary reserves special tokens that chat never uses. One of them serves as the
# image placeholder, so the vocabulary (and the tied embedding matrix) stays unchanged. Its own
# embedding is never read, because merge_image_features overwrites every placeholder position.
SMOLLM2_IMAGE_PLACEHOLDER = "<empty_output>"

PROJECTOR_KINDS = ("linear", "mlp")


# ---------------------------------------------------------------------------------------------
# Projector
# ---------------------------------------------------------------------------------------------


class LlavaProjector(nn.Module):
    """Map vision tokens (..., vision_dim) to language-model embeddings (..., text_dim).

    ``kind="linear"`` is the original LLaVA projector, one ``nn.Linear`` named ``linear_1``.
    ``kind="mlp"`` is LLaVA-1.5's ``linear_1 -> GELU (exact, erf form) -> linear_2``, the same
    layout and names as transformers' ``LlavaMultiModalProjector``, so weights copy across by name.
    Every vision token is projected on its own: the number of tokens is unchanged.

    Raises ``ValueError`` for an unknown ``kind``, non-positive widths, or an input whose last
    dimension is not ``vision_dim``.
    """

    def __init__(self, vision_dim: int, text_dim: int, kind: str = "mlp", bias: bool = True):
        super().__init__()
        if kind not in PROJECTOR_KINDS:
            raise ValueError(f"kind={kind!r} is not a projector kind; use one of {PROJECTOR_KINDS}.")
        if vision_dim <= 0 or text_dim <= 0:
            raise ValueError(f"vision_dim and text_dim must be positive, got {vision_dim} and {text_dim}.")
        self.vision_dim = vision_dim
        self.text_dim = text_dim
        self.kind = kind
        self.linear_1 = nn.Linear(vision_dim, text_dim, bias=bias)
        if kind == "mlp":
            self.act = nn.GELU()
            self.linear_2 = nn.Linear(text_dim, text_dim, bias=bias)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        if image_features.shape[-1] != self.vision_dim:
            raise ValueError(
                f"image_features has width {image_features.shape[-1]} in its last dimension, but this "
                f"projector expects vision_dim={self.vision_dim}; build it with the vision encoder's width."
            )
        hidden = self.linear_1(image_features)  # (..., text_dim)
        if self.kind == "mlp":
            hidden = self.linear_2(self.act(hidden))  # (..., text_dim)
        return hidden

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


def pool_image_tokens(tokens: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Average-pool a square grid of vision tokens down to ``grid_size x grid_size`` tokens.

    ``tokens`` is (B, N, D) with N = side * side in row-major order (e.g. EfficientNet's 7x7
    grid); returns (B, grid_size**2, D). ``grid_size == side`` returns the input unchanged.
    Fewer tokens make every language-model step cheaper, at the price of spatial detail: each
    pooled token averages a block of neighbouring cells. Raises ``ValueError`` when N is not a
    square or ``grid_size`` is not in 1..side.
    """
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be (B, N, D), got shape {tuple(tokens.shape)}.")
    batch, num_tokens, dim = tokens.shape
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"pool_image_tokens needs a square grid of tokens, got N={num_tokens}.")
    if not 1 <= grid_size <= side:
        raise ValueError(f"grid_size must be between 1 and {side} for a {side}x{side} grid, got {grid_size}.")
    if grid_size == side:
        return tokens

    grid = tokens.transpose(1, 2).reshape(batch, dim, side, side)  # (B, D, side, side)
    pooled = F.adaptive_avg_pool2d(grid, grid_size)  # (B, D, g, g)
    return pooled.flatten(2).transpose(1, 2)  # (B, g*g, D)


# ---------------------------------------------------------------------------------------------
# Image tokens in the prompt
# ---------------------------------------------------------------------------------------------


def expand_image_tokens(token_ids: Sequence[int], image_token_id: int, num_image_tokens: int) -> list[int]:
    """Replace each single image placeholder id by ``num_image_tokens`` copies of it.

    ``token_ids`` is one sample's ids (a list or a 1-D tensor); returns a new list. After
    expansion there is one placeholder position per visual token, which is what
    :func:`merge_image_features` fills. Raises ``ValueError`` when ``token_ids`` contains no
    placeholder, or when it already contains a run of placeholders (it was expanded before).
    """
    if num_image_tokens < 1:
        raise ValueError(f"num_image_tokens must be at least 1, got {num_image_tokens}.")
    ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else list(token_ids)
    if image_token_id not in ids:
        raise ValueError(
            f"token_ids contains no image placeholder (id {image_token_id}); put one where the image goes."
        )

    expanded: list[int] = []
    for index, token in enumerate(ids):
        if token == image_token_id:
            if index > 0 and ids[index - 1] == image_token_id:
                raise ValueError(
                    "token_ids already contains consecutive image placeholders; expand a prompt only once."
                )
            expanded.extend([image_token_id] * num_image_tokens)
        else:
            expanded.append(token)
    return expanded


def merge_image_features(
    input_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    image_features: torch.Tensor,
    image_token_id: int,
) -> torch.Tensor:
    """Write projected image features into the image placeholder positions of the embeddings.

    Args:
        input_embeds: (B, T, D) token embeddings of ``input_ids``.
        input_ids: (B, T) token ids; positions equal to ``image_token_id`` receive image features.
        image_features: (num_images, N, D) projected features, or (num_images * N, D).
            Images are consumed in reading order: row 0 left to right, then row 1, and so on,
            and each image fills the next N placeholder positions in order.
        image_token_id: id of the placeholder token.

    Returns:
        A new (B, T, D) tensor in ``input_embeds``' dtype: the text embeddings where the id is not
        the placeholder, the image features where it is. Gradients reach both inputs.

    Raises:
        ValueError: when the number of placeholder positions differs from the number of feature
            vectors (for example after a prompt was truncated), when an image's N positions would
            be split across two rows, or when shapes do not fit together.
    """
    if input_embeds.dim() != 3:
        raise ValueError(f"input_embeds must be (B, T, D), got shape {tuple(input_embeds.shape)}.")
    if tuple(input_ids.shape) != tuple(input_embeds.shape[:2]):
        raise ValueError(
            f"input_ids has shape {tuple(input_ids.shape)} but input_embeds starts with "
            f"{tuple(input_embeds.shape[:2])}; both must be (B, T)."
        )
    if image_features.dim() not in (2, 3):
        raise ValueError(
            f"image_features must be (num_images, N, D) or (num_images * N, D), got shape {tuple(image_features.shape)}."
        )
    dim = input_embeds.shape[-1]
    if image_features.shape[-1] != dim:
        raise ValueError(
            f"image_features has width {image_features.shape[-1]} but the embeddings have width {dim}; "
            "project the image features to the language model's hidden size first."
        )

    placeholder_mask = input_ids == image_token_id  # (B, T)
    num_positions = int(placeholder_mask.sum())
    flat_features = image_features.reshape(-1, dim)  # (num_images * N, D)
    num_vectors = flat_features.shape[0]
    if num_positions != num_vectors:
        raise ValueError(
            f"the prompt has {num_positions} image placeholder positions but {num_vectors} image feature "
            "vectors were given; expand each placeholder to exactly N positions and do not truncate "
            "a prompt inside its image tokens."
        )

    if image_features.dim() == 3:
        tokens_per_image = image_features.shape[1]
        per_row = placeholder_mask.sum(dim=1)  # (B,)
        split_rows = (per_row % tokens_per_image).nonzero().flatten().tolist()
        if split_rows:
            raise ValueError(
                f"row(s) {split_rows} hold {per_row[split_rows].tolist()} image placeholder positions, "
                f"which is not a multiple of the {tokens_per_image} tokens per image; an image would be "
                "split across two samples."
            )

    merged = input_embeds.clone()
    merged[placeholder_mask] = flat_features.to(merged.dtype)  # boolean indexing walks row-major
    return merged


# ---------------------------------------------------------------------------------------------
# Labels and loss
# ---------------------------------------------------------------------------------------------


def build_labels(
    input_ids: torch.Tensor,
    answer_mask: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    image_token_id: int | None = None,
) -> torch.Tensor:
    """Build causal-LM labels: real ids on answer tokens, ``IGNORE_INDEX`` (-100) elsewhere.

    A position keeps its id only when it is an answer token (``answer_mask`` True), a real
    token (``attention_mask`` nonzero) and not an image placeholder. System, user prompt, chat
    template, image and padding positions get -100, so they add nothing to the loss.

    No shift happens here: ``labels[b, t]`` is the id at ``input_ids[b, t]``. The loss shifts
    once (:func:`causal_lm_loss`, and transformers' causal LM loss both compare the logits at
    ``t`` with the label at ``t + 1``); shifting here as well would train each position to
    predict the token two steps ahead.

    Args:
        input_ids: (B, T) long.
        answer_mask: (B, T) bool, True on the tokens the model should learn to produce.
        attention_mask: optional (B, T), nonzero on real tokens.
        image_token_id: optional placeholder id; its positions are ignored even when
            ``answer_mask`` marks them.

    Returns:
        (B, T) long labels.

    Raises:
        ValueError: when a row has no answer token left (for example a truncated answer), since
            such a row would contribute a 0/0 loss; or when shapes differ.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}.")
    if tuple(answer_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"answer_mask has shape {tuple(answer_mask.shape)}, input_ids {tuple(input_ids.shape)}; they must match."
        )

    keep = answer_mask.bool()
    if attention_mask is not None:
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}; they must match."
            )
        keep = keep & attention_mask.bool()
    if image_token_id is not None:
        keep = keep & (input_ids != image_token_id)

    empty_rows = (~keep.any(dim=1)).nonzero().flatten().tolist()
    if empty_rows:
        raise ValueError(
            f"row(s) {empty_rows} have no answer token left to learn from; check that the answer was "
            "not truncated away and that answer_mask marks the assistant's tokens."
        )
    return torch.where(keep, input_ids, torch.full_like(input_ids, IGNORE_INDEX))


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions whose label is not -100.

    ``logits`` is (B, T, V) and ``labels`` (B, T), aligned with the input ids. The single shift
    happens here: the logits at position t are scored against ``labels[:, t + 1]``. Raises
    ``ValueError`` when no position has a label, instead of returning NaN.
    """
    if logits.dim() != 3 or tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"logits must be (B, T, V) and labels (B, T), got {tuple(logits.shape)} and {tuple(labels.shape)}."
        )
    shifted_logits = logits[:, :-1].float()  # (B, T-1, V)
    shifted_labels = labels[:, 1:]  # (B, T-1)
    if not (shifted_labels != IGNORE_INDEX).any():
        raise ValueError("no position has a label after the shift; every label is -100.")
    return F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]), shifted_labels.reshape(-1), ignore_index=IGNORE_INDEX
    )


# ---------------------------------------------------------------------------------------------
# Chat template (SmolLM2 uses ChatML)
# ---------------------------------------------------------------------------------------------


@dataclass
class ChatSample:
    """One conversation as token ids, with ``answer_mask`` True on the assistant's tokens."""

    input_ids: list[int]
    answer_mask: list[bool]


def image_placeholder_id(tokenizer) -> int:
    """Return the id of the token that marks image positions in a SmolLM2 prompt."""
    token_id = tokenizer.convert_tokens_to_ids(SMOLLM2_IMAGE_PLACEHOLDER)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(
            f"the tokenizer has no {SMOLLM2_IMAGE_PLACEHOLDER!r} token; pass image_token_id explicitly "
            "(any id that never occurs in text)."
        )
    return token_id


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def build_chat_prompt(
    tokenizer,
    messages: Sequence[dict],
    image_token_id: int | None = None,
    num_image_tokens: int = 1,
    add_generation_prompt: bool = False,
) -> ChatSample:
    """Write ``messages`` in SmolLM2's chat template (ChatML) as token ids.

    Each message is ``{"role": "system" | "user" | "assistant", "content": str}`` and becomes
    ``<|im_start|>{role}\\n{content}<|im_end|>\\n``. Each ``<image>`` inside a content string
    becomes ``num_image_tokens`` copies of ``image_token_id``. With ``add_generation_prompt``
    the ids end with ``<|im_start|>assistant\\n``, where the model's answer starts.

    ``answer_mask`` is True on the content of assistant messages and on the ``<|im_end|>``
    that closes them (so the model learns to stop), False on everything else. Unlike
    SmolLM2's own template, no default system message is inserted when none is given, which
    keeps training sequences short. Without images the ids equal
    ``tokenizer.apply_chat_template`` on the same messages once a system message is present.

    Raises ``ValueError`` for an unknown role, an ``<image>`` without ``image_token_id``, or
    an empty conversation.
    """
    if not messages:
        raise ValueError("messages is empty; give at least one {'role': ..., 'content': ...} dict.")
    start_id = tokenizer.convert_tokens_to_ids("<|im_start|>")
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    newline = _encode(tokenizer, "\n")

    ids: list[int] = []
    answer: list[bool] = []

    def append(new_ids: list[int], is_answer: bool) -> None:
        ids.extend(new_ids)
        answer.extend([is_answer] * len(new_ids))

    for message in messages:
        role, content = message["role"], message["content"]
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"role {role!r} is not one of 'system', 'user', 'assistant'.")
        is_answer = role == "assistant"
        append([start_id] + _encode(tokenizer, role + "\n"), False)

        pieces = content.split(IMAGE_MARKER)
        for index, piece in enumerate(pieces):
            append(_encode(tokenizer, piece), is_answer)
            if index < len(pieces) - 1:
                if image_token_id is None:
                    raise ValueError(f"a message contains {IMAGE_MARKER!r} but image_token_id is None.")
                append([image_token_id] * num_image_tokens, False)

        append([end_id], is_answer)
        append(newline, False)

    if add_generation_prompt:
        append([start_id] + _encode(tokenizer, "assistant\n"), False)
    return ChatSample(input_ids=ids, answer_mask=answer)


# ---------------------------------------------------------------------------------------------
# Batching and generation
# ---------------------------------------------------------------------------------------------


def pad_batch(
    samples: Sequence[ChatSample | Sequence[int]],
    pad_token_id: int,
    padding_side: str = "right",
) -> dict[str, torch.Tensor]:
    """Pad samples of different lengths into one batch.

    Returns ``input_ids`` (B, T) long, ``attention_mask`` (B, T) long (1 = real token) and
    ``answer_mask`` (B, T) bool (False on padding; all False for plain id lists). Use
    ``padding_side="left"`` for generation, so every row's last position is a real token.
    Raises ``ValueError`` for an empty batch, an empty sample or an unknown side.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
    if not samples:
        raise ValueError("samples is empty.")
    id_lists = [list(s.input_ids) if isinstance(s, ChatSample) else list(s) for s in samples]
    mask_lists = [list(s.answer_mask) if isinstance(s, ChatSample) else [False] * len(s) for s in samples]
    if any(len(ids) == 0 for ids in id_lists):
        raise ValueError("a sample has no tokens; every sample needs at least one token.")
    length = max(len(ids) for ids in id_lists)

    input_ids = torch.full((len(id_lists), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(id_lists), length), dtype=torch.long)
    answer_mask = torch.zeros((len(id_lists), length), dtype=torch.bool)
    for row, (ids, answers) in enumerate(zip(id_lists, mask_lists)):
        span = slice(length - len(ids), length) if padding_side == "left" else slice(0, len(ids))
        input_ids[row, span] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, span] = 1
        answer_mask[row, span] = torch.tensor(answers, dtype=torch.bool)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "answer_mask": answer_mask}


def position_ids_from_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Count positions from each row's first real token: (B, T) mask -> (B, T) long position ids.

    Real tokens get 0, 1, 2, ... whether the row is left- or right-padded; padding positions get
    0 (their value does not matter, because no real token attends to them).
    """
    mask = attention_mask.long()
    positions = mask.cumsum(dim=-1) - 1  # (B, T)
    return positions.masked_fill(mask == 0, 0)


def batch_for_generation(sequences: Sequence[Sequence[int]], pad_token_id: int):
    """Left-pad token sequences for batched generation.

    Returns ``(input_ids, attention_mask, position_ids)``, each (B, T) long, T the longest
    length. Padding goes on the left so the last column is a real token in every row: that is
    where generation reads the next-token logits. Position ids start at 0 on each row's first
    real token (0 on padding).
    """
    batch = pad_batch(sequences, pad_token_id, padding_side="left")
    position_ids = position_ids_from_attention_mask(batch["attention_mask"])
    return batch["input_ids"], batch["attention_mask"], position_ids


def _cache_of(outputs):
    # transformers 5.25 returns the KV cache as ``cache``; earlier releases call it ``past_key_values``.
    cache = getattr(outputs, "cache", None)
    return cache if cache is not None else getattr(outputs, "past_key_values", None)


@torch.no_grad()
def greedy_generate(
    language_model: nn.Module,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int,
) -> torch.Tensor:
    """Greedy decoding from a left-padded batch of input embeddings, with a KV cache.

    Args:
        language_model: a transformers causal LM (e.g. ``LlamaForCausalLM``), LoRA-wrapped or not.
        inputs_embeds: (B, T, D), left-padded (image features already merged in).
        attention_mask: (B, T), 1 on real tokens.
        max_new_tokens: number of decoding steps at most.
        eos_token_id: a row stops after producing it and is then filled with it.

    Returns:
        (B, L) long ids of the new tokens, L <= ``max_new_tokens`` (decoding stops early when
        every row has produced ``eos_token_id``).

    Raises:
        ValueError: when some row ends in padding (right padding): its next-token logits would
            be read at a pad position.
    """
    if inputs_embeds.dim() != 3 or tuple(attention_mask.shape) != tuple(inputs_embeds.shape[:2]):
        raise ValueError(
            f"inputs_embeds must be (B, T, D) and attention_mask (B, T), got {tuple(inputs_embeds.shape)} "
            f"and {tuple(attention_mask.shape)}."
        )
    right_padded = (attention_mask[:, -1] == 0).nonzero().flatten().tolist()
    if right_padded:
        raise ValueError(
            f"row(s) {right_padded} end with padding, so their next token would be read at a pad position; "
            "pad on the left for generation (pad_batch(..., padding_side='left'))."
        )

    attention_mask = attention_mask.long()
    position_ids = position_ids_from_attention_mask(attention_mask)
    embed = language_model.get_input_embeddings()
    finished = torch.zeros(inputs_embeds.shape[0], dtype=torch.bool, device=inputs_embeds.device)
    generated: list[torch.Tensor] = []
    cache = None
    step_embeds = inputs_embeds

    for _ in range(max_new_tokens):
        outputs = language_model(
            inputs_embeds=step_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        )
        cache = _cache_of(outputs)
        next_ids = outputs.logits[:, -1].argmax(dim=-1)  # (B,)
        next_ids = torch.where(finished, torch.full_like(next_ids, eos_token_id), next_ids)
        generated.append(next_ids)
        finished |= next_ids == eos_token_id
        if bool(finished.all()):
            break

        step_embeds = embed(next_ids[:, None]).to(inputs_embeds.dtype)  # (B, 1, D)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
        position_ids = position_ids[:, -1:] + 1  # (B, 1)

    return torch.stack(generated, dim=1)


# ---------------------------------------------------------------------------------------------
# The model: projector + language model
# ---------------------------------------------------------------------------------------------


class FeatureStandardizer(nn.Module):
    """Standardize every vision dimension: ``(tokens - mean) / std``, with stored statistics.

    It starts as the identity (mean 0, std 1). :meth:`fit` sets the statistics from training
    tokens, once, before training. They are buffers: a checkpoint stores them, and a loaded
    model standardizes its inputs exactly as in training. The dimensions of a frozen encoder's
    features have very different spreads, and some of EfficientNet-Lite0's never change at all.
    After standardization each dimension that varies starts on the same scale in the projector,
    and a dimension with zero spread stays 0.
    """

    def __init__(self, vision_dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(vision_dim))
        self.register_buffer("std", torch.ones(vision_dim))

    @torch.no_grad()
    def fit(self, tokens: torch.Tensor, min_std: float = 1e-6) -> "FeatureStandardizer":
        """Set mean and std per dimension from ``tokens`` (..., vision_dim), over every other axis."""
        if tokens.shape[-1] != self.mean.numel():
            raise ValueError(
                f"tokens have width {tokens.shape[-1]}, but this standardizer has vision_dim={self.mean.numel()}; "
                f"fit it on tokens of the same vision encoder."
            )
        flat = tokens.detach().reshape(-1, tokens.shape[-1]).float()
        if flat.shape[0] < 2:
            raise ValueError(f"fit needs at least 2 tokens to estimate a standard deviation, got {flat.shape[0]}.")
        self.mean.copy_(flat.mean(0))
        self.std.copy_(flat.std(0).clamp_min(min_std))  # a constant dimension would divide by zero
        return self

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return (tokens - self.mean.to(tokens.dtype)) / self.std.to(tokens.dtype)


class MiniLlava(nn.Module):
    """A LLaVA-style model on cached vision tokens: projector + causal language model.

    Args:
        language_model: a transformers causal LM with ``get_input_embeddings()``, e.g. SmolLM2.
        vision_dim: width of the cached vision tokens (1280 for EfficientNet-Lite0).
        image_token_id: placeholder id whose positions receive the projected image tokens.
        projector_kind: ``"mlp"`` (LLaVA-1.5) or ``"linear"`` (LLaVA).

    The language model's parameters are frozen at construction; :meth:`add_lora` adds
    trainable LoRA adapters for stage 2. ``standardize`` (identity until its ``fit`` is called)
    rescales the vision tokens before the projector.
    """

    def __init__(self, language_model: nn.Module, vision_dim: int, image_token_id: int, projector_kind: str = "mlp"):
        super().__init__()
        embeddings = language_model.get_input_embeddings()
        self.language_model = language_model
        self.standardize = FeatureStandardizer(vision_dim).to(embeddings.weight.device)
        self.projector = LlavaProjector(vision_dim, embeddings.embedding_dim, kind=projector_kind).to(embeddings.weight.device)
        self.image_token_id = image_token_id
        self.language_model.requires_grad_(False)

    def embed(self, input_ids: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Return (B, T, D) input embeddings with projected ``image_tokens`` (num_images, N, vision_dim) merged in."""
        text_embeds = self.language_model.get_input_embeddings()(input_ids)  # (B, T, D)
        image_embeds = self.projector(self.standardize(image_tokens.float()).to(text_embeds.dtype))  # (num_images, N, D)
        return merge_image_features(text_embeds, input_ids, image_embeds, self.image_token_id)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_tokens: torch.Tensor,
        labels: torch.Tensor | None = None,
    ):
        """Return the loss on ``labels`` (B, T) when given, else the logits (B, T, V).

        With labels, the output layer runs only at positions whose next label is not -100,
        which gives the same loss as :func:`causal_lm_loss` on the full logits at a fraction of
        the cost (the vocabulary projection is 49152 wide for SmolLM2).
        """
        inputs_embeds = self.embed(input_ids, image_tokens)  # (B, T, D)
        position_ids = position_ids_from_attention_mask(attention_mask)
        base = self._base_causal_lm()
        hidden = base.model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state  # (B, T, D)
        if labels is None:
            return base.lm_head(hidden)  # (B, T, V)

        targets = labels[:, 1:]  # (B, T-1): the single shift
        selected = targets != IGNORE_INDEX
        if not bool(selected.any()):
            raise ValueError("every label is -100, so there is nothing to learn from this batch.")
        logits = base.lm_head(hidden[:, :-1][selected])  # (num_answer_tokens, V)
        return F.cross_entropy(logits.float(), targets[selected])

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_tokens: torch.Tensor,
        max_new_tokens: int,
        eos_token_id: int,
    ) -> torch.Tensor:
        """Greedy decoding from a left-padded batch; returns (B, L) new token ids."""
        inputs_embeds = self.embed(input_ids, image_tokens)
        return greedy_generate(self.language_model, inputs_embeds, attention_mask, max_new_tokens, eos_token_id)

    def add_lora(self, rank: int = 8, alpha: int = 16, target_modules: Sequence[str] = ("q_proj", "v_proj")):
        """Add LoRA adapters (peft) to the language model's attention projections; only they train.

        Returns the peft configuration. The base weights stay frozen and unchanged, so the adapters
        (a few hundred thousand parameters for SmolLM2-135M at rank 8) are all a checkpoint needs.
        """
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=0.0, bias="none")
        with warnings.catch_warnings():
            # peft reads transformers' deprecated `is_gradient_checkpointing` property while it
            # wraps the model. The FutureWarning concerns peft's code, so learners cannot act on it.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            self.language_model = get_peft_model(self.language_model, config)
        return config

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Return the parameters that require grad (projector, LoRA adapters), detached, by name."""
        return {name: p.detach().clone() for name, p in self.named_parameters() if p.requires_grad}

    def trained_parts(self) -> nn.Module:
        """Return a module that shares the projector and the LoRA adapters with this model.

        Its ``state_dict`` holds only those weights and the feature statistics (a few MB instead
        of the whole language model), so ``save_checkpoint`` stores just what training changed,
        and loading a checkpoint into it updates this model in place.
        """
        parts = nn.Module()
        parts.standardize = self.standardize
        parts.projector = self.projector
        adapters = nn.ModuleDict()
        for name, module in self.language_model.named_modules():
            lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
            if isinstance(lora_a, nn.ModuleDict) and isinstance(lora_b, nn.ModuleDict):
                key = name.replace(".", "-")  # module names may not contain dots
                adapters[f"{key}-A"] = lora_a
                adapters[f"{key}-B"] = lora_b
        parts.lora = adapters
        return parts

    def _base_causal_lm(self) -> nn.Module:
        # A peft wrapper keeps the transformers model (with its LoRA layers injected) as base_model.model.
        model = self.language_model
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        return model


def save_mini_llava(name: str, model: MiniLlava, config: dict, profile: str) -> str:
    """Save ``model``'s projector and LoRA adapters with ``save_checkpoint``; returns the file path.

    ``config`` must contain ``vision_dim`` and ``projector_kind``, plus ``lora_rank``,
    ``lora_alpha`` and ``lora_targets`` when the model has LoRA adapters, so that
    :func:`load_mini_llava` can rebuild the same model.
    """
    from course_utils.checkpoints import save_checkpoint

    missing = {"vision_dim", "projector_kind"} - set(config)
    if missing:
        raise ValueError(f"config is missing {sorted(missing)}; load_mini_llava needs them to rebuild the model.")
    return save_checkpoint(name, model.trained_parts(), config, profile)


def load_mini_llava(name: str = "llava_shapes", device: torch.device | str | None = None, profile: str | None = None):
    """Rebuild a saved MiniLlava on SmolLM2-135M-Instruct and load its projector and adapters.

    Returns ``(model, tokenizer, config)`` with the model in eval mode, or ``None`` when no usable
    checkpoint exists (see ``load_checkpoint``), so the caller can train one first.
    """
    from course_utils.checkpoints import load_checkpoint
    from course_utils.pretrained import load_language_model

    built: dict = {}

    def factory(config: dict) -> nn.Module:
        language_model, tokenizer = load_language_model(device)
        model = MiniLlava(language_model, config["vision_dim"], image_placeholder_id(tokenizer), config["projector_kind"])
        if config.get("lora_rank"):
            model.add_lora(config["lora_rank"], config["lora_alpha"], config["lora_targets"])
        built.update(model=model, tokenizer=tokenizer)
        return model.trained_parts()

    loaded = load_checkpoint(name, factory, profile)
    if loaded is None:
        return None
    _, config = loaded
    return built["model"].eval(), built["tokenizer"], config
