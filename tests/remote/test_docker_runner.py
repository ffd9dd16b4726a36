"""Runner `docker` for real: SFTP staging over sshd, the worker image run by DockerOperator through podman's Docker
API reached over SSH (`docker system dial-stdio`), the ledger fetched back; with faults injected."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path, PurePosixPath

import paramiko
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from include.cosmos_upsample.ssh_hosts import open_verified, ssh_hook
from include.cosmos_upsample.staging import RemoteJob, stage_job
from tests.helpers import latest_report, make_video, run_dag, write_spec
from tests.remote.conftest import CONN_ID, deployment_env, docker_conf, host_work_dir, ssh_connection
from tests.remote.proxy import CuttingProxy

pytestmark = pytest.mark.remote


def spec_folder(root: Path, count: int, size=(320, 180)) -> Path:
    folder = root / "in"
    make_video(folder / "clip.mp4", *size)
    for index in range(count):
        write_spec(folder, f"remote_{index}", input_video_path="clip.mp4")
    return folder


def ledger_calls(output_dir: Path) -> list[dict]:
    return [json.loads(line) for ledger in (output_dir / "jobs").glob("*/ledger.jsonl")
            for line in ledger.read_text().splitlines()]


def test_jobs_run_in_the_worker_container_on_the_gpu_host(airflow_home, testbed, tmp_path):
    folder, out = spec_folder(tmp_path, 3), tmp_path / "out"
    run_dag(airflow_home, docker_conf(folder, out, batch_max_items=2),
            extra_env=deployment_env(testbed, **{CONN_ID: ssh_connection(testbed)}))
    report = latest_report(out)
    assert report["counts"]["upsampled"] == 3 and report["counts"]["failed"] == 0
    calls = ledger_calls(out)
    assert sorted(call["spec_id"] for call in calls) == ["remote_0", "remote_1", "remote_2"]
    assert {call["model"] for call in calls} == {"/models/SmolLM2-135M-Instruct.Q4_1.gguf"}
    assert len({call["worker_run"] for call in calls}) == 2  # two jobs, one model load each
    for spec_id in ("remote_0", "remote_1", "remote_2"):
        assert json.loads((out / "specs" / f"{spec_id}.json").read_text())["is_upsampled"] is True
    # On the host: the job folder with the staged manifest and the ledger; the frames are named by content.
    host_jobs = host_work_dir(testbed)
    for job in {path.parent.name for path in (out / "jobs").glob("*/manifest.json")}:
        manifest = json.loads((host_jobs / job / "manifest.json").read_text())
        assert manifest["model"].startswith("/models/")
        assert (host_jobs / job / "ledger.jsonl").exists()


def podman(testbed: dict[str, str], *args: str) -> str:
    podman_env = {**os.environ, **{k: testbed[k] for k in ("CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF")}}
    return subprocess.run(["podman", *args], env=podman_env, capture_output=True, text=True).stdout


def at_first_answer(testbed: dict[str, str], host_jobs: Path, stop: threading.Event, act) -> list[str]:
    """Watch this checkout's host ledgers; at the first answer, `act(container_id)` on that job's running worker
    container (once). Returns the containers acted on."""
    done: list[str] = []

    def watch() -> None:
        while not stop.is_set() and not done:
            for ledger in host_jobs.glob("*/ledger.jsonl"):
                if ledger.stat().st_size:
                    label = f"label=cosmos-upsample.job={ledger.parent.name}"
                    for container in podman(testbed, "ps", "--filter", label, "--format", "{{.ID}}").split():
                        act(container)
                        done.append(container)
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()
    return done


def kill_container_after_first_answer(testbed: dict[str, str], host_jobs: Path, stop: threading.Event) -> list[str]:
    """At the first answer, `podman kill` the running worker container (once)."""
    return at_first_answer(testbed, host_jobs, stop, lambda container: podman(testbed, "kill", container))


def test_container_killed_mid_job_resumes_without_paying_twice(airflow_home, testbed, tmp_path):
    folder, out = spec_folder(tmp_path, 4), tmp_path / "out"
    host_jobs = host_work_dir(testbed)
    stop = threading.Event()
    for stale in host_jobs.glob("*/ledger.jsonl"):
        stale.unlink()  # earlier tests' ledgers would trigger the watcher at once
    killed = kill_container_after_first_answer(testbed, host_jobs, stop)
    try:
        run_dag(airflow_home, docker_conf(folder, out),
                extra_env=deployment_env(testbed, **{CONN_ID: ssh_connection(testbed)}))
    finally:
        stop.set()
    assert len(killed) == 1, killed
    assert latest_report(out)["counts"]["upsampled"] == 4
    calls = ledger_calls(out)
    # Every spec answered exactly once, by two worker runs: the killed one and the retry.
    assert sorted(call["spec_id"] for call in calls) == [f"remote_{index}" for index in range(4)]
    assert len({call["worker_run"] for call in calls}) == 2


def test_a_stalled_container_is_stopped_by_the_watchdog_and_the_retry_finishes(airflow_home, testbed, tmp_path):
    """The worker in its container holds the GPU and stops answering (its process frozen with SIGSTOP from the host
    after its first answer): after stall_timeout_seconds without a new ledger line the task stops the container and
    fails the try; the retry's container answers only the rest."""
    folder, out = spec_folder(tmp_path, 4), tmp_path / "out"
    stop = threading.Event()
    frozen = at_first_answer(testbed, host_work_dir(testbed), stop, lambda container: os.kill(
        int(podman(testbed, "inspect", "--format", "{{.State.Pid}}", container)), signal.SIGSTOP))
    env = {**deployment_env(testbed, **{CONN_ID: ssh_connection(testbed)}), "COSMOS_UPSAMPLE_LEDGER_SYNC_SECONDS": "1",
           "COSMOS_UPSAMPLE_STALL_TIMEOUT_SECONDS": "45"}  # above a model load plus one answer here
    try:
        result = run_dag(airflow_home, docker_conf(folder, out, max_output_tokens=16), extra_env=env)
    finally:
        stop.set()
    assert len(frozen) == 1, frozen
    log = result.stdout + result.stderr
    assert "no new answer for 45 s while its worker held the GPU (stall_timeout_seconds)" in log
    assert f"its container {frozen[0][:12]} on {CONN_ID} was stopped" in log
    assert latest_report(out)["counts"]["upsampled"] == 4
    calls = ledger_calls(out)
    assert sorted(call["spec_id"] for call in calls) == [f"remote_{index}" for index in range(4)]
    assert len({call["worker_run"] for call in calls}) == 2
    assert not podman(testbed, "ps", "-a", "--filter", f"id={frozen[0]}", "--format", "{{.ID}}").strip()


