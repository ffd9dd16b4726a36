"""Report files as the DAG leaves them, for the plugin's tests (keys from DESIGN.md "Report JSON")."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DAG_ID = "cosmos_prompt_upsample"
HOSTILE_PROMPT = "<script>window.__pwned=1</script>"
HOSTILE_NAME = '<img src=x onerror="window.__pwned=2">'


def make_report(run_id: str, output_dir: Path, *, items: int = 24, budget: int = 3796) -> dict[str, Any]:
    """A report with DESIGN.md's keys: every status, hostile strings, one over-budget item, one output outside."""
    rows: list[dict[str, Any]] = []
    for index in range(items):
        status = ("upsampled", "upsampled", "cached", "upsampled", "invalid", "failed")[index % 6]
        spec_id = f"spec-{index:03d}"
        has_output = status in ("upsampled", "cached")
        rows.append(
            {
                "spec_id": spec_id,
                "source_path": f"/data/in/{spec_id}.json",
                "status": status,
                "reason": None,
                "tokens": {"prompt": 500 + 130 * index, "budget": budget},
                "hint": {"width": 320, "height": 180, "frames": 2},
                "output_path": str(output_dir / "specs" / f"{spec_id}.json") if has_output else None,
                "name": f"clip {index}",
                "original_prompt": f"A robot arm picks up cup {index}",
                "upsampled_prompt": f"In a bright lab, a robot arm slowly picks up red cup number {index}."
                if has_output
                else None,
            }
        )
    if len(rows) < 6:
        return _wrap(run_id, output_dir, rows)
    rows[0].update(original_prompt=HOSTILE_PROMPT, name=HOSTILE_NAME, upsampled_prompt=f"{HOSTILE_PROMPT} upsampled")
    rows[4].update(
        reason="prompt needs 4158 tokens at the smallest hint; budget is 3796",
        tokens={"prompt": 4158, "budget": budget},
        hint={"width": None, "height": None, "frames": 0},
    )
    rows[5].update(reason="<b>worker</b> exited 137 (out of memory)")
    # Named by the report but outside its output_dir: the item route must refuse it.
    rows[1]["output_path"] = "/etc/hostname"
    return _wrap(run_id, output_dir, rows)


def _wrap(run_id: str, output_dir: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    # Counts as reports wrote them before `flagged` was in every report: the plugin must keep reading those.
    counts = {"discovered": len(rows), "upsampled": 0, "cached": 0, "invalid": 0, "failed": 0}
    for row in rows:
        counts[row["status"]] += 1
    return {
        "run_id": run_id,
        "dag_id": DAG_ID,
        "started_at": "2026-11-28T10:00:00+00:00",
        "finished_at": "2026-11-28T10:07:30+00:00",
        "params": {"input_dir": "/data/in", "output_dir": str(output_dir), "backend": "llama_cpp", "model": "smollm2"},
        "counts": counts,
        "items": rows,
        "stages": {"discover": 0.8, "validate": 12.4, "batch": 0.2, "upsample": 401.5, "merge": 1.1, "report": 0.3},
        "tokens_equal": {"equal": 11, "compared": 12},
        "resolved": {"prompt_format": "instruction", "frame_sampling": "spread",
                     "sampling": {"temperature": 0.2, "top_p": 0.9, "repetition_penalty": 1.3, "seed": 0},
                     "engine": {"max_num_seqs": 64}},
        "state": "success",
        "model": "smollm2",
        "backend": "llama_cpp",
    }


def write_report(output_dir: Path, report: dict[str, Any], file_stem: str | None = None) -> Path:
    """The files the DAG leaves: reports/<run>.json|.html and specs/<id>.json for upsampled and cached items."""
    for item in report["items"]:
        path = item.get("output_path")
        if path and path.startswith(str(output_dir)):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(json.dumps({"id": item["spec_id"], "prompt": item["upsampled_prompt"]}))
    reports = output_dir / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    stem = file_stem or report["run_id"].replace("/", "_")
    (reports / f"{stem}.html").write_text("<html></html>")
    json_path = reports / f"{stem}.json"
    json_path.write_text(json.dumps(report))
    return json_path


def write_progress(run_dir: Path, output_dir: Path, *, now: float) -> None:
    """Three chunks: two batched into jobs (10 + 6 items) whose ledgers hold 7 finished calls (one failed, one
    retried), one of 4 specs still being validated."""
    jobs = output_dir / "jobs"
    write_job_plans(run_dir, [{"job_key": "job-a", "job_dir": str(jobs / "job-a"), "items": 10, "conn_id": "gpu_a"},
                              {"job_key": "job-b", "job_dir": str(jobs / "job-b"), "items": 6, "conn_id": "gpu_b"}],
                    unbatched=[4])
    entries = {
        "job-a": [("s1", "ok"), ("s2", "failed"), ("s2", "ok"), ("s3", "ok"), ("s4", "failed")],
        "job-b": [("t1", "ok"), ("t2", "ok"), ("t3", "ok")],
    }
    moment = now - 80
    for job, rows in entries.items():
        (jobs / job).mkdir(parents=True, exist_ok=True)
        lines = []
        for spec_id, status in rows:
            moment += 10
            lines.append(json.dumps({"spec_id": spec_id, "status": status, "finished_at": moment}))
        (jobs / job / "ledger.jsonl").write_text("\n".join(lines) + "\n{\"spec_id\": \"half-writ")


def write_job_plans(run_dir: Path, jobs: list[dict], unbatched: list[int] = ()) -> None:
    """The run folder's chunks and the job batch made of each (as stages.batch writes them), plus chunks of
    `unbatched` spec counts whose validation has not ended."""
    for index, job in enumerate([*jobs, *({"entries": count} for count in unbatched)]):
        chunk = run_dir / "chunks" / f"chunk-{index:04d}.json"
        chunk.parent.mkdir(parents=True, exist_ok=True)
        count = job["entries"] if "entries" in job else job["items"]
        chunk.write_text(json.dumps({"conn_id": None, "slot": None, "engine": {}, "job_key": None,
                                     "entries": [{"source_path": f"/in/{index}-{n}.json", "key": None}
                                                 for n in range(count)]}))
        if "entries" not in job:
            plan = run_dir / "plans" / chunk.name
            plan.parent.mkdir(parents=True, exist_ok=True)
            plan.write_text(json.dumps({"job": job, "answered": {}}))


def chromium_paths() -> tuple[str, str] | None:
    """Debian's chromium and chromium-driver; the tests never download a browser."""
    browser = shutil.which("chromium")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None
