"""Runner `docker`: a job on a GPU host reached over SSH, in the worker image, on one GPU slot of that host.

For each job: ask the host whether a container for the job still runs (a killed task's) and adopt it, else stage the
manifest and hint frames over SFTP (frames named by content, so a retry sends only what is missing) and start the
worker container on a free slot -> while it runs, copy the new bytes of the host's ledger back at a steady interval
(the UI's progress moves; a killed Airflow worker loses nothing the host already answered) -> remove the container
and fetch the ledger once more, whatever happened. The ledger lives on the host, next to the job; the worker skips
what it already holds, so a retried task or a container that died mid-job redoes only the unfinished items.

One SSH connection per task: the SSHHook's client, whose host key was verified against the connection's pinned
`host_key` (or the worker's known_hosts, read only), carries both SFTP and the Docker API (`docker system
dial-stdio` on the host, the Docker SDK's own paramiko transport). The provider's DockerHook is not used: it hands an
`ssh://` URL to the SDK, which opens its own connection checked only against ~/.ssh/known_hosts, so the pinned key
would have to be written there for good. Nothing is written to the worker's ~/.ssh.

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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from include.cosmos_upsample.batching import JobPlan
from include.cosmos_upsample.errors import NotRetryable, PlanNotTheEngines, WorkerFailed
from include.cosmos_upsample.gpu_slots import (
    GPUS_EXTRA,
    NVIDIA_SMI_COMMAND,
    GpuSlot,
    HostGpus,
    Placement,
    choose_slot,
    host_gpus,
    parse_nvidia_smi,
    placement,
    wants_discovery,
)
from include.cosmos_upsample.jobformat import (
    EXIT_JOB_BUSY,
    EXIT_TOKENIZER_MISMATCH,
    LEDGER_NAME,
    MANIFEST_NAME,
    Job,
)
from include.cosmos_upsample.layout import OutputLayout, read_json, write_json_atomic
from include.cosmos_upsample.settings import DEFAULT_MODELS, Settings

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


def host_gpus_of(conn_id: str, ssh_client=None) -> HostGpus:
    """The host's GPU declaration from its connection; with `"gpus": "auto"`, nvidia-smi's answer (logged).

    Discovery that fails (no nvidia-smi, host down) falls back to one slot with every GPU, as if undeclared.
    """
    from airflow.providers.ssh.hooks.ssh import SSHHook

    extra = SSHHook.get_connection(conn_id).extra_dejson
    discovered = None
    if wants_discovery(extra):
        try:
            if ssh_client is not None:
                discovered = discover_gpus(ssh_client, conn_id)
            else:
                client = open_verified(ssh_hook(conn_id))
                try:
                    discovered = discover_gpus(client, conn_id)
                finally:
                    client.close()
            log.info("GPU host %s: nvidia-smi lists GPUs %s", conn_id, list(discovered))
        except Exception as exc:  # noqa: BLE001 - any failure means: no declaration
            log.warning("GPU host %s: could not list its GPUs (%s); using one slot with all of its GPUs",
                        conn_id, exc)
            discovered = None
    if wants_discovery(extra) and discovered is None:
        extra = {key: value for key, value in extra.items() if key != GPUS_EXTRA}
    hosts = host_gpus(conn_id, extra, discovered)
    log.info("GPU host %s: %d slot(s) %s", conn_id, len(hosts.slots()),
             [list(slot.device_ids) or "all" for slot in hosts.slots()])
    return hosts


def gpu_hosts(conn_ids: Iterable[str]) -> list[HostGpus]:
    return [host_gpus_of(conn_id) for conn_id in conn_ids]


def running_containers(api, label: str) -> list[dict[str, Any]]:
    """Running worker containers on the host carrying `label` (key or key=value)."""
    return api.containers(filters={"label": [label], "status": ["running"]})


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


def live_remote_jobs(layout: OutputLayout, settings: Settings, item_keys: Iterable[str]) -> list[JobPlan]:
    """Before batch plans these items, ask the hosts that ran their jobs what they hold now.

    Each such job's ledger is copied back first (a container that outlived its killed task kept answering), so
    `earlier_answers` sees every answer the host has. A job whose container still runs is returned, to be kept
    whole by plan_jobs instead of re-planned into a second job that would pay for its items again. A host that
    cannot be asked is logged and skipped: the worker's own job lock still refuses a second worker.
    """
    wanted = set(item_keys)
    pinned = []
    for conn_id, job_keys in _hosts_of(layout, _pointed_jobs(layout, wanted)).items():
        try:
            client = open_verified(ssh_hook(conn_id))
        except Exception as exc:  # noqa: BLE001 - the upsample task reports the host's problem
            log.warning("could not ask GPU host %s about jobs %s (%s)", conn_id, job_keys, exc)
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
    return pinned


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
    shorter than the local copy (the host's job folder was cleared) replaces it whole.
    """
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
    """Follows one container: its new log lines to the task log, its ledger to the local job folder."""

    api: Any
    sftp: Any
    container_id: str
    job: RemoteJob
    local_job_dir: Path
    sync_seconds: float
    log_lines: int = 0
    ledger_bytes: int = 0
    tail: tuple[str, ...] = ()

    def copy_logs(self) -> None:
        lines = self.api.logs(self.container_id, stdout=True, stderr=True).decode(errors="replace").splitlines()
        for line in lines[self.log_lines:]:
            log.info("worker | %s", line)
        self.log_lines, self.tail = len(lines), tuple(lines[-15:])

    def until_exit(self, clock: Callable[[], float] = time.monotonic) -> int:
        synced = clock()
        while True:
            state = self.api.inspect_container(self.container_id)["State"]
            if not state.get("Running"):
                return int(state.get("ExitCode", -1))
            if clock() - synced >= self.sync_seconds:
                size = sync_ledger(self.sftp, self.job, self.local_job_dir)
                self.copy_logs()
                if size != self.ledger_bytes:
                    log.info("ledger of job %s: %d bytes here", self.job.job_key, size)
                synced, self.ledger_bytes = clock(), size
            time.sleep(min(POLL_SECONDS, self.sync_seconds))


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
    slot: GpuSlot = choose_slot(hosts.slots(), busy, job_info.get("slot") or 0)
    place = placement(slot, settings.backend)
    sent = stage_job(sftp, job, read_json(local_job_dir / MANIFEST_NAME), container_model(settings), place.engine)
    log.info("staged job %s on %s: %d frame file(s) sent", job.job_key, job.conn_id, sent)
    spec = container_spec(settings, job, place, uuid.uuid4().hex[:8])
    container_id = create_container(api, spec)
    write_json_atomic(local_job_dir / HOST_MARKER_NAME, {"conn_id": job.conn_id, "container": spec.name})
    api.start(container_id)
    log.info("started container %s for job %s on slot %s (GPUs %s, lock %s)", spec.name, job.job_key, slot.label,
             list(slot.device_ids) or "all", slot.lock_name)
    return container_id


