"""What every deployment test checks about one finished run of the real DAG, through the REST API and the files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from include.cosmos_upsample.settings import DAG_ID, REPORT_TASK_ID, REPORT_XCOM_KEY
from include.cosmos_upsample.shared_storage import MARKER_NAME
from tests.deploy.airflow_site import AirflowSite


def check_finished_run(site: AirflowSite, run_id: str, input_dir: Path, output_dir: Path,
                       params: dict[str, Any]) -> dict[str, Any]:
    """The report (through the report_location XCom), the outputs, the mapped labels and the plugin's run list."""
    location = site.xcom(run_id, REPORT_TASK_ID, REPORT_XCOM_KEY)
    report_json = Path(location["report_json"])
    assert report_json.parent == output_dir / "reports", location
    report = json.loads(report_json.read_text())
    assert (report["run_id"], report["dag_id"]) == (run_id, DAG_ID)
    assert report["counts"] == location["counts"]
    assert report["counts"] == {"discovered": 3, "upsampled": 3, "cached": 0, "invalid": 0, "failed": 0,
                                "flagged": 0}
    for name, value in params.items():
        assert report["params"][name] == value, (name, report["params"][name], value)

    sources = sorted(input_dir.glob("*.json"))
    assert sorted(item["source_path"] for item in report["items"]) == [str(path) for path in sources]
    for item in report["items"]:
        original = json.loads(Path(item["source_path"]).read_text())
        output = json.loads(Path(item["output_path"]).read_text())
        assert Path(item["output_path"]).parent == output_dir / "specs"
        assert output["is_upsampled"] is True and output["parent_prompt_text"] == original["prompt"]
        assert output["prompt"] and output["prompt"] != original["prompt"]
        assert output["metadata"]["upsampling"]["run_id"] == run_id

    # The shared-storage marker of discover, seen by every later task (they would have failed without it).
    marker = json.loads((output_dir / "runs" / report_json.stem / MARKER_NAME).read_text())
    assert marker["host"] and marker["pid"] > 0

    # map_index_template: each mapped instance is labelled in the UI by its chunk or job.
    for task_id in ("validate", "batch"):
        chunks = site.get(f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/listMapped")["task_instances"]
        assert [ti["rendered_map_index"] for ti in chunks] == ["chunk-0000.json"], task_id
    upsample = site.get(f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/upsample/listMapped")["task_instances"]
    [label] = [ti["rendered_map_index"] for ti in upsample]
    assert label.startswith("job ") and label.endswith("(3 prompts) on local"), label

    # The UI plugin lists the run, with its counts, to a signed-in user (and to no one else).
    listed = {row["run_id"]: row for row in site.get("/upsample-reports/api/runs")["runs"]}
    assert run_id in listed, sorted(listed)
    assert site.get(f"/upsample-reports/api/runs/{run_id}")["counts"] == report["counts"]
    assert httpx_status(site, "/upsample-reports/api/runs") in (401, 403)
    return report


def httpx_status(site: AirflowSite, path: str) -> int:
    import httpx

    return httpx.get(f"{site.url}{path}", timeout=30).status_code


def deployment_env(tmp_path: Path) -> dict[str, str]:
    """Deployment defaults from the environment of every component (tasks inherit it)."""
    return {
        # Loses to the Variable below: were it used, discover would fail on a missing folder.
        "COSMOS_UPSAMPLE_INPUT_DIR": str(tmp_path / "not-the-input"),
        # Neither the form nor a Variable sets it: the environment applies (built-in default: 0.05).
        "COSMOS_UPSAMPLE_MAX_FAILURE_RATIO": "0.5",
        # Short answers keep each run short on 2 shared cores; the pipeline is the same.
        "COSMOS_UPSAMPLE_MAX_OUTPUT_TOKENS": "64",
    }


def deployment_variables(input_dir: Path, tmp_path: Path) -> dict[str, str]:
    return {
        "cosmos_upsample_input_dir": str(input_dir),
        # Loses to the form's typed value in the manual run; the scheduled run (no conf) writes here.
        "cosmos_upsample_output_dir": str(tmp_path / "scheduled-outputs"),
    }


def expected_params(input_dir: Path, tmp_path: Path) -> dict[str, Any]:
    """Form beats Variable beats environment beats built-in default, each level shown by one Param."""
    return {"input_dir": str(input_dir), "output_dir": str(tmp_path / "outputs"), "max_failure_ratio": 0.5}


def check_scheduled_run(site: AirflowSite, input_dir: Path, tmp_path: Path, timeout: float) -> dict[str, Any]:
    """After unpausing, the scheduler creates the @daily run by itself (catchup off: the latest interval only), and
    it runs to success on the deployment defaults alone: Variables and environment, no conf."""
    [scheduled] = site.wait(lambda: site.runs("scheduled"), 120, "the scheduler to create the @daily run")
    finished = site.wait_run(scheduled["dag_run_id"], timeout)
    assert finished["state"] == "success", (finished, site.services.tails())
    assert len(site.runs("scheduled")) == 1  # catchup=False: no backfill of the days since start_date
    location = site.xcom(scheduled["dag_run_id"], REPORT_TASK_ID, REPORT_XCOM_KEY)
    assert Path(location["report_json"]).parent == tmp_path / "scheduled-outputs" / "reports"
    assert location["counts"]["discovered"] == 3 and location["counts"]["failed"] == 0
    report = json.loads(Path(location["report_json"]).read_text())
    assert report["params"]["input_dir"] == str(input_dir) and report["params"]["max_failure_ratio"] == 0.5
    return finished
