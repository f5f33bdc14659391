"""The CLIP loss across processes: gather features with gradients, offset labels by rank.

With data parallelism each process (rank) encodes only its local batch of ``B`` pairs, but the
contrastive loss needs every pair of the global batch of ``W * B`` pairs as negatives. Two
things go wrong easily:

1. ``torch.distributed.all_gather`` fills plain tensors that carry no gradient, so the features
   of the other ranks act as constants and the gradient that rank ``k``'s loss sends to rank
   ``r``'s features is lost. :func:`gather_with_grad` wraps the collective in an autograd
   function whose backward sums, over all ranks, the gradients for every slice and gives each
   rank the sum for its own slice. PyTorch ships the same idea as
   ``torch.distributed.nn.functional.all_gather`` (returns a tuple of tensors). PyTorch 2.13
   warns that this function is deprecated and points to the private module
   ``torch.distributed._functional_collectives`` instead.
2. In the gathered tensor, rank ``r``'s pairs sit in rows ``r * B`` to ``r * B + B - 1``. When a
   rank scores its local rows against all gathered columns (the *local-loss* variant), the
   matching column of local row ``i`` is ``r * B + i``, not ``i``.

:func:`distributed_clip_loss` offers two variants. With DistributedDataParallel (DDP), which
averages the parameter gradients over the ranks, both give the loss and the gradients of one
process on the concatenated batch (``tests/test_distributed.py`` checks this on 2 processes):

- global: every rank builds the full ``(W*B, W*B)`` logit matrix and returns the full loss
  ``L``. The gather's backward sums ``W`` equal gradients, so rank ``r`` gets
  ``W * dL/d(features of r)``, and DDP's division by ``W`` leaves exactly ``dL/d(parameters)``.
- local: every rank builds only its own ``B`` rows of both logit matrices, ``(B, W*B)`` each,
  and returns the mean loss of those rows. ``L`` is the mean of the ranks' losses, which is
  what DDP's averaging differentiates. The logits cost ``W`` times less memory and compute.

Without DDP, all-reduce the parameter gradients with ``SUM`` and divide by the world size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from course_utils.vlm.clip import clip_loss, rank_clip_loss


def is_distributed(group: dist.ProcessGroup | None = None) -> bool:
    """Return True when a process group is initialised and has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def local_batch_size(global_batch_size: int, world_size: int) -> int:
    """Return the per-rank batch size, ``global_batch_size // world_size``.

    Raises ``ValueError`` when either number is not a positive int or when ``world_size``
    does not divide ``global_batch_size``, because every rank must hold the same number of
    pairs for ``all_gather`` and for the label offsets ``rank * local_batch``.
    """
    for name, value in (("global_batch_size", global_batch_size), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}.")

    if global_batch_size % world_size != 0:
        lower = (global_batch_size // world_size) * world_size
        upper = lower + world_size
        suggestion = f"{lower} or {upper}" if lower > 0 else f"{upper}"
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by world size {world_size}: "
            f"every rank needs the same local batch for all_gather. Use a global batch size that "
            f"is a multiple of {world_size} (for example {suggestion}), or launch a number of "
            f"processes that divides {global_batch_size}."
        )
    return global_batch_size // world_size


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward returns the all-rank sum of this rank's slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        world_size = dist.get_world_size(group)
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.local_batch = tensor.shape[0]

        parts = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts, dim=0)  # (W*B, ...)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        # grad_output is d(this rank's loss)/d(gathered tensor), (W*B, ...). Rank r's rows also
        # feed the losses of all other ranks, so its gradient is the sum over ranks of their
        # gradients for rows r*B ... r*B + B - 1.
        # NOTE: reduce_scatter would return only this rank's slice and move about half the data
        # of all_reduce; all_reduce keeps the step easy to read.
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)

        start = ctx.rank * ctx.local_batch
        return grad[start : start + ctx.local_batch], None  # (B, ...)


