"""A job's folder on its GPU host (runner `docker`): where it lives (RemoteJob), staging its manifest and hint frames
over SFTP, and copying its ledger back.

Frames are named by content on the host, so a retry sends only what is missing. The ledger lives on the host, next
to the job, and only its new bytes travel back: the worker skips what it already holds, so a retried task or a
container that died mid-job redoes only the unfinished items. SFTP takes paths as values: no shell string is built.
"""

from __future__ import annotations

import hashlib
import json
import stat
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from include.cosmos_upsample.jobformat import LEDGER_NAME, MANIFEST_NAME, Ledger, job_lock
from include.cosmos_upsample.layout import write_local_atomic

# The longest a ledger copy waits for another process copying the same job's ledger.
LEDGER_LOCK_WAIT_SECONDS = 30.0
# How much of a host ledger one SFTP read takes when it is copied whole.
_COPY_CHUNK_BYTES = 1 << 20


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


def remote_manifest(manifest: dict[str, Any], frame_names: dict[str, str], model: str,
                    engine: dict[str, Any] | None = None) -> dict[str, Any]:
    """The local manifest with frames renamed to their staged names (relative to the job dir), the model path and
    the slot's engine settings (tensor_parallel_size)."""
    items = [{**item, "frames": [f"frames/{frame_names[frame]}" for frame in item["frames"]]}
             for item in manifest["items"]]
    return {**manifest, "model": model, "engine": {**manifest.get("engine", {}), **(engine or {})}, "items": items}


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
        with sftp.open(str(job.ledger), "rb") as remote:
            write_local_atomic(target, iter(lambda: remote.read(_COPY_CHUNK_BYTES), b""))
        return target.stat().st_size
    if size > have:
        with sftp.open(str(job.ledger), "rb") as remote:
            remote.seek(have)
            tail = remote.read(size - have)
        Ledger(target).append_bytes(tail)
    return have + max(size - have, 0)
