"""Find run reports and in-progress runs of `cosmos_prompt_upsample`: the DB first (it knows every output dir), then
the report folders on disk; the run list comes a page at a time.

The finders live by concern: `db_runs` (metadata DB), `disk_runs` (report files, typed as `RunReport`), `summaries`
(the report folders indexed by run summaries), `progress` (ledgers of runs without a report), `views` (what the pages
show). Everything here is blocking I/O; the app calls it from sync routes, which FastAPI runs in a threadpool.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from include.cosmos_upsample.settings import DAG_ID
from upsample_reports.db_runs import DatabaseRuns
from upsample_reports.disk_runs import (
    DirectoryRuns,
    configured_output_dirs,
    item_output_file,
    load_report,
    record_of,
    report_file,
)
from upsample_reports.progress import Progress, read_progress, run_dir_path
from upsample_reports.records import ReportNotFound, RunRecord, parse_time
from upsample_reports.summaries import ListedRun, ReportSummaries

__all__ = [
    "DAG_ID", "DatabaseRuns", "DirectoryRuns", "Progress", "ReportNotFound", "RunIndex", "RunPage", "RunRecord",
    "configured_output_dirs", "item_output_file", "load_report", "parse_time", "read_progress", "report_file",
    "run_dir_path",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunPage:
    """One page of the run list, newest first."""

    records: list[RunRecord]
    number: int
    pages: int
    total: int


class RunIndex:
    """The DB first (it knows every output dir), then the report folders; either may be absent or failing.

    A page costs a count of the DAG's runs (their ids and due times are read again only when it changes), the
    summaries of the report folders (kept in memory, see summaries.py), and the DB rows, XComs and summaries of that
    page's runs only. Newest first: by when a run was due (`run_after`), or for a run known only from its report,
    when it started.
    """

    def __init__(self, database: DatabaseRuns | None, directories: DirectoryRuns | None) -> None:
        self._database = database
        self._directories = directories
        self._summaries = directories.summaries if directories else ReportSummaries(load_report)

    @classmethod
    def default(cls) -> RunIndex:
        """The app's index: one per process, so its caches live across requests."""
        return _default_index()

    def page(self, number: int = 1, size: int = 50) -> RunPage:
        due, known_dirs = self._from_database(lambda db: (db.run_times(), db.output_dirs()), ({}, set()))
        on_disk = self._directories.listed(extra_dirs=sorted(known_dirs, key=str)) if self._directories else {}
        order = dict(due)
        for run_id, listed in on_disk.items():  # runs whose DB rows are gone: when their report says they started
            if run_id not in order:
                order[run_id] = listed.started
        ranked = sorted(order, key=lambda run_id: _newest_first(run_id, order[run_id]))
        pages = max(math.ceil(len(ranked) / size), 1)
        number = min(max(number, 1), pages)
        chosen = ranked[(number - 1) * size:number * size]
        from_db = {record.run_id: record for record in self._from_database(
            lambda db: db.runs([run_id for run_id in chosen if run_id in due]), [])}
        records = []
        for run_id in chosen:
            record = from_db.get(run_id)
            if record is None and run_id in on_disk:
                record = record_of(on_disk[run_id])
            elif record is not None:
                self._attach_summary(record, on_disk.get(run_id))
            if record is not None:
                records.append(record)
        return RunPage(records, number, pages, len(ranked))

    def run(self, run_id: str) -> RunRecord:
        record: RunRecord | None = self._from_database(lambda db: db.run(run_id), None)
        if record is not None and record.report_path is not None and record.report_path.is_file():
            return record
        if self._directories is not None:
            known_dirs = self._from_database(lambda db: db.output_dirs(), set())
            scanned = self._directories.run(run_id, extra_dirs=sorted(known_dirs, key=str))
            if scanned is not None:
                if record is None:
                    return scanned
                record.report_path = scanned.report_path
                return record
        if record is None:
            raise ReportNotFound(run_id)
        return record

    def _from_database(self, read: Callable[[DatabaseRuns], Any], fallback: Any) -> Any:
        """A DB read, or `fallback` without a DB or when it fails: the reports on disk still show."""
        if self._database is None:
            return fallback
        try:
            return read(self._database)
        except Exception:
            log.exception("Reading runs of %s from the metadata DB failed", DAG_ID)
            return fallback

    def _attach_summary(self, record: RunRecord, listed: ListedRun | None) -> None:
        """A DB run's report summary: from the folder listing when it names the same file, else read for it."""
        if record.report_path is None and listed is not None:
            record.report_path = listed.report_path  # no report XCom (DB rows cleaned in part): the file on disk
        if record.report_path is None:
            return
        if listed is not None and listed.report_path == record.report_path:
            record.summary = listed.summary
        else:
            record.summary = self._summaries.of(record.report_path)


@functools.cache
def _default_index() -> RunIndex:
    return RunIndex(DatabaseRuns(), DirectoryRuns(configured_output_dirs))


def _newest_first(run_id: str, started: datetime | None) -> tuple[float, str]:
    return (-(started.timestamp() if started else 0.0), run_id)
