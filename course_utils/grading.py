"""Grade learner notebooks for a class: ``python -m course_utils grade PATH...``.

Each notebook runs in a fresh kernel started by a separate worker process (this module run
with ``--worker``), never in the grader's process. The grader gives every worker a wall-clock
limit and, when it runs out, kills the worker and every process below it, the kernel
included. The exercise checkers in :mod:`course_utils.checks` append one JSON line per check
to the file named by ``COURSE_CHECK_LOG``. The grader points that variable at a fresh file for
each notebook and reads it back afterwards.

NOTE: this isolates crashes, endless loops and floods of output, not malicious code. A
submission runs with the teacher's user rights and can read or write their files, and no
memory limit is set, so one that allocates too much can slow or stop the whole machine.

Which exercises a notebook should contain comes from its check cells (code cells that call
``check_...(``, matched against the checker registry) and, when one is found, from the
assignment notebook of the same file name (``--assignment``, by default the course's
``notebooks/`` folder). An expected exercise that left no record gets ``timed_out``,
``invalid_notebook`` or ``not_run`` with the reason.

Statuses: ``passed``, ``failed``, ``not_implemented``, ``error`` (as the checker reported
them), ``timed_out``, ``not_run`` and ``invalid_notebook``.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import csv
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

PASSED, FAILED, ERROR, NOT_IMPLEMENTED = "passed", "failed", "error", "not_implemented"
TIMED_OUT, NOT_RUN, INVALID_NOTEBOOK = "timed_out", "not_run", "invalid_notebook"
STATUSES = (PASSED, FAILED, NOT_IMPLEMENTED, ERROR, TIMED_OUT, NOT_RUN, INVALID_NOTEBOOK)

# Teachers read the terminal table, so its headers and status words are Traditional Chinese.
STATUS_LABELS = {
    PASSED: "通過",
    FAILED: "未通過",
    NOT_IMPLEMENTED: "尚未實作",
    ERROR: "程式錯誤",
    TIMED_OUT: "逾時",
    NOT_RUN: "未執行",
    INVALID_NOTEBOOK: "檔案無效",
}

# Final states of a worker run.
RUN_COMPLETED = "completed"
RUN_TIMED_OUT = "timed_out"
RUN_KERNEL_DIED = "kernel_died"
RUN_FAILED = "failed"  # the kernel never started, or the worker itself crashed
RUN_INVALID = "invalid_notebook"
RUN_MISSING = "missing"  # a learner folder without any notebook

DEFAULT_TIMEOUT_S = 600.0
DEFAULT_PROFILE = "ci"
DEFAULT_KERNEL = "python3"
DEFAULT_MAX_OUTPUT_CHARS = 1_000_000
MAX_NOTEBOOK_BYTES = 50 * 1024 * 1024
MAX_CHECK_LOG_BYTES = 5 * 1024 * 1024
WORKER_OUTPUT_TAIL_BYTES = 16 * 1024
POLL_INTERVAL_S = 0.25
SKIPPED_NAMES = {".ipynb_checkpoints", "__pycache__", ".git"}

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ASSIGNMENT_DIR = PACKAGE_ROOT / "notebooks"


# --------------------------------------------------------------------------------------------
# What is graded


@dataclass
class Submission:
    """One notebook of one learner; ``notebook`` is None for a learner folder without notebooks."""

    learner: str
    notebook: Path | None
    folder: Path | None = None


@dataclass
class NotebookScan:
    """Validity and check cells of a notebook file, found without executing it."""

    valid: bool
    error: str = ""
    # exercise id -> index of the check cell that calls its checker, in notebook order
    check_cells: dict[str, int] = field(default_factory=dict)


def discover_submissions(paths: Iterable[str | Path]) -> list[Submission]:
    """Expand notebooks and class folders into one :class:`Submission` per learner notebook.

    A path ending in ``.ipynb`` is one learner's notebook (learner = file stem). A folder is a
    class: each ``*.ipynb`` directly inside it is one learner, and each sub-folder is one
    learner whose notebooks are every ``*.ipynb`` below it. Raises ``FileNotFoundError`` for a
    missing path and ``ValueError`` for a file that is not a notebook.
    """
    submissions: list[Submission] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist; pass a learner notebook (.ipynb) or a folder of submissions.")
        if path.is_file():
            if path.suffix != ".ipynb":
                raise ValueError(f"{path} is not a notebook; pass a .ipynb file or a folder of submissions.")
            submissions.append(Submission(learner=path.stem, notebook=path))
            continue
        for child in sorted(path.iterdir()):
            if child.name in SKIPPED_NAMES or child.name.startswith("."):
                continue
            if child.is_file() and child.suffix == ".ipynb":
                submissions.append(Submission(learner=child.stem, notebook=child))
            elif child.is_dir():
                notebooks = sorted(
                    found for found in child.rglob("*.ipynb")
                    if not any(part in SKIPPED_NAMES for part in found.relative_to(child).parts)
                )
                if not notebooks:
                    submissions.append(Submission(learner=child.name, notebook=None, folder=child))
                for notebook in notebooks:
                    submissions.append(Submission(learner=child.name, notebook=notebook, folder=child))
            else:
                print(f"grade: skipping {child}: not a notebook or a learner folder.", file=sys.stderr)
    return submissions


def checker_registry() -> dict[str, dict[str, Any]]:
    """Return the registry of every exercise (imports all checker modules)."""
    from course_utils.checks import load_all

    return load_all()


def scan_notebook(path: Path, registry: dict[str, dict[str, Any]]) -> NotebookScan:
    """Parse ``path`` as a notebook and find its check cells; never executes anything."""
    import nbformat
    from course_utils.exercises import CHECK_CALL

    size = path.stat().st_size
    if size > MAX_NOTEBOOK_BYTES:
        return NotebookScan(False, f"檔案太大（{size / 2**20:.0f} MiB，上限 {MAX_NOTEBOOK_BYTES / 2**20:.0f} MiB）；請清除輸出後再繳交。")
    try:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
    except (nbformat.reader.NotJSONError, UnicodeDecodeError) as error:
        return NotebookScan(False, f"不是有效的 notebook（無法解析成 JSON）：{_one_line(error)}")
    except nbformat.ValidationError as error:
        return NotebookScan(False, f"notebook 格式不符合 nbformat 規範：{_one_line(error)}")
    except (ValueError, KeyError, AttributeError, TypeError) as error:
        return NotebookScan(False, f"不是有效的 notebook：{type(error).__name__}: {_one_line(error)}")

    exercise_by_function = {entry["function"]: exercise for exercise, entry in registry.items()}
    check_cells: dict[str, int] = {}
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        for name in CHECK_CALL.findall(cell.source):
            exercise = exercise_by_function.get(f"check_{name}")
            if exercise is not None and exercise not in check_cells:
                check_cells[exercise] = index
    return NotebookScan(True, check_cells=check_cells)


def find_assignment(notebook: Path | None, assignment: Path | None) -> Path | None:
    """Return the assignment notebook that lists the exercises expected in ``notebook``.

    ``assignment`` may be one notebook (used for every submission) or a folder searched for a
    notebook with the same file name; None means the course's ``notebooks/`` folder.
    """
    if assignment is not None and assignment.is_file():
        return assignment
    folder = assignment if assignment is not None else DEFAULT_ASSIGNMENT_DIR
    if notebook is None or not folder.is_dir():
        return None
    candidate = folder / notebook.name
    return candidate if candidate.is_file() else None


# --------------------------------------------------------------------------------------------
# Running one notebook in a separate process


@dataclass
class RunOutcome:
    """Outcome of executing one notebook: final state, duration, cell errors and the checkers' records."""

    state: str
    seconds: float = 0.0
    reason: str = ""
    # Cell indexes are 0-based, as in the notebook's JSON; messages for people count from 1.
    current_cell: int | None = None
    output_truncated: bool = False
    output_chars: int = 0
    # cell index -> "ErrorName: message" for each code cell whose output is an error
    cell_errors: dict[int, str] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    kernel_pids: list[int] = field(default_factory=list)


