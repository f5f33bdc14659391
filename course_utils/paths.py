"""Where the course keeps generated data, caches and checkpoints.

With the package installed from a clone (``pip install -e .``) everything lives in the clone:
``data/cache/`` and ``checkpoints/``, both ignored by git. An installed copy without a clone
falls back to ``~/.cache/vlm-course``. ``COURSE_DATA_DIR`` and ``COURSE_CHECKPOINT_DIR``
override both.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent


def _data_dir() -> Path:
    override = os.environ.get("COURSE_DATA_DIR")
    if override:
        return Path(override).expanduser()
    if (REPO_DIR / "data" / "DATA.md").exists():
        return REPO_DIR / "data"
    return Path.home() / ".cache" / "vlm-course" / "data"


def _checkpoint_dir() -> Path:
    override = os.environ.get("COURSE_CHECKPOINT_DIR")
    if override:
        return Path(override).expanduser()
    if (REPO_DIR / "data" / "DATA.md").exists():
        return REPO_DIR / "checkpoints"
    return Path.home() / ".cache" / "vlm-course" / "checkpoints"


DATA_DIR = _data_dir()
CACHE_DIR = DATA_DIR / "cache"
CHECKPOINT_DIR = _checkpoint_dir()
