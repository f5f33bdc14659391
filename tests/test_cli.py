"""The command line: doctor and build-exercises."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "course_utils", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_doctor_reports_every_part():
    result = _run("doctor")
    assert result.returncode == 0, result.stdout + result.stderr
    for part in ("Python", "torch", "device", "ShapesWorld", "OpenMoji", "image encoder", "text encoder", "language model"):
        assert f"[ok]   {part}" in result.stdout
    assert "profile ci" in result.stdout


def test_doctor_fails_on_bad_profile():
    result = subprocess.run(
        [sys.executable, "-m", "course_utils", "doctor"], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "COURSE_PROFILE": "turbo"},
    )
    assert result.returncode == 1
    assert "[FAIL] device" in result.stdout
    assert "'turbo'" in result.stdout


def test_build_exercises_check_is_clean():
    result = _run("build-exercises", "--check")
    assert result.returncode == 0, result.stdout
    assert "up to date" in result.stdout


def test_build_exercises_check_flags_stale(tmp_path):
    solutions = tmp_path / "solutions"
    solutions.mkdir()
    (solutions / "x.ipynb").write_text((ROOT / "solutions" / "00_setup_and_data_tour.ipynb").read_text())
    result = _run("build-exercises", "--check", "--solutions", str(solutions), "--notebooks", str(tmp_path / "notebooks"))
    assert result.returncode == 1
    assert "x.ipynb" in result.stdout


def test_unknown_command_is_rejected():
    result = _run("frobnicate")
    assert result.returncode != 0
    assert "invalid choice" in result.stderr