def grading_environment(profile: str, check_log: Path) -> dict[str, str]:
    """Return the environment of a worker: course profile, offline hub, headless plots, check log."""
    env = dict(os.environ)
    env["COURSE_PROFILE"] = profile
    env["HF_HUB_OFFLINE"] = "1"
    env["MPLBACKEND"] = "Agg"
    env["COURSE_CHECK_LOG"] = str(check_log)
    env["PYTHONUNBUFFERED"] = "1"
    # The kernel imports the same course_utils (and so the same checkers) as the grader.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH", "")]))
    return env


class _TailReader(threading.Thread):
    """Drain a pipe and keep only its last bytes, so a noisy kernel can fill neither memory nor disk."""

    def __init__(self, stream, limit: int = WORKER_OUTPUT_TAIL_BYTES):
        super().__init__(daemon=True)
        self.stream = stream
        self.tail: collections.deque[bytes] = collections.deque()
        self.size = 0
        self.limit = limit

    def run(self) -> None:
        for chunk in iter(lambda: self.stream.read1(65536), b""):
            self.tail.append(chunk)
            self.size += len(chunk)
            while self.size - len(self.tail[0]) >= self.limit:
                self.size -= len(self.tail.popleft())

    def text(self) -> str:
        return b"".join(self.tail)[-self.limit:].decode("utf-8", errors="replace")