def gather_with_grad(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """All-gather ``tensor`` (B, ...) from every rank into (W*B, ...), keeping gradients.

    Rows ``r*B`` to ``r*B + B - 1`` of the result come from rank ``r``. Every rank must pass a
    tensor of the same shape, dtype and device (CUDA tensors for NCCL). Backward gives each rank
    the sum, over all ranks, of the gradients flowing into its own rows. Without an initialised
    process group, or with one rank, the tensor is returned unchanged.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}.")
    if tensor.dim() == 0:
        raise ValueError("tensor must have a batch dimension (dim 0); got a 0-d tensor.")
    if not is_distributed(group):
        return tensor
    return _AllGatherWithGrad.apply(tensor, group)


def check_equal_batch_sizes(local_batch: int, device: torch.device, group: dist.ProcessGroup | None = None) -> None:
    """Raise ``ValueError`` on every rank when the ranks' local batch sizes differ.

    The sizes are exchanged with one small ``all_gather`` so that all ranks raise together
    instead of one rank raising and the others waiting forever in the next collective.
    """
    if not is_distributed(group):
        return
    size = torch.tensor([local_batch], dtype=torch.long, device=device)
    sizes = [torch.empty_like(size) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, size, group=group)
    sizes_list = [int(s.item()) for s in sizes]
    if len(set(sizes_list)) != 1:
        raise ValueError(
            f"local batch sizes differ across ranks: {sizes_list} (index = rank). Every rank must "
            f"hold the same number of pairs; use a global batch size divisible by the world size "
            f"and drop_last=True in the DataLoader and the DistributedSampler."
        )


def distributed_clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    local_loss: bool = False,
    group: dist.ProcessGroup | None = None,
    check_batch_sizes: bool = True,
) -> torch.Tensor:
    """Return the symmetric InfoNCE loss of the global batch from this rank's local features.

    Args:
        image_features: (B, D) this rank's image embeddings, not necessarily normalized.
        text_features: (B, D) this rank's text embeddings; row ``i`` pairs with image row ``i``.
        logit_scale: learnable log-space scale (initialised at ln(1/0.07)); the effective scale
            is ``exp(logit_scale)`` clamped at 100, as in :func:`~course_utils.vlm.clip.clip_loss`.
        local_loss: False = global variant, which returns :func:`~course_utils.vlm.clip.clip_loss`
            of the gathered (W*B, D) features (the same value on every rank). True = local-loss
            variant, which returns :func:`~course_utils.vlm.clip.rank_clip_loss`: this rank's B
            rows against all W*B columns, with labels ``arange(B) + rank * B``.
        group: process group (default: the world).
        check_batch_sizes: exchange the local batch sizes first and raise on a mismatch.

    Returns:
        0-dim loss. With one process (or no process group) both variants equal ``clip_loss``.

    Raises:
        TypeError: the features are not tensors.
        ValueError: the features are not (B, D) with equal shapes, the global batch has fewer
            than 2 pairs, or (with ``check_batch_sizes``) the ranks hold different local batches.
    """
    for name, features in (("image_features", image_features), ("text_features", text_features)):
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (batch, dim), got {type(features).__name__}.")
    if image_features.dim() != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            f"image_features and text_features must both be (batch, dim) with the same shape, got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}."
        )

    local_batch = image_features.shape[0]
    if check_batch_sizes:
        check_equal_batch_sizes(local_batch, image_features.device, group)
    if not is_distributed(group):
        return clip_loss(image_features, text_features, logit_scale)

    all_image_features = gather_with_grad(image_features, group)  # (W*B, D)
    all_text_features = gather_with_grad(text_features, group)  # (W*B, D)
    if not local_loss:
        return clip_loss(all_image_features, all_text_features, logit_scale)

    # The local rows use the local tensors directly. The gathered copy of this rank's rows
    # carries gradient as well, and autograd adds both paths up.
    rank = dist.get_rank(group)
    return rank_clip_loss(image_features, text_features, all_image_features, all_text_features, rank, logit_scale)
