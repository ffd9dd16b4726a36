"""GPU slots: which GPUs of which host a model job may use. Pure values; the edge that reads a host's connection and
asks its nvidia-smi over SSH (host_gpus_of, gpu_hosts) closes the module.

A GPU host's SSH connection extra may declare its GPUs and how many one job uses:

    {"gpus": [0, 1, 2, 3, 4, 5, 6, 7], "gpus_per_job": 2}    4 slots: (0,1) (2,3) (4,5) (6,7)
    {"gpus": "auto", "gpus_per_job": 1}                       ids read with nvidia-smi over SSH (logged); a host
                                                              that cannot be asked is an error, never "all GPUs"
    {"gpus": "none"}                                          a host without GPUs (CPU engines, the test bed): one
                                                              slot, no GPU device request
    (no "gpus")                                               1 slot with every GPU of the host (no declaration)

A slot is a fixed group of device ids. Its container gets exactly those devices, vLLM gets tensor_parallel_size =
the group's size, and the worker holds the slot's lock file (named by its device ids, under the host's work
folder) while its model is loaded, so two jobs never share a GPU, whichever run or retry they belong to.
"""

from __future__ import annotations

import logging
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from include.cosmos_upsample.errors import NotRetryable
from include.cosmos_upsample.jobformat import GPU_LOCK_NAME
from include.cosmos_upsample.ssh_hosts import connection_extra, open_verified, ssh_hook

log = logging.getLogger(__name__)

GPUS_EXTRA = "gpus"
GPUS_PER_JOB_EXTRA = "gpus_per_job"
DISCOVER = "auto"
NO_GPUS = "none"
# What nvidia-smi prints, one device index per line.
NVIDIA_SMI_COMMAND = ("nvidia-smi", "--query-gpu=index", "--format=csv,noheader")
# Device ids end up in lock file names and the Docker API: indices or UUIDs (GPU-8f3c...), nothing else.
_DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")


class GpuDeclarationError(NotRetryable, ValueError):
    """A connection's `gpus`/`gpus_per_job` extra cannot be used as written: fix the connection (a retry cannot)."""


@dataclass(frozen=True)
class GpuSlot:
    conn_id: str
    index: int
    device_ids: tuple[str, ...]  # empty: every GPU of the host (the connection declares none), or none at all
    cpu_only: bool = False  # the host declares it has no GPU ("gpus": "none"): its container asks for none

    @property
    def gpu_count(self) -> int | None:
        return len(self.device_ids) or None

    @property
    def lock_name(self) -> str:
        """The slot's lock under the host's work folder: `.gpu-0,1.lock`; the host-wide `.gpu.lock` when undeclared.

        Named by device ids, not by the slot's position, so jobs planned by another run (or before the
        connection's gpus_per_job changed) lock the same file for the same GPUs.
        """
        if not self.device_ids:
            return GPU_LOCK_NAME
        lock = PurePosixPath(GPU_LOCK_NAME)
        return f"{lock.stem}-{','.join(self.device_ids)}{lock.suffix}"

    @property
    def label(self) -> str:
        """How the slot is named in logs and on its container: conn_id/index."""
        return f"{self.conn_id}/{self.index}"


