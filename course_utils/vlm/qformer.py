"""BLIP-2's Q-Former: a fixed set of learned queries that read frozen image features.

The Q-Former is a BERT-style transformer (post-LayerNorm) that runs two streams through the same
layers: ``Q`` learned query embeddings and ``T`` text tokens. In every layer the queries and the
text share one self-attention, whose boolean mask decides who sees whom. Every
``cross_attention_frequency``-th layer (layers 0, f, 2f, ...) adds a cross-attention from the
queries (never the text) to the frozen image features. Each layer has two feed-forward blocks
with separate weights: one for query positions, one for text positions. Whatever the number of
image tokens, the Q-Former returns ``Q`` query outputs: that fixed size is the bottleneck
between the image encoder and the language model.

BLIP-2 pre-trains it with three objectives, which differ only in the self-attention mask
(:func:`qformer_attention_mask`):

- ``itc`` image-text contrastive: queries and text never see each other. The similarity of an
  image and a text is the maximum over the queries (:func:`itc_similarity`).
- ``itm`` image-text matching: every position sees every other. A two-way head on each query
  output, averaged over the queries, says match or no match. Negatives are mined from the
  contrastive similarities (:func:`sample_hard_negatives`).
- ``itg`` image-grounded text generation: queries see only queries, and text sees all queries
  and the earlier text (a causal mask).

Mask convention everywhere in this module: boolean, True = may attend (the
``F.scaled_dot_product_attention`` convention). Positions are ordered queries first, then text.

The parameter layout follows transformers' ``Blip2QFormerModel`` (checked against transformers
5.25), so :func:`load_from_hf_qformer` can copy its weights across.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from course_utils.vlm.text import SPECIAL_TOKENS, WordTokenizer, split_words

TASKS = ("itc", "itm", "itg")
DEC_TOKEN = "[DEC]"
SEP_TOKEN = "[SEP]"
IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------
# The three attention masks
# ---------------------------------------------------------------------------------------------


def qformer_attention_mask(task: str, num_queries: int, text_attention_mask: torch.Tensor) -> torch.Tensor:
    """Build the self-attention mask of one pre-training objective.

    Args:
        task: ``"itc"`` (queries and text see only their own kind), ``"itm"`` (everything sees
            everything) or ``"itg"`` (queries see queries, text sees all queries and the text up
            to and including itself).
        num_queries: ``Q``, the number of query positions that come first (0 for a text-only pass).
        text_attention_mask: (B, T), bool or 0/1 integers, True/1 = real token, False/0 = padding.

    Returns:
        Boolean (B, Q+T, Q+T): entry ``[b, i, j]`` is True when position ``i`` may attend to
        position ``j``. Padding is handled on the key side: no position attends to a padded text
        token. Rows of padded positions follow the task's rule for text rows; their outputs are
        never used.

    Raises:
        ValueError: unknown task, negative ``num_queries``, a mask that is not 2-D or holds
        values other than 0 and 1.
        TypeError: ``num_queries`` not an int, ``text_attention_mask`` not a tensor.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}.")
    if isinstance(num_queries, bool) or not isinstance(num_queries, int):
        raise TypeError(f"num_queries must be an int, got {type(num_queries).__name__}: {num_queries!r}.")
    if num_queries < 0:
        raise ValueError(f"num_queries must be >= 0, got {num_queries}.")
    text_is_real = _as_bool_mask(text_attention_mask, "text_attention_mask")
    if text_is_real.dim() != 2:
        raise ValueError(
            f"text_attention_mask must be 2-D (batch, text_len), got shape {tuple(text_is_real.shape)}."
        )

    batch_size, text_len = text_is_real.shape
    device = text_is_real.device
    total = num_queries + text_len
    is_query = torch.arange(total, device=device) < num_queries  # (L,)
    is_text = ~is_query

    if task == "itm":
        allowed = torch.ones(total, total, dtype=torch.bool, device=device)
    elif task == "itc":
        # Same kind on both ends: query-query or text-text.
        allowed = is_query[:, None] == is_query[None, :]  # (L, L)
    else:
        causal = torch.ones(total, total, dtype=torch.bool, device=device).tril()
        # Every row may see the queries, text rows also see earlier text (lower triangle).
        allowed = is_query[None, :] | (is_text[:, None] & is_text[None, :] & causal)  # (L, L)

    key_is_real = torch.cat(
        [torch.ones(batch_size, num_queries, dtype=torch.bool, device=device), text_is_real], dim=1
    )  # (B, L)
    return allowed[None, :, :] & key_is_real[:, None, :]  # (B, L, L)


def _as_bool_mask(mask: Any, name: str) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}.")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point() or mask.is_complex():
        raise ValueError(f"{name} must be bool or integer 0/1, got dtype {mask.dtype}; pass mask.bool().")
    if mask.numel() and not ((mask == 0) | (mask == 1)).all():
        raise ValueError(f"{name} must contain only 0 and 1, got values {mask.unique().tolist()[:6]}.")
    return mask.bool()


# ---------------------------------------------------------------------------------------------
# Contrastive similarity and hard negatives
# ---------------------------------------------------------------------------------------------


