"""Tests of the classroom grader (course_utils.grading).

The class folder is built in tmp_path from one small solution notebook around the warm-up
exercise (check_l2_normalize). The blank submission is made by the real exercise builder.
Every learner notebook runs in a real Jupyter kernel, so the module takes over a minute.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import psutil
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from course_utils import grading
from course_utils.exercises import build_learner_notebook

# The looping learner is stopped by this limit. The others need about 20 s each (kernel start
# plus importing torch) on a loaded two-core machine, and less on a quiet one.
CLASS_TIMEOUT_S = 60.0
LOOP_LEARNER_MARGIN_S = 30.0

EXERCISE = "warmup_l2_normalize"

CORRECT_BODY = "return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)"
WRONG_BODY = "return x / x.norm()  # whole-matrix norm instead of one norm per row"


def make_solution(body: str = CORRECT_BODY, before: str = "", after_check: str = "") -> nbformat.NotebookNode:
    """Return a small notebook with one warm-up exercise and its check cell."""
    cells = [
        new_markdown_cell("# 暖身練習\n\n把每一列向量正規化成單位長度。"),
        new_code_cell(
            "import os\n"
            "import pathlib\n"
            "import torch\n"
            "from course_utils.checks.warmup import check_l2_normalize\n"
            "pathlib.Path('kernel_pid.txt').write_text(str(os.getpid()))"
        ),
        new_code_cell(
            f"{before}"
            "def l2_normalize(x):\n"
            "    ### BEGIN SOLUTION\n"
            f"    {body}\n"
            "    ### END SOLUTION"
        ),
        new_code_cell("check_l2_normalize(l2_normalize)"),
        new_code_cell(f"{after_check}print('notebook 跑完了')"),
    ]
    notebook = new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return notebook


def write_notebook(notebook: nbformat.NotebookNode, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook, path)
    return path


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory) -> Path:
    """A class with one submission per typical situation; sub-folder learners as a teacher collects them."""
    root = tmp_path_factory.mktemp("class")
    write_notebook(make_solution(), root / "correct" / "warmup.ipynb")
    write_notebook(make_solution(WRONG_BODY), root / "wrong" / "warmup.ipynb")
    write_notebook(build_learner_notebook(make_solution(), name="warmup.ipynb"), root / "blank" / "warmup.ipynb")
    # The kernel process exits before the check cell runs.
    write_notebook(make_solution(before="os._exit(3)\n\n"), root / "crashing" / "warmup.ipynb")
    write_notebook(make_solution(before="while True:\n    pass\n\n"), root / "looping" / "warmup.ipynb")
    write_notebook(make_solution("raise ValueError('x 的形狀不對')"), root / "raising" / "warmup.ipynb")
    # About 20 MB of printed text, then a correct exercise.
    noisy = make_solution(before="for _ in range(20_000):\n    print('x' * 1000)\n\n")
    write_notebook(noisy, root / "noisy" / "warmup.ipynb")
    # The check cell was replaced by a cell with a syntax error.
    deleted = make_solution()
    deleted.cells = deleted.cells[:3] + [new_code_cell("this is not python")]
    write_notebook(deleted, root / "deleted_check" / "warmup.ipynb")
    # A file that is not JSON at all, directly in the class folder.
    (root / "malformed.ipynb").write_text("這不是 notebook {", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def graded(class_folder: Path, tmp_path_factory):
    """Grade the class once through the command line entry point; return reports, outputs and wall time."""
    out = tmp_path_factory.mktemp("grade-output")
    assignment = write_notebook(build_learner_notebook(make_solution(), name="warmup.ipynb"), out / "assignment" / "warmup.ipynb")
    csv_path, json_path = out / "class.csv", out / "class.json"
    started = time.monotonic()
    exit_code = grading.main([
        str(class_folder), "--timeout", str(CLASS_TIMEOUT_S), "--jobs", "3",
        "--assignment", str(assignment), "--csv", str(csv_path), "--json", str(json_path),
        "--max-output-chars", "100000", "--executed-dir", str(out / "executed"),
    ])
    wall = time.monotonic() - started
    report = json.loads(json_path.read_text(encoding="utf-8"))
    by_learner = {submission["learner"]: submission for submission in report["submissions"]}
    return {"exit_code": exit_code, "wall": wall, "report": report, "by_learner": by_learner,
            "csv": csv_path, "out": out, "class": class_folder}


def exercise_row(graded, learner: str) -> dict:
    rows = [row for row in graded["by_learner"][learner]["exercises"] if row["exercise"] == EXERCISE]
    assert len(rows) == 1, f"{learner}: expected one row for {EXERCISE}, got {rows}"
    return rows[0]


def test_grade_exit_code_and_learners(graded):
    assert graded["exit_code"] == 0
    assert set(graded["by_learner"]) == {
        "correct", "wrong", "blank", "crashing", "looping", "raising", "noisy", "deleted_check", "malformed",
    }


def test_correct_submission_passes(graded):
    row = exercise_row(graded, "correct")
    assert row["status"] == "passed"
    assert row["points"] == row["max_points"] == 1.0
    assert graded["by_learner"]["correct"]["run"]["state"] == "completed"


def test_wrong_submission_fails_with_message(graded):
    row = exercise_row(graded, "wrong")
    assert row["status"] == "failed"
    assert row["points"] < row["max_points"]
    assert "未通過" in row["message"]
    assert "預期" in row["message"]


def test_blank_submission_not_implemented(graded):
    row = exercise_row(graded, "blank")
    assert row["status"] == "not_implemented"
    assert row["points"] == 0.0


def test_crashing_submission_not_run(graded):
    submission = graded["by_learner"]["crashing"]
    row = exercise_row(graded, "crashing")
    assert submission["run"]["state"] == "kernel_died"
    assert row["status"] == "not_run"
    assert "kernel" in row["message"]


def test_looping_submission_times_out(graded):
    submission = graded["by_learner"]["looping"]
    row = exercise_row(graded, "looping")
    assert submission["run"]["state"] == "timed_out"
    assert row["status"] == "timed_out"
    assert "第 3 個 cell" in row["message"]
    assert CLASS_TIMEOUT_S <= submission["run"]["seconds"] < CLASS_TIMEOUT_S + LOOP_LEARNER_MARGIN_S


def test_looping_kernel_is_killed(graded):
    pid_file = graded["class"] / "looping" / "kernel_pid.txt"
    pid = int(pid_file.read_text())
    assert pid != os.getpid()
    if psutil.pid_exists(pid):
        assert psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_raising_submission_is_error(graded):
    row = exercise_row(graded, "raising")
    assert row["status"] == "error"
    assert "ValueError" in row["message"]


def test_noisy_submission_output_capped(graded):
    submission = graded["by_learner"]["noisy"]
    assert exercise_row(graded, "noisy")["status"] == "passed"
    assert submission["run"]["output_truncated"] is True
    assert submission["run"]["output_chars"] <= 100_000
    executed = graded["out"] / "executed" / "noisy__warmup.ipynb"
    assert executed.stat().st_size < 1_000_000


def test_deleted_check_cell_not_run(graded):
    row = exercise_row(graded, "deleted_check")
    assert row["status"] == "not_run"
    assert "找不到" in row["message"]


def test_malformed_submission_invalid(graded):
    submission = graded["by_learner"]["malformed"]
    row = exercise_row(graded, "malformed")
    assert submission["run"]["state"] == "invalid_notebook"
    assert row["status"] == "invalid_notebook"
    assert "JSON" in row["message"]


def test_submissions_run_outside_grader_process(graded):
    pid = int((graded["class"] / "correct" / "kernel_pid.txt").read_text())
    assert pid != os.getpid()
    assert pid not in {child.pid for child in psutil.Process().children(recursive=True)}


def test_class_graded_within_time_limit(graded):
    # Three jobs at a time: the looping learner's limit plus the rest in parallel.
    assert graded["wall"] < 3 * CLASS_TIMEOUT_S


def test_csv_has_row_per_exercise(graded):
    with open(graded["csv"], encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows[0].keys() >= {"learner", "exercise", "status", "status_label", "points", "max_points", "message"}
    statuses = {row["learner"]: row["status"] for row in rows}
    assert statuses["correct"] == "passed"
    assert statuses["looping"] == "timed_out"
    assert {row["status_label"] for row in rows} >= {"通過", "未通過", "尚未實作", "逾時", "未執行", "檔案無效", "程式錯誤"}


def test_terminal_table_in_traditional_chinese(graded):
    reports = [
        grading.SubmissionReport(
            learner=s["learner"], notebook=s["notebook"], path=s["path"],
            run=grading.RunOutcome(state=s["run"]["state"], seconds=s["run"]["seconds"]),
            exercises=[grading.ExerciseResult(**{k: v for k, v in row.items() if k != "status_label"}) for row in s["exercises"]],
        )
        for s in graded["report"]["submissions"]
    ]
    table = grading.format_table(reports)
    header = table.splitlines()[0]
    for word in ("學員", "練習", "狀態", "分數", "說明"):
        assert word in header
    assert "逾時" in table
    assert "共 9 份 notebook" in table


def test_scan_finds_check_cells(tmp_path):
    path = write_notebook(make_solution(), tmp_path / "a.ipynb")
    scan = grading.scan_notebook(path, grading.checker_registry())
    assert scan.valid
    assert scan.check_cells == {EXERCISE: 3}


def test_scan_rejects_invalid_schema(tmp_path):
    path = tmp_path / "schema.ipynb"
    path.write_text(json.dumps({"cells": "not a list", "nbformat": 4, "nbformat_minor": 5, "metadata": {}}))
    scan = grading.scan_notebook(path, grading.checker_registry())
    assert not scan.valid
    assert scan.error


def test_discover_class_layouts(tmp_path):
    write_notebook(make_solution(), tmp_path / "class" / "ann.ipynb")
    write_notebook(make_solution(), tmp_path / "class" / "bob" / "part1" / "a.ipynb")
    write_notebook(make_solution(), tmp_path / "class" / "bob" / ".ipynb_checkpoints" / "a-checkpoint.ipynb")
    (tmp_path / "class" / "empty").mkdir()
    (tmp_path / "class" / "notes.txt").write_text("ignored")
    found = grading.discover_submissions([tmp_path / "class"])
    assert [(s.learner, s.notebook.name if s.notebook else None) for s in found] == [
        ("ann", "ann.ipynb"), ("bob", "a.ipynb"), ("empty", None),
    ]


def test_discover_rejects_missing_and_non_notebook(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        grading.discover_submissions([tmp_path / "nope"])
    text_file = tmp_path / "a.txt"
    text_file.write_text("x")
    with pytest.raises(ValueError, match="not a notebook"):
        grading.discover_submissions([text_file])


def test_empty_learner_folder_reports_not_run(tmp_path):
    assignment = write_notebook(make_solution(), tmp_path / "assignment.ipynb")
    (tmp_path / "class" / "dana").mkdir(parents=True)
    reports = grading.grade([tmp_path / "class"], assignment=assignment, progress=False)
    assert len(reports) == 1
    assert [(r.exercise, r.status) for r in reports[0].exercises] == [(EXERCISE, "not_run")]


def test_records_of_last_call_win():
    run = grading.RunOutcome(state="completed", records=[
        {"exercise": EXERCISE, "status": "failed", "points": 0.2, "message": "first"},
        {"exercise": EXERCISE, "status": "passed", "points": 1.0, "message": "second"},
    ])
    results = grading.build_exercise_results("amy", "a.ipynb", {EXERCISE: 3}, run, grading.checker_registry())
    assert [(r.status, r.points, r.message) for r in results] == [("passed", 1.0, "second")]


def test_points_clamped_to_max():
    run = grading.RunOutcome(state="completed", records=[
        {"exercise": EXERCISE, "status": "passed", "points": 50.0, "message": ""},
    ])
    results = grading.build_exercise_results("amy", "a.ipynb", {EXERCISE: 3}, run, grading.checker_registry())
    assert results[0].points == 1.0


def test_main_rejects_bad_options(tmp_path, capsys):
    with pytest.raises(SystemExit) as raised:
        grading.main([str(tmp_path), "--timeout", "0"])
    assert raised.value.code == 2
    assert "--timeout" in capsys.readouterr().err


def test_main_reports_empty_class(tmp_path, capsys):
    assert grading.main([str(tmp_path)]) == 1
    assert "no notebooks found" in capsys.readouterr().err


def test_kill_reaches_other_sessions(tmp_path):
    # A child that starts a grandchild in a new session, as jupyter_client starts kernels.
    pid_file = tmp_path / "grandchild.pid"
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(300)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline, "the test process did not start its grandchild"
            time.sleep(0.1)
        grandchild = int(pid_file.read_text())
        assert os.getpgid(grandchild) != os.getpgid(parent.pid)
        tracked: dict[int, float] = {}
        grading._kill_processes(parent.pid, tracked)
        parent.wait(timeout=10)
        assert grandchild in tracked
        assert not psutil.pid_exists(grandchild) or psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE
    finally:
        if parent.poll() is None:
            parent.kill()


def test_cli_grade_subcommand(tmp_path):
    (tmp_path / "class").mkdir()
    (tmp_path / "class" / "zoe.ipynb").write_text("{ not json", encoding="utf-8")
    json_path = tmp_path / "out.json"
    completed = subprocess.run(
        [sys.executable, "-m", "course_utils", "grade", str(tmp_path / "class"), "--json", str(json_path)],
        cwd=Path(grading.__file__).resolve().parents[1], capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert "檔案無效" in completed.stdout
    submission = json.loads(json_path.read_text(encoding="utf-8"))["submissions"][0]
    assert submission["learner"] == "zoe"
    assert submission["exercises"][0]["status"] == "invalid_notebook"


def test_scan_matches_nbgrader_metadata():
    # Every check cell the exercise builder tagged for nbgrader is one the grader expects.
    learner_notebooks = sorted((Path(grading.__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
    if not learner_notebooks:
        pytest.skip("notebooks/ has no learner notebooks yet; run python -m course_utils build-exercises")
    registry = grading.checker_registry()
    for path in learner_notebooks:
        scan = grading.scan_notebook(path, registry)
        assert scan.valid, f"{path.name}: {scan.error}"
        notebook = nbformat.read(path, as_version=4)
        graded_cells = {index for index, cell in enumerate(notebook.cells)
                        if cell.get("metadata", {}).get("nbgrader", {}).get("grade")}
        assert set(scan.check_cells.values()) == graded_cells, path.name
