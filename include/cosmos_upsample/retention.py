"""Retention: run scratch older than `retention_days` is pruned from `work_dir` and from the GPU hosts; outputs,
reports, review files and anything of a running run or job never are.

The DAG's `prune_scratch` teardown calls `prune` at the end of every run, on the run's own work_dir. Pruned, when
nothing in it changed for `retention_days` (the newest modification time of anything inside) and:

    runs/<run_id>/            its run is not this one and Airflow does not have it queued or running
    jobs/<job_key>/           no kept run folder names it and no worker holds its lock (taken for the deletion, so no
                              worker can start on it meanwhile); a job that ran on a GPU host (`host.json`) only once
                              its folder there is gone: no container of it runs, nothing in it changed either
    jobs/by-item/<item_key>   the job it names is gone (it older than the job, so checked only when old itself)
    hints/<hint_key>/         no kept run folder, kept job manifest or review file names it
    events/claims/<message>   always (a bucket-event message's claim, events.py): a message is given to runs only
                              around its arrival, and one seen again after its claim went is only `cached`

Never touched: `specs/`, `reports/`, `review/` (in output_dir, which is work_dir by default), `cache/videos/` (it
keeps its own cap, `video_cache_gb`), the GPU slot locks, and anything else. Each deletion renames the folder to
`.pruning-<name>-<random>` first (atomic: no reader sees half of it), then removes it; leftovers of an interrupted
pass are removed by the next. A pass is idempotent: run twice, the second prunes nothing.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from include.cosmos_upsample.jobformat import MANIFEST_NAME, job_lock, worker_holds
from include.cosmos_upsample.layout import HINTS, RUNS, OutputLayout, RunFolder, read_json
from include.cosmos_upsample.live_jobs import host_of
from include.cosmos_upsample.settings import Settings
from include.cosmos_upsample.shared_storage import read_marker

log = logging.getLogger(__name__)

DAY_SECONDS = 86400
TRASH_PREFIX = ".pruning-"
BY_ITEM = "by-item"
REVIEW = "review"
JOB_KEY = re.compile(r"^[0-9a-f]{20}$")  # batching.job_key
HINT_REFERENCE = re.compile(rf"/{HINTS}/([0-9a-f]{{24}})/")  # video.hint_key, as a folder in any stored path


@dataclass
class Tally:
    """What one kind of scratch came to: pruned (with the bytes freed) and kept although old."""

    pruned: int = 0
    bytes: int = 0
    kept_old: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"pruned": self.pruned, "bytes": self.bytes, "kept_old": self.kept_old}


TALLIES = ("runs", "jobs", "pointers", "hints", "host_jobs", "claims")


@dataclass
class PruneResult:
    runs: Tally = field(default_factory=Tally)
    jobs: Tally = field(default_factory=Tally)
    pointers: Tally = field(default_factory=Tally)
    hints: Tally = field(default_factory=Tally)
    host_jobs: Tally = field(default_factory=Tally)
    claims: Tally = field(default_factory=Tally)
    problems: list[str] = field(default_factory=list)  # what could not be pruned and why (logged, then raised)
    needs_person: bool = False  # a problem no retry can fix (permissions, a refused host key)

    def as_dict(self) -> dict[str, Any]:
        tallies = {name: getattr(self, name).as_dict() for name in TALLIES}
        return {**tallies, "problems": list(self.problems)}

    def describe(self) -> str:
        """For the task log: `runs 1 pruned (2.1 MiB), 1 old kept; jobs ...`."""
        parts = []
        for name in TALLIES:
            tally = getattr(self, name)
            parts.append(f"{name} {tally.pruned} pruned ({tally.bytes / 2**20:.1f} MiB), {tally.kept_old} old kept")
        return "; ".join(parts) + (f"; {len(self.problems)} problem(s)" if self.problems else "")

    def problem(self, message: str, needs_person: bool) -> None:
        log.warning("retention: %s", message)
        self.problems.append(message)
        self.needs_person = self.needs_person or needs_person


class PruneFailed(RuntimeError):
    """Some scratch could not be pruned (a host that did not answer, say); a retry or the next run tries again."""


@dataclass(frozen=True)
class Scratch:
    """One folder of scratch: when anything in it last changed, and its size."""

    path: Path
    newest: float
    size: int


def activity(path: Path) -> Scratch:
    """Newest modification time and total size of a folder (or file), links not followed."""
    info = path.lstat()
    newest, size = info.st_mtime, info.st_size if not stat.S_ISDIR(info.st_mode) else 0
    if stat.S_ISDIR(info.st_mode):
        for folder, dirs, files in os.walk(path):
            for name in [*dirs, *files]:
                try:
                    entry = os.lstat(os.path.join(folder, name))
                except FileNotFoundError:
                    continue
                newest = max(newest, entry.st_mtime)
                size += entry.st_size if not stat.S_ISDIR(entry.st_mode) else 0
    return Scratch(path, newest, size)


def remove(path: Path) -> None:
    """Rename into the same folder's trash name (atomic), then delete: nothing is ever seen half deleted."""
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
    path.rename(trash)
    shutil.rmtree(trash) if trash.is_dir() else trash.unlink()


