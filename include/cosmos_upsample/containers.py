"""The Docker engine of a GPU host (runner `docker`), spoken over the verified SSH connection, and the lifecycle of a
job's worker container: its spec as values, create, follow (ContainerWatch), stop, and the running ones to adopt.

The SSHHook's client (ssh_hosts.open_verified) carries the Docker API (`docker system dial-stdio` on the host, the
Docker SDK's own paramiko transport). The provider's DockerHook is not used: it hands an `ssh://` URL to the SDK,
which opens its own connection checked only against ~/.ssh/known_hosts, so the pinned key would have to be written
there for good. The Docker API takes argument lists as values: no shell string is built from a spec.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from include.cosmos_upsample.gpu_slots import Placement
from include.cosmos_upsample.settings import DEFAULT_MODELS, Settings
from include.cosmos_upsample.ssh_hosts import open_verified, ssh_hook
from include.cosmos_upsample.staging import RemoteJob, sync_ledger
from include.cosmos_upsample.watchdog import StallWatch

log = logging.getLogger(__name__)

# The host's work folder (all its jobs and the slot locks) appears in the container here.
CONTAINER_WORK_DIR = PurePosixPath("/work")
CONTAINER_MODEL_DIR = PurePosixPath("/models")
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Labels on every worker container: which job it runs (to adopt it) and which slot lock it holds (to place others).
JOB_LABEL = "cosmos-upsample.job"
SLOT_LABEL = "cosmos-upsample.slot"
SLOT_LOCK_LABEL = "cosmos-upsample.slot-lock"
# The Docker API version the runner speaks (Docker 20.10+, podman 4): fixed, so no round trip to ask.
DOCKER_API_VERSION = "1.41"
# How often the container's state is looked at while it runs (the ledger is copied every ledger_sync_seconds).
POLL_SECONDS = 1.0


def container_model(settings: Settings) -> str:
    """The model as the container sees it: files under the host's model folder appear under /models."""
    if settings.backend == "llama_cpp" and settings.model_id == DEFAULT_MODELS["llama_cpp"]:
        return str(CONTAINER_MODEL_DIR / SMOLLM2_FILE)
    model = PurePosixPath(settings.model_id)
    host_models = PurePosixPath(settings.host_model_dir)
    if model.is_absolute() and host_models in model.parents:
        return str(CONTAINER_MODEL_DIR / model.relative_to(host_models))
    return settings.model_id  # a model id, found in the mounted HF cache (HF_HOME=/models)


def worker_command(job_key: str, gpu_lock: PurePosixPath) -> list[str]:
    """Arguments for the image's entry point (the worker program): the job, and its slot's GPU lock."""
    return ["--job-dir", str(CONTAINER_WORK_DIR / job_key), "--gpu-lock", str(gpu_lock)]


@dataclass(frozen=True)
class ContainerSpec:
    """Everything a job's container is created with, as values (tested without an engine)."""

    image: str
    name: str
    command: list[str]
    labels: dict[str, str]
    environment: dict[str, str]
    binds: dict[str, dict[str, str]]  # host path -> {"bind": container path, "mode": rw|ro}
    device_ids: tuple[str, ...] | None  # None: no GPU request; (): every GPU of the host


def container_spec(settings: Settings, job: RemoteJob, place: Placement, attempt: str) -> ContainerSpec:
    return ContainerSpec(
        image=settings.worker_image,
        name=job.container_name(attempt),
        command=worker_command(job.job_key, place.lock_path(CONTAINER_WORK_DIR)),
        labels={JOB_LABEL: job.job_key, SLOT_LABEL: place.slot.label, SLOT_LOCK_LABEL: place.slot.lock_name},
        environment=place.environment,
        binds={str(job.host_work_dir): {"bind": str(CONTAINER_WORK_DIR), "mode": "rw"},
               settings.host_model_dir: {"bind": str(CONTAINER_MODEL_DIR), "mode": "ro"}},
        device_ids=place.device_ids,
    )


def verified_engine_client(ssh_client, timeout: int):
    """A Docker API client over the verified SSH client (see the module docstring)."""
    from docker.transport.basehttpadapter import BaseHTTPAdapter
    from docker.transport.sshconn import RecentlyUsedContainer, SSHHTTPAdapter

    from docker import APIClient

    class VerifiedSSHAdapter(SSHHTTPAdapter):
        """The SDK's SSH adapter without its own connect: it opens channels on our transport."""

        def __init__(self) -> None:  # noqa: D107 - SSHHTTPAdapter.__init__ would connect on its own
            self.ssh_client = ssh_client
            self.ssh_params = {}
            self.ssh_host = "verified"
            self.timeout = timeout
            self.max_pool_size = 4
            self.pools = RecentlyUsedContainer(4, dispose_func=lambda pool: pool.close())
            BaseHTTPAdapter.__init__(self)

        def close(self) -> None:  # the SSH client belongs to the task, which closes it
            BaseHTTPAdapter.close(self)

    # A version is given, so creating the client makes no request; then mount the adapter where the SDK mounts its
    # own for ssh:// URLs.
    client = APIClient(base_url="tcp://127.0.0.1:9", version=DOCKER_API_VERSION, timeout=timeout)
    client._custom_adapter = VerifiedSSHAdapter()
    client.mount("http+docker://ssh", client._custom_adapter)
    client._unmount("http://", "https://")
    client.base_url = "http+docker://ssh"
    return client


