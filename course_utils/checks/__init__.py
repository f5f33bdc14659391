"""Exercise checkers, one module per topic (``warmup``, ``clip``, ``attention``, ...).

Use them as ``from course_utils.checks import warmup; warmup.check_l2_normalize(fn)``.
:func:`load_all` imports every topic so that :data:`REGISTRY` lists every exercise.
"""

from __future__ import annotations

import importlib
import pkgutil

from course_utils.checks.base import (
    REGISTRY,
    Case,
    CaseFailure,
    CheckFailed,
    CheckResult,
    checker,
    run_cases,
)


def load_all() -> dict:
    """Import every checker module and return the registry of exercises."""
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")
    return REGISTRY


__all__ = ["REGISTRY", "Case", "CaseFailure", "CheckFailed", "CheckResult", "checker", "load_all", "run_cases"]