def _track_descendants(root_pid: int, tracked: dict[int, float]) -> None:
    """Remember every process below ``root_pid`` (pid -> create time) so none outlives the run."""
    import psutil

    try:
        children = psutil.Process(root_pid).children(recursive=True)
    except psutil.Error:
        return
    for child in children:
        try:
            tracked.setdefault(child.pid, child.create_time())
        except psutil.Error:
            continue


def _kill_processes(root_pid: int | None, tracked: dict[int, float]) -> None:
    """Kill ``root_pid``, its descendants and every tracked process still alive, with their process groups.

    The kernel runs in its own session (jupyter_client starts it with ``start_new_session``),
    so killing the worker's process group alone would leave it running.
    """
    # NOTE: process groups and sessions are POSIX: the grader runs on Linux and macOS, not Windows.
    import psutil

    if root_pid is not None:
        _track_descendants(root_pid, tracked)
    victims: list[psutil.Process] = []
    if root_pid is not None:
        try:
            victims.append(psutil.Process(root_pid))
        except psutil.Error:
            pass
    for pid, created in tracked.items():
        try:
            process = psutil.Process(pid)
            if abs(process.create_time() - created) < 1e-3:  # the same process, not a reused pid
                victims.append(process)
        except psutil.Error:
            continue

    own_group = os.getpgid(0)
    groups: set[int] = set()
    for process in victims:
        try:
            groups.add(os.getpgid(process.pid))
        except OSError:
            pass
    for group in groups - {own_group}:
        try:
            os.killpg(group, signal.SIGKILL)
        except OSError:
            pass
    for process in victims:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(victims, timeout=5)


