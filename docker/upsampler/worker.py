"""The upsampling worker: one model load, every prompt of one job, each answer checkpointed the moment it exists.

Runs as a subprocess of the Airflow worker (runner `local`, with the project root on PYTHONPATH) or as the entry
point of the GPU image (runner `docker`, the shared modules copied beside it). It needs only the standard library,
the project's job and prompt formats (standard library too) and its backend (llama-cpp-python or vLLM), never Airflow.

    python worker.py --job-dir DIR [--gpu-lock FILE]

DIR holds `manifest.json` and receives `ledger.jsonl` (see include/cosmos_upsample/jobformat.py). Each answer is
judged the moment it arrives (include/cosmos_upsample/quality.py, with the job's thresholds and blocklist): a
flagged one is asked again with a new seed, in the same engine, up to the job's re-asks; every attempt is a ledger
line. On start the worker skips every item the ledger already holds as final (passed, or flagged after every
attempt) and continues an item's attempts where they stopped, so a killed or retried job redoes only what is
unfinished; a killed worker loses at most the requests it had in flight.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from include.cosmos_upsample.jobformat import (
    ANSWER_DELAY_ENV,
    DIE_AFTER_ENV,
    EXIT_JOB_BUSY,
    EXIT_REFUSED,
    GPU_HELD_PREFIX,
    REFUSAL_PREFIX,
    Answer,
    Job,
    JobItem,
    Ledger,
    Request,
    attempt_seed,
    flocked,
    job_lock,
    outcome,
    record_attempt,
    requests_to_do,
)
from include.cosmos_upsample.prompt_formats import PROMPT_FORMATS, request_messages

# Extra `vllm.LLM` arguments for this machine as JSON, merged last: e.g. the CPU test environment's
# {"dtype": "bfloat16", "enforce_eager": true, "distributed_executor_backend": "uni"}. GPU hosts need none.
VLLM_ENGINE_ARGS_ENV = "COSMOS_UPSAMPLE_VLLM_ENGINE_ARGS"


class TokenizerMismatch(RuntimeError):
    """The engine counts the first prompt differently from the plan: every hint was sized with the wrong numbers."""


class BackendMissing(RuntimeError):
    """This interpreter (worker_python, or the worker image's) cannot import the backend's library."""

    def __init__(self, backend: str, package: str, error: ImportError) -> None:
        super().__init__(
            f"backend {backend} needs {package}, which this interpreter ({sys.executable}) cannot import ({error}); "
            "install it there, or point the worker_python setting (runner local) or worker_image (runner docker) at "
            "one that has it; nothing was sent to the model")


def build_conversation(item: JobItem, job: Job, job_dir: Path) -> list[dict[str, Any]]:
    """One user turn in the job's prompt format (for the Cosmos upsampler: the frames, then the raw prompt), after
    the format's system turn if it has one."""
    return request_messages(job.prompt_format, item.text, (job_dir / frame for frame in item.frames))


def engine_arguments(job: Job, environ: dict[str, str] | os._Environ = os.environ) -> dict[str, Any]:
    """`vllm.LLM` arguments as NVIDIA builds the Cosmos upsampler's engine (cosmos-transfer1,
    `auxiliary/upsampler/model/upsampler.py`: tokenizer_mode="mistral", max_model_len=4096,
    limit_mm_per_prompt={"image": 2}, enable_prefix_caching=True), with the deployment's engine settings from the
    manifest (upstream's gpu_memory_utilization=0.98 and max_num_seqs=2 are for one interactive prompt; a batch job
    takes the run's settings) and this machine's extras last."""
    frames = max((len(item.frames) for item in job.items), default=1)
    arguments: dict[str, Any] = {
        "model": job.model,
        "tokenizer_mode": "mistral",
        "max_model_len": job.max_model_len,
        "limit_mm_per_prompt": {"image": max(1, frames)},
    }
    if job.response_schema:
        # Structured answers never padded with whitespace: the JSON grammar otherwise lets a model fill its whole
        # answer with blanks (measured with the tiny model), as README advises for `vllm serve` too.
        arguments["structured_outputs_config"] = {"backend": "xgrammar", "disable_any_whitespace": True}
    arguments.update({name: value for name, value in job.engine.items() if value is not None})
    arguments.update(json.loads(environ.get(VLLM_ENGINE_ARGS_ENV) or "{}"))
    return arguments


def sampling_arguments(job: Job, item: JobItem, attempt: int = 1) -> dict[str, Any]:
    """Upstream samples with SamplingParams(temperature=0.6, max_tokens=300); the job carries the resolved values.
    A re-ask samples with a new seed (jobformat.attempt_seed)."""
    chosen = {name: job.sampling.get(name) for name in ("temperature", "top_p", "repetition_penalty", "top_k")}
    chosen["seed"] = attempt_seed(job.sampling.get("seed"), attempt)
    return {"max_tokens": item.max_tokens or job.max_output_tokens,
            **{name: value for name, value in chosen.items() if value is not None}}


class LlamaCppBackend:
    """A small local text model; llama-cpp-python has no batched chat, so prompts go one after another."""

    frames_sent = False

    def __init__(self, job: Job) -> None:
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise BackendMissing("llama_cpp", "llama-cpp-python (requirements-local-model.txt)", exc) from None

        self._llm = Llama(
            model_path=job.model,
            n_ctx=job.max_model_len,
            n_threads=max(1, os.cpu_count() or 1),
            seed=int(job.sampling.get("seed") or 0),
            verbose=False,
        )
        self._job = job

    def answers(self, requests: deque[Request], job_dir: Path) -> Iterator[tuple[Request, Answer]]:
        """Answers the queue in order; a re-ask the caller appends while it holds an answer is asked in turn."""
        while requests:
            request = requests.popleft()
            arguments = sampling_arguments(self._job, request.item, request.attempt)
            if "repetition_penalty" in arguments:
                arguments["repeat_penalty"] = arguments.pop("repetition_penalty")
            if self._job.response_schema:  # llama.cpp's grammar-constrained JSON
                arguments["response_format"] = {"type": "json_object", "schema": self._job.response_schema}
            try:
                response = self._llm.create_chat_completion(
                    messages=PROMPT_FORMATS[self._job.prompt_format].chat_messages(request.item.text), **arguments)
            except ValueError as exc:  # llama.cpp raises ValueError when the prompt exceeds n_ctx
                yield request, Answer(error=f"model refused the prompt: {exc}")
                continue
            usage, choice = response.get("usage", {}), response["choices"][0]
            yield request, Answer(choice["message"]["content"] or "", usage.get("prompt_tokens"),
                                  usage.get("completion_tokens"), finish_reason=choice.get("finish_reason"))


class VllmBackend:
    """The Pixtral family through vLLM's engine: each item is its own request (id = item key), measured by the
    engine's own preprocessing before it is submitted, and each answer is handed on the moment it finishes.

    Not `LLM.chat` over the whole job: that returns nothing until every answer exists, and on vLLM 0.11 a request
    rejected mid-call leaves the earlier ones queued, to come back with the next call's answers (vLLM issue 26081).
    The pieces are `LLM.chat`'s own, used one request at a time (vLLM 0.32, `vllm/entrypoints/common/offline.py`):
    `_preprocess_chat` renders with `renderer.render_chat`, `_add_request` calls `llm_engine.add_request`, and
    `_run_engine` drains `llm_engine.step()` keeping the finished outputs.
    """

    frames_sent = True

    def __init__(self, job: Job) -> None:
        # vLLM forks worker processes; CUDA needs them spawned, and this must be set before vllm is imported.
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        try:
            from vllm import LLM
        except ImportError as exc:
            raise BackendMissing("vllm", "vLLM", exc) from None

        self._job = job
        self._llm = LLM(**engine_arguments(job))

    def render(self, conversation: list[dict[str, Any]]) -> Any:
        """The engine's own preprocessing of one chat (Mistral tokenizer, images, placeholders), without the
        engine's length check: the length is measured here and compared with the budget before submitting."""
        import dataclasses

        from vllm.renderers import ChatParams

        renderer = self._llm.renderer
        params = ChatParams(chat_template_kwargs={"add_generation_prompt": True, "tokenize": True})
        unlimited = dataclasses.replace(renderer.default_chat_tok_params, max_total_tokens=None)
        # skip_mm_cache: with vLLM's multimodal processor cache, images of a prompt rendered but never submitted
        # (an overlong item) count as sent, and a later request with the same images fails in the engine.
        _, (prompt,) = renderer.render_chat([conversation], params, unlimited, skip_mm_cache=True)
        return prompt

    @staticmethod
    def prompt_length(prompt: Any) -> int:
        return len(prompt["prompt_token_ids"])

    def _sampling(self, request: Request) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        # A JSON Schema answer, as vLLM's server makes one of a json_schema response_format (vLLM 0.32,
        # `vllm/entrypoints/openai/chat_completion/protocol.py`, `structured_outputs_from_response_format`).
        structured = ({"structured_outputs": StructuredOutputsParams(json=self._job.response_schema)}
                      if self._job.response_schema else {})
        return SamplingParams(**sampling_arguments(self._job, request.item, request.attempt), **structured,
                              output_kind=RequestOutputKind.FINAL_ONLY)

    def _submit(self, request: Request, job_dir: Path, check: bool) -> Answer | None:
        """Measure and hand one request to the engine; an Answer with the error when it is not sent."""
        from vllm.exceptions import VLLMError

        item = request.item
        prompt = self.render(build_conversation(item, self._job, job_dir))
        length = self.prompt_length(prompt)
        if check:
            check_plan(self._job, item, length)
        answer_tokens = item.max_tokens or self._job.max_output_tokens
        budget = self._job.max_model_len - answer_tokens
        if length > budget:
            return Answer(prompt_tokens=length, error=(
                f"prompt is {length} tokens by the engine's count, over the budget of {budget} (max_model_len "
                f"{self._job.max_model_len} - {answer_tokens} answer tokens); not sent to the model"))
        try:
            self._llm.llm_engine.add_request(request.id, prompt, self._sampling(request))
        except (ValueError, VLLMError) as exc:  # refused (nothing is queued): this item fails, the rest go on
            return Answer(prompt_tokens=length, error=f"the engine refused the request: {exc}")
        return None

    def answers(self, requests: deque[Request], job_dir: Path) -> Iterator[tuple[Request, Answer]]:
        """Every queued request goes to the engine at once; a re-ask the caller appends while it holds an answer
        joins the running batch at the next engine step. The first request's length is checked against the plan."""
        engine, pending, first = self._llm.llm_engine, {}, True
        while True:
            while requests:
                request = requests.popleft()
                refused, first = self._submit(request, job_dir, check=first), False
                if refused:
                    yield request, refused
                else:
                    pending[request.id] = request
            if not engine.has_unfinished_requests():
                return
            for output in engine.step():
                if output.finished:
                    completion = output.outputs[0]
                    yield pending.pop(output.request_id), Answer(
                        completion.text, len(output.prompt_token_ids or ()), len(completion.token_ids),
                        finish_reason=completion.finish_reason)


def check_plan(job: Job, item: JobItem, engine_tokens: int) -> None:
    if item.planned_tokens is not None and engine_tokens != item.planned_tokens:
        raise TokenizerMismatch(
            f"the engine counts {engine_tokens} prompt tokens for {item.spec_id}, the plan {item.planned_tokens}: "
            f"the planner's tokenizer ({job.planner_tokenizer or 'unknown'}) is not the model's ({job.model}), so "
            "every hint size would be wrong. Point the `tokenizer` setting at the model folder's tekken.json and "
            "re-run; nothing was sent to the model"
        )


BACKENDS = {"llama_cpp": LlamaCppBackend, "vllm": VllmBackend}


def _eta(done: int, total: int, elapsed: float) -> str:
    if not done:
        return "?"
    return f"{elapsed / done * (total - done):.0f}s"


def run_job(job_dir: Path, backend_factory: Callable[[Job], Any] | None = None, gpu_lock: Path | None = None) -> int:
    """Do the job's unfinished items; one worker per job at a time, so no item is ever paid twice."""
    with job_lock(job_dir) as got_it:
        if not got_it:
            print(f"job folder {job_dir} is held by another worker; try again when it has stopped", file=sys.stderr)
            return EXIT_JOB_BUSY
        return _run_locked(job_dir, backend_factory, gpu_lock)


@contextlib.contextmanager
def holding_gpu(gpu_lock: Path | None) -> Iterator[None]:
    """One model on a GPU at a time: jobs for the same GPUs wait here rather than run out of GPU memory."""
    if gpu_lock is None:
        print(f"{GPU_HELD_PREFIX} (none given)", flush=True)
        yield
        return
    with flocked(gpu_lock, on_wait=lambda: print(f"waiting for the GPU: another job holds {gpu_lock}", flush=True)):
        print(f"{GPU_HELD_PREFIX} {gpu_lock}", flush=True)
        yield


def _run_locked(job_dir: Path, backend_factory: Callable[[Job], Any] | None, gpu_lock: Path | None) -> int:
    job = Job.read(job_dir)
    ledger = Ledger.of(job_dir)
    todo = requests_to_do(job, ledger)
    print(f"job {job.job_key}: {len(job.items)} items, {len(job.items) - len(todo)} already done, {len(todo)} to do")
    if not todo:
        return 0
    with holding_gpu(gpu_lock):
        try:
            return _answer(job, todo, ledger, job_dir, backend_factory)
        except (TokenizerMismatch, BackendMissing) as exc:
            print(f"{REFUSAL_PREFIX} {job.job_key}: {exc}", file=sys.stderr, flush=True)
            return EXIT_REFUSED


def _answer(job: Job, todo: list[Request], ledger: Ledger, job_dir: Path,
            backend_factory: Callable[[Job], Any] | None) -> int:
    started = time.monotonic()
    backend = (backend_factory or BACKENDS[job.backend])(job)
    print(f"model {job.model} ({job.backend}) loaded in {time.monotonic() - started:.1f}s", flush=True)
    die_after = int(os.environ.get(DIE_AFTER_ENV, "0") or 0)
    answer_delay = float(os.environ.get(ANSWER_DELAY_ENV, "0") or 0)
    queue = deque(todo)
    run_id, begun, asked = uuid.uuid4().hex[:12], time.monotonic(), len(todo)
    last, tally = begun, {"pass": 0, "flagged": 0, "failed": 0, "re-asked": 0}
    for done, (request, answer) in enumerate(backend.answers(queue, job_dir), start=1):
        now = time.monotonic()
        entry, again = record_attempt(job, ledger, request, answer, now - last, run_id, backend.frames_sent)
        last = now
        if again:
            queue.append(again)  # a new seed, in this engine: no second model load
            asked += 1
            tally["re-asked"] += 1
        else:
            tally[entry["verdict"] or "failed"] += 1
        print(f"[{done}/{asked}] {request.item.spec_id}: {outcome(entry)}, ETA {_eta(done, asked, now - begun)}",
              flush=True)
        if die_after and done >= die_after:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(answer_delay)
    print(f"job {job.job_key} finished in {time.monotonic() - begun:.1f}s: {tally['pass']} passed, "
          f"{tally['flagged']} flagged, {tally['failed']} failed, {tally['re-asked']} answers asked again")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job-dir", type=Path, required=True, help="folder holding manifest.json")
    parser.add_argument("--gpu-lock", type=Path, help="a file every job on these GPUs locks while its model runs")
    args = parser.parse_args(argv)
    return run_job(args.job_dir, gpu_lock=args.gpu_lock)


if __name__ == "__main__":
    sys.exit(main())
