"""How long the dag processor spends on the DAG file, measured in fresh interpreters.

The processor has Airflow imported before it reads any DAG file, so the figure that matters (`warm`) times only
the execution of the file after `import airflow.sdk`; `cold` adds that import, for honesty.
"""

from __future__ import annotations

import json
import subprocess

from bench.common import DAG_FILE, PYTHON, ROOT, BenchError, median

# Imports that would make parsing slow if the DAG file pulled them in at module level.
HEAVY_MODULES = ("mistral_common", "llama_cpp", "ffmpeg", "PIL", "numpy", "vllm", "torch", "paramiko", "docker",
                 "fastapi", "jinja2")

PARSE_SNIPPET = f"""
import json, runpy, sys, time
started = time.perf_counter()
import airflow.sdk
loaded = time.perf_counter()
before = set(sys.modules)
runpy.run_path(sys.argv[1], run_name="cosmos_dag_parse")
done = time.perf_counter()
heavy = sorted(m for m in set(sys.modules) - before if m.split(".")[0] in {HEAVY_MODULES!r})
print(json.dumps({{"warm": done - loaded, "cold": done - started, "heavy": heavy}}))
"""


def parse_once(env: dict[str, str]) -> dict:
    """One fresh interpreter: import airflow.sdk, then run the DAG file; returns its timings."""
    result = subprocess.run([PYTHON, "-c", PARSE_SNIPPET, str(DAG_FILE)], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise BenchError(f"parsing {DAG_FILE} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def dag_parse(env: dict[str, str], runs: int) -> dict:
    """Medians over `runs` fresh interpreters (the first one also warms the OS file cache, as a live one is)."""
    parse_once(env)
    samples = [parse_once(env) for _ in range(runs)]
    return {
        "dag_parse_seconds": median([s["warm"] for s in samples]),
        "dag_parse_seconds_cold": median([s["cold"] for s in samples]),
        "dag_parse_runs": runs,
        "heavy_modules_at_parse": samples[-1]["heavy"],
    }
