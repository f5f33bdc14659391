"""ShapesWorld: determinism, splits, sizes, and text that agrees with the pixels."""

import numpy as np
import pytest

from course_utils.data import COLORS, QUESTION_TYPES, SHAPES, make_shapes_world
from course_utils.data.shapes_world import RGB


@pytest.fixture(scope="module")
def scenes():
    return make_shapes_world(60, split="train", seed=3)


def test_same_seed_same_scenes(scenes):
    again = make_shapes_world(60, split="train", seed=3)
    assert scenes["caption"] == again["caption"]
    assert np.array_equal(np.asarray(scenes[7]["image"]), np.asarray(again[7]["image"]))


def test_other_seed_other_scenes(scenes):
    other = make_shapes_world(60, split="train", seed=4)
    assert scenes["caption"] != other["caption"]


def test_splits_share_no_scene(scenes):
    held_out = make_shapes_world(60, split="test", seed=3)
    train_images = {np.asarray(image).tobytes() for image in scenes["image"]}
    assert not any(np.asarray(image).tobytes() in train_images for image in held_out["image"])
    assert set(scenes["scene_id"]).isdisjoint(held_out["scene_id"])


def test_prefix_is_stable_when_growing():
    small = make_shapes_world(10, seed=1)
    large = make_shapes_world(20, seed=1)
    assert small["caption"] == large["caption"][:10]


def test_object_counts_and_sizes_follow_arguments():
    dataset = make_shapes_world(40, seed=0, image_size=48, min_objects=2, max_objects=4)
    assert len(dataset) == 40
    assert set(dataset["num_objects"]) <= {2, 3, 4}
    assert dataset[0]["image"].size == (48, 48)
    for row in dataset:
        assert len(row["objects"]) == row["num_objects"]


def test_every_question_type_occurs(scenes):
    seen = {kind for kinds in scenes["question_types"] for kind in kinds}
    assert seen == set(QUESTION_TYPES)


def test_answers_match_objects(scenes):
    for row in scenes:
        objects = row["objects"]
        for question, answer, kind in zip(row["questions"], row["answers"], row["question_types"]):
            if kind == "count":
                assert answer == str(len(objects))
            elif kind == "color":
                shape = question.removeprefix("what color is the ").removesuffix("?")
                assert [o["color"] for o in objects if o["shape"] == shape] == [answer]
            elif kind == "shape":
                color = question.removeprefix("what shape is the ").removesuffix(" object?")
                assert [o["shape"] for o in objects if o["color"] == color] == [answer]
            elif kind == "position":
                words = question.split()
                color, shape = words[2], words[3]
                (obj,) = [o for o in objects if o["color"] == color and o["shape"] == shape]
                assert answer == ("left" if obj["x"] < 0.5 else "right")
            else:
                words = question.removesuffix("?").split()
                color, shape = words[-2], words[-1]
                present = any(o["color"] == color and o["shape"] == shape for o in objects)
                assert answer == ("yes" if present else "no")


def test_yes_no_is_balanced(scenes):
    answers = [a for row in scenes for a, k in zip(row["answers"], row["question_types"]) if k == "yes_no"]
    assert answers.count("yes") == answers.count("no")


def test_captions_mention_every_object(scenes):
    for row in scenes:
        for obj in row["objects"]:
            assert f"{obj['color']} {obj['shape']}" in row["caption"]


def test_object_centres_have_their_colour():
    dataset = make_shapes_world(30, seed=2, image_size=64)
    for row in dataset:
        pixels = np.asarray(row["image"]).astype(int)
        for obj in row["objects"]:
            x, y = int(obj["x"] * 64), int(obj["y"] * 64)
            # The triangle's centroid sits below its bounding-box centre; a small window is enough.
            window = pixels[max(0, y - 1) : y + 3, max(0, x - 1) : x + 2].reshape(-1, 3)
            distances = np.abs(window - np.array(RGB[obj["color"]])).sum(axis=1)
            assert distances.min() < 60, (row["scene_id"], obj)


def test_vocabulary_constants():
    assert len(COLORS) == 6
    assert {"circle", "square", "triangle"} <= set(SHAPES)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_scenes": 5, "split": "validation"}, "validation"),
        ({"num_scenes": 0}, "num_scenes"),
        ({"num_scenes": 5, "image_size": 8}, "image_size"),
        ({"num_scenes": 5, "min_objects": 3, "max_objects": 2}, "min_objects"),
        ({"num_scenes": 5, "max_objects": 9}, "max_objects"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_shapes_world(**kwargs)
