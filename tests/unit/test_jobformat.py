"""The job format shared by the DAG side and the worker image: round trips, the ledger, locks, and no dependency
beyond the standard library (the image copies these files alone)."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest

from include.cosmos_upsample import answer_schema, jobformat, prompt_formats, quality
from include.cosmos_upsample.jobformat import Job, JobItem, Ledger, job_lock, worker_holds


def test_manifest_round_trip(tmp_path):
    job = Job("j", "vllm", "m", 4096, 300, "cosmos_upsampler", {"temperature": 0.6}, {"max_num_seqs": 8},
              "bundled", (JobItem("k", "s", "t", ("a.jpg",), planned_tokens=514, max_tokens=None),))
    (tmp_path / jobformat.MANIFEST_NAME).write_text(json.dumps(job.to_manifest()))
    assert Job.read(tmp_path) == job


def job_of(*keys: str, retries: int = 2) -> Job:
    return Job("j", "llama_cpp", "m", 2048, 64, "instruction",
               items=tuple(JobItem(key, f"spec_{key}", "A cup.") for key in keys),
               quality={"retries": retries, "blocklist": []})


def test_torn_last_line_is_ignored_and_only_settled_items_are_finished(tmp_path):
    ledger = Ledger.of(tmp_path)
    ledger.append({"key": "a", "status": "ok", "attempt": 1, "verdict": "pass"})
    ledger.append({"key": "b", "status": "failed"})
    with ledger.path.open("a") as handle:
        handle.write('{"key": "c", "sta')
    assert ledger.finished_keys(job_of("a", "b", "c")) == {"a"}
    assert [entry["key"] for entry in ledger.entries()] == ["a", "b"]


class TestAttempts:
    """The per-item bookkeeping every runner shares: what is final, which attempt comes next, with which seed."""

    @staticmethod
    def attempt(number: int, verdict: str) -> dict:
        return {"key": "k", "status": "ok", "attempt": number, "verdict": verdict}

    def test_a_pass_settles_the_item_whenever_it_comes(self):
        tried = [self.attempt(1, "flagged"), self.attempt(2, "pass")]
        assert jobformat.final_attempt(tried, 3) == tried[1]
        assert jobformat.next_attempt(tried, 3) is None

    def test_flagged_answers_are_asked_again_until_every_attempt_is_used(self):
        tried = [self.attempt(1, "flagged"), self.attempt(2, "flagged")]
        assert jobformat.final_attempt(tried, 3) is None
        assert jobformat.next_attempt(tried, 3) == 3
        tried.append(self.attempt(3, "flagged"))
        assert jobformat.final_attempt(tried, 3) == tried[2]
        assert jobformat.next_attempt(tried, 3) is None

    def test_engine_errors_are_not_attempts(self):
        entries = [{"key": "k", "status": "failed", "reason": "refused"}, self.attempt(1, "flagged")]
        assert jobformat.answered_attempts(entries) == {"k": [entries[1]]}

    def test_the_first_attempt_keeps_the_jobs_seed_and_each_re_ask_gets_a_new_one(self):
        assert [jobformat.attempt_seed(None, n) for n in (1, 2, 3)] == [None, 1, 2]
        assert [jobformat.attempt_seed(7, n) for n in (1, 2, 3)] == [7, 8, 9]
        assert [jobformat.request_id("k", n) for n in (1, 2)] == ["k", "k.2"]

    def test_an_item_asked_again_by_retry_flagged_gets_its_own_attempt_budget(self):
        job = Job("j", "llama_cpp", "m", 2048, 64, items=(JobItem("k", "s", "t", max_attempts=6),),
                  quality={"retries": 2})
        assert job.max_attempts(job.items[0]) == 6

    def test_a_line_written_before_answers_were_judged_is_judged_on_read(self, tmp_path):
        ledger = Ledger.of(tmp_path)
        ledger.append({"key": "a", "status": "ok", "text": "Here is the prompt: A cup."})
        [entry] = ledger.attempts(job_of("a"))["a"]
        assert (entry["verdict"], entry["text"], entry["attempt"]) == ("flagged", "A cup.", 1)
        assert "too_short" in entry["failed_checks"]


def test_a_held_job_lock_is_seen_by_others(tmp_path):
    assert not worker_holds(tmp_path)
    with job_lock(tmp_path) as got_it:
        assert got_it
        # flock locks belong to the open file description: a second open in this process is another holder.
        with job_lock(tmp_path) as second:
            assert not second
        assert worker_holds(tmp_path)
    assert not worker_holds(tmp_path)


def test_the_worker_image_copies_every_module_the_worker_imports():
    """The worker imports include modules (and they each other); the image holds only the files its Dockerfile copies
    and .dockerignore lets through."""
    root = Path(jobformat.__file__).parents[2]
    needed, todo = set(), [root / "docker" / "upsampler" / "worker.py"]
    while todo:
        tree = ast.parse(todo.pop().read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("include.cosmos_upsample."):
                name = node.module.rsplit(".", 1)[1] + ".py"
                if name not in needed:
                    needed.add(name)
                    todo.append(root / "include" / "cosmos_upsample" / name)
    needed.add("blocklist.txt")  # quality.DEFAULT_BLOCKLIST
    dockerfile = (root / "docker" / "upsampler" / "Dockerfile").read_text()
    ignore = (root / ".dockerignore").read_text()
    # One stage names the worker's files; both targets (cpu, gpu) copy that stage's folder.
    stages = {block.split("\n", 1)[0].rsplit(" AS ", 1)[-1]: block for block in dockerfile.split("\nFROM ")[1:]}
    assert all("COPY --from=worker /opt/upsampler/ /opt/upsampler/" in stages[target] for target in ("cpu", "gpu"))
    for name in needed:
        assert dockerfile.count(f"include/cosmos_upsample/{name}") == 1, name
        assert f"!include/cosmos_upsample/{name}" in ignore, name


SHARED = [jobformat, prompt_formats, quality]


@pytest.mark.parametrize("module", SHARED)
def test_shared_modules_need_only_the_standard_library(module):
    """...and each other (the image copies them together; answer_schema imports jsonschema only when it checks: the
    test below)."""
    tree = ast.parse(Path(module.__file__).read_text())
    shared = {shared.__name__ for shared in [*SHARED, answer_schema]}
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module not in shared}
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported - set(sys.stdlib_module_names)


def test_the_answer_check_copied_into_the_worker_image_needs_jsonschema_only_when_it_checks():
    """answer_schema.py goes into the worker image beside the job format; jsonschema is imported inside the check
    (vLLM's image has it), so a worker for prose formats runs without it."""
    tree = ast.parse(Path(answer_schema.__file__).read_text())
    top_level = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    top_level |= {node.module.split(".")[0] for node in tree.body
                  if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    assert top_level <= set(sys.stdlib_module_names) | {"__future__", "include"}, top_level
