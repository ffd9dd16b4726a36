"""The model job format, owned here for every side that touches a job folder: the DAG's batch, merge and remote
staging, the worker (locally or inside the GPU image) and the UI plugin. Standard library only: the worker image
copies this file beside the worker.

A job folder holds:

    manifest.json   the job: model, engine settings, sampling, prompt format, and the items (written by batch)
    ledger.jsonl    one JSON line per finished request, appended and fsynced the moment the answer exists
    .lock           flock-ed by the worker running the job, so two workers never pay for the same items
    last_error.txt  why the job's last attempt failed (DAG side), for the items' `failed` reasons

Each item is one engine request whose id is the item key, so an answer is tied to its item by id, never by position.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
LEDGER_NAME = "ledger.jsonl"
LOCK_NAME = ".lock"
LAST_ERROR_NAME = "last_error.txt"
# A file every job on one machine (or one GPU slot) locks while its model is loaded.
GPU_LOCK_NAME = ".gpu.lock"
# The worker's exit status when another worker still holds the job (e.g. the previous attempt has not died yet).
EXIT_JOB_BUSY = 75
# The worker's exit status when the engine counts prompts differently from the plan: every hint size would be wrong.
EXIT_TOKENIZER_MISMATCH = 78
# How the worker's last line of output begins when it refuses a job for that reason (the runners quote that line).
REFUSAL_PREFIX = "refusing job"
# Fault injection for the test suite: the worker SIGKILLs itself after this many new results.
DIE_AFTER_ENV = "COSMOS_UPSAMPLE_WORKER_DIE_AFTER"


@dataclass(frozen=True)
class JobItem:
    key: str  # the item key: also the engine request id and the ledger key
    spec_id: str
    text: str  # the user turn's text, exactly as counted (prompt_formats.PromptFormat.user_text)
    frames: tuple[str, ...] = ()  # hint frame files, relative to the job folder or absolute
    planned_tokens: int | None = None  # the planner's exact prompt count, checked against the engine's
    max_tokens: int | None = None  # None: the job's max_output_tokens


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

    @classmethod
    def from_manifest(cls, data: dict[str, Any]) -> Job:
        items = tuple(
            JobItem(item["key"], item["spec_id"], item["text"], tuple(item.get("frames", ())),
                    item.get("planned_tokens"), item.get("max_tokens"))
            for item in data["items"]
        )
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data and name != "items"}
        return cls(**known, items=items)

    def to_manifest(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def read(cls, job_dir: Path) -> Job:
        return cls.from_manifest(json.loads((job_dir / MANIFEST_NAME).read_text(encoding="utf-8")))


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

    def finished_keys(self) -> set[str]:
        return {entry["key"] for entry in self.entries() if entry.get("status") == "ok"}

    def append(self, entry: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


@contextlib.contextmanager
def job_lock(job_dir: Path) -> Iterator[bool]:
    """Hold the job's lock for the block; yields False at once (holding nothing) when another process has it."""
    with (job_dir / LOCK_NAME).open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def worker_holds(job_dir: Path) -> bool:
    """Is a worker running this job right now? (Its lock is held.)"""
    if not (job_dir / LOCK_NAME).exists():
        return False
    with job_lock(job_dir) as got_it:
        return not got_it
