"""The model job format, owned here for every side that touches a job folder: the DAG's batch, merge and remote
staging, the worker (locally or inside the GPU image) and the UI plugin. Standard library only: the worker image
copies this file beside the worker.

A job folder holds:

    manifest.json   the job: model, engine settings, sampling, prompt format, and the items (written by batch)
    ledger.jsonl    one JSON line per finished request (each attempt of an item is one), appended and fsynced the
                    moment the answer exists and has been judged
    .lock           flock-ed by the worker running the job, so two workers never pay for the same items
    last_error.txt  why the job's last attempt failed (DAG side), for the items' `failed` reasons

Each item is one engine request whose id is the item key, so an answer is tied to its item by id, never by position.
A flagged answer is asked again (quality.Policy.retries) as a request of its own, `request_id(key, attempt)`.

Attempts (the per-item bookkeeping every runner shares, so a retried or killed task never asks again for what was
judged): a ledger line with `status` "ok" is one judged answer, with its `attempt` number, `seed`, `verdict` ("pass"
or "flagged"), `failed_checks`, `finish_reason`, the engine's `raw` text and the cleaned `text`. An item is final when
an attempt passed or when `Policy.max_attempts` attempts were flagged; a line with `status` "failed" is no answer
(the engine refused the request) and the item is asked again by the next worker.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from include.cosmos_upsample.answer_schema import compact_answer, schema_check, schema_problem_of
from include.cosmos_upsample.quality import FLAGGED, PASS, STRUCTURED_ANSWERS, Policy, Verdict

MANIFEST_NAME = "manifest.json"
LEDGER_NAME = "ledger.jsonl"
LOCK_NAME = ".lock"
LAST_ERROR_NAME = "last_error.txt"
# A file every job on one machine (or one GPU slot) locks while its model is loaded.
GPU_LOCK_NAME = ".gpu.lock"
# The worker's exit status when another worker still holds the job (e.g. the previous attempt has not died yet).
EXIT_JOB_BUSY = 75
# The worker's exit status when it refuses a job that only a person can fix (a retry would be refused again): the
# engine counts prompts differently from the plan (every hint size would be wrong), or the interpreter or image
# lacks the backend's library.
EXIT_REFUSED = 78
EXIT_TOKENIZER_MISMATCH = EXIT_REFUSED
# How the worker's last line of output begins when it refuses a job (the runners quote that line: it names the fix).
REFUSAL_PREFIX = "refusing job"
# What the worker prints once it holds its GPU (slot) lock: the runners' stall watchdog starts counting from there,
# never while a job waits for another job's GPU.
GPU_HELD_PREFIX = "holding the GPU lock"
# Fault injection for the test suite: the worker SIGKILLs itself after this many new results.
DIE_AFTER_ENV = "COSMOS_UPSAMPLE_WORKER_DIE_AFTER"
# Fault injection for the test suite: the worker waits this many seconds after each answer (a slow model).
ANSWER_DELAY_ENV = "COSMOS_UPSAMPLE_WORKER_ANSWER_DELAY_SECONDS"


@dataclass(frozen=True)
class JobItem:
    key: str  # the item key: also the engine request id and the ledger key
    spec_id: str
    text: str  # the user turn's text, exactly as counted (prompt_formats.PromptFormat.user_text)
    frames: tuple[str, ...] = ()  # hint frame files, relative to the job folder or absolute
    planned_tokens: int | None = None  # the planner's exact prompt count, checked against the engine's
    max_tokens: int | None = None  # None: the job's max_output_tokens
    prompt: str | None = None  # the user's own prompt, for the quality checks (None: `text`)
    max_attempts: int | None = None  # None: the job's quality policy; more for an item re-asked by retry_flagged


@dataclass(frozen=True)
class Job:
    job_key: str
    backend: str
    model: str
    max_model_len: int
    max_output_tokens: int
    prompt_format: str = "instruction"
    sampling: dict[str, Any] = field(default_factory=dict)
    # vLLM engine settings (tensor_parallel_size, gpu_memory_utilization, ...), recorded with the job.
    engine: dict[str, Any] = field(default_factory=dict)
    # Which tokenizer planned the counts, named in the worker's error when the engine disagrees.
    planner_tokenizer: str = ""
    items: tuple[JobItem, ...] = ()
    # The answer's JSON Schema (cosmos3_structured, a team's response_schema): the request's response_format.
    response_schema: dict[str, Any] | None = None
    # How answers are judged (quality.Policy.to_manifest): thresholds, re-asks and blocklist words travel with the
    # job, because a container cannot read the Airflow side's settings or blocklist file.
    quality: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_manifest(cls, data: dict[str, Any]) -> Job:
        items = tuple(
            JobItem(item["key"], item["spec_id"], item["text"], tuple(item.get("frames", ())),
                    item.get("planned_tokens"), item.get("max_tokens"), item.get("prompt"), item.get("max_attempts"))
            for item in data["items"]
        )
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data and name != "items"}
        return cls(**known, items=items)

    def to_manifest(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def read(cls, job_dir: Path) -> Job:
        return cls.from_manifest(json.loads((job_dir / MANIFEST_NAME).read_text(encoding="utf-8")))

    def policy(self) -> Policy:
        """The job's quality policy; a structured answer (a response schema) gets the checks of a JSON answer."""
        return Policy.from_manifest(self.quality, STRUCTURED_ANSWERS if self.response_schema else self.prompt_format)

    def judge(self, item: JobItem, text: str, finish_reason: str | None) -> Verdict:
        """The quality gate's verdict on one answer to `item`, as every runner judges it. A structured job's answer
        must also be ONE JSON object valid against the job's schema (check `schema`, answer_schema.py); one that is
        keeps its compact JSON as the text to store."""
        prompt = item.prompt or item.text
        if not self.response_schema:
            return self.policy().judge(prompt, text, finish_reason)
        verdict = self.policy().judge(prompt, text, finish_reason,
                                      extra_checks={"schema": schema_check(self.response_schema)})
        if "schema" in verdict.failed_checks or "empty" in verdict.failed_checks:
            return verdict
        return replace(verdict, text=compact_answer(text))

    def max_attempts(self, item: JobItem) -> int:
        return item.max_attempts or self.policy().max_attempts