def itc_similarity(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Return the image-text similarity: for each pair, the best-matching query's dot product.

    Args:
        image_embeds: (B_img, Q, E), one embedding per query output (L2-normalized by the caller).
        text_embeds: (B_txt, E), one embedding per text (L2-normalized by the caller).

    Returns:
        (B_img, B_txt): ``max_q <image_embeds[i, q], text_embeds[j]>``. No temperature is applied.

    Raises:
        ValueError: wrong number of dimensions or different embedding sizes.
    """
    if image_embeds.dim() != 3 or text_embeds.dim() != 2:
        raise ValueError(
            "image_embeds must be (B_img, Q, E) and text_embeds (B_txt, E), got shapes "
            f"{tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}."
        )
    if image_embeds.shape[-1] != text_embeds.shape[-1]:
        raise ValueError(
            f"embedding sizes differ: image_embeds has E={image_embeds.shape[-1]}, text_embeds has E={text_embeds.shape[-1]}."
        )

    per_query = torch.einsum("iqe,je->ijq", image_embeds, text_embeds)  # (B_img, B_txt, Q)
    return per_query.max(dim=-1).values  # (B_img, B_txt)


def sample_hard_negatives(
    similarity: torch.Tensor,
    positive_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one hard negative text per image and one hard negative image per text.

    Image ``i`` draws text ``j`` with probability ``softmax_j(similarity[i, j])`` restricted to
    the negatives of row ``i``. Text ``j`` draws image ``i`` the same way from column ``j``.
    Positives are never drawn. The input is not modified.

    Args:
        similarity: (B, B) image-to-text similarities (already scaled by the temperature); row =
            image, column = text.
        positive_mask: (B, B) bool, True where image ``i`` and text ``j`` match. Defaults to the
            diagonal. Pass it when a batch repeats a caption, so that a copy of the positive is
            never used as a negative.
        generator: optional ``torch.Generator`` for reproducible draws.

    Returns:
        ``(negative_text_for_image, negative_image_for_text)``, two (B,) long tensors of indices.

    Raises:
        ValueError: not a square 2-D matrix, a mask of another shape, or a row or column with no
        negative to draw from.
    """
    if similarity.dim() != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"similarity must be a square (B, B) matrix, got shape {tuple(similarity.shape)}.")
    size = similarity.shape[0]
    if positive_mask is None:
        positive_mask = torch.eye(size, dtype=torch.bool, device=similarity.device)
    positive_mask = _as_bool_mask(positive_mask, "positive_mask").to(similarity.device)
    if positive_mask.shape != similarity.shape:
        raise ValueError(
            f"positive_mask has shape {tuple(positive_mask.shape)}, expected {tuple(similarity.shape)} like similarity."
        )
    if positive_mask.all(dim=1).any() or positive_mask.all(dim=0).any():
        raise ValueError(
            "an image or a text has no negative in this batch (its whole row or column is positive); "
            "use a larger batch or fewer repeated captions."
        )

    logits = similarity.detach().float().masked_fill(positive_mask, float("-inf"))  # (B, B), a copy
    text_probabilities = logits.softmax(dim=1)  # (B_img, B_txt)
    image_probabilities = logits.t().softmax(dim=1)  # (B_txt, B_img)

    negative_text_for_image = torch.multinomial(text_probabilities, 1, generator=generator).squeeze(1)  # (B,)
    negative_image_for_text = torch.multinomial(image_probabilities, 1, generator=generator).squeeze(1)  # (B,)
    return negative_text_for_image, negative_image_for_text


# ---------------------------------------------------------------------------------------------
# Configuration and layers
# ---------------------------------------------------------------------------------------------


@dataclass
class QFormerConfig:
    """Sizes of a Q-Former. The defaults are BLIP-2's (BERT-base with 32 queries, ViT-g features)."""

    num_queries: int = 32
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    image_dim: int = 1408
    cross_attention_frequency: int = 2
    vocab_size: int = 30522
    max_text_length: int = 512
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    dropout: float = 0.0
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        positive = ("num_queries", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                    "image_dim", "cross_attention_frequency", "vocab_size", "max_text_length")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"QFormerConfig.{name} must be a positive int, got {value!r}.")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                "pick sizes so that each head gets hidden_size // num_heads dimensions."
            )
        if self.hidden_act not in ("gelu", "relu", "gelu_tanh"):
            raise ValueError(f"hidden_act must be 'gelu', 'gelu_tanh' or 'relu', got {self.hidden_act!r}.")
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"QFormerConfig.{name} must be in [0, 1), got {getattr(self, name)!r}.")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id={self.pad_token_id} is outside the vocabulary (size {self.vocab_size}).")

    def has_cross_attention(self, layer_index: int) -> bool:
        """Return True for the layers that cross-attend to the image: 0, f, 2f, ... (f = frequency)."""
        return layer_index % self.cross_attention_frequency == 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _activation(name: str):
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    return nn.ReLU()


