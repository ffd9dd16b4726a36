"""Runner `docker`: a job on a GPU host reached over SSH, in the worker image, on one GPU slot of that host.

For each job: ask the host whether a container for the job still runs (a killed task's) and adopt it, else stage the
manifest and hint frames over SFTP (frames named by content, so a retry sends only what is missing) and start the
worker container on a free slot (`start_docker_job`) -> while it runs, copy the new bytes of the host's ledger back at
a steady interval (`ContainerWatch`, run by the trigger the task defers to: docker_trigger.py; the UI's progress
moves, a lost Airflow worker or triggerer loses nothing the host already answered) -> fetch the ledger once more and
remove the container, whatever happened (`finish_docker_job`, in the resumed task). The ledger lives on the host,
next to the job; the worker skips what it already holds, so a retried task or a container that died mid-job redoes
only the unfinished items.

One SSH connection at a time per job (starting, following, finishing): the SSHHook's client, whose host key was
verified against the connection's pinned `host_key` (or the worker's known_hosts, read only), carries both SFTP and
the Docker API (`docker system dial-stdio` on the host, the Docker SDK's own paramiko transport). The provider's
DockerHook is not used: it hands an `ssh://` URL to the SDK, which opens its own connection checked only against
~/.ssh/known_hosts, so the pinned key would have to be written there for good. Nothing is written to the worker's
~/.ssh.

No shell string is ever built from a spec: SFTP calls and the Docker API take paths and argument lists as values.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import stat
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from include.cosmos_upsample.batching import JobPlan
from include.cosmos_upsample.errors import (
    NotRetryable,
    UnknownConnection,
    WorkerFailed,
    WorkerRefused,
    is_unknown_connection,
    last_error_line,
)
from include.cosmos_upsample.gpu_slots import (
    NVIDIA_SMI_COMMAND,
    GpuSlot,
    HostGpus,
    Placement,
    choose_slot,
    host_gpus,
    parse_nvidia_smi,
    placement,
    planned_slot,
    wants_discovery,
)
from include.cosmos_upsample.jobformat import (
    EXIT_JOB_BUSY,
    EXIT_REFUSED,
    LEDGER_NAME,
    MANIFEST_NAME,
    Job,
    Ledger,
    job_lock,
)
from include.cosmos_upsample.layout import OutputLayout, read_json, write_json_atomic
from include.cosmos_upsample.settings import DEFAULT_MODELS, Settings
from include.cosmos_upsample.watchdog import StallWatch, WorkerStalled

log = logging.getLogger(__name__)

# The host's work folder (all its jobs and the slot locks) appears in the container here.
CONTAINER_WORK_DIR = PurePosixPath("/work")
CONTAINER_MODEL_DIR = PurePosixPath("/models")
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Labels on every worker container: which job it runs (to adopt it) and which slot lock it holds (to place others).
JOB_LABEL = "cosmos-upsample.job"
SLOT_LABEL = "cosmos-upsample.slot"
SLOT_LOCK_LABEL = "cosmos-upsample.slot-lock"
# In the local job folder: which host the job's last container ran on, so a later batch asks that host.
HOST_MARKER_NAME = "host.json"
# The Docker API version the runner speaks (Docker 20.10+, podman 4): fixed, so no round trip to ask.
DOCKER_API_VERSION = "1.41"
# How often the container's state is looked at while it runs (the ledger is copied every ledger_sync_seconds).
POLL_SECONDS = 1.0
# The longest a ledger copy waits for another process copying the same job's ledger.
LEDGER_LOCK_WAIT_SECONDS = 30.0


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
        return self.job_dir / MANIFEST_NAME

    @property
    def ledger(self) -> PurePosixPath:
        return self.job_dir / LEDGER_NAME

    def container_name(self, attempt: str) -> str:
        return f"cosmos-upsample-{self.job_key}-{attempt}"


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


def remote_manifest(manifest: dict[str, Any], frame_names: dict[str, str], model: str,
                    engine: dict[str, Any] | None = None) -> dict[str, Any]:
    """The local manifest with frames renamed to their staged names (relative to the job dir), the model path and
    the slot's engine settings (tensor_parallel_size)."""
    items = [{**item, "frames": [f"frames/{frame_names[frame]}" for frame in item["frames"]]}
             for item in manifest["items"]]
    return {**manifest, "model": model, "engine": {**manifest.get("engine", {}), **(engine or {})}, "items": items}


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


