"""Retention on real folders (include/cosmos_upsample/retention.py): what is pruned, what never is, and that a pass is
safe against a worker holding its job and a run that is still going."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from include.cosmos_upsample.jobformat import LOCK_NAME, MANIFEST_NAME
from include.cosmos_upsample.layout import OutputLayout, write_json_atomic
from include.cosmos_upsample.retention import TRASH_PREFIX, prune, run_id_of
from include.cosmos_upsample.settings import Settings
from include.cosmos_upsample.shared_storage import write_marker

DAY = 86400
NOW = time.time()
RETENTION_DAYS = 30
OLD = NOW - 40 * DAY  # older than the retention time
JOB = {name: hashlib.sha256(name.encode()).hexdigest()[:20] for name in
       ("old", "named", "held", "young", "reused", "remote")}
HINT = {name: hashlib.sha256(name.encode()).hexdigest()[:24] for name in
        ("old", "in_run", "in_review", "in_job", "young")}


def age(path: Path, when: float = OLD) -> None:
    """Everything under `path` (and itself) last changed at `when`."""
    for folder, dirs, files in os.walk(path, topdown=False):
        for name in [*files, *dirs]:
            os.utime(os.path.join(folder, name), (when, when), follow_symlinks=False)
    os.utime(path, (when, when), follow_symlinks=False)


def write(path: Path, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def digest_tree(root: Path) -> dict[str, str]:
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()}


class Work:
    """A work_dir (also the output_dir, the default) as weeks of runs leave it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.layout = OutputLayout(root)
        self.settings = Settings(output_dir=str(root), work_dir=str(root), retention_days=RETENTION_DAYS)

    def run_folder(self, name: str, *, run_id: str | None = None, jobs: tuple[str, ...] = (),
                   answered: dict[str, str] | None = None, hints: tuple[str, ...] = ()) -> Path:
        folder = self.root / "runs" / name
        write_marker(folder, run_id or name)
        write(folder / "settings.json", json.dumps(self.settings.model_dump(mode="json")))
        for index, job in enumerate(jobs):
            job_dir = str(self.layout.job_dir(job))
            write(folder / "chunks" / f"chunk-{index:04d}.json", json.dumps({"job_key": None, "entries": []}))
            write(folder / "plans" / f"chunk-{index:04d}.json", json.dumps({
                "job": {"job_key": job, "job_dir": job_dir, "items": 1},
                "answered": {key: str(self.layout.job_dir(other)) for key, other in (answered or {}).items()}}))
        frames = [str(self.layout.hint_dir(hint) / "frame-00.jpg") for hint in hints]
        write(folder / "validated" / "chunk-0000.json", json.dumps([{"spec_id": "a", "frame_paths": frames}]))
        return folder

    def job(self, name: str, hints: tuple[str, ...] = (), host: str | None = None) -> Path:
        job_dir = self.layout.job_dir(JOB[name])
        frames = [str(self.layout.hint_dir(hint) / "frame-00.jpg") for hint in hints]
        write_json_atomic(job_dir / MANIFEST_NAME, {"job_key": JOB[name], "items": [{"key": "k", "frames": frames}]})
        write(job_dir / "ledger.jsonl", '{"key": "k", "status": "ok", "text": "answer"}\n')
        if host:
            write_json_atomic(job_dir / "host.json", {"conn_id": host, "container": "c"})
        return job_dir

    def pointer(self, item: str, job: str) -> Path:
        return write(self.layout.answer_pointer(item), job)

    def hint(self, name: str) -> Path:
        return write(self.layout.hint_dir(HINT[name]) / "frame-00.jpg", "jpeg bytes " * 100).parent