class QFormerAttention(nn.Module):
    """Multi-head attention followed by BERT's output block: ``LayerNorm(x + dense(attention))``.

    Used for the self-attention (``context_size = hidden_size``) and for the cross-attention to
    image features (``context_size = image_dim``). The mask is boolean with True = may attend, of
    shape (B, L, N) or anything that broadcasts to it. A row with no allowed key gets an
    attention output of zeros (no NaN), so the block then returns ``LayerNorm(x)``.
    """

    def __init__(self, hidden_size: int, num_heads: int, context_size: int, layer_norm_eps: float,
                 dropout: float = 0.0, attention_dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(context_size, hidden_size)
        self.value = nn.Linear(context_size, hidden_size)
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.attention_dropout = nn.Dropout(attention_dropout)
        self.dropout = nn.Dropout(dropout)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, len, Dh)

    def forward(self, hidden_states: torch.Tensor, context: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Attend from ``hidden_states`` (B, L, D) to ``context`` (B, N, C), or to itself when None.

        Returns the block output (B, L, D) and the attention weights (B, H, L, N).
        """
        context = hidden_states if context is None else context
        batch, length, width = hidden_states.shape

        queries = self._split_heads(self.query(hidden_states))  # (B, H, L, Dh)
        keys = self._split_heads(self.key(context))  # (B, H, N, Dh)
        values = self._split_heads(self.value(context))  # (B, H, N, Dh)
        scores = queries @ keys.transpose(-1, -2) / math.sqrt(self.head_dim)  # (B, H, L, N)

        if attention_mask is not None:
            allowed = attention_mask.unsqueeze(1) if attention_mask.dim() == 3 else attention_mask  # (B, 1, L, N)
            scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
            weights = scores.softmax(dim=-1)
            # A fully masked row would otherwise spread its weight evenly over forbidden keys.
            weights = weights.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)
        else:
            weights = scores.softmax(dim=-1)

        attended = self.attention_dropout(weights) @ values  # (B, H, L, Dh)
        attended = attended.transpose(1, 2).reshape(batch, length, width)  # (B, L, D)
        output = self.norm(hidden_states + self.dropout(self.dense(attended)))
        return output, weights


class QFormerFeedForward(nn.Module):
    """BERT's feed-forward block: ``LayerNorm(x + fc2(act(fc1(x))))``."""

    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation = _activation(config.hidden_act)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden_states + self.dropout(self.fc2(self.activation(self.fc1(hidden_states)))))


