"""A small training loop with a ``tqdm.auto`` progress bar (a widget in JupyterLab, text elsewhere)."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from tqdm.auto import tqdm


def _lr_factor(step: int, steps: int, warmup_steps: int) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def fit(
    loss_fn: Callable[[Any], torch.Tensor | tuple[torch.Tensor, dict[str, float]]],
    make_batch: Callable[[int], Any],
    params: Iterable[torch.nn.Parameter],
    steps: int,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    warmup: float = 0.05,
    grad_clip: float | None = 1.0,
    desc: str = "訓練",
    log_every: int = 10,
    progress: bool = True,
) -> dict[str, list[float]]:
    """Train for ``steps`` AdamW steps with linear warm-up and cosine decay.

    ``make_batch(step)`` returns the batch of that step; ``loss_fn(batch)`` returns a scalar loss,
    or ``(loss, metrics)`` with a dict of floats to log. Returns ``{"loss": [...], metric: [...]}``
    with one entry per step. Raises ``ValueError`` for a non-finite loss, naming the step, so a
    diverged run stops early instead of training on NaN.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("fit() got no trainable parameters; check requires_grad or the params you passed.")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}.")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warmup_steps = max(1, int(warmup * steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, steps, warmup_steps))
    history: dict[str, list[float]] = {"loss": []}

    bar = tqdm(range(steps), desc=desc, disable=not progress, mininterval=0.5)
    for step in bar:
        output = loss_fn(make_batch(step))
        loss, metrics = output if isinstance(output, tuple) else (output, {})
        if not torch.isfinite(loss):
            bar.close()
            raise ValueError(f"loss became {loss.item()} at step {step}; lower the learning rate or check the inputs.")

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        scheduler.step()

        history["loss"].append(loss.item())
        for name, value in metrics.items():
            history.setdefault(name, []).append(float(value))
        if step % log_every == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    return history


def batch_indices(num_items: int, batch_size: int, seed: int = 0) -> Callable[[int], torch.Tensor]:
    """Return ``make_batch_indices(step)`` that walks shuffled epochs of ``range(num_items)``.

    Every batch has exactly ``batch_size`` distinct indices (the tail of an epoch is dropped), so
    contrastive losses always see full batches. Deterministic for a given ``seed``.
    """
    if batch_size > num_items:
        raise ValueError(f"batch_size={batch_size} is larger than the data set ({num_items} items); lower it.")
    per_epoch = num_items // batch_size
    orders: dict[int, torch.Tensor] = {}

    def indices(step: int) -> torch.Tensor:
        epoch, position = divmod(step, per_epoch)
        if epoch not in orders:
            orders.clear()
            orders[epoch] = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        return orders[epoch][position * batch_size : (position + 1) * batch_size]

    return indices
