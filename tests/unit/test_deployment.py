from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys

import pytest

from include.cosmos_upsample.deployment import (
    STAGE_TIMEOUT_SECONDS,
    UPSAMPLE_QUEUE_ENV,
    VALIDATE_CONCURRENCY_ENV,
    task_timeout,
    timeout_env,
    upsample_task_options,
    validate_task_options,
)
from tests.conftest import ROOT


def parsed_task_attribute(name: str, env: dict[str, str]) -> dict:
    """task_id -> one attribute of each task, as a fresh interpreter parses the DAG file with `env` (the deployment
    settings are read at parse time, as by the dag-processor)."""
    code = ("import json, sys; from airflow.models.dagbag import DagBag;"
            "dag = DagBag(dag_folder='dags').dags['cosmos_prompt_upsample'];"
            "print(json.dumps({t.task_id: getattr(t, sys.argv[1]) for t in dag.tasks}, default=str))")
    out = subprocess.run([sys.executable, "-c", code, name], env=env, cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


class TestUpsampleQueue:
    def test_unset_or_blank_leaves_airflows_default_queue(self):
        assert upsample_task_options({}) == {}
        assert upsample_task_options({UPSAMPLE_QUEUE_ENV: "  "}) == {}

    def test_named_queue(self):
        assert UPSAMPLE_QUEUE_ENV == "COSMOS_UPSAMPLE_UPSAMPLE_QUEUE"
        assert upsample_task_options({UPSAMPLE_QUEUE_ENV: " gpu_hosts "}) == {"queue": "gpu_hosts"}

    def test_the_parsed_dag_routes_only_upsample_to_it(self, airflow_home):
        queues = parsed_task_attribute("queue", {**airflow_home, UPSAMPLE_QUEUE_ENV: "gpu_hosts"})
        assert queues.pop("upsample") == "gpu_hosts" and set(queues.values()) == {"default"}, queues


class TestValidateConcurrency:
    def test_two_chunks_in_validation_unless_the_deployment_says_otherwise(self):
        assert VALIDATE_CONCURRENCY_ENV == "COSMOS_UPSAMPLE_VALIDATE_CONCURRENCY"
        assert validate_task_options({}) == {"max_active_tis_per_dagrun": 2}
        assert validate_task_options({VALIDATE_CONCURRENCY_ENV: " 8 "}) == {"max_active_tis_per_dagrun": 8}
        assert validate_task_options({VALIDATE_CONCURRENCY_ENV: "0"}) == {}  # no limit

    @pytest.mark.parametrize("value", ["-1", "two", "1.5"])
    def test_a_limit_that_is_not_a_count_names_the_variable(self, value):
        with pytest.raises(ValueError, match=VALIDATE_CONCURRENCY_ENV):
            validate_task_options({VALIDATE_CONCURRENCY_ENV: value})

    def test_the_parsed_dag_limits_only_validate(self, airflow_home):
        limits = parsed_task_attribute("max_active_tis_per_dagrun", {**airflow_home, VALIDATE_CONCURRENCY_ENV: "3"})
        assert limits.pop("validate") == 3 and set(limits.values()) == {None}, limits


class TestRetryDelay:
    def test_five_seconds_unless_the_deployment_says_otherwise(self):
        from include.cosmos_upsample.deployment import RETRY_DELAY_ENV, default_args

        assert default_args({})["retry_delay"].total_seconds() == 5
        shortened = default_args({RETRY_DELAY_ENV: "0.5"})
        assert shortened["retry_delay"].total_seconds() == 0.5
        assert shortened["retries"] == 3 and shortened["retry_exponential_backoff"] is True


class TestTaskTimeouts:
    """Every try is bounded: a hung task gives its worker slot (and GPU pool slot) back and is retried."""

    def test_every_task_has_a_default_bound(self):
        assert set(STAGE_TIMEOUT_SECONDS) == {"discover", "validate", "batch", "upsample", "upsample_endpoint",
                                              "review_requests", "merge_metadata", "report", "prune_scratch"}
        assert task_timeout("upsample", {})["execution_timeout"].total_seconds() == 6 * 3600
        assert timeout_env("merge_metadata") == "COSMOS_UPSAMPLE_MERGE_METADATA_TIMEOUT_SECONDS"
        assert task_timeout("validate", {timeout_env("validate"): " 90 "})["execution_timeout"].total_seconds() == 90

    @pytest.mark.parametrize("value", ["0", "-5", "soon", "inf", "nan"])
    def test_a_bound_that_is_not_a_positive_number_names_the_variable(self, value):
        with pytest.raises(ValueError, match="COSMOS_UPSAMPLE_BATCH_TIMEOUT_SECONDS"):
            task_timeout("batch", {timeout_env("batch"): value})

    def test_the_parsed_dag_bounds_every_task(self, airflow_home):
        bounds = parsed_task_attribute("execution_timeout", {**airflow_home, timeout_env("upsample"): "7"})
        assert bounds.pop("upsample") == "0:00:07"
        # The review task waits for a person, bounded per request by its response_timeout (review_timeout_seconds,
        # tests/unit/test_review_step.py); an execution_timeout would race HITLOperator's defer (its own docstring).
        assert bounds.pop("review") is None
        assert bounds == {task_id: str(dt.timedelta(seconds=seconds)) for task_id, seconds in
                          STAGE_TIMEOUT_SECONDS.items() if task_id != "upsample"}