@pytest.fixture
def work(tmp_path: Path) -> Work:
    """Old and young scratch of every kind, old outputs, and a run still going."""
    w = Work(tmp_path / "out")
    for name in ("old", "named", "held", "reused", "young"):
        w.job(name, hints=(HINT["in_job"],) if name == "held" else ())
    for name in HINT:
        w.hint(name)
    w.pointer("item-old-job", JOB["old"])
    w.pointer("item-named-job", JOB["named"])
    w.pointer("item-missing-job", "0" * 20)
    write(w.root / "specs" / "spec_a.json", '{"prompt": "long"}')
    write(w.root / "reports" / "run_1.json", "{}")
    write(w.root / "reports" / "summaries" / "run_1.json", "{}")
    write(w.root / "review" / "spec_b.json", json.dumps({"frames": [str(w.layout.hint_dir(HINT["in_review"]))
                                                                     + "/frame-00.jpg"]}))
    write(w.root / "cache" / "videos" / "0123abcd.mp4", "video")
    write(w.root / "jobs" / ".gpu.lock", "")
    w.run_folder("finished_long_ago", hints=(HINT["old"],))
    w.run_folder("running_for_weeks", run_id="running~for~weeks", jobs=(JOB["named"],), answered={"i": JOB["reused"]},
                 hints=(HINT["in_run"],))
    w.run_folder("this_run")
    age(w.root)
    # What changed in the last days: a young job, pointer, hint, and a young run folder.
    for path in (w.layout.job_dir(JOB["young"]), w.layout.hint_dir(HINT["young"])):
        age(path, NOW - DAY)
    age(w.pointer("item-young-missing", "1" * 20), NOW - DAY)
    age(w.run_folder("yesterday"), NOW - DAY)
    return w


def live(run_id: str) -> bool:
    return run_id == "running~for~weeks"


