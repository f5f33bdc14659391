"""The set-up files agree with each other: pins, conda environment, Makefile, CI and README."""

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _requirement_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def test_requirements_are_exact_pins():
    for line in _requirement_lines(ROOT / "requirements.txt") + _requirement_lines(ROOT / "requirements-nodeps.txt"):
        assert re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.+\-]+", line), f"not an exact pin: {line}"


def test_torch_pinned_to_local_wheel_version():
    assert "torch==2.13.0" in _requirement_lines(ROOT / "requirements.txt")


def test_environment_yml_matches_requirements():
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    dependencies = environment["dependencies"]
    assert "python=3.11" in dependencies
    pip_sections = [entry["pip"] for entry in dependencies if isinstance(entry, dict) and "pip" in entry]
    assert len(pip_sections) == 1
    assert sorted(pip_sections[0]) == sorted(_requirement_lines(ROOT / "requirements.txt"))


def test_environment_yml_explains_nodeps_step():
    assert "pip install --no-deps -r requirements-nodeps.txt" in (ROOT / "environment.yml").read_text()


def test_makefile_installs_nodeps_packages_without_deps():
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install --no-deps -r requirements-nodeps.txt" in makefile
    assert "pip install -r requirements.txt" in makefile
    for target in ("lab:", "test:", "setup:"):
        assert target in makefile


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci_script = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme
    assert "make lab" in readme
    assert re.search(r"^make test\b", ci_script, flags=re.MULTILINE)


def test_weight_packages_are_credited():
    for readme in ("README.md", "README.zh-TW.md"):
        text = (ROOT / readme).read_text()
        assert "CC BY-SA 4.0" in text, readme
        assert "OpenMoji" in text, readme
