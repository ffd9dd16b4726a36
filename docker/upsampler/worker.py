"""The upsampling worker: one model load, every prompt of one job, each result checkpointed at once.

Runs as a subprocess of the Airflow worker (runner `local`) or as the entry point of the GPU image (runner
`docker`). It needs only the standard library plus its backend (llama-cpp-python or vLLM), never Airflow.

    python worker.py --job-dir DIR

DIR holds `manifest.json` (written by the DAG's batch task) and receives `ledger.jsonl`: one JSON line per model
call, appended and fsynced the moment the answer exists. On start the worker skips every item the ledger already
holds as `ok`, so a killed or retried job redoes only what is unfinished.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import json
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LEDGER_NAME = "ledger.jsonl"
# Held (flock) by the worker running the job; the DAG side checks it too before reusing the job's answers.
LOCK_NAME = ".lock"
MANIFEST_NAME = "manifest.json"
# Fault injection for the test suite: the worker SIGKILLs itself after this many new results.
DIE_AFTER_ENV = "COSMOS_UPSAMPLE_WORKER_DIE_AFTER"

# vLLM words its context-length error differently across versions; both forms fail only the offending item.
CONTEXT_ERROR_PATTERNS = (
    re.compile(r"Prompt length of \d+ is longer than the maximum model length", re.IGNORECASE),
    re.compile(r"The prompt \(total length \d+\) is too long to fit into the model", re.IGNORECASE),
)


@dataclass(frozen=True)
class JobItem:
    key: str
    spec_id: str
    text: str
    frames: tuple[str, ...] = ()


@dataclass(frozen=True)
class Job:
    job_key: str
    backend: str
    model: str
    max_model_len: int
    max_output_tokens: int
    sampling: dict[str, Any] = field(default_factory=dict)
    items: tuple[JobItem, ...] = ()

    @classmethod
    def from_manifest(cls, data: dict[str, Any]) -> Job:
        items = tuple(
            JobItem(item["key"], item["spec_id"], item["text"], tuple(item.get("frames", ()))) for item in data["items"]
        )
        fields = {name: data[name] for name in ("job_key", "backend", "model", "max_model_len", "max_output_tokens")}
        return cls(**fields, sampling=dict(data.get("sampling", {})), items=items)


@dataclass(frozen=True)
class Answer:
    text: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None


class Ledger:
    """Append-only JSON lines; a torn last line (the process died mid-write) is ignored."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def entries(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        entries = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return entries

    def finished_keys(self) -> set[str]:
        return {entry["key"] for entry in self.entries() if entry.get("status") == "ok"}

    def append(self, entry: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def is_context_error(message: str) -> bool:
    return any(pattern.search(message) for pattern in CONTEXT_ERROR_PATTERNS)


def image_data_url(path: Path) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def build_vllm_conversation(item: JobItem, job_dir: Path) -> list[dict[str, Any]]:
    """One user turn: the text, then each hint frame, in the order the DAG counted them."""
    content: list[dict[str, Any]] = [{"type": "text", "text": item.text}]
    for frame in item.frames:
        content.append({"type": "image_url", "image_url": {"url": image_data_url(job_dir / frame)}})
    return [{"role": "user", "content": content}]


def chat_isolating_context_errors(
    chat: Callable[[list[Any]], list[Answer]], conversations: Sequence[Any]
) -> list[Answer]:
    """One call for all; if the engine refuses the batch for one overlong prompt, retry one by one."""
    try:
        return chat(list(conversations))
    except ValueError as exc:
        if not is_context_error(str(exc)):
            raise
    answers = []
    for conversation in conversations:
        try:
            answers.extend(chat([conversation]))
        except ValueError as exc:
            if not is_context_error(str(exc)):
                raise
            answers.append(Answer(error=f"prompt too long for the model's context: {exc}"))
    return answers


class LlamaCppBackend:
    """A small local text model; llama-cpp-python has no batched chat, so prompts go one after another."""

    frames_sent = False

    def __init__(self, job: Job) -> None:
        from llama_cpp import Llama

        self._llm = Llama(
            model_path=job.model,
            n_ctx=job.max_model_len,
            n_threads=max(1, os.cpu_count() or 1),
            seed=int(job.sampling.get("seed", 0)),
            verbose=False,
        )
        self._job = job

    def answers(self, items: Sequence[JobItem], job_dir: Path) -> Iterator[tuple[JobItem, Answer]]:
        sampling = self._job.sampling
        for item in items:
            try:
                response = self._llm.create_chat_completion(
                    messages=[{"role": "user", "content": item.text}],
                    max_tokens=self._job.max_output_tokens,
                    temperature=float(sampling.get("temperature", 0.2)),
                    top_p=float(sampling.get("top_p", 0.9)),
                    repeat_penalty=float(sampling.get("repetition_penalty", 1.3)),
                    seed=int(sampling.get("seed", 0)),
                )
            except ValueError as exc:  # llama.cpp raises ValueError when the prompt exceeds n_ctx
                yield item, Answer(error=f"model refused the prompt: {exc}")
                continue
            usage = response.get("usage", {})
            text = response["choices"][0]["message"]["content"] or ""
            yield item, Answer(text.strip(), usage.get("prompt_tokens"), usage.get("completion_tokens"))


class VllmBackend:
    """The Pixtral family through vLLM: all conversations of the job in one `LLM.chat` call."""

    frames_sent = True

    def __init__(self, job: Job) -> None:
        # vLLM forks worker processes; CUDA needs them spawned, and this must be set before vllm is imported.
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        from vllm import LLM, SamplingParams

        frames = max((len(item.frames) for item in job.items), default=1)
        self._llm = LLM(
            model=job.model,
            tokenizer_mode="mistral",
            max_model_len=job.max_model_len,
            limit_mm_per_prompt={"image": max(1, frames)},
            seed=int(job.sampling.get("seed", 0)),
        )
        self._params = SamplingParams(
            max_tokens=job.max_output_tokens,
            temperature=float(job.sampling.get("temperature", 0.2)),
            top_p=float(job.sampling.get("top_p", 0.9)),
            repetition_penalty=float(job.sampling.get("repetition_penalty", 1.0)),
            seed=int(job.sampling.get("seed", 0)),
        )

    def _chat(self, conversations: list[Any]) -> list[Answer]:
        outputs = self._llm.chat(conversations, self._params, use_tqdm=False)
        return [
            Answer(out.outputs[0].text.strip(), len(out.prompt_token_ids or ()), len(out.outputs[0].token_ids))
            for out in outputs
        ]

    def answers(self, items: Sequence[JobItem], job_dir: Path) -> Iterator[tuple[JobItem, Answer]]:
        conversations = [build_vllm_conversation(item, job_dir) for item in items]
        yield from zip(items, chat_isolating_context_errors(self._chat, conversations), strict=True)


BACKENDS = {"llama_cpp": LlamaCppBackend, "vllm": VllmBackend}


def ledger_entry(job: Job, item: JobItem, answer: Answer, seconds: float, run_id: str, frames_sent: bool) -> dict:
    entry = {
        "key": item.key,
        "spec_id": item.spec_id,
        "status": "failed" if answer.error or not answer.text else "ok",
        "text": answer.text,
        "reason": answer.error or ("the model returned an empty answer" if not answer.text else None),
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "backend": job.backend,
        "model": job.model,
        "frames_sent": len(item.frames) if frames_sent else 0,
        "seconds": round(seconds, 3),
        "finished_at": time.time(),
        "worker_run": run_id,
    }
    return entry


def _eta(done: int, total: int, elapsed: float) -> str:
    if not done:
        return "?"
    return f"{elapsed / done * (total - done):.0f}s"


# Exit status when another worker still holds the job (e.g. the previous attempt's process has not died yet).
EXIT_JOB_BUSY = 75


def run_job(job_dir: Path, backend_factory: Callable[[Job], Any] | None = None, gpu_lock: Path | None = None) -> int:
    """Do the job's unfinished items; one worker per job at a time, so no item is ever paid twice."""
    with (job_dir / LOCK_NAME).open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"job folder {job_dir} is held by another worker; try again when it has stopped", file=sys.stderr)
            return EXIT_JOB_BUSY
        return _run_locked(job_dir, backend_factory, gpu_lock)