def run_notebook(
    notebook: Path,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    profile: str = DEFAULT_PROFILE,
    kernel: str = DEFAULT_KERNEL,
    max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS,
    executed_path: Path | None = None,
) -> RunOutcome:
    """Execute ``notebook`` in a worker process and return how it ended, with the checkers' records.

    The time limit covers the whole run, kernel start included; when it passes, the worker
    and every process started below it are killed. The kernel's working directory is the
    notebook's folder.
    """
    with tempfile.TemporaryDirectory(prefix="course-grade-") as scratch_name:
        scratch = Path(scratch_name)
        check_log = scratch / "checks.jsonl"
        result_path = scratch / "result.json"
        progress_path = scratch / "progress.txt"
        command = [
            sys.executable, "-m", "course_utils.grading", "--worker", str(notebook.resolve()),
            "--result", str(result_path), "--progress", str(progress_path),
            "--kernel", kernel, "--max-output-chars", str(max_output_chars),
            "--startup-timeout", str(max(1, int(min(timeout, 120)))),
        ]
        if executed_path is not None:
            command += ["--executed", str(executed_path.resolve())]

        started = time.monotonic()
        process = subprocess.Popen(
            command,
            cwd=notebook.resolve().parent,
            env=grading_environment(profile, check_log),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        reader = _TailReader(process.stdout)
        reader.start()
        tracked: dict[int, float] = {}
        timed_out = False
        while True:
            try:
                process.wait(timeout=POLL_INTERVAL_S)
                break
            except subprocess.TimeoutExpired:
                _track_descendants(process.pid, tracked)
            if time.monotonic() - started > timeout:
                timed_out = True
                _kill_processes(process.pid, tracked)
                process.wait()
                break
        seconds = time.monotonic() - started
        # A kernel orphaned by a crashed worker would otherwise keep running.
        _kill_processes(None, tracked)
        reader.join(timeout=5)

        outcome = RunOutcome(state=RUN_COMPLETED, seconds=round(seconds, 2), kernel_pids=sorted(tracked))
        outcome.records = read_check_log(check_log)
        outcome.current_cell = _read_progress(progress_path)
        worker_result = _read_json(result_path)
        if worker_result is not None:
            outcome.output_truncated = bool(worker_result.get("output_truncated"))
            outcome.output_chars = int(worker_result.get("output_chars", 0))
            outcome.cell_errors = {int(index): text for index, text in worker_result.get("cell_errors", {}).items()}

        if timed_out:
            outcome.state = RUN_TIMED_OUT
            cell = f"，當時在執行第 {outcome.current_cell + 1} 個 cell" if outcome.current_cell is not None else ""
            outcome.reason = f"執行超過 {timeout:g} 秒被停止{cell}"
        elif worker_result is None:
            outcome.state = RUN_FAILED
            outcome.reason = f"評分程序異常結束（exit code {process.returncode}）：{_last_line(reader.text())}"
        else:
            outcome.state = worker_result.get("state", RUN_FAILED)
            outcome.reason = worker_result.get("reason", "")
        return outcome


def read_check_log(path: Path) -> list[dict[str, Any]]:
    """Return the records a run's checkers wrote, skipping lines that are not JSON objects."""
    if not path.exists():
        return []
    records = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        text = handle.read(MAX_CHECK_LOG_BYTES)
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("exercise"), str):
            records.append(record)
    return records


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _read_progress(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# From a run to one result per exercise


@dataclass
class ExerciseResult:
    """One row of the class report."""

    learner: str
    notebook: str
    exercise: str
    title: str
    status: str
    points: float
    max_points: float
    message: str = ""

    @property
    def status_label(self) -> str:
        return STATUS_LABELS[self.status]


@dataclass
class SubmissionReport:
    """Everything the grader found out about one learner notebook."""

    learner: str
    notebook: str
    path: str
    run: RunOutcome
    exercises: list[ExerciseResult]

    @property
    def points(self) -> float:
        return round(sum(result.points for result in self.exercises), 2)

    @property
    def max_points(self) -> float:
        return round(sum(result.max_points for result in self.exercises), 2)


def _missing_record_result(exercise: str, check_cell: int | None, run: RunOutcome) -> tuple[str, str]:
    """Return the status and reason of an expected exercise that left no record."""
    if run.state == RUN_INVALID:
        return INVALID_NOTEBOOK, run.reason
    if run.state == RUN_MISSING:
        return NOT_RUN, run.reason
    if run.state == RUN_TIMED_OUT:
        return TIMED_OUT, f"{run.reason}，還沒執行到這個檢查。"
    if run.state == RUN_KERNEL_DIED:
        cell = f"（第 {run.current_cell + 1} 個 cell）" if run.current_cell is not None else ""
        return NOT_RUN, f"kernel 在這個檢查之前就當掉了{cell}，常見原因是記憶體不足或程式讓 Python 直接結束。"
    if run.state == RUN_FAILED:
        return NOT_RUN, f"notebook 沒有執行：{run.reason}"
    if check_cell is None:
        return NOT_RUN, "notebook 裡找不到這個練習的檢查 cell（呼叫 check_...( 的 cell），可能被刪掉了。"
    if check_cell in run.cell_errors:
        return NOT_RUN, f"檢查 cell（第 {check_cell + 1} 個 cell）出錯，檢查沒有完成：{run.cell_errors[check_cell]}"
    return NOT_RUN, f"檢查 cell（第 {check_cell + 1} 個 cell）執行了，但沒有留下檢查結果。"


def build_exercise_results(
    learner: str,
    notebook_name: str,
    expected: dict[str, int | None],
    run: RunOutcome,
    registry: dict[str, dict[str, Any]],
) -> list[ExerciseResult]:
    """Combine the expected exercises with the checkers' records of one run.

    ``expected`` maps exercise id -> index of its check cell in the submission (None when the
    submission lacks it). The last record of an exercise wins; records of exercises that were
    not expected are reported too.
    """
    latest: dict[str, dict[str, Any]] = {}
    for record in run.records:
        latest[record["exercise"]] = record

    results = []
    for exercise in list(expected) + [name for name in latest if name not in expected]:
        entry = registry.get(exercise, {})
        title = entry.get("title", latest.get(exercise, {}).get("title", exercise))
        max_points = float(entry.get("points", latest.get(exercise, {}).get("max_points", 0.0)))
        record = latest.get(exercise)
        if record is not None and record.get("status") in (PASSED, FAILED, ERROR, NOT_IMPLEMENTED):
            points = min(max(float(record.get("points", 0.0)), 0.0), max_points)
            results.append(ExerciseResult(learner, notebook_name, exercise, title, record["status"],
                                          points, max_points, str(record.get("message", ""))))
            continue
        status, reason = _missing_record_result(exercise, expected.get(exercise), run)
        results.append(ExerciseResult(learner, notebook_name, exercise, title, status, 0.0, max_points, reason))
    return results


def grade_submission(
    submission: Submission,
    registry: dict[str, dict[str, Any]],
    *,
    assignment: Path | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    profile: str = DEFAULT_PROFILE,
    kernel: str = DEFAULT_KERNEL,
    max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS,
    executed_dir: Path | None = None,
) -> SubmissionReport:
    """Grade one learner notebook: scan it, run it in a worker unless it is invalid, and combine."""
    notebook = submission.notebook
    reference = find_assignment(notebook, assignment)
    expected: dict[str, int | None] = {}
    if reference is not None:
        reference_scan = scan_notebook(reference, registry)
        expected.update({exercise: None for exercise in reference_scan.check_cells})

    if notebook is None:
        run = RunOutcome(state=RUN_MISSING, reason=f"資料夾 {submission.folder} 裡沒有 .ipynb 檔，沒有可評分的 notebook。")
        return SubmissionReport(submission.learner, "", str(submission.folder), run,
                                build_exercise_results(submission.learner, "", expected, run, registry))

    scan = scan_notebook(notebook, registry)
    if not scan.valid:
        run = RunOutcome(state=RUN_INVALID, reason=scan.error)
        if not expected:
            # No assignment lists the expected exercises, so the report has one row for the file itself.
            result = ExerciseResult(submission.learner, notebook.name, "-", "整份 notebook", INVALID_NOTEBOOK, 0.0, 0.0, scan.error)
            return SubmissionReport(submission.learner, notebook.name, str(notebook), run, [result])
        return SubmissionReport(submission.learner, notebook.name, str(notebook), run,
                                build_exercise_results(submission.learner, notebook.name, expected, run, registry))

    for exercise, cell in scan.check_cells.items():
        expected[exercise] = cell
    executed_path = None
    if executed_dir is not None:
        executed_dir.mkdir(parents=True, exist_ok=True)
        executed_path = executed_dir / f"{submission.learner}__{notebook.name}"
    run = run_notebook(notebook, timeout=timeout, profile=profile, kernel=kernel,
                       max_output_chars=max_output_chars, executed_path=executed_path)
    return SubmissionReport(submission.learner, notebook.name, str(notebook), run,
                            build_exercise_results(submission.learner, notebook.name, expected, run, registry))


def grade(
    paths: Iterable[str | Path],
    *,
    assignment: Path | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    profile: str = DEFAULT_PROFILE,
    kernel: str = DEFAULT_KERNEL,
    max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS,
    executed_dir: Path | None = None,
    jobs: int = 1,
    progress: bool = True,
) -> list[SubmissionReport]:
    """Grade every submission under ``paths`` and return the reports in discovery order.

    ``jobs`` notebooks run at the same time, each in its own worker and kernel.
    """
    if timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}.")
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs!r}.")
    if max_output_chars < 0:
        raise ValueError(f"max_output_chars must be >= 0, got {max_output_chars!r}.")

    submissions = discover_submissions(paths)
    registry = checker_registry()
    options = dict(assignment=assignment, timeout=timeout, profile=profile, kernel=kernel,
                   max_output_chars=max_output_chars, executed_dir=executed_dir)
    reports: list[SubmissionReport | None] = [None] * len(submissions)
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(grade_submission, submission, registry, **options): index
                   for index, submission in enumerate(submissions)}
        for done, future in enumerate(concurrent.futures.as_completed(futures), start=1):
            report = future.result()
            reports[futures[future]] = report
            if progress:
                print(f"[{done}/{len(submissions)}] {report.learner} {report.notebook}: "
                      f"{report.points:g}/{report.max_points:g} 分（{report.run.seconds:.1f} 秒，{report.run.state}）",
                      file=sys.stderr, flush=True)
    return [report for report in reports if report is not None]


