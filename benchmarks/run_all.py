"""Run every benchmark of the course and write one markdown fragment for docs/benchmarks.md.

Two parts:

- notebooks: ``run_notebooks.py`` for the chosen profiles (wall time, peak memory, quality
  figures);
- micro-benchmarks: every ``benchmarks/bench_*.py``, each run as its own process. A script
  that offers ``--json FILE`` should write there a JSON list of rows. Each row has the keys
  ``benchmark``, ``case``, ``device``, ``reference_ms`` (the course's implementation),
  ``library`` (what it is compared with), ``library_ms`` and ``ratio`` (reference_ms /
  library_ms, timed side by side in one run). :func:`normalize_rows` lists the other layouts
  read. For a script without such rows, the fragment keeps its printed output.

Usage::

    python benchmarks/run_all.py [--profile ci cpu gpu] [--skip-notebooks] [--skip-micro] [--output FILE] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run_notebooks  # noqa: E402

BENCHMARKS_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCHMARKS_DIR.parent
# Reference implementations should stay within this factor of the library versions.
RATIO_TARGET = 1.2
MICRO_TIMEOUT_S = 1800
OUTPUT_TAIL_CHARS = 2000
ROW_KEYS = ("benchmark", "case", "device", "reference_ms", "library", "library_ms", "ratio")


def normalize_rows(payload: Any) -> list[dict[str, Any]] | None:
    """Return rows with :data:`ROW_KEYS` from a script's JSON, or None when its layout is not understood.

    Accepted: a list of row dicts, or a dict whose ``results`` is that list (its ``device``
    then applies to every row). Each row needs ``ratio`` and ``reference_ms``. The library
    time is the one other ``*_ms`` key, whose prefix names the library (``torch_ms``: "torch").
    The remaining keys describe the case.
    """
    defaults: dict[str, Any] = {}
    rows = payload
    if isinstance(payload, dict):
        rows = payload.get("results")
        defaults = {key: value for key, value in payload.items() if key in ("device", "benchmark")}
    if not isinstance(rows, list) or not rows:
        return None
    normalized = []
    for row in rows:
        if not isinstance(row, dict) or "ratio" not in row or "reference_ms" not in row:
            return None
        if set(ROW_KEYS) <= set(row):
            normalized.append(dict(row))
            continue
        library_keys = [key for key in row if key.endswith("_ms") and key != "reference_ms"]
        if len(library_keys) != 1:
            return None
        library_key = library_keys[0]
        described = {key: value for key, value in row.items()
                     if key not in ("ratio", "reference_ms", library_key, "device", "benchmark")}
        normalized.append({
            "benchmark": row.get("benchmark", defaults.get("benchmark", "")),
            "case": ", ".join(f"{key}={value}" for key, value in described.items()),
            "device": row.get("device", defaults.get("device", "")),
            "reference_ms": float(row["reference_ms"]),
            "library": library_key[: -len("_ms")],
            "library_ms": float(row[library_key]),
            "ratio": float(row["ratio"]),
        })
    return normalized


def run_micro_benchmark(script: Path, timeout: float = MICRO_TIMEOUT_S) -> dict[str, Any]:
    """Run one ``bench_*.py`` and return its rows, or the end of its printed output.

    A script whose ``--help`` lists ``--json`` runs with ``--json FILE``, and its rows are
    read from that file. Any other script runs with no arguments, and only its output is kept.
    """
    env = dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_DIR), env.get("PYTHONPATH", "")]))
    benchmark = script.stem.removeprefix("bench_")
    with tempfile.TemporaryDirectory(prefix="course-bench-") as scratch:
        rows_path = Path(scratch) / "rows.json"
        command = [sys.executable, str(script)]
        try:
            usage = subprocess.run(command + ["--help"], cwd=REPO_DIR, env=env, capture_output=True, text=True, timeout=120)
            if "--json" in usage.stdout:
                command += ["--json", str(rows_path)]
            completed = subprocess.run(command, cwd=REPO_DIR, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as expired:
            output = expired.stdout if isinstance(expired.stdout, str) else ""
            return {"script": script.name, "status": f"timed out after {timeout:g} s", "rows": [], "output": output[-OUTPUT_TAIL_CHARS:]}
        output = (completed.stdout + completed.stderr)[-OUTPUT_TAIL_CHARS:]
        if completed.returncode != 0:
            return {"script": script.name, "status": f"failed (exit code {completed.returncode})", "rows": [], "output": output}
        try:
            payload = json.loads(rows_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return {"script": script.name, "status": "printed output only", "rows": [], "output": completed.stdout[-OUTPUT_TAIL_CHARS:]}
    rows = normalize_rows(payload)
    if rows is None:
        return {"script": script.name, "status": "JSON layout not understood; printed output kept", "rows": [],
                "output": completed.stdout[-OUTPUT_TAIL_CHARS:]}
    for row in rows:
        row["benchmark"] = row["benchmark"] or benchmark
    return {"script": script.name, "status": "ok", "rows": rows, "output": ""}


def micro_table(results: list[dict[str, Any]]) -> str:
    lines = [
        f"| benchmark | case | device | course (ms) | compared with | library (ms) | ratio | within {RATIO_TARGET}x |",
        "|---|---|---|---:|---|---:|---:|---|",
    ]
    notes = []
    for result in results:
        for row in result["rows"]:
            within = "yes" if row["ratio"] <= RATIO_TARGET else "no"
            lines.append(f"| {row['benchmark']} | {row['case']} | {row['device']} | {row['reference_ms']:.3f} | {row['library']} "
                         f"| {row['library_ms']:.3f} | {row['ratio']:.2f} | {within} |")
        if result["status"] != "ok":
            notes.append(f"`{result['script']}`: {result['status']}\n\n```\n{result['output'].strip()}\n```\n")
    return "\n".join(lines + ([""] + notes if notes else []))


def machine_line(machine: dict[str, Any]) -> str:
    gpu = machine["gpu"] or "no GPU"
    return (f"{machine['platform']}, {machine['cpu_count']} CPU cores, {machine['memory_gib']} GiB RAM, {gpu}; "
            f"Python {machine['python']}, torch {machine['torch']}; 1-minute load average at the start "
            f"{machine['load_average_1m']}")


def unmeasured_lines(profiles: list[str], machine: dict[str, Any], ran_notebooks: bool, ran_micro: bool) -> list[str]:
    lines = []
    if not ran_notebooks:
        lines.append("- notebooks: not run in this session (--skip-notebooks).")
    else:
        missing = [profile for profile in run_notebooks.PROFILES if profile not in profiles]
        if missing:
            noun = "profile" if len(missing) == 1 else "profiles"
            lines.append(f"- notebooks in the {', '.join(missing)} {noun}: not run in this session.")
    if not ran_micro:
        lines.append("- micro-benchmarks: not run in this session (--skip-micro).")
    if machine["gpu"] is None:
        lines.append("- everything on a GPU: this machine has none, so GPU times, CUDA memory and the gpu-profile "
                     "targets are unmeasured.")
    return lines


def build_fragment(command: str, machine: dict[str, Any], profiles: list[str], notebook_results: list[dict] | None,
                   micro_results: list[dict] | None) -> str:
    parts = [
        f"### Run of {machine['date']}",
        "",
        f"- machine: {machine_line(machine)}",
        f"- command: `{command}`",
        "",
    ]
    if notebook_results is not None:
        parts += ["#### Notebooks", "", run_notebooks.markdown_table(notebook_results), ""]
    if micro_results is not None:
        parts += ["#### Micro-benchmarks (course implementation vs library, side by side in one process)", "",
                  micro_table(micro_results), ""]
    unmeasured = unmeasured_lines(profiles, machine, notebook_results is not None, micro_results is not None)
    if unmeasured:
        parts += ["#### Not measured in this run", "", *unmeasured, ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the notebook and micro-benchmarks and write a markdown fragment.")
    parser.add_argument("--profile", nargs="+", choices=run_notebooks.PROFILES, default=["ci"],
                        help="notebook profiles to run (default: ci)")
    parser.add_argument("--notebooks", nargs="+", default=[str(REPO_DIR / "solutions" / "*.ipynb")],
                        help="notebook paths or glob patterns (default: every solution notebook)")
    parser.add_argument("--skip-notebooks", action="store_true", help="run only the micro-benchmarks")
    parser.add_argument("--skip-micro", action="store_true", help="run only the notebooks")
    parser.add_argument("--output", type=Path, metavar="FILE", help="write the markdown fragment here (default: print it)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write every measurement to this JSON file")
    args = parser.parse_args(argv)
    if args.skip_notebooks and args.skip_micro:
        parser.error("--skip-notebooks and --skip-micro together leave nothing to run.")

    command = "python benchmarks/run_all.py " + " ".join(shlex.quote(arg) for arg in (argv if argv is not None else sys.argv[1:]))
    machine = run_notebooks.machine_description()
    notebook_results = None
    if not args.skip_notebooks:
        notebooks = run_notebooks.select_notebooks(args.notebooks)
        notebook_results = run_notebooks.run_all_notebooks(notebooks, args.profile, run_notebooks.DEFAULT_TIMEOUT_S)
    micro_results = None
    if not args.skip_micro:
        micro_results = []
        for script in sorted(BENCHMARKS_DIR.glob("bench_*.py")):
            print(f"running {script.name} ...", file=sys.stderr, flush=True)
            micro_results.append(run_micro_benchmark(script))
            print(f"  {micro_results[-1]['status']}", file=sys.stderr, flush=True)

    fragment = build_fragment(command.strip(), machine, args.profile, notebook_results, micro_results)
    if args.output is not None:
        args.output.write_text(fragment, encoding="utf-8")
    else:
        print(fragment)
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": machine, "command": command, "notebooks": notebook_results,
                                         "micro": micro_results}, indent=2), encoding="utf-8")
    failed = any(row["status"] != "ok" for row in notebook_results or []) or any(
        result["status"] != "ok" for result in micro_results or [])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
