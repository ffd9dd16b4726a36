"""Model jobs (one per chunk of the DAG's mapped task group): pure functions over lists, and the job batch hands to
its upsample task (PlannedJob)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict

from include.cosmos_upsample.gpu_slots import GpuSlot

T = TypeVar("T")

# Airflow's default [core] max_map_length: an upstream list longer than this fails the mapping.
MAX_MAP_LENGTH = 1024


def split_evenly(items: Sequence[T], count: int) -> list[list[T]]:
    """Exactly `count` chunks (fewer only when there are fewer items), sizes within one of each other."""
    count = min(count, len(items))
    if count <= 0:
        return []
    base, extra = divmod(len(items), count)
    chunks, start = [], 0
    for index in range(count):
        size = base + (1 if index < extra else 0)
        chunks.append(list(items[start : start + size]))
        start += size
    return chunks


@dataclass(frozen=True)
class JobPlan:
    job_key: str
    conn_id: str | None
    item_keys: tuple[str, ...]
    slot: int | None = None  # the planned slot's index on its host (see gpu_slots); None for the local runner


class PlannedJob(BaseModel):
    """The model job batch made of one chunk, as its upsample task gets it: through XCom as
    `model_dump(mode="json")` (XCom stays JSON), validated once where a task takes it in; also the `job` of the
    chunk's plan file. No `job_key` (and no `job_dir`) when the chunk has nothing to send to a model."""

    model_config = ConfigDict(frozen=True)

    job_key: str | None
    job_dir: Path | None  # the local job folder (manifest, ledger) under work_dir
    conn_id: str | None  # the GPU host's SSH connection (runner docker); None for the other runners
    slot: int | None = None  # the planned slot's index on that host (see gpu_slots)
    devices: tuple[str, ...] | None = None  # its device ids as planned at discover; None: recorded before they were
    items: int  # how many prompts the job sends


def job_key(item_keys: Sequence[str], settings_fingerprint: str) -> str:
    """Named by content: the same items with the same settings reuse the same job folder and its ledger."""
    digest = hashlib.sha256(settings_fingerprint.encode())
    for key in sorted(item_keys):
        digest.update(key.encode())
    return digest.hexdigest()[:20]


def job_count(items: int, batch_max_items: int, slots: int) -> int:
    """The fewest jobs of at most batch_max_items, raised to the slot count while there are items to fill them.

    Jobs shrink below batch_max_items only to keep slots busy, never into more jobs than slots, so every model
    load beyond the minimum runs on a GPU that would otherwise sit idle.
    """
    if items <= 0:
        return 0
    return max(math.ceil(items / batch_max_items), min(max(slots, 1), items))


def plan_jobs(
    item_keys: Sequence[str], batch_max_items: int, slots: Sequence[GpuSlot], settings_fingerprint: str,
    pinned: Sequence[JobPlan] = (),
) -> list[JobPlan]:
    """Pack items into jobs (see job_count), assigned round-robin over the slots of all hosts.

    `pinned` are jobs whose container still runs (a killed task's): kept as they are, never split or doubled;
    their items are left out of the new jobs, and the new jobs start on the slots after theirs.
    """
    taken = {key for plan in pinned for key in plan.item_keys}
    keys = sorted(key for key in item_keys if key not in taken)
    places: list[tuple[str | None, int | None]] = [(slot.conn_id, slot.index) for slot in slots] or [(None, None)]
    count = job_count(len(keys), batch_max_items, len(places) - len(pinned))  # a running job holds its slot
    jobs = list(pinned)
    for index, chunk in enumerate(split_evenly(keys, min(count, MAX_MAP_LENGTH))):
        conn_id, slot = places[(len(pinned) + index) % len(places)]
        jobs.append(JobPlan(job_key(chunk, settings_fingerprint), conn_id, tuple(chunk), slot))
    return jobs