class QFormerLayer(nn.Module):
    """One Q-Former layer: shared self-attention, optional cross-attention for the queries, then
    separate feed-forward blocks for query and text positions."""

    def __init__(self, config: QFormerConfig, has_cross_attention: bool):
        super().__init__()
        self.self_attention = QFormerAttention(
            config.hidden_size, config.num_heads, config.hidden_size, config.layer_norm_eps,
            config.dropout, config.attention_dropout,
        )
        self.cross_attention = (
            QFormerAttention(config.hidden_size, config.num_heads, config.image_dim, config.layer_norm_eps,
                             config.dropout, config.attention_dropout)
            if has_cross_attention else None
        )
        self.query_feed_forward = QFormerFeedForward(config)
        self.text_feed_forward = QFormerFeedForward(config)

    def forward(self, hidden_states: torch.Tensor, num_queries: int, attention_mask: torch.Tensor | None,
                image_features: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the layer on (B, Q+T, D) states; return the new states and the cross-attention
        weights (B, H, Q, N) of this layer (None without cross-attention or queries)."""
        hidden_states, _ = self.self_attention(hidden_states, attention_mask=attention_mask)
        queries = hidden_states[:, :num_queries]  # (B, Q, D)
        text = hidden_states[:, num_queries:]  # (B, T, D)

        cross_weights = None
        if num_queries > 0:
            if self.cross_attention is not None:
                queries, cross_weights = self.cross_attention(queries, context=image_features)
            queries = self.query_feed_forward(queries)
        if text.shape[1] > 0:
            text = self.text_feed_forward(text)
        return torch.cat([queries, text], dim=1), cross_weights  # (B, Q+T, D)


# ---------------------------------------------------------------------------------------------
# The Q-Former
# ---------------------------------------------------------------------------------------------


class QFormer(nn.Module):
    """Learned queries plus a text embedding, run through :class:`QFormerLayer` s.

    ``forward(image_features, input_ids, attention_mask)``:

    - with ``image_features`` (B, N, image_dim): the ``Q`` learned queries come first, followed
      by the ``T`` text tokens of ``input_ids`` (B, T) if given;
    - with ``image_features=None``: a text-only pass (no queries, no cross-attention), as the
      contrastive objective uses to embed text.

    ``attention_mask`` is boolean (B, L, L) with L = Q+T (or T for text-only), True = may attend,
    usually from :func:`qformer_attention_mask`; None lets every position see every other.
    Returns the last hidden states (B, L, hidden_size), queries first.
    """

    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.config = config
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_queries, config.hidden_size))
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_text_length, config.hidden_size)
        self.embedding_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(
            QFormerLayer(config, config.has_cross_attention(index)) for index in range(config.num_layers)
        )
        self.apply(self._init_weights)
        nn.init.normal_(self.query_tokens, std=config.initializer_range)

    def _init_weights(self, module: nn.Module) -> None:
        # BERT's initialization: normal(0, 0.02) weights, zero biases, unit LayerNorm.
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @property
    def num_queries(self) -> int:
        return self.config.num_queries

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Return word plus position embeddings (B, T, D) of ``input_ids`` (B, T), before the LayerNorm."""
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}.")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, text_len), got shape {tuple(input_ids.shape)}.")
        text_len = input_ids.shape[1]
        if text_len > self.config.max_text_length:
            raise ValueError(
                f"text of {text_len} tokens is longer than max_text_length={self.config.max_text_length}; "
                "truncate it or build the Q-Former with a larger max_text_length."
            )
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
            raise ValueError(
                f"input_ids must lie in [0, {self.config.vocab_size}), got values from "
                f"{int(input_ids.min())} to {int(input_ids.max())}; was the tokenizer built for another vocabulary?"
            )
        positions = torch.arange(text_len, device=input_ids.device)
        return self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]  # (B, T, D)

    def encode(self, embeddings: torch.Tensor, num_queries: int, image_features: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None, return_cross_attentions: bool = False):
        """Run the layers on already-embedded inputs, like ``Blip2QFormerModel(query_embeds=...)``.

        Args:
            embeddings: (B, L, D), the first ``num_queries`` rows are queries, the rest text.
            num_queries: how many leading positions are queries (they get cross-attention and
                the query feed-forward weights).
            image_features: (B, N, image_dim); required when ``num_queries > 0``.
            attention_mask: bool (B, L, L), True = may attend, or None.
            return_cross_attentions: also return the list of cross-attention weights, one
                (B, H, Q, N) tensor per cross-attention layer.
        """
        batch, length, _ = embeddings.shape
        if not 0 <= num_queries <= length:
            raise ValueError(f"num_queries={num_queries} must lie between 0 and the sequence length {length}.")
        if num_queries > 0:
            if image_features is None:
                raise ValueError("image_features are required when queries are present; pass (B, N, image_dim) features.")
            self._check_image_features(image_features, batch)
        if attention_mask is not None:
            if attention_mask.dtype != torch.bool:
                raise TypeError(f"attention_mask must be bool (True = may attend), got {attention_mask.dtype}; pass mask.bool().")
            if tuple(attention_mask.shape) != (batch, length, length):
                raise ValueError(
                    f"attention_mask must have shape {(batch, length, length)} (batch, Q+T, Q+T), got {tuple(attention_mask.shape)}."
                )

        hidden_states = self.embedding_dropout(self.embedding_norm(embeddings))  # (B, L, D)
        if image_features is not None:
            image_features = image_features.to(hidden_states.dtype)
        cross_attentions = []
        for layer in self.layers:
            hidden_states, cross_weights = layer(hidden_states, num_queries, attention_mask, image_features)
            if cross_weights is not None:
                cross_attentions.append(cross_weights)
        if return_cross_attentions:
            return hidden_states, cross_attentions
        return hidden_states

    def _check_image_features(self, image_features: torch.Tensor, batch: int) -> None:
        if image_features.dim() != 3 or image_features.shape[-1] != self.config.image_dim:
            raise ValueError(
                f"image_features must be (B, N, {self.config.image_dim}), got shape {tuple(image_features.shape)}; "
                "the last size must equal QFormerConfig.image_dim."
            )
        if image_features.shape[0] != batch:
            raise ValueError(f"image_features has batch {image_features.shape[0]} but the text has batch {batch}.")

    def forward(self, image_features: torch.Tensor | None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, return_cross_attentions: bool = False):
        """Embed queries and/or text and run the layers; see the class docstring for shapes."""
        if image_features is None and input_ids is None:
            raise ValueError("pass image_features, input_ids or both.")
        parts = []
        if image_features is not None:
            if image_features.dim() != 3:
                raise ValueError(f"image_features must be (B, N, image_dim), got shape {tuple(image_features.shape)}.")
            parts.append(self.query_tokens.expand(image_features.shape[0], -1, -1))  # (B, Q, D)
        if input_ids is not None:
            parts.append(self.embed_text(input_ids))  # (B, T, D)
        if len(parts) == 2 and parts[0].shape[0] != parts[1].shape[0]:
            raise ValueError(f"image_features has batch {parts[0].shape[0]} but input_ids has batch {parts[1].shape[0]}.")
        embeddings = torch.cat(parts, dim=1)  # (B, Q+T, D)
        num_queries = self.num_queries if image_features is not None else 0
        return self.encode(embeddings, num_queries, image_features, attention_mask, return_cross_attentions)


# ---------------------------------------------------------------------------------------------
# Tokenizer with the tokens generation needs
# ---------------------------------------------------------------------------------------------


class CaptionTokenizer(WordTokenizer):
    """The course's :class:`WordTokenizer` plus ``[DEC]`` and ``[SEP]`` for the three objectives.

    Every text encodes as ``[CLS] words [SEP]``. Generation replaces ``[CLS]`` with ``[DEC]`` (as
    BLIP-2 does) and stops at ``[SEP]``. Ids 0-4 are ``[PAD] [UNK] [CLS] [DEC] [SEP]``.
    ``max_length`` counts both special tokens.

    NOTE: BLIP-2 uses BERT's WordPiece tokenizer; a word-level vocabulary is enough for the
    course's short captions, but words never seen in training become ``[UNK]``.
    """

    SPECIALS = SPECIAL_TOKENS + (DEC_TOKEN, SEP_TOKEN)

    def __init__(self, vocab: Sequence[str], max_length: int = 32):
        vocab = list(vocab)
        if tuple(vocab[: len(self.SPECIALS)]) != self.SPECIALS:
            raise ValueError(
                f"vocab must start with {list(self.SPECIALS)}, got {vocab[:5]}; build it with CaptionTokenizer.from_texts."
            )
        if not isinstance(max_length, int) or max_length < 3:
            raise ValueError(f"max_length must be an int >= 3 ([CLS], one word, [SEP]), got {max_length!r}.")
        super().__init__(vocab, max_length=max_length)
        self.dec_id = self.word_to_id[DEC_TOKEN]
        self.sep_id = self.word_to_id[SEP_TOKEN]

    @classmethod
    def from_texts(cls, texts: Iterable[str], max_length: int = 32, min_count: int = 1) -> "CaptionTokenizer":
        """Build the vocabulary from ``texts``: every word seen at least ``min_count`` times, sorted."""
        counts: dict[str, int] = {}
        for text in texts:
            for word in split_words(text):
                counts[word] = counts.get(word, 0) + 1
        if not counts:
            raise ValueError("texts contain no words; pass the training captions.")
        words = sorted(word for word, count in counts.items() if count >= min_count)
        return cls(list(cls.SPECIALS) + words, max_length=max_length)

    def encode_ids(self, text: str) -> list[int]:
        """Return ``[CLS] word ids [SEP]``, words truncated so that the total fits ``max_length``."""
        words = [self.word_to_id.get(word, self.unk_id) for word in split_words(text)]
        return [self.cls_id] + words[: self.max_length - 2] + [self.sep_id]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Return the words of ``ids`` up to the first ``[SEP]``, without special tokens."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        words = []
        for index in ids:
            if index == self.sep_id:
                break
            token = self.vocab[index]
            if token not in self.SPECIALS:
                words.append(token)
        return " ".join(words)


