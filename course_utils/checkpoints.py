"""Save trained models so later notebooks (06 in particular) can reuse them.

A checkpoint is ``CHECKPOINT_DIR/NAME.pt`` holding the model's state dict, the config needed to
rebuild it, and the profile it was trained in.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import torch

from course_utils import paths

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+$")


def _path(name: str):
    if not NAME_PATTERN.match(name):
        raise ValueError(f"checkpoint name {name!r} may only use letters, digits, '_', '-' and '.'.")
    return paths.CHECKPOINT_DIR / f"{name}.pt"


def save_checkpoint(name: str, model: torch.nn.Module, config: dict[str, Any], profile: str) -> str:
    """Store ``model``'s weights with ``config`` and ``profile``; returns the file path."""
    path = _path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".partial")
    torch.save({"state_dict": model.state_dict(), "config": config, "profile": profile}, temporary)
    temporary.replace(path)
    return str(path)


def checkpoint_exists(name: str) -> bool:
    """Return whether a checkpoint file called ``name`` exists, usable or not."""
    return _path(name).exists()


def load_checkpoint(name: str, model_factory: Callable[[dict[str, Any]], torch.nn.Module], profile: str | None = None):
    """Rebuild a saved model with ``model_factory(config)`` and load its weights.

    Returns ``(model, config)``, or ``None`` when no usable checkpoint exists (missing, unreadable,
    from another profile when ``profile`` is given, or with weights that do not fit the model), so
    the caller can retrain.
    """
    path = _path(name)
    if not path.exists():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        if profile is not None and stored.get("profile") != profile:
            return None
        model = model_factory(stored["config"])
        model.load_state_dict(stored["state_dict"])
    except Exception:  # a damaged or outdated file raises many types; the caller retrains either way
        return None
    return model, stored["config"]
