"""Runner `endpoint`: a job's items as chat-completions requests to an OpenAI-compatible inference service (vLLM's
`vllm serve`, NVIDIA NIM, ...), at most `endpoint_concurrency` in flight, each answer in the job's ledger the moment
it arrives, judged by the same quality gate as the worker's.

It runs inside the `upsample_endpoint` task on the Airflow worker: no SSH, no model load, no GPU slot. The job's
folder is the same as for the other runners (jobformat.py): the manifest written by `batch`, the ledger read by
`merge`, the job's lock held while requests are out, so two tries of a task never send the same item and a retried or
killed task sends only what the ledger does not hold. Every answer is judged and recorded as the worker does it
(jobformat.record_attempt: quality.py's checks, `schema` for structured formats, one ledger line per attempt); a
flagged one is asked again with the next attempt's seed, up to the job's re-asks, so flagged items end `flagged` with
review files exactly as the worker's do.

Requests are what the worker would give its engine (prompt_formats.PromptFormat.chat_messages: the system turn if
any, the frames as data URLs in the format's order, the text), with the format's sampling and, for structured
formats, the answer's JSON Schema as `response_format`, the way NVIDIA's Cosmos 3 client calls its endpoint
(NVIDIA/cosmos-framework, `cosmos_framework/inference/prompt_upsampling.py`, `PromptUpsamplerClient`: optional
sampling keys left out when unset, because some gateways refuse keys they do not know).

The client is the official `openai` package on the connection's fields (README, "Using an inference service"): its
`AsyncOpenAI` retries 408/409/429/5xx, timeouts and dropped connections with the service's Retry-After (up to two
minutes) or jittered exponential backoff (openai `_base_client.py`, `_should_retry`, `_calculate_retry_timeout`),
`endpoint_attempts` tries in all. What only a person can fix is not retried: a refused key (401/403), a model the
service does not serve (404), a request the service finds invalid (400 on a job's first request).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from include.cosmos_upsample import jobformat
from include.cosmos_upsample.errors import NotRetryable, UnknownConnection, WorkerFailed
from include.cosmos_upsample.jobformat import Answer, Job, JobItem, Ledger, Request, job_lock
from include.cosmos_upsample.prompt_formats import request_messages

log = logging.getLogger(__name__)

# How the item's prompt count was made exact (the report's `tokens.counted_by`).
COUNTED_BY_PLANNER = "planner"  # the planner's tokenizer is the served model's: the service's /tokenize agreed
COUNTED_BY_SERVICE = "service"  # it is not: the service's /tokenize counted each request before it was sent
COUNTED_BY_USAGE = "service_usage"  # the service has no /tokenize: only its count after answering exists
# Statuses of /tokenize that mean "this service has no such route" (NIM, OpenAI): then only usage counts exist.
NO_TOKENIZE_STATUSES = (404, 405, 501)


class EndpointMisconfigured(NotRetryable):
    """The service refused the key, does not serve the model, or finds the requests invalid: a person must fix the
    connection or the settings; retrying would only be refused again."""


class EndpointUnavailable(WorkerFailed):
    """The service did not answer after every try (down, overloaded, unreachable). Answers already in the ledger are
    kept: the task's retry sends only the rest."""


class RequestRefused(Exception):
    """The service refused one request as invalid (400/413/422): that item fails, with the service's message."""


@dataclass(frozen=True)
class Service:
    conn_id: str
    base_url: str  # e.g. http://host:8000/v1
    api_key: str

    @property
    def root(self) -> str:
        """The server's root, where vLLM serves /tokenize (beside /v1, not under it)."""
        return self.base_url[: -len("/v1")] if self.base_url.endswith("/v1") else self.base_url


