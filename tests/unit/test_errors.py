"""The two kinds of error and where they meet Airflow (fails_fast); why a stage did not finish (stage_notes); the stall
watchdog's clock."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from types import SimpleNamespace

import pytest
from airflow.sdk.exceptions import AirflowFailException, AirflowNotFoundException, AirflowTaskTimeout

from include.cosmos_upsample.errors import (
    NotRetryable,
    SettingsError,
    UnknownConnection,
    WorkerFailed,
    fails_fast,
    last_error_line,
)
from include.cosmos_upsample.gpu_slots import GpuDeclarationError
from include.cosmos_upsample.stage_notes import chunk_stage_reason, noting_failure
from include.cosmos_upsample.storage import StorageError
from include.cosmos_upsample.watchdog import StallWatch, WorkerStalled


def raising(exc: BaseException):
    @fails_fast
    def task_body(run_dir: str, ti=None):
        raise exc

    return task_body


class TestFailsFast:
    @pytest.mark.parametrize("exc", [
        SettingsError("settings refused: max_model_len (from the Variable cosmos_upsample_max_model_len): ..."),
        StorageError("output_dir 's3://b/x' is object storage ...: set the work_dir Param"),
        GpuDeclarationError("connection g: extra 'gpus_per_job' must be at least 1, got 0"),
        UnknownConnection("gpu_x", "gpu_conn_ids"),
    ])
    def test_what_only_a_person_can_fix_fails_this_try_for_good_with_the_fix(self, exc):
        with pytest.raises(AirflowFailException) as caught:
            raising(exc)("/run")
        assert str(caught.value) == str(exc) and caught.value.__cause__ is exc

    def test_a_connection_airflow_does_not_know_is_one_of_them(self):
        with pytest.raises(AirflowFailException, match="define that connection in Airflow"):
            raising(AirflowNotFoundException("The conn_id `gpu_x` isn't defined"))("/run")

    @pytest.mark.parametrize("exc", [WorkerFailed("killed"), OSError("connection reset"), KeyError("x")])
    def test_anything_else_is_left_to_airflows_retries(self, exc):
        with pytest.raises(type(exc)):
            raising(exc)("/run")

    def test_the_wrapped_task_keeps_its_name_and_signature_for_taskflow(self):
        import inspect

        body = raising(ValueError())
        assert body.__name__ == "task_body" and list(inspect.signature(body).parameters) == ["run_dir", "ti"]

    def test_unknown_connection_names_the_setting_and_how_to_add_it(self):
        message = str(UnknownConnection("gpu_x", "gpu_conn_ids"))
        assert "'gpu_x'" in message and "gpu_conn_ids" in message and "AIRFLOW_CONN_GPU_X" in message
        assert isinstance(UnknownConnection("a", "b"), NotRetryable)


def test_the_last_error_line_of_a_traceback_is_the_exception():
    lines = ["Traceback (most recent call last):", '  File "w.py", line 3', "ModuleNotFoundError: no llama_cpp", ""]
    assert last_error_line(lines) == "ModuleNotFoundError: no llama_cpp"
    assert last_error_line([]) == "no output"


class TestStageNotes:
    def context(self, seconds: float = 5) -> dict:
        return {"ti": SimpleNamespace(try_number=3),
                "task": SimpleNamespace(execution_timeout=dt.timedelta(seconds=seconds))}

    def test_while_running_the_note_says_killed_then_success_removes_it(self, tmp_path):
        note = tmp_path / "note.txt"
        with noting_failure(note, "job k", "upsample", self.context()):
            assert note.read_text().startswith("job k did not finish (try 3, started ") and "killed" in note.read_text()
        assert not note.exists()

    def test_a_timeout_names_its_bound_and_the_setting(self, tmp_path):
        note = tmp_path / "note.txt"
        with pytest.raises(AirflowTaskTimeout), noting_failure(note, "job k", "upsample", self.context(5)):
            raise AirflowTaskTimeout()  # what Airflow raises in the task when execution_timeout passes
        assert note.read_text().strip() == (
            "job k did not finish (try 3, upsample): timed out after 5 s (COSMOS_UPSAMPLE_UPSAMPLE_TIMEOUT_SECONDS); "
            "raise that bound, then re-run")

    def test_an_error_is_kept_on_one_line(self, tmp_path):
        note = tmp_path / "note.txt"
        with pytest.raises(OSError), noting_failure(note, "its batch (chunk-0002)", "batch", self.context()):
            raise OSError("[Errno 28] No space left\non device")
        assert chunk_stage_reason(note, "its batch (chunk-0002)") == (
            "its batch (chunk-0002) did not finish (try 3, batch): [Errno 28] No space left on device")

    def test_no_note_means_it_never_started(self, tmp_path):
        reason = chunk_stage_reason(Path(tmp_path / "none.txt"), "its validation (chunk-0001)")
        assert reason.startswith("its validation (chunk-0001) did not finish: it never started")
        assert "Shared storage" in reason


class TestStallWatch:
    class Clock:
        def __init__(self) -> None:
            self.now = 100.0

        def __call__(self) -> float:
            return self.now

    def test_waiting_for_the_gpu_is_never_a_stall(self):
        clock = self.Clock()
        watch = StallWatch(10, clock)
        watch.ledger_is(0)
        clock.now += 3600
        watch.worker_said("waiting for the GPU: another job holds /work/.gpu-0.lock")
        assert not watch.stalled()

    def test_the_clock_runs_from_holding_the_gpu_and_restarts_at_each_answer(self):
        clock = self.Clock()
        watch = StallWatch(10, clock)
        watch.ledger_is(120)  # answers of an earlier try
        watch.worker_said("holding the GPU lock /work/.gpu-0.lock")
        clock.now += 9
        watch.ledger_is(240)  # a new answer
        clock.now += 9
        assert not watch.stalled()
        clock.now += 1
        assert watch.stalled()
        error = watch.error("job1", "worker pid 42")
        assert isinstance(error, WorkerStalled) and isinstance(error, WorkerFailed)
        assert "job job1: no new answer for 10 s" in str(error) and "worker pid 42 was stopped" in str(error)
