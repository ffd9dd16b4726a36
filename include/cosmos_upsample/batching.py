"""Chunks for mapped validation and model jobs for mapped upsampling: pure functions over lists."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

# Validation chunks: big enough that 1,000 specs make tens of task instances, not thousands.
VALIDATE_CHUNK_SIZE = 50
# Airflow's default [core] max_map_length: an upstream list longer than this fails the mapping.
MAX_MAP_LENGTH = 1024


def chunk_evenly(items: Sequence[T], max_size: int, max_chunks: int = MAX_MAP_LENGTH) -> list[list[T]]:
    """Split into the fewest chunks of at most max_size, sizes within one of each other.

    Past max_chunks the chunks grow instead, so a mapped task never exceeds Airflow's map length.
    """
    if not items:
        return []
    count = min(math.ceil(len(items) / max_size), max_chunks)
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


def job_key(item_keys: Sequence[str], settings_fingerprint: str) -> str:
    """Named by content: the same items with the same settings reuse the same job folder and its ledger."""
    digest = hashlib.sha256(settings_fingerprint.encode())
    for key in sorted(item_keys):
        digest.update(key.encode())
    return digest.hexdigest()[:20]


def plan_jobs(
    item_keys: Sequence[str], batch_max_items: int, conn_ids: Sequence[str], settings_fingerprint: str
) -> list[JobPlan]:
    """Pack items into the fewest jobs of at most batch_max_items (one model load each), round-robin over hosts."""
    hosts: list[str | None] = list(conn_ids) or [None]
    jobs = []
    for index, keys in enumerate(chunk_evenly(sorted(item_keys), batch_max_items)):
        jobs.append(JobPlan(job_key(keys, settings_fingerprint), hosts[index % len(hosts)], tuple(keys)))
    return jobs