def base_url(host: str | None, schema: str | None = None, port: int | None = None) -> str:
    """The service's base URL from a connection's fields: `host` a full URL (http://h:8000/v1), or a host name that
    with `schema` (default https) and `port` makes one. A URL without a path gets /v1, as OpenAI-compatible servers
    expect; a trailing /chat/completions is dropped (as NVIDIA's `_normalize_openai_base_url`)."""
    host = (host or "").strip().rstrip("/")
    if not host:
        raise ValueError("has no host: set it to the service's base URL, e.g. http://vllm.internal:8000/v1")
    if "://" not in host:
        if (schema or "https") not in ("http", "https"):  # a URI's path lands in `schema` (e.g. .../v1)
            raise ValueError(f"has schema {schema!r}, which is not http or https: put the whole base URL in host, "
                             "e.g. http://vllm.internal:8000/v1")
        host = f"{schema or 'https'}://{host}{f':{port}' if port else ''}"
    host = host.removesuffix("/chat/completions")
    return host if urlsplit(host).path not in ("", "/") else f"{host}/v1"


def service_from(conn_id: str, connection: Any) -> Service:
    """The service of an Airflow connection of any type (http, openai, pydanticai): only host, schema, port and
    password (the API key) are read."""
    try:
        url = base_url(connection.host, connection.schema, connection.port)
    except ValueError as exc:
        raise EndpointMisconfigured(f"the inference service connection {conn_id!r} {exc}") from None
    return Service(conn_id, url, connection.password or "")


def read_service(conn_id: str) -> Service:
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        connection = Connection.get(conn_id)
    except AirflowNotFoundException as exc:
        raise UnknownConnection(conn_id, "endpoint_conn_id (host: the service's base URL, password: its API key)") \
            from exc
    return service_from(conn_id, connection)


def request_arguments(job: Job, item: JobItem, job_dir: Path, attempt: int = 1) -> dict[str, Any]:
    """The chat-completions arguments of one attempt at an item: the messages, the served model, the answer's token
    budget, the sampling that is set (a re-ask's seed is the attempt's, jobformat.attempt_seed, as the worker's;
    vLLM's top_k and repetition_penalty as extra body keys), and a structured format's JSON Schema as
    `response_format`."""
    arguments: dict[str, Any] = {
        "model": job.model,
        "messages": request_messages(job.prompt_format, item.text, (job_dir / frame for frame in item.frames)),
        "max_tokens": item.max_tokens or job.max_output_tokens,
    }
    sampling = {**job.sampling, "seed": jobformat.attempt_seed(job.sampling.get("seed"), attempt)}
    sampling = {name: value for name, value in sampling.items() if value is not None}
    arguments.update({name: sampling[name] for name in ("temperature", "top_p", "seed") if name in sampling})
    extra = {name: sampling[name] for name in ("top_k", "repetition_penalty") if name in sampling}
    if extra.get("repetition_penalty") == 1.0:  # the neutral value: spare gateways that do not know the key
        del extra["repetition_penalty"]
    if extra.get("top_k") == -1:
        del extra["top_k"]
    if extra:
        arguments["extra_body"] = extra
    if job.response_schema:
        arguments["response_format"] = {"type": "json_schema", "json_schema": {
            "name": job.prompt_format, "schema": job.response_schema}}
    return arguments


def budget_of(job: Job, item: JobItem) -> int:
    return job.max_model_len - (item.max_tokens or job.max_output_tokens)


