"""The machinery every exercise checker shares.

A checker runs a list of :class:`Case` objects against the learner's code. Each case either
returns quietly (passed) or raises :class:`CaseFailure` with what was expected, what came back
and a hint. The runner stops at the first failing case, prints a report in Traditional
Chinese, appends a JSON line to the file named by ``COURSE_CHECK_LOG`` (the grader reads it),
and returns a :class:`CheckResult`.

Statuses: ``passed``, ``failed`` (a case disagreed with the reference), ``error`` (the learner's
code raised something other than ``NotImplementedError``) and ``not_implemented`` (the stub is
still there). A failed or errored check raises :class:`CheckFailed` unless
``raise_on_fail=False``, so a broken solution notebook fails its test run; IPython shows that
exception as one line instead of a traceback.
"""

from __future__ import annotations

import json
import os
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import torch

CHECK_LOG_ENV_VAR = "COURSE_CHECK_LOG"
# With this set to 1, an untouched stub also raises, so tools that score a cell by whether it
# raised (nbgrader's autograder) give it no points.
STRICT_ENV_VAR = "COURSE_CHECKS_STRICT"
PASSED, FAILED, ERROR, NOT_IMPLEMENTED = "passed", "failed", "error", "not_implemented"

# exercise id -> (title, points); filled by @checker so the grader knows every exercise.
REGISTRY: dict[str, dict[str, Any]] = {}


class CaseFailure(Exception):
    """Raised inside a case when the learner's result disagrees with the expected one."""

    def __init__(self, expected: str, got: str, hint: str = ""):
        super().__init__(f"expected {expected}, got {got}")
        self.expected = expected
        self.got = got
        self.hint = hint


class CheckFailed(AssertionError):
    """Raised after the report when a check did not pass (and ``raise_on_fail`` is true)."""


@dataclass
class Case:
    """One named situation to try, e.g. "batch of 2, 3-d features"."""

    name: str
    run: Callable[[], None]


@dataclass
class CheckResult:
    exercise: str
    title: str
    status: str
    passed_cases: int
    total_cases: int
    points: float
    max_points: float
    case: str = ""
    expected: str = ""
    got: str = ""
    hint: str = ""
    detail: str = ""
    cases: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.status == PASSED

    def __repr__(self) -> str:
        # Short, because a check cell's last expression is echoed under the report.
        return f"<CheckResult {self.exercise}: {self.status}, {self.passed_cases}/{self.total_cases} cases, {self.points:g}/{self.max_points:g} points>"

    def report(self) -> str:
        """Return the learner-facing report in Traditional Chinese."""
        head = f"練習「{self.title}」"
        if self.status == PASSED:
            return f"✅ {head}通過：{self.passed_cases}/{self.total_cases} 個案例全部正確（{self.points:g}/{self.max_points:g} 分）。"
        if self.status == NOT_IMPLEMENTED:
            return (
                f"⏳ {head}尚未實作：把 `raise NotImplementedError` 換成你的程式碼，"
                "執行那個 cell，再執行這個檢查。"
            )
        number = self.passed_cases + 1
        lines = [f"❌ {head}未通過：第 {number}/{self.total_cases} 個案例「{self.case}」"]
        if self.status == ERROR:
            lines.append(f"   你的程式碼丟出例外：{self.got}")
        else:
            lines.append(f"   預期：{self.expected}")
            lines.append(f"   實際：{self.got}")
        if self.hint:
            lines.append(f"   提示：{self.hint}")
        lines.append(f"   前面 {self.passed_cases} 個案例已通過（{self.points:g}/{self.max_points:g} 分）。")
        return "\n".join(lines)

    def to_record(self) -> dict[str, Any]:
        record = asdict(self)
        record["message"] = self.report()
        return record


def fail(expected: str, got: str, hint: str = "") -> None:
    """Stop the current case with a failure."""
    raise CaseFailure(expected, got, hint)


