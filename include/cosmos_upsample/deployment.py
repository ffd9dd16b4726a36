"""Deployment settings read when the DAG file is parsed: what an operator fixes per deployment, not per run.

A task's Celery queue is part of the DAG's structure (the scheduler routes each task instance by it), so unlike the
run settings (Params -> Variables -> environment, resolved at run time) it comes from the environment of the DAG
processor, once per parse.
"""

from __future__ import annotations

import datetime as dt
import math
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


# How many of a run's validate tasks may be queued or running at once (Airflow's max_active_tis_per_dagrun); 0: no
# limit. Without a limit the scheduler hands every ready validate task to the executor at once, and a chunk's batch
# and upsample, ready later, queue behind all of them: no GPU job starts before the whole input is validated. With
# it, the next validate waits in the scheduler, where a ready batch/upsample outranks it (weight_rule "upstream").
# Two already keep ahead of the GPUs (a chunk of ~60 specs validates in seconds, a 12B model loads in about a minute)
# and leave worker slots for the batch and upsample tasks; raise it for object-storage inputs with slow downloads.
VALIDATE_CONCURRENCY_ENV = ENV_PREFIX + "VALIDATE_CONCURRENCY"
DEFAULT_VALIDATE_CONCURRENCY = 2


def validate_task_options(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Keyword arguments for the `validate` task: `{"max_active_tis_per_dagrun": N}`, or nothing for no limit."""
    value = (os.environ if environ is None else environ).get(VALIDATE_CONCURRENCY_ENV, "").strip()
    if not value:
        return {"max_active_tis_per_dagrun": DEFAULT_VALIDATE_CONCURRENCY}
    if not value.isdigit():
        raise ValueError(f"{VALIDATE_CONCURRENCY_ENV}={value!r}: give a number of task instances, or 0 for no limit")
    return {"max_active_tis_per_dagrun": int(value)} if int(value) else {}


# The first retry's delay in seconds (then exponential backoff up to 10 minutes). Tests shorten it; default 5.
RETRY_DELAY_ENV = ENV_PREFIX + "RETRY_DELAY_SECONDS"


def default_args(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The DAG's default_args: 3 retries with exponential backoff, the first after RETRY_DELAY_ENV seconds.

    Priority grows downstream (weight_rule "upstream"): when workers are scarce, a chunk whose validation is done
    gets its batch and upsample run before further chunks are validated, so GPU jobs start early instead of after
    the whole input (Airflow's default, "downstream", would favour the validate tasks).
    """
    delay = float((os.environ if environ is None else environ).get(RETRY_DELAY_ENV, "") or 5)
    return {
        "owner": "cosmos",
        "retries": 3,
        "retry_delay": dt.timedelta(seconds=delay),
        "retry_exponential_backoff": True,
        "max_retry_delay": dt.timedelta(minutes=10),
        "weight_rule": "upstream",
    }


# Every task's try is bounded (execution_timeout: Airflow stops a try that runs longer, and retries it). Seconds per
# task, from the DAG processor's environment: COSMOS_UPSAMPLE_<TASK_ID>_TIMEOUT_SECONDS. The defaults are generous
# bounds, not expected times: an upsample job of 128 prompts on a 12B model takes minutes, and a worker that stops
# answering is caught sooner by the runners' stall watchdog (setting `stall_timeout_seconds`).
STAGE_TIMEOUT_SECONDS = {"discover": 1800, "validate": 3600, "batch": 600, "upsample": 6 * 3600,
                         "upsample_endpoint": 6 * 3600,
                         "review_requests": 600, "merge_metadata": 1800, "report": 600, "prune_scratch": 1800}


def timeout_env(task_id: str) -> str:
    return f"{ENV_PREFIX}{task_id.upper()}_TIMEOUT_SECONDS"


def task_timeout(task_id: str, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """`{"execution_timeout": timedelta}` for the task `task_id`; a value that is not a positive number fails the
    parse naming the variable."""
    name = timeout_env(task_id)
    value = (os.environ if environ is None else environ).get(name, "").strip()
    try:
        seconds = float(value) if value else float(STAGE_TIMEOUT_SECONDS[task_id])
    except ValueError:
        seconds = -1.0
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"{name}={value!r}: give the longest a try of {task_id} may run, in seconds (> 0)")
    return {"execution_timeout": dt.timedelta(seconds=seconds)}
