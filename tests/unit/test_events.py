"""Bucket events: the deployment's event source, and what a run started by events is asked to upsample."""

from __future__ import annotations

import json
from types import SimpleNamespace
from urllib.parse import quote_plus

import pytest

from include.cosmos_upsample.events import (
    EVENTS_AWS_CONN_ID_ENV,
    EVENTS_PREFIX_ENV,
    EVENTS_QUEUE_URL_ENV,
    EventSource,
    announced_in,
    claim_messages,
    event_source,
    run_start,
)

PREFIX = "s3://specs-bucket/incoming"
QUEUE = "https://sqs.eu-west-1.amazonaws.com/123456789012/cosmos-specs"


def record(key: str, bucket: str = "specs-bucket", event: str = "ObjectCreated:Put") -> dict:
    """One record as S3 writes it: the key URL-encoded (quote_plus; moto also encodes '/')."""
    return {"eventVersion": "2.1", "eventSource": "aws:s3", "eventName": event,
            "s3": {"bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"},
                   "object": {"key": quote_plus(key), "size": 2, "eTag": "99914b932bd37a50b983c5e7c90ae93b"}}}


def message(body: str | dict, message_id: str = "m-1") -> dict:
    """An SQS message as SqsSensorTrigger puts it in the event's message_batch."""
    return {"MessageId": message_id, "ReceiptHandle": "rh", "MD5OfBody": "x",
            "Body": body if isinstance(body, str) else json.dumps(body)}


def asset_events(*batches: list[dict], uri: str = PREFIX) -> dict:
    """triggering_asset_events as the task sees them: asset -> events, each with the watcher's payload."""
    asset = SimpleNamespace(uri=uri, name=uri)
    return {uri: [SimpleNamespace(asset=asset, extra={"from_trigger": True,
                                                         "payload": {"status": "success", "message_batch": batch}})
                    for batch in batches]}


class InletEvents(dict):
    """inlet_events as the task sees them: asset -> an accessor whose `.after(iso)` gives the later events."""

    def __init__(self, *batches: list[dict]) -> None:
        events = next(iter(asset_events(*batches).values()))
        super().__init__({PREFIX: SimpleNamespace(after=lambda moment: self.asked.append(moment) or events)})
        self.asked: list[str] = []


def run_trigger(run_type, triggering=None, inlets=None, claims=None, run_id="asset_triggered__1"):
    """The report's trigger of a run given these events (claims in a fresh folder unless one is given)."""
    import datetime as dt
    import tempfile
    from pathlib import Path

    start = run_start(SimpleNamespace(value=run_type), triggering, inlets, dt.datetime(2026, 12, 1, tzinfo=dt.UTC))
    with tempfile.TemporaryDirectory() as folder:
        return claim_messages(start, claims or Path(folder) / "claims", run_id)


TEST_EVENT = {"Service": "Amazon S3", "Event": "s3:TestEvent", "Time": "2026-12-01T14:55:46.188Z",
              "Bucket": "specs-bucket"}


class TestEventSource:
    def test_unset_means_no_events(self):
        assert event_source({}) is None
        assert event_source({EVENTS_QUEUE_URL_ENV: "  ", EVENTS_PREFIX_ENV: PREFIX}) is None

    def test_set(self):
        source = event_source({EVENTS_QUEUE_URL_ENV: QUEUE, EVENTS_PREFIX_ENV: PREFIX + "/",
                               EVENTS_AWS_CONN_ID_ENV: " events_aws "})
        assert source == EventSource(queue_url=QUEUE, aws_conn_id="events_aws", prefix=PREFIX)
        assert event_source({EVENTS_QUEUE_URL_ENV: QUEUE, EVENTS_PREFIX_ENV: "s3://specs-bucket"}).aws_conn_id == \
            "aws_default"

    @pytest.mark.parametrize("prefix", ["", "specs-bucket/incoming", "gs://specs-bucket/x", "s3:///incoming",
                                        "s3://conn@specs-bucket/incoming"])
    def test_a_queue_without_an_s3_prefix_names_the_variable(self, prefix):
        with pytest.raises(ValueError, match=EVENTS_PREFIX_ENV):
            event_source({EVENTS_QUEUE_URL_ENV: QUEUE, EVENTS_PREFIX_ENV: prefix})


