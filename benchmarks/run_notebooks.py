"""Measure each solution notebook per profile: wall time, peak memory and its quality figures.

For every notebook and profile the notebook runs top to bottom in a fresh kernel
(``COURSE_PROFILE`` set, ``HF_HUB_OFFLINE=1``, ``MPLBACKEND=Agg``), and this script records:

- ``wall_s``: seconds from kernel start to the end of the last cell;
- ``peak_rss_mib``: the largest sum of resident set sizes of the kernel and its child
  processes, sampled every 0.2 s. Shared pages count once per process, so it is an upper
  estimate, and a peak shorter than the sampling interval can be missed;
- ``cuda_max_allocated_mib``: ``torch.cuda.max_memory_allocated()`` read in the kernel after
  the last cell (None without CUDA); it counts tensors only, not the caching allocator's reserve;
- ``metrics``: every line ``METRIC name=value`` the notebook printed (the values its quality
  assertions check, reported with ``env.metric``, which prints them only when
  ``COURSE_REPORT_METRICS=1``, as set here). A notebook that reports none has an empty ``metrics``.

Usage::

    python benchmarks/run_notebooks.py [--profile ci cpu gpu] [--notebooks solutions/0*.ipynb] [--json FILE] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO_DIR = Path(__file__).resolve().parent.parent
PROFILES = ("ci", "cpu", "gpu")
# Budgets a notebook should meet per profile (seconds of wall time): ci and cpu on a quiet
# two-core machine, gpu on one data-centre GPU.
BUDGET_S = {"ci": 90, "cpu": 300, "gpu": 180}
DEFAULT_TIMEOUT_S = 1800
SAMPLE_INTERVAL_S = 0.2
METRIC_LINE = re.compile(r"^METRIC\s+([A-Za-z0-9_.:/\-]+)\s*=\s*(\S+)\s*$")
CUDA_MARKER = "BENCHMARK_CUDA_MAX_ALLOCATED="
# Appended as a last cell. It reads torch only when the notebook imported it, so that the probe
# itself adds no memory.
CUDA_PROBE = f"""\
import sys as _benchmark_sys
_benchmark_torch = _benchmark_sys.modules.get("torch")
_benchmark_value = None
if _benchmark_torch is not None and _benchmark_torch.cuda.is_available():
    _benchmark_value = _benchmark_torch.cuda.max_memory_allocated()
print("{CUDA_MARKER}" + repr(_benchmark_value))
"""


def parse_metrics(notebook) -> dict[str, float | str]:
    """Return ``{name: value}`` from every stdout line ``METRIC name=value`` (numbers as floats; the last line of a name wins)."""
    metrics: dict[str, float | str] = {}
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        for output in cell.get("outputs", []):
            if output.get("output_type") != "stream" or output.get("name") != "stdout":
                continue
            for line in output.get("text", "").splitlines():
                match = METRIC_LINE.match(line.strip())
                if not match:
                    continue
                name, raw = match.groups()
                try:
                    metrics[name] = float(raw)
                except ValueError:
                    metrics[name] = raw
    return metrics


def parse_cuda_probe(cell) -> int | None:
    for output in cell.get("outputs", []):
        for line in output.get("text", "").splitlines():
            if line.startswith(CUDA_MARKER):
                value = line[len(CUDA_MARKER):].strip()
                return None if value == "None" else int(value)
    return None


class RssSampler(threading.Thread):
    """Sample the summed RSS of every process below this one (the kernel and what it starts)."""

    def __init__(self, interval_s: float = SAMPLE_INTERVAL_S):
        super().__init__(daemon=True)
        import psutil

        self.psutil = psutil
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.stop_event = threading.Event()

    def sample(self) -> int:
        total = 0
        for child in self.psutil.Process().children(recursive=True):
            try:
                total += child.memory_info().rss
            except self.psutil.Error:
                continue
        return total

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.peak_bytes = max(self.peak_bytes, self.sample())
            self.stop_event.wait(self.interval_s)

    def stop(self) -> int:
        self.stop_event.set()
        self.join()
        return self.peak_bytes


def kernel_environment(profile: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(COURSE_PROFILE=profile, HF_HUB_OFFLINE="1", MPLBACKEND="Agg", COURSE_REPORT_METRICS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_DIR), env.get("PYTHONPATH", "")]))
    return env


def slowest_cell(notebook) -> dict[str, Any] | None:
    """Return the index and seconds of the slowest cell, from nbclient's per-cell timestamps."""
    slowest = None
    for index, cell in enumerate(notebook.cells):
        timing = cell.get("metadata", {}).get("execution", {})
        start, end = timing.get("iopub.execute_input"), timing.get("shell.execute_reply")
        if not start or not end:
            continue
        seconds = (datetime.datetime.fromisoformat(end.replace("Z", "+00:00"))
                   - datetime.datetime.fromisoformat(start.replace("Z", "+00:00"))).total_seconds()
        if slowest is None or seconds > slowest["seconds"]:
            slowest = {"cell": index, "seconds": round(seconds, 2)}
    return slowest


