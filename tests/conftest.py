"""Test-wide settings: offline, the ``ci`` profile, a headless matplotlib backend."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("COURSE_PROFILE", "ci")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
