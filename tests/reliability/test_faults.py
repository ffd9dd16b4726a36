"""Faults on the local runner: each run resumes, or ends with clear `failed` items, and loses nothing finished.

Killed workers and tasks, a stray worker holding a job, an output folder that is full, read-only or in the way,
and a validation that never finished. The DAG runs are real (`airflow dags test`); `airflow dags test` runs every
task inside its own process, so "the task's process" below is that process.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from include.cosmos_upsample import stages
from include.cosmos_upsample.runners import worker_environment
from include.cosmos_upsample.settings import DAG_ID
from tests.conftest import ROOT
from tests.helpers import latest_report, make_video, run_dag, write_spec
from tests.reliability.invariants import assert_invariants, ledger_entries, model_calls, tree_digest, tree_listing

FAST = {"max_output_tokens": 64}
# Where failed items are the expected outcome: the run still succeeds, so Airflow does not retry the report task
# (it fails the run above max_failure_ratio, a failure that retries cannot change) and each run costs ~40 s less.
TOLERANT = {"max_failure_ratio": 1.0}
DIE_AFTER_ENV = "COSMOS_UPSAMPLE_WORKER_DIE_AFTER"
WORKER = ROOT / "docker" / "upsampler" / "worker.py"


def small_input(folder: Path, count: int) -> Path:
    make_video(folder / "clip.mp4", 160, 90, seconds=1)
    for index in range(count):
        write_spec(folder, f"spec_{index}", input_video_path="clip.mp4")
    return folder


def conf(folder: Path, out: Path, **extra) -> dict:
    return {"input_dir": str(folder), "output_dir": str(out), **FAST, **extra}


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def worker_pids(output_dir: Path) -> list[int]:
    """The workers of jobs under output_dir (other sessions may run workers of their own)."""
    found = subprocess.run(["pgrep", "-f", "docker/upsampler/worker.py"], capture_output=True, text=True).stdout
    pids = []
    for pid in map(int, found.split()):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if f"--job-dir {output_dir}/jobs/" in command:
            pids.append(pid)
    return pids


class LiveRun:
    """`airflow dags test` in the background, its output collected as it comes (task logs stream to stdout)."""

    def __init__(self, env: dict[str, str], run_conf: dict) -> None:
        self.process = subprocess.Popen(
            [str(Path(sys.executable).parent / "airflow"), "dags", "test", DAG_ID, "-c", json.dumps(run_conf)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait(self, timeout: float = 600) -> str:
        self.process.wait(timeout)
        self._reader.join(10)
        return self.output

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self._reader.join(10)

    def tail(self) -> str:
        return "".join(self.lines[-60:])


@pytest.fixture
def live_runs(airflow_home):
    """Starts `airflow dags test` runs; whatever a failed test leaves running is killed, its output shown."""
    runs: list[LiveRun] = []

    def start(run_conf: dict, extra_env: dict[str, str] | None = None) -> LiveRun:
        runs.append(LiveRun({**airflow_home, **(extra_env or {})}, run_conf))
        return runs[-1]

    yield start
    for run in runs:
        if run.process.poll() is None:
            print(f"--- run left running, killed; its last output:\n{run.tail()}")
            run.kill()


def stop_worker_mid_job(run: LiveRun, out: Path, answers_before: int) -> int:
    """Once the worker has a new answer, freeze it (it keeps its job lock) and let the task log catch up."""
    wait_for(lambda: len(ledger_entries(out)) > answers_before and worker_pids(out), "a new answer")
    assert run.process.poll() is None, run.tail()
    [pid] = worker_pids(out)
    os.kill(pid, signal.SIGSTOP)
    wait_for(lambda: model_calls(run.output) == len(ledger_entries(out)) - answers_before,
             "the task log to show every answer", timeout=30)
    return pid


@pytest.mark.e2e
def test_worker_killed_mid_job_loses_and_repays_nothing(airflow_home, tmp_path):
    folder, out = small_input(tmp_path / "in", 3), tmp_path / "out"
    before, outside = tree_digest(folder), tree_listing(tmp_path, out)
    # The worker SIGKILLs itself after two answers: the first attempt dies, the retry does the third spec.
    result = run_dag(airflow_home, conf(folder, out), extra_env={DIE_AFTER_ENV: "2"})
    report = latest_report(out)
    assert report["counts"]["upsampled"] == 3
    assert_invariants(folder, out, before, report, outside=(tmp_path, outside),
                      outputs=(result.stdout + result.stderr,))
    entries = ledger_entries(out)
    assert len(entries) == 3 and len({entry["worker_run"] for entry in entries}) == 2


@pytest.mark.e2e
def test_killed_task_resumes_and_a_stray_worker_cannot_race(live_runs, tmp_path):
    folder, out = small_input(tmp_path / "in", 5), tmp_path / "out"
    before, outside = tree_digest(folder), tree_listing(tmp_path, out)

    # Run A: the task's whole process tree is killed mid-job.
    first = live_runs(conf(folder, out))
    worker = stop_worker_mid_job(first, out, 0)
    first.kill()
    os.kill(worker, signal.SIGKILL)
    after_first = len(ledger_entries(out))
    assert 1 <= after_first < 5

    # Run B resumes: the finished answers stay, the rest is a new job. Kill only its task process this time; the
    # worker survives it, frozen, still holding its job: a stray.
    second = live_runs(conf(folder, out))
    stray = stop_worker_mid_job(second, out, after_first)
    second.kill()
    after_second = len(ledger_entries(out))
    assert after_first < after_second < 5

    # Run C gets the very job the stray holds; its worker refuses to race (exit 75) and the task fails this try.
    # Once the stray is gone, the task's retry does only what is left.
    third = live_runs(conf(folder, out))
    # (A worker of another job would instead wait for the stray's GPU lock, then redo the stray's items.)
    wait_for(lambda: any(words in third.output for words in ("held by another worker", "waiting for the GPU"))
             or third.process.poll() is not None, "the stray to be detected")
    os.kill(stray, signal.SIGKILL)
    assert "held by another worker" in third.output, f"the re-run did not wait for the stray's job:\n{third.tail()}"
    output = third.wait()
    assert "state=success" in output, third.tail()

    report = latest_report(out)
    assert report["counts"]["upsampled"] == 5
    assert_invariants(folder, out, before, report, outside=(tmp_path, outside),
                      outputs=(first.output, second.output, third.output))
    entries = ledger_entries(out)
    assert len(entries) == 5 and len({entry["worker_run"] for entry in entries}) == 3


@pytest.mark.e2e
def test_a_stalled_worker_is_stopped_by_the_watchdog_and_the_retry_finishes(live_runs, tmp_path):
    """A worker that holds its GPU and stops answering (frozen with SIGSTOP after its first answer) keeps its task
    and GPU slot forever without the watchdog: here it is killed after stall_timeout_seconds, the try fails, and the
    retry answers only what is left."""
    folder, out = small_input(tmp_path / "in", 3), tmp_path / "out"
    before, outside = tree_digest(folder), tree_listing(tmp_path, out)
    # The bound must exceed a model load plus one answer on this shared machine (up to ~15 s seen); a frozen worker
    # never answers, whatever the bound.
    run = live_runs(conf(folder, out, max_output_tokens=16), {"COSMOS_UPSAMPLE_STALL_TIMEOUT_SECONDS": "45"})
    frozen = stop_worker_mid_job(run, out, 0)
    try:
        output = run.wait(timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the run hung with its frozen worker:\n{run.tail()}")
    assert "state=success" in output, run.tail()
    assert "no new answer for 45 s while its worker held the GPU (stall_timeout_seconds)" in output
    assert f"worker pid {frozen} was stopped" in output
    assert not Path(f"/proc/{frozen}").exists() or "zombie" in Path(f"/proc/{frozen}/status").read_text().lower()
    report = latest_report(out)
    assert report["counts"]["upsampled"] == 3
    assert_invariants(folder, out, before, report, outside=(tmp_path, outside), outputs=(output,))
    entries = ledger_entries(out)
    assert len(entries) == 3 and len({entry["worker_run"] for entry in entries}) == 2


@pytest.mark.e2e
def test_an_upsample_try_past_its_timeout_is_stopped_and_its_items_say_so(live_runs, tmp_path):
    """A worker that hangs before it takes the GPU (here an interpreter that never starts the program) is outside the
    watchdog; the upsample task's execution_timeout (COSMOS_UPSAMPLE_UPSAMPLE_TIMEOUT_SECONDS) stops each try, and
    after the last one every item says so."""
    folder, out = small_input(tmp_path / "in", 2), tmp_path / "out"
    hangs, started = tmp_path / "hanging-python", tmp_path / "hung-pids"
    hangs.write_text(f"#!/bin/sh\necho $$ >> '{started}'\nexec sleep 3600\n")
    hangs.chmod(0o755)
    run = live_runs(conf(folder, out, **TOLERANT), {"COSMOS_UPSAMPLE_WORKER_PYTHON": str(hangs),
                                                   "COSMOS_UPSAMPLE_UPSAMPLE_TIMEOUT_SECONDS": "4"})
    try:
        output = run.wait(timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the upsample task never timed out:\n{run.tail()}")
    finally:
        pids = [int(pid) for pid in started.read_text().split()] if started.exists() else []
        alive = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
        for pid in alive:
            os.kill(pid, signal.SIGKILL)
    assert len(pids) == 4 and not alive, (pids, alive)  # one hung worker per try, each killed with its try
    report = latest_report(out)
    assert report["counts"]["failed"] == 2, report["items"]
    for item in report["items"]:
        assert "did not finish (try 4, upsample): timed out after 4 s (COSMOS_UPSAMPLE_UPSAMPLE_TIMEOUT_SECONDS)" \
            in item["reason"], item["reason"]
    assert output.count("Task timed out") >= 1 or "AirflowTaskTimeout" in output, run.tail()


class Mounts:
    """Small tmpfs mounts inside output_dir: root ignores permissions, so "full" and "read-only" need a real
    file system that is full or mounted read-only."""

    def __init__(self) -> None:
        self.mounted: list[Path] = []

    def mount(self, path: Path, *, full: bool = False, read_only: bool = False) -> None:
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); a full or read-only output folder is "
                        "only testable as root with CAP_SYS_ADMIN")
        self.mounted.append(path)
        if full:
            with (path / "filler").open("wb", buffering=0) as handle:
                try:
                    while True:
                        handle.write(b"\0" * 4096)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)

    def unmount(self, path: Path) -> None:
        subprocess.run(["umount", str(path)], check=True)
        self.mounted.remove(path)

    def unmount_all(self) -> None:
        for path in reversed(self.mounted):
            subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def mounts():
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    made = Mounts()
    yield made
    made.unmount_all()


def assert_all_failed(report: dict, count: int, *words: str) -> None:
    assert report["counts"]["failed"] == count == report["counts"]["discovered"]
    for item in report["items"]:
        assert item["reason"].startswith(f"{Path(item['source_path']).name}: "), item["reason"]
        for word in words:
            assert word in item["reason"], item["reason"]


@pytest.mark.e2e
def test_full_or_read_only_output_folder_fails_items_then_a_rerun_completes_them(airflow_home, tmp_path, mounts):
    folder, out = small_input(tmp_path / "in", 3), tmp_path / "out"
    before, outside = tree_digest(folder), tree_listing(tmp_path, out)
    outputs: list[str] = []

    def run(**extra) -> dict:
        result = run_dag(airflow_home, conf(folder, out, **extra))
        outputs.append(result.stdout + result.stderr)
        report = latest_report(out)
        assert_invariants(folder, out, before, report, outside=(tmp_path, outside), outputs=tuple(outputs))
        return report

    # 1. No room for hint frames: every spec fails at validation (the videos are fine), no model is called.
    mounts.mount(out / "hints", full=True)
    assert_all_failed(run(**TOLERANT), 3, "No space left on device", str(out / "hints"))
    assert not ledger_entries(out)
    mounts.unmount(out / "hints")

    # 2. specs/ read-only: the model answers, but no output can be written; the answers are kept.
    mounts.mount(out / "specs", read_only=True)
    assert_all_failed(run(**TOLERANT), 3, "Read-only file system", str(out / "specs"))
    assert len(ledger_entries(out)) == 3
    mounts.unmount(out / "specs")

    # 3. specs/ full: same, and no half-written file is left behind (checked by assert_invariants).
    mounts.mount(out / "specs", full=True)
    assert_all_failed(run(**TOLERANT), 3, "No space left on device", str(out / "specs"))
    assert sorted(path.name for path in (out / "specs").iterdir()) == ["filler"]
    mounts.unmount(out / "specs")

    # 4. Fixed: the outputs are written from the kept answers; no model call is paid again.
    report = run()
    assert report["counts"]["upsampled"] == 3
    assert len(ledger_entries(out)) == 3 and model_calls(outputs[-1]) == 0


@pytest.mark.e2e
def test_an_output_in_the_way_fails_its_item_and_the_answer_is_not_paid_again(airflow_home, tmp_path):
    folder, out = small_input(tmp_path / "in", 3), tmp_path / "out"
    before, outside = tree_digest(folder), tree_listing(tmp_path, out)
    (out / "specs" / "spec_0.json").mkdir(parents=True)  # a folder where the output file should go
    first = run_dag(airflow_home, conf(folder, out, **TOLERANT))
    report = latest_report(out)
    outputs = (first.stdout + first.stderr,)
    assert_invariants(folder, out, before, report, outside=(tmp_path, outside), outputs=outputs)
    items = {item["spec_id"]: item for item in report["items"]}
    assert items["spec_0"]["status"] == "failed"
    assert str(out / "specs" / "spec_0.json") in items["spec_0"]["reason"]
    assert "Is a directory" in items["spec_0"]["reason"]
    # The model saw it: its engine count is reported although the answer could not be written.
    assert items["spec_0"]["tokens"]["engine"] == items["spec_0"]["tokens"]["prompt"]
    assert items["spec_1"]["status"] == items["spec_2"]["status"] == "upsampled"

    # The folder is removed; the re-run writes spec_0 from its kept answer (the others are cached). Its job would
    # now hold only spec_0, a job of another name: the answer must be found in the first job's ledger.
    shutil.rmtree(out / "specs" / "spec_0.json")
    second = run_dag(airflow_home, conf(folder, out))
    report = latest_report(out)
    assert report["counts"] == {"discovered": 3, "upsampled": 1, "cached": 2, "invalid": 0, "failed": 0,
                                "flagged": 0}
    assert_invariants(folder, out, before, report, outside=(tmp_path, outside),
                      outputs=(*outputs, second.stdout + second.stderr))
    assert len(ledger_entries(out)) == 3


def test_a_validation_that_never_finished_is_reported_as_failed(tmp_path):
    """The validate task of a chunk failed for good (killed, out of memory): merge and report (trigger rule
    all_done) still run, and that chunk's specs are failed items, not missing ones."""
    folder, out = small_input(tmp_path / "in", 2), tmp_path / "out"
    before = tree_digest(folder)
    run_dir, chunks = stages.discover({"input_dir": str(folder), "output_dir": str(out)}, "manual__crashed",
                                      lambda _key: None, {})
    assert chunks  # ... and no validate_chunk(chunk) ever finished
    stages.merge(str(run_dir), "manual__crashed")
    with pytest.raises(RuntimeError, match="more than max_failure_ratio"):
        stages.report(str(run_dir), "manual__crashed", DAG_ID, "2026-01-01T00:00:00+00:00")
    report = latest_report(out)
    assert_invariants(folder, out, before, report)
    assert_all_failed(report, 2, "did not finish", "chunk-0000")


