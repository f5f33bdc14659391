"""Building learner notebooks from solutions: stubs, metadata, errors and drift."""

from pathlib import Path

import nbformat
import pytest

from course_utils.exercises import (
    STUB_LINE,
    ExerciseMarkupError,
    build_all,
    build_learner_notebook,
    strip_solutions,
)

ROOT = Path(__file__).resolve().parents[1]


def test_stub_keeps_indentation_and_surroundings():
    source = "def f(x):\n    y = 1\n    ### BEGIN SOLUTION\n    return x + y\n    ### END SOLUTION\n"
    stripped, regions = strip_solutions(source)
    assert regions == 1
    assert stripped.splitlines() == ["def f(x):", "    y = 1", f"    {STUB_LINE}"]


def test_stubbed_function_defines_and_raises():
    stripped, _ = strip_solutions("def f(x):\n    ### BEGIN SOLUTION\n    return x\n    ### END SOLUTION\n")
    namespace = {}
    exec(stripped, namespace)
    with pytest.raises(NotImplementedError):
        namespace["f"](1)


def test_two_regions_in_one_cell():
    source = "a = 1\n### BEGIN SOLUTION\nb = 2\n### END SOLUTION\n### BEGIN SOLUTION\nc = 3\n### END SOLUTION"
    assert strip_solutions(source)[1] == 2


@pytest.mark.parametrize(
    "source, message",
    [
        ("### BEGIN SOLUTION\nx = 1\n", "never closed"),
        ("x = 1\n### END SOLUTION\n", "without a matching"),
        ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION\n", "inside another"),
    ],
)
def test_unbalanced_markers_raise(source, message):
    with pytest.raises(ExerciseMarkupError, match=message):
        strip_solutions(source, where="demo.ipynb, cell 3")


def _solution_notebook():
    notebook = nbformat.v4.new_notebook()
    exercise = nbformat.v4.new_code_cell("def l2_normalize(x):\n    ### BEGIN SOLUTION\n    return x\n    ### END SOLUTION")
    exercise.outputs = [nbformat.v4.new_output("stream", text="secret output\n")]
    check = nbformat.v4.new_code_cell("from course_utils.checks import warmup\nwarmup.check_l2_normalize(l2_normalize)")
    notebook.cells = [nbformat.v4.new_markdown_cell("# demo"), exercise, check]
    return notebook


def test_learner_notebook_has_no_solution_and_no_outputs():
    learner = build_learner_notebook(_solution_notebook(), name="demo.ipynb")
    text = nbformat.writes(learner)
    assert "return x" not in text
    assert "secret output" not in text
    assert STUB_LINE in learner.cells[1].source


def test_nbgrader_metadata_marks_solution_and_check_cells():
    learner = build_learner_notebook(_solution_notebook(), name="demo.ipynb")
    solution_meta = learner.cells[1].metadata["nbgrader"]
    check_meta = learner.cells[2].metadata["nbgrader"]
    assert solution_meta["solution"] is True and solution_meta["grade"] is False
    assert check_meta["grade"] is True and check_meta["points"] == 1.0
    assert solution_meta["grade_id"] != check_meta["grade_id"]
    assert "nbgrader" not in learner.cells[0].metadata


def test_build_all_writes_then_reports_clean(tmp_path):
    solutions, notebooks = tmp_path / "solutions", tmp_path / "notebooks"
    solutions.mkdir()
    nbformat.write(_solution_notebook(), solutions / "demo.ipynb")
    assert build_all(solutions, notebooks) == [notebooks / "demo.ipynb"]
    assert build_all(solutions, notebooks, check_only=True) == []
    (notebooks / "demo.ipynb").write_text((notebooks / "demo.ipynb").read_text().replace("demo", "edited by hand"))
    assert build_all(solutions, notebooks, check_only=True) == [notebooks / "demo.ipynb"]


def test_build_all_without_solutions_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="no solution notebooks"):
        build_all(tmp_path, tmp_path / "out")


def test_repository_learner_notebooks_are_fresh():
    stale = build_all(ROOT / "solutions", ROOT / "notebooks", check_only=True)
    assert stale == [], f"run `python -m course_utils build-exercises`; stale: {stale}"


def test_every_solution_has_a_learner_notebook():
    solutions = {path.name for path in (ROOT / "solutions").glob("*.ipynb")}
    notebooks = {path.name for path in (ROOT / "notebooks").glob("*.ipynb")}
    assert solutions == notebooks
