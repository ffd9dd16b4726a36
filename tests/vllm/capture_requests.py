"""Run one job through the worker's real vLLM backend and record what the ENGINE received for each request.

    python capture_requests.py JOB_DIR OUT.json      (under the vLLM environment's interpreter)

The capture sits on `LLMEngine.add_request`, the engine's own entry point, so the test checks the request as vLLM got
it (token ids after vLLM's own chat preprocessing, and the sampling parameters), not what our builder meant to send.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "docker" / "upsampler"))
import worker  # noqa: E402


def main(job_dir: Path, out: Path) -> int:
    captured = []

    def backend(job):
        real = worker.VllmBackend(job)
        engine = real._llm.llm_engine
        add_request = engine.add_request

        def recording_add_request(request_id, prompt, params, *args, **kwargs):
            captured.append({
                "request_id": request_id,
                "prompt_token_ids": list(prompt["prompt_token_ids"]),
                "sampling": {name: getattr(params, name) for name in
                             ("temperature", "top_p", "repetition_penalty", "max_tokens", "seed")},
            })
            return add_request(request_id, prompt, params, *args, **kwargs)

        engine.add_request = recording_add_request
        return real

    code = worker.run_job(job_dir, backend_factory=backend)
    out.write_text(json.dumps({"exit": code, "requests": captured}))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