def test_a_crash_on_one_spec_fails_only_that_spec(tmp_path, monkeypatch):
    from include.cosmos_upsample import validate
    from include.cosmos_upsample.layout import OutputLayout
    from include.cosmos_upsample.settings import Settings

    folder = small_input(tmp_path / "in", 2)
    real_load_spec = validate.load_spec

    # Not the probe: the specs share one video, probed once per process.
    def load_spec(path: Path):
        if path.name == "spec_0.json":
            raise RuntimeError("parser exploded")
        return real_load_spec(path)

    monkeypatch.setattr(validate, "load_spec", load_spec)
    settings = Settings(input_dir=str(folder), output_dir=str(tmp_path / "out"), backend="vllm", dry_run=True)
    entries = [{"source_path": str(folder / f"spec_{index}.json"), "key": f"k{index}"} for index in range(2)]
    items = validate.validate_entries(entries, settings, OutputLayout.at(settings.output_dir))
    assert [item.status for item in items] == ["failed", "valid"]
    assert items[0].reason.startswith("spec_0.json: validation crashed (RuntimeError: parser exploded)")


def test_a_second_worker_on_a_held_job_exits_75_and_pays_nothing(tmp_path):
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "manifest.json").write_text(json.dumps({
        "job_key": "j", "backend": "llama_cpp", "model": "/nonexistent.gguf", "max_model_len": 4096,
        "max_output_tokens": 8, "items": [{"key": "k", "spec_id": "s", "text": "A cup."}]}))
    with (job_dir / ".lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the first worker, still running
        second = subprocess.run([sys.executable, str(WORKER), "--job-dir", str(job_dir)], capture_output=True,
                                text=True, timeout=60, env=worker_environment())  # as the runner starts it
    assert second.returncode == 75
    assert "held by another worker" in second.stderr
    assert not (job_dir / "ledger.jsonl").exists()


def pids_reading(path: Path) -> list[int]:
    """Processes whose command line names `path`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(path).encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_a_hung_decode_makes_its_spec_invalid_not_the_chunk(tmp_path):
    """The first ffprobe/ffmpeg that reads one spec's video is frozen (SIGSTOP), as a decode on a stalled mount or of
    a pathological file hangs: that spec is invalid once ffmpeg_timeout_seconds pass, and the chunk's others go on."""
    from include.cosmos_upsample import validate
    from include.cosmos_upsample.layout import OutputLayout
    from include.cosmos_upsample.settings import Settings

    folder = small_input(tmp_path / "in", 2)
    stalls = make_video(folder / "stalls.mp4", 1920, 1080, seconds=2)
    write_spec(folder, "stalls", input_video_path="stalls.mp4")
    settings = Settings(input_dir=str(folder), output_dir=str(tmp_path / "out"), ffmpeg_timeout_seconds=10)
    entries = [{"source_path": str(folder / f"{stem}.json"), "key": stem} for stem in ("spec_0", "stalls", "spec_1")]
    frozen: list[int] = []
    finished = threading.Event()

    def freeze() -> None:
        while not finished.is_set() and not frozen:
            for pid in pids_reading(stalls):
                os.kill(pid, signal.SIGSTOP)
                frozen.append(pid)
                break
            time.sleep(0.002)

    items: list = []
    validation = threading.Thread(target=lambda: items.extend(
        validate.validate_entries(entries, settings, OutputLayout.at(settings.output_dir))), daemon=True)
    threading.Thread(target=freeze, daemon=True).start()
    validation.start()
    validation.join(180)
    finished.set()
    try:
        assert frozen, "no ffprobe/ffmpeg of stalls.mp4 was caught to freeze"
        assert not validation.is_alive(), "validation hung with the frozen decode"
    finally:
        for pid in frozen:  # only needed when the bound did not work (it kills what it stopped)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    by_stem = {Path(item.source_path).stem: item for item in items}
    assert by_stem["stalls"].status == "invalid", by_stem["stalls"]
    assert by_stem["stalls"].reason.startswith("stalls.json: ") and "did not finish within 10 s" in \
        by_stem["stalls"].reason
    assert by_stem["spec_0"].status == by_stem["spec_1"].status == "valid"
    assert not pids_reading(stalls)
