"""Benchmark scripts: bad arguments are rejected before any data or model loads, and recipes match their notebooks."""

import importlib.util

import pytest

from course_utils import paths


def _load(script: str):
    spec = importlib.util.spec_from_file_location(script, paths.REPO_DIR / "benchmarks" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "--steps must be at least 1, got 0"),
        (["--steps", "100", "--eval-at", "50", "100"], "between 1 and --steps - 1 = 99, got [100]"),
        (["--steps", "100", "--eval-at", "0"], "got [0]"),
        (["--steps", "140", "--eval-at", "140"], "got [140]"),
    ],
)
def test_curve_rejects_bad_steps(argv, message, capsys, monkeypatch):
    curve = _load("llava_learning_curve")
    for loader in ("make_shapes_world", "load_openmoji", "load_tokens", "load_language_model"):
        monkeypatch.setattr(curve, loader, lambda *a, **k: pytest.fail("data or a model loaded before the arguments were checked"))
    with pytest.raises(SystemExit) as exit_info:
        curve.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_curve_recipe_matches_notebook_05():
    """The script's recipe must match the notebook's cpu profile, or its curve describes another model."""
    import json
    import re

    curve = _load("llava_learning_curve")
    notebook = json.loads((paths.REPO_DIR / "solutions" / "05_llava_projection.ipynb").read_text())
    config_cell = next("".join(cell["source"]) for cell in notebook["cells"]
                       if cell["cell_type"] == "code" and "cfg = env.pick(" in "".join(cell["source"]))
    cpu = re.search(r"\n\s*cpu=dict\((.*?)\),\n", config_cell, re.S).group(1)
    settings = dict(re.findall(r"(\w+)=([^,\s]+)", cpu))
    for key, value in curve.RECIPE.items():
        assert key in settings, f"notebook 05's cpu profile has no {key}"
        assert float(settings[key]) == float(value), f"{key}: notebook {settings[key]}, script {value}"


def test_curve_default_evaluations_fit_steps():
    curve = _load("llava_learning_curve")
    for steps, expected in (("140", []), ("300", [140, 280]), ("560", [140, 280, 420])):
        assert curve.parse_arguments(["--steps", steps]).eval_at == expected
