"""Live progress of a run that has no report yet: items planned in the run folder's chunk plans, items done in the
jobs' ledgers (`<output_dir>/runs/<run>/{chunks,plans}/chunk-NNNN.json`, `<output_dir>/jobs/<job>/ledger.jsonl`, the
only shapes read)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from include.cosmos_upsample.jobformat import LEDGER_NAME
from include.cosmos_upsample.layout import JOBS, RUNS, RunFolder, read_json
from upsample_reports.records import local_path


@dataclass(frozen=True)
class Progress:
    """How far the model jobs of a run are: items finished (ok or failed) out of the items planned for the GPU."""

    planned: bool
    total: int = 0
    done: int = 0
    failed: int = 0
    jobs: int = 0
    first_finished_at: float | None = None
    last_finished_at: float | None = None

    @property
    def fraction(self) -> float:
        return min(self.done / self.total, 1.0) if self.total else 0.0

    def eta_seconds(self, now: float) -> float | None:
        """Remaining items at the rate seen so far (first to last finished item); None until there is a rate."""
        if not self.total or self.done >= self.total:
            return 0.0 if self.total else None
        if self.done < 2 or self.first_finished_at is None or self.last_finished_at is None:
            return None
        span = self.last_finished_at - self.first_finished_at
        if span <= 0:
            return None
        rate = (self.done - 1) / span
        since_last = max(now - self.last_finished_at, 0.0)
        return max((self.total - self.done) / rate - since_last, 0.0)

    def as_dict(self, now: float) -> dict[str, Any]:
        return {
            "planned": self.planned,
            "total": self.total,
            "done": self.done,
            "failed": self.failed,
            "jobs": self.jobs,
            "eta_seconds": self.eta_seconds(now),
        }


def _ledger_entries(path: Path) -> Iterator[dict[str, Any]]:
    try:
        handle = path.open(encoding="utf-8")
    except OSError:
        return
    with handle:
        for line in handle:
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # the worker may be half-way through writing the last line
            if isinstance(entry, dict):
                yield entry


def read_progress(run_dir: Path) -> Progress:
    """Done/total from the chunks' job plans and the jobs' ledgers (the last entry per item counts).

    Chunks are batched one by one as their validation ends, while earlier jobs already run: the specs of a chunk
    not batched yet count in the total, so the ETA covers the whole run from the first job on.
    """
    run = RunFolder(run_dir)
    try:
        if not run.job_plans():
            return Progress(planned=False)
        jobs, _answered = run.planned_jobs()
        waiting = sum(len(read_json(chunk)["entries"]) for chunk in run.chunks() if not run.job_plan(chunk).exists())
    except (OSError, ValueError, KeyError, TypeError):
        return Progress(planned=False)
    jobs = [job for job in jobs if isinstance(job, dict)]
    total, done, failed = waiting, 0, 0
    finished: list[float] = []
    for job in jobs:
        items = job.get("items")
        total += items if isinstance(items, int) and items > 0 else 0
        job_dir = local_path(job.get("job_dir"))
        if job_dir is None or job_dir.parent.name != JOBS:
            continue
        last: dict[str, dict[str, Any]] = {}
        for index, entry in enumerate(_ledger_entries(job_dir / LEDGER_NAME)):
            key = entry.get("key") or entry.get("spec_id") or f"line-{index}"
            if last.get(str(key), {}).get("status") != "ok":
                last[str(key)] = entry
        done += len(last)
        failed += sum(1 for entry in last.values() if entry.get("status") == "failed")
        finished += [float(e["finished_at"]) for e in last.values() if isinstance(e.get("finished_at"), int | float)]
    return Progress(
        planned=True,
        total=total,
        done=min(done, total) if total else done,
        failed=failed,
        jobs=len(jobs),
        first_finished_at=min(finished) if finished else None,
        last_finished_at=max(finished) if finished else None,
    )


def run_dir_path(value: Any) -> Path | None:
    """`<output_dir>/runs/<run>`, the only shape of run dir the plugin will read."""
    path = local_path(value)
    return path if path is not None and path.parent.name == RUNS else None