def request_id(key: str, attempt: int) -> str:
    """The engine request id of an item's attempt: the item key itself for the first."""
    return key if attempt == 1 else f"{key}.{attempt}"


def attempt_seed(base_seed: int | None, attempt: int) -> int | None:
    """The first attempt samples with the job's seed (None: the engine's own, as upstream); each re-ask with a new
    one, as NVIDIA's Cosmos 3 upsampler re-asks with `seed=i_retry` (cosmos-framework
    cosmos_framework/scripts/upsample_prompts.py)."""
    return base_seed if attempt == 1 else (base_seed or 0) + attempt - 1


def answered_attempts(entries: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Each item's judged answers in ledger order (status "ok"); engine errors are not attempts."""
    attempts: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        if entry.get("status") == "ok":
            attempts.setdefault(entry["key"], []).append(entry)
    return attempts


def final_attempt(attempts: list[dict[str, Any]], max_attempts: int) -> dict[str, Any] | None:
    """The attempt that settles an item: the first that passed, or, once `max_attempts` were flagged, the last.
    None while the item may still be asked again."""
    for entry in attempts:
        if entry.get("verdict") == PASS:
            return entry
    flagged = [entry for entry in attempts if entry.get("verdict") == FLAGGED]
    return flagged[-1] if flagged and len(flagged) >= max_attempts else None


def next_attempt(attempts: list[dict[str, Any]], max_attempts: int) -> int | None:
    """The number of an item's next attempt, or None when it is final."""
    if final_attempt(attempts, max_attempts) is not None:
        return None
    return len(attempts) + 1


@dataclass(frozen=True)
class Answer:
    """What the model (local engine or inference service) returned for one request."""

    text: str = ""  # as the engine wrote it (Job.judge cleans it)
    prompt_tokens: int | None = None  # the engine's own count of the prompt
    completion_tokens: int | None = None
    error: str | None = None  # no answer: why (the request was refused, not sent, ...)
    finish_reason: str | None = None  # the engine's: "stop", "length", ...


@dataclass(frozen=True)
class Request:
    """One attempt at one item: the engine request `request_id(item.key, attempt)`."""

    item: JobItem
    attempt: int = 1

    @property
    def id(self) -> str:
        return request_id(self.item.key, self.attempt)

    def again(self) -> Request:
        return Request(self.item, self.attempt + 1)


def requests_to_do(job: Job, ledger: Ledger) -> list[Request]:
    """Each item that is not final, at its next attempt: what a killed worker or task left is continued, never
    repeated."""
    attempts = ledger.attempts(job)
    todo = []
    for item in job.items:
        attempt = next_attempt(attempts.get(item.key, []), job.max_attempts(item))
        if attempt is not None:
            todo.append(Request(item, attempt))
    return todo


def ledger_entry(job: Job, request: Request, answer: Answer, verdict: Verdict | None, seconds: float, run_id: str,
                 frames_sent: bool) -> dict:
    """One attempt, the same shape whichever runner wrote it: `ok` with its verdict when the engine answered (an
    empty answer is judged `empty`), `failed` with the reason when it did not."""
    item = request.item
    return {
        "key": item.key,
        "spec_id": item.spec_id,
        "status": "failed" if answer.error else "ok",
        "attempt": request.attempt,
        "seed": attempt_seed(job.sampling.get("seed"), request.attempt),
        "verdict": verdict.verdict if verdict else None,
        "failed_checks": list(verdict.failed_checks) if verdict else [],
        "finish_reason": answer.finish_reason,
        "raw": answer.text,
        "text": verdict.text if verdict else "",
        "words": verdict.words if verdict else 0,
        "reason": answer.error,
        "prompt_tokens": answer.prompt_tokens,
        "planned_tokens": item.planned_tokens,
        "completion_tokens": answer.completion_tokens,
        "backend": job.backend,
        "model": job.model,
        "frames_sent": len(item.frames) if frames_sent else 0,
        "seconds": round(seconds, 3),
        "finished_at": time.time(),
        "worker_run": run_id,
    }


def record_attempt(job: Job, ledger: Ledger, request: Request, answer: Answer, seconds: float, run_id: str,
                   frames_sent: bool, **extra: Any) -> tuple[dict[str, Any], Request | None]:
    """The gate's bookkeeping of one answer, for every runner: judge it (`Job.judge`), append its ledger line (with
    the runner's `extra` keys), and return the line and the item's next attempt (a new seed) when the answer was
    flagged and the item has attempts left, else None."""
    verdict = None if answer.error else job.judge(request.item, answer.text, answer.finish_reason)
    entry = {**ledger_entry(job, request, answer, verdict, seconds, run_id, frames_sent), **extra}
    if verdict and "schema" in verdict.failed_checks:  # where it breaks the schema, for the review file
        entry["reason"] = f"schema: {schema_problem_of(answer.text, job.response_schema or {})}"
    ledger.append(entry)
    if verdict and not verdict.passed and request.attempt < job.max_attempts(request.item):
        return entry, request.again()
    return entry, None


def outcome(entry: dict[str, Any]) -> str:
    """An attempt's ledger line in a log line's words: 'attempt 2 flagged (schema)', 'failed'."""
    if entry["status"] != "ok":
        return entry["status"]
    checks = f" ({', '.join(entry['failed_checks'])})" if entry["failed_checks"] else ""
    return f"attempt {entry['attempt']} {entry['verdict']}{checks}"


class Ledger:
    """Append-only JSON lines; a torn last line (the process died mid-write) is ignored."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def of(cls, job_dir: Path) -> Ledger:
        return cls(job_dir / LEDGER_NAME)

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

    def attempts(self, job: Job) -> dict[str, list[dict[str, Any]]]:
        """Each item's judged answers (`answered_attempts`). A line written before answers were judged in the worker
        (no `verdict`) is judged here with the job's policy, so it counts as the attempt it was, never as a pass."""
        found = answered_attempts(self.entries())
        items = {item.key: item for item in job.items}
        for key, entries in found.items():
            for number, entry in enumerate(entries, start=1):
                if "verdict" not in entry:
                    verdict = job.judge(items.get(key, JobItem(key, "", "")), entry.get("text") or "", None)
                    entry.update(attempt=number, raw=entry.get("text"), text=verdict.text, words=verdict.words,
                                 verdict=verdict.verdict, failed_checks=list(verdict.failed_checks))
        return found

    def finished_keys(self, job: Job) -> set[str]:
        """The job's items that are final (passed, or flagged after every attempt)."""
        attempts = self.attempts(job)
        return {item.key for item in job.items if final_attempt(attempts.get(item.key, []), job.max_attempts(item))}

    def append(self, entry: dict[str, Any]) -> None:
        self.append_bytes((json.dumps(entry, ensure_ascii=False) + "\n").encode())

    def append_bytes(self, data: bytes) -> None:
        """Whole lines at the end, fsynced before returning: a line counts as done only once it is on disk (also the
        copy of a host ledger's new tail, staging.sync_ledger)."""
        with self.path.open("ab") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())


@contextlib.contextmanager
def flocked(path: Path, wait: bool = True, on_wait: Callable[[], None] | None = None) -> Iterator[bool]:
    """Hold an exclusive `flock` on `path` (created if missing) for the block: the one place this code locks a file
    (job locks, GPU slot locks, video cache entries). When another process holds it: with `wait`, call `on_wait` (to
    say so) and block until it is free; without, yield False at once, holding nothing."""
    with path.open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                yield False
                return
            if on_wait is not None:
                on_wait()
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield True


def job_lock(job_dir: Path) -> contextlib.AbstractContextManager[bool]:
    """Hold the job's lock for the block; yields False at once (holding nothing) when another process has it."""
    return flocked(job_dir / LOCK_NAME, wait=False)


def worker_holds(job_dir: Path) -> bool:
    """Is a worker running this job right now? (Its lock is held.)"""
    if not (job_dir / LOCK_NAME).exists():
        return False
    with job_lock(job_dir) as got_it:
        return not got_it
