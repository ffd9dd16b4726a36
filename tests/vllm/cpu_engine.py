"""What running the worker's vLLM path on vLLM's CPU build needs (measured in engine_probe.py); shared by the
tests and bench/vllm_cpu.py. Plain module: it is imported under the vLLM environment's interpreter too."""

from __future__ import annotations

# The engine arguments that differ on the CPU build: the tiny checkpoint is in Mistral's format only (no
# config.json), bf16 weights, eager mode (compiled graphs were ~10x slower per request here), and the engine in this
# process. GPU hosts use none of these.
CPU_ENGINE_ARGS = {"config_format": "mistral", "load_format": "mistral", "dtype": "bfloat16", "enforce_eager": True,
                   "seed": 0, "distributed_executor_backend": "uni"}
# A 1 GiB KV cache and the engine core in this process (no child; 2.1 GiB peak RSS in engine_probe.py).
CPU_ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
