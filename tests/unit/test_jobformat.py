"""The job format shared by the DAG side and the worker image: round trips, the ledger, locks, and no dependency
beyond the standard library (the image copies these files alone)."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest

from include.cosmos_upsample import jobformat, prompt_formats
from include.cosmos_upsample.jobformat import Job, JobItem, Ledger, job_lock, worker_holds


def test_manifest_round_trip(tmp_path):
    job = Job("j", "vllm", "m", 4096, 300, "cosmos_upsampler", {"temperature": 0.6}, {"max_num_seqs": 8},
              "bundled", (JobItem("k", "s", "t", ("a.jpg",), planned_tokens=514, max_tokens=None),))
    (tmp_path / jobformat.MANIFEST_NAME).write_text(json.dumps(job.to_manifest()))
    assert Job.read(tmp_path) == job


def test_torn_last_line_is_ignored_and_only_ok_counts_as_finished(tmp_path):
    ledger = Ledger.of(tmp_path)
    ledger.append({"key": "a", "status": "ok"})
    ledger.append({"key": "b", "status": "failed"})
    with ledger.path.open("a") as handle:
        handle.write('{"key": "c", "sta')
    assert ledger.finished_keys() == {"a"}
    assert [entry["key"] for entry in ledger.entries()] == ["a", "b"]


def test_a_held_job_lock_is_seen_by_others(tmp_path):
    assert not worker_holds(tmp_path)
    with job_lock(tmp_path) as got_it:
        assert got_it
        # flock locks belong to the open file description: a second open in this process is another holder.
        with job_lock(tmp_path) as second:
            assert not second
        assert worker_holds(tmp_path)
    assert not worker_holds(tmp_path)


@pytest.mark.parametrize("module", [jobformat, prompt_formats])
def test_shared_modules_need_only_the_standard_library(module):
    tree = ast.parse(Path(module.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported - set(sys.stdlib_module_names)
