"""Runner `docker`: a job on a GPU host reached over SSH, in the worker image, started by Airflow's DockerOperator.

For each job: stage the manifest and hint frames to the host over SFTP (frames named by content, so a retry sends
only what is missing) -> run the worker container against the host's Docker engine over SSH -> fetch the ledger back,
whatever happened, so the merge sees every finished item. The ledger lives on the host, next to the job; the worker
skips what it already holds, so a retried task or a container that died mid-job redoes only the unfinished items.

No shell string is ever built: SFTP calls and the Docker API take paths and argument lists as values.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from include.cosmos_upsample.errors import NotRetryable
from include.cosmos_upsample.layout import read_json
from include.cosmos_upsample.runners import GPU_LOCK_NAME
from include.cosmos_upsample.settings import DEFAULT_MODELS, Settings

log = logging.getLogger(__name__)

# The host's work folder (all its jobs and the GPU lock) appears in the container here.
CONTAINER_WORK_DIR = PurePosixPath("/work")
CONTAINER_MODEL_DIR = PurePosixPath("/models")
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class HostKeyError(NotRetryable):
    """The GPU host's SSH key is unknown or changed: refused, never auto-accepted."""


@dataclass(frozen=True)
class RemoteJob:
    """Where one job lives on its GPU host, and where the container sees it."""

    conn_id: str
    job_key: str
    host_work_dir: PurePosixPath
    host_model_dir: PurePosixPath

    @property
    def job_dir(self) -> PurePosixPath:
        return self.host_work_dir / self.job_key

    @property
    def frames_dir(self) -> PurePosixPath:
        return self.job_dir / "frames"

    @property
    def manifest(self) -> PurePosixPath:
        return self.job_dir / "manifest.json"

    @property
    def ledger(self) -> PurePosixPath:
        return self.job_dir / "ledger.jsonl"

    def container_name(self, try_number: int) -> str:
        return f"cosmos-upsample-{self.job_key}-try{try_number}"


def content_name(path: Path) -> str:
    """A frame's name on the host is its content hash: identical frames are sent once, ever."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:32] + path.suffix


def container_model(settings: Settings) -> str:
    """The model as the container sees it: files under the host's model folder appear under /models."""
    if settings.backend == "llama_cpp" and settings.model_id == DEFAULT_MODELS["llama_cpp"]:
        return str(CONTAINER_MODEL_DIR / SMOLLM2_FILE)
    model = PurePosixPath(settings.model_id)
    host_models = PurePosixPath(settings.host_model_dir)
    if model.is_absolute() and host_models in model.parents:
        return str(CONTAINER_MODEL_DIR / model.relative_to(host_models))
    return settings.model_id  # a model id, found in the mounted HF cache (HF_HOME=/models)


def remote_manifest(manifest: dict[str, Any], frame_names: dict[str, str], model: str) -> dict[str, Any]:
    """The local manifest with frames renamed to their staged names (relative to the job dir) and the model path."""
    items = [{**item, "frames": [f"frames/{frame_names[frame]}" for frame in item["frames"]]}
             for item in manifest["items"]]
    return {**manifest, "model": model, "items": items}


def docker_url(username: str, host: str, port: int) -> str:
    return f"ssh://{username}@{host}:{port}"


def worker_command(job_key: str) -> list[str]:
    """Arguments for the image's entry point (the worker program): the job, and the host-wide GPU lock."""
    return ["--job-dir", str(CONTAINER_WORK_DIR / job_key), "--gpu-lock", str(CONTAINER_WORK_DIR / GPU_LOCK_NAME)]


def _sftp_exists_with_size(sftp, path: PurePosixPath, size: int) -> bool:
    try:
        return sftp.stat(str(path)).st_size == size
    except FileNotFoundError:
        return False


def _sftp_makedirs(sftp, path: PurePosixPath) -> None:
    for folder in [*reversed(path.parents), path]:
        try:
            if not stat.S_ISDIR(sftp.stat(str(folder)).st_mode):
                raise NotADirectoryError(f"{folder} exists on the GPU host and is not a folder")
        except FileNotFoundError:
            sftp.mkdir(str(folder))


def _sftp_put_atomic(sftp, local: Path | None, data: bytes | None, remote: PurePosixPath) -> None:
    partial = remote.with_name(f".{remote.name}.part")
    if local is not None:
        sftp.put(str(local), str(partial))
    else:
        with sftp.open(str(partial), "wb") as handle:
            handle.write(data)
    sftp.posix_rename(str(partial), str(remote))


def stage_job(sftp, job: RemoteJob, manifest: dict[str, Any], model: str) -> int:
    """Send what the host lacks; returns how many frame files were sent (0 on a retry that has them all)."""
    _sftp_makedirs(sftp, job.frames_dir)
    frames = sorted({frame for item in manifest["items"] for frame in item["frames"]})
    names = {frame: content_name(Path(frame)) for frame in frames}
    sent = 0
    for frame in frames:
        target = job.frames_dir / names[frame]
        if not _sftp_exists_with_size(sftp, target, Path(frame).stat().st_size):
            _sftp_put_atomic(sftp, Path(frame), None, target)
            sent += 1
    body = json.dumps(remote_manifest(manifest, names, model), indent=2).encode()
    _sftp_put_atomic(sftp, None, body, job.manifest)
    return sent


