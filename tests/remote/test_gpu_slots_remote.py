"""GPU slots on the test bed (podman has no GPUs, so the slots are declared and the llama.cpp backend runs): jobs on
different slots run at once, a job on a busy slot waits, and a container that outlived its killed task is adopted,
never doubled."""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from include.cosmos_upsample.jobformat import Job, JobItem, Ledger
from include.cosmos_upsample.layout import RunFolder
from include.cosmos_upsample.settings import Settings
from tests.helpers import latest_report, make_video, write_spec
from tests.remote.conftest import (
    CONN_ID,
    WORKER_IMAGE,
    deployment_env,
    docker_conf,
    run_docker_job,
    ssh_connection,
)

pytestmark = pytest.mark.remote

FAST = {"max_output_tokens": 24}  # short answers: the point is placement, not prose


def engine_time(value: str) -> float:
    """podman's RFC 3339 times carry nanoseconds; Python takes microseconds."""
    head, _, rest = value.partition(".")
    fraction = "".join(ch for ch in rest if ch.isdigit())[:6]
    zone = rest[len("".join(ch for ch in rest if ch.isdigit())):] or "Z"
    return dt.datetime.fromisoformat(f"{head}.{fraction or '0'}{zone.replace('Z', '+00:00')}").timestamp()


def local_job(root: Path, name: str, items: int) -> dict:
    job_dir = root / "jobs" / name
    job_dir.mkdir(parents=True)
    job = Job(job_key=name, backend="llama_cpp", model="m", max_model_len=2048, max_output_tokens=24,
              items=tuple(JobItem(f"{name}-{i}", f"{name}-{i}", f"Describe a robot arm, take {i}.")
                          for i in range(items)))
    (job_dir / "manifest.json").write_text(json.dumps(job.to_manifest()))
    return {"job_key": name, "job_dir": str(job_dir), "conn_id": CONN_ID, "items": items}


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_two_slots_run_two_jobs_at_once_and_a_third_waits(testbed, tmp_path, monkeypatch):
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", ssh_connection(testbed, gpus=[0, 1]))
    settings = Settings(runner="docker", gpu_conn_ids=[CONN_ID], worker_image=WORKER_IMAGE,
                        host_model_dir=f"{testbed['COSMOS_TESTBED_DIR']}/models",
                        host_work_dir=deployment_env(testbed)["COSMOS_UPSAMPLE_HOST_WORK_DIR"], ledger_sync_seconds=0.5,
                        **FAST)
    run = os.urandom(4).hex()
    jobs = [{**local_job(tmp_path, f"slots-{run}-{n}", 3), "slot": slot} for n, slot in enumerate((0, 1, 0))]
    results: dict[int, dict] = {}
    errors: list[BaseException] = []

    def run_job(index: int) -> None:
        try:
            results[index] = run_docker_job(settings, jobs[index])
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    # The runner (starting) and its trigger (following: the "worker |" lines and ledger copies) log under the package.
    runner_log, collected = logging.getLogger("include.cosmos_upsample"), Collect()
    runner_log.addHandler(collected)
    runner_log.setLevel(logging.INFO)
    threads = [threading.Thread(target=run_job, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    # The third is planned on slot 0 and must find both slots busy: wait for the first two containers to exist (a
    # fixed pause was too short under load, and the third then took slot 0 first).
    wait_for(lambda: all(host_containers(testbed, jobs[index]["job_key"]) or index in results for index in (0, 1)),
             120, "the first two jobs' containers")
    threads.append(threading.Thread(target=run_job, args=(2,)))
    threads[-1].start()
    for thread in threads:
        thread.join(timeout=300)
    runner_log.removeHandler(collected)
    text = "\n".join(collected.lines)
    assert not errors, errors
    first, second, third = (results[index] for index in range(3))
    # Two slots, two locks; the third job shares slot 0's lock and waited for it.
    assert {first["slot_lock"], second["slot_lock"]} == {".gpu-0.lock", ".gpu-1.lock"}
    assert third["slot_lock"] == first["slot_lock"] == ".gpu-0.lock"
    # The first two containers overlapped in time, as the engine saw it.
    starts = [engine_time(result["started_at"]) for result in (first, second)]
    ends = [engine_time(result["finished_at"]) for result in (first, second)]
    assert max(starts) < min(ends), (starts, ends)
    # The two jobs of slot 0 took turns (whichever got the lock first): no answer of one between the other's.
    third_answers = [entry["finished_at"] for entry in Ledger.of(Path(jobs[2]["job_dir"])).entries()]
    first_answers = [entry["finished_at"] for entry in Ledger.of(Path(jobs[0]["job_dir"])).entries()]
    assert len(third_answers) == len(first_answers) == 3
    assert min(third_answers) > max(first_answers) or min(first_answers) > max(third_answers)
    assert "waiting for the GPU: another job holds /work/.gpu-0.lock" in text
    # While the containers ran, their ledgers came back in steps, not only at the end.
    assert len([line for line in text.splitlines() if "bytes here" in line]) >= 3


def host_containers(testbed: dict[str, str], job_key: str, running: bool = False) -> list[str]:
    env = {**os.environ, **{k: testbed[k] for k in ("CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF")}}
    every = [] if running else ["-a"]
    return subprocess.run(["podman", "ps", *every, "--no-trunc", "--filter", f"label=cosmos-upsample.job={job_key}",
                           "--format", "{{.ID}}"], env=env, capture_output=True, text=True, check=True).stdout.split()


def host_container_of(log: str) -> str:
    """The container id the re-run's log names as adopted."""
    marker = "in container "
    return log[log.index(marker) + len(marker):].split()[0]


def airflow_dags_test(conf: dict, env: dict[str, str], **popen) -> subprocess.Popen:
    return subprocess.Popen([str(Path(sys.executable).parent / "airflow"), "dags", "test", "cosmos_prompt_upsample",
                             "-c", json.dumps(conf)], env=env, **popen)


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_container_outliving_its_killed_task_is_adopted_not_doubled(airflow_home, testbed, tmp_path):
    folder, out = tmp_path / "in", tmp_path / "out"
    make_video(folder / "clip.mp4")
    for index in range(4):
        write_spec(folder, f"adopt_{index}", input_video_path="clip.mp4")
    env = {**airflow_home, **deployment_env(testbed, **{CONN_ID: ssh_connection(testbed, gpus=[0])}),
           "COSMOS_UPSAMPLE_LEDGER_SYNC_SECONDS": "0.5"}
    conf = docker_conf(folder, out, batch_max_items=4, **FAST)
    # Another job holds the only slot, so the container waits for the GPU, alive, across the kill and the re-run.
    slot_lock = Path(env["COSMOS_UPSAMPLE_HOST_WORK_DIR"]) / ".gpu-0.lock"
    slot_lock.parent.mkdir(parents=True, exist_ok=True)
    with slot_lock.open("a") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        first = airflow_dags_test(conf, env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        try:
            wait_for(lambda: list((out / "jobs").glob("*/host.json")), 240, "the first run's container")
            job_key = next((out / "jobs").glob("*/host.json")).parent.name
            wait_for(lambda: host_containers(testbed, job_key, running=True), 60, "the container to run")
        finally:
            os.killpg(first.pid, signal.SIGKILL)  # the Airflow worker dies; the container on the host does not
            first.wait()
        (container,) = host_containers(testbed, job_key, running=True)
        second = airflow_dags_test(conf, env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: [lines.append(line) for line in second.stdout], daemon=True)
        reader.start()
        # The slot stays held until the re-run's upsample task has found the container (its log says so), so the
        # container cannot finish before it is adopted.
        adopted = "adopting it, not starting another"
        wait_for(lambda: any(adopted in line for line in lines) or second.poll() is not None, 240,
                 "the re-run to adopt the container")
    second.wait(timeout=300)  # the slot is free now: the adopted container answers
    reader.join(30)
    log = "".join(lines)
    runs = out / "runs"
    assert latest_report(out)["counts"]["upsampled"] == 4, log[-5000:]
    rerun = RunFolder.at(max(runs.glob("*/plans"), key=lambda path: path.stat().st_mtime).parent)
    # The re-run kept the running job whole (same key, all four items) instead of re-planning its items...
    assert [(job["job_key"], job["items"]) for job in rerun.planned_jobs()[0]] == [(job_key, 4)]
    assert "adopting it, not starting another" in log and "started container" not in log
    # ...and that one container, one model load, answered every item exactly once.
    entries = Ledger.of(out / "jobs" / job_key).entries()
    assert sorted(entry["spec_id"] for entry in entries) == [f"adopt_{index}" for index in range(4)]
    assert len({entry["worker_run"] for entry in entries}) == 1
    assert host_container_of(log) == container[:12]
    assert not host_containers(testbed, job_key)  # the adopting task removed it when it ended


def test_gpus_that_cannot_be_listed_stop_the_job_and_never_widen_it(testbed, tmp_path, monkeypatch):
    """The test bed has no nvidia-smi, so a host declared `"gpus": "auto"` cannot be asked. A job planned on GPU 1
    must not fall back to "every GPU" under the host-wide lock while other jobs hold their GPUs' own locks (two jobs
    on one GPU): the try fails (retried) and nothing is started."""
    from include.cosmos_upsample.gpu_slots import GpuDiscoveryFailed

    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", ssh_connection(testbed, gpus="auto"))
    host_work_dir = deployment_env(testbed)["COSMOS_UPSAMPLE_HOST_WORK_DIR"]
    settings = Settings(runner="docker", gpu_conn_ids=[CONN_ID], worker_image=WORKER_IMAGE, host_work_dir=host_work_dir,
                        host_model_dir=f"{testbed['COSMOS_TESTBED_DIR']}/models", ledger_sync_seconds=0.5, **FAST)
    job = {**local_job(tmp_path, f"auto-{os.urandom(4).hex()}", 1), "slot": 1, "devices": ["1"]}
    with pytest.raises(GpuDiscoveryFailed, match=f"GPU host {CONN_ID}: could not list its GPUs with nvidia-smi"):
        run_docker_job(settings, job)
    assert not host_containers(testbed, job["job_key"])
    assert not Ledger.of(Path(job["job_dir"])).entries()
