"""Deployment settings read when the DAG file is parsed: what an operator fixes per deployment, not per run.

A task's Celery queue is part of the DAG's structure (the scheduler routes each task instance by it), so unlike the
run settings (Params -> Variables -> environment, resolved at run time) it comes from the environment of the DAG
processor, once per parse.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping
from typing import Any

from include.cosmos_upsample.settings import ENV_PREFIX

# The queue of the mapped `upsample` tasks, e.g. `cosmos_upsample` consumed only by the workers that hold the GPU
# hosts' SSH keys (README, "Runbook: CeleryExecutor"). Unset or empty: Airflow's `[operators] default_queue`.
UPSAMPLE_QUEUE_ENV = ENV_PREFIX + "UPSAMPLE_QUEUE"


def upsample_task_options(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Keyword arguments for the `upsample` task: `{"queue": NAME}`, or nothing so Airflow's default applies."""
    queue = (os.environ if environ is None else environ).get(UPSAMPLE_QUEUE_ENV, "").strip()
    return {"queue": queue} if queue else {}


# The first retry's delay in seconds (then exponential backoff up to 10 minutes). Tests shorten it; default 5.
RETRY_DELAY_ENV = ENV_PREFIX + "RETRY_DELAY_SECONDS"


def default_args(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The DAG's default_args: 3 retries with exponential backoff, the first after RETRY_DELAY_ENV seconds."""
    delay = float((os.environ if environ is None else environ).get(RETRY_DELAY_ENV, "") or 5)
    return {
        "owner": "cosmos",
        "retries": 3,
        "retry_delay": dt.timedelta(seconds=delay),
        "retry_exponential_backoff": True,
        "max_retry_delay": dt.timedelta(minutes=10),
    }
