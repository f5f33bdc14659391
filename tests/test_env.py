"""Device and profile selection, per-profile values and seeding."""

import random

import numpy as np
import pytest
import torch

from course_utils import env as course_env


def test_profile_override(monkeypatch):
    monkeypatch.setenv("COURSE_PROFILE", "cpu")
    assert course_env.get_profile(torch.device("cuda")) == "cpu"


def test_profile_defaults_by_device(monkeypatch):
    monkeypatch.delenv("COURSE_PROFILE", raising=False)
    assert course_env.get_profile(torch.device("cuda")) == "gpu"
    assert course_env.get_profile(torch.device("cpu")) == "cpu"
    assert course_env.get_profile(torch.device("mps")) == "cpu"


def test_unknown_profile_names_value_and_choices(monkeypatch):
    monkeypatch.setenv("COURSE_PROFILE", "fast")
    with pytest.raises(ValueError, match=r"'fast'.*ci, cpu, gpu"):
        course_env.get_profile()


def test_device_override_rejects_missing_cuda(monkeypatch):
    monkeypatch.setenv("COURSE_DEVICE", "cuda")
    if torch.cuda.is_available():
        assert course_env.get_device().type == "cuda"
    else:
        with pytest.raises(ValueError, match="CUDA"):
            course_env.get_device()


def test_device_override_rejects_garbage(monkeypatch):
    monkeypatch.setenv("COURSE_DEVICE", "tpu9")
    with pytest.raises(ValueError, match="tpu9"):
        course_env.get_device()


def test_device_falls_back_to_cpu(monkeypatch):
    monkeypatch.delenv("COURSE_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert course_env.get_device() == torch.device("cpu")


def test_pick_returns_active_profile_value():
    env = course_env.CourseEnv(device=torch.device("cpu"), profile="ci")
    assert env.pick(ci=1, cpu=2, gpu=3) == 1


def test_pick_missing_profile_raises():
    env = course_env.CourseEnv(device=torch.device("cpu"), profile="gpu")
    with pytest.raises(KeyError, match="gpu"):
        env.pick(ci=1, cpu=2)


def test_pick_rejects_unknown_profile_names():
    env = course_env.CourseEnv(device=torch.device("cpu"), profile="ci")
    with pytest.raises(ValueError, match="laptop"):
        env.pick(ci=1, laptop=2)


def test_seed_everything_repeats_all_generators():
    course_env.seed_everything(123)
    first = (random.random(), np.random.rand(), torch.rand(3))
    course_env.seed_everything(123)
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == second[0]
    assert first[1] == second[1]
    assert torch.equal(first[2], second[2])


def test_seed_rejects_negative():
    with pytest.raises(ValueError, match="-1"):
        course_env.seed_everything(-1)


def test_setup_prints_device_and_profile(capsys, monkeypatch):
    monkeypatch.setenv("COURSE_PROFILE", "ci")
    env = course_env.setup(seed=5)
    printed = capsys.readouterr().out
    assert "profile: ci" in printed
    assert f"device: {env.device}" in printed
    assert env.seed == 5


def test_metric_prints_only_for_benchmark(capsys, monkeypatch):
    import importlib.util

    from course_utils import paths

    spec = importlib.util.spec_from_file_location("run_notebooks", paths.REPO_DIR / "benchmarks" / "run_notebooks.py")
    run_notebooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_notebooks)

    env = course_env.CourseEnv(device=torch.device("cpu"), profile="ci")
    monkeypatch.delenv("COURSE_REPORT_METRICS", raising=False)
    assert env.metric("zero_shot_color", 0.875) == 0.875
    assert capsys.readouterr().out == ""

    monkeypatch.setenv("COURSE_REPORT_METRICS", "1")
    assert env.metric("recall_at_5", torch.tensor(0.5)) == 0.5
    line = capsys.readouterr().out.strip()
    match = run_notebooks.METRIC_LINE.match(line)
    assert match is not None and match.groups() == ("recall_at_5", "0.5"), line


@pytest.mark.parametrize("name, value, message", [
    ("two words", 0.5, "without spaces"),
    ("a=b", 0.5, "without spaces"),
    ("", 0.5, "non-empty"),
    ("accuracy", "high", "pass a number"),
    ("accuracy", True, "pass a number"),
])
def test_metric_rejects_bad_names_and_values(name, value, message):
    env = course_env.CourseEnv(device=torch.device("cpu"), profile="ci")
    with pytest.raises(ValueError, match=message):
        env.metric(name, value)


def _matmul_dtype_inside(context) -> torch.dtype:
    with context:
        return (torch.ones(2, 2) @ torch.ones(2, 2)).dtype


@pytest.mark.parametrize(
    "setting, cpu_bf16, expected",
    [("1", True, torch.bfloat16), ("0", True, torch.float32), ("1", False, torch.float32)],
)
def test_cpu_bf16_request_and_override(monkeypatch, setting, cpu_bf16, expected):
    monkeypatch.setenv("COURSE_CPU_BF16", setting)
    env = course_env.CourseEnv(device=torch.device("cpu"), profile="cpu")
    assert _matmul_dtype_inside(env.autocast(cpu_bf16=cpu_bf16)) == expected
    assert env.cpu_bf16_active == (setting == "1")


def test_cpu_bf16_default_follows_cpu(monkeypatch):
    monkeypatch.delenv("COURSE_CPU_BF16", raising=False)
    env = course_env.CourseEnv(device=torch.device("cpu"), profile="cpu")
    expected = torch.bfloat16 if course_env.cpu_has_native_bf16() else torch.float32
    assert _matmul_dtype_inside(env.autocast(cpu_bf16=True)) == expected
    monkeypatch.setattr(course_env, "cpu_has_native_bf16", lambda: False)
    assert _matmul_dtype_inside(env.autocast(cpu_bf16=True)) == torch.float32


def test_cpu_bf16_rejects_unknown_setting(monkeypatch):
    monkeypatch.setenv("COURSE_CPU_BF16", "yes")
    with pytest.raises(ValueError, match=r"COURSE_CPU_BF16='yes'.*0 \(off\) or 1 \(on\)"):
        course_env.cpu_bf16_enabled()