def test_ssh_dropped_mid_sftp_then_the_retry_sends_only_what_is_missing(testbed, tmp_path, monkeypatch):
    """Staging as the `upsample` task does it, over a link that drops inside the frame upload."""
    frames = []
    for index in range(4):
        frame = tmp_path / f"frame-{index}.jpg"
        frame.write_bytes(os.urandom(120_000))  # incompressible, so the cut lands inside the upload
        frames.append(str(frame))
    manifest = {"job_key": "sftpdrop", "backend": "vllm", "model": "m", "max_model_len": 4096,
                "max_output_tokens": 300, "sampling": {},
                "items": [{"key": f"k{i}", "spec_id": f"s{i}", "text": "t", "frames": frames[2 * i:2 * i + 2]}
                          for i in range(2)]}
    job = RemoteJob(CONN_ID, f"sftpdrop-{uuid.uuid4().hex[:12]}", PurePosixPath(host_work_dir(testbed)),
                    PurePosixPath("/models"))
    with CuttingProxy(int(testbed["COSMOS_TESTBED_SSH_PORT"]), cut_after=250_000) as proxy:
        monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", ssh_connection(testbed, port=proxy.port))
        first = open_verified(ssh_hook(CONN_ID))
        with pytest.raises((OSError, EOFError, paramiko.SSHException)):
            with first.open_sftp() as sftp:
                stage_job(sftp, job, manifest, "m")
        first.close()
        assert proxy.cuts == 1
        host_frames = Path(str(job.frames_dir))
        complete_before = [path for path in host_frames.iterdir() if not path.name.startswith(".")]
        assert 0 < len(complete_before) < 4  # some frames made it, none half-written under its real name
        retry = open_verified(ssh_hook(CONN_ID))
        with retry.open_sftp() as sftp:
            sent = stage_job(sftp, job, manifest, "m")
        retry.close()
    assert sent == 4 - len(complete_before)
    staged = json.loads(Path(str(job.manifest)).read_text())
    for item in staged["items"]:
        for frame in item["frames"]:
            assert (Path(str(job.job_dir)) / frame).stat().st_size == 120_000


def test_refused_and_unreachable_hosts_end_as_failed_items_with_reasons(airflow_home, testbed, tmp_path):
    folder, out = spec_folder(tmp_path, 3), tmp_path / "out"
    wrong_key = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        down_port = closed.getsockname()[1]  # nothing listens there once the socket is closed
    # A port the machine's known_hosts has never seen, so only the connection's pinned key can vouch for it.
    with CuttingProxy(int(testbed["COSMOS_TESTBED_SSH_PORT"]), cut_after=None) as proxy:
        connections = {"gpu_unknown": ssh_connection(testbed, port=proxy.port, host_key=None),
                       "gpu_changed": ssh_connection(testbed, port=proxy.port, host_key=wrong_key),
                       "gpu_down": ssh_connection(testbed, port=down_port)}
        result = run_dag(airflow_home, docker_conf(folder, out, conn_ids=list(connections), batch_max_items=1),
                         extra_env=deployment_env(testbed, **connections), expect_success=False)
    report = latest_report(out)
    assert report["counts"]["failed"] == 3 and report["state"] == "failed"
    reasons = sorted(item["reason"] for item in report["items"])
    assert any("is not known" in reason and "host_key" in reason for reason in reasons), reasons
    assert any("different host key" in reason for reason in reasons), reasons
    assert any("is unreachable" in reason for reason in reasons), reasons
    assert not (out / "specs").exists()
    # Host-key refusals fail at once; only the unreachable host is retried (4 tries of its one job).
    log = result.stdout + result.stderr
    assert log.count("is unreachable") >= 4
    assert log.count("is not known") <= 2
