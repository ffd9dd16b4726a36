"""Runs of the DAG found in the metadata DB: DagRuns with the `report` task's `report_location` XCom (pushed before
any too-many-failures error) naming the report file and the `discover` task's `run_dir` XCom naming the run folder.
Where a run's files live is decided at run time (Param, Variable, environment), so the DB is the index."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Collection
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from include.cosmos_upsample.settings import DAG_ID, DISCOVER_TASK_ID, REPORT_TASK_ID, REPORT_XCOM_KEY, RUN_DIR_XCOM_KEY
from upsample_reports.disk_runs import output_dir_of, report_file
from upsample_reports.progress import run_dir_path
from upsample_reports.records import RunRecord, parse_time

OUTPUT_DIRS_REFRESH_SECONDS = 60.0


class DatabaseRuns:
    """DagRuns of the DAG with their `report` location and `discover` run_dir XComs, from the metadata DB; one
    instance lives as long as the app (it remembers the output dirs it has seen)."""

    def __init__(self, session_factory: Callable[[], AbstractContextManager[Any]] | None = None) -> None:
        self._session_factory = session_factory
        self._known_dirs: set[Path] = set()
        self._known_since: dt.datetime | None = None
        self._known_checked = -OUTPUT_DIRS_REFRESH_SECONDS
        self._known_lock = threading.Lock()
        self._times: tuple[tuple[int, int], dict[str, dt.datetime]] | None = None

    def _session(self) -> AbstractContextManager[Any]:
        if self._session_factory is not None:
            return self._session_factory()
        from airflow.utils.session import create_session

        return create_session()

    def run_times(self) -> dict[str, dt.datetime]:
        """Every run's id and when it was due (`run_after`, which never changes): what the run list is ordered by.
        Read again only when runs were added or deleted (their count or newest row changed)."""
        from airflow.models.dagrun import DagRun
        from sqlalchemy import func, select

        of_dag = DagRun.dag_id == DAG_ID
        with self._session() as session:
            version = tuple(session.execute(select(func.count(), func.max(DagRun.id)).where(of_dag)).one())
            if self._times is None or self._times[0] != version:
                times = session.execute(select(DagRun.run_id, DagRun.run_after).where(of_dag))
                self._times = (version, {run_id: parse_time(run_after) for run_id, run_after in times})
        return self._times[1]

    def runs(self, run_ids: Collection[str]) -> list[RunRecord]:
        """These runs (one page of the list) with their report and run folder locations."""
        from airflow.models.dagrun import DagRun
        from sqlalchemy import select

        query = select(DagRun.run_id, DagRun.state, DagRun.start_date, DagRun.end_date, DagRun.run_after).where(
            DagRun.dag_id == DAG_ID, DagRun.run_id.in_(list(run_ids))
        )
        with self._session() as session:
            records = [self._record(row) for row in session.execute(query)]
            self._attach_xcoms(session, records)
        with self._known_lock:
            self._known_dirs.update(output_dir_of(record.report_path) for record in records if record.report_path)
        return records

    def run(self, run_id: str) -> RunRecord | None:
        return next(iter(self.runs([run_id])), None)

    def output_dirs(self) -> set[Path]:
        """The output dirs of the runs' reports, from the `report` XComs: all of them on the first call, then only
        those written since, at most every OUTPUT_DIRS_REFRESH_SECONDS (the dirs of the runs a page shows are added
        at once, see `runs`): they matter for reports whose DB rows are gone, which are old by then."""
        from airflow.models.xcom import XComModel
        from sqlalchemy import select

        query = select(XComModel.value, XComModel.timestamp).where(
            XComModel.dag_id == DAG_ID, XComModel.task_id == REPORT_TASK_ID, XComModel.key == REPORT_XCOM_KEY,
            XComModel.map_index == -1,
        )
        with self._known_lock:
            if time.monotonic() - self._known_checked < OUTPUT_DIRS_REFRESH_SECONDS:
                return set(self._known_dirs)
            self._known_checked = time.monotonic()
            if self._known_since is not None:
                query = query.where(XComModel.timestamp >= self._known_since)
            with self._session() as session:
                for row in session.execute(query):
                    value = XComModel.deserialize_value(row)
                    path = report_file(value.get("report_json")) if isinstance(value, dict) else None
                    if path is not None:
                        self._known_dirs.add(output_dir_of(path))
                    if self._known_since is None or row.timestamp > self._known_since:
                        self._known_since = row.timestamp
            return set(self._known_dirs)

    @staticmethod
    def _record(row: Any) -> RunRecord:
        state = getattr(row.state, "value", row.state)
        return RunRecord(
            run_id=row.run_id,
            state=str(state) if state else None,
            started_at=parse_time(row.start_date or row.run_after),
            finished_at=parse_time(row.end_date),
        )

    @staticmethod
    def _attach_xcoms(session: Any, records: list[RunRecord]) -> None:
        from airflow.models.xcom import XComModel
        from sqlalchemy import and_, or_, select

        by_run = {record.run_id: record for record in records}
        if not by_run:
            return
        query = select(XComModel.run_id, XComModel.task_id, XComModel.key, XComModel.value).where(
            XComModel.dag_id == DAG_ID,
            XComModel.run_id.in_(list(by_run)),
            XComModel.map_index == -1,
            or_(
                and_(XComModel.task_id == REPORT_TASK_ID, XComModel.key == REPORT_XCOM_KEY),
                and_(XComModel.task_id == DISCOVER_TASK_ID, XComModel.key == RUN_DIR_XCOM_KEY),
            ),
        )
        for row in session.execute(query):
            value = XComModel.deserialize_value(row)
            record = by_run[row.run_id]
            if row.task_id == REPORT_TASK_ID and isinstance(value, dict):
                record.report_path = report_file(value.get("report_json"))
            elif row.task_id == DISCOVER_TASK_ID:
                record.run_dir = run_dir_path(value)
