"""The deferrable upsample task as values: what it defers with, what the trigger serializes, how a finished wait
becomes the task's error, and the job's note while it is deferred (no SSH, no engine)."""

from __future__ import annotations

import datetime as dt
import importlib
import json
from pathlib import PurePosixPath
from types import SimpleNamespace

import pytest
from airflow.sdk.exceptions import AirflowFailException, AirflowTaskTimeout, TaskDeferred

from include.cosmos_upsample.docker_trigger import DockerJobTrigger
from include.cosmos_upsample.errors import NotRetryable, WorkerFailed, WorkerRefused, fails_fast
from include.cosmos_upsample.remote import _raise_for
from include.cosmos_upsample.stage_notes import noting_failure
from include.cosmos_upsample.staging import RemoteJob
from include.cosmos_upsample.upsample_operator import TRIGGER_TIMEOUT_GRACE, UpsampleOperator
from include.cosmos_upsample.watchdog import WorkerStalled

JOB = RemoteJob("gpu_a", "job123", PurePosixPath("/srv/jobs"), PurePosixPath("/srv/models"))
FOLLOWING = {"conn_id": "gpu_a", "job_key": "job123", "container_id": "c0ffee" * 10, "host_work_dir": "/srv/jobs",
             "host_model_dir": "/srv/models", "local_job_dir": "/out/jobs/job123", "sync_seconds": 10.0,
             "stall_timeout_seconds": 1800.0, "started_at": 1_000_000.0}


class TestDeferral:
    def operator(self, timeout: dt.timedelta | None) -> UpsampleOperator:
        return UpsampleOperator(task_id="upsample", run_dir="/out/runs/r", job={}, execution_timeout=timeout)

    def test_the_task_defers_to_the_trigger_bounded_by_its_execution_timeout(self):
        with pytest.raises(TaskDeferred) as deferred:
            self.operator(dt.timedelta(hours=6)).wait_for(FOLLOWING)
        trigger = deferred.value.trigger
        assert isinstance(trigger, DockerJobTrigger) and deferred.value.method_name == "execute_complete"
        # Airflow does not apply execution_timeout while a task is deferred: the trigger ends the try at the same
        # moment, and Airflow's own trigger timeout bounds the wait even with no triggerer running.
        assert trigger.deadline == FOLLOWING["started_at"] + 6 * 3600
        assert deferred.value.timeout == dt.timedelta(hours=6) + TRIGGER_TIMEOUT_GRACE

    def test_the_trigger_serializes_small_values_and_is_recreated_from_them(self):
        classpath, kwargs = DockerJobTrigger(**FOLLOWING, deadline=2_000_000.0).serialize()
        assert json.loads(json.dumps(kwargs)) == kwargs and len(json.dumps(kwargs)) < 1000
        module, _, name = classpath.rpartition(".")
        again = getattr(importlib.import_module(module), name)(**kwargs)  # what a restarted triggerer does
        assert again.serialize() == (classpath, kwargs)
        watch = again.watch()
        assert (watch.job, watch.container_id, watch.deadline) == (JOB, FOLLOWING["container_id"], 2_000_000.0)
        assert watch.ledger_bytes == 0  # it goes on from the local file's size, not from a number it was given


def event(status: str, exit_code: int | None = None, **more) -> dict:
    return {"status": status, "exit_code": exit_code, "message": more.pop("message", "why"), **more}


class TestEndOfTheWait:
    """The resumed task raises what it raised when it waited itself: retried, or failed at once naming the fix."""

    def test_a_clean_exit_raises_nothing(self):
        _raise_for(event("exited", 0), (), JOB, "img:1")

    def test_a_non_zero_exit_is_retried_with_the_workers_last_line(self):
        with pytest.raises(WorkerFailed, match="exited with status 3: RuntimeError: engine died; finished items"):
            _raise_for(event("exited", 3), ("loading", "RuntimeError: engine died"), JOB, "img:1")

    def test_a_refusal_such_as_a_tokenizer_mismatch_is_not_retried(self):
        tail = ("refusing job job123: the engine counted 1210 prompt tokens, the plan 1206; ...",)
        with pytest.raises(WorkerRefused, match="on gpu_a \\(image img:1\\): refusing job job123") as refused:
            _raise_for(event("exited", 78), tail, JOB, "img:1")
        with pytest.raises(AirflowFailException):
            fails_fast(lambda: (_ for _ in ()).throw(refused.value))()

    def test_a_stall_is_retried_with_the_watchdogs_message(self):
        with pytest.raises(WorkerStalled, match="no new answer for 45 s") as stalled:
            _raise_for(event("stalled", message="job job123: no new answer for 45 s ..."), (), JOB, "img:1")
        assert not isinstance(stalled.value, NotRetryable)

    def test_a_try_past_its_deadline_is_a_timeout(self):
        with pytest.raises(AirflowTaskTimeout, match="execution_timeout passed"):
            _raise_for(event("timeout", message="job job123: the try's execution_timeout passed"), (), JOB, "img:1")

    @pytest.mark.parametrize(("retryable", "error"), [(True, WorkerFailed), (False, NotRetryable)])
    def test_a_trigger_error_keeps_its_kind(self, retryable, error):
        with pytest.raises(error, match="following the container of job job123 on gpu_a failed: HostKeyError"):
            _raise_for(event("error", message="HostKeyError: ...", retryable=retryable), (), JOB, "img:1")


def test_while_deferred_the_note_says_the_job_did_not_finish_until_the_resumed_task_ends(tmp_path):
    note, context = tmp_path / "last_error.txt", {"ti": SimpleNamespace(try_number=2), "task": None}
    with pytest.raises(TaskDeferred), noting_failure(note, "job k", "upsample", context):
        UpsampleOperator(task_id="upsample", run_dir="r", job={}).wait_for(FOLLOWING)
    # Deferred is neither done nor failed: were the run stopped now, merge would say the job did not finish.
    assert note.read_text().startswith("job k did not finish (try 2, started ") and "killed" in note.read_text()
    with noting_failure(note, "job k", "upsample", context):  # the resumed task, which ends well
        pass
    assert not note.exists()
