"""CLIP: contrastive image-text pre-training (Radford et al., 2021, arXiv:2103.00020).

The module follows notebook 01 in order:

- the loss: :func:`clip_logits` and :func:`clip_loss` (InfoNCE over both directions with a
  learnable temperature stored in log space), and the form it takes when the batch is split
  over devices, simulated in one process (:func:`rank_clip_loss`, :func:`gathered_clip_loss`);
- evaluation: zero-shot classification with prompt ensembling (:func:`build_class_embeddings`,
  :func:`zero_shot_logits`) and retrieval Recall@K (:func:`recall_at_k`);
- models: :class:`TinyViT` and :class:`TinyTextEncoder` joined by :class:`TinyCLIP` (trained
  from scratch), and :class:`CLIPHeads` (trainable projections on frozen pretrained features).

Feature tensors are (batch, dim). Row ``i`` of the image features and row ``i`` of the text
features form a matching pair; every other row of the batch is a negative.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# CLIP starts from temperature 0.07 and learns it in log space: logit_scale = ln(1 / 0.07).
LOGIT_SCALE_INIT = math.log(1 / 0.07)
# The effective scale exp(logit_scale) is clamped here so training cannot blow the logits up.
MAX_LOGIT_SCALE = 100.0
DIRECTIONS = ("image_to_text", "text_to_image")


# ---------------------------------------------------------------------------------------------
# The contrastive loss
# ---------------------------------------------------------------------------------------------


def init_logit_scale(value: float = LOGIT_SCALE_INIT) -> nn.Parameter:
    """Return a learnable 0-dim ``logit_scale`` parameter (log of the inverse temperature)."""
    return nn.Parameter(torch.tensor(float(value)))


def _as_logit_scale(logit_scale: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    if isinstance(logit_scale, (int, float)):
        return torch.tensor(float(logit_scale), dtype=like.dtype, device=like.device)
    if not isinstance(logit_scale, torch.Tensor):
        raise TypeError(f"logit_scale must be a tensor or a float, got {type(logit_scale).__name__}.")
    if logit_scale.numel() != 1:
        raise ValueError(
            f"logit_scale must hold one number (the log of the inverse temperature), got shape {tuple(logit_scale.shape)}."
        )
    return logit_scale.reshape(())


def effective_scale(logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Return ``exp(logit_scale)`` clamped at :data:`MAX_LOGIT_SCALE` (0-dim tensor).

    Above the clamp the gradient with respect to ``logit_scale`` is zero, so the optimizer stops
    raising it there.
    """
    if isinstance(logit_scale, (int, float)):
        logit_scale = torch.tensor(float(logit_scale))
    return _as_logit_scale(logit_scale, logit_scale).exp().clamp(max=MAX_LOGIT_SCALE)


def _check_features(name: str, features: Any) -> torch.Tensor:
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (batch, dim), got {type(features).__name__}.")
    if features.dim() != 2:
        raise ValueError(f"{name} must have shape (batch, dim), got shape {tuple(features.shape)}; flatten or pool it first.")
    return features


def cosine_similarity_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Return the cosine similarity of every row of ``a`` (N, D) with every row of ``b`` (M, D): (N, M)."""
    a = _check_features("a", a)
    b = _check_features("b", b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dims differ: a has {a.shape[1]}, b has {b.shape[1]}; project both to the same dim.")
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


def clip_logits(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(logits_per_image, logits_per_text)``: scaled cosine similarities.

    ``image_features`` is (N, D) and ``text_features`` is (M, D); neither needs to be
    normalized. ``logits_per_image`` is (N, M) with entry ``[i, j] = s * cos(image_i, text_j)``
    where ``s = min(exp(logit_scale), 100)``, and ``logits_per_text`` is its transpose (M, N).
    Raises ``ValueError`` when the feature dims differ.
    """
    similarity = cosine_similarity_matrix(image_features, text_features)  # (N, M)
    scale = effective_scale(_as_logit_scale(logit_scale, similarity))
    logits_per_image = scale * similarity  # (N, M)
    return logits_per_image, logits_per_image.T