# ---------------------------------------------------------------------------------------------
# Pre-training: the three objectives
# ---------------------------------------------------------------------------------------------


class QFormerForPretraining(nn.Module):
    """A :class:`QFormer` with BLIP-2's three heads and losses.

    - ``image_norm``: a LayerNorm on the frozen image features (BLIP-2's ``ln_vision``).
    - ``vision_proj`` / ``text_proj``: project query outputs and the text's ``[CLS]`` output to
      ``embed_dim`` for the contrastive loss, with a learnable ``logit_scale`` (log-space,
      initialized to ln(1/0.07), effective scale clamped at 100).
    - ``itm_head``: a two-way linear head on each query output, averaged over the queries
      (logit 1 = match).
    - ``lm_head``: next-token logits for the text positions of the generation pass.

    ``dec_token_id`` starts a generated caption and ``sep_token_id`` ends it. The defaults are
    :class:`CaptionTokenizer`'s ids.

    ``image_input_dim``, when set and different from ``config.image_dim``, adds ``image_proj``:
    one linear map from the frozen features' width to ``config.image_dim``, applied once per
    batch. NOTE: BLIP-2 cross-attends to the ViT features directly. The shared map restricts the
    keys and values of every cross-attention layer to one learned subspace, and in exchange the
    wide projection is computed once instead of in every pass and layer.

    ``num_image_tokens``, when set, adds a learned position embedding (1, N, config.image_dim)
    to the image features before the cross-attention. NOTE: BLIP-2's ViT features already
    carry position information, but a CNN's grid of tokens mostly does not, and without it
    the queries cannot tell left from right.

    Every method that takes ``image_features`` expects the raw frozen features
    (B, N, image_input_dim) and prepares them itself.
    """

    def __init__(self, config: QFormerConfig, embed_dim: int = 256, dec_token_id: int = 3,
                 sep_token_id: int = 4, num_image_tokens: int | None = None, image_input_dim: int | None = None):
        super().__init__()
        if not isinstance(embed_dim, int) or embed_dim < 1:
            raise ValueError(f"embed_dim must be a positive int, got {embed_dim!r}.")
        for name, token_id in (("dec_token_id", dec_token_id), ("sep_token_id", sep_token_id)):
            if not 0 <= token_id < config.vocab_size:
                raise ValueError(f"{name}={token_id} is outside the vocabulary (size {config.vocab_size}).")
        for name, value in (("num_image_tokens", num_image_tokens), ("image_input_dim", image_input_dim)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}.")
        self.config = config
        self.embed_dim = embed_dim
        self.dec_token_id = dec_token_id
        self.sep_token_id = sep_token_id
        self.num_image_tokens = num_image_tokens
        self.image_input_dim = image_input_dim or config.image_dim

        self.qformer = QFormer(config)
        self.image_norm = nn.LayerNorm(self.image_input_dim, eps=config.layer_norm_eps)
        self.image_proj = (
            nn.Linear(self.image_input_dim, config.image_dim) if self.image_input_dim != config.image_dim else None
        )
        self.image_position_embeddings = (
            nn.Parameter(torch.zeros(1, num_image_tokens, config.image_dim)) if num_image_tokens else None
        )
        self.vision_proj = nn.Linear(config.hidden_size, embed_dim)
        self.text_proj = nn.Linear(config.hidden_size, embed_dim)
        self.itm_head = nn.Linear(config.hidden_size, 2)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

        heads = [self.vision_proj, self.text_proj, self.itm_head, self.lm_head]
        if self.image_proj is not None:
            heads.append(self.image_proj)
        for head in heads:
            nn.init.normal_(head.weight, std=config.initializer_range)
            nn.init.zeros_(head.bias)
        if self.image_position_embeddings is not None:
            nn.init.normal_(self.image_position_embeddings, std=config.initializer_range)

    def describe(self) -> dict[str, Any]:
        """Return the constructor arguments as a JSON-serialisable dict (for checkpoints)."""
        return {"qformer": self.config.to_dict(), "embed_dim": self.embed_dim,
                "dec_token_id": self.dec_token_id, "sep_token_id": self.sep_token_id,
                "num_image_tokens": self.num_image_tokens, "image_input_dim": self.image_input_dim}

    @classmethod
    def from_description(cls, description: dict[str, Any]) -> "QFormerForPretraining":
        """Rebuild an untrained model from :meth:`describe`'s dict (extra keys are ignored)."""
        return cls(QFormerConfig(**description["qformer"]), description["embed_dim"], description["dec_token_id"],
                   description["sep_token_id"], description["num_image_tokens"], description["image_input_dim"])

    def prepare_image_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """Normalize, project and position-embed raw features: (B, N, image_input_dim) -> (B, N, image_dim)."""
        if image_features.dim() != 3 or image_features.shape[-1] != self.image_input_dim:
            raise ValueError(
                f"image_features must be (B, N, {self.image_input_dim}), got shape {tuple(image_features.shape)}."
            )
        if self.image_position_embeddings is not None and image_features.shape[1] != self.image_position_embeddings.shape[1]:
            raise ValueError(
                f"image_features has {image_features.shape[1]} tokens, but the position embeddings expect "
                f"num_image_tokens={self.image_position_embeddings.shape[1]}."
            )
        prepared = self.image_norm(image_features.to(self.image_norm.weight.dtype))
        if self.image_proj is not None:
            prepared = self.image_proj(prepared)  # (B, N, image_dim)
        if self.image_position_embeddings is not None:
            prepared = prepared + self.image_position_embeddings
        return prepared

    def scale(self) -> torch.Tensor:
        """Return the effective contrastive scale ``exp(logit_scale)``, clamped at 100."""
        return self.logit_scale.exp().clamp(max=100.0)

    # --- contrastive ---------------------------------------------------------------------------

    def image_embeddings(self, image_features: torch.Tensor) -> torch.Tensor:
        """Return L2-normalized query embeddings (B, Q, embed_dim) from a queries-only pass."""
        query_outputs = self.qformer(self.prepare_image_features(image_features))  # (B, Q, D)
        return F.normalize(self.vision_proj(query_outputs), dim=-1)

    def text_embeddings(self, input_ids: torch.Tensor, text_attention_mask: torch.Tensor) -> torch.Tensor:
        """Return L2-normalized text embeddings (B, embed_dim) from the ``[CLS]`` output of a text-only pass."""
        mask = qformer_attention_mask("itc", 0, text_attention_mask)  # (B, T, T)
        text_outputs = self.qformer(None, input_ids, mask)  # (B, T, D)
        return F.normalize(self.text_proj(text_outputs[:, 0]), dim=-1)

    def _itc_logits(self, prepared: torch.Tensor, input_ids: torch.Tensor, text_attention_mask: torch.Tensor) -> torch.Tensor:
        num_queries = self.qformer.num_queries
        mask = qformer_attention_mask("itc", num_queries, text_attention_mask)  # (B, Q+T, Q+T)
        outputs = self.qformer(prepared, input_ids, mask)  # (B, Q+T, D)
        image_embeds = F.normalize(self.vision_proj(outputs[:, :num_queries]), dim=-1)  # (B, Q, E)
        text_embeds = F.normalize(self.text_proj(outputs[:, num_queries]), dim=-1)  # (B, E), the [CLS] position
        return itc_similarity(image_embeds, text_embeds) * self.scale()

    def itc_logits(self, image_features: torch.Tensor, input_ids: torch.Tensor,
                   text_attention_mask: torch.Tensor) -> torch.Tensor:
        """Return scaled image-to-text similarities (B, B) from one joint pass under the ``itc`` mask.

        Because the mask keeps queries and text apart, this equals separate
        :meth:`image_embeddings` and :meth:`text_embeddings` passes.
        """
        return self._itc_logits(self.prepare_image_features(image_features), input_ids, text_attention_mask)

    # --- matching ------------------------------------------------------------------------------

    def _itm_logits(self, prepared: torch.Tensor, input_ids: torch.Tensor, text_attention_mask: torch.Tensor) -> torch.Tensor:
        num_queries = self.qformer.num_queries
        mask = qformer_attention_mask("itm", num_queries, text_attention_mask)  # (B, Q+T, Q+T)
        outputs = self.qformer(prepared, input_ids, mask)  # (B, Q+T, D)
        return self.itm_head(outputs[:, :num_queries]).mean(dim=1)  # (B, 2)

    def itm_logits(self, image_features: torch.Tensor, input_ids: torch.Tensor,
                   text_attention_mask: torch.Tensor) -> torch.Tensor:
        """Return match logits (B, 2) for image ``i`` with text ``i``. Column 1 is "match"."""
        return self._itm_logits(self.prepare_image_features(image_features), input_ids, text_attention_mask)

    # --- generation ----------------------------------------------------------------------------

    def decoder_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Return a copy of ``input_ids`` with the first token (``[CLS]``) replaced by ``[DEC]``."""
        decoder_ids = input_ids.clone()
        decoder_ids[:, 0] = self.dec_token_id
        return decoder_ids

    def _itg_logits(self, prepared: torch.Tensor, input_ids: torch.Tensor, text_attention_mask: torch.Tensor) -> torch.Tensor:
        num_queries = self.qformer.num_queries
        mask = qformer_attention_mask("itg", num_queries, text_attention_mask)  # (B, Q+T, Q+T)
        outputs = self.qformer(prepared, input_ids, mask)  # (B, Q+T, D)
        return self.lm_head(outputs[:, num_queries:])  # (B, T, V)

    def itg_logits(self, image_features: torch.Tensor, input_ids: torch.Tensor,
                   text_attention_mask: torch.Tensor) -> torch.Tensor:
        """Return next-token logits (B, T, vocab_size) for the text positions under the ``itg`` mask.

        ``input_ids`` should start with ``[DEC]``, and position ``t`` predicts token ``t + 1``.
        """
        return self._itg_logits(self.prepare_image_features(image_features), input_ids, text_attention_mask)

    @torch.no_grad()
    def generate(self, image_features: torch.Tensor, max_new_tokens: int = 20) -> torch.Tensor:
        """Decode greedily from ``[DEC]`` and return (B, 1 + steps) ids.

        Rows that produced ``[SEP]`` are padded with ``pad_token_id`` afterwards.
        NOTE: each step reruns the whole sequence (no key-value cache), which is simple and fast
        enough for captions of a few words.
        """
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}.")
        prepared = self.prepare_image_features(image_features)
        batch = prepared.shape[0]
        device = prepared.device
        ids = torch.full((batch, 1), self.dec_token_id, dtype=torch.long, device=device)  # (B, 1)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        limit = self.config.max_text_length - 1
        for _ in range(min(max_new_tokens, limit)):
            text_mask = torch.ones_like(ids, dtype=torch.bool)
            logits = self._itg_logits(prepared, ids, text_mask)[:, -1]  # (B, V)
            next_ids = logits.argmax(dim=-1).masked_fill(finished, self.config.pad_token_id)  # (B,)
            ids = torch.cat([ids, next_ids[:, None]], dim=1)  # (B, t + 1)
            finished |= next_ids == self.sep_token_id
            if finished.all():
                break
        return ids

    # --- all three losses ----------------------------------------------------------------------

    def forward(self, image_features: torch.Tensor, input_ids: torch.Tensor, text_attention_mask: torch.Tensor,
                positive_mask: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Compute the ITC, ITM and ITG losses of one batch of matching pairs.

        Args:
            image_features: (B, N, image_input_dim) frozen image features. Pair ``i`` is image
                ``i`` with text ``i``.
            input_ids: (B, T) ids that start with ``[CLS]`` (from :class:`CaptionTokenizer`).
            text_attention_mask: (B, T) bool, True = real token.
            positive_mask: optional (B, B) bool, True where image ``i`` matches text ``j`` (for
                batches that repeat a caption). Defaults to the diagonal.
            generator: optional generator for the hard-negative draws.

        Returns:
            dict with ``loss`` (the sum), ``itc``, ``itm``, ``itg`` (each a scalar tensor) and
            ``itm_accuracy`` (a detached scalar).
        """
        batch = image_features.shape[0]
        if batch < 2:
            raise ValueError(f"the contrastive and matching losses need a batch of at least 2 pairs, got {batch}.")
        if positive_mask is None:
            positive_mask = torch.eye(batch, dtype=torch.bool, device=image_features.device)
        text_attention_mask = _as_bool_mask(text_attention_mask, "text_attention_mask")
        prepared = self.prepare_image_features(image_features)  # (B, N, image_dim), computed once

        # ITC: cross-entropy in both directions, spread over every positive of a row.
        logits = self._itc_logits(prepared, input_ids, text_attention_mask)  # (B, B)
        targets = positive_mask.float()
        loss_itc = (F.cross_entropy(logits, targets / targets.sum(1, keepdim=True))
                    + F.cross_entropy(logits.t(), targets.t() / targets.t().sum(1, keepdim=True))) / 2

        # ITM: B positives, one hard negative text per image, one hard negative image per text.
        negative_text, negative_image = sample_hard_negatives(logits.detach(), positive_mask, generator)
        itm_images = torch.cat([prepared, prepared, prepared[negative_image]])  # (3B, N, image_dim)
        itm_ids = torch.cat([input_ids, input_ids[negative_text], input_ids])  # (3B, T)
        itm_text_mask = torch.cat([text_attention_mask, text_attention_mask[negative_text], text_attention_mask])
        itm_labels = torch.cat([torch.ones(batch), torch.zeros(2 * batch)]).long().to(image_features.device)
        itm_logits = self._itm_logits(itm_images, itm_ids, itm_text_mask)  # (3B, 2)
        loss_itm = F.cross_entropy(itm_logits, itm_labels)

        # ITG: position t predicts token t + 1, and padding positions are ignored.
        decoder_ids = self.decoder_input_ids(input_ids)
        lm_logits = self._itg_logits(prepared, decoder_ids, text_attention_mask)  # (B, T, V)
        labels = input_ids[:, 1:].masked_fill(~text_attention_mask[:, 1:], IGNORE_INDEX)  # (B, T-1)
        loss_itg = F.cross_entropy(lm_logits[:, :-1].reshape(-1, lm_logits.shape[-1]), labels.reshape(-1),
                                   ignore_index=IGNORE_INDEX)

        accuracy = (itm_logits.argmax(dim=-1) == itm_labels).float().mean().detach()
        return {"loss": loss_itc + loss_itm + loss_itg, "itc": loss_itc, "itm": loss_itm, "itg": loss_itg,
                "itm_accuracy": accuracy}