# --------------------------------------------------------------------------------------------
# Reports: terminal table, CSV, JSON


def _one_line(value: Any, limit: int = 300) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return _one_line(lines[-1]) if lines else "沒有輸出"


def _display_width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(char) in ("W", "F") else 1 for char in text)


def _fit(text: str, width: int) -> str:
    """Cut ``text`` to ``width`` terminal columns (CJK characters take two) and pad it."""
    out, used = [], 0
    for char in text:
        char_width = _display_width(char)
        if used + char_width > width:
            if out:
                out[-1] = "…"
            break
        out.append(char)
        used += char_width
    fitted = "".join(out)
    return fitted + " " * (width - _display_width(fitted))


def short_note(result: ExerciseResult) -> str:
    """Return a one-line explanation for the table (the CSV and JSON keep the full message)."""
    if result.status == PASSED:
        return ""
    if result.status == NOT_IMPLEMENTED:
        return "練習的 stub 還在"
    lines = [line.strip() for line in result.message.splitlines() if line.strip()]
    if result.status in (FAILED, ERROR) and lines:
        # The checker's first line names the failing case; the second gives expected or the exception.
        head = lines[0].split("：", 1)[-1]
        detail = lines[1] if len(lines) > 1 else ""
        return _one_line(f"{head} {detail}")
    return _one_line(result.message)