@pytest.fixture
def held_job(work: Work):
    """A real worker process holding the `held` job's lock, as the worker does while it runs the job."""
    lock = work.layout.job_dir(JOB["held"]) / LOCK_NAME
    code = ("import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
            "print('locked', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        age(work.layout.job_dir(JOB["held"]))
        yield holder
    finally:
        holder.kill()
        holder.wait(timeout=30)


class TestPrune:
    def test_prunes_old_scratch_and_keeps_the_rest(self, work: Work, held_job) -> None:
        old_job_bytes = sum(p.stat().st_size for p in work.layout.job_dir(JOB["old"]).rglob("*"))
        result = prune(work.settings, keep=work.root / "runs" / "this_run", is_live=live, now=NOW)
        assert sorted(p.name for p in (work.root / "runs").iterdir()) == ["running_for_weeks", "this_run",
                                                                          "yesterday"]
        assert sorted(p.name for p in work.layout.jobs_dir.iterdir() if p.name in JOB.values()) == sorted(
            JOB[name] for name in ("named", "held", "reused", "young"))
        assert sorted(p.name for p in (work.layout.jobs_dir / "by-item").iterdir()) == [
            "item-named-job", "item-young-missing"]
        assert sorted(p.name for p in work.layout.hints_dir.iterdir()) == sorted(
            HINT[name] for name in ("in_run", "in_review", "in_job", "young"))
        tallies = result.as_dict()
        assert (tallies["runs"]["pruned"], tallies["runs"]["kept_old"]) == (1, 2)
        assert (tallies["jobs"]["pruned"], tallies["jobs"]["kept_old"]) == (1, 3)
        assert tallies["pointers"]["pruned"] == 2 and tallies["hints"]["pruned"] == 1
        assert tallies["hints"]["bytes"] == len("jpeg bytes " * 100)
        assert tallies["jobs"]["bytes"] == old_job_bytes > 0
        assert result.problems == []

    def test_outputs_reports_review_and_the_video_cache_are_never_deleted(self, work: Work) -> None:
        kept = ("specs", "reports", "review", "cache")
        before = {name: digest_tree(work.root / name) for name in kept}
        prune(work.settings, keep=work.root / "runs" / "this_run", is_live=lambda run_id: False,
              now=NOW + 3650 * DAY)  # ten years on: every piece of scratch is old
        assert {name: digest_tree(work.root / name) for name in kept} == before
        assert (work.root / "jobs" / ".gpu.lock").exists()

    def test_a_running_jobs_folder_is_never_deleted(self, work: Work, held_job) -> None:
        """Its worker holds its lock: not named by any run, old, and still kept whole."""
        job_dir = work.layout.job_dir(JOB["held"])
        before = digest_tree(job_dir)
        result = prune(work.settings, keep=work.root / "runs" / "this_run", is_live=lambda run_id: False,
                       now=NOW + 3650 * DAY)
        assert digest_tree(job_dir) == before
        assert result.jobs.kept_old >= 1 and held_job.poll() is None

    def test_a_running_runs_folder_and_its_jobs_are_never_deleted(self, work: Work) -> None:
        """Airflow has the run as running (the marker gives its id, which its folder name cannot hold)."""
        assert run_id_of(work.root / "runs" / "running_for_weeks") == "running~for~weeks"
        prune(work.settings, keep=work.root / "runs" / "this_run", is_live=live, now=NOW + 3650 * DAY)
        assert (work.root / "runs" / "running_for_weeks" / "settings.json").exists()
        assert (work.layout.job_dir(JOB["named"]) / "ledger.jsonl").exists()  # its plan's job
        assert (work.layout.job_dir(JOB["reused"]) / "ledger.jsonl").exists()  # answers it reuses
        assert (work.layout.hint_dir(HINT["in_run"]) / "frame-00.jpg").exists()
        assert (work.root / "runs" / "this_run" / "settings.json").exists()

    def test_a_second_pass_prunes_nothing(self, work: Work) -> None:
        first = prune(work.settings, keep=work.root / "runs" / "this_run", is_live=live, now=NOW)
        listing = sorted(str(p.relative_to(work.root)) for p in work.root.rglob("*"))
        second = prune(work.settings, keep=work.root / "runs" / "this_run", is_live=live, now=NOW)
        assert first.runs.pruned == 1
        assert all(tally["pruned"] == 0 for name, tally in second.as_dict().items() if name != "problems")
        assert sorted(str(p.relative_to(work.root)) for p in work.root.rglob("*")) == listing

    def test_old_bucket_event_claims_go_and_young_ones_stay(self, work: Work) -> None:
        """A claim is a few bytes per SQS message (events.claim_messages); without pruning they pile up forever."""
        claims = work.layout.message_claims_dir
        write(claims / "message-old", "scheduled__2026-01-01")
        write(claims / "message-young", "asset_triggered__2026-02-01")
        age(claims / "message-old")
        age(claims / "message-young", NOW - DAY)
        result = prune(work.settings, keep=work.root / "runs" / "this_run", is_live=live, now=NOW)
        assert sorted(path.name for path in claims.iterdir()) == ["message-young"]
        assert (result.claims.pruned, result.claims.bytes) == (1, len("scheduled__2026-01-01"))

    def test_retention_zero_prunes_nothing(self, work: Work) -> None:
        listing = sorted(str(p.relative_to(work.root)) for p in work.root.rglob("*"))
        settings = work.settings.model_copy(update={"retention_days": 0})
        prune(settings, keep=work.root / "runs" / "this_run", is_live=live, now=NOW + 3650 * DAY)
        assert sorted(str(p.relative_to(work.root)) for p in work.root.rglob("*")) == listing

    def test_leftovers_of_an_interrupted_pass_are_removed(self, work: Work) -> None:
        for folder in ("runs", "jobs", "hints"):
            write(work.root / folder / f"{TRASH_PREFIX}something-1234abcd" / "file")
        write(work.layout.jobs_dir / "by-item" / f"{TRASH_PREFIX}item-1234abcd")
        prune(work.settings, keep=work.root / "runs" / "this_run", is_live=live, now=NOW)
        assert not [p for p in work.root.rglob(f"{TRASH_PREFIX}*")]

    def test_a_job_that_ran_on_a_gpu_host_waits_for_its_host_folder(self, work: Work) -> None:
        """The host cannot be asked (no such connection): the local folder stays, so the next pass can still find
        the host folder, and the problem is reported."""
        age(work.job("remote", host="no_such_gpu_host"))
        result = prune(work.settings, keep=work.root / "runs" / "this_run", is_live=live, now=NOW)
        assert work.layout.job_dir(JOB["remote"]).exists()
        assert len(result.problems) == 1 and "GPU host no_such_gpu_host" in result.problems[0]
        assert "kept here until it can be asked" in result.problems[0]
        assert not work.layout.job_dir(JOB["old"]).exists()  # the rest of the pass went on


class TestSetting:
    def test_retention_days_is_a_deployment_setting(self) -> None:
        from include.cosmos_upsample.settings import param_schemas, resolve_settings

        assert "retention_days" not in param_schemas()  # not on the trigger form
        assert resolve_settings({}).retention_days == 30
        assert resolve_settings({}, lambda key: "7" if key == "cosmos_upsample_retention_days" else None
                                ).retention_days == 7
        assert resolve_settings({}, environ={"COSMOS_UPSAMPLE_RETENTION_DAYS": "0.5"}).retention_days == 0.5
        with pytest.raises(ValueError, match="retention_days"):
            resolve_settings({}, environ={"COSMOS_UPSAMPLE_RETENTION_DAYS": "-1"})


class TestStage:
    """`stages.prune_scratch`, as the DAG's teardown calls it: problems are reported after the rest is pruned."""

    def test_a_folder_that_cannot_be_deleted_fails_at_once_naming_the_fix(self, work: Work) -> None:
        from include.cosmos_upsample.errors import NotRetryable
        from include.cosmos_upsample.stages import prune_scratch

        stuck = work.layout.hint_dir(HINT["old"])
        subprocess.run(["chattr", "+i", str(stuck)], check=True)  # immutable: even root cannot rename it
        try:
            with pytest.raises(NotRetryable, match="give the Airflow workers' user write access") as raised:
                prune_scratch(work.root / "runs" / "this_run", is_live=live)
            assert str(stuck) in str(raised.value)
        finally:
            subprocess.run(["chattr", "-i", str(stuck)], check=True)
        assert stuck.is_dir() and not work.layout.job_dir(JOB["old"]).exists()

    def test_a_host_that_cannot_be_asked_is_retried(self, work: Work, monkeypatch) -> None:
        from include.cosmos_upsample.errors import NotRetryable
        from include.cosmos_upsample.retention import PruneFailed
        from include.cosmos_upsample.stages import prune_scratch

        # A defined connection to a host that does not answer (nothing listens on loopback port 9): retryable. An
        # undefined connection id is a configuration error instead (test_an_unknown_host_connection_needs_a_person).
        monkeypatch.setenv("AIRFLOW_CONN_SILENT_GPU_HOST", '{"conn_type": "ssh", "host": "127.0.0.1", "port": 9}')
        age(work.job("remote", host="silent_gpu_host"))
        with pytest.raises(PruneFailed, match="GPU host silent_gpu_host") as raised:
            prune_scratch(work.root / "runs" / "this_run", is_live=live)
        assert not isinstance(raised.value, NotRetryable)
        assert not (work.root / "runs" / "finished_long_ago").exists()

    def test_an_unknown_host_connection_needs_a_person(self, work: Work) -> None:
        from include.cosmos_upsample.errors import NotRetryable
        from include.cosmos_upsample.stages import prune_scratch

        age(work.job("remote", host="no_such_gpu_host"))
        with pytest.raises(NotRetryable, match="'no_such_gpu_host' .* is not defined in Airflow; add it"):
            prune_scratch(work.root / "runs" / "this_run", is_live=live)
        assert not (work.root / "runs" / "finished_long_ago").exists()
