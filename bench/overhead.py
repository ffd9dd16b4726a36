"""What Airflow adds: real DAG runs with the local model against the same work done without Airflow.

Every run starts from a fresh output folder, so each one probes, counts, extracts hints, loads the model and
generates. DAG and raw runs alternate, and the fastest of each side is compared: on a shared machine other work
only ever adds time, and llama.cpp (one thread per core) slows down many times over when it loses a core.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.clips import clip
from bench.common import PYTHON, run_logged, say
from bench.dag_runs import DagRun, run_dag
from bench.specs import write_specs
from include.cosmos_upsample.settings import local_model_path

# Small clips of varied shape, one per spec, so every spec really extracts its own hint.
CLIP_SHAPES = ((640, 360), (480, 640), (640, 480), (854, 360))


def _warm_model_file() -> None:
    """Read the GGUF once so no run pays the first read from disk."""
    with open(local_model_path("smollm2"), "rb") as handle:
        while handle.read(1 << 24):
            pass


def dag_side(env: dict[str, str], input_dir: Path, work: Path, tag: str) -> DagRun:
    conf = {"input_dir": str(input_dir), "output_dir": str(work / f"dag-out-{tag}"), "backend": "llama_cpp",
            "runner": "local"}
    run = run_dag(env, conf, work / "logs" / f"dag-{tag}.log")
    stages = run.report()["stages"]
    say(f"  DAG {tag}: {run.wall_seconds:.1f}s wall ({run.run_seconds:.1f}s dag_run), "
        f"{sum(stages.values()):.1f}s inside the stage functions {stages}")
    return run


def raw_side(env: dict[str, str], input_dir: Path, work: Path, tag: str) -> dict:
    """bench.raw_stages in a fresh interpreter with the same environment as the DAG run."""
    log = work / "logs" / f"raw-{tag}.log"
    result = log.with_suffix(".json")
    run_logged([PYTHON, "-m", "bench.raw_stages", "--input-dir", str(input_dir), "--output-dir",
                str(work / f"raw-out-{tag}"), "--result", str(result)], env, log)
    raw = json.loads(result.read_text(encoding="utf-8"))
    say(f"  raw {tag}: {raw['raw']:.1f}s = validate {raw['validate']:.1f} + worker {raw['upsample']:.1f} "
        f"+ merge {raw['merge']:.2f} (all stages with imports {raw['all']:.1f}s)")
    return raw


def overhead(env: dict[str, str], work: Path, count: int, rounds: int) -> dict:
    input_dir = work / f"local-{count}"
    write_specs(input_dir, count, [clip(*CLIP_SHAPES[i % len(CLIP_SHAPES)], 3, variant=i) for i in range(count)],
                seed=1)
    _warm_model_file()
    dags: list[DagRun] = []
    raws: list[dict] = []
    for index in range(rounds):
        if index % 2:
            raws.append(raw_side(env, input_dir, work, str(index)))
        dags.append(dag_side(env, input_dir, work, str(index)))
        if not index % 2:
            raws.append(raw_side(env, input_dir, work, str(index)))
    dag = min(dags, key=lambda run: run.wall_seconds)
    raw = min(raws, key=lambda result: result["raw"])
    report = dag.report()
    in_tasks = sum(report["stages"].values())
    loads = {"plan_jobs": len(dag.plan_jobs()), "worker_loaded_lines": dag.model_loaded_lines()}
    say(f"  model loads: {loads['plan_jobs']} job(s) in the plan, the worker printed 'model ... loaded' "
        f"{loads['worker_loaded_lines']}x")
    return {
        "overhead_ratio": dag.wall_seconds / raw["raw"],
        "overhead_ratio_dag_run": dag.run_seconds / raw["raw"],
        "overhead_specs": count,
        "overhead_rounds": rounds,
        "overhead_dag_wall_seconds": dag.wall_seconds,
        "overhead_dag_run_seconds": dag.run_seconds,
        "overhead_raw_seconds": raw["raw"],
        "overhead_raw_all_stages_seconds": raw["all"],
        # Wall time the stage functions did not account for: Airflow itself, whatever speed the model ran at.
        "overhead_airflow_seconds": dag.wall_seconds - in_tasks,
        # The ratio had the stage work run as fast inside the DAG as outside it: robust to a CPU-starved model run.
        "overhead_ratio_airflow_only": (dag.wall_seconds - in_tasks + raw["raw"]) / raw["raw"],
        # Same prompts, same seed, same answers: these differ only when other work on the machine starved one side.
        "overhead_worker_seconds": {"dag": report["stages"]["upsample"], "raw": raw["upsample"]},
        "overhead_upsampled": report["counts"]["upsampled"],
        "model_loads_cross_check": loads,
    }