def format_table(reports: list[SubmissionReport], note_width: int = 60) -> str:
    """Return the class report as a plain-text table with Traditional Chinese headers."""
    headers = ["學員", "Notebook", "練習", "狀態", "分數", "說明"]
    rows = []
    for report in reports:
        for result in report.exercises:
            rows.append([result.learner, result.notebook, result.exercise, result.status_label,
                         f"{result.points:g}/{result.max_points:g}", short_note(result)])
        if report.run.output_truncated:
            rows.append([report.learner, report.notebook, "-", "", "",
                         f"輸出太多，只保留前 {report.run.output_chars} 個字元"])
        rows.append([report.learner, report.notebook, "小計", "", f"{report.points:g}/{report.max_points:g}",
                     f"執行 {report.run.seconds:.1f} 秒"])
    widths = [max([_display_width(headers[column])] + [_display_width(row[column]) for row in rows]) for column in range(5)]
    widths = [min(width, 32) for width in widths] + [note_width]

    def line(cells: list[str]) -> str:
        return " | ".join(_fit(cell, width) for cell, width in zip(cells, widths)).rstrip()

    separator = "-+-".join("-" * width for width in widths)
    output = [line(headers), separator]
    previous = None
    for row in rows:
        key = (row[0], row[1])
        if previous is not None and key != previous:
            output.append(separator)
        previous = key
        output.append(line(row))

    counts = collections.Counter(result.status for report in reports for result in report.exercises)
    summary = "、".join(f"{STATUS_LABELS[status]} {counts[status]}" for status in STATUSES if counts[status])
    output.append("")
    output.append(f"共 {len(reports)} 份 notebook；{summary or '沒有任何練習'}。")
    return "\n".join(output)


