"""Where a run's data lives: `input_dir` and `output_dir` as local folders or object storage, `work_dir` as scratch.

`input_dir`/`output_dir` take what Airflow's `ObjectStoragePath` takes (`s3://bucket/prefix` with the connection
`storage_conn_id`, `gs://`, `file://`, plain paths), read and written through Airflow's object-storage layer and its
providers. Plain paths and `file://` stay `pathlib.Path`, so a local run behaves exactly as before.

Every stored location is `str(path)`: a local path, or `scheme://conn_id@bucket/key` as ObjectStoragePath renders
itself, so `path_from` rebuilds it with its connection in a later task, on another worker, or in the UI plugin.

Object storage is not a POSIX file system (measured in ../shared/ENVIRONMENT.md): `..` is not normalised on join
(containment is checked after `resolve()`), an exception inside `open("wb")` still commits the partial object (writes
go through the file system's transaction), renames are copy + delete. So the run's scratch (hint frames, job folders,
ledgers, locks, the video cache) lives in `work_dir`, a shared POSIX folder with working `flock`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from include.cosmos_upsample.errors import NotRetryable
from include.cosmos_upsample.jobformat import flocked
from include.cosmos_upsample.layout import OutputLayout, json_text, write_json_atomic, write_local_atomic

log = logging.getLogger(__name__)

# The Airflow connection a scheme uses when `storage_conn_id` is empty (the providers' own defaults).
DEFAULT_CONN_IDS = {"s3": "aws_default", "s3a": "aws_default", "gs": "google_cloud_default",
                    "gcs": "google_cloud_default", "abfs": "wasb_default", "az": "wasb_default"}
VIDEO_CACHE_DIR = ("cache", "videos")
# A cached video used this recently is never evicted: the task that fetched it may still be running ffmpeg on it.
EVICTION_GRACE_SECONDS = 600
_SAFE_SUFFIX = re.compile(r"^\.[A-Za-z0-9]{1,8}$")


class StorageError(NotRetryable, ValueError):
    """A location that cannot be used as asked; the message says which setting to change (a retry cannot)."""


def is_remote(path: Any) -> bool:
    """An object-storage path (ObjectStoragePath or its string); local paths never render with '://'."""
    return "://" in str(path)


def is_url(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def path_from(location: str, conn_id: str = "") -> Any:
    """A stored location as a path: `pathlib.Path` for local ones, else an ObjectStoragePath with its connection
    (from the location itself, `s3://conn@bucket/key`, or `conn_id`, or the scheme's default)."""
    if location.startswith("file://"):
        return Path(urlparse(location).path)
    if "://" not in location:
        return Path(location)
    from airflow.sdk import ObjectStoragePath

    parsed = urlparse(location)
    if "@" in parsed.netloc:  # already names its connection
        return ObjectStoragePath(location)
    return ObjectStoragePath(location, conn_id=conn_id or DEFAULT_CONN_IDS.get(parsed.scheme))


def root_of(location: str, conn_id: str = "") -> Any:
    """A folder setting (input_dir, output_dir) as its normalised path: local ones absolute and resolved."""
    path = path_from(location, conn_id)
    return path if is_remote(path) else path.expanduser().resolve()


def clean_url(path: Any) -> str:
    """`s3://bucket/key` without the connection, for people and other tools; local paths as they are."""
    return f"{path.protocol}://{path.path}" if is_remote(path) else str(path)


def work_dir_for(work_dir: str, output_dir: str) -> Path:
    """The scratch folder: `work_dir`, else `output_dir` when that is local; object storage cannot hold locks."""
    if work_dir:
        if is_url(work_dir):
            raise StorageError(
                f"work_dir {work_dir!r} is object storage; it must be a shared POSIX folder (hint frames, job "
                "ledgers and flock locks live there): set work_dir to a local or network-mounted folder")
        return root_of(work_dir)
    if is_url(output_dir):
        raise StorageError(
            f"output_dir {output_dir!r} is object storage, so the run needs a separate scratch folder: set the "
            "work_dir Param, the Variable cosmos_upsample_work_dir or COSMOS_UPSAMPLE_WORK_DIR to a shared POSIX "
            "folder (every worker must see it)")
    return root_of(output_dir)


def output_layout(output_dir: str) -> OutputLayout:
    """specs/ and reports/ under output_dir, local or object storage (the layout only joins names)."""
    return OutputLayout(path_from(output_dir))


def list_specs(root: Any, pattern: str) -> list[Any]:
    """The spec files under `root` matching `pattern`, sorted; on object storage one listing, no request per file."""
    if not is_remote(root):
        return sorted(path for path in root.glob(pattern) if path.is_file())
    root.fs.invalidate_cache(root.path)  # fsspec keeps listings per process; a long-lived one must see new specs
    found = root.fs.glob(f"{root.path.rstrip('/')}/{pattern}", detail=True)
    prefix = root.path.rstrip("/") + "/"
    keys = sorted(key for key, info in found.items() if info.get("type") == "file" and key.startswith(prefix))
    return [root / key[len(prefix):] for key in keys]


# --- reading inputs ----------------------------------------------------------------------------------------------


def _inside(path: Any, root: Any) -> bool:
    return path.path == root.path or path.path.startswith(root.path.rstrip("/") + "/")


def resolve_object(raw: str, field_name: str, noun: str, spec_path: Any, root: Any) -> Any:
    """A file a spec names, as an object inside input_dir's prefix: tried next to the spec, then at input_dir.
    Keys are compared after `resolve()` (a join keeps `..` literally); missing, folder-only and empty objects are
    refused with the spec's name and the field to fix."""
    from include.cosmos_upsample.specs import SpecError

    name = spec_path.name
    if raw.startswith("/") or "://" in raw or "\\" in raw:
        raise SpecError(f"{name}: {field_name} {raw!r} leaves input_dir {clean_url(root)!r}; with object storage "
                        "name videos relative to the spec or to input_dir")
    folders = [spec_path.parent, root] if spec_path.parent.path != root.path else [root]
    candidates = [(folder / raw).resolve() for folder in folders]
    inside = [candidate for candidate in candidates if _inside(candidate, root)]
    leaves = SpecError(f"{name}: {field_name} {raw!r} leaves input_dir {clean_url(root)!r}; keep videos inside "
                       "input_dir")
    if not inside:
        raise leaves
    for candidate in inside:
        try:
            info = candidate.stat()
        except FileNotFoundError:
            continue
        if info.get("type") != "file":
            raise SpecError(f"{name}: {noun} {raw!r} ({field_name}) is not an object (a folder prefix?)")
        if not info.st_size:
            raise SpecError(f"{name}: {noun} {raw!r} ({field_name}) is empty (0 bytes); replace it")
        return candidate
    if len(inside) < len(candidates):  # found nowhere, and one reading of it leaves the prefix
        raise leaves
    raise SpecError(f"{name}: {noun} {raw!r} not found under input_dir {clean_url(root)!r} (next to the spec or "
                    f"at input_dir); fix {field_name} or upload the object")


def object_identity(path: Any) -> str:
    """An object's identity without reading it: a new upload gets a new ETag (a content hash on S3) and size."""
    info = path.stat()
    tag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("LastModified") or info.st_mtime
    return f"{clean_url(path)}|{info.st_size}|{str(tag).strip(chr(34))}"


# --- writing outputs ---------------------------------------------------------------------------------------------


def write_bytes_atomic(path: Any, chunks: Iterable[bytes]) -> None:
    """Nothing appears under `path` unless every chunk was written: a local temp file renamed into place, or the
    object store's transaction (an exception inside a plain `open("wb")` would still commit the partial object)."""
    if not is_remote(path):
        write_local_atomic(path, chunks)
        return
    with path.fs.transaction, path.open("wb") as handle:
        for chunk in chunks:
            handle.write(chunk)


def write_text_atomic(path: Any, text: str) -> None:
    # backslashreplace: a spec file name that is not UTF-8 shows as \\udcXX instead of failing the write.
    write_bytes_atomic(path, [text.encode("utf-8", errors="backslashreplace")])


def write_json(path: Any, data: Any) -> None:
    """layout.write_json_atomic for local paths (unchanged), the store's transaction for object storage."""
    if is_remote(path):
        write_text_atomic(path, json_text(data))
    else:
        write_json_atomic(path, data)


# --- the video cache ---------------------------------------------------------------------------------------------


@dataclass
class CacheStats:
    hits: int = 0
    downloads: int = 0
    bytes_downloaded: int = 0
    evicted: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"hits": self.hits, "downloads": self.downloads, "bytes_downloaded": self.bytes_downloaded,
                "evicted": self.evicted}


