"""Plumbing shared by the benchmarks: paths, the project's Airflow environment, subprocess runs, statistics."""

from __future__ import annotations

import os
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = ROOT / "bench" / ".cache"
CLIPS_DIR = CACHE_DIR / "clips"
DAG_FILE = ROOT / "dags" / "cosmos_prompt_upsample.py"
DAG_ID = "cosmos_prompt_upsample"
ENV_SCRIPT = ROOT / "scripts" / "airflow-env.sh"
PYTHON = sys.executable
AIRFLOW_CLI = str(Path(sys.executable).parent / "airflow")
CPUS = max(1, os.cpu_count() or 1)


class BenchError(RuntimeError):
    """A benchmark step failed; the message says which and where its log is."""


def say(message: str) -> None:
    """Human-readable progress; flushed so a long run shows where it is."""
    print(message, flush=True)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def airflow_env(home: Path) -> dict[str, str]:
    """The project's own Airflow environment (scripts/airflow-env.sh), pointed at a private SQLite home.

    Sourcing the script rather than copying its values keeps the benchmark in step with it; the private home
    keeps the benchmark's runs out of the developer's `.airflow/` and starts from an empty metadata DB.
    """
    home.mkdir(parents=True, exist_ok=True)
    base = {key: value for key, value in os.environ.items()
            if not key.startswith(("AIRFLOW", "COSMOS_UPSAMPLE_"))}  # deployment defaults must not leak in
    base["AIRFLOW_HOME"] = str(home)
    dumped = subprocess.run(["bash", "-c", 'source "$1" && env -0', "bash", str(ENV_SCRIPT)], env=base,
                            capture_output=True, check=True).stdout.decode()
    env = dict(entry.split("=", 1) for entry in dumped.split("\0") if "=" in entry)
    env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{home / 'airflow.db'}"
    return env


def run_logged(command: list[str], env: dict[str, str], log_path: Path, timeout: float = 3600,
               cwd: Path = ROOT) -> tuple[str, float]:
    """Run a command to completion; returns its output and wall seconds, keeps the output in log_path."""
    started = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - started
    output = result.stdout + result.stderr
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text(output, encoding="utf-8")
    if result.returncode != 0:
        tail = "\n".join(output.splitlines()[-30:])
        raise BenchError(f"{command[:4]} exited with {result.returncode}; log {log_path}:\n{tail}")
    return output, seconds


def migrate(env: dict[str, str], log_path: Path) -> float:
    """`airflow db migrate` on the private home: required before `airflow dags test`."""
    return run_logged([AIRFLOW_CLI, "db", "migrate"], env, log_path)[1]


def metadata_db(env: dict[str, str]) -> sqlite3.Connection:
    return sqlite3.connect(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].removeprefix("sqlite:///"))