# ---------------------------------------------------------------------------------------------
# Copying weights from transformers' Blip2QFormerModel
# ---------------------------------------------------------------------------------------------


def qformer_config_from_hf(hf_config, num_queries: int = 32) -> QFormerConfig:
    """Build a :class:`QFormerConfig` with the sizes of a transformers ``Blip2QFormerConfig``.

    The number of queries lives in ``Blip2Config.num_query_tokens``, not in the Q-Former's
    config, so it is passed separately.
    """
    act = hf_config.hidden_act if isinstance(hf_config.hidden_act, str) else "gelu"
    act = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}.get(act, act)
    return QFormerConfig(
        num_queries=num_queries,
        hidden_size=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads,
        intermediate_size=hf_config.intermediate_size,
        image_dim=hf_config.encoder_hidden_size,
        cross_attention_frequency=hf_config.cross_attention_frequency,
        vocab_size=hf_config.vocab_size,
        max_text_length=hf_config.max_position_embeddings,
        hidden_act=act,
        layer_norm_eps=hf_config.layer_norm_eps,
        pad_token_id=hf_config.pad_token_id if hf_config.pad_token_id is not None else 0,
    )


def hf_parameter_map(config: QFormerConfig) -> dict[str, str]:
    """Return {our parameter name: transformers parameter name} for the Q-Former layers."""
    mapping = {"embedding_norm.weight": "layernorm.weight", "embedding_norm.bias": "layernorm.bias"}

    def attention(ours: str, theirs: str) -> None:
        for ours_part, theirs_part in (("query", "attention.query"), ("key", "attention.key"),
                                       ("value", "attention.value"), ("dense", "output.dense"),
                                       ("norm", "output.LayerNorm")):
            for kind in ("weight", "bias"):
                mapping[f"{ours}.{ours_part}.{kind}"] = f"{theirs}.{theirs_part}.{kind}"

    def feed_forward(ours: str, intermediate: str, output: str) -> None:
        for ours_part, theirs_part in (("fc1", f"{intermediate}.dense"), ("fc2", f"{output}.dense"),
                                       ("norm", f"{output}.LayerNorm")):
            for kind in ("weight", "bias"):
                mapping[f"{ours}.{ours_part}.{kind}"] = f"{theirs_part}.{kind}"

    for index in range(config.num_layers):
        ours, theirs = f"layers.{index}", f"encoder.layer.{index}"
        attention(f"{ours}.self_attention", f"{theirs}.attention")
        if config.has_cross_attention(index):
            attention(f"{ours}.cross_attention", f"{theirs}.crossattention")
        feed_forward(f"{ours}.query_feed_forward", f"{theirs}.intermediate_query", f"{theirs}.output_query")
        feed_forward(f"{ours}.text_feed_forward", f"{theirs}.intermediate", f"{theirs}.output")
    return mapping