CSV_COLUMNS = ["learner", "notebook", "exercise", "title", "status", "status_label", "points", "max_points",
               "message", "run_state", "run_seconds"]


def write_csv(reports: list[SubmissionReport], path: Path) -> None:
    """Write one row per learner and exercise; UTF-8 with a BOM so spreadsheet programs read the Chinese."""
    with open(path, "w", encoding="utf-8-sig", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for report in reports:
            for result in report.exercises:
                row = asdict(result)
                row.update(status_label=result.status_label, run_state=report.run.state, run_seconds=report.run.seconds)
                writer.writerow(row)


def reports_to_json(reports: list[SubmissionReport], settings: dict[str, Any]) -> dict[str, Any]:
    """Return the class report as a JSON-ready dict."""
    submissions = []
    for report in reports:
        run = asdict(report.run)
        run.pop("records")
        run["cell_errors"] = {str(index): text for index, text in report.run.cell_errors.items()}
        submissions.append({
            "learner": report.learner,
            "notebook": report.notebook,
            "path": report.path,
            "points": report.points,
            "max_points": report.max_points,
            "run": run,
            "exercises": [dict(asdict(result), status_label=result.status_label) for result in report.exercises],
        })
    return {
        "generated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": settings,
        "submissions": submissions,
    }


# --------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m course_utils grade",
        description=(
            "Run learner notebooks, each in a fresh kernel in a separate process with a time limit, "
            "and report every exercise's check result with points."
        ),
    )
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="a learner notebook (.ipynb) or a class folder with one .ipynb file or one sub-folder per learner")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                        help=f"wall-clock limit per notebook in seconds, kernel start included (default {DEFAULT_TIMEOUT_S:g})")
    parser.add_argument("--csv", type=Path, metavar="FILE", help="also write one row per learner and exercise to this CSV file")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the full report to this JSON file")
    parser.add_argument("--profile", choices=("ci", "cpu", "gpu"), default=DEFAULT_PROFILE,
                        help=f"COURSE_PROFILE the notebooks run with (default {DEFAULT_PROFILE}: the smallest runs)")
    parser.add_argument("--assignment", type=Path, metavar="PATH",
                        help="the assignment notebook, or a folder of them matched by file name, that lists the expected "
                             "exercises (default: the course's notebooks/ folder when it exists)")
    parser.add_argument("--jobs", type=int, default=1, metavar="N", help="notebooks run at the same time (default 1)")
    parser.add_argument("--kernel", default=DEFAULT_KERNEL, help=f"Jupyter kernel name (default {DEFAULT_KERNEL})")
    parser.add_argument("--max-output-chars", type=int, default=DEFAULT_MAX_OUTPUT_CHARS, metavar="N",
                        help=f"output characters kept per notebook; the rest is dropped (default {DEFAULT_MAX_OUTPUT_CHARS})")
    parser.add_argument("--executed-dir", type=Path, metavar="DIR",
                        help="save each executed notebook (with its outputs) into this folder for review")
    parser.add_argument("--details", action="store_true", help="print every checker's full message below the table")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``grade`` command; return 0 when every submission was graded and 1 when none was found."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error(f"--timeout must be a positive number of seconds, got {args.timeout:g}.")
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}.")
    if args.max_output_chars < 0:
        parser.error(f"--max-output-chars must be >= 0, got {args.max_output_chars}.")
    if args.assignment is not None and not args.assignment.exists():
        parser.error(f"--assignment {args.assignment} does not exist; pass a notebook or a folder of notebooks.")

    try:
        reports = grade(args.paths, assignment=args.assignment, timeout=args.timeout, profile=args.profile,
                        kernel=args.kernel, max_output_chars=args.max_output_chars,
                        executed_dir=args.executed_dir, jobs=args.jobs)
    except (FileNotFoundError, ValueError) as error:
        print(f"grade: {error}", file=sys.stderr)
        return 1
    if not reports:
        print(f"grade: no notebooks found under {', '.join(args.paths)}.", file=sys.stderr)
        return 1

    print(format_table(reports))
    if args.details:
        for report in reports:
            for result in report.exercises:
                if result.status != PASSED and result.message:
                    print(f"\n[{result.learner} / {result.notebook} / {result.exercise}] {result.status_label}\n{result.message}")
    settings = {"timeout_s": args.timeout, "profile": args.profile, "kernel": args.kernel,
                "max_output_chars": args.max_output_chars, "paths": [str(path) for path in args.paths]}
    if args.csv is not None:
        write_csv(reports, args.csv)
        print(f"CSV: {args.csv}")
    if args.json is not None:
        args.json.write_text(json.dumps(reports_to_json(reports, settings), ensure_ascii=False, indent=2), encoding="utf-8")
        print(f"JSON: {args.json}")
    return 0


