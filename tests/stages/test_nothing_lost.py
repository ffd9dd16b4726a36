"""Nothing lost, nothing unexplained (issue 19), with the stages called in process as the DAG's tasks call them:
real ffmpeg, the real tokenizer, the real local model (SmolLM2 through llama.cpp), real SSH refusals; no scheduler.

Every discovered file is one report item (twins without an id, the same name in two folders, one id twice); an
input already upsampled keeps its lineage; an edit made during a run never pairs a new prompt with an old answer;
a batch that failed, an upsample task that was killed or never reached its job leave their cause in each item's
reason; a GPU host that does not answer keeps its job's items out of new jobs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from include.cosmos_upsample import stages
from include.cosmos_upsample.items import load_items
from include.cosmos_upsample.jobformat import Job, JobItem, Ledger
from include.cosmos_upsample.layout import RunFolder, read_json, write_json_atomic
from include.cosmos_upsample.live_jobs import HOST_MARKER_NAME
from include.cosmos_upsample.report_model import RunReport
from include.cosmos_upsample.settings import DAG_ID
from include.cosmos_upsample.shared_storage import MARKER_NAME, SharedStorageError
from tests.conftest import ROOT
from tests.helpers import write_spec
from tests.reliability.invariants import tree_digest
from tests.stages.test_stages_in_process import PARAMS, run_stages

TOLERANT = {"max_failure_ratio": 1.0}


def params(input_dir: Path, output_dir: Path, **extra) -> dict:
    return {"input_dir": str(input_dir), "output_dir": str(output_dir), **PARAMS, **TOLERANT, **extra}


def report_of(run_dir: Path, run_id: str) -> RunReport:
    location = stages.report(str(run_dir), run_id, DAG_ID, "2026-01-01T00:00:00+00:00")
    return RunReport.from_text(Path(location["report_json"]).read_text())


def ok_answers(output_dir: Path) -> Counter:
    return Counter(entry["spec_id"] for ledger in (output_dir / "jobs").glob("*/ledger.jsonl")
                   for entry in Ledger(ledger).entries() if entry["status"] == "ok")


@pytest.fixture
def clip_folder(tmp_path, sample_video) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "clip.mp4").write_bytes(sample_video.read_bytes())
    return folder


def test_every_discovered_file_is_one_report_item(clip_folder, tmp_path):
    """Twins (same bytes, no id: named by their files) were one content key, so one item: 'discovered: 2' for 3."""
    twin = json.dumps({"prompt": "A robot arm picks up a red cup.", "input_video_path": "clip.mp4"})
    for name in ("twin_a.json", "twin_b.json", "alone.json"):
        (clip_folder / name).write_text(twin)
    for sub in ("day1", "day2"):  # the same file name (and so the same id) in two sub-folders
        (clip_folder / sub).mkdir()
        (clip_folder / sub / "shot.json").write_text(json.dumps({"prompt": f"A cup, {sub}.",
                                                                 "input_video_path": "clip.mp4"}))
    write_spec(clip_folder, "same_a", id="same", input_video_path="clip.mp4")  # one id, two contents
    write_spec(clip_folder, "same_b", id="same", input_video_path="clip.mp4", prompt="Another cup.")
    out = tmp_path / "out"
    # A dry run plans every item as a real one does (the twins were lost in planning); no model needed.
    run_dir, chunks = stages.discover(params(clip_folder, out, spec_pattern="**/*.json", dry_run=True),
                                      "manual__twins", lambda _key: None, {})
    for index, chunk in enumerate(chunks):
        stages.upsample(run_dir, stages.batch(run_dir, chunk, stages.validate_chunk(run_dir, chunk)), index, {})
    stages.merge(str(run_dir), "manual__twins")
    report = report_of(run_dir, "manual__twins")

    files = sorted(str(path) for path in clip_folder.rglob("*.json"))
    assert sorted(item.source_path for item in report.items) == files and report.counts.discovered == len(files)
    by_file = {str(Path(item.source_path).relative_to(clip_folder)): item for item in report.items}
    for name in ("twin_a.json", "twin_b.json", "alone.json"):
        assert by_file[name].status == "planned" and by_file[name].spec_id == name[:-5], by_file[name]
    # Ids are output file names: of two files with one id, the second is refused, saying which holds it.
    assert {by_file["day1/shot.json"].status, by_file["day2/shot.json"].status} == {"planned", "invalid"}
    assert by_file["same_b.json"].status == "invalid" and "duplicate id 'same'" in by_file["same_b.json"].reason
    assert report.counts.planned == 5 and report.counts.invalid == 2


def test_an_upsampled_input_is_not_sent_again_and_force_keeps_its_original_prompt(clip_folder, tmp_path):
    earlier = {"prompt": "A long, precise description of a robot arm lifting a red cup from a wooden table.",
               "is_upsampled": True, "parent_prompt_text": "A robot arm picks up a red cup.",
               "input_video_path": "clip.mp4", "id": "earlier"}
    (clip_folder / "earlier.json").write_text(json.dumps(earlier))
    write_spec(clip_folder, "fresh", input_video_path="clip.mp4")
    out = tmp_path / "out"
    before = tree_digest(clip_folder)

    report = run_stages(clip_folder, out, "manual__default")
    items = {item.spec_id: item for item in report.items}
    assert items["fresh"].status == "upsampled"
    assert items["earlier"].status == "invalid"
    assert items["earlier"].reason.startswith("earlier.json: already upsampled") and "force" in items["earlier"].reason
    assert not (out / "specs" / "earlier.json").exists() and "earlier" not in ok_answers(out)

    run_dir, chunks = stages.discover(params(clip_folder, out, force=True), "manual__forced", lambda _key: None, {})
    for index, chunk in enumerate(chunks):
        stages.upsample(run_dir, stages.batch(run_dir, chunk, stages.validate_chunk(run_dir, chunk)), index, {})
    stages.merge(str(run_dir), "manual__forced")
    forced = {item.spec_id: item for item in report_of(run_dir, "manual__forced").items}
    assert forced["earlier"].status == "upsampled"
    output = json.loads((out / "specs" / "earlier.json").read_text())
    # The user's own short prompt survives a second upsampling: the lineage is kept.
    assert output["parent_prompt_text"] == earlier["parent_prompt_text"] and output["is_upsampled"] is True
    assert tree_digest(clip_folder) == before


def test_an_edit_during_the_run_is_not_paired_with_the_old_answer(clip_folder, tmp_path):
    spec_file = write_spec(clip_folder, "cup", input_video_path="clip.mp4", name="original")
    asked = json.loads(spec_file.read_text())
    out = tmp_path / "out"
    run_dir, chunks = stages.discover(params(clip_folder, out), "manual__edit", lambda _key: None, {})
    edited = {**asked, "prompt": "A dog runs across a beach.", "name": "edited"}
    spec_file.write_text(json.dumps(edited))  # edited after discover read it ...
    job = stages.batch(run_dir, chunks[0], stages.validate_chunk(run_dir, chunks[0]))
    assert Job.read(job.job_dir).items[0].text.endswith(asked["prompt"])  # the model is asked the read one
    stages.upsample(run_dir, job, 0, {})
    spec_file.write_text(json.dumps({**edited, "prompt": "A cat sleeps."}))  # ... and again before merge
    stages.merge(str(run_dir), "manual__edit")
    (item,) = report_of(run_dir, "manual__edit").items
    output = json.loads((out / "specs" / "cup.json").read_text())
    # The answer is stored with the prompt it answers, never beside the file's newer text.
    assert item.status == "upsampled" and output["parent_prompt_text"] == asked["prompt"]
    assert output["name"] == asked["name"] and item.original_prompt == asked["prompt"]

    # The next run sees new bytes, so a new content key: the edited prompt is upsampled, not served from the cache.
    again = run_stages(clip_folder, out, "manual__after_edit")
    assert [item.status for item in again.items] == ["upsampled"]
    assert json.loads((out / "specs" / "cup.json").read_text())["parent_prompt_text"] == "A cat sleeps."


def prepared(folder: Path, out: Path, run_id: str, count: int = 2) -> tuple[Path, list[str]]:
    for index in range(count):
        write_spec(folder, f"spec_{index}", input_video_path="clip.mp4")
    return stages.discover(params(folder, out), run_id, lambda _key: None, {})


def failed_reasons(run_dir: Path, run_id: str) -> set[str]:
    stages.merge(str(run_dir), run_id)
    report = report_of(run_dir, run_id)
    assert {item.status for item in report.items} == {"failed"}, report.items
    return {item.reason for item in report.items}


def test_a_batch_that_failed_says_why_in_each_item(clip_folder, tmp_path):
    out = tmp_path / "out"
    run_dir, chunks = prepared(clip_folder, out, "manual__batch")
    validated = stages.validate_chunk(run_dir, chunks[0])
    (out / "jobs").write_text("in the way")  # no job folder can be made: a real OSError inside batch
    with pytest.raises(OSError):
        stages.batch(run_dir, chunks[0], validated)
    (reason,) = {reason.split(": ", 1)[1] for reason in failed_reasons(run_dir, "manual__batch")}
    assert reason.startswith("its batch (chunk-0000) did not finish") and "Not a directory" in reason, reason


def worker_of(job_dir: Path) -> bool:
    """Is a worker process running this job?"""
    wanted = f"--job-dir\0{job_dir}\0".encode()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and wanted in (entry / "cmdline").read_bytes():
                return True
        except OSError:
            continue
    return False


def test_a_killed_upsample_task_says_so_in_each_item(clip_folder, tmp_path):
    out = tmp_path / "out"
    run_dir, chunks = prepared(clip_folder, out, "manual__killed")
    job = stages.batch(run_dir, chunks[0], stages.validate_chunk(run_dir, chunks[0]))
    # The upsample task in a process of its own, SIGKILLed with its worker as soon as the worker runs: a kill gives
    # it no chance to say anything.
    task = subprocess.Popen(
        [sys.executable, "-c", "import sys; from include.cosmos_upsample import stages; "
                               "from include.cosmos_upsample.batching import PlannedJob; "
                               "stages.upsample(sys.argv[1], PlannedJob.model_validate_json(sys.argv[2]), 0, {})",
         str(run_dir), job.model_dump_json()],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    deadline = time.monotonic() + 120
    while not worker_of(job.job_dir):
        assert task.poll() is None and time.monotonic() < deadline, "the upsample task never started its worker"
        time.sleep(0.01)
    os.killpg(task.pid, signal.SIGKILL)
    task.wait(30)
    (reason,) = failed_reasons(run_dir, "manual__killed")
    assert reason.startswith(f"job {job.job_key} did not finish (started ") and "was killed" in reason, reason


def test_an_upsample_task_that_never_reached_its_job_says_where_to_look(clip_folder, tmp_path):
    out = tmp_path / "out"
    run_dir, chunks = prepared(clip_folder, out, "manual__unshared")
    job = stages.batch(run_dir, chunks[0], stages.validate_chunk(run_dir, chunks[0]))
    marker = run_dir / MARKER_NAME
    saved = marker.read_bytes()
    marker.unlink()  # as a worker that does not mount work_dir sees the run folder
    with pytest.raises(SharedStorageError):
        stages.upsample(run_dir, job, 0, {})
    marker.write_bytes(saved)
    (reason,) = failed_reasons(run_dir, "manual__unshared")
    assert "never reached the job" in reason and "Shared storage" in reason, reason


def test_items_of_a_job_on_a_host_that_does_not_answer_are_held_back(clip_folder, tmp_path, monkeypatch):
    """Their job's container may still be answering them: planned into a new job, they would be paid twice."""
    import socket

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # nothing listens once it is closed
    monkeypatch.setenv("AIRFLOW_CONN_GPU_SILENT", json.dumps({
        "conn_type": "ssh", "host": "127.0.0.1", "port": port, "login": "cosmos",
        "extra": {"host_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl",
                  "gpus": [0, 1]}}))
    out = tmp_path / "out"
    conf = params(clip_folder, out, runner="docker", gpu_conn_ids=["gpu_silent"])
    for index in range(4):
        write_spec(clip_folder, f"spec_{index}", input_video_path="clip.mp4")
    # An earlier run gave spec_0..2 to a job on gpu_silent; the host copied back spec_0's answer before it went quiet.
    run_dir, chunks = stages.discover(conf, "manual__planned", lambda _key: None, {})
    entries = {entry["spec"]["id"]: entry for chunk in chunks for entry in read_json(Path(chunk))["entries"]}
    job_dir = out / "jobs" / "earlier-job"
    job_dir.mkdir(parents=True)
    given = [entries[f"spec_{index}"]["key"] for index in range(3)]
    write_json_atomic(job_dir / "manifest.json", Job("earlier-job", "llama_cpp", "m", 4096, 16, items=tuple(
        JobItem(key, f"spec_{n}", "t") for n, key in enumerate(given))).to_manifest())
    write_json_atomic(job_dir / HOST_MARKER_NAME, {"conn_id": "gpu_silent", "container": "c"})
    Ledger.of(job_dir).append({"key": given[0], "spec_id": "spec_0", "status": "ok", "text": "An answer."})
    for key in given:
        (out / "jobs" / "by-item").mkdir(exist_ok=True)
        (out / "jobs" / "by-item" / key).write_text("earlier-job")

    run_dir, chunks = stages.discover(conf, "manual__silent", lambda _key: None, {})
    planned = {entry["spec"]["id"] for chunk in chunks for entry in read_json(Path(chunk))["entries"]}
    held = {item.spec_id: item for item in load_items(RunFolder.at(run_dir).discovered)}
    # spec_0's answer is here already (merged as usual); spec_1, spec_2 wait for their host; spec_3 is planned.
    assert planned == {"spec_0", "spec_3"} and set(held) == {"spec_1", "spec_2"}
    for spec_id, item in held.items():
        assert item.status == "failed" and item.reason.startswith(f"{spec_id}.json: held back")
        assert "held back: its job earlier-job ran on GPU host gpu_silent, which did not answer" in item.reason
        assert str(job_dir / HOST_MARKER_NAME) in item.reason
