"""The DAG's schedule as the dag-processor parses it: exactly `@daily` without an event source; `@daily` OR the bucket
prefix's asset, watched through the SQS queue, with one (events.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from include.cosmos_upsample.events import (
    EVENTS_AWS_CONN_ID_ENV,
    EVENTS_PREFIX_ENV,
    EVENTS_QUEUE_URL_ENV,
    SQS_MAX_MESSAGES,
    SQS_WAIT_SECONDS,
    WATCHER_NAME,
)
from tests.conftest import ROOT

QUEUE = "https://sqs.eu-west-1.amazonaws.com/123456789012/cosmos-specs"
# What a fresh interpreter sees when it parses the DAG file: the serialized timetable and dependencies (what the
# scheduler works from), those of a plain schedule="@daily" DAG with the same start_date, and the modules imported.
PARSE = """
import datetime as dt, json, sys
from airflow.dag_processing.dagbag import DagBag
from airflow.sdk import DAG
from airflow.serialization.serialized_objects import DagSerialization
bag = DagBag(dag_folder='dags')
out = {'errors': {k: str(v)[-600:] for k, v in bag.import_errors.items()}, 'modules': sorted(sys.modules)}
if not out['errors']:
    dag = DagSerialization.to_dict(bag.dags['cosmos_prompt_upsample'])['dag']
    ref = DagSerialization.to_dict(DAG('ref', schedule='@daily', start_date=dt.datetime(2026, 1, 1)))['dag']
    discover = bag.dags['cosmos_prompt_upsample'].get_task('discover')
    out.update(schedule=repr(bag.dags['cosmos_prompt_upsample'].schedule), timetable=dag['timetable'],
               reference=ref['timetable'], dependencies=dag.get('dag_dependencies', []),
               inlets=[[inlet.uri, len(inlet.watchers)] for inlet in discover.inlets])
print(json.dumps(out))
"""
TRIGGER_MODULES = {"airflow.providers.common.messaging.triggers.msg_queue", "airflow.providers.amazon.aws.triggers.sqs"}
ENV_EVENTS = "COSMOS_UPSAMPLE_EVENTS_"


def parsed(airflow_home: dict[str, str], **events: str) -> dict:
    env = {key: value for key, value in airflow_home.items() if not key.startswith(ENV_EVENTS)}
    out = subprocess.run([sys.executable, "-c", PARSE], env={**env, **events}, cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_without_an_event_source_the_schedule_is_exactly_daily(airflow_home):
    dag = parsed(airflow_home)
    assert dag["errors"] == {}
    assert dag["schedule"] == "'@daily'" and dag["timetable"] == dag["reference"]
    assert dag["timetable"]["__type"] == "airflow.timetables.trigger.CronTriggerTimetable"
    # Nothing schedules the DAG but time; its only asset is the report's outlet.
    assert all(dep["dependency_type"] != "asset" or dep["source"] == "cosmos_prompt_upsample"
               for dep in dag["dependencies"]), dag["dependencies"]
    assert dag["inlets"] == []
    # ... and the messaging trigger is not even imported (the provider need not be installed).
    assert not TRIGGER_MODULES & set(dag["modules"])


def test_with_an_event_source_daily_or_the_watched_prefix(airflow_home):
    dag = parsed(airflow_home, **{EVENTS_QUEUE_URL_ENV: QUEUE, EVENTS_PREFIX_ENV: "s3://specs-bucket/incoming/",
                                  EVENTS_AWS_CONN_ID_ENV: "events_aws"})
    assert dag["errors"] == {}
    timetable = dag["timetable"]
    assert timetable["__type"] == "airflow.timetables.assets.AssetOrTimeSchedule"
    assert timetable["__var"]["timetable"] == dag["reference"]  # the same @daily as without events
    asset = timetable["__var"]["asset_condition"]
    assert (asset["__type"], asset["uri"]) == ("asset", "s3://specs-bucket/incoming")
    [watcher] = asset["watchers"]
    assert watcher["name"] == WATCHER_NAME
    # MessageQueueTrigger(scheme="sqs") is stored as the amazon provider's SQS trigger: long polling, no filter
    # (a JSONPath filter json.loads every body, so one non-JSON message would fail it), messages deleted once read.
    assert watcher["trigger"]["classpath"] == "airflow.providers.amazon.aws.triggers.sqs.SqsSensorTrigger"
    kwargs = watcher["trigger"]["kwargs"]
    assert (kwargs["sqs_queue"], kwargs["aws_conn_id"]) == (QUEUE, "events_aws")
    assert (kwargs["max_messages"], kwargs["wait_time_seconds"], kwargs["waiter_delay"]) == (
        SQS_MAX_MESSAGES, SQS_WAIT_SECONDS, 0)
    assert kwargs["message_filtering"] is None and kwargs["delete_message_on_reception"] is True
    # discover reads the watched asset's events as its inlet (the very asset, watcher and all: events.run_start).
    assert dag["inlets"] == [["s3://specs-bucket/incoming", 1]]


@pytest.mark.parametrize("prefix", ["", "incoming/"])
def test_a_queue_without_its_bucket_prefix_fails_the_parse_naming_the_setting(airflow_home, prefix):
    dag = parsed(airflow_home, **{EVENTS_QUEUE_URL_ENV: QUEUE, EVENTS_PREFIX_ENV: prefix})
    [error] = dag["errors"].values()
    assert EVENTS_PREFIX_ENV in error and "s3://BUCKET/PREFIX" in error
