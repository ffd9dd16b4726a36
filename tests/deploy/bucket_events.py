"""A bucket whose ObjectCreated notifications go to an SQS queue, on the moto server (the S3/SQS stand-in): what a team
sets up on AWS (README, "Upsample on arrival (bucket events)"), for tests/deploy/test_bucket_events.py and
bench/events.py. moto sends one event per put, URL-encoded keys and all, and the s3:TestEvent when the notification
is configured, as S3 does."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from include.cosmos_upsample.events import EVENTS_AWS_CONN_ID_ENV, EVENTS_PREFIX_ENV, EVENTS_QUEUE_URL_ENV

CREDENTIALS = {"region_name": "us-east-1", "aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


@dataclass(frozen=True)
class NotifyingBucket:
    endpoint: str
    name: str
    prefix: str  # key prefix the notification is about, without '/'
    queue_url: str

    @property
    def url(self) -> str:
        """The watched prefix as the deployment names it (COSMOS_UPSAMPLE_EVENTS_PREFIX)."""
        return f"s3://{self.name}/{self.prefix}"

    def object_url(self, name: str) -> str:
        return f"{self.url}/{name}"

    def client(self, service: str) -> Any:
        import boto3

        return boto3.client(service, endpoint_url=self.endpoint, **CREDENTIALS)

    def put(self, name: str, body: bytes) -> float:
        """Upload `prefix/name`; returns the time just before the upload (epoch seconds)."""
        started = time.time()
        self.client("s3").put_object(Bucket=self.name, Key=f"{self.prefix}/{name}", Body=body)
        return started

    def delete(self, name: str) -> None:
        self.client("s3").delete_object(Bucket=self.name, Key=f"{self.prefix}/{name}")

    def send_raw(self, body: str) -> None:
        """A message that did not come from S3 (anyone with access can send one)."""
        self.client("sqs").send_message(QueueUrl=self.queue_url, MessageBody=body)

    def queued(self) -> int:
        attributes = self.client("sqs").get_queue_attributes(
            QueueUrl=self.queue_url, AttributeNames=["ApproximateNumberOfMessages",
                                                     "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
        return sum(int(value) for value in attributes.values())


def notifying_bucket(endpoint: str, name: str, prefix: str = "incoming", suffix: str = ".json",
                     before: dict[str, bytes] | None = None) -> NotifyingBucket:
    """A new bucket and queue, the objects `before` (under `prefix/`, put before any notification), then the
    bucket's notification of `s3:ObjectCreated:*` under `prefix/` ending in `suffix` to the queue (S3 then sends its
    s3:TestEvent to the queue)."""
    bucket = NotifyingBucket(endpoint, name, prefix, "")
    sqs = bucket.client("sqs")
    queue_url = sqs.create_queue(QueueName=f"{name}-events")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    s3 = bucket.client("s3")
    s3.create_bucket(Bucket=name)
    for key, body in (before or {}).items():
        bucket.put(key, body)
    s3.put_bucket_notification_configuration(Bucket=name, NotificationConfiguration={"QueueConfigurations": [{
        "QueueArn": queue_arn, "Events": ["s3:ObjectCreated:*"],
        "Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": f"{prefix}/"},
                                           {"Name": "suffix", "Value": suffix}]}}}]})
    return NotifyingBucket(endpoint, name, prefix, queue_url)


def events_env(bucket: NotifyingBucket, conn_id: str) -> dict[str, str]:
    """A deployment's environment for bucket events: the connection (from the environment), the event source, and
    the same connection for reading the specs."""
    connection = {"conn_type": "aws", "login": "testing", "password": "testing",
                  "extra": {"endpoint_url": bucket.endpoint, "region_name": CREDENTIALS["region_name"]}}
    return {f"AIRFLOW_CONN_{conn_id.upper()}": json.dumps(connection), EVENTS_QUEUE_URL_ENV: bucket.queue_url,
            EVENTS_PREFIX_ENV: bucket.url, EVENTS_AWS_CONN_ID_ENV: conn_id,
            "COSMOS_UPSAMPLE_STORAGE_CONN_ID": conn_id}