def _entries(folder: Path, name: re.Pattern[str] | None = None) -> Iterator[Path]:
    """Children of `folder` to consider (matching `name` if given); trash left by an interrupted pass is deleted."""
    try:
        children = sorted(folder.iterdir())
    except FileNotFoundError:
        return
    for child in children:
        if child.name.startswith(TRASH_PREFIX):
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
        elif name.match(child.name) if name else not child.name.startswith("."):
            yield child


def _old(paths: Iterable[Path], cutoff: float) -> Iterator[Scratch]:
    for path in paths:
        try:
            scratch = activity(path)
        except FileNotFoundError:
            continue
        if scratch.newest < cutoff:
            yield scratch


@dataclass
class Pass:
    """One pruning pass over a work_dir: what is kept, what goes, and the tallies."""

    layout: OutputLayout
    cutoff: float
    result: PruneResult = field(default_factory=PruneResult)

    def delete(self, scratch: Scratch, tally: Tally) -> None:
        try:
            remove(scratch.path)
        except FileNotFoundError:
            return  # gone meanwhile: nothing left to do
        except PermissionError as exc:
            self.result.problem(f"cannot delete {scratch.path} ({exc}); give the Airflow workers' user write access "
                                "to it and its folder, or delete it by hand", needs_person=True)
            return
        except OSError as exc:
            self.result.problem(f"cannot delete {scratch.path} ({exc})", needs_person=False)
            return
        tally.pruned += 1
        tally.bytes += scratch.size

    def runs(self, keep: Path, is_live: Callable[[str], bool]) -> list[RunFolder]:
        """Prune old run folders of finished runs; returns the run folders that stay."""
        folders = [path for path in _entries(self.layout.root / RUNS) if path.is_dir()]
        old = {scratch.path: scratch for scratch in _old(folders, self.cutoff)}
        kept = []
        for path in folders:
            if path in old and path != keep and not is_live(run_id_of(path)):
                self.delete(old[path], self.result.runs)
                continue
            self.result.runs.kept_old += path in old
            kept.append(RunFolder(path))
        return kept

    def jobs(self, named: set[str], hosts: HostJobs) -> set[str]:
        """Prune old job folders nothing names or holds (and their host folders first); returns the kept keys."""
        jobs_dir = self.layout.jobs_dir
        folders = list(_entries(jobs_dir, JOB_KEY))
        old = {scratch.path.name: scratch for scratch in _old(folders, self.cutoff)}
        candidates = {key: scratch for key, scratch in old.items()
                      if key not in named and not worker_holds(scratch.path)}
        self.result.jobs.kept_old += len(old) - len(candidates)
        gone_remotely = hosts.prune(self, {key: host_of(scratch.path) for key, scratch in candidates.items()})
        for key, scratch in candidates.items():
            if key not in gone_remotely or not self._delete_unheld_job(scratch):
                self.result.jobs.kept_old += 1
        return {path.name for path in folders if path.exists()}

    def _delete_unheld_job(self, scratch: Scratch) -> bool:
        """Delete a job folder under its own lock, so a worker that starts on it meanwhile finds it busy or gone."""
        try:
            with job_lock(scratch.path) as free:
                if not free:
                    return False
                self.delete(scratch, self.result.jobs)
        except FileNotFoundError:
            pass
        return True

    def pointers(self) -> None:
        """by-item pointers to jobs that are gone: a pointer is older than its job, so only old ones can be."""
        jobs_dir = self.layout.jobs_dir
        for scratch in _old(_entries(jobs_dir / BY_ITEM), self.cutoff):
            try:
                named = scratch.path.read_text(encoding="utf-8").strip()
            except OSError:
                continue
            if JOB_KEY.match(named) and (jobs_dir / named).exists():
                continue
            # Read again just before: a batch may have pointed the item at a new job meanwhile.
            if scratch.path.read_text(encoding="utf-8").strip() == named:
                self.delete(scratch, self.result.pointers)

    def hints(self, named: Callable[[], set[str]]) -> None:
        """Prune old hint folders that nothing kept names (`named` is asked only when there are old ones)."""
        old = list(_old(_entries(self.layout.hints_dir), self.cutoff))
        keep = named() if old else set()
        for scratch in old:
            if scratch.path.name in keep:
                self.result.hints.kept_old += 1
            else:
                self.delete(scratch, self.result.hints)


    def claims(self) -> None:
        """Bucket-event message claims (one small file each) unchanged for the retention time."""
        for scratch in _old(_entries(self.layout.message_claims_dir), self.cutoff):
            self.delete(scratch, self.result.claims)


