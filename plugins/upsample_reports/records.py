"""What the run finders share: one run as the UI shows it, and the checks on paths and times read from XCom or files.

Paths read from XCom or a report are only followed when they have the shape the DAG writes (see disk_runs and
progress); nothing from a request is ever joined into a path.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from include.cosmos_upsample.run_summary import RunSummary
from include.cosmos_upsample.settings import DAG_ID
from include.cosmos_upsample.storage import is_remote


class ReportNotFound(LookupError):
    """No report, run dir or DB run is known for this run id."""


@dataclass
class RunRecord:
    """One run as the UI shows it; `state` is the DagRun's when the DB knows the run, else the report's."""

    run_id: str
    dag_id: str = DAG_ID
    state: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    report_path: Path | None = None
    run_dir: Path | None = None
    summary: RunSummary | None = None  # of the report, for the run list (None: no report yet, or not looked up)


def local_path(value: Any) -> Path | None:
    """An absolute local path from an XCom or report value; object-storage URLs and relative paths are refused."""
    if not isinstance(value, str) or not value or is_remote(value) or "\x00" in value:
        return None
    path = Path(value)
    return path if path.is_absolute() else None


def parse_time(value: Any) -> datetime | None:
    """ISO-8601 strings or epoch seconds, as reports may carry either; naive times are taken as UTC."""
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        moment = datetime.fromtimestamp(value, tz=UTC)
    elif isinstance(value, str) and value:
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    else:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
