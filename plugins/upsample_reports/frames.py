"""The hint frames a run's items name, for thumbnails beside each answer and for the review step's links.

Only files the run's own items name are served: the frame paths in the run folder's items (`merged.json` once merge
ran, else the validated chunks, so a reviewer sees them while the run waits for review), and of those only JPEG files
inside that work dir's `hints/` folder (after resolving symlinks). Nothing from a request is joined into a path: the
request picks an item by its spec id and a frame by its index.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from include.cosmos_upsample.layout import HINTS, RUNS, RunFolder, read_json, safe_name
from upsample_reports.records import RunRecord, local_path

MAX_FRAME_BYTES = 10 * 1024 * 1024


def run_folder_of(record: RunRecord) -> Path | None:
    """The run's folder: from discover's XCom, else `<output_dir>/runs/<run_id>` beside a report found on disk."""
    if record.run_dir is not None:
        return record.run_dir
    if record.report_path is None:
        return None
    candidate = local_path(str(record.report_path.parent.parent / RUNS / safe_name(record.run_id)))
    return candidate if candidate is not None and candidate.is_dir() else None


def _items(run_dir: Path) -> list[dict[str, Any]]:
    run = RunFolder(run_dir)
    sources = [run.merged] if run.merged.is_file() else run.validated_files()
    items: list[dict[str, Any]] = []
    for source in sources:
        try:
            found = read_json(source)
        except (OSError, ValueError):
            continue
        if isinstance(found, list):
            items.extend(item for item in found if isinstance(item, dict))
    return items


def _servable(value: Any, hints: Path) -> Path | None:
    path = local_path(value)
    if path is None or path.suffix.lower() not in (".jpg", ".jpeg"):
        return None
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not real.is_relative_to(hints) or not real.is_file() or real.stat().st_size > MAX_FRAME_BYTES:
        return None
    return real


def item_frames(run_dir: Path | None) -> dict[str, list[Path]]:
    """spec id -> the hint frame files of that item that may be served (possibly none)."""
    if run_dir is None or run_dir.parent.name != RUNS:
        return {}
    try:
        hints = (run_dir.parent.parent / HINTS).resolve(strict=True)
    except (OSError, RuntimeError):
        return {}
    frames: dict[str, list[Path]] = {}
    for item in _items(run_dir):
        paths = item.get("frame_paths")
        if isinstance(item.get("spec_id"), str) and isinstance(paths, list):
            frames[item["spec_id"]] = [path for path in (_servable(value, hints) for value in paths) if path]
    return frames


def frame_file(run_dir: Path | None, spec_id: str, index: int) -> Path | None:
    frames = item_frames(run_dir).get(spec_id, [])
    return frames[index] if 0 <= index < len(frames) else None