def run_id_of(run_dir: Path) -> str:
    """The run id discover recorded in the folder's marker; the folder's name for folders made before it did."""
    record = read_marker(run_dir) or {}
    run_id = record.get("run_id")
    return run_id if isinstance(run_id, str) and run_id else run_dir.name


def jobs_named_by(runs: Iterable[RunFolder]) -> set[str]:
    """Job keys the kept run folders name: planned (chunks), made (plans) and reused (plans' `answered`)."""
    named: set[str] = set()
    for run in runs:
        for path in [*run.chunks(), *run.job_plans()]:
            try:
                data = read_json(path)
            except (OSError, ValueError):
                continue
            if not isinstance(data, dict):
                continue
            job = data.get("job") if isinstance(data.get("job"), dict) else data
            named.add(str(job.get("job_key") or ""))
            named.update(Path(str(job_dir)).name for job_dir in (data.get("answered") or {}).values())
    return {key for key in named if JOB_KEY.match(key)}


def hints_named_in(files: Iterable[Path]) -> set[str]:
    """Hint folders named in these files, whatever their JSON shape (run items, job manifests, review files)."""
    named: set[str] = set()
    for path in files:
        try:
            named.update(HINT_REFERENCE.findall(path.read_text(encoding="utf-8", errors="replace")))
        except OSError:
            continue
    return named


