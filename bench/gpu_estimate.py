"""Paper estimate of GPU seconds per prompt for Pixtral-12B under vLLM: arithmetic only, no GPU involved.

    .venv/bin/python bench/gpu_estimate.py

Prints the figures bench/RESULTS.md quotes, so the arithmetic there can be re-done and the assumptions changed in
one place. Every input below is an assumption, stated in RESULTS.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PARAMS = 12e9  # decoder FLOPs per token ~ 2 * 12e9 (the 0.4B vision encoder and attention add a few percent)
WEIGHT_BYTES = 24e9  # bf16
# Mistral-NeMo decoder of Pixtral-12B: 40 layers, 8 KV heads of 128; K and V in bf16.
KV_BYTES_PER_TOKEN = 2 * 40 * 8 * 128 * 2
PROMPT_TOKENS = 3800  # text + template + 2 frames, near the 3,796-token budget the `auto` hint fills
OUTPUT_TOKENS = 300
BATCH = 128  # batch_max_items: prompts per job, one model load each
PEAK_BF16_FLOPS = 989e12  # dense, H100 SXM and H200 alike
MFU_PREFILL = 0.40
BANDWIDTH_EFFICIENCY = 0.75  # share of peak HBM bandwidth a decode step achieves
GPU_MEMORY_UTILIZATION = 0.90  # vLLM default
RUNTIME_RESERVE_BYTES = 5e9  # activations, CUDA graphs, vision encoder workspace
LOAD_SECONDS = (30, 60)
SPECS = 1000


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_bytes: float
    bandwidth: float  # bytes/s, peak


GPUS = (Gpu("H100", 80e9, 3.35e12), Gpu("H200", 141e9, 4.8e12))


def concurrent_sequences(gpu: Gpu, weight_bytes: float = WEIGHT_BYTES) -> int:
    """How many 4k-token sequences the KV cache holds at once (vLLM admits no more)."""
    kv_bytes = gpu.memory_bytes * GPU_MEMORY_UTILIZATION - weight_bytes - RUNTIME_RESERVE_BYTES
    return min(BATCH, int(kv_bytes // (KV_BYTES_PER_TOKEN * (PROMPT_TOKENS + OUTPUT_TOKENS))))


def prefill_seconds(peak_flops: float = PEAK_BF16_FLOPS) -> float:
    return 2 * PARAMS * PROMPT_TOKENS / (peak_flops * MFU_PREFILL)


def decode_seconds(gpu: Gpu, weight_bytes: float = WEIGHT_BYTES) -> float:
    """Per prompt: each step reads the weights once for the running batch plus every sequence's own KV cache."""
    running = concurrent_sequences(gpu, weight_bytes)
    mean_context = PROMPT_TOKENS + OUTPUT_TOKENS / 2
    step_bytes = weight_bytes + running * mean_context * KV_BYTES_PER_TOKEN
    step = step_bytes / (gpu.bandwidth * BANDWIDTH_EFFICIENCY)
    return OUTPUT_TOKENS * step / running


def main() -> None:
    prefill = prefill_seconds()
    jobs = math.ceil(SPECS / BATCH)
    per_job = math.ceil(SPECS / jobs)  # plan_jobs balances: 1,000 specs make 8 jobs of 125
    print(f"KV cache per token {KV_BYTES_PER_TOKEN} B; prefill per prompt {prefill:.3f} s "
          f"(2 * {PARAMS / 1e9:.0f}e9 * {PROMPT_TOKENS} FLOP at {MFU_PREFILL:.0%} of "
          f"{PEAK_BF16_FLOPS / 1e12:.0f} TFLOPS)")
    for gpu in GPUS:
        decode = decode_seconds(gpu)
        compute = prefill + decode
        load = [seconds / BATCH for seconds in LOAD_SECONDS]
        job = [seconds + per_job * compute for seconds in LOAD_SECONDS]
        print(f"{gpu.name}: {concurrent_sequences(gpu)} sequences at once; decode {decode:.3f} s/prompt; "
              f"compute {compute:.3f} s/prompt (overlap floor {max(prefill, decode):.3f}); load "
              f"{load[0]:.2f}-{load[1]:.2f} s/prompt; total {compute + load[0]:.2f}-{compute + load[1]:.2f} "
              f"GPU s/prompt; one job of {per_job}: {job[0]:.0f}-{job[1]:.0f} s")
        for hosts in (1, 2, 4, 8, 16):
            waves = math.ceil(jobs / hosts)
            print(f"  {SPECS} specs = {jobs} jobs on {hosts:>2} host(s): {waves} job(s) in a row, "
                  f"GPU stage wall {waves * job[0] / 60:.1f}-{waves * job[1] / 60:.1f} min")


# fp8 weights (vLLM `quantization="fp8"` on Hopper): half the weight bytes, twice the dense tensor throughput;
# the KV cache stays bf16 here.
PRECISIONS = (("bf16", WEIGHT_BYTES, PEAK_BF16_FLOPS), ("fp8", WEIGHT_BYTES / 2, 2 * PEAK_BF16_FLOPS))


def multi_gpu_hosts(hosts: int = 2, gpus_per_host: int = 8) -> None:
    """Every GPU a slot (gpus_per_job 1): jobs = the planner's job_count, one model load per slot in parallel."""
    from include.cosmos_upsample.batching import job_count

    slots = hosts * gpus_per_host
    jobs = job_count(SPECS, BATCH, slots)
    per_job = math.ceil(SPECS / jobs)
    print(f"{hosts} hosts x {gpus_per_host} GPUs = {slots} slots: {SPECS} specs make {jobs} jobs of <= {per_job}")
    for precision, weight_bytes, peak in PRECISIONS:
        for gpu in GPUS:
            compute = prefill_seconds(peak) + decode_seconds(gpu, weight_bytes)
            waves = math.ceil(jobs / slots)
            wall = [waves * (seconds + per_job * compute) for seconds in LOAD_SECONDS]
            gpu_s = [compute + seconds * jobs / SPECS for seconds in LOAD_SECONDS]
            print(f"  {precision} {gpu.name}: {concurrent_sequences(gpu, weight_bytes)} sequences at once; compute "
                  f"{compute:.3f} s/prompt; {gpu_s[0]:.2f}-{gpu_s[1]:.2f} GPU s/prompt with loads; GPU stage wall "
                  f"{wall[0] / 60:.1f}-{wall[1] / 60:.1f} min")


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
    multi_gpu_hosts()
