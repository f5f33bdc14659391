"""Command line of the course: ``python -m course_utils {doctor,build-exercises,grade}``."""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

from course_utils import paths


def _doctor_checks():
    """Yield (name, callable) pairs; each callable returns a short detail string or raises."""
    import torch

    from course_utils.env import get_device, get_profile

    def torch_info():
        cuda = torch.version.cuda or "none"
        return f"torch {torch.__version__} (CUDA build: {cuda})"

    def device_info():
        device = get_device()
        return f"device {device}, profile {get_profile(device)}"

    def shapes_world():
        from course_utils.data import make_shapes_world

        dataset = make_shapes_world(8, split="test")
        return f"{len(dataset)} scenes built, e.g. {dataset[0]['caption']!r}"

    def openmoji():
        from course_utils.data import load_openmoji

        train, test = load_openmoji("train"), load_openmoji("test")
        return f"{len(train)} train / {len(test)} test emoji"

    def image_encoder():
        from course_utils.data import make_shapes_world
        from course_utils.pretrained import load_image_encoder

        features = load_image_encoder("cpu").encode(make_shapes_world(2)["image"])
        return f"EfficientNet-Lite0 tokens {tuple(features.tokens.shape)}, pooled {tuple(features.pooled.shape)}"

    def text_encoder():
        from course_utils.pretrained import load_text_encoder

        features = load_text_encoder("cpu").encode(["a red circle", "a blue square"])
        return f"all-MiniLM-L6-v2 tokens {tuple(features.tokens.shape)}, sentence {tuple(features.sentence.shape)}"

    def language_model():
        from course_utils.pretrained import load_language_model

        model, tokenizer = load_language_model("cpu")
        return f"SmolLM2-135M-Instruct, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, vocab {len(tokenizer)}"

    yield "Python", lambda: f"{platform.python_version()} ({sys.executable})"
    yield "torch", torch_info
    yield "device", device_info
    yield "ShapesWorld", shapes_world
    yield "OpenMoji", openmoji
    yield "image encoder", image_encoder
    yield "text encoder", text_encoder
    yield "language model", language_model


def doctor(_args) -> int:
    """Print one line per part of the environment; exit 1 when any part fails."""
    failures = 0
    print(f"data folder: {paths.DATA_DIR}   checkpoints: {paths.CHECKPOINT_DIR}")
    for name, check in _doctor_checks():
        started = time.perf_counter()
        try:
            detail = check()
            print(f"[ok]   {name:15s} {detail}  ({time.perf_counter() - started:.1f} s)")
        except Exception as error:  # report every failing part, then exit non-zero
            failures += 1
            print(f"[FAIL] {name:15s} {type(error).__name__}: {error}")
    print("all parts work." if failures == 0 else f"{failures} part(s) failed; see the messages above.")
    return 1 if failures else 0


def build_exercises(args) -> int:
    from course_utils.exercises import build_all

    stale = build_all(Path(args.solutions), Path(args.notebooks), check_only=args.check)
    if args.check:
        if stale:
            print("learner notebooks out of date (run `python -m course_utils build-exercises`):")
            for path in stale:
                print(f"  {path}")
            return 1
        print("learner notebooks are up to date.")
        return 0
    print(f"wrote {len(stale)} learner notebook(s)" + "".join(f"\n  {path}" for path in stale))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "grade":
        from course_utils.grading import main as grade_main

        return grade_main(argv[1:])

    parser = argparse.ArgumentParser(prog="python -m course_utils", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("doctor", help="report Python, torch, device, profile, and whether each data set and pretrained part loads")
    build = commands.add_parser("build-exercises", help="build notebooks/ (learner versions) from solutions/")
    build.add_argument("--solutions", default=str(paths.REPO_DIR / "solutions"), help="folder of solution notebooks")
    build.add_argument("--notebooks", default=str(paths.REPO_DIR / "notebooks"), help="folder to write learner notebooks to")
    build.add_argument("--check", action="store_true", help="write nothing; exit 1 when a learner notebook is missing or stale")
    commands.add_parser("grade", help="grade learner notebooks (see `python -m course_utils grade --help`)")
    args = parser.parse_args(argv)
    return {"doctor": doctor, "build-exercises": build_exercises}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