class HostJobs:
    """Job folders on the GPU hosts (runner docker), reached over the verified SSH connections of ssh_hosts.py."""

    def __init__(self, host_work_dir: str) -> None:
        self.host_work_dir = PurePosixPath(host_work_dir)

    def prune(self, run: Pass, hosts: dict[str, str | None]) -> set[str]:
        """Delete the host folders of these jobs (job key -> host or None); returns the keys now gone from every
        host, so their local folders may go too. A host that cannot be asked keeps its jobs here until it can."""
        from include.cosmos_upsample.errors import NotRetryable

        gone = {key for key, host in hosts.items() if host is None}
        for conn_id in sorted({host for host in hosts.values() if host}):
            keys = sorted(key for key, host in hosts.items() if host == conn_id)
            try:
                gone.update(self._prune_on(conn_id, keys, run))
            except Exception as exc:  # noqa: BLE001 - unreachable host, refused key: its jobs wait for the next pass
                run.result.problem(f"GPU host {conn_id}: {exc}; its {len(keys)} old job folder(s) are kept here "
                                   "until it can be asked", needs_person=isinstance(exc, NotRetryable))
        return gone

    def _prune_on(self, conn_id: str, keys: list[str], run: Pass) -> set[str]:
        from include.cosmos_upsample.containers import running_job_keys
        from include.cosmos_upsample.ssh_hosts import open_verified, ssh_hook

        client = open_verified(ssh_hook(conn_id))
        try:
            running = running_job_keys(client)
            gone = set()
            with client.open_sftp() as sftp:
                for key in keys:
                    if key in running:
                        log.info("job %s still runs on %s: kept", key, conn_id)
                        continue
                    if self._prune_folder(sftp, self.host_work_dir / key, run):
                        gone.add(key)
            return gone
        finally:
            client.close()

    def _prune_folder(self, sftp: Any, folder: PurePosixPath, run: Pass) -> bool:
        """True when the folder is gone (now or before); False when it changed within the retention time."""
        try:
            newest, size = sftp_activity(sftp, folder)
        except FileNotFoundError:
            return True
        if newest >= run.cutoff:
            run.result.host_jobs.kept_old += 1
            return False
        trash = folder.with_name(f"{TRASH_PREFIX}{folder.name}-{uuid.uuid4().hex[:8]}")
        sftp.posix_rename(str(folder), str(trash))
        sftp_rmtree(sftp, trash)
        run.result.host_jobs.pruned += 1
        run.result.host_jobs.bytes += size
        return True


def sftp_activity(sftp: Any, folder: PurePosixPath) -> tuple[float, int]:
    """Newest modification time and total size of a folder on the host (SFTP attributes, links not followed)."""
    newest, size = float(sftp.lstat(str(folder)).st_mtime), 0
    for entry in sftp.listdir_attr(str(folder)):
        if stat.S_ISDIR(entry.st_mode):
            inner_newest, inner_size = sftp_activity(sftp, folder / entry.filename)
            newest, size = max(newest, inner_newest), size + inner_size
        else:
            newest, size = max(newest, float(entry.st_mtime)), size + (entry.st_size or 0)
    return newest, size


def sftp_rmtree(sftp: Any, folder: PurePosixPath) -> None:
    for entry in sftp.listdir_attr(str(folder)):
        path = folder / entry.filename
        sftp_rmtree(sftp, path) if stat.S_ISDIR(entry.st_mode) else sftp.remove(str(path))
    sftp.rmdir(str(folder))


def prune(settings: Settings, keep: Path, is_live: Callable[[str], bool],
          now: float | None = None) -> PruneResult:
    """One pass over the settings' work_dir (and the GPU hosts its jobs ran on); `keep` is the calling run's own
    folder, `is_live(run_id)` says whether Airflow has that run queued or running."""
    result = PruneResult()
    if settings.retention_days <= 0:
        log.info("retention_days is %s: nothing is pruned", settings.retention_days)
        return result
    from include.cosmos_upsample.storage import work_dir_for

    now = time.time() if now is None else now
    work_dir = work_dir_for(settings.work_dir, settings.output_dir)  # as discover chose it (saved runs hold it)
    run = Pass(OutputLayout(work_dir), now - settings.retention_days * DAY_SECONDS, result)
    kept_runs = run.runs(keep, is_live)
    kept_jobs = run.jobs(jobs_named_by(kept_runs), HostJobs(settings.host_work_dir))
    run.pointers()
    run.hints(lambda: hints_named_in([
        *(path for folder in kept_runs for path in folder.validated_files()),
        *(run.layout.job_dir(key) / MANIFEST_NAME for key in sorted(kept_jobs)),
        *_review_files(settings),
    ]))
    run.claims()
    log.info("retention %s days in %s: %s", settings.retention_days, run.layout.root, result.describe())
    return result


def _review_files(settings: Settings) -> list[Any]:
    """Review files may name hint frames (their thumbnails); they are read wherever output_dir is."""
    from include.cosmos_upsample.storage import output_layout

    review = output_layout(settings.output_dir).root / REVIEW
    try:
        return sorted(review.glob("*.json")) if review.is_dir() else []
    except OSError:
        return []
