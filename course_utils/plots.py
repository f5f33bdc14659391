"""Plot helpers: image grids with captions, heatmaps, loss curves and attention overlays.

Every helper returns the matplotlib figure (or axes) it drew on and leaves ``plt.show()`` to the
caller, so the same calls work in JupyterLab and headless (``MPLBACKEND=Agg``) in tests.
"""

from __future__ import annotations

import math
import textwrap
from typing import Sequence

import matplotlib.pyplot as plt
from matplotlib import font_manager
import numpy as np
import torch
from PIL import Image

# Fonts that can draw Traditional Chinese when the machine has them; matplotlib falls back silently.
CJK_FONTS = ["Noto Sans CJK TC", "Noto Sans CJK JP", "PingFang TC", "Microsoft JhengHei"]
plt.rcParams["font.sans-serif"] = CJK_FONTS + ["DejaVu Sans"]


def _register_new_cjk_fonts() -> None:
    """Add CJK fonts installed after matplotlib cached its font list (the cache would hide them)."""
    cached_names = {font.name for font in font_manager.fontManager.ttflist}
    if cached_names & set(CJK_FONTS):
        return
    for path in font_manager.findSystemFonts():
        if "CJK" in path or "NotoSansTC" in path:
            try:
                font_manager.fontManager.addfont(path)
            except (OSError, RuntimeError, ValueError):  # Skip a font file that cannot be read.
                continue


_register_new_cjk_fonts()
plt.rcParams["axes.unicode_minus"] = False


def _to_numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().float().cpu().numpy()
    return np.asarray(value)


def drawable_text(text: str) -> str:
    """Return ``text`` with each character the plot fonts cannot draw replaced by a white square.

    Those are emoji outside the Basic Multilingual Plane, which Noto Sans CJK lacks, and U+FFFD,
    which decoding leaves where generation stopped inside a multi-byte character. Matplotlib
    would otherwise warn and draw an empty box.
    """
    return "".join("\u25a1" if ord(ch) > 0xFFFF or ch == "\ufffd" else ch for ch in str(text))


def show_images(images: Sequence[Image.Image], titles: Sequence[str] | None = None, ncols: int = 8, size: float = 1.6, wrap: int = 18):
    """Draw ``images`` in a grid, each with its (wrapped) title underneath. Returns the figure."""
    if len(images) == 0:
        raise ValueError("show_images needs at least one image.")
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"got {len(images)} images but {len(titles)} titles; pass one title per image.")
    ncols = min(ncols, len(images))
    nrows = math.ceil(len(images) / ncols)
    figure, axes = plt.subplots(nrows, ncols, figsize=(ncols * size, nrows * (size + 0.5)), squeeze=False)
    for index, axis in enumerate(axes.flat):
        axis.axis("off")
        if index >= len(images):
            continue
        axis.imshow(images[index])
        if titles is not None:
            axis.set_title("\n".join(textwrap.wrap(drawable_text(titles[index]), wrap)), fontsize=7)
    figure.tight_layout()
    return figure


def heatmap(matrix, xlabels=None, ylabels=None, title: str = "", ax=None, annotate: bool = False, cmap: str = "viridis", vmin=None, vmax=None):
    """Draw a 2-d matrix (tensor or array) as a heatmap with a colour bar. Returns the axes."""
    values = _to_numpy(matrix)
    if values.ndim != 2:
        raise ValueError(f"heatmap needs a 2-d matrix, got shape {values.shape}.")
    if ax is None:
        _, ax = plt.subplots(figsize=(max(3.0, values.shape[1] * 0.45 + 1.5), max(2.5, values.shape[0] * 0.4 + 1)))
    image = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if xlabels is not None:
        ax.set_xticks(range(len(xlabels)), [str(label) for label in xlabels], rotation=60, ha="right", fontsize=7)
    if ylabels is not None:
        ax.set_yticks(range(len(ylabels)), [str(label) for label in ylabels], fontsize=7)
    if annotate:
        for row in range(values.shape[0]):
            for col in range(values.shape[1]):
                ax.text(col, row, f"{values[row, col]:.2f}", ha="center", va="center", fontsize=6, color="white")
    ax.set_title(title)
    return ax


def plot_curves(history: dict[str, Sequence[float]], title: str = "", ax=None, smooth: int = 1):
    """Draw each series of ``history`` (e.g. the dict returned by ``train.fit``). Returns the axes."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3))
    for name, values in history.items():
        series = np.asarray(values, dtype=float)
        if series.size == 0:
            continue
        if smooth > 1 and series.size >= smooth:
            series = np.convolve(series, np.ones(smooth) / smooth, mode="valid")
        ax.plot(series, label=name)
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    return ax


def overlay_attention(image: Image.Image, weights_2d, ax=None, title: str = "", alpha: float = 0.5, cmap: str = "jet"):
    """Draw ``weights_2d`` (an (h, w) grid over image patches) over ``image``. Returns the axes."""
    grid = _to_numpy(weights_2d)
    if grid.ndim != 2:
        raise ValueError(f"overlay_attention needs an (h, w) grid of weights, got shape {grid.shape}.")
    if ax is None:
        _, ax = plt.subplots(figsize=(3, 3))
    width, height = image.size
    ax.imshow(image)
    ax.imshow(grid, cmap=cmap, alpha=alpha, extent=(0, width, height, 0), interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    return ax