def clip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """Return CLIP's symmetric InfoNCE loss for a batch of matching pairs (0-dim tensor).

    ``image_features`` and ``text_features`` are (B, D), row ``i`` of each forming a pair. Both
    are L2-normalized here. ``logit_scale`` is the learnable log of the inverse temperature
    (initialised at ln(1/0.07)); the logits are ``min(exp(logit_scale), 100) * cosine``.
    The loss is the mean of the image-to-text and text-to-image cross-entropies, each with the
    diagonal (pair ``i`` <-> class ``i``) as target.

    Raises ``ValueError`` when the shapes differ or B < 2 (a batch of one pair has no negative,
    so its loss is always zero).
    """
    image_features = _check_features("image_features", image_features)
    text_features = _check_features("text_features", text_features)
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"image_features {tuple(image_features.shape)} and text_features {tuple(text_features.shape)} must have "
            "the same shape (batch, dim): one text per image, projected to the same dim."
        )
    batch_size = image_features.shape[0]
    if batch_size < 2:
        raise ValueError(
            f"clip_loss needs a batch of at least 2 pairs, got {batch_size}: with one pair there is no negative "
            "and the loss is always 0. Use a larger batch."
        )

    logits_per_image, logits_per_text = clip_logits(image_features, text_features, logit_scale)  # (B, B) each
    targets = torch.arange(batch_size, device=logits_per_image.device)  # pair i is class i

    image_to_text = F.cross_entropy(logits_per_image, targets)
    text_to_image = F.cross_entropy(logits_per_text, targets)
    return (image_to_text + text_to_image) / 2


def rank_clip_loss(
    local_image_features: torch.Tensor,
    local_text_features: torch.Tensor,
    gathered_image_features: torch.Tensor,
    gathered_text_features: torch.Tensor,
    rank: int,
    logit_scale: torch.Tensor | float,
) -> torch.Tensor:
    """Return the CLIP loss that device ``rank`` computes after gathering the whole batch.

    Each of W devices holds a local batch of B pairs, ``local_*`` (B, D). After an all-gather
    every device also has ``gathered_*`` (W*B, D), the local batches of ranks 0..W-1 stacked in
    order. Device ``rank`` scores its B images against all W*B texts and its B texts against all
    W*B images, so each row has W*B - 1 negatives instead of B - 1. Its own pairs sit at rows
    ``rank*B .. rank*B + B - 1`` of the gathered batch, so the targets are ``arange(B) + rank*B``.

    Raises ``ValueError`` on inconsistent shapes or a rank outside ``0 .. W-1``.
    """
    for name, features in (
        ("local_image_features", local_image_features),
        ("local_text_features", local_text_features),
        ("gathered_image_features", gathered_image_features),
        ("gathered_text_features", gathered_text_features),
    ):
        _check_features(name, features)
    if local_image_features.shape != local_text_features.shape:
        raise ValueError(
            f"local image {tuple(local_image_features.shape)} and text {tuple(local_text_features.shape)} features must have the same shape."
        )
    if gathered_image_features.shape != gathered_text_features.shape:
        raise ValueError(
            f"gathered image {tuple(gathered_image_features.shape)} and text {tuple(gathered_text_features.shape)} features must have the same shape."
        )
    local_batch, total = local_image_features.shape[0], gathered_image_features.shape[0]
    if local_batch == 0 or total % local_batch != 0:
        raise ValueError(f"the gathered batch ({total}) must be a whole number of local batches ({local_batch}).")
    world_size = total // local_batch
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in 0..{world_size - 1} (world size {world_size}), got {rank!r}.")
    if total < 2:
        raise ValueError("the gathered batch needs at least 2 pairs, so that every pair has a negative.")

    logits_per_image, _ = clip_logits(local_image_features, gathered_text_features, logit_scale)  # (B, W*B)
    logits_per_text, _ = clip_logits(local_text_features, gathered_image_features, logit_scale)  # (B, W*B)
    targets = torch.arange(local_batch, device=logits_per_image.device) + rank * local_batch

    image_to_text = F.cross_entropy(logits_per_image, targets)
    text_to_image = F.cross_entropy(logits_per_text, targets)
    return (image_to_text + text_to_image) / 2


