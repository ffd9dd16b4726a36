"""The DESIGN invariants as one check, run after every fault and hostile-input case of this folder."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from pathlib import Path

# One line per model answer the worker prints, e.g. "worker | [2/5] spec_1: ok, ETA 3s".
MODEL_CALL_LINE = re.compile(r"worker \| \[\d+/\d+\] ")
FINAL_STATUSES = {"upsampled", "cached", "invalid", "failed", "planned", "flagged"}


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under folder (symlinks followed), by relative path."""
    return {
        os.fsdecode(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def tree_listing(folder: Path, skip: Path) -> set[str]:
    """Every path under folder except those under skip (the output_dir): to see what a run wrote elsewhere."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        if here == skip or skip in here.parents:
            dirnames[:] = []
            continue
        found.update(os.fsdecode(here / name) for name in dirnames + filenames if here / name != skip)
    return found


def ledger_entries(output_dir: Path) -> list[dict]:
    entries = []
    for ledger in sorted((output_dir / "jobs").glob("*/ledger.jsonl")):
        entries.extend(json.loads(line) for line in ledger.read_text(encoding="utf-8").splitlines() if line.strip())
    return entries


def model_calls(*outputs: str) -> int:
    """Model answers as the worker announced them in `airflow dags test` output."""
    return sum(len(MODEL_CALL_LINE.findall(output)) for output in outputs)


def spec_files(input_dir: Path) -> list[str]:
    return sorted(str(path) for path in input_dir.glob("*.json") if path.is_file())


def assert_invariants(
    input_dir: Path,
    output_dir: Path,
    before_digest: dict[str, str],
    report: dict,
    *,
    outside: tuple[Path, set[str]] | None = None,
    outputs: tuple[str, ...] | None = None,
) -> None:
    """Inputs untouched; one report item per spec file; nothing paid twice; valid JSON out; nothing written outside.

    outside: (a folder around input_dir and output_dir, its tree_listing before the runs).
    outputs: every `airflow dags test` output that wrote to this output_dir, to count model calls against the ledger.
    """
    assert tree_digest(input_dir) == before_digest, "an input file was changed, added or removed"

    sources = Counter(item["source_path"] for item in report["items"])
    assert sorted(sources) == spec_files(input_dir), "report items and spec files differ"
    assert set(sources.values()) == {1}, f"spec files reported more than once: {sources.most_common(3)}"
    assert {item["status"] for item in report["items"]} <= FINAL_STATUSES
    by_status = Counter(item["status"] for item in report["items"])
    assert report["counts"]["discovered"] == len(report["items"])
    for status in ("upsampled", "cached", "invalid", "failed", "flagged"):
        assert report["counts"][status] == by_status[status], status
    for item in report["items"]:
        if item["status"] in ("invalid", "failed", "flagged"):
            assert item["reason"], f"{item['source_path']} is {item['status']} without a reason"

    entries = ledger_entries(output_dir)
    # Each attempt of an item is asked once (a re-ask of a flagged answer is a new attempt), and an item passes once.
    ok_per_attempt = Counter((entry["key"], entry.get("attempt", 1)) for entry in entries if entry["status"] == "ok")
    assert not ok_per_attempt or max(ok_per_attempt.values()) == 1, f"paid twice: {ok_per_attempt.most_common(3)}"
    passed = Counter(entry["key"] for entry in entries if entry.get("verdict") == "pass")
    assert not passed or max(passed.values()) == 1, f"answers passed twice: {passed.most_common(3)}"
    if outputs is not None:
        assert model_calls(*outputs) == len(entries), "model calls and ledger lines differ"

    for folder in ("specs", "reports", "review"):
        for path in (output_dir / folder).glob("*"):
            assert not path.name.startswith("."), f"half-written file left behind: {path}"
            if path.suffix == ".json" and path.is_file():
                json.loads(path.read_text(encoding="utf-8"))  # raises on a torn or empty file

    if outside is not None:
        around, before = outside
        assert tree_listing(around, output_dir) == before, "something was written outside output_dir"
