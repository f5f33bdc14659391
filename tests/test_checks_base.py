"""The checker machinery and the warm-up checker: wrong answers are rejected, stubs are reported."""

import json

import pytest
import torch

from course_utils.checks import CheckFailed, load_all
from course_utils.checks.base import CHECK_LOG_ENV_VAR
from course_utils.checks.warmup import check_l2_normalize


def correct(x):
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def stub(x):
    raise NotImplementedError("練習")


WRONG_ANSWERS = {
    "divides_by_sum": lambda x: x / x.sum(dim=-1, keepdim=True),
    "normalizes_columns": lambda x: x / x.norm(dim=0, keepdim=True),
    "hard_coded_dim_1": lambda x: x / x.norm(dim=1, keepdim=True).clamp_min(1e-12),
    "no_epsilon": lambda x: x / x.norm(dim=-1, keepdim=True),
    "squared_norm": lambda x: x / (x**2).sum(dim=-1, keepdim=True).clamp_min(1e-12),
    "returns_numpy": lambda x: correct(x).numpy(),
}


def in_place(x):
    x /= x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return x


def test_reference_passes():
    result = check_l2_normalize(correct, verbose=False)
    assert result.status == "passed"
    assert result.points == result.max_points == 1.0


@pytest.mark.parametrize("name", sorted(WRONG_ANSWERS))
def test_wrong_answer_rejected(name):
    result = check_l2_normalize(WRONG_ANSWERS[name], raise_on_fail=False, verbose=False)
    assert result.status == "failed", name


def test_in_place_answer_rejected():
    assert check_l2_normalize(in_place, raise_on_fail=False, verbose=False).status == "failed"


def test_crashing_answer_is_error_not_traceback(capsys):
    result = check_l2_normalize(lambda x: x.foo(), raise_on_fail=False)
    assert result.status == "error"
    assert "AttributeError" in capsys.readouterr().out


def test_stub_reports_not_implemented(capsys):
    result = check_l2_normalize(stub)
    assert result.status == "not_implemented"
    assert result.points == 0
    assert "尚未實作" in capsys.readouterr().out


def test_failure_raises_after_report(capsys):
    with pytest.raises(CheckFailed):
        check_l2_normalize(WRONG_ANSWERS["divides_by_sum"])
    report = capsys.readouterr().out
    assert "未通過" in report
    assert "預期" in report and "實際" in report and "提示" in report


def test_partial_credit_counts_cases_before_failure():
    result = check_l2_normalize(WRONG_ANSWERS["no_epsilon"], raise_on_fail=False, verbose=False)
    assert 0 < result.points < result.max_points


def test_results_are_logged_for_the_grader(tmp_path, monkeypatch):
    log = tmp_path / "checks.jsonl"
    monkeypatch.setenv(CHECK_LOG_ENV_VAR, str(log))
    check_l2_normalize(correct, verbose=False)
    check_l2_normalize(stub, verbose=False)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["status"] for r in records] == ["passed", "not_implemented"]
    assert records[0]["exercise"] == "warmup_l2_normalize"
    assert "尚未實作" in records[1]["message"]


def test_registry_lists_every_checker():
    registry = load_all()
    assert registry["warmup_l2_normalize"]["points"] == 1.0
    assert all(entry["points"] > 0 for entry in registry.values())


def test_check_result_repr_is_short():
    assert len(repr(check_l2_normalize(correct, verbose=False))) < 120


def test_report_on_gpu_tensor_input_works_on_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    assert check_l2_normalize(correct, verbose=False).status == "passed"


def test_strict_mode_raises_on_stub(monkeypatch):
    monkeypatch.setenv("COURSE_CHECKS_STRICT", "1")
    with pytest.raises(CheckFailed, match="尚未實作"):
        check_l2_normalize(stub, verbose=False)
