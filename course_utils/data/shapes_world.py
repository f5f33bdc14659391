"""ShapesWorld: procedural scenes of coloured shapes with captions and question-answer pairs.

Every scene is drawn from its own random stream, seeded by ``(seed, split, index)``, so a
scene is the same on every machine and the held-out split shares no scene with the training
split. Captions and answers are derived from the scene's object list, so they are always
consistent with the picture.
"""

from __future__ import annotations

from typing import Any

import datasets
import numpy as np
from PIL import Image, ImageDraw

COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")
QUESTION_TYPES = ("color", "shape", "count", "position", "yes_no")
SPLITS = ("train", "test")

RGB = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 190),
    "orange": (245, 130, 20),
}
# Radius as a fraction of the image side.
RADIUS = {"small": 0.09, "large": 0.15}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
MAX_OBJECTS = 6
SUPERSAMPLE = 4


def _place_objects(rng: np.random.Generator, count: int) -> list[dict[str, Any]]:
    """Sample ``count`` objects with distinct (colour, shape) pairs that do not overlap."""
    objects: list[dict[str, Any]] = []
    used_pairs: set[tuple[str, str]] = set()
    attempts = 0
    while len(objects) < count:
        attempts += 1
        if attempts > 10_000:
            raise RuntimeError(f"could not place {count} objects without overlap; use fewer objects.")
        color = COLORS[rng.integers(len(COLORS))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        if (color, shape) in used_pairs:
            continue
        size = SIZES[rng.integers(len(SIZES))]
        radius = RADIUS[size]
        x, y = rng.uniform(radius + 0.02, 1 - radius - 0.02, size=2)
        # Keep a gap between objects, and keep each object clearly on one side of the centre
        # line so that "left or right" always has one answer.
        if abs(x - 0.5) < 0.06:
            continue
        if any(np.hypot(x - o["x"], y - o["y"]) < radius + RADIUS[o["size"]] + 0.03 for o in objects):
            continue
        used_pairs.add((color, shape))
        objects.append({"color": color, "shape": shape, "size": size, "x": float(x), "y": float(y)})
    return objects


def _draw_scene(objects: list[dict[str, Any]], image_size: int, background: tuple[int, int, int]) -> Image.Image:
    side = image_size * SUPERSAMPLE
    canvas = Image.new("RGB", (side, side), background)
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        cx, cy, r = obj["x"] * side, obj["y"] * side, RADIUS[obj["size"]] * side
        fill = RGB[obj["color"]]
        if obj["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif obj["shape"] == "square":
            half = r * 0.88
            draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=fill)
        elif obj["shape"] == "triangle":
            draw.polygon([(cx, cy - r), (cx - r * 0.95, cy + r * 0.8), (cx + r * 0.95, cy + r * 0.8)], fill=fill)
        else:  # diamond
            draw.polygon([(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)], fill=fill)
    return canvas.resize((image_size, image_size), Image.Resampling.LANCZOS)


def _phrase(obj: dict[str, Any], with_size: bool = True) -> str:
    words = " ".join(([obj["size"]] if with_size else []) + [obj["color"], obj["shape"]])
    article = "an" if words[0] in "aeiou" else "a"
    return f"{article} {words}"


def _captions(objects: list[dict[str, Any]], rng: np.random.Generator) -> list[str]:
    ordered = sorted(objects, key=lambda o: o["x"])
    count = len(objects)
    listed = " and ".join(_phrase(o) for o in ordered)
    captions = [listed, " and ".join(_phrase(o, with_size=False) for o in ordered)]
    if count == 1:
        side = "left" if ordered[0]["x"] < 0.5 else "right"
        captions += [f"a picture of {_phrase(ordered[0])}", f"{_phrase(ordered[0])} on the {side}"]
    else:
        noun = "objects"
        captions += [
            f"{NUMBER_WORDS[count]} {noun}: {listed}",
            f"{_phrase(ordered[0], with_size=False)} to the left of {_phrase(ordered[-1], with_size=False)}",
        ]
    return captions


def _questions(objects: list[dict[str, Any]], rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """Return (question, answer, type) triples that have exactly one correct answer for this scene."""
    triples: list[tuple[str, str, str]] = []
    shape_counts = {s: sum(o["shape"] == s for o in objects) for s in SHAPES}
    color_counts = {c: sum(o["color"] == c for o in objects) for c in COLORS}

    for obj in objects:
        if shape_counts[obj["shape"]] == 1:
            triples.append((f"what color is the {obj['shape']}?", obj["color"], "color"))
        if color_counts[obj["color"]] == 1:
            triples.append((f"what shape is the {obj['color']} object?", obj["shape"], "shape"))
        side = "left" if obj["x"] < 0.5 else "right"
        triples.append((f"is the {obj['color']} {obj['shape']} on the left or the right?", side, "position"))
    triples.append(("how many objects are there?", str(len(objects)), "count"))

    # One yes/no question about a present object and one about an absent one, in random order.
    present = objects[rng.integers(len(objects))]
    present_pairs = {(o["color"], o["shape"]) for o in objects}
    absent_pairs = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present_pairs]
    absent = absent_pairs[rng.integers(len(absent_pairs))]
    yes_no = [
        (f"is there {_phrase(present, with_size=False)}?", "yes", "yes_no"),
        (f"is there {_phrase({'color': absent[0], 'shape': absent[1]}, with_size=False)}?", "no", "yes_no"),
    ]
    if rng.random() < 0.5:
        yes_no.reverse()
    triples.extend(yes_no)
    return triples


def make_scene(seed: int, split: str, index: int, image_size: int, min_objects: int, max_objects: int) -> dict[str, Any]:
    """Build one scene (image, objects, captions, questions) from its own random stream."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    count = int(rng.integers(min_objects, max_objects + 1))
    objects = _place_objects(rng, count)
    background = tuple(int(v) for v in rng.integers(235, 256, size=3))
    image = _draw_scene(objects, image_size, background)
    captions = _captions(objects, rng)
    triples = _questions(objects, rng)
    return {
        "image": image,
        "scene_id": f"{split}-{seed}-{index:06d}",
        "num_objects": count,
        "objects": objects,
        "caption": captions[0],
        "captions": captions,
        "questions": [q for q, _, _ in triples],
        "answers": [a for _, a, _ in triples],
        "question_types": [t for _, _, t in triples],
    }


FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "scene_id": datasets.Value("string"),
        "num_objects": datasets.Value("int32"),
        "objects": datasets.List(
            {
                "color": datasets.Value("string"),
                "shape": datasets.Value("string"),
                "size": datasets.Value("string"),
                "x": datasets.Value("float32"),
                "y": datasets.Value("float32"),
            }
        ),
        "caption": datasets.Value("string"),
        "captions": datasets.List(datasets.Value("string")),
        "questions": datasets.List(datasets.Value("string")),
        "answers": datasets.List(datasets.Value("string")),
        "question_types": datasets.List(datasets.Value("string")),
    }
)


def make_shapes_world(
    num_scenes: int,
    split: str = "train",
    seed: int = 0,
    image_size: int = 64,
    min_objects: int = 1,
    max_objects: int = 3,
) -> datasets.Dataset:
    """Build ``num_scenes`` ShapesWorld scenes as a ``datasets.Dataset``.

    Columns: ``image`` (PIL RGB, ``image_size`` square), ``scene_id``, ``num_objects``,
    ``objects`` (colour, shape, size, centre ``x``/``y`` in 0..1), ``caption`` (canonical, objects
    listed left to right), ``captions`` (several phrasings), ``questions``, ``answers`` (one word
    each) and ``question_types`` (``color``, ``shape``, ``count``, ``position``, ``yes_no``).

    ``split`` is ``"train"`` or ``"test"``; scene ``i`` of a split is the same for the same
    ``seed`` and ``image_size`` everywhere. Raises ``ValueError`` on an unknown split or out-of-range sizes.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown ShapesWorld split {split!r}; use 'train' or 'test'.")
    if not isinstance(num_scenes, int) or num_scenes < 1:
        raise ValueError(f"num_scenes must be a positive int, got {num_scenes!r}.")
    if not isinstance(image_size, int) or image_size < 16:
        raise ValueError(f"image_size must be an int >= 16 pixels, got {image_size!r}.")
    if not (1 <= min_objects <= max_objects <= MAX_OBJECTS):
        raise ValueError(
            f"need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, got min_objects={min_objects}, max_objects={max_objects}."
        )
    rows = [make_scene(seed, split, index, image_size, min_objects, max_objects) for index in range(num_scenes)]
    return datasets.Dataset.from_list(rows, features=FEATURES)
