"""Runs of the DAG found in the metadata DB: DagRuns with the `report` task's `report_location` XCom (pushed before
any too-many-failures error) naming the report file and the `discover` task's `run_dir` XCom naming the run folder.
Where a run's files live is decided at run time (Param, Variable, environment), so the DB is the index."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from include.cosmos_upsample.settings import DAG_ID, DISCOVER_TASK_ID, REPORT_TASK_ID, REPORT_XCOM_KEY, RUN_DIR_XCOM_KEY
from upsample_reports.disk_runs import report_file
from upsample_reports.progress import run_dir_path
from upsample_reports.records import RunRecord, parse_time


class DatabaseRuns:
    """DagRuns of the DAG with their `report` return value and `discover` run_dir XComs, from the metadata DB."""

    def __init__(self, session_factory: Callable[[], AbstractContextManager[Any]] | None = None) -> None:
        self._session_factory = session_factory

    def _session(self) -> AbstractContextManager[Any]:
        if self._session_factory is not None:
            return self._session_factory()
        from airflow.utils.session import create_session

        return create_session()

    def runs(self, limit: int) -> list[RunRecord]:
        from airflow.models.dagrun import DagRun
        from sqlalchemy import select

        query = (
            select(DagRun.run_id, DagRun.state, DagRun.start_date, DagRun.end_date, DagRun.run_after)
            .where(DagRun.dag_id == DAG_ID)
            .order_by(DagRun.run_after.desc(), DagRun.id.desc())
            .limit(limit)
        )
        with self._session() as session:
            rows = session.execute(query).all()
            records = [self._record(row) for row in rows]
            self._attach_xcoms(session, records)
        return records

    def run(self, run_id: str) -> RunRecord | None:
        from airflow.models.dagrun import DagRun
        from sqlalchemy import select

        query = select(DagRun.run_id, DagRun.state, DagRun.start_date, DagRun.end_date, DagRun.run_after).where(
            DagRun.dag_id == DAG_ID, DagRun.run_id == run_id
        )
        with self._session() as session:
            row = session.execute(query).first()
            if row is None:
                return None
            record = self._record(row)
            self._attach_xcoms(session, [record])
        return record

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