def _stop(api, container_id: str) -> None:
    """A failed or killed task must not leave its container running against the retry."""
    try:
        api.stop(container_id, timeout=10)
    except Exception as exc:  # noqa: BLE001 - best effort while the task is going down anyway
        log.warning("could not stop container %s: %s", container_id[:12], exc)


def run_docker_job(settings: Settings, job_info: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    local_job_dir = Path(job_info["job_dir"])
    job = RemoteJob(job_info["conn_id"], job_info["job_key"], PurePosixPath(settings.host_work_dir),
                    PurePosixPath(settings.host_model_dir))
    client = open_verified(ssh_hook(job.conn_id))
    try:
        hosts = host_gpus_of(job.conn_id, client)
        api = _verified_engine_client(client, timeout=60)
        with client.open_sftp() as sftp:
            container_id = _start_or_adopt(api, sftp, settings, job, job_info, hosts, local_job_dir)
            watch = ContainerWatch(api, sftp, container_id, job, local_job_dir, settings.ledger_sync_seconds)
            try:
                code = watch.until_exit()
            except BaseException:
                _stop(api, container_id)
                raise
            finally:
                watch.copy_logs()
                size = sync_ledger(sftp, job, local_job_dir)
                log.info("fetched the ledger of job %s (%d bytes)", job.job_key, size)
            info = api.inspect_container(container_id)
            state, labels = info["State"], info["Config"].get("Labels") or {}
            api.remove_container(container_id, force=True)
    finally:
        client.close()
    if code == EXIT_JOB_BUSY:
        raise WorkerFailed(f"job {job.job_key} is held by another worker on {job.conn_id}; the retry adopts it")
    if code == EXIT_TOKENIZER_MISMATCH:
        raise PlanNotTheEngines.from_output(watch.tail, where=f"on {job.conn_id}: ")
    if code != 0:
        raise WorkerFailed(
            f"worker container for job {job.job_key} on {job.conn_id} exited with status {code}; finished items are "
            "kept in the ledger and a retry does only the rest. Last output:\n" + "\n".join(watch.tail))
    return {"container": container_id[:12], "started_at": state.get("StartedAt"),
            "finished_at": state.get("FinishedAt"), "slot_lock": labels.get(SLOT_LOCK_LABEL)}