def running_containers(api, label: str) -> list[dict[str, Any]]:
    """Running worker containers on the host carrying `label` (key or key=value)."""
    return api.containers(filters={"label": [label], "status": ["running"]})


def running_job_keys(ssh_client) -> set[str]:
    """The jobs whose worker container runs on the host behind this verified SSH client (for retention.py)."""
    running = running_containers(verified_engine_client(ssh_client, 30), JOB_LABEL)
    return {key for key in ((c.get("Labels") or {}).get(JOB_LABEL) for c in running) if key}


def create_container(api, spec: ContainerSpec) -> str:
    from docker.types import DeviceRequest

    devices = None
    if spec.device_ids is not None:
        devices = [DeviceRequest(device_ids=list(spec.device_ids), capabilities=[["gpu"]]) if spec.device_ids
                   else DeviceRequest(count=-1, capabilities=[["gpu"]])]
    host_config = api.create_host_config(binds=spec.binds, device_requests=devices)
    created = api.create_container(spec.image, command=spec.command, name=spec.name, labels=spec.labels,
                                   environment=spec.environment, host_config=host_config, tty=False)
    return created["Id"]


def _stop(api, container_id: str) -> None:
    """A failed or killed task must not leave its container running against the retry."""
    try:
        api.stop(container_id, timeout=10)
    except Exception as exc:  # noqa: BLE001 - best effort while the task is going down anyway
        log.warning("could not stop container %s: %s", container_id[:12], exc)


@dataclass
class ContainerWatch:
    """Follows one running container from wherever the waiting happens (the triggerer: docker_trigger.py): its new log
    lines to the log (the triggerer files them under the task's try), its ledger to the local job folder every
    `sync_seconds`, its stall watchdog and the try's deadline.

    Holds one verified SSH connection between polls (opened on the first), as the SSH provider's SSHRemoteJobTrigger
    does, so the host's sshd sees one connection per job, not one per poll. Built from small values only, so a
    restarted triggerer re-creates it from the trigger's kwargs and goes on from the ledger bytes already copied
    (the local file's size): nothing copied twice, nothing lost.
    """

    job: RemoteJob
    container_id: str
    local_job_dir: Path
    sync_seconds: float
    stall: StallWatch  # no new ledger line for its limit while the worker holds its GPU: stopped, try failed
    deadline: float | None = None  # epoch seconds: the try's execution_timeout, which Airflow does not apply deferred
    clock: Callable[[], float] = time.monotonic
    log_lines: int = 0
    ledger_bytes: int = 0
    tail: tuple[str, ...] = ()
    _synced: float | None = field(default=None, init=False)
    _client: Any = field(default=None, init=False)
    _api: Any = field(default=None, init=False)
    _sftp: Any = field(default=None, init=False)

    def copy_logs(self) -> None:
        lines = self._api.logs(self.container_id, stdout=True, stderr=True).decode(errors="replace").splitlines()
        for line in lines[self.log_lines:]:
            log.info("worker | %s", line)
            self.stall.worker_said(line)
        self.log_lines, self.tail = len(lines), tuple(lines[-15:])

    def _connect(self) -> None:
        if self._client is None:
            self._client = open_verified(ssh_hook(self.job.conn_id))
            self._api = verified_engine_client(self._client, timeout=60)
            self._sftp = self._client.open_sftp()

    def close(self) -> None:
        client, self._client, self._api, self._sftp = self._client, None, None, None
        if client is not None:
            client.close()

    def _sync(self) -> None:
        size = sync_ledger(self._sftp, self.job, self.local_job_dir)
        self.copy_logs()
        if size != self.ledger_bytes:
            log.info("ledger of job %s: %d bytes here", self.job.job_key, size)
        self._synced, self.ledger_bytes = self.clock(), size
        self.stall.ledger_is(size)

    def poll(self) -> dict[str, Any] | None:
        """One look at the container (blocking: run it off the event loop). None while it runs and nothing is wrong;
        else what ended the wait: {"status": "exited", "exit_code": N}, "stalled" or "timeout" with a message."""
        self._connect()
        state = self._api.inspect_container(self.container_id)["State"]
        if not state.get("Running"):
            return {"status": "exited", "exit_code": int(state.get("ExitCode", -1)), "message": ""}
        if self._synced is None or self.clock() - self._synced >= self.sync_seconds:
            self._sync()
        container = f"its container {self.container_id[:12]} on {self.job.conn_id}"
        if self.stall.stalled():  # the resumed task stops the container
            return {"status": "stalled", "exit_code": None,
                    "message": str(self.stall.error(self.job.job_key, container))}
        if self.deadline is not None and time.time() >= self.deadline:
            return {"status": "timeout", "exit_code": None,
                    "message": f"job {self.job.job_key}: the try's execution_timeout passed while {container} ran"}
        return None

    def end(self, stop: bool) -> dict[str, Any]:
        """Stop the container (unless it exited), copy its last log lines and the ledger once more, remove it;
        returns what the engine said of it last."""
        self._connect()
        if stop:
            _stop(self._api, self.container_id)
        self.copy_logs()
        size = sync_ledger(self._sftp, self.job, self.local_job_dir)
        log.info("fetched the ledger of job %s (%d bytes)", self.job.job_key, size)
        info = self._api.inspect_container(self.container_id)
        self._api.remove_container(self.container_id, force=True)
        return info