def gathered_clip_loss(
    image_chunks: Sequence[torch.Tensor], text_chunks: Sequence[torch.Tensor], logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """Simulate in one process the CLIP loss of W devices that all-gather their features.

    ``image_chunks[r]`` and ``text_chunks[r]`` are the (B, D) local batch of device ``r``; every
    device has the same B, as ``torch.distributed.all_gather`` requires. Returns the per-device
    losses, shape (W,). Their mean is what data-parallel training optimizes (gradients are
    averaged over devices), and it equals :func:`clip_loss` on the concatenated batch.

    NOTE: here every chunk keeps its autograd graph. A real ``all_gather`` returns copies
    without gradient, so each device puts its own local features back into the gathered tensor
    (or uses a differentiable gather) before computing the loss.

    Raises ``ValueError`` when the chunk lists differ in length or the chunks differ in shape.
    """
    if len(image_chunks) == 0 or len(image_chunks) != len(text_chunks):
        raise ValueError(
            f"need one image chunk and one text chunk per device, got {len(image_chunks)} image and {len(text_chunks)} text chunks."
        )
    shapes = {tuple(chunk.shape) for chunk in list(image_chunks) + list(text_chunks)}
    if len(shapes) != 1:
        raise ValueError(f"every chunk must have the same shape (local batch, dim), got shapes {sorted(shapes)}.")

    gathered_images = torch.cat(list(image_chunks))  # (W*B, D)
    gathered_texts = torch.cat(list(text_chunks))  # (W*B, D)
    losses = [
        rank_clip_loss(image_chunks[rank], text_chunks[rank], gathered_images, gathered_texts, rank, logit_scale)
        for rank in range(len(image_chunks))
    ]
    return torch.stack(losses)  # (W,)


# ---------------------------------------------------------------------------------------------
# Zero-shot classification and retrieval
# ---------------------------------------------------------------------------------------------


def build_class_embeddings(
    templates: Sequence[str], class_names: Sequence[str], encode_fn: Callable[[list[str]], torch.Tensor]
) -> torch.Tensor:
    """Return one unit-length text embedding per class, ensembled over prompt templates: (C, D).

    Each template contains ``{}``, which is filled with the class name (``"a {} circle"`` with
    ``"red"`` gives ``"a red circle"``). ``encode_fn(texts)`` maps a list of T strings to a
    (T, D) tensor. Every prompt embedding is L2-normalized, the T prompts of a class are
    averaged, and the average is normalized again, because a mean of unit vectors is shorter
    than 1 (by how much depends on how much the prompts disagree).

    Raises ``ValueError`` on empty inputs, a template without ``{}``, duplicate class names or
    an ``encode_fn`` output of the wrong shape.
    """
    templates, class_names = list(templates), list(class_names)
    if not templates or not class_names:
        raise ValueError(f"need at least one template and one class name, got {len(templates)} and {len(class_names)}.")
    for template in templates:
        if not isinstance(template, str) or "{}" not in template:
            raise ValueError(f"every template must be a str containing '{{}}' for the class name, got {template!r}.")
    if len(set(class_names)) != len(class_names):
        raise ValueError(f"class names must be unique, got {class_names}.")

    texts = [template.format(name) for name in class_names for template in templates]  # class-major order
    embeddings = encode_fn(texts)
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2 or embeddings.shape[0] != len(texts):
        shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
        raise ValueError(f"encode_fn must return a ({len(texts)}, dim) tensor for {len(texts)} texts, got {shape}.")

    embeddings = F.normalize(embeddings, dim=-1)
    embeddings = embeddings.reshape(len(class_names), len(templates), -1)  # (C, T, D)
    return F.normalize(embeddings.mean(dim=1), dim=-1)  # (C, D)


def zero_shot_logits(image_features: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
    """Return the cosine similarity of each image (N, D) with each class embedding (C, D): (N, C).

    The predicted class of image ``i`` is ``argmax`` over row ``i``.
    """
    return cosine_similarity_matrix(image_features, class_embeddings)


def _check_similarity(similarity: Any, positives: torch.Tensor | None) -> torch.Tensor:
    if not isinstance(similarity, torch.Tensor) or similarity.dim() != 2:
        shape = tuple(similarity.shape) if isinstance(similarity, torch.Tensor) else type(similarity).__name__
        raise ValueError(f"similarity must be a 2-d tensor (num_images, num_texts), got {shape}.")
    if positives is None:
        if similarity.shape[0] != similarity.shape[1]:
            raise ValueError(
                f"without positives the matches are the diagonal, which needs a square similarity; got "
                f"{tuple(similarity.shape)}. Pass positives=(num_images, num_texts) bool mask."
            )
        return torch.eye(similarity.shape[0], dtype=torch.bool, device=similarity.device)
    if positives.shape != similarity.shape or positives.dtype != torch.bool:
        raise ValueError(
            f"positives must be a bool tensor of shape {tuple(similarity.shape)}, got {positives.dtype} {tuple(positives.shape)}."
        )
    return positives.to(similarity.device)


def recall_at_k(
    similarity: torch.Tensor, k: int, direction: str = "image_to_text", positives: torch.Tensor | None = None
) -> float:
    """Return Recall@K: the fraction of queries with a correct match among their top ``k`` results.

    ``similarity`` is (num_images, num_texts), entry ``[i, j]`` scoring image ``i`` against text
    ``j``. With ``direction="image_to_text"`` each image (row) is a query ranking all texts;
    with ``"text_to_image"`` each text (column) ranks all images. ``positives`` (same shape,
    bool) marks the correct matches; by default they are the diagonal (square ``similarity``).

    Raises ``ValueError`` on an unknown direction or ``k`` outside ``1 .. number of candidates``.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}.")
    positives = _check_similarity(similarity, positives)
    if direction == "text_to_image":
        similarity, positives = similarity.T, positives.T  # queries become rows
    num_candidates = similarity.shape[1]
    if not isinstance(k, int) or not 1 <= k <= num_candidates:
        raise ValueError(f"k must be an int in 1..{num_candidates} (the number of candidates), got {k!r}.")

    top = similarity.topk(k, dim=1).indices  # (queries, k)
    hits = positives.gather(1, top).any(dim=1)  # (queries,)
    return hits.float().mean().item()


def retrieval_recalls(
    similarity: torch.Tensor, ks: Sequence[int] = (1, 5, 10), positives: torch.Tensor | None = None
) -> dict[str, dict[int, float]]:
    """Return ``{direction: {k: Recall@k}}`` for both directions; ``k`` above the candidates is skipped."""
    positives = _check_similarity(similarity, positives)
    results: dict[str, dict[int, float]] = {}
    for direction in DIRECTIONS:
        num_candidates = similarity.shape[1] if direction == "image_to_text" else similarity.shape[0]
        results[direction] = {
            k: recall_at_k(similarity, k, direction, positives) for k in ks if k <= num_candidates
        }
    return results


def chance_recall(num_candidates: int, k: int) -> float:
    """Return the Recall@K of random ranking when each query has one correct candidate."""
    return min(k, num_candidates) / num_candidates


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def images_to_tensor(images: Sequence[Any]) -> torch.Tensor:
    """Stack PIL RGB images of one size into a float tensor (B, 3, H, W) scaled to [-1, 1]."""
    if len(images) == 0:
        raise ValueError("images is empty; pass at least one image.")
    arrays = [np.asarray(image.convert("RGB"), dtype=np.uint8) for image in images]
    sizes = {array.shape for array in arrays}
    if len(sizes) != 1:
        raise ValueError(f"all images must have the same size, got {sorted(sizes)}; resize them first.")
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
    return batch.float().div(127.5).sub(1.0)


def _transformer_blocks(dim: int, depth: int, heads: int, mlp_ratio: float, dropout: float) -> nn.ModuleList:
    """Pre-norm transformer blocks: self-attention then an MLP, each with a residual connection."""
    if dim % heads != 0:
        raise ValueError(f"dim ({dim}) must be divisible by heads ({heads}).")
    return nn.ModuleList(
        nn.TransformerEncoderLayer(
            d_model=dim,
            nhead=heads,
            dim_feedforward=int(dim * mlp_ratio),
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        for _ in range(depth)
    )


PATCH_STEMS = ("linear", "conv")
VIT_POOLS = ("cls", "mean")


def _patch_embedding(stem: str, in_channels: int, dim: int, patch_size: int) -> nn.Module:
    """Map (B, C, H, W) images to (B, dim, H/p, W/p): one embedding per p x p patch.

    ``"linear"`` is the original ViT: a convolution with kernel = stride = p, i.e. one linear
    map of each flattened patch. ``"conv"`` reaches the same patch grid through 3x3 stride-2
    convolutions (one per halving of p, so p must be a power of two), which makes small ViTs
    train much faster on little data (Xiao et al., 2021, "Early convolutions help transformers
    see better").
    """
    if stem == "linear":
        return nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
    if stem != "conv":
        raise ValueError(f"stem must be one of {PATCH_STEMS}, got {stem!r}.")
    halvings = int(math.log2(patch_size))
    if 2**halvings != patch_size or halvings < 1:
        raise ValueError(f"the conv stem needs a power-of-two patch_size >= 2, got {patch_size}.")
    layers: list[nn.Module] = []
    channels = in_channels
    for index in range(halvings):
        out_channels = dim // 2 ** (halvings - 1 - index) if index < halvings - 1 else dim
        layers.append(nn.Conv2d(channels, out_channels, kernel_size=3, stride=2, padding=1))
        if index < halvings - 1:
            layers += [nn.BatchNorm2d(out_channels), nn.GELU()]
        channels = out_channels
    return nn.Sequential(*layers)


class TinyViT(nn.Module):
    """A small Vision Transformer: patch embedding, [CLS] token, position embedding, blocks.

    Input images are (B, 3, image_size, image_size); the output is the final [CLS] state (B, dim).
    """

    def __init__(
        self,
        image_size: int = 64,
        patch_size: int = 8,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        in_channels: int = 3,
        stem: str = "linear",
        pool: str = "cls",
    ):
        super().__init__()
        if image_size % patch_size != 0:
            raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size}).")
        if pool not in VIT_POOLS:
            raise ValueError(f"pool must be one of {VIT_POOLS}, got {pool!r}.")
        self.pool = pool
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_patches = (image_size // patch_size) ** 2

        self.patch_embedding = _patch_embedding(stem, in_channels, dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position_embedding = nn.Parameter(torch.zeros(1, self.num_patches + 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.position_embedding, std=0.02)
        self.blocks = _transformer_blocks(dim, depth, heads, mlp_ratio, dropout)
        self.norm = nn.LayerNorm(dim)

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Return every output token, [CLS] first: (B, 1 + num_patches, dim)."""
        if images.dim() != 4 or images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"images must be (batch, channels, {self.image_size}, {self.image_size}), got {tuple(images.shape)}."
            )
        patches = self.patch_embedding(images)  # (B, dim, H/p, W/p)
        tokens = patches.flatten(2).transpose(1, 2)  # (B, N, dim)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)  # (B, 1, dim)
        tokens = torch.cat([cls, tokens], dim=1) + self.position_embedding  # (B, 1 + N, dim)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.forward_tokens(images)  # (B, 1 + N, dim)
        if self.pool == "cls":
            return tokens[:, 0]  # (B, dim)
        return tokens[:, 1:].mean(dim=1)  # (B, dim)


class TinyTextEncoder(nn.Module):
    """A small text transformer over word ids: token and position embeddings, blocks, mean pooling.

    ``forward(input_ids, attention_mask)`` takes (B, T) ids and a (B, T) bool mask where True
    marks a real token (the :class:`~course_utils.vlm.text.WordTokenizer` convention) and
    returns the mean of the final states over real tokens, (B, dim).
    """

    def __init__(
        self,
        vocab_size: int,
        max_length: int = 32,
        dim: int = 128,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        pad_id: int = 0,
    ):
        super().__init__()
        self.max_length = max_length
        self.token_embedding = nn.Embedding(vocab_size, dim, padding_idx=pad_id)
        self.position_embedding = nn.Parameter(torch.zeros(1, max_length, dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.trunc_normal_(self.position_embedding, std=0.02)
        self.blocks = _transformer_blocks(dim, depth, heads, mlp_ratio, dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"input_ids and attention_mask must both be (batch, length), got {tuple(input_ids.shape)} and {tuple(attention_mask.shape)}."
            )
        if input_ids.shape[1] > self.max_length:
            raise ValueError(f"texts of {input_ids.shape[1]} tokens exceed max_length={self.max_length}; truncate them.")
        attention_mask = attention_mask.bool()
        if not attention_mask.any(dim=1).all():
            raise ValueError("every text needs at least one real token (attention_mask row all False).")

        tokens = self.token_embedding(input_ids) + self.position_embedding[:, : input_ids.shape[1]]  # (B, T, dim)
        # PyTorch's key padding mask uses the opposite convention: True = ignore this key.
        padding_mask = ~attention_mask
        for block in self.blocks:
            tokens = block(tokens, src_key_padding_mask=padding_mask)
        tokens = self.norm(tokens)

        weights = attention_mask.unsqueeze(-1).to(tokens.dtype)  # (B, T, 1)
        return (tokens * weights).sum(dim=1) / weights.sum(dim=1)  # (B, dim)


@dataclass
class TinyCLIPConfig:
    """Every size :class:`TinyCLIP` needs; ``asdict(config)`` is stored with checkpoints."""

    vocab_size: int
    max_length: int = 32
    image_size: int = 64
    patch_size: int = 8
    vision_stem: str = "conv"
    vision_pool: str = "cls"
    vision_dim: int = 128
    vision_depth: int = 4
    vision_heads: int = 4
    text_dim: int = 128
    text_depth: int = 2
    text_heads: int = 4
    embed_dim: int = 128
    mlp_ratio: float = 4.0
    dropout: float = 0.0


class TinyCLIP(nn.Module):
    """A TinyViT and a TinyTextEncoder, each followed by a linear projection into one shared space.

    ``forward(images, input_ids, attention_mask)`` returns ``(image_features, text_features)``,
    both (B, embed_dim) and not normalized; :func:`clip_loss` normalizes them. The learnable
    ``logit_scale`` starts at ln(1/0.07).
    """

    def __init__(self, config: TinyCLIPConfig):
        super().__init__()
        self.config = config
        self.vision = TinyViT(
            image_size=config.image_size,
            patch_size=config.patch_size,
            dim=config.vision_dim,
            depth=config.vision_depth,
            heads=config.vision_heads,
            mlp_ratio=config.mlp_ratio,
            dropout=config.dropout,
            stem=config.vision_stem,
            pool=config.vision_pool,
        )
        self.text = TinyTextEncoder(
            vocab_size=config.vocab_size,
            max_length=config.max_length,
            dim=config.text_dim,
            depth=config.text_depth,
            heads=config.text_heads,
            mlp_ratio=config.mlp_ratio,
            dropout=config.dropout,
        )
        self.image_projection = nn.Linear(config.vision_dim, config.embed_dim, bias=False)
        self.text_projection = nn.Linear(config.text_dim, config.embed_dim, bias=False)
        self.logit_scale = init_logit_scale()

    @classmethod
    def from_config(cls, config: dict[str, Any] | TinyCLIPConfig) -> "TinyCLIP":
        return cls(config if isinstance(config, TinyCLIPConfig) else TinyCLIPConfig(**config))

    def config_dict(self) -> dict[str, Any]:
        return asdict(self.config)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_projection(self.vision(images))  # (B, embed_dim)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.text_projection(self.text(input_ids, attention_mask))  # (B, embed_dim)

    def forward(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(images), self.encode_text(input_ids, attention_mask)

    def loss(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image_features, text_features = self(images, input_ids, attention_mask)
        return clip_loss(image_features, text_features, self.logit_scale)


@dataclass
class CLIPHeadsConfig:
    """Sizes of :class:`CLIPHeads`.

    With ``hidden_dim`` None each head is one linear layer, otherwise a two-layer MLP. With
    ``project_text`` False the text features are used as they are (``embed_dim`` must then
    equal ``text_dim``), so only the image head is trained into the frozen text space.
    """

    image_dim: int = 1280
    text_dim: int = 384
    embed_dim: int = 256
    hidden_dim: int | None = None
    dropout: float = 0.0
    project_text: bool = True


def _head(in_dim: int, hidden_dim: int | None, out_dim: int, dropout: float) -> nn.Module:
    if hidden_dim is None:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, out_dim))
    return nn.Sequential(
        nn.Dropout(dropout), nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden_dim, out_dim)
    )


class CLIPHeads(nn.Module):
    """Trainable projections that align two frozen pretrained towers in one shared space.

    ``forward(image_features, text_features)`` takes pooled image features (B, image_dim) and
    sentence features (B, text_dim) and returns both in the shared space (B, embed_dim), not
    normalized. Only these heads and ``logit_scale`` are trained.
    """

    def __init__(self, config: CLIPHeadsConfig | None = None):
        super().__init__()
        self.config = config or CLIPHeadsConfig()
        c = self.config
        if not c.project_text and c.embed_dim != c.text_dim:
            raise ValueError(
                f"with project_text=False the shared space is the text space, so embed_dim ({c.embed_dim}) "
                f"must equal text_dim ({c.text_dim}); set embed_dim={c.text_dim} or project_text=True."
            )
        self.image_head = _head(c.image_dim, c.hidden_dim, c.embed_dim, c.dropout)
        if c.project_text:
            self.text_head = _head(c.text_dim, c.hidden_dim, c.embed_dim, c.dropout)
        else:
            self.text_head = nn.Identity()
        self.logit_scale = init_logit_scale()

    @classmethod
    def from_config(cls, config: dict[str, Any] | CLIPHeadsConfig) -> "CLIPHeads":
        return cls(config if isinstance(config, CLIPHeadsConfig) else CLIPHeadsConfig(**config))

    def config_dict(self) -> dict[str, Any]:
        return asdict(self.config)

    def encode_image(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.image_head(image_features)  # (B, embed_dim)

    def encode_text(self, text_features: torch.Tensor) -> torch.Tensor:
        return self.text_head(text_features)  # (B, embed_dim)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(image_features), self.encode_text(text_features)

    def loss(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        return clip_loss(*self(image_features, text_features), self.logit_scale)