class JobSession:
    """One try of one job: the requests of its unsettled items, each answer judged and in the ledger as it arrives.

    The first request goes alone, after the service's /tokenize has counted it: a service that refuses it refuses
    the settings, not an item (fail at once), and the count says whether the planner's tokenizer is the served
    model's. Then `concurrency` items are in flight, each driven through its attempts (a flagged answer is asked
    again at once, with the next seed). A configuration error or a service that stays down stops the sending;
    requests already out are still awaited and recorded (they are paid for), then the error is raised."""

    def __init__(self, job: Job, job_dir: Path, service: Service, client: Any, concurrency: int) -> None:
        self.job, self.job_dir, self.service, self.client = job, job_dir, service, client
        self.concurrency = concurrency
        self.ledger = Ledger.of(job_dir)
        self.run_id = uuid.uuid4().hex[:12]
        self.counted_by = COUNTED_BY_PLANNER
        self.stop: Exception | None = None
        self.done, self.total = 0, 0

    async def answer(self, todo: list[Request]) -> None:
        self.total = len(todo)
        first, rest = todo[0], iter(todo[1:])
        self.counted_by, first_count = await self.token_check(first.item)
        again = await self.one(first, first_count, probe=True)
        await asyncio.gather(self.settle(again, first_count),
                             *(self.drain(rest) for _ in range(min(self.concurrency, len(todo) - 1))))
        if self.stop is not None:
            raise self.stop

    async def drain(self, requests: Iterator[Request]) -> None:
        """Settle items one after another until none is left (the iterator is shared: each item is taken once)."""
        for request in requests:
            if self.stop is not None:
                return
            try:
                count = await self.service_count(request.item) if self.counted_by == COUNTED_BY_SERVICE else None
            except (EndpointMisconfigured, EndpointUnavailable) as exc:
                self.stop = self.stop or exc
                return
            await self.settle(request, count)

    async def settle(self, request: Request | None, count: int | None) -> None:
        """Ask for an item's answer until the gate settles it: passed, or flagged after the job's attempts."""
        while request is not None and self.stop is None:
            try:
                request = await self.one(request, count)
            except (EndpointMisconfigured, EndpointUnavailable) as exc:
                self.stop = self.stop or exc
                return

    async def token_check(self, item: JobItem) -> tuple[str, int | None]:
        count = await self.service_count(item)
        if count is None:
            log.warning("the service at %s has no /tokenize: only its own count after answering (usage) exists",
                        self.service.root)
            return COUNTED_BY_USAGE, None
        if count == item.planned_tokens:
            return COUNTED_BY_PLANNER, count
        log.warning("the service counts %d prompt tokens for %s, the planner %s: the planner has no tokenizer for "
                    "model %s, so the service counts every request before it is sent", count, item.spec_id,
                    item.planned_tokens, self.job.model)
        return COUNTED_BY_SERVICE, count

    async def service_count(self, item: JobItem) -> int | None:
        """The service's own count of the item's prompt (vLLM's /tokenize), None where there is no such route."""
        import openai

        arguments = request_arguments(self.job, item, self.job_dir)
        body = {"model": arguments["model"], "messages": arguments["messages"], "add_generation_prompt": True}
        try:
            reply = await self.client.post(f"{self.service.root}/tokenize", cast_to=object, body=body)
        except openai.APIStatusError as exc:
            if exc.status_code in NO_TOKENIZE_STATUSES:
                return None
            raise self.classified(exc, probe=True) from exc
        except openai.APIError as exc:
            raise self.classified(exc, probe=True) from exc
        return int(reply["count"])

    async def one(self, request: Request, count: int | None, probe: bool = False) -> Request | None:
        """Send one attempt and record its answer; the item's next attempt when the gate flagged it and attempts
        are left, else None."""
        import openai

        item, started = request.item, time.monotonic()
        budget = budget_of(self.job, item)
        if self.counted_by == COUNTED_BY_SERVICE and count is not None and count > budget:
            return self.record(request, Answer(error=(
                f"the service counts {count} prompt tokens for this request, over the budget of {budget} "
                f"(max_model_len - max_output_tokens); not sent. Set the `tokenizer` setting to the served model's "
                "tokenizer so the hint is sized for it")), started)
        arguments = request_arguments(self.job, item, self.job_dir, request.attempt)
        try:
            response = await self.client.chat.completions.create(**arguments)
        except openai.APIError as exc:
            problem = self.classified(exc, probe)
            if not isinstance(problem, RequestRefused):
                raise problem from exc
            return self.record(request, Answer(error=str(problem)), started)
        choice, usage = response.choices[0], response.usage
        answer = Answer(choice.message.content or "", usage.prompt_tokens if usage else None,
                        usage.completion_tokens if usage else None, finish_reason=choice.finish_reason)
        return self.record(request, answer, started)

    def record(self, request: Request, answer: Answer, started: float) -> Request | None:
        """The worker's bookkeeping (jobformat.record_attempt): judged, one ledger line, the re-ask if any."""
        entry, again = jobformat.record_attempt(self.job, self.ledger, request, answer, time.monotonic() - started,
                                      self.run_id, frames_sent=True, counted_by=self.counted_by)
        self.done += 1
        self.total += again is not None
        log.info("[%d/%d] %s: %s%s", self.done, self.total, request.item.spec_id, jobformat.outcome(entry),
                 f" ({entry['reason']})" if entry["reason"] else "")
        return again

    def classified(self, exc: Exception, probe: bool) -> Exception:
        """What an error of the openai client (after its own retries) means here."""
        import openai

        where = f"the inference service at {self.service.base_url} (connection {self.service.conn_id!r})"
        if isinstance(exc, openai.APIStatusError):
            status, message = exc.status_code, exc.message[:500]  # 'Error code: 401 - ...'
            if status in (401, 403):
                return EndpointMisconfigured(
                    f"{where} refused the API key ({message}); put the service's key in the "
                    "connection's password")
            if status == 404:
                return EndpointMisconfigured(
                    f"{where} answered 404 for model {self.job.model!r} ({message}); set the model Param to a name "
                    f"the service serves (GET {self.service.base_url}/models lists them) or fix the connection's URL")
            if status in (400, 413, 422) and not probe:
                return RequestRefused(f"the service refused the request ({message})")
            if status in (400, 413, 422):
                return EndpointMisconfigured(
                    f"{where} refused the job's first request as invalid ({message}); check the model, "
                    "prompt_format, sampling and max_output_tokens settings against what the service accepts")
            if status not in (408, 409, 429) and status < 500:
                return EndpointMisconfigured(f"{where} answered {status} ({message})")
            problem = message
        else:
            problem = f"{type(exc).__name__}: {exc}"
        return EndpointUnavailable(
            f"{where} did not answer ({problem}) after {self.client.max_retries + 1} tries; the answers already "
            "received are kept and a retry sends only the rest")


