"""Device, profile and seeding: the three things every notebook sets up first.

A *profile* sizes the work a notebook does:

- ``ci``: the smallest runs, used by the test suite; quality floors are low but still fail on
  a broken model.
- ``cpu``: the default without a GPU; sized for a laptop-class CPU.
- ``gpu``: the default with CUDA; larger models, more steps, bf16 autocast.

The environment variable ``COURSE_PROFILE`` overrides the automatic choice.

bf16 on a CPU: a notebook may ask :meth:`CourseEnv.autocast` for bf16 on the CPU too
(``cpu_bf16=True``). It is used only where the CPU multiplies bf16 matrices in hardware
(Intel AMX or AVX512-BF16); elsewhere bf16 is emulated and slower than float32, so the context
stays a no-op. ``COURSE_CPU_BF16=0`` turns it off (to compare with float32), ``=1`` forces it on.
"""

from __future__ import annotations

import contextlib
import numbers
import os
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

PROFILES = ("ci", "cpu", "gpu")
PROFILE_ENV_VAR = "COURSE_PROFILE"
DEVICE_ENV_VAR = "COURSE_DEVICE"
CPU_BF16_ENV_VAR = "COURSE_CPU_BF16"
REPORT_METRICS_ENV_VAR = "COURSE_REPORT_METRICS"
DEFAULT_SEED = 0


def get_device() -> torch.device:
    """Return the best available device: CUDA, then Apple MPS, then CPU.

    ``COURSE_DEVICE`` (for example ``cpu`` or ``cuda:1``) overrides the choice.
    """
    requested = os.environ.get(DEVICE_ENV_VAR, "").strip()
    if requested:
        try:
            device = torch.device(requested)
        except RuntimeError as error:
            raise ValueError(
                f"{DEVICE_ENV_VAR}={requested!r} is not a valid torch device; "
                "use cpu, cuda, cuda:N or mps, or unset the variable."
            ) from error
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"{DEVICE_ENV_VAR}={requested!r} asks for CUDA, but this torch build sees no CUDA "
                "device; unset the variable or install a CUDA build of torch."
            )
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def get_profile(device: torch.device | None = None) -> str:
    """Return the active profile: ``COURSE_PROFILE`` if set, else ``gpu`` on CUDA and ``cpu`` otherwise."""
    requested = os.environ.get(PROFILE_ENV_VAR, "").strip().lower()
    if requested:
        if requested not in PROFILES:
            raise ValueError(
                f"{PROFILE_ENV_VAR}={requested!r} is not a known profile; "
                f"choose one of {', '.join(PROFILES)} or unset the variable."
            )
        return requested
    device = device or get_device()
    return "gpu" if device.type == "cuda" else "cpu"


def cpu_has_native_bf16() -> bool:
    """Return True when this CPU has bf16 matrix instructions (Intel AMX or AVX512-BF16)."""
    cpu = getattr(torch, "cpu", None)
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        check = getattr(cpu, name, None)
        if check is not None and bool(check()):
            return True
    return False


def cpu_bf16_enabled() -> bool:
    """Return whether CPU bf16 autocast is on: ``COURSE_CPU_BF16`` if set, else :func:`cpu_has_native_bf16`."""
    requested = os.environ.get(CPU_BF16_ENV_VAR, "").strip()
    if not requested:
        return cpu_has_native_bf16()
    if requested not in ("0", "1"):
        raise ValueError(f"{CPU_BF16_ENV_VAR}={requested!r} is invalid: use 0 (off) or 1 (on), or unset it to follow the CPU.")
    return requested == "1"


def seed_everything(seed: int = DEFAULT_SEED) -> None:
    """Seed Python's ``random``, NumPy and torch (all devices) with one integer."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}.")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class CourseEnv:
    """What a notebook runs with: device, profile and seed."""

    device: torch.device
    profile: str
    seed: int = DEFAULT_SEED
    extra: dict[str, Any] = field(default_factory=dict)

    def pick(self, **per_profile: Any) -> Any:
        """Return the value given for the active profile, e.g. ``env.pick(ci=200, cpu=2000, gpu=20000)``.

        Raises ``KeyError`` naming the missing profile when the active one has no value.
        """
        unknown = set(per_profile) - set(PROFILES)
        if unknown:
            raise ValueError(f"unknown profile name(s) {sorted(unknown)}; use {', '.join(PROFILES)}.")
        if self.profile not in per_profile:
            raise KeyError(
                f"no value for the active profile {self.profile!r}; pass {self.profile}=... to pick()."
            )
        return per_profile[self.profile]

    @property
    def cpu_bf16_active(self) -> bool:
        """Whether ``autocast(cpu_bf16=True)`` computes in bf16: a CPU device and :func:`cpu_bf16_enabled`."""
        return self.device.type == "cpu" and cpu_bf16_enabled()

    def autocast(self, cpu_bf16: bool = False):
        """Return a bf16 autocast context on CUDA in the ``gpu`` profile, and a no-op context elsewhere.

        With ``cpu_bf16=True``, a CPU run also gets bf16 autocast when :attr:`cpu_bf16_active` is
        True (a CPU with bf16 matrix instructions, unless ``COURSE_CPU_BF16=0``). Matrix
        products then run in bf16 with float32 accumulation, and the parameters stay float32.
        """
        if self.profile == "gpu" and self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        if cpu_bf16 and self.cpu_bf16_active:
            return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def metric(self, name: str, value: float) -> float:
        """Hand a quality figure to the benchmark script and return ``value`` unchanged.

        With ``COURSE_REPORT_METRICS=1``, as ``benchmarks/run_notebooks.py`` sets it, this
        prints a line ``METRIC name=value`` for the script to collect. Otherwise it prints
        nothing, and learners see only the notebook's own output. Raises ``ValueError`` for a name
        with spaces or ``=`` (the line could not be parsed back) and for a value that is not a
        real number.
        """
        if not name or any(ch.isspace() or ch == "=" for ch in name):
            raise ValueError(f"metric name {name!r} must be non-empty, without spaces or '='; use e.g. 'zero_shot_color'.")
        if isinstance(value, torch.Tensor):
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"metric {name!r} got {value!r}; pass a number (a float or a one-element tensor).")
        if os.environ.get(REPORT_METRICS_ENV_VAR) == "1":
            print(f"METRIC {name}={float(value):.6g}")
        return value

    def describe(self) -> str:
        return f"device: {self.device} | profile: {self.profile} | seed: {self.seed} | torch {torch.__version__}"


def setup(seed: int = DEFAULT_SEED, verbose: bool = True) -> CourseEnv:
    """Pick the device and profile, seed everything, print both, and return a :class:`CourseEnv`."""
    device = get_device()
    profile = get_profile(device)
    seed_everything(seed)
    if profile == "ci":
        # Small CI machines share their cores with other jobs; more threads only add contention.
        torch.set_num_threads(min(torch.get_num_threads(), 2))
    env = CourseEnv(device=device, profile=profile, seed=seed)
    if verbose:
        print(env.describe())
    return env
