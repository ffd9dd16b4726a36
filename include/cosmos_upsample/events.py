"""Runs started by bucket events: S3 announces each new PromptSpec, and the run it starts upsamples exactly those.

The bucket sends an `s3:ObjectCreated:*` notification to an SQS queue for every object put under a prefix
(README, "Upsample on arrival (bucket events)"). When the deployment names that queue, the DAG is scheduled on
`@daily` OR an Asset of the prefix, watched by an AssetWatcher whose `MessageQueueTrigger(scheme="sqs")` is the
amazon provider's `SqsSensorTrigger`: the triggerer long-polls the queue, and each batch of messages it receives
(and deletes) becomes one asset event whose extra holds them (`payload.message_batch[*].Body`). No polling loop of
our own.

Parse time: the event source is a deployment setting, read from the DAG processor's environment like the upsample
queue (deployment.py); unset, the schedule is exactly `"@daily"` and nothing of common-messaging is imported.
Run time: `run_start` reads what started a run from its run type and asset events (pure), `claim_messages` gives
each message to one run (a claim file in work_dir), and `announced_specs` picks the announced objects that are specs
of the run (one HEAD each, no listing of the bucket).
"""

from __future__ import annotations

import functools
import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus, urlparse

from include.cosmos_upsample.layout import safe_name
from include.cosmos_upsample.report_model import RunTrigger
from include.cosmos_upsample.settings import ENV_PREFIX

# The SQS queue the bucket's ObjectCreated notifications go to, e.g. https://sqs.eu-west-1.amazonaws.com/123/specs.
EVENTS_QUEUE_URL_ENV = ENV_PREFIX + "EVENTS_QUEUE_URL"
# The Airflow AWS connection the triggerer reads the queue with; unset: aws_default.
EVENTS_AWS_CONN_ID_ENV = ENV_PREFIX + "EVENTS_AWS_CONN_ID"
# The bucket prefix the notifications are about, s3://BUCKET/PREFIX: the watched Asset's URI and the input_dir of
# the runs it starts (a spec's videos resolve there, as in any run).
EVENTS_PREFIX_ENV = ENV_PREFIX + "EVENTS_PREFIX"
DAILY = "@daily"
WATCHER_NAME = "cosmos_upsample_bucket_events"
# SQS's own maxima: 10 messages per receive, long polling for 20 s (a receive returns as soon as a message is there).
# The long poll is the wait between receives, so no further delay (SqsSensorTrigger's default of 60 s would hold an
# event back for up to a minute).
SQS_MAX_MESSAGES, SQS_WAIT_SECONDS, SQS_WAITER_DELAY = 10, 20, 0

# Airflow's DagRunType values -> `trigger.kind` in the report.
RUN_KINDS = {"scheduled": "schedule", "manual": "manual", "asset_triggered": "asset_event", "backfill": "backfill"}
TEST_EVENT = "s3:TestEvent"


@dataclass(frozen=True)
class EventSource:
    queue_url: str
    aws_conn_id: str
    prefix: str  # s3://bucket or s3://bucket/prefix, no trailing '/'


def event_source(environ: Mapping[str, str] | None = None) -> EventSource | None:
    """The deployment's bucket-event source, or None when no queue is configured (a plain @daily DAG)."""
    environ = os.environ if environ is None else environ
    queue_url = environ.get(EVENTS_QUEUE_URL_ENV, "").strip()
    if not queue_url:
        return None
    prefix = environ.get(EVENTS_PREFIX_ENV, "").strip()
    parsed = urlparse(prefix)
    if parsed.scheme != "s3" or not parsed.netloc or "@" in parsed.netloc or parsed.query or parsed.fragment:
        raise ValueError(
            f"{EVENTS_QUEUE_URL_ENV} is set, so {EVENTS_PREFIX_ENV} must name the bucket prefix its notifications "
            f"are about, as s3://BUCKET/PREFIX (got {prefix!r})")
    return EventSource(queue_url=queue_url, aws_conn_id=environ.get(EVENTS_AWS_CONN_ID_ENV, "").strip()
                       or "aws_default", prefix=f"s3://{parsed.netloc}{parsed.path.rstrip('/')}")


