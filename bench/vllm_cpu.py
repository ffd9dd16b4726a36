"""The worker's vLLM path on vLLM's CPU build with the tiny random-weight Pixtral: engine start, per-request time,
the ledger latency (from the moment `engine.step()` hands over a finished answer to its judged, fsynced ledger line),
and the quality gate's seconds per answer on this run's own answers, beside the engine's seconds per request.

    .venv-vllm/bin/python bench/vllm_cpu.py WORKDIR [--requests N]     (bench/run.py --only vllm runs it)

Runs the real worker (`worker.run_job`) on one job; the only additions are timestamps around the engine's `step()`
and the ledger's `append`. The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "docker" / "upsampler")]
from tests.vllm.cpu_engine import CPU_ENGINE_ARGS, CPU_ENGINE_ENV  # noqa: E402

for _name, _value in CPU_ENGINE_ENV.items():
    os.environ.setdefault(_name, _value)

PROMPTS = ["A robot arm picks up a red cup.", "A forklift crosses a warehouse.", "A drone flies along a coast.",
           "A person crosses a busy street at night.", "A kitchen robot pours water into a glass."]


def make_job(work: Path, requests: int) -> Path:
    """A tiny Pixtral and one job of `requests` items with two 320x180 frames each, as batch writes it."""
    from include.cosmos_upsample.jobformat import MANIFEST_NAME, Job, JobItem
    from include.cosmos_upsample.prompt_formats import PROMPT_FORMATS

    model = work / "tiny-pixtral"
    if not (model / "params.json").exists():
        subprocess.run([sys.executable, str(ROOT / "tests" / "vllm" / "tiny_pixtral.py"), str(model)], check=True,
                       capture_output=True)
    frames = []
    for index in range(2):
        frame = work / f"frame-{index}.jpg"
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc2=size=320x180:rate=1",
                        "-vf", f"hue=h={index * 90}", "-frames:v", "1", str(frame)], check=True)
        frames.append(str(frame))
    cosmos = PROMPT_FORMATS["cosmos_upsampler"]
    items = tuple(JobItem(f"k{index}", f"s{index}", cosmos.user_text(PROMPTS[index % len(PROMPTS)] + f" #{index}"),
                          tuple(frames), max_tokens=32) for index in range(requests))
    job_dir = work / "job"
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / "ledger.jsonl").unlink(missing_ok=True)
    job = Job("bench", "vllm", str(model), 4096, 300, "cosmos_upsampler", {**cosmos.sampling, "seed": 0},
              {"enable_prefix_caching": True, "max_num_seqs": 8}, "tiny tekken.json", items)
    (job_dir / MANIFEST_NAME).write_text(json.dumps(job.to_manifest()))
    return job_dir


def warm_up_items(job, count: int):
    """Requests like the job's first ones but with other texts: they warm the engine without caching the job's."""
    import dataclasses
    from collections import deque

    from include.cosmos_upsample.jobformat import Request

    return deque(Request(dataclasses.replace(item, key=f"warm-{item.key}", text=f"{item.text} (warm-up)"))
                 for item in job.items[:count])


def measure(job_dir: Path, warm_up: int = 0) -> dict:
    """`warm_up`: answer that many other requests right after the engine starts, inside its start-up time (as a
    served model has answered others before): the answer phase then times a warm engine."""
    import worker

    from include.cosmos_upsample import jobformat

    handed_over: dict[str, float] = {}
    latencies: list[float] = []
    timings: dict[str, float] = {}

    def backend(job):
        started = time.perf_counter()
        real = worker.VllmBackend(job)
        for _ in real.answers(warm_up_items(job, warm_up), job_dir):
            pass
        timings["engine_start_seconds"] = time.perf_counter() - started
        engine, step = real._llm.llm_engine, real._llm.llm_engine.step

        def timed_step():
            outputs = step()
            now = time.perf_counter()
            handed_over.update({output.request_id: now for output in outputs if output.finished})
            timings.setdefault("first_step_at", now)
            return outputs

        engine.step = timed_step
        return real

    append = jobformat.Ledger.append

    def timed_append(self, entry):
        append(self, entry)
        if entry["key"] in handed_over:
            latencies.append(time.perf_counter() - handed_over[entry["key"]])

    jobformat.Ledger.append = timed_append
    started = time.perf_counter()
    assert worker.run_job(job_dir, backend_factory=backend) == 0
    total = time.perf_counter() - started
    answers = len(latencies)
    answering = total - timings["engine_start_seconds"]
    quantiles = statistics.quantiles(latencies, n=20) if answers >= 2 else latencies * 19
    per_request = answering / max(1, answers)
    gate, gate_long = gate_seconds(job_dir)
    return {
        "quality_gate_seconds_per_answer": round(gate, 6),
        "quality_gate_share_of_request": round(gate / per_request, 5),
        "quality_gate_seconds_per_long_answer": round(gate_long, 6),
        "quality_gate_long_share_of_request": round(gate_long / per_request, 5),
        "vllm_cpu_engine_start_seconds": round(timings["engine_start_seconds"], 2),
        "vllm_cpu_requests": answers,
        "vllm_cpu_answer_phase_seconds": round(answering, 2),
        "vllm_cpu_seconds_per_request": round(answering / max(1, answers), 3),
        "ledger_latency_ms_p50": round(statistics.median(latencies) * 1000, 2),
        "ledger_latency_ms_p95": round(quantiles[18] * 1000, 2),
    }


# The longest upsampled prompt of NVIDIA's cosmos-transfer1 examples is 223 words
# (assets/inference_cosmos_transfer1_single_control_*.json): 250 words of the gate's own good paragraphs are the
# longest answer it judges in practice.
LONG_ANSWER_WORDS = 250


def gate_seconds(job_dir: Path, rounds: int = 20) -> tuple[float, float]:
    """Seconds per judged answer of the worker's own gate (the job's policy: thresholds and shipped blocklist), on
    this run's answers and on a 250-word answer, each the mean over `rounds` passes."""
    from include.cosmos_upsample.jobformat import Job, Ledger
    from include.cosmos_upsample.quality import default_blocklist

    job = Job.read(job_dir)
    policy = job.policy()
    assert policy.blocklist == default_blocklist()
    prompts = {item.key: item.prompt or item.text for item in job.items}
    answers = [(prompts[entry["key"]], entry["raw"], entry["finish_reason"])
               for entry in Ledger.of(job_dir).entries() if entry["status"] == "ok"]
    timed = []
    from tests.quality_paragraphs import GOOD_PARAGRAPHS

    long_answer = " ".join(" ".join(GOOD_PARAGRAPHS.values()).split()[:LONG_ANSWER_WORDS])
    for batch in (answers, [(PROMPTS[0], long_answer, "stop")] * len(answers)):
        started = time.perf_counter()
        for _ in range(rounds):
            for prompt, raw, finish_reason in batch:
                policy.judge(prompt, raw, finish_reason)
        timed.append((time.perf_counter() - started) / (rounds * len(batch)))
    return timed[0], timed[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--warm-up", type=int, default=0, help="requests answered before the timing starts")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VLLM_CACHE_ROOT", str(args.workdir / "vllm-cache"))
    from worker import VLLM_ENGINE_ARGS_ENV

    os.environ[VLLM_ENGINE_ARGS_ENV] = json.dumps(CPU_ENGINE_ARGS)
    figures = measure(make_job(args.workdir, args.requests), args.warm_up)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