def fetch_ledger(sftp, job: RemoteJob, local_job_dir: Path) -> int:
    """Copy the host's ledger next to the local manifest (atomically); returns its size in bytes."""
    target = local_job_dir / "ledger.jsonl"
    partial = target.with_name(".ledger.jsonl.part")
    try:
        sftp.get(str(job.ledger), str(partial))
    except FileNotFoundError:
        return 0
    os.replace(partial, target)
    return target.stat().st_size


def ssh_hook(conn_id: str):
    from airflow.providers.ssh.hooks.ssh import SSHHook

    # cmd_timeout is about silence on a command; staging is SFTP only, and the model job runs through Docker.
    # One connect attempt per task try: the task's own retries (with backoff) cover an unreachable host.
    return SSHHook(ssh_conn_id=conn_id, cmd_timeout=None, conn_timeout=20, conn_retry_attempts=1)


class HostUnreachable(RuntimeError):
    """The GPU host did not answer; the task's retries (with backoff) try again."""


def open_verified(hook):
    """Connect, turning paramiko's refusals into messages that say what to fix."""
    import paramiko

    try:
        return hook.get_conn()
    except (paramiko.ssh_exception.NoValidConnectionsError, TimeoutError, ConnectionError) as exc:
        raise HostUnreachable(
            f"GPU host {hook.remote_host}:{hook.port} (connection {hook.ssh_conn_id}) is unreachable ({exc}); "
            "check that the host is up and sshd listens there"
        ) from None
    except paramiko.BadHostKeyException as exc:
        raise HostKeyError(
            f"GPU host {hook.remote_host}:{hook.port} (connection {hook.ssh_conn_id}) presented a different host key "
            f"({exc.key.get_name()}) than the one configured; if the host was rebuilt, update the connection's "
            "host_key extra, otherwise treat it as an attack"
        ) from None
    except paramiko.SSHException as exc:
        if "not found in known_hosts" in str(exc):
            raise HostKeyError(
                f"GPU host {hook.remote_host}:{hook.port} (connection {hook.ssh_conn_id}) is not known: put its "
                "public host key ('ssh-ed25519 AAAA...', from ssh-keyscan on a trusted network) in the connection's "
                "host_key extra"
            ) from None
        raise


def ensure_known_host(hook, known_hosts: Path | None = None) -> None:
    """The Docker SDK's SSH transport checks ~/.ssh/known_hosts only; record the connection's pinned key there.

    A different key already recorded for that host is refused, never replaced.
    """
    import paramiko

    if hook.host_key is None:
        return  # no pinned key: the host must already be in known_hosts, or the SDK refuses it
    known_hosts = known_hosts or Path.home() / ".ssh" / "known_hosts"
    name = hook.remote_host if hook.port == 22 else f"[{hook.remote_host}]:{hook.port}"
    keys = paramiko.HostKeys()
    if known_hosts.exists():
        keys.load(str(known_hosts))
    recorded = keys.lookup(name) or {}
    existing = recorded.get(hook.host_key.get_name())
    if existing is not None:
        if existing != hook.host_key:
            raise HostKeyError(f"{known_hosts} holds another {hook.host_key.get_name()} key for {name} than "
                               f"connection {hook.ssh_conn_id}; remove the stale line if the host was rebuilt")
        return
    known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with known_hosts.open("a", encoding="utf-8") as handle:
        handle.write(f"{name} {hook.host_key.get_name()} {hook.host_key.get_base64()}\n")


def worker_operator(settings: Settings, job: RemoteJob, hook, try_number: int):
    from airflow.providers.docker.operators.docker import DockerOperator
    from docker.types import DeviceRequest, Mount

    gpus = [DeviceRequest(count=-1, capabilities=[["gpu"]])] if settings.backend == "vllm" else None
    return DockerOperator(
        task_id=f"worker_{job.job_key}",
        image=settings.worker_image,
        command=worker_command(job.job_key),
        container_name=job.container_name(try_number),
        docker_url=docker_url(hook.username, hook.remote_host, hook.port),
        mounts=[
            Mount(str(CONTAINER_WORK_DIR), str(job.host_work_dir), type="bind"),
            Mount(str(CONTAINER_MODEL_DIR), settings.host_model_dir, type="bind", read_only=True),
        ],
        device_requests=gpus,
        mount_tmp_dir=False,  # the engine is remote: a local temp dir cannot be mounted there
        auto_remove="success",
        tty=False,
    )


def run_docker_job(settings: Settings, job_info: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    local_job_dir = Path(job_info["job_dir"])
    job = RemoteJob(job_info["conn_id"], job_info["job_key"], PurePosixPath(settings.host_work_dir),
                    PurePosixPath(settings.host_model_dir))
    hook = ssh_hook(job.conn_id)
    client = open_verified(hook)
    try:
        with client.open_sftp() as sftp:
            sent = stage_job(sftp, job, read_json(local_job_dir / "manifest.json"), container_model(settings))
        log.info("staged job %s on %s: %d frame file(s) sent", job.job_key, job.conn_id, sent)
        ensure_known_host(hook)
        operator = worker_operator(settings, job, hook, context["ti"].try_number)
        try:
            operator.execute(context)
        except BaseException:
            # A failed or killed task must not leave the container running against the retry.
            with contextlib.suppress(Exception):
                operator.on_kill()
            raise
        finally:
            with client.open_sftp() as sftp:
                size = fetch_ledger(sftp, job, local_job_dir)
            log.info("fetched the ledger of job %s (%d bytes)", job.job_key, size)
    finally:
        client.close()
    return {"frames_sent": sent}