def run_one(path: Path, profile: str, timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """Execute one notebook in a fresh kernel under ``profile`` and return its measurements.

    The result's ``status`` is ``ok``, or ``failed`` with ``error`` naming the cell error or
    the timeout; figures measured before the failure are kept.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    notebook = nbformat.read(path, as_version=4)
    probe = nbformat.v4.new_code_cell(CUDA_PROBE)
    notebook.cells.append(probe)
    # NOTE: nbclient applies this timeout to each cell separately; nothing limits the whole run.
    client = NotebookClient(notebook, timeout=int(timeout), kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    sampler = RssSampler()
    sampler.start()
    started = time.perf_counter()
    status, error = "ok", ""
    try:
        client.execute(env=kernel_environment(profile))
    except CellExecutionError as failure:
        status, error = "failed", str(failure).strip().splitlines()[-1][:300]
    except (CellTimeoutError, DeadKernelError) as failure:
        status, error = "failed", f"{type(failure).__name__}: {failure}"[:300]
    wall = time.perf_counter() - started
    peak = sampler.stop()

    cuda_bytes = parse_cuda_probe(probe) if status == "ok" else None
    notebook.cells.pop()
    return {
        "notebook": path.name,
        "profile": profile,
        "status": status,
        "error": error,
        "wall_s": round(wall, 1),
        "budget_s": BUDGET_S[profile],
        "within_budget": status == "ok" and wall <= BUDGET_S[profile],
        "peak_rss_mib": round(peak / 2**20),
        "cuda_max_allocated_mib": None if cuda_bytes is None else round(cuda_bytes / 2**20),
        "slowest_cell": slowest_cell(notebook),
        "metrics": parse_metrics(notebook),
    }


def machine_description() -> dict[str, Any]:
    import psutil
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": gpu,
        # Other jobs on the machine inflate every time; the 1-minute load average at the start shows how much.
        "load_average_1m": round(os.getloadavg()[0], 1),
    }


def markdown_table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| notebook | profile | status | wall (s) | budget (s) | peak RSS (MiB) | CUDA max allocated (MiB) | slowest cell (s) | quality figures |",
        "|---|---|---|---:|---:|---:|---:|---|---|",
    ]
    for row in results:
        metrics = ", ".join(f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}"
                            for name, value in row["metrics"].items()) or "none printed"
        slowest = f"#{row['slowest_cell']['cell']}: {row['slowest_cell']['seconds']}" if row["slowest_cell"] else "-"
        cuda = "-" if row["cuda_max_allocated_mib"] is None else str(row["cuda_max_allocated_mib"])
        status = row["status"] if row["status"] == "ok" else f"failed: {row['error']}"
        over = "" if row["within_budget"] or row["status"] != "ok" else " (over)"
        lines.append(f"| {row['notebook']} | {row['profile']} | {status} | {row['wall_s']}{over} | {row['budget_s']} "
                     f"| {row['peak_rss_mib']} | {cuda} | {slowest} | {metrics} |")
    return "\n".join(lines)


def select_notebooks(patterns: list[str]) -> list[Path]:
    paths: list[Path] = []
    for pattern in patterns:
        matches = sorted(Path(match) for match in glob.glob(pattern))
        if not matches:
            raise FileNotFoundError(f"no notebook matches {pattern!r}; pass paths like solutions/01_*.ipynb.")
        paths.extend(match for match in matches if match not in paths)
    return paths


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Time each solution notebook per profile and collect its quality figures.")
    parser.add_argument("--profile", nargs="+", choices=PROFILES, default=["ci"], help="profiles to run (default: ci)")
    parser.add_argument("--notebooks", nargs="+", default=[str(REPO_DIR / "solutions" / "*.ipynb")],
                        help="notebook paths or glob patterns (default: every solution notebook)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="limit per cell in seconds")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write machine, date and results to this JSON file")
    parser.add_argument("--markdown", type=Path, metavar="FILE", help="write the results table to this markdown file")
    return parser


def run_all_notebooks(notebooks: list[Path], profiles: list[str], timeout: float) -> list[dict[str, Any]]:
    results = []
    for profile in profiles:
        for path in notebooks:
            print(f"running {path.name} in the {profile} profile ...", file=sys.stderr, flush=True)
            result = run_one(path, profile, timeout)
            print(f"  {result['status']} in {result['wall_s']} s, peak RSS {result['peak_rss_mib']} MiB", file=sys.stderr, flush=True)
            results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    notebooks = select_notebooks(args.notebooks)
    results = run_all_notebooks(notebooks, args.profile, args.timeout)
    table = markdown_table(results)
    print(table)
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": machine_description(), "results": results}, indent=2), encoding="utf-8")
    if args.markdown is not None:
        args.markdown.write_text(table + "\n", encoding="utf-8")
    return 0 if all(result["status"] == "ok" for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