@dataclass
class VideoCache:
    """Videos from object storage, fetched once into `folder` (in work_dir) under a name made from the object's
    content identity (ETag and size), so a re-run, another spec naming the same bytes, or another worker on the
    shared work_dir does not download again. Least recently used entries are evicted above `max_bytes`; one
    `flock` per entry keeps two tasks from downloading the same video at once."""

    folder: Path
    max_bytes: int
    stats: CacheStats = field(default_factory=CacheStats)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def entry_name(self, path: Any) -> str:
        info = path.stat()
        tag = str(info.get("ETag") or info.get("etag") or info.get("md5Hash") or "").strip('"')
        if not tag:  # a store without a content hash: the key and its modification time stand in for it
            tag = f"{clean_url(path)}|{info.get('LastModified') or info.st_mtime}"
        digest = hashlib.sha256(f"{tag}|{info.st_size}".encode()).hexdigest()[:32]
        suffix = path.suffix.lower() if _SAFE_SUFFIX.match(path.suffix or "") else ""
        return digest + suffix

    def local_copy(self, path: Any) -> Path:
        """A local file with the object's bytes (downloaded now, or a hit); touched as used for LRU eviction."""
        target = self.folder / self.entry_name(path)
        self.folder.mkdir(parents=True, exist_ok=True)
        with flocked(self.folder / f".{target.name}.lock"):
            if target.is_file():
                os.utime(target)
                with self._lock:
                    self.stats.hits += 1
                return target
            size = self._download(path, target)
        with self._lock:
            self.stats.downloads += 1
            self.stats.bytes_downloaded += size
        self.evict(keep=target)
        return target

    def _download(self, path: Any, target: Path) -> int:
        size = 0

        def chunks() -> Iterator[bytes]:
            nonlocal size
            with path.open("rb") as source:
                while chunk := source.read(8 * 2**20):
                    size += len(chunk)
                    yield chunk

        write_local_atomic(target, chunks())
        return size

    def evict(self, keep: Path | None = None, now: float | None = None) -> int:
        """Delete least recently used entries until the cache fits `max_bytes`; recently used ones stay."""
        now = time.time() if now is None else now
        entries = []
        for entry in self.folder.iterdir():
            if entry.name.startswith(".") or not entry.is_file():
                continue
            stat = entry.stat()
            entries.append((stat.st_mtime, stat.st_size, entry))
        total = sum(size for _, size, _ in entries)
        removed = 0
        for mtime, size, entry in sorted(entries):
            if total <= self.max_bytes:
                break
            if entry == keep or now - mtime < EVICTION_GRACE_SECONDS:
                continue
            entry.unlink(missing_ok=True)
            total -= size
            removed += 1
        with self._lock:
            self.stats.evicted += removed
        if removed:
            log.info("video cache %s: evicted %d least recently used video(s)", self.folder, removed)
        return removed


def video_cache(work_dir: str | Path, max_gb: float) -> VideoCache:
    return VideoCache(Path(work_dir).joinpath(*VIDEO_CACHE_DIR), int(max_gb * 2**30))


def local_file(path: Any, cache: VideoCache | None) -> Path:
    """A path ffmpeg can open: local files as they are, objects through the video cache."""
    if not is_remote(path):
        return path
    if cache is None:
        raise StorageError(f"{clean_url(path)}: object storage input needs the video cache in work_dir")
    return cache.local_copy(path)