class TestRunTrigger:
    @pytest.mark.parametrize(("run_type", "kind"), [("scheduled", "schedule"), ("manual", "manual"),
                                                    ("backfill", "backfill"), ("asset_materialization", "other")])
    def test_runs_not_started_by_events(self, run_type, kind):
        trigger = run_trigger(run_type)
        assert (trigger.kind, trigger.run_type, trigger.objects) == (kind, run_type, [])

    def test_every_record_of_every_message_of_every_event(self):
        batch_1 = [message({"Records": [record("incoming/a.json"), record("incoming/b.json")]}, "m-1"),
                   message({"Records": [record("incoming/c.json")]}, "m-2")]
        batch_2 = [message({"Records": [record("incoming/d.json")]}, "m-3")]
        trigger = run_trigger("asset_triggered", asset_events(batch_1, batch_2))
        assert trigger.kind == "asset_event" and trigger.prefix == PREFIX
        assert trigger.objects == [f"{PREFIX}/{name}.json" for name in "abcd"]
        assert trigger.ignored == []

    def test_keys_are_url_decoded(self):
        key = "incoming/new specs/robot+arm=1 ü.json"
        trigger = run_trigger("asset_triggered", asset_events([message({"Records": [record(key)]})]))
        assert trigger.objects == [f"s3://specs-bucket/{key}"]

    def test_an_object_announced_twice_is_taken_once(self):
        twice = [message({"Records": [record("incoming/a.json")]}, "m-1"),
                 message({"Records": [record("incoming/a.json")]}, "m-2")]
        assert run_trigger("asset_triggered", asset_events(twice)).objects == [f"{PREFIX}/a.json"]

    def test_test_event_and_bodies_that_are_not_s3_events_are_ignored_with_why(self):
        batch = [message(TEST_EVENT, "m-test"), message("hello, not JSON {", "m-text"), message("[1, 2]", "m-list"),
                 message({"Records": []}, "m-empty"), message({"Records": [record("incoming/a.json")]}, "m-ok")]
        trigger = run_trigger("asset_triggered", asset_events(batch))
        assert trigger.objects == [f"{PREFIX}/a.json"]
        assert [line.split(":", 1)[0] for line in trigger.ignored] == [
            "message m-test", "message m-text", "message m-list", "message m-empty"]
        assert "s3:TestEvent" in trigger.ignored[0] and "not JSON" in trigger.ignored[1]

    def test_records_that_are_not_new_objects_under_the_prefix_are_ignored(self):
        batch = [message({"Records": [record("incoming/gone.json", event="ObjectRemoved:Delete"),
                                      record("elsewhere/a.json"), record("incoming/a.json", bucket="other-bucket"),
                                      record("incomingx/a.json"), {"eventName": "ObjectCreated:Put"},
                                      record("incoming/ok.json", event="ObjectCreated:CompleteMultipartUpload")]})]
        trigger = run_trigger("asset_triggered", asset_events(batch))
        assert trigger.objects == [f"{PREFIX}/ok.json"]
        assert len(trigger.ignored) == 5
        assert "ObjectRemoved:Delete, not a new object" in trigger.ignored[0]
        assert "not under s3://specs-bucket/incoming" in trigger.ignored[1]

    def test_s3_events_through_sns_are_unwrapped(self):
        sns = {"Type": "Notification", "MessageId": "sns-1", "TopicArn": "arn:aws:sns:eu-west-1:1:t",
               "Message": json.dumps({"Records": [record("incoming/a.json")]})}
        assert run_trigger("asset_triggered", asset_events([message(sns)])).objects == [f"{PREFIX}/a.json"]

    def test_an_asset_event_not_from_the_watcher_announces_nothing(self):
        asset = SimpleNamespace(uri=PREFIX, name=PREFIX)
        events = {PREFIX: [SimpleNamespace(asset=asset, extra={})]}  # e.g. posted through the REST API
        trigger = run_trigger("asset_triggered", events)
        assert trigger.objects == [] and "without SQS messages" in trigger.ignored[0]

    def test_malformed_messages_never_raise(self):
        for odd in [None, "text", {"Body": None}, {"Body": 5}, {"Body": json.dumps({"Records": "x"})},
                    {"Body": json.dumps({"Records": [None, 3, {"s3": "x"}]})}]:
            announcement = announced_in(odd, PREFIX)
            assert announcement.objects == () and announcement.ignored, odd