def describe(value: Any, max_items: int = 6) -> str:
    """Describe a value briefly for a report: tensors by shape, dtype and first values."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().flatten()
        shown = ", ".join(f"{v:.4g}" for v in flat[:max_items].float().tolist())
        more = ", ..." if flat.numel() > max_items else ""
        return f"tensor(shape={tuple(value.shape)}, dtype={str(value.dtype).replace('torch.', '')}, 值=[{shown}{more}])"
    if isinstance(value, float):
        return f"{value:.6g}"
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def expect_tensor(value: Any, what: str, hint: str = "") -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        fail(f"{what} 是 torch.Tensor", f"{type(value).__name__}：{describe(value)}", hint or "請回傳 torch.Tensor，不要轉成 Python 數字或 NumPy。")
    return value


def expect_shape(value: Any, shape: tuple[int, ...], what: str, hint: str = "") -> torch.Tensor:
    tensor = expect_tensor(value, what)
    if tuple(tensor.shape) != tuple(shape):
        fail(f"{what} 的形狀為 {tuple(shape)}", f"形狀 {tuple(tensor.shape)}", hint)
    return tensor


def expect_close(
    got: Any,
    expected: torch.Tensor | float,
    what: str,
    hint: str = "",
    atol: float = 1e-5,
    rtol: float = 1e-4,
) -> None:
    """Fail unless ``got`` matches ``expected`` in shape and value (NaN counts as a mismatch)."""
    expected_tensor = torch.as_tensor(expected)
    got_tensor = expect_tensor(got, what, hint) if not isinstance(got, (int, float)) else torch.as_tensor(got)
    if tuple(got_tensor.shape) != tuple(expected_tensor.shape):
        fail(f"{what} 的形狀為 {tuple(expected_tensor.shape)}", f"形狀 {tuple(got_tensor.shape)}", hint)
    got_cpu = got_tensor.detach().to("cpu", torch.float64)
    expected_cpu = expected_tensor.detach().to("cpu", torch.float64)
    if torch.isnan(got_cpu).any() and not torch.isnan(expected_cpu).any():
        fail(f"{what} ≈ {describe(expected_tensor)}", f"含有 NaN：{describe(got_tensor)}", hint)
    if not torch.allclose(got_cpu, expected_cpu, atol=atol, rtol=rtol, equal_nan=True):
        fail(f"{what} ≈ {describe(expected_tensor)}", describe(got_tensor), hint)


def _write_log(result: CheckResult) -> None:
    path = os.environ.get(CHECK_LOG_ENV_VAR)
    if not path:
        return
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(result.to_record(), ensure_ascii=False) + "\n")


def run_cases(
    exercise: str,
    title: str,
    cases: Iterable[Case],
    points: float = 1.0,
    raise_on_fail: bool = True,
    verbose: bool = True,
) -> CheckResult:
    """Run ``cases`` in order, stop at the first failure, report, log and return the result."""
    cases = list(cases)
    result = CheckResult(
        exercise=exercise,
        title=title,
        status=PASSED,
        passed_cases=0,
        total_cases=len(cases),
        points=0.0,
        max_points=points,
        cases=[case.name for case in cases],
    )
    for case in cases:
        try:
            case.run()
        except NotImplementedError:
            result.status = NOT_IMPLEMENTED
            result.case = case.name
            break
        except CaseFailure as failure:
            result.status = FAILED
            result.case, result.expected, result.got, result.hint = case.name, failure.expected, failure.got, failure.hint
            break
        except Exception as error:  # the learner's code crashed: report it, do not crash the checker
            result.status = ERROR
            result.case = case.name
            result.got = f"{type(error).__name__}: {error}"
            result.hint = "讀一下這個例外訊息：通常是形狀不合、dtype 不同或 device 不同。"
            result.detail = "".join(traceback.format_exception(type(error), error, error.__traceback__)[-3:])
            break
        result.passed_cases += 1

    if result.status == PASSED:
        result.points = points
    elif result.total_cases:
        # Partial credit in proportion to the cases passed before the first failure.
        result.points = round(points * result.passed_cases / result.total_cases, 2) if result.status != NOT_IMPLEMENTED else 0.0

    if verbose:
        print(result.report())
    _write_log(result)
    if raise_on_fail and result.status in (FAILED, ERROR):
        raise CheckFailed(f"練習「{title}」未通過，詳見上方說明。")
    if raise_on_fail and result.status == NOT_IMPLEMENTED and os.environ.get(STRICT_ENV_VAR) == "1":
        raise CheckFailed(f"練習「{title}」尚未實作。")
    return result


def checker(exercise: str, title: str, points: float = 1.0):
    """Turn ``build_cases(candidate, **options) -> list[Case]`` into a checker function.

    The returned function has the signature ``check(candidate, *, raise_on_fail=True,
    verbose=True, **options) -> CheckResult`` and is registered under ``exercise``.
    """

    def decorate(build_cases: Callable[..., list[Case]]):
        def check(candidate: Any, *args: Any, raise_on_fail: bool = True, verbose: bool = True, **options: Any) -> CheckResult:
            return run_cases(exercise, title, build_cases(candidate, *args, **options), points, raise_on_fail, verbose)

        check.__name__ = build_cases.__name__
        check.__qualname__ = build_cases.__qualname__
        check.__doc__ = build_cases.__doc__
        check.exercise = exercise  # type: ignore[attr-defined]
        REGISTRY[exercise] = {"title": title, "points": points, "function": build_cases.__name__}
        return check

    return decorate


def _install_ipython_handler() -> None:
    """Show :class:`CheckFailed` as one line in IPython; the report above it says the rest."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return

    def show_compactly(shell, etype, value, tb, tb_offset=None):
        # An error output of one line: the cell still counts as failed (nbclient, nbgrader), but
        # the learner sees no traceback wall under the report.
        shell._showtraceback(etype, value, [f"{etype.__name__}: {value}"])
        return None

    shell.set_custom_exc((CheckFailed,), show_compactly)


_install_ipython_handler()