@torch.no_grad()
def load_from_hf_qformer(model: QFormer, hf_qformer: nn.Module, query_tokens: torch.Tensor | None = None,
                         text_embeddings: nn.Module | None = None) -> list[str]:
    """Copy the weights of transformers' ``Blip2QFormerModel`` into ``model`` in place.

    Args:
        model: a :class:`QFormer` with the same sizes (see :func:`qformer_config_from_hf`).
        hf_qformer: a ``Blip2QFormerModel`` (for example ``Blip2Model(...).qformer``).
        query_tokens: optional (1, Q, D) learned queries (``Blip2Model.query_tokens``), which
            transformers keeps outside the Q-Former.
        text_embeddings: optional ``Blip2TextEmbeddings`` (``Blip2ForImageTextRetrieval.embeddings``)
            with the word and position embeddings.

    Returns:
        The names of ``model``'s parameters that were not copied (for example the text
        feed-forward blocks, which transformers only builds with ``use_qformer_text_input=True``).

    Raises:
        ValueError: the two models' layouts or shapes differ.
    """
    hf_config = hf_qformer.config
    config = model.config
    expected = {
        "hidden_size": hf_config.hidden_size, "num_layers": hf_config.num_hidden_layers,
        "num_heads": hf_config.num_attention_heads, "intermediate_size": hf_config.intermediate_size,
        "image_dim": hf_config.encoder_hidden_size, "cross_attention_frequency": hf_config.cross_attention_frequency,
    }
    differences = [f"{name}: ours {getattr(config, name)}, transformers {value}"
                   for name, value in expected.items() if getattr(config, name) != value]
    if differences:
        raise ValueError("the Q-Former configs differ (" + "; ".join(differences)
                         + "); build ours with qformer_config_from_hf(hf_qformer.config).")

    ours_parameters = dict(model.named_parameters())
    theirs_parameters = dict(hf_qformer.named_parameters())
    copied = set()

    def copy(ours_name: str, source: torch.Tensor, source_name: str) -> None:
        target = ours_parameters[ours_name]
        if target.shape != source.shape:
            raise ValueError(f"shape mismatch: {ours_name} {tuple(target.shape)} vs {source_name} {tuple(source.shape)}.")
        target.copy_(source)
        copied.add(ours_name)

    for ours_name, theirs_name in hf_parameter_map(config).items():
        if theirs_name in theirs_parameters:
            copy(ours_name, theirs_parameters[theirs_name], theirs_name)

    if query_tokens is not None:
        copy("query_tokens", query_tokens, "query_tokens")
    if text_embeddings is not None:
        copy("word_embeddings.weight", text_embeddings.word_embeddings.weight, "word_embeddings.weight")
        copy("position_embeddings.weight", text_embeddings.position_embeddings.weight, "position_embeddings.weight")
    return sorted(set(ours_parameters) - copied)
