"""1,000 specs through a real dry run: how many task instances and model loads they cost, and whether the
token counts in the report are exact.

A dry run does everything but the model (discover, validate with probe and exact token counts, batch, merge,
report), so the task instances and the job plan are those of a real run of the same specs.
"""

from __future__ import annotations

import random
from pathlib import Path

from bench.clips import clip
from bench.common import say
from bench.dag_runs import DagRun, run_dag, task_instances
from bench.specs import write_specs
from include.cosmos_upsample.prompt_formats import PROMPT_FORMATS
from include.cosmos_upsample.tokens import PixtralCounter

# A handful of short clips of the shapes users send: wide, full HD, 4:3, portrait, cinemascope.
SHARED_CLIP_SHAPES = ((1280, 720), (1920, 1080), (640, 480), (720, 1280), (1920, 800))


def shared_clips() -> list[Path]:
    return [clip(width, height, 2) for width, height in SHARED_CLIP_SHAPES]


def dry_run(env: dict[str, str], work: Path, count: int) -> DagRun:
    """Generate `count` specs and plan them with backend vllm (the Pixtral budget) and no model."""
    input_dir = work / f"specs-{count}"
    write_specs(input_dir, count, shared_clips())
    conf = {"input_dir": str(input_dir), "output_dir": str(work / f"out-{count}"), "dry_run": True,
            "backend": "vllm"}
    say(f"  dry run of {count} specs: airflow dags test -c '{{\"dry_run\": true, \"backend\": \"vllm\", ...}}'")
    return run_dag(env, conf, work / "logs" / f"dry-run-{count}.log")


def tokens_exact(report: dict, sample: int | None, seed: int = 0) -> dict:
    """Share of planned items whose reported `tokens.prompt` equals a fresh mistral-common count of the request."""
    planned = [item for item in report["items"] if item["status"] == "planned"]
    chosen = planned if sample is None or sample >= len(planned) else random.Random(seed).sample(planned, sample)
    # The dry runs use backend vllm, whose default format is the Cosmos upsampler's (frames first, raw prompt).
    counter, cosmos = PixtralCounter(images_first=True), PROMPT_FORMATS["cosmos_upsampler"]
    exact = sum(
        item["tokens"]["prompt"] == counter.count(cosmos.user_text(item["original_prompt"]), item["hint"]["width"],
                                                  item["hint"]["height"], item["hint"]["frames"])
        for item in chosen
    )
    return {"tokens_exact": exact / len(chosen) if chosen else 0.0, "tokens_checked": len(chosen),
            "tokens_planned": len(planned)}


def scale_figures(env: dict[str, str], work: Path, count: int, token_sample: int | None) -> dict:
    run = dry_run(env, work, count)
    per_task = task_instances(env, run.run_id)
    jobs = run.plan_jobs()
    report = run.report()
    say(f"  run {run.run_id}: {run.wall_seconds:.1f}s wall, counts {report['counts']}")
    say(f"  task instances per task: {per_task}")
    say(f"  plan: {len(jobs)} model job(s) of {[job['items'] for job in jobs]} prompts")
    figures = {
        f"task_instances_for_{count}_specs": sum(per_task.values()),
        f"model_loads_for_{count}_specs": len(jobs),
        f"dry_run_{count}_wall_seconds": run.wall_seconds,
        f"dry_run_{count}_stage_seconds": {name: round(value, 2) for name, value in report["stages"].items()},
        # The validate tasks' seconds of work (all chunks, one after another) per spec.
        "validate_seconds_per_spec": round(report["stages"].get("validate", 0.0) / count, 4),
    }
    figures.update(tokens_exact(report, token_sample))
    say(f"  tokens exact: {figures['tokens_exact']:.3f} of {figures['tokens_checked']} planned items checked")
    return figures
