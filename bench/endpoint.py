"""Runner endpoint against vLLM's OpenAI-compatible API server on the CPU (tiny random-weight Pixtral), side by side
with the local runner's vLLM worker on the same job: requests per second at 1, 4 and 16 in flight, and what the
ledger costs per answer.

    .venv/bin/python bench/run.py --quick --only endpoint

The same items as bench/vllm_cpu.py (two 320x180 frames each, 32 answer tokens, seed 0), answered first by the server
through `endpoint.answer_job` (the upsample_endpoint task's own code, without Airflow around it), then by the worker
in .venv-vllm (`worker.run_job`, one engine in the process), in alternating rounds. Only the answering is timed: the
server is started before, the worker's engine start is left out of its figure, and each side answers WARM_UP other
requests first.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import statistics
import subprocess
import time
from pathlib import Path

from bench.common import ROOT, say

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
CONCURRENCY = (1, 4, 16)
# Requests each side answers before its timing starts: the first ones after start-up are slower on both.
WARM_UP = 4


def endpoint_job(work: Path, requests: int, job_dir: Path) -> Path:
    """bench/vllm_cpu.py's job, addressed to the served model, with the planner's exact counts (so the runner
    checks the first request's count once and sends the rest as they are). Each run's texts are its own (the job
    folder's name appended): the server's prefix cache never holds a run's prompts from an earlier run."""
    from bench.vllm_cpu import make_job
    from include.cosmos_upsample.jobformat import MANIFEST_NAME, Job
    from include.cosmos_upsample.prompt_formats import PROMPT_FORMATS
    from include.cosmos_upsample.tokens import PixtralCounter
    from tests.endpoint.server import SERVED_NAME

    job = Job.read(make_job(work, requests))
    counter = PixtralCounter(str(work / "tiny-pixtral" / "tekken.json"),
                             PROMPT_FORMATS[job.prompt_format].images_first)
    texts = [f"{item.text} [{job_dir.name}]" for item in job.items]
    items = tuple(dataclasses.replace(item, text=text, planned_tokens=counter.count(text, 320, 180, len(item.frames)))
                  for item, text in zip(job.items, texts, strict=True))
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / MANIFEST_NAME).write_text(json.dumps(dataclasses.replace(job, model=SERVED_NAME,
                                                                        items=items).to_manifest()))
    return job_dir


def answer_timed(job_dir: Path, service, concurrency: int) -> dict:
    """One job through the endpoint runner; the ledger's appends timed inside it."""
    from include.cosmos_upsample import jobformat
    from include.cosmos_upsample.endpoint import answer_job

    appends: list[float] = []
    append = jobformat.Ledger.append

    def timed_append(self, entry):
        started = time.perf_counter()
        append(self, entry)
        appends.append(time.perf_counter() - started)

    jobformat.Ledger.append = timed_append
    try:
        started = time.perf_counter()
        answered = asyncio.run(answer_job(job_dir, service, concurrency=concurrency))
        seconds = time.perf_counter() - started
    finally:
        jobformat.Ledger.append = append
    ledger, job = jobformat.Ledger.of(job_dir), jobformat.Job.read(job_dir)
    # No re-asks here (the job carries no quality policy: 0 retries), so one answer settles each item.
    assert answered == len(job.items) == len(ledger.finished_keys(job)), "not every item"
    return {"seconds": seconds, "answered": answered, "appends": appends,
            "ledger_bytes": ledger.path.stat().st_size}


def local_rps(work: Path, requests: int) -> float:
    """The local runner's worker on the same job (bench/vllm_cpu.py: a fresh engine, its start left out)."""
    done = subprocess.run([str(VLLM_PYTHON), str(ROOT / "bench" / "vllm_cpu.py"), str(work), "--requests",
                           str(requests), "--warm-up", str(WARM_UP)], capture_output=True, text=True, check=True)
    local = json.loads(done.stdout.strip().splitlines()[-1])
    return local["vllm_cpu_requests"] / local["vllm_cpu_answer_phase_seconds"]


def endpoint_figures(work: Path, requests: int, rounds: int) -> dict:
    """`rounds` alternating rounds (the endpoint at 1, 4 and 16 in flight, then the local runner), medians of each:
    the load of other work on the machine changes within minutes, and both sides see it alike."""
    from include.cosmos_upsample.endpoint import Service
    from tests.endpoint.server import API_KEY, VllmServer

    work.mkdir(parents=True, exist_ok=True)
    model = work / "tiny-pixtral"
    if not (model / "params.json").exists():
        subprocess.run([str(VLLM_PYTHON), str(ROOT / "tests" / "vllm" / "tiny_pixtral.py"), str(model)], check=True,
                       capture_output=True)
    server = VllmServer(VLLM_PYTHON, model, work / "server.log", work / "vllm-cache")
    started = time.perf_counter()
    server.start()
    figures: dict = {"endpoint_server_start_seconds": round(time.perf_counter() - started, 1)}
    service = Service("bench", server.base_url, API_KEY)
    rps: dict[str, list[float]] = {**{f"endpoint_rps_c{c}": [] for c in CONCURRENCY}, "local_runner_rps": []}
    appends: list[float] = []
    try:
        answer_timed(endpoint_job(work, WARM_UP, work / "warm-up"), service, WARM_UP)  # as the local side
        for round_ in range(rounds):
            for concurrency in CONCURRENCY:
                run = answer_timed(endpoint_job(work, requests, work / f"r{round_}-c{concurrency}"), service,
                                   concurrency)
                rps[f"endpoint_rps_c{concurrency}"].append(run["answered"] / run["seconds"])
                appends += run["appends"]
                figures["endpoint_ledger_bytes_per_answer"] = round(run["ledger_bytes"] / run["answered"])
            rps["local_runner_rps"].append(local_rps(work, requests))
            say(f"  round {round_ + 1}: " + ", ".join(f"{name} {values[-1]:.2f}" for name, values in rps.items()))
    finally:
        server.stop()
    figures.update({name: round(statistics.median(values), 2) for name, values in rps.items()})
    quantiles = statistics.quantiles(appends, n=20)
    figures.update({
        "endpoint_requests": requests,
        "endpoint_rounds": rounds,
        "endpoint_c16_vs_local": round(figures["endpoint_rps_c16"] / figures["local_runner_rps"], 2),
        "endpoint_c16_vs_local_by_round": [round(a / b, 2) for a, b in zip(rps["endpoint_rps_c16"],
                                                                            rps["local_runner_rps"], strict=True)],
        "endpoint_ledger_ms_p50": round(statistics.median(appends) * 1000, 2),
        "endpoint_ledger_ms_p95": round(quantiles[18] * 1000, 2),
    })
    figures["endpoint_ledger_share_of_c1_request"] = round(
        figures["endpoint_ledger_ms_p50"] / 1000 * figures["endpoint_rps_c1"], 4)
    return figures
