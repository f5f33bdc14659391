"""Turn solution notebooks into learner notebooks.

In a solution, the learner's part of a code cell sits between two marker lines::

    ### BEGIN SOLUTION
    ...
    ### END SOLUTION

(nbgrader's convention). The learner notebook gets, in its place, a stub at the same
indentation that raises ``NotImplementedError``, and every output is cleared. Cells with a
solution region are tagged as nbgrader "autograded answer" cells; cells that call a checker
(``check_...(``) are tagged as "autograder tests" cells with the checker's points, so a teacher
who already uses nbgrader can import the notebooks.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import nbformat

BEGIN_MARK = "### BEGIN SOLUTION"
END_MARK = "### END SOLUTION"
STUB_LINE = 'raise NotImplementedError("練習：請在這裡寫你的程式碼")'
CHECK_CALL = re.compile(r"\bcheck_([a-z0-9_]+)\s*\(")
NOTEBOOK_VERSION = 4


class ExerciseMarkupError(ValueError):
    """Raised when a solution cell has unbalanced or nested solution markers."""


def strip_solutions(source: str, where: str = "cell") -> tuple[str, int]:
    """Return ``source`` with each solution region replaced by a stub, and the number of regions."""
    lines = source.splitlines()
    output: list[str] = []
    inside = False
    regions = 0
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if stripped == BEGIN_MARK:
            if inside:
                raise ExerciseMarkupError(f"{where}, line {number}: '{BEGIN_MARK}' inside another solution region; close the first with '{END_MARK}'.")
            inside = True
            regions += 1
            indent = line[: len(line) - len(line.lstrip())]
            output.append(f"{indent}{STUB_LINE}")
            continue
        if stripped == END_MARK:
            if not inside:
                raise ExerciseMarkupError(f"{where}, line {number}: '{END_MARK}' without a matching '{BEGIN_MARK}'.")
            inside = False
            continue
        if not inside:
            output.append(line)
    if inside:
        raise ExerciseMarkupError(f"{where}: '{BEGIN_MARK}' is never closed; add '{END_MARK}'.")
    return "\n".join(output), regions


def _grade_id(notebook_name: str, index: int) -> str:
    return f"{Path(notebook_name).stem}-cell{index:03d}"


def build_learner_notebook(solution: nbformat.NotebookNode, name: str = "notebook") -> nbformat.NotebookNode:
    """Return the learner version of a solution notebook (stubs in, outputs out, nbgrader metadata set)."""
    from course_utils.checks import load_all

    registry = load_all()
    points_by_function = {entry["function"]: entry["points"] for entry in registry.values()}

    learner = copy.deepcopy(solution)
    for index, cell in enumerate(learner.cells):
        cell.metadata.pop("nbgrader", None)
        if cell.cell_type != "code":
            continue
        cell.outputs = []
        cell.execution_count = None
        cell.source, regions = strip_solutions(cell.source, where=f"{name}, cell {index}")
        if regions:
            cell.metadata["nbgrader"] = {
                "grade": False, "solution": True, "locked": False, "task": False,
                "grade_id": _grade_id(name, index), "schema_version": 3,
            }
            continue
        called = [f"check_{match}" for match in CHECK_CALL.findall(cell.source)]
        points = sum(points_by_function.get(function, 0.0) for function in called)
        if points:
            cell.metadata["nbgrader"] = {
                "grade": True, "solution": False, "locked": True, "task": False,
                "points": points, "grade_id": _grade_id(name, index), "schema_version": 3,
            }
    learner.metadata.pop("widgets", None)
    return learner


def render(notebook: nbformat.NotebookNode) -> str:
    """Serialize a notebook the same way every time (so the drift test compares text)."""
    return nbformat.writes(notebook, version=NOTEBOOK_VERSION) + "\n"


def build_all(solutions_dir: Path, notebooks_dir: Path, check_only: bool = False) -> list[Path]:
    """Build ``notebooks_dir/X.ipynb`` from each ``solutions_dir/X.ipynb``.

    With ``check_only``, write nothing and return the learner notebooks that are missing or
    differ from a fresh build.
    """
    solutions_dir, notebooks_dir = Path(solutions_dir), Path(notebooks_dir)
    sources = sorted(solutions_dir.glob("*.ipynb"))
    if not sources:
        raise FileNotFoundError(f"no solution notebooks (*.ipynb) found in {solutions_dir}.")
    stale: list[Path] = []
    notebooks_dir.mkdir(parents=True, exist_ok=True)
    for source in sources:
        solution = nbformat.read(source, as_version=NOTEBOOK_VERSION)
        text = render(build_learner_notebook(solution, name=source.name))
        target = notebooks_dir / source.name
        if target.exists() and target.read_text(encoding="utf-8") == text:
            continue
        stale.append(target)
        if not check_only:
            target.write_text(text, encoding="utf-8")
    return stale