def dag_schedule(environ: Mapping[str, str] | None = None) -> Any:
    """`"@daily"`, or with an event source `@daily` OR the watched prefix (Airflow's AssetOrTimeSchedule)."""
    source = event_source(environ)
    if source is None:
        return DAILY
    from airflow import settings
    from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable

    # The timetable Airflow itself makes of schedule="@daily" for this DAG (a naive start_date: the default zone).
    daily = CronTriggerTimetable(DAILY, timezone=settings.TIMEZONE)
    return AssetOrTimeSchedule(timetable=daily, assets=watched_asset(source))


def discover_task_options(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The discover task's inlet: the watched asset, whose events it reads (run_start); nothing without events."""
    source = event_source(environ)
    return {"inlets": [watched_asset(source)]} if source else {}


@functools.cache  # one Asset object for the schedule and the inlet: its watcher is defined once
def watched_asset(source: EventSource) -> Any:
    """The prefix as an Asset whose watcher turns each batch of the queue's messages into an asset event."""
    from airflow.providers.common.messaging.triggers.msg_queue import MessageQueueTrigger
    from airflow.sdk import Asset, AssetWatcher

    trigger = MessageQueueTrigger(scheme="sqs", sqs_queue=source.queue_url, aws_conn_id=source.aws_conn_id,
                                  max_messages=SQS_MAX_MESSAGES, wait_time_seconds=SQS_WAIT_SECONDS,
                                  waiter_delay=SQS_WAITER_DELAY)
    return Asset(uri=source.prefix, watchers=[AssetWatcher(name=WATCHER_NAME, trigger=trigger)])


# --- what started a run (pure) -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Announcement:
    """One SQS message: the objects it announces under the watched prefix, and what it holds besides, with why."""

    message_id: str | None
    objects: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunStart:
    """What started a run, as Airflow tells the run; `claim_messages` makes the report's `trigger` of it."""

    kind: str
    run_type: str
    prefix: str | None = None
    announcements: tuple[Announcement, ...] = ()
    ignored: tuple[str, ...] = ()


def run_start(run_type: Any, triggering_asset_events: Mapping[Any, Sequence[Any]] | None = None,
              inlet_events: Mapping[Any, Any] | None = None, run_after: Any = None) -> RunStart:
    """The kind of run, and for a run started by bucket events every message of every event it is given, once.

    Airflow 3.3 gives a run only the events up to the first one that queued it: events that arrive while that one
    waits (the DAG at max_active_runs) go to no run until another event comes (apache/airflow#56050, fixed after
    3.3). So a run also takes the watched asset's events from its own `run_after` on (`inlet_events`, the discover
    task's inlet); `claim_messages` then keeps a later run from taking them again."""
    run_type = str(getattr(run_type, "value", run_type))
    kind = RUN_KINDS.get(run_type, "other")
    if kind != "asset_event":
        return RunStart(kind, run_type)
    events = [event for events in (triggering_asset_events or {}).values() for event in events]
    if inlet_events and run_after is not None:
        events += [event for asset in inlet_events for event in inlet_events[asset].after(run_after.isoformat())]
    prefix, announcements, ignored, seen = None, [], [], set()
    for event in events:
        prefix = _prefix_of(event.asset.uri)
        batch = ((event.extra or {}).get("payload") or {}).get("message_batch")
        if not isinstance(batch, list):
            ignored.append(f"an event of {event.asset.uri} without SQS messages (not from the bucket watcher)")
            continue
        for announcement in (announced_in(message, prefix) for message in batch):
            if announcement.message_id is None or announcement.message_id not in seen:
                announcements.append(announcement)
                seen.add(announcement.message_id)
    return RunStart(kind, run_type, prefix, tuple(announcements), tuple(dict.fromkeys(ignored)))


def announced_in(message: Any, prefix: str) -> Announcement:
    """The objects created under `prefix` that one SQS message announces (as s3:// URLs), and what it holds
    besides, each with why it is ignored."""
    message_id = message.get("MessageId") if isinstance(message, dict) else None
    name = f"message {message_id or '?'}"
    records, why = s3_records(message.get("Body") if isinstance(message, dict) else None)
    if why:
        return Announcement(message_id, ignored=(f"{name}: {why}",))
    found, ignored = [], []
    for record in records:
        url, why = created_object(record)
        if url and not _under(url, prefix):
            why = f"{url}: not under {prefix}"
        if why:
            ignored.append(f"{name}: {why}")
        else:
            found.append(url)
    return Announcement(message_id, tuple(found), tuple(ignored))


def s3_records(body: Any) -> tuple[list[Any], str | None]:
    """The S3 event records of a message body, or why there are none. A body is whatever anyone sent to the queue,
    so nothing here raises. S3 -> SNS -> SQS wraps the S3 event in an SNS notification's `Message`."""
    try:
        data = json.loads(body)
    except (TypeError, ValueError):
        return [], f"not JSON ({str(body)[:60]!r})"
    if not isinstance(data, dict):
        return [], "not an S3 event (JSON, but not an object)"
    if data.get("Type") == "Notification" and isinstance(data.get("Message"), str):
        return s3_records(data["Message"])
    if data.get("Event") == TEST_EVENT:
        return [], f"{TEST_EVENT} (S3 sends one when the bucket notification is configured)"
    records = data.get("Records")
    if not isinstance(records, list) or not records:
        return [], "not an S3 event (no Records)"
    return records, None


def created_object(record: Any) -> tuple[str | None, str | None]:
    """`s3://bucket/key` of an ObjectCreated record (keys are URL-encoded in events, spaces as '+'), or why not."""
    try:
        bucket, key = record["s3"]["bucket"]["name"], unquote_plus(record["s3"]["object"]["key"])
        event_name = str(record.get("eventName", ""))
    except (KeyError, TypeError, AttributeError):
        return None, "a record without s3.bucket.name and s3.object.key"
    url = f"s3://{bucket}/{key}"
    if not event_name.startswith("ObjectCreated:"):
        return None, f"{url}: {event_name or 'no eventName'}, not a new object"
    return url, None


def _prefix_of(uri: str) -> str:
    parsed = urlparse(uri)
    return f"{parsed.scheme}://{parsed.netloc}{parsed.path.rstrip('/')}"


def _under(url: str, prefix: str) -> bool:
    return url.startswith(prefix + "/")


# --- each message to one run (I/O: a claim file in work_dir) -----------------------------------------------------


def claim_messages(start: RunStart, claims_dir: Path, run_id: str) -> RunTrigger:
    """The report's `trigger`: the objects of the messages this run takes, in order, each once. Every message is
    taken by one run only (a claim file per SQS MessageId in the shared work_dir, created whole or not at all,
    holding the run id), so a message two runs are given (run_start) or SQS delivers twice is upsampled once; a
    retried discover of the same run keeps its own. What is not taken is under `ignored`, with why."""
    objects, ignored = [], list(start.ignored)
    for announcement in start.announcements:
        owner = _claim(claims_dir, announcement.message_id, run_id) if announcement.message_id else run_id
        if owner != run_id:
            ignored.append(f"message {announcement.message_id}: taken by run {owner}")
            continue
        objects.extend(url for url in announcement.objects if url not in objects)
        ignored.extend(announcement.ignored)
    return RunTrigger(kind=start.kind, run_type=start.run_type, prefix=start.prefix, objects=objects,
                      ignored=ignored)


def _claim(folder: Path, message_id: str, run_id: str) -> str:
    """The run that holds the message: this one if no run did before. The claim is linked into place with its
    content (atomic, also on NFS), so a reader never sees a claim without its run id."""
    folder.mkdir(parents=True, exist_ok=True)
    claim = folder / safe_name(message_id)
    fd, tmp = tempfile.mkstemp(prefix=".claim-", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(run_id)
        os.link(tmp, claim)
        return run_id
    except FileExistsError:
        return claim.read_text(encoding="utf-8")
    finally:
        os.unlink(tmp)


# --- which announced objects a run upsamples (I/O: one HEAD per object) -----------------------------------------


def announced_specs(objects: Iterable[str], root: Any, pattern: str) -> tuple[list[Any], list[Any], dict[str, str]]:
    """Of the announced objects: the specs (under `root`, matching `pattern` as a listing of `root` would) that
    exist, the specs deleted since, and the objects that are not specs (a video put is not a spec), with why."""
    from fsspec.utils import glob_translate

    from include.cosmos_upsample.storage import clean_url

    matches = re.compile(glob_translate(pattern)).match  # the translation fsspec's own glob (list_specs) uses
    root_url = _prefix_of(clean_url(root))
    root.fs.invalidate_cache()  # a listing cached by this process may predate the put
    specs, gone, not_specs = [], [], {}
    for url in objects:
        relative = url[len(root_url) + 1:] if _under(url, root_url) else ""
        if not relative or not matches(relative):
            not_specs[url] = f"{url}: not a spec (not {pattern!r} under {root_url})"
            continue
        path = root / relative
        (specs if path.exists() else gone).append(path)
    return specs, gone, not_specs