class TestEveryMessageToOneRun:
    """Airflow 3.3 gives no run the events that arrive while the first queued one waits (apache/airflow#56050): a run
    also takes the watched asset's events from its own run_after on, and claims make each message one run's."""

    def test_a_run_also_takes_the_events_after_its_own(self):
        stranded = [message({"Records": [record("incoming/late.json")]}, "m-late")]
        inlets = InletEvents(stranded)
        trigger = run_trigger("asset_triggered", asset_events([message({"Records": [record("incoming/a.json")]})]),
                              inlets)
        assert trigger.objects == [f"{PREFIX}/a.json", f"{PREFIX}/late.json"]
        assert inlets.asked == ["2026-12-01T00:00:00+00:00"]  # from the run's own run_after on

    def test_a_message_given_twice_to_one_run_is_taken_once(self):
        batch = [message({"Records": [record("incoming/a.json")]}, "m-1")]
        trigger = run_trigger("asset_triggered", asset_events(batch), InletEvents(batch))
        assert trigger.objects == [f"{PREFIX}/a.json"] and trigger.ignored == []

    def test_a_message_another_run_took_is_not_taken_again(self, tmp_path):
        batch = [message({"Records": [record("incoming/a.json")]}, "m-1"),
                 message({"Records": [record("incoming/b.json")]}, "m-2")]
        first = run_trigger("asset_triggered", asset_events(batch[:1]), claims=tmp_path, run_id="run-1")
        second = run_trigger("asset_triggered", asset_events(batch), claims=tmp_path, run_id="run-2")
        assert first.objects == [f"{PREFIX}/a.json"] and second.objects == [f"{PREFIX}/b.json"]
        assert second.ignored == ["message m-1: taken by run run-1"]
        # A retried discover of the first run keeps its own message.
        assert run_trigger("asset_triggered", asset_events(batch[:1]), claims=tmp_path, run_id="run-1").objects == \
            [f"{PREFIX}/a.json"]
        assert sorted(path.name for path in tmp_path.iterdir()) == ["m-1", "m-2"]  # no temporary files left

    def test_runs_not_started_by_events_claim_nothing(self, tmp_path):
        run_trigger("scheduled", claims=tmp_path / "claims")
        assert not (tmp_path / "claims").exists()


class TestTheReportSaysWhatStartedTheRun:
    def report(self, trigger):
        from include.cosmos_upsample.report import build_report
        from include.cosmos_upsample.settings import resolve_settings

        return build_report(run_id="asset_triggered__1", dag_id="d", started_at="t0", finished_at="t1",
                            settings=resolve_settings({}), items=[], stages={}, trigger=trigger)

    def test_json_and_page(self):
        from include.cosmos_upsample.report import render_html

        hostile = f"{PREFIX}/<script>x</script>.json"
        trigger = run_trigger("asset_triggered",
                              asset_events([message({"Records": [record("incoming/<script>x</script>.json")]})]))
        report = self.report(trigger)
        assert report.to_json()["trigger"] == {"kind": "asset_event", "run_type": "asset_triggered",
                                               "prefix": PREFIX, "objects": [hostile], "ignored": []}
        page = render_html(report)
        assert f"Started by bucket event: 1 spec announced under {PREFIX}" in page
        assert "<script>x" not in page and "&lt;script&gt;x" in page

    @pytest.mark.parametrize(("run_type", "label"), [
        ("scheduled", "the @daily schedule"), ("manual", "manual trigger"),
        ("asset_materialization", "Airflow run type asset_materialization")])
    def test_labels(self, run_type, label):
        from include.cosmos_upsample.report import render_html

        assert run_trigger(run_type).label == label
        assert f"Started by {label}." in render_html(self.report(run_trigger(run_type)))