@contextmanager
def gpu_connection(conn_id: str) -> Iterator[None]:
    """Looking up a GPU host's connection: an id Airflow does not know is a setting to fix, not something to retry."""
    try:
        yield
    except Exception as exc:
        if is_unknown_connection(exc):
            raise UnknownConnection(conn_id, "gpu_conn_ids") from None
        raise


def _connection_extra(conn_id: str) -> dict[str, Any]:
    from airflow.providers.ssh.hooks.ssh import SSHHook

    with gpu_connection(conn_id):
        return SSHHook.get_connection(conn_id).extra_dejson


def ssh_hook(conn_id: str):
    """The hook of a GPU host's connection, refused when it would accept a host key it has not been given."""
    from airflow.providers.ssh.hooks.ssh import SSHHook

    # cmd_timeout is about silence on a command; staging is SFTP only, and the model job runs through Docker.
    # One connect attempt per task try: the task's own retries (with backoff) cover an unreachable host.
    with gpu_connection(conn_id):
        hook = SSHHook(ssh_conn_id=conn_id, cmd_timeout=None, conn_timeout=20, conn_retry_attempts=1)
    # Verification must not rest on the provider's defaults (older providers auto-added unknown keys): either flag
    # makes SSHHook.get_conn accept a key nobody vouched for (AutoAddPolicy / no BadHostKeyException).
    accepting = [flag for flag in ("no_host_key_check", "allow_host_key_change") if getattr(hook, flag, False)]
    if accepting:
        raise HostKeyError(
            f"connection {conn_id} sets {' and '.join(accepting)}, so any host key would be accepted; the runner "
            "refuses it: remove that extra and put the host's public key ('ssh-ed25519 AAAA...', from ssh-keyscan on "
            "a trusted network) in the connection's host_key extra")
    return hook


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


def _verified_engine_client(ssh_client, timeout: int):
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


def discover_gpus(ssh_client, conn_id: str) -> tuple[str, ...]:
    """Device indices from nvidia-smi on the host (a fixed command, nothing from a spec)."""
    _, stdout, stderr = ssh_client.exec_command(shlex.join(NVIDIA_SMI_COMMAND), timeout=30)
    output, code = stdout.read().decode(), stdout.channel.recv_exit_status()
    if code != 0:
        raise RuntimeError(f"nvidia-smi on {conn_id} exited with {code}: {stderr.read().decode().strip()[:200]}")
    return parse_nvidia_smi(output)


class GpuDiscoveryFailed(RuntimeError):
    """A host declared `"gpus": "auto"` could not be asked for its GPUs: retried, never taken as "all GPUs" (a job
    on every GPU beside other jobs' single-GPU slots would share their GPUs)."""


def _discovered_gpus(conn_id: str, ssh_client=None) -> tuple[str, ...]:
    try:
        if ssh_client is not None:
            return discover_gpus(ssh_client, conn_id)
        client = open_verified(ssh_hook(conn_id))
        try:
            return discover_gpus(client, conn_id)
        finally:
            client.close()
    except NotRetryable:
        raise
    except Exception as exc:
        raise GpuDiscoveryFailed(
            f"GPU host {conn_id}: could not list its GPUs with nvidia-smi ({exc}); no job is placed on a guess. "
            "Check the host and its nvidia-smi, or declare its device ids in the connection's gpus extra") from None


def host_gpus_of(conn_id: str, ssh_client=None) -> HostGpus:
    """The host's GPU declaration from its connection; with `"gpus": "auto"`, nvidia-smi's answer (logged), and
    GpuDiscoveryFailed when it cannot be had."""
    extra = _connection_extra(conn_id)
    discovered = None
    if wants_discovery(extra):
        discovered = _discovered_gpus(conn_id, ssh_client)
        log.info("GPU host %s: nvidia-smi lists GPUs %s", conn_id, list(discovered))
    hosts = host_gpus(conn_id, extra, discovered)
    log.info("GPU host %s: %d slot(s) %s", conn_id, len(hosts.slots()),
             [list(slot.device_ids) or "all" for slot in hosts.slots()])
    return hosts


def gpu_hosts(conn_ids: Iterable[str]) -> list[HostGpus]:
    """The slots to plan on. A host whose GPUs cannot be listed now gets no job this run (logged); with none left,
    discover fails this try (retried)."""
    hosts, failures = [], []
    for conn_id in conn_ids:
        try:
            hosts.append(host_gpus_of(conn_id))
        except GpuDiscoveryFailed as exc:
            log.warning("%s; no job of this run is planned on it", exc)
            failures.append(str(exc))
    if not hosts:
        raise GpuDiscoveryFailed("; ".join(failures))
    return hosts