async def answer_job(job_dir: Path, service: Service, concurrency: int = 16, timeout: float = 300.0,
                     attempts: int = 5) -> int:
    """Settle the job's items the ledger does not hold as final, each from the attempt where it stopped; returns
    how many answers (attempts) were recorded in this call."""
    from openai import AsyncOpenAI

    job = Job.read(job_dir)
    todo = jobformat.requests_to_do(job, Ledger.of(job_dir))
    log.info("job %s: %d items, %d already settled, %d to send to %s (%d in flight)", job.job_key, len(job.items),
             len(job.items) - len(todo), len(todo), service.base_url, concurrency)
    if not todo:
        return 0
    # A service without keys takes any; "EMPTY" is vLLM's documented placeholder (the client insists on one).
    async with AsyncOpenAI(base_url=service.base_url, api_key=service.api_key or "EMPTY", max_retries=attempts - 1,
                           timeout=timeout) as client:
        session = JobSession(job, job_dir, service, client, concurrency)
        try:
            await session.answer(todo)
        finally:
            log.info("job %s: %d answers recorded in this try", job.job_key, session.done)
    return session.done


def run_endpoint_job(job_dir: Path, conn_id: str, concurrency: int, timeout: float, attempts: int) -> int:
    """The `upsample_endpoint` task's work on one job, holding the job's lock (another try still sending its items
    makes this one fail and retry later, never send them twice)."""
    service = read_service(conn_id)
    with job_lock(job_dir) as got_it:
        if not got_it:
            raise WorkerFailed(f"job {job_dir.name} is being answered by another try (its lock is held); retry once "
                               "it has stopped")
        return asyncio.run(answer_job(job_dir, service, concurrency, timeout, attempts))