@contextlib.contextmanager
def holding_gpu(gpu_lock: Path | None) -> Iterator[None]:
    """One model on a GPU at a time: jobs for the same host wait here rather than run out of GPU memory."""
    if gpu_lock is None:
        yield
        return
    with gpu_lock.open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for the GPU: another job holds {gpu_lock}", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _run_locked(job_dir: Path, backend_factory: Callable[[Job], Any] | None, gpu_lock: Path | None) -> int:
    job = Job.from_manifest(json.loads((job_dir / MANIFEST_NAME).read_text(encoding="utf-8")))
    ledger = Ledger(job_dir / LEDGER_NAME)
    finished = ledger.finished_keys()
    todo = [item for item in job.items if item.key not in finished]
    print(f"job {job.job_key}: {len(job.items)} items, {len(job.items) - len(todo)} already done, {len(todo)} to do")
    if not todo:
        return 0
    with holding_gpu(gpu_lock):
        return _answer(job, todo, ledger, job_dir, backend_factory)


def _answer(job: Job, todo: list[JobItem], ledger: Ledger, job_dir: Path,
            backend_factory: Callable[[Job], Any] | None) -> int:
    started = time.monotonic()
    backend = (backend_factory or BACKENDS[job.backend])(job)
    print(f"model {job.model} ({job.backend}) loaded in {time.monotonic() - started:.1f}s", flush=True)
    die_after = int(os.environ.get(DIE_AFTER_ENV, "0") or 0)
    run_id, failed, begun = uuid.uuid4().hex[:12], 0, time.monotonic()
    last = begun
    for done, (item, answer) in enumerate(backend.answers(todo, job_dir), start=1):
        now = time.monotonic()
        entry = ledger_entry(job, item, answer, now - last, run_id, backend.frames_sent)
        ledger.append(entry)
        last = now
        failed += entry["status"] != "ok"
        print(f"[{done}/{len(todo)}] {item.spec_id}: {entry['status']}, ETA {_eta(done, len(todo), now - begun)}",
              flush=True)
        if die_after and done >= die_after:
            os.kill(os.getpid(), signal.SIGKILL)
    print(f"job {job.job_key} finished: {len(todo) - failed} ok, {failed} failed in {time.monotonic() - begun:.1f}s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job-dir", type=Path, required=True, help="folder holding manifest.json")
    parser.add_argument("--gpu-lock", type=Path, help="a file every job on this machine locks while its model runs")
    args = parser.parse_args(argv)
    return run_job(args.job_dir, gpu_lock=args.gpu_lock)


if __name__ == "__main__":
    sys.exit(main())
