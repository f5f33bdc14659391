"""Learner notebooks run to the end with stubs in place, and a failing check stops a notebook.

The solution notebooks themselves are executed by nbval (``pytest --nbval-lax solutions``, part
of the default ``pytest`` run, see pyproject.toml).
"""

import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]
LEARNER_NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CHECK_CALL = re.compile(r"\bcheck_[a-z0-9_]+\s*\(")
NOTEBOOK_TIMEOUT = int(os.environ.get("COURSE_NOTEBOOK_TIMEOUT", "900"))


def _text_of(cell) -> str:
    parts = []
    for output in cell.get("outputs", []):
        if output.output_type == "stream":
            parts.append(output.text)
        elif output.output_type in ("execute_result", "display_data"):
            parts.append(output.get("data", {}).get("text/plain", ""))
        elif output.output_type == "error":
            parts.append("\n".join(output.traceback))
    return "".join(parts)


def _execute(notebook, cwd: Path, timeout: int = NOTEBOOK_TIMEOUT):
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    client.execute()
    return notebook


@pytest.mark.notebook
@pytest.mark.timeout(NOTEBOOK_TIMEOUT + 60)
@pytest.mark.parametrize("path", LEARNER_NOTEBOOKS, ids=[p.stem for p in LEARNER_NOTEBOOKS])
def test_learner_notebook_runs_with_stubs(path):
    notebook = _execute(nbformat.read(path, as_version=4), path.parent)
    check_cells = [cell for cell in notebook.cells if cell.cell_type == "code" and CHECK_CALL.search(cell.source)]
    stub_cells = [cell for cell in notebook.cells if cell.cell_type == "code" and "NotImplementedError(" in cell.source]
    if stub_cells:
        assert check_cells, f"{path.name} has exercises but no check cell"
    for cell in check_cells:
        output = _text_of(cell)
        assert "尚未實作" in output, f"{path.name}: a check cell did not report not-implemented:\n{cell.source}\n---\n{output}"
        assert "Traceback" not in output


def _tiny_notebook(body: str):
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [
        nbformat.v4.new_code_cell("import torch\nfrom course_utils.checks import warmup"),
        nbformat.v4.new_code_cell(body),
        nbformat.v4.new_code_cell("warmup.check_l2_normalize(l2_normalize)"),
        nbformat.v4.new_code_cell("print('reached the end')"),
    ]
    return notebook


@pytest.mark.timeout(180)
def test_failing_check_stops_notebook_with_short_message(tmp_path):
    notebook = _tiny_notebook("def l2_normalize(x):\n    return x / x.sum(dim=-1, keepdim=True)")
    with pytest.raises(CellExecutionError):
        _execute(notebook, tmp_path, timeout=120)
    output = _text_of(notebook.cells[2])
    errors = [o for o in notebook.cells[2].outputs if o.output_type == "error"]
    assert "未通過" in output
    assert "CheckFailed" in output
    assert "Traceback" not in output
    assert len(errors) == 1 and len(errors[0].traceback) == 1
    assert _text_of(notebook.cells[3]) == ""


@pytest.mark.timeout(180)
def test_stub_check_lets_notebook_continue(tmp_path):
    notebook = _tiny_notebook("def l2_normalize(x):\n    raise NotImplementedError('練習')")
    _execute(notebook, tmp_path, timeout=120)
    assert "尚未實作" in _text_of(notebook.cells[2])
    assert "reached the end" in _text_of(notebook.cells[3])