# --------------------------------------------------------------------------------------------
# The worker: runs in its own process, executes one notebook and writes a small result file


def _worker_client_class():
    from nbclient import NotebookClient
    from nbformat.v4 import new_output

    class CappedNotebookClient(NotebookClient):
        """A NotebookClient that keeps at most ``max_output_chars`` characters of output in total."""

        def __init__(self, *args: Any, max_output_chars: int, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.max_output_chars = max_output_chars
            self.output_chars = 0
            self.output_truncated = False

        def output(self, outs, msg, display_id, cell_index):
            content = msg.get("content", {})
            size = len(content["text"]) if msg["msg_type"] == "stream" else len(json.dumps(content.get("data", content)))
            if self.output_truncated or self.output_chars + size > self.max_output_chars:
                if not self.output_truncated:
                    self.output_truncated = True
                    outs.append(new_output("stream", name="stderr",
                                           text=f"\n[評分程式：輸出超過 {self.max_output_chars} 個字元，後面的輸出不保留]\n"))
                return None
            self.output_chars += size
            return super().output(outs, msg, display_id, cell_index)

    return CappedNotebookClient


def _worker_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m course_utils.grading --worker")
    parser.add_argument("--worker", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--progress", type=Path, required=True)
    parser.add_argument("--executed", type=Path)
    parser.add_argument("--kernel", default=DEFAULT_KERNEL)
    parser.add_argument("--max-output-chars", type=int, default=DEFAULT_MAX_OUTPUT_CHARS)
    parser.add_argument("--startup-timeout", type=int, default=60)
    args = parser.parse_args(argv)

    import nbformat
    from nbclient.exceptions import DeadKernelError

    notebook = nbformat.read(args.worker, as_version=4)

    def record_progress(cell, cell_index, **_):
        args.progress.write_text(str(cell_index))

    client = _worker_client_class()(
        notebook,
        timeout=None,  # the grader enforces the limit from outside
        allow_errors=True,  # keep going after a failing cell so later exercises are graded too
        kernel_name=args.kernel,
        startup_timeout=args.startup_timeout,
        resources={"metadata": {"path": str(args.worker.parent)}},
        on_cell_start=record_progress,
        max_output_chars=args.max_output_chars,
    )
    state, reason = RUN_COMPLETED, ""
    try:
        client.execute()
    except DeadKernelError as error:
        state, reason = RUN_KERNEL_DIED, f"kernel 當掉了：{_one_line(error)}"
    except Exception as error:  # a kernel that cannot start, a missing kernelspec, ...
        state, reason = RUN_FAILED, f"{type(error).__name__}: {_one_line(error)}"

    cell_errors = {}
    for index, cell in enumerate(notebook.cells):
        for output in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if output.get("output_type") == "error":
                cell_errors[str(index)] = _one_line(f"{output.get('ename')}: {output.get('evalue')}")
    result = {"state": state, "reason": reason, "cell_errors": cell_errors,
              "output_truncated": client.output_truncated, "output_chars": client.output_chars}
    args.result.write_text(json.dumps(result, ensure_ascii=False), encoding="utf-8")
    if args.executed is not None:
        nbformat.write(notebook, args.executed)
    return 0


if __name__ == "__main__":
    if "--worker" in sys.argv[1:]:
        sys.exit(_worker_main(sys.argv[1:]))
    sys.exit(main(sys.argv[1:]))