def running_containers(api, label: str) -> list[dict[str, Any]]:
    """Running worker containers on the host carrying `label` (key or key=value)."""
    return api.containers(filters={"label": [label], "status": ["running"]})


def running_job_keys(ssh_client) -> set[str]:
    """The jobs whose worker container runs on the host behind this verified SSH client (for retention.py)."""
    running = running_containers(_verified_engine_client(ssh_client, 30), JOB_LABEL)
    return {key for key in ((c.get("Labels") or {}).get(JOB_LABEL) for c in running) if key}


def _pointed_jobs(layout: OutputLayout, item_keys: Iterable[str]) -> set[str]:
    pointed = set()
    for key in item_keys:
        try:
            pointed.add(layout.answer_pointer(key).read_text(encoding="utf-8").strip())
        except OSError:
            continue
    return pointed


def _hosts_of(layout: OutputLayout, job_keys: Iterable[str]) -> dict[str, list[str]]:
    """conn_id -> the jobs whose last container ran there (from each job's HOST_MARKER_NAME)."""
    hosts: dict[str, list[str]] = {}
    for job_key in job_keys:
        try:
            conn_id = read_json(layout.job_dir(job_key) / HOST_MARKER_NAME)["conn_id"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        hosts.setdefault(conn_id, []).append(job_key)
    return hosts


def _held_on_silent_host(layout: OutputLayout, conn_id: str, job_keys: list[str], wanted: set[str],
                         exc: Exception) -> dict[str, str]:
    """The unanswered items of jobs on a host that could not be asked: its container may still be answering them,
    so planning them into a new job could pay for them twice. Held back (item key -> why) until the host answers."""
    held = {}
    for job_key in job_keys:
        job_dir = layout.job_dir(job_key)
        if not (job_dir / MANIFEST_NAME).exists():
            continue
        job = Job.read(job_dir)
        done = Ledger.of(job_dir).finished_keys(job)  # answers already copied back are merged as usual
        reason = (f"held back: its job {job_key} ran on GPU host {conn_id}, which did not answer ({exc}), and may "
                  "still be answering it there; it is planned again once the host answers. If that host is gone for "
                  f"good, delete {job_dir / HOST_MARKER_NAME} and re-run")
        held.update({item.key: reason for item in job.items
                     if item.key in wanted and item.key not in done})
    return held


def live_remote_jobs(layout: OutputLayout, settings: Settings,
                     item_keys: Iterable[str]) -> tuple[list[JobPlan], dict[str, str]]:
    """Before batch plans these items, ask the hosts that ran their jobs what they hold now.

    Each such job's ledger is copied back first (a container that outlived its killed task kept answering), so
    `earlier_answers` sees every answer the host has. A job whose container still runs is returned, to be kept
    whole by plan_jobs instead of re-planned into a second job that would pay for its items again. The unanswered
    items of jobs on a host that cannot be asked are returned too (key -> why), to be held out of every new job.
    """
    wanted = set(item_keys)
    pinned, held = [], {}
    for conn_id, job_keys in _hosts_of(layout, _pointed_jobs(layout, wanted)).items():
        try:
            client = open_verified(ssh_hook(conn_id))
        except Exception as exc:  # noqa: BLE001 - whatever the host's problem, its jobs' items wait for it
            log.warning("could not ask GPU host %s about jobs %s (%s): their unanswered items are held back",
                        conn_id, job_keys, exc)
            held.update(_held_on_silent_host(layout, conn_id, job_keys, wanted, exc))
            continue
        try:
            with client.open_sftp() as sftp:
                for job_key in job_keys:
                    remote = RemoteJob(conn_id, job_key, PurePosixPath(settings.host_work_dir),
                                       PurePosixPath(settings.host_model_dir))
                    sync_ledger(sftp, remote, layout.job_dir(job_key))
            running = running_containers(_verified_engine_client(client, 30), JOB_LABEL)
        finally:
            client.close()
        for container in running:
            labels = container.get("Labels") or {}
            job_key = labels.get(JOB_LABEL)
            if job_key in job_keys and (layout.job_dir(job_key) / MANIFEST_NAME).exists():
                slot = labels.get(SLOT_LABEL, "/0").rsplit("/", 1)[-1]
                keys = tuple(item.key for item in Job.read(layout.job_dir(job_key)).items if item.key in wanted)
                log.info("job %s still runs on %s (container %s): kept whole, not re-planned", job_key, conn_id,
                         container.get("Id", "")[:12])
                pinned.append(JobPlan(job_key, conn_id, keys, int(slot) if slot.isdigit() else 0))
    return pinned, held


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


def stage_job(sftp, job: RemoteJob, manifest: dict[str, Any], model: str, engine: dict[str, Any] | None = None) -> int:
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
    body = json.dumps(remote_manifest(manifest, names, model, engine), indent=2).encode()
    _sftp_put_atomic(sftp, None, body, job.manifest)
    return sent


def sync_ledger(sftp, job: RemoteJob, local_job_dir: Path) -> int:
    """Copy the bytes of the host's ledger that the local copy lacks; returns the local size.

    The ledger is append-only, so the local copy is a prefix of the host's and only the tail travels. A host ledger
    shorter than the local copy (the host's job folder was cleared) replaces it whole. Copied under the local job
    folder's lock (jobformat.job_lock): Airflow may run one trigger twice for a while (a triggerer taken for dead
    while it still runs), and two copiers appending the same tail would write it twice. One that finds the lock held
    waits a bounded time for the other to finish the same copy.
    """
    deadline = time.monotonic() + LEDGER_LOCK_WAIT_SECONDS
    while True:
        with job_lock(local_job_dir) as held:
            if held:
                return _copy_ledger_tail(sftp, job, local_job_dir)
        if time.monotonic() >= deadline:
            raise TimeoutError(f"the local ledger of job {job.job_key} stayed locked by another process for "
                               f"{LEDGER_LOCK_WAIT_SECONDS:g} s ({local_job_dir})")
        time.sleep(0.2)


def _copy_ledger_tail(sftp, job: RemoteJob, local_job_dir: Path) -> int:
    target = local_job_dir / LEDGER_NAME
    have = target.stat().st_size if target.exists() else 0
    try:
        size = sftp.stat(str(job.ledger)).st_size
    except FileNotFoundError:
        return have
    if size < have:
        partial = target.with_name(f".{LEDGER_NAME}.part")
        sftp.get(str(job.ledger), str(partial))
        os.replace(partial, target)
        return target.stat().st_size
    if size > have:
        with sftp.open(str(job.ledger), "rb") as remote:
            remote.seek(have)
            tail = remote.read(size - have)
        with target.open("ab") as local:
            local.write(tail)
            local.flush()
            os.fsync(local.fileno())
    return have + max(size - have, 0)


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
            self._api = _verified_engine_client(self._client, timeout=60)
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


def remote_job(settings: Settings, job_info: dict[str, Any]) -> RemoteJob:
    return RemoteJob(job_info["conn_id"], job_info["job_key"], PurePosixPath(settings.host_work_dir),
                     PurePosixPath(settings.host_model_dir))


def _start_or_adopt(api, sftp, settings: Settings, job: RemoteJob, job_info: dict[str, Any], hosts: HostGpus,
                    local_job_dir: Path) -> str:
    """The running container of this job (adopted), else a new one on a free slot of the host."""
    mine = running_containers(api, f"{JOB_LABEL}={job.job_key}")
    if mine:
        log.info("job %s already runs on %s in container %s (%s): adopting it, not starting another",
                 job.job_key, job.conn_id, mine[0]["Id"][:12], (mine[0].get("Labels") or {}).get(SLOT_LABEL))
        return mine[0]["Id"]
    for stale in api.containers(all=True, filters={"label": [f"{JOB_LABEL}={job.job_key}"]}):
        api.remove_container(stale["Id"], force=True)  # an exited container of an earlier try
    busy = {(c.get("Labels") or {}).get(SLOT_LOCK_LABEL) for c in running_containers(api, SLOT_LOCK_LABEL)}
    planned = planned_slot(hosts.slots(), job.conn_id, job_info.get("slot"), job_info.get("devices"))
    slot: GpuSlot = choose_slot(hosts.slots(), busy, planned)
    place = placement(slot, settings.backend)
    sent = stage_job(sftp, job, read_json(local_job_dir / MANIFEST_NAME), container_model(settings), place.engine)
    log.info("staged job %s on %s: %d frame file(s) sent", job.job_key, job.conn_id, sent)
    spec = container_spec(settings, job, place, uuid.uuid4().hex[:8])
    container_id = create_container(api, spec)
    write_json_atomic(local_job_dir / HOST_MARKER_NAME, {"conn_id": job.conn_id, "container": spec.name})
    api.start(container_id)
    log.info("started container %s for job %s on slot %s (GPUs %s, lock %s)", spec.name, job.job_key, slot.label,
             list(slot.device_ids) or ("none" if slot.cpu_only else "all"), slot.lock_name)
    return container_id


def _stop(api, container_id: str) -> None:
    """A failed or killed task must not leave its container running against the retry."""
    try:
        api.stop(container_id, timeout=10)
    except Exception as exc:  # noqa: BLE001 - best effort while the task is going down anyway
        log.warning("could not stop container %s: %s", container_id[:12], exc)


def start_docker_job(settings: Settings, job_info: dict[str, Any]) -> str:
    """Adopt the job's running container or start one on a free slot; returns its id. The waiting is done elsewhere
    (the task defers to docker_trigger.DockerJobTrigger), then `finish_docker_job`."""
    job = remote_job(settings, job_info)
    client = open_verified(ssh_hook(job.conn_id))
    try:
        hosts = host_gpus_of(job.conn_id, client)
        api = _verified_engine_client(client, timeout=60)
        with client.open_sftp() as sftp:
            return _start_or_adopt(api, sftp, settings, job, job_info, hosts, Path(job_info["job_dir"]))
    finally:
        client.close()


def trigger_kwargs(settings: Settings, job_info: dict[str, Any], container_id: str,
                   started_at: float) -> dict[str, Any]:
    """What the trigger following a job's container is made of (docker_trigger.DockerJobTrigger): small values only,
    since Airflow stores them to re-create the trigger in whichever triggerer runs it."""
    return {"conn_id": job_info["conn_id"], "job_key": job_info["job_key"], "container_id": container_id,
            "host_work_dir": settings.host_work_dir, "host_model_dir": settings.host_model_dir,
            "local_job_dir": job_info["job_dir"], "sync_seconds": settings.ledger_sync_seconds,
            "stall_timeout_seconds": settings.stall_timeout_seconds, "started_at": started_at}


def _raise_for(event: dict[str, Any], tail: tuple[str, ...], job: RemoteJob, image: str) -> None:
    """The errors of a finished wait, as the task raises them: retried, or (a refusal) failed at once."""
    if event["status"] == "stalled":
        raise WorkerStalled(event["message"])
    if event["status"] == "timeout":
        from airflow.sdk.exceptions import AirflowTaskTimeout

        raise AirflowTaskTimeout(event["message"])  # stage_notes names the bound and its setting
    if event["status"] != "exited":
        error = WorkerFailed if event.get("retryable", True) else NotRetryable
        raise error(f"following the container of job {job.job_key} on {job.conn_id} failed: {event['message']}")
    code = event["exit_code"]
    if code == EXIT_JOB_BUSY:
        raise WorkerFailed(f"job {job.job_key} is held by another worker on {job.conn_id}; the retry adopts it")
    if code == EXIT_REFUSED:
        raise WorkerRefused.from_output(tail, where=f"on {job.conn_id} (image {image}): ")
    if code != 0:
        raise WorkerFailed(
            f"worker container for job {job.job_key} on {job.conn_id} exited with status {code}: "
            f"{last_error_line(tail)}; finished items are kept in the ledger and a retry does only the rest")


def finish_docker_job(settings: Settings, job_info: dict[str, Any], event: dict[str, Any]) -> dict[str, Any]:
    """After the wait (`event`: ContainerWatch.poll's outcome, or an error of the trigger): stop the container unless
    it exited, fetch the ledger once more, remove the container, then raise what the wait ended with."""
    job, local_job_dir = remote_job(settings, job_info), Path(job_info["job_dir"])
    container_id = event["container_id"]
    watch = ContainerWatch(job, container_id, local_job_dir, settings.ledger_sync_seconds,
                           StallWatch(settings.stall_timeout_seconds))
    try:
        info = watch.end(stop=event["status"] != "exited")
    finally:
        watch.close()
    state, labels = info["State"], info["Config"].get("Labels") or {}
    _raise_for(event, watch.tail, job, settings.worker_image)
    return {"container": container_id[:12], "started_at": state.get("StartedAt"),
            "finished_at": state.get("FinishedAt"), "slot_lock": labels.get(SLOT_LOCK_LABEL)}
