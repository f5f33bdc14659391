"""Stacks of cross-attention layers whose attention weights are shared, partly shared or not.

Each layer is a :class:`CrossAttentionBlock`: pre-norm cross-attention and a small MLP, both
residual. The norms and the MLP always belong to their own layer, so the sharing modes of
:func:`build_cross_attention_layers` differ only in the
:class:`~course_utils.vlm.attention.MultiHeadCrossAttention` module:

- ``"none"``: every layer has its own cross-attention.
- ``"all"``: one cross-attention module is reused at every depth.
- ``"kv"``: the key and value projections are shared by all layers, the query and output
  projections are per layer. Because every layer reads the same context, the keys and values
  are then the same at every depth. NOTE: :class:`CrossAttentionStack` still recomputes them in
  every layer; computing them once would save time but not parameters.
- ``"every_k"``: layers ``0, k, 2k, ...`` reuse one shared cross-attention module and the
  other layers have their own.

Sharing means the same ``nn.Parameter`` objects, not equal copies: the gradient of a shared
weight is the sum of the gradients of its uses, and it must appear once in an optimizer.
:func:`count_parameters`, :func:`unique_parameters` and :func:`shared_parameter_names` do that
bookkeeping, and :func:`measure_training_memory` measures what one training step needs.

The module also contains :class:`CrossAttentionVQA`, the small ShapesWorld question-answering model
of notebooks 02 and 03 (question tokens attend over image patches through such a stack).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from course_utils.vlm.attention import MultiHeadCrossAttention

SHARING_MODES = ("none", "all", "kv", "every_k")

__all__ = [
    "SHARING_MODES",
    "ConvPatchEncoder",
    "CrossAttentionBlock",
    "CrossAttentionStack",
    "CrossAttentionVQA",
    "VQAExamples",
    "build_cross_attention_layers",
    "collect_vqa_examples",
    "count_parameter_uses",
    "count_parameters",
    "measure_training_memory",
    "object_patch_mask",
    "shared_parameter_names",
    "tie_key_value",
    "unique_parameters",
]


# ---------------------------------------------------------------------------------------------
# Layers and stacks
# ---------------------------------------------------------------------------------------------


class CrossAttentionBlock(nn.Module):
    """One pre-norm layer: ``x + attn(norm(x), context)``, then ``x + mlp(norm(x))``.

    ``attn`` may be passed in to share one :class:`MultiHeadCrossAttention` between blocks;
    otherwise the block builds its own. Shapes: ``x`` (batch, Lq, d_model), ``context``
    (batch, Lk, d_context); the mask follows :class:`MultiHeadCrossAttention` (True = may attend).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_context: int | None = None,
        *,
        mlp_ratio: int = 2,
        dropout: float = 0.0,
        attn: MultiHeadCrossAttention | None = None,
    ):
        super().__init__()
        d_context = d_model if d_context is None else d_context
        if attn is None:
            attn = MultiHeadCrossAttention(d_model, n_heads, d_context, dropout=dropout)
        elif (attn.d_model, attn.n_heads, attn.d_context) != (d_model, n_heads, d_context):
            raise ValueError(
                f"the shared attention has d_model={attn.d_model}, n_heads={attn.n_heads}, d_context={attn.d_context}, "
                f"but this block needs {d_model}, {n_heads}, {d_context}."
            )
        if not isinstance(mlp_ratio, int) or mlp_ratio < 1:
            raise ValueError(f"mlp_ratio must be a positive int, got {mlp_ratio!r}.")
        self.norm_attn = nn.LayerNorm(d_model)
        self.attn = attn
        self.norm_mlp = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, mlp_ratio * d_model),
            nn.GELU(),
            nn.Linear(mlp_ratio * d_model, d_model),
        )

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        return_weights: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Return the updated ``x`` (batch, Lq, d_model), and the attention weights
        (batch, heads, Lq, Lk) when ``return_weights`` is true."""
        attended, weights = self.attn(self.norm_attn(x), context, attention_mask, return_weights=True)
        x = x + attended
        x = x + self.mlp(self.norm_mlp(x))
        if return_weights:
            return x, weights
        return x


def _attention_of(layer: nn.Module) -> MultiHeadCrossAttention:
    if isinstance(layer, MultiHeadCrossAttention):
        return layer
    attn = getattr(layer, "attn", None)
    if not isinstance(attn, MultiHeadCrossAttention):
        raise TypeError(
            f"expected a MultiHeadCrossAttention or a layer with an .attn MultiHeadCrossAttention, got {type(layer).__name__}."
        )
    return attn


def tie_key_value(layers: Iterable[nn.Module]) -> None:
    """Make every layer use the first layer's ``k_proj`` and ``v_proj`` modules (in place).

    ``layers`` are :class:`MultiHeadCrossAttention` modules or blocks with an ``.attn``. Query
    and output projections stay per layer. Raises ``ValueError`` when no layer is given or the
    projections have different shapes, and ``TypeError`` for other modules.
    """
    attentions = [_attention_of(layer) for layer in layers]
    if not attentions:
        raise ValueError("tie_key_value needs at least one layer.")
    first = attentions[0]
    for index, attn in enumerate(attentions[1:], start=1):
        if attn.k_proj.weight.shape != first.k_proj.weight.shape or attn.v_proj.weight.shape != first.v_proj.weight.shape:
            raise ValueError(
                f"layer {index} has key/value projections of shape {tuple(attn.k_proj.weight.shape)}, "
                f"layer 0 has {tuple(first.k_proj.weight.shape)}; only equal shapes can be shared."
            )
        attn.k_proj = first.k_proj
        attn.v_proj = first.v_proj


def build_cross_attention_layers(
    depth: int,
    d_model: int,
    n_heads: int,
    d_context: int | None = None,
    *,
    sharing: str = "none",
    every: int = 2,
    mlp_ratio: int = 2,
    dropout: float = 0.0,
) -> nn.ModuleList:
    """Build ``depth`` :class:`CrossAttentionBlock` layers whose cross-attention follows ``sharing``.

    ``sharing`` is one of :data:`SHARING_MODES` (see the module docstring); ``every`` is the
    ``k`` of ``"every_k"``. The blocks themselves are always distinct modules, so the norms and
    MLPs are per layer. Raises ``ValueError`` for an unknown mode or a non-positive depth/every.
    """
    if sharing not in SHARING_MODES:
        raise ValueError(f"unknown sharing mode {sharing!r}; choose one of {', '.join(SHARING_MODES)}.")
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be a positive int, got {depth!r}.")
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive int, got {every!r}.")

    def block(attn: MultiHeadCrossAttention | None = None) -> CrossAttentionBlock:
        return CrossAttentionBlock(d_model, n_heads, d_context, mlp_ratio=mlp_ratio, dropout=dropout, attn=attn)

    if sharing == "none" or sharing == "kv":
        layers = [block() for _ in range(depth)]
        if sharing == "kv":
            tie_key_value(layers)
    elif sharing == "all":
        shared = block().attn
        layers = [block(shared) for _ in range(depth)]
    else:  # every_k
        shared = block().attn
        layers = [block(shared) if index % every == 0 else block() for index in range(depth)]
    return nn.ModuleList(layers)


class CrossAttentionStack(nn.Module):
    """``depth`` cross-attention layers applied in order, then a final LayerNorm.

    Arguments as :func:`build_cross_attention_layers`. ``forward(x, context, attention_mask)``
    returns (batch, Lq, d_model), and with ``return_weights`` also a list with each layer's
    attention weights (batch, heads, Lq, Lk).
    """

    def __init__(
        self,
        depth: int,
        d_model: int,
        n_heads: int,
        d_context: int | None = None,
        *,
        sharing: str = "none",
        every: int = 2,
        mlp_ratio: int = 2,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.sharing = sharing
        self.layers = build_cross_attention_layers(
            depth, d_model, n_heads, d_context, sharing=sharing, every=every, mlp_ratio=mlp_ratio, dropout=dropout
        )
        self.norm = nn.LayerNorm(d_model)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        return_weights: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        all_weights = []
        for layer in self.layers:
            x, weights = layer(x, context, attention_mask, return_weights=True)
            all_weights.append(weights)
        x = self.norm(x)
        if return_weights:
            return x, all_weights
        return x


# ---------------------------------------------------------------------------------------------
# Bookkeeping of shared parameters
# ---------------------------------------------------------------------------------------------


def unique_parameters(*sources: nn.Module | nn.Parameter | Iterable[Any]) -> list[nn.Parameter]:
    """Return the parameters of ``sources`` with each tensor once, in order of first appearance.

    ``sources`` are modules, parameters, or (nested) iterables of them, e.g. a list of layers
    that share modules. Identity decides, not value: two different tensors that happen to hold
    equal numbers are both kept. Pass the result to an optimizer; a list (not a set) keeps the
    order stable, which the optimizer's ``state_dict`` relies on. Raises ``TypeError`` for
    anything else.
    """
    seen: set[int] = set()
    result: list[nn.Parameter] = []

    def add(item: Any) -> None:
        if isinstance(item, nn.Module):
            for parameter in item.parameters():
                add(parameter)
        elif isinstance(item, torch.Tensor):
            if id(item) not in seen:
                seen.add(id(item))
                result.append(item)
        elif isinstance(item, Iterable) and not isinstance(item, (str, bytes)):
            for element in item:
                add(element)
        else:
            raise TypeError(f"expected modules, parameters or iterables of them, got {type(item).__name__}.")

    for source in sources:
        add(source)
    return result


def count_parameters(module: nn.Module | Iterable[Any], trainable_only: bool = False) -> int:
    """Return the number of parameter values, counting each shared tensor once.

    ``module`` may also be a list of layers. Buffers (e.g. running statistics) are not
    parameters and are not counted. With ``trainable_only``, frozen tensors are skipped.
    """
    parameters = unique_parameters(module)
    return sum(p.numel() for p in parameters if p.requires_grad or not trainable_only)


def count_parameter_uses(module: nn.Module) -> int:
    """Return the number of parameter values counted once per use (a shared tensor once per place).

    This is what the model would hold if every shared module were replaced by a separate copy;
    ``count_parameter_uses(m) - count_parameters(m)`` is what sharing saves.
    """
    return sum(p.numel() for _, p in module.named_parameters(remove_duplicate=False))


def shared_parameter_names(module: nn.Module) -> dict[str, list[str]]:
    """Return ``{first name: [all names]}`` for every parameter reachable under several names."""
    names_by_id: dict[int, list[str]] = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        names_by_id.setdefault(id(parameter), []).append(name)
    return {names[0]: names for names in names_by_id.values() if len(names) > 1}


# ---------------------------------------------------------------------------------------------
# Memory of one training step
# ---------------------------------------------------------------------------------------------


def _saved_activation_bytes(run: Callable[[], torch.Tensor], exclude: set[int]) -> tuple[torch.Tensor, int]:
    """Run ``run()`` and return its loss and the bytes of tensors autograd saved for backward.

    Tensors are counted once per storage; storages whose pointer is in ``exclude`` (the
    parameters) are skipped because they are counted as parameters.
    """
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in exclude and pointer != 0:
            storages[pointer] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = run()
    return loss, sum(storages.values())


def measure_training_memory(model: nn.Module, compute_loss: Callable[[], torch.Tensor]) -> dict[str, Any]:
    """Measure the memory of one AdamW training step of ``model`` on its current device.

    ``compute_loss()`` runs the forward pass on one batch and returns the scalar loss. The
    parameters are not changed: gradients are computed and then cleared, no optimizer step runs,
    and the two AdamW moment buffers are counted from the parameter sizes.

    On CUDA: ``torch.cuda.max_memory_allocated`` during forward and backward, minus what was
    allocated before that is not a parameter, plus two AdamW moment buffers per parameter value.
    On other devices: an estimate from parameters + gradients + two AdamW moments (4 x parameter
    bytes) + the tensors autograd saves for backward (measured with ``saved_tensors_hooks``,
    counted once per storage). Returns ``{"bytes": int, "method": str, "parameters": int,
    "activations": int or None}``.
    """
    parameters = unique_parameters(model)
    trainable = [p for p in parameters if p.requires_grad]
    parameter_bytes = sum(p.numel() * p.element_size() for p in parameters)
    optimizer_bytes = 2 * sum(p.numel() * p.element_size() for p in trainable)
    device = parameters[0].device if parameters else torch.device("cpu")

    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        baseline = torch.cuda.memory_allocated(device) - parameter_bytes
        torch.cuda.reset_peak_memory_stats(device)
        compute_loss().backward()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - baseline
        model.zero_grad(set_to_none=True)
        return {
            "bytes": int(peak + optimizer_bytes),
            "method": "torch.cuda.max_memory_allocated (forward + backward) + AdamW moments",
            "parameters": parameter_bytes,
            "activations": None,
        }

    exclude = {p.untyped_storage().data_ptr() for p in parameters}
    loss, activation_bytes = _saved_activation_bytes(compute_loss, exclude)
    loss.backward()
    gradient_bytes = sum(p.grad.numel() * p.grad.element_size() for p in trainable if p.grad is not None)
    model.zero_grad(set_to_none=True)
    return {
        "bytes": int(parameter_bytes + gradient_bytes + optimizer_bytes + activation_bytes),
        "method": "estimate: parameters + gradients + AdamW moments + saved activations (saved_tensors_hooks)",
        "parameters": parameter_bytes,
        "activations": activation_bytes,
    }


# ---------------------------------------------------------------------------------------------
# The ShapesWorld question-answering model of notebooks 02 and 03
# ---------------------------------------------------------------------------------------------


class ConvPatchEncoder(nn.Module):
    """Turn images (batch, 3, S, S) into patch features (batch, (S / patch_size)^2, d_context).

    ``log2(patch_size)`` 4x4 convolutions with stride 2 and padding 1 give one feature vector per
    ``patch_size`` x ``patch_size`` patch, centred on that patch (a 3x3 kernel with stride 2
    would shift every receptive field up and left). One more 3x3 convolution with stride 1
    mixes in the neighbouring patches (receptive field 18 pixels for 4-pixel patches, 38 for
    8-pixel patches), so the feature of a patch inside a large shape still carries the shape's
    outline.
    A learned position embedding per patch adds where each patch is. Images are expected in
    [0, 1]. Raises ``ValueError`` when ``patch_size`` is not a power of
    two or does not divide ``image_size``.
    """

    def __init__(self, d_context: int, image_size: int = 64, patch_size: int = 8, channels: int = 16):
        super().__init__()
        if not isinstance(patch_size, int) or patch_size < 2 or patch_size & (patch_size - 1):
            raise ValueError(f"patch_size must be a power of two >= 2, got {patch_size!r}.")
        if not isinstance(image_size, int) or image_size % patch_size != 0:
            raise ValueError(f"image_size must be a multiple of patch_size={patch_size}, got {image_size!r}.")
        self.image_size = image_size
        self.patch_size = patch_size
        self.grid_size = image_size // patch_size

        layers: list[nn.Module] = []
        in_channels, out_channels = 3, channels
        for _ in range(patch_size.bit_length() - 1):
            layers += [nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1), nn.GELU()]
            in_channels, out_channels = out_channels, min(2 * out_channels, d_context)
        layers.append(nn.Conv2d(in_channels, d_context, 3, stride=1, padding=1))
        self.convs = nn.Sequential(*layers)
        self.position_embedding = nn.Parameter(torch.randn(1, self.grid_size**2, d_context) * 0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1:] != (3, self.image_size, self.image_size):
            raise ValueError(
                f"images must have shape (batch, 3, {self.image_size}, {self.image_size}), got {tuple(images.shape)}."
            )
        features = self.convs(images - 0.5)  # (B, D, S/p, S/p)
        features = features.flatten(2).transpose(1, 2)  # (B, N, D), patches in row-major order
        return features + self.position_embedding


class CrossAttentionVQA(nn.Module):
    """Answer a question about an image by letting question tokens attend over image patches.

    The pipeline has four steps. :class:`ConvPatchEncoder` turns the images into patch features
    (batch, N, d_context). Question ids (batch, T) are embedded with positions and pass one
    self-attention layer, so that every token attends to the whole question. A
    :class:`CrossAttentionStack` (``depth`` layers, ``sharing`` mode) lets the question tokens
    attend over the patches. Finally the first token (``[CLS]`` from
    :class:`~course_utils.vlm.text.WordTokenizer`) feeds a linear classifier over the answers.

    ``forward(images, input_ids, attention_mask, return_weights=False)``: images (batch, 3, S, S)
    in [0, 1], ``input_ids`` (batch, T) long, ``attention_mask`` (batch, T) bool with True = real
    token. Returns logits (batch, num_answers), and with ``return_weights`` also the list of
    cross-attention weights per layer (batch, heads, T, N).
    """

    def __init__(
        self,
        vocab_size: int,
        num_answers: int,
        *,
        image_size: int = 64,
        patch_size: int = 8,
        d_model: int = 64,
        d_context: int = 48,
        n_heads: int = 4,
        depth: int = 2,
        sharing: str = "none",
        every: int = 2,
        mlp_ratio: int = 2,
        max_question_len: int = 16,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.config = {
            "vocab_size": vocab_size, "num_answers": num_answers, "image_size": image_size, "patch_size": patch_size, "d_model": d_model,
            "d_context": d_context, "n_heads": n_heads, "depth": depth, "sharing": sharing, "every": every,
            "mlp_ratio": mlp_ratio, "max_question_len": max_question_len, "dropout": dropout,
        }
        self.image_encoder = ConvPatchEncoder(d_context, image_size, patch_size)
        self.context_norm = nn.LayerNorm(d_context)
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.position_embedding = nn.Parameter(torch.randn(1, max_question_len, d_model) * 0.02)
        self.question_encoder = nn.TransformerEncoderLayer(
            d_model, n_heads, dim_feedforward=mlp_ratio * d_model, dropout=dropout, batch_first=True, norm_first=True
        )
        self.cross_attention = CrossAttentionStack(
            depth, d_model, n_heads, d_context, sharing=sharing, every=every, mlp_ratio=mlp_ratio, dropout=dropout
        )
        self.head = nn.Linear(d_model, num_answers)

    @property
    def grid_size(self) -> int:
        return self.image_encoder.grid_size

    def forward(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        return_weights: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
            raise ValueError(
                f"input_ids and attention_mask must both be (batch, T), got {tuple(input_ids.shape)} and {tuple(attention_mask.shape)}."
            )
        if input_ids.size(1) > self.position_embedding.size(1):
            raise ValueError(
                f"questions of {input_ids.size(1)} tokens exceed max_question_len={self.position_embedding.size(1)}; "
                "build the model with a larger max_question_len."
            )
        context = self.context_norm(self.image_encoder(images))  # (B, N, d_context)

        length = input_ids.size(1)
        tokens = self.token_embedding(input_ids) + self.position_embedding[:, :length]  # (B, T, d_model)
        tokens = self.question_encoder(tokens, src_key_padding_mask=~attention_mask.bool())

        tokens, weights = self.cross_attention(tokens, context, return_weights=True)  # (B, T, d_model)
        logits = self.head(tokens[:, 0])  # (B, num_answers), read from the [CLS] token
        if return_weights:
            return logits, weights
        return logits



@dataclass
class VQAExamples:
    """Question-answer pairs of a ShapesWorld split, one row per question.

    ``images`` (num_scenes, 3, S, S) uint8 contains each scene once, and ``image_index`` (Q,)
    is the scene of each question. ``objects`` lists each scene's objects (colour, shape,
    size, centre ``x``/``y`` in 0..1).
    """

    images: torch.Tensor
    image_index: torch.Tensor
    questions: list[str]
    answers: list[str]
    question_types: list[str]
    objects: list[list[dict[str, Any]]]

    def __len__(self) -> int:
        return len(self.questions)


def collect_vqa_examples(dataset: Any, question_types: Sequence[str]) -> VQAExamples:
    """Flatten a ShapesWorld ``datasets.Dataset`` into the questions of ``question_types``.

    Raises ``ValueError`` when ``question_types`` is empty or no question of those types exists.
    """
    wanted = set(question_types)
    if not wanted:
        raise ValueError("question_types is empty; pass e.g. ['color'] or ['color', 'shape'].")
    images = torch.from_numpy(np.stack([np.asarray(image.convert("RGB")) for image in dataset["image"]]))  # (N, S, S, 3)
    images = images.permute(0, 3, 1, 2).contiguous()  # (N, 3, S, S)

    image_index, questions, answers, types = [], [], [], []
    rows = zip(dataset["questions"], dataset["answers"], dataset["question_types"])
    for scene, (scene_questions, scene_answers, scene_types) in enumerate(rows):
        for question, answer, kind in zip(scene_questions, scene_answers, scene_types):
            if kind in wanted:
                image_index.append(scene)
                questions.append(question)
                answers.append(answer)
                types.append(kind)
    if not questions:
        raise ValueError(f"no question of type {sorted(wanted)} in this data set.")
    return VQAExamples(images, torch.tensor(image_index), questions, answers, types, list(dataset["objects"]))


def object_patch_mask(obj: dict[str, Any], grid_size: int) -> torch.Tensor:
    """Return a bool (grid_size * grid_size,) mask of the patches that overlap a ShapesWorld object.

    A patch counts when its centre lies within the object's radius plus half a patch of the
    object's centre. Patches are in row-major order, as :class:`ConvPatchEncoder` returns them.
    """
    from course_utils.data.shapes_world import RADIUS

    centres = (torch.arange(grid_size, dtype=torch.float32) + 0.5) / grid_size  # (G,)
    rows, cols = torch.meshgrid(centres, centres, indexing="ij")  # (G, G) each
    distance = torch.hypot(cols - obj["x"], rows - obj["y"])
    return (distance <= RADIUS[obj["size"]] + 0.5 / grid_size).flatten()