@dataclass(frozen=True)
class HostGpus:
    conn_id: str
    device_ids: tuple[str, ...]  # empty: undeclared
    gpus_per_job: int = 1
    cpu_only: bool = False

    def slots(self) -> list[GpuSlot]:
        """len(gpus) // gpus_per_job fixed groups, in the declared order; leftover GPUs stay unused."""
        if not self.device_ids:
            return [GpuSlot(self.conn_id, 0, (), self.cpu_only)]
        size = self.gpus_per_job
        return [GpuSlot(self.conn_id, index, self.device_ids[index * size:(index + 1) * size])
                for index in range(len(self.device_ids) // size)]


def wants_discovery(extra: Mapping[str, Any]) -> bool:
    return extra.get(GPUS_EXTRA) == DISCOVER


def parse_device_ids(value: Any, conn_id: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):  # a connection form may hold "0,1,2" or "[0, 1]"
        value = [part for part in re.split(r"[\s,\[\]]+", value) if part]
    if not isinstance(value, (list, tuple)):
        raise GpuDeclarationError(f"connection {conn_id}: extra 'gpus' must be a list of device ids, got {value!r}")
    ids = tuple(str(item).strip() for item in value)
    bad = [item for item in ids if not _DEVICE_ID.match(item)]
    if bad:
        raise GpuDeclarationError(f"connection {conn_id}: extra 'gpus' holds invalid device ids {bad!r}")
    if len(set(ids)) != len(ids):
        raise GpuDeclarationError(f"connection {conn_id}: extra 'gpus' lists a device twice: {list(ids)}")
    return ids


def host_gpus(conn_id: str, extra: Mapping[str, Any], discovered: Sequence[str] | None = None) -> HostGpus:
    """The host's declaration from its connection extra; `discovered` stands in for `"gpus": "auto"`."""
    try:
        per_job = int(extra.get(GPUS_PER_JOB_EXTRA, 1))
    except (TypeError, ValueError):
        raise GpuDeclarationError(f"connection {conn_id}: extra 'gpus_per_job' must be a whole number") from None
    if per_job < 1:
        raise GpuDeclarationError(f"connection {conn_id}: extra 'gpus_per_job' must be at least 1, got {per_job}")
    if extra.get(GPUS_EXTRA) == NO_GPUS:
        return HostGpus(conn_id, (), 1, cpu_only=True)
    if wants_discovery(extra) and discovered is None:
        raise GpuDeclarationError(f"connection {conn_id}: extra 'gpus' is 'auto' but no nvidia-smi answer was given")
    declared = discovered if wants_discovery(extra) else extra.get(GPUS_EXTRA)
    ids = parse_device_ids(declared, conn_id)
    if ids and len(ids) < per_job:
        raise GpuDeclarationError(
            f"connection {conn_id}: gpus_per_job={per_job} but only {len(ids)} GPU(s) declared: {list(ids)}")
    return HostGpus(conn_id, ids, per_job)


def parse_nvidia_smi(output: str) -> tuple[str, ...]:
    return tuple(line.strip() for line in output.splitlines() if line.strip())


def all_slots(hosts: Sequence[HostGpus]) -> list[GpuSlot]:
    """Every slot of every host, interleaved (h1/0, h2/0, h1/1, h2/1, ...), so round-robin jobs spread over hosts
    before they stack on one."""
    per_host = [host.slots() for host in hosts]
    depth = max((len(slots) for slots in per_host), default=0)
    return [slots[index] for index in range(depth) for slots in per_host if index < len(slots)]


def pool_size(hosts: Sequence[HostGpus]) -> int:
    """The `cosmos_gpu` pool's size that lets every slot work at once: the total slot count."""
    return len(all_slots(hosts))


def choose_slot(slots: Sequence[GpuSlot], busy: set[str], planned: GpuSlot) -> GpuSlot:
    """The planned slot if it is free, else the host's first free one, else the planned one (its worker waits).

    `busy` holds the lock names of slots whose containers run now (another DAG run's jobs, for instance). Two tasks
    choosing at the same moment may pick the same slot: then the slot lock makes one wait, never share.
    """
    if planned.lock_name not in busy:
        return planned
    return next((slot for slot in slots if slot.lock_name not in busy), planned)


@dataclass(frozen=True)
class Placement:
    """What the container of a job on `slot` gets."""

    slot: GpuSlot
    device_ids: tuple[str, ...] | None  # None: no GPU request (CPU backend); (): every GPU of the host
    engine: dict[str, Any]  # merged into the manifest's engine settings
    environment: dict[str, str]

    def lock_path(self, container_work_dir: PurePosixPath) -> PurePosixPath:
        return container_work_dir / self.slot.lock_name


def placement(slot: GpuSlot, backend: str) -> Placement:
    uses_gpu = backend == "vllm" and not slot.cpu_only
    engine = {"tensor_parallel_size": slot.gpu_count} if uses_gpu and slot.gpu_count else {}
    environment = {"COSMOS_UPSAMPLE_SLOT": slot.label,
                   "COSMOS_UPSAMPLE_SLOT_GPUS": NO_GPUS if slot.cpu_only else ",".join(slot.device_ids) or "all"}
    return Placement(slot, slot.device_ids if uses_gpu else None, engine, environment)


def _slot_at(slots: Sequence[GpuSlot], conn_id: str | None, index: int | None) -> GpuSlot | None:
    return next((slot for slot in slots if (slot.conn_id, slot.index) == (conn_id, index)), None)


def engine_for(slots: Sequence[GpuSlot], conn_id: str | None, index: int | None, backend: str) -> dict[str, Any]:
    """The engine settings a planned job's slot adds to its manifest (tensor_parallel_size), {} off GPU hosts."""
    slot = _slot_at(slots, conn_id, index)
    return placement(slot, backend).engine if slot else {}


def devices_of(slots: Sequence[GpuSlot], conn_id: str | None, index: int | None) -> list[str] | None:
    """The device ids of a planned job's slot, recorded with its chunk: the job runs on exactly these (None off GPU
    hosts; [] for a host that declares no GPU ids)."""
    slot = _slot_at(slots, conn_id, index)
    return list(slot.device_ids) if slot else None


def planned_slot(slots: Sequence[GpuSlot], conn_id: str, index: int | None, devices: Sequence[str] | None) -> GpuSlot:
    """The slot a job was planned on at discover: the host's slot with the recorded device ids (its position may
    differ if the declaration changed since), else those recorded devices as they are; never a wider one. A job
    planned before devices were recorded takes the slot at its index."""
    if devices is None:
        return slots[(index or 0) % len(slots)]
    wanted = tuple(str(device) for device in devices)
    found = next((slot for slot in slots if slot.device_ids == wanted), None)
    return found or GpuSlot(conn_id, index or 0, wanted, cpu_only=not wanted and slots[0].cpu_only)


# The edge: a host's declaration read from its connection, and nvidia-smi asked over SSH for `"gpus": "auto"`.


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
    extra = connection_extra(conn_id)
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
