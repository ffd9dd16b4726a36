"""Runs started by bucket events, in a real deployment: api-server, scheduler, dag-processor and triggerer
(LocalExecutor, SQLite), a bucket on the moto server whose ObjectCreated notifications go to an SQS queue, and the
DAG's AssetWatcher reading that queue. Specs are upsampled by the local model (SmolLM2 through llama.cpp).

The deployment is shared by the tests of this module (starting one takes minutes on 2 cores); each test puts its own
objects and looks only at the runs that appeared since it began."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from include.cosmos_upsample.settings import REPORT_TASK_ID, REPORT_XCOM_KEY
from tests.deploy.airflow_site import TERMINAL, AirflowSite
from tests.deploy.bucket_events import NotifyingBucket, events_env, notifying_bucket
from tests.helpers import make_video
from tests.storage.conftest import moto_server  # noqa: F401  (the session's moto server)

pytestmark = pytest.mark.deploy

CONN_ID = "cosmos_events"
NOT_JSON = "deploy finished, hello from a person <not JSON>"
BURST = 20


def spec(stem: str, video: str = "clip.mp4") -> bytes:
    return json.dumps({"id": stem, "prompt": f"A forklift carries pallet number {stem} across a warehouse.",
                       "input_video_path": video}).encode()


@dataclass
class EventsSite:
    site: AirflowSite
    bucket: NotifyingBucket
    output_dir: Path
    reports: dict[str, dict] = field(default_factory=dict)  # run id -> report, of finished asset-triggered runs

    def event_runs(self) -> dict[str, dict]:
        """Every finished asset-triggered run so far, with its report."""
        for run in self.site.runs("asset_triggered"):
            if run["state"] in TERMINAL and run["dag_run_id"] not in self.reports:
                assert run["state"] == "success", (run, self.site.services.tails())
                location = self.site.xcom(run["dag_run_id"], REPORT_TASK_ID, REPORT_XCOM_KEY)
                self.reports[run["dag_run_id"]] = json.loads(Path(location["report_json"]).read_text())
        return dict(self.reports)

    def wait_for(self, objects: set[str], since: set[str], timeout: float) -> dict[str, dict]:
        """The runs since `since` once every one of `objects` is an item of one of them, and nothing is pending: the
        queue read, no run queued or running."""
        def covered() -> dict[str, dict] | None:
            new = {run_id: report for run_id, report in self.event_runs().items() if run_id not in since}
            seen = {item["source_path"] for report in new.values() for item in report["items"]}
            return new if objects <= {clean(path) for path in seen} and self.idle() else None

        return self.site.wait(covered, timeout, f"runs upsampling {sorted(objects)[:3]}... ({len(objects)})", 2)

    def idle(self) -> bool:
        return self.bucket.queued() == 0 and all(run["state"] in TERMINAL for run in self.site.runs())


def clean(source_path: str) -> str:
    """`s3://conn@bucket/key` (as reports record object paths) -> `s3://bucket/key`."""
    scheme, rest = source_path.split("://", 1)
    return f"{scheme}://{rest.split('@', 1)[-1]}"


def items_by_url(reports: dict[str, dict]) -> dict[str, list[tuple[str, dict]]]:
    found: dict[str, list[tuple[str, dict]]] = {}
    for run_id, report in reports.items():
        for item in report["items"]:
            found.setdefault(clean(item["source_path"]), []).append((run_id, item))
    return found


@pytest.fixture(scope="module")
def events(moto_server, tmp_path_factory, migrated_db) -> Iterator[EventsSite]:  # noqa: F811
    root = tmp_path_factory.mktemp("bucket-events")
    clip = make_video(root / "clip.mp4", 320, 180).read_bytes()
    # The video and a spec put before the notification existed: no event; the @daily run finds the spec.
    bucket = notifying_bucket(moto_server.endpoint, "cosmos-events", before={"clip.mp4": clip,
                                                                             "before.json": spec("before")})
    bucket.send_raw(NOT_JSON)  # beside S3's s3:TestEvent, already in the queue
    home, output_dir = root / "airflow", root / "outputs"
    site = AirflowSite(home=home, executor="LocalExecutor", sql_alchemy_conn=f"sqlite:///{home}/airflow.db",
                       extra_env={
                           **events_env(bucket, CONN_ID),
                           # The deployment's defaults: the @daily run scans the watched prefix, outputs stay local.
                           "COSMOS_UPSAMPLE_INPUT_DIR": bucket.url,
                           "COSMOS_UPSAMPLE_OUTPUT_DIR": str(output_dir),
                           "COSMOS_UPSAMPLE_MAX_OUTPUT_TOKENS": "32",
                           # The watcher is registered when the unpaused DAG is parsed again: parse often.
                           "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "5",
                       })
    try:
        site.prepare({}, migrated_db)
        site.start_core(triggerer=True)
        site.unpause()
        bed = EventsSite(site, bucket, output_dir)
        # The @daily run (catchup off: one), and the runs of the queue's first two messages, neither a spec.
        [scheduled] = site.wait(lambda: site.runs("scheduled"), 180, "the scheduler to create the @daily run")
        site.wait_run(scheduled["dag_run_id"], 600)
        site.wait(lambda: bed.idle() and bed.event_runs(), 600, "the watcher to read the first messages", 2)
        yield bed
    finally:
        site.stop()


def test_the_daily_run_scans_the_prefix_and_the_first_messages_start_no_work(events):
    [scheduled] = events.site.runs("scheduled")
    location = events.site.xcom(scheduled["dag_run_id"], REPORT_TASK_ID, REPORT_XCOM_KEY)
    report = json.loads(Path(location["report_json"]).read_text())
    assert report["trigger"] == {"kind": "schedule", "run_type": "scheduled", "prefix": None, "objects": [],
                                 "ignored": []}
    assert [(Path(item["source_path"]).name, item["status"]) for item in report["items"]] == [
        ("before.json", "upsampled")]
    # S3's s3:TestEvent and a message that is not JSON: runs that say so and upsample nothing; the watcher lives on
    # (the next tests' puts start runs).
    reports = events.event_runs().values()
    ignored = [line for report in reports for line in report["trigger"]["ignored"]]
    assert any("s3:TestEvent" in line for line in ignored) and any("not JSON" in line for line in ignored), ignored
    assert all(report["items"] == [] and report["trigger"]["objects"] == [] for report in reports), reports


def test_one_put_starts_one_run_that_upsamples_that_spec_only(events):
    since = set(events.event_runs())
    events.bucket.put("arm.json", spec("arm"))
    new = events.wait_for({events.bucket.object_url("arm.json")}, since, 600)
    [(run_id, report)] = new.items()
    assert report["trigger"]["kind"] == "asset_event" and report["trigger"]["prefix"] == events.bucket.url
    assert report["trigger"]["objects"] == [events.bucket.object_url("arm.json")]
    [item] = report["items"]  # not before.json, which is in the prefix too
    assert item["status"] == "upsampled", item
    output = json.loads(Path(item["output_path"]).read_text())
    assert output["is_upsampled"] and output["parent_prompt_text"] == json.loads(spec("arm"))["prompt"]
    assert output["metadata"]["upsampling"]["run_id"] == run_id
    # The same bytes announced again: the output is up to date.
    since = set(events.event_runs())
    events.bucket.put("arm.json", spec("arm"))
    [again] = events.wait_for({events.bucket.object_url("arm.json")}, since, 600).values()
    assert [item["status"] for item in again["items"]] == ["cached"]


def test_a_burst_is_planned_exactly_once_whatever_the_runs(events):
    """20 puts while runs come and go: every spec in exactly one run, none lost, none twice. A dry run (the Variable
    set as an operator would), so that a spec taken twice would show twice (a real run would make it `cached`)."""
    response = events.site.request("POST", "/variables", json={"key": "cosmos_upsample_dry_run", "value": "true"})
    assert response.status_code in (200, 201), response.text
    try:
        since = set(events.event_runs())
        names = [f"burst-{index:02d}.json" for index in range(BURST)]
        for index, name in enumerate(names):
            events.bucket.put(name, spec(name.removesuffix(".json")))
            if index == BURST // 2:
                events.bucket.send_raw(NOT_JSON)  # in the middle of the burst: ignored, nothing lost
        new = events.wait_for({events.bucket.object_url(name) for name in names}, since, 900)
    finally:
        events.site.request("DELETE", "/variables/cosmos_upsample_dry_run")
    found = items_by_url(new)
    for name in names:
        [(_run_id, item)] = found[events.bucket.object_url(name)]  # in exactly one run
        assert item["status"] == "planned", item
    assert set(found) == {events.bucket.object_url(name) for name in names}
    print(f"{BURST} puts -> {len(new)} runs of {sorted(len(r['items']) for r in new.values())} specs")


def test_deleted_before_its_run_and_a_video_still_missing_say_why(events):
    since = set(events.event_runs())
    events.bucket.put("gone.json", spec("gone"))
    events.bucket.delete("gone.json")  # before the run reads it: the run starts seconds after the event
    events.bucket.put("early.json", spec("early", video="late.mp4"))  # its video is not there yet
    urls = {events.bucket.object_url(name) for name in ("gone.json", "early.json")}
    found = items_by_url(events.wait_for(urls, since, 600))
    [(_, gone)] = found[events.bucket.object_url("gone.json")]
    assert gone["status"] == "invalid" and "deleted before this run" in gone["reason"], gone
    [(_, early)] = found[events.bucket.object_url("early.json")]
    assert early["status"] == "invalid" and "'late.mp4' not found under input_dir" in early["reason"], early
    # The video arrives (no event: not a spec), then the spec is announced again: now it is upsampled.
    events.bucket.put("late.mp4", (events.output_dir.parent / "clip.mp4").read_bytes())
    since = set(events.event_runs())
    events.bucket.put("early.json", spec("early", video="late.mp4"))
    [report] = events.wait_for({events.bucket.object_url("early.json")}, since, 600).values()
    assert [item["status"] for item in report["items"]] == ["upsampled"]


def test_the_plugin_says_what_started_each_run(events):
    listed: dict[str, Any] = {row["run_id"]: row for row in events.site.get("/upsample-reports/api/runs")["runs"]}
    kinds = {row["trigger"]["kind"] for row in listed.values() if row.get("trigger")}
    assert {"schedule", "asset_event"} <= kinds, listed
    run_id = next(run_id for run_id, report in events.event_runs().items() if report["trigger"]["objects"])
    page = events.site.request("GET", f"/upsample-reports/runs/{run_id}").text
    assert "Started by" in page and "bucket event" in page
