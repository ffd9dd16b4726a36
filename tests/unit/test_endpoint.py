"""Runner endpoint's pure parts: the service's URL from a connection of any type, the request of one item, and what
each error of the service means (the requests themselves run against a real vLLM server in tests/endpoint)."""

from __future__ import annotations

import httpx2
import openai
import pytest
from airflow.sdk import Connection

from include.cosmos_upsample.endpoint import (
    EndpointMisconfigured,
    EndpointUnavailable,
    JobSession,
    RequestRefused,
    Service,
    base_url,
    read_service,
    request_arguments,
    service_from,
)
from include.cosmos_upsample.errors import UnknownConnection
from include.cosmos_upsample.jobformat import Job, JobItem
from include.cosmos_upsample.prompt_formats import COSMOS3_VIDEO_SCHEMA, PROMPT_FORMATS


class TestServiceUrl:
    @pytest.mark.parametrize(("host", "schema", "port", "url"), [
        ("http://vllm.internal:8000/v1", None, None, "http://vllm.internal:8000/v1"),
        ("http://vllm.internal:8000", None, None, "http://vllm.internal:8000/v1"),
        ("http://vllm.internal:8000/", None, None, "http://vllm.internal:8000/v1"),
        ("https://api.example.com/v1/chat/completions", None, None, "https://api.example.com/v1"),
        ("https://gateway.example.com/nim/v1", None, None, "https://gateway.example.com/nim/v1"),
        ("vllm.internal", "http", 8000, "http://vllm.internal:8000/v1"),
        ("integrate.api.nvidia.com", None, None, "https://integrate.api.nvidia.com/v1"),
    ])
    def test_a_url_without_a_path_gets_v1(self, host, schema, port, url):
        assert base_url(host, schema, port) == url

    @pytest.mark.parametrize("conn_type", ["http", "openai", "pydanticai"])
    def test_any_connection_type_works_only_host_schema_port_and_password_are_read(self, conn_type):
        connection = Connection(conn_id="svc", conn_type=conn_type, host="127.0.0.1", port=8000, schema="http",
                                password="sk-1", extra={"model": "openai:whatever"})
        assert service_from("svc", connection) == Service("svc", "http://127.0.0.1:8000/v1", "sk-1")
        assert Service("svc", "http://127.0.0.1:8000/v1", "").root == "http://127.0.0.1:8000"

    def test_a_missing_connection_is_a_configuration_error_naming_the_fix(self):
        with pytest.raises(UnknownConnection, match="connection 'no_such_service' .named in endpoint_conn_id .host: "
                                                    "the service's base URL, password: its API key.. is not defined"):
            read_service("no_such_service")

    def test_a_connection_without_host_is_a_configuration_error_naming_the_fix(self):
        with pytest.raises(EndpointMisconfigured, match="connection 'svc' has no host: set it to the service's base"):
            service_from("svc", Connection(conn_id="svc", conn_type="http"))

    def test_a_uri_path_in_schema_is_refused_naming_the_fix(self):
        # openai://:key@h:8000/v1 parses into schema "v1": no URL scheme to build on.
        connection = Connection.from_uri("openai://:sk-1@vllm.internal:8000/v1", conn_id="svc")
        with pytest.raises(EndpointMisconfigured, match="has schema 'v1', which is not http or https: put the whole"):
            service_from("svc", connection)
        uri = Connection.from_uri("http://:sk-1@vllm.internal:8000/http", conn_id="svc")  # Airflow's http URI form
        assert service_from("svc", uri) == Service("svc", "http://vllm.internal:8000/v1", "sk-1")


def a_job(prompt_format: str, **fields) -> Job:
    fmt = PROMPT_FORMATS[prompt_format]
    base = {"job_key": "j", "backend": "vllm", "model": "served-name", "max_model_len": 4096,
            "max_output_tokens": 300, "prompt_format": prompt_format, "sampling": dict(fmt.sampling),
            "response_schema": fmt.response_schema}
    return Job(**{**base, **fields})


class TestRequest:
    def test_cosmos_upsampler_frames_then_raw_prompt_and_only_the_sampling_that_is_set(self, tmp_path):
        (tmp_path / "f0.jpg").write_bytes(b"0")
        item = JobItem("k", "s", "A cup", ("f0.jpg",), max_tokens=None)
        arguments = request_arguments(a_job("cosmos_upsampler"), item, tmp_path)
        [user] = arguments.pop("messages")
        assert [part["type"] for part in user["content"]] == ["image_url", "text"]
        assert user["content"][0]["image_url"]["url"] == "data:image/jpeg;base64,MA=="
        # temperature 0.6, top_p 1 as NVIDIA samples; the neutral repetition penalty and the unset seed are left out
        assert arguments == {"model": "served-name", "max_tokens": 300, "temperature": 0.6, "top_p": 1.0}

    def test_cosmos3_structured_sends_its_schema_system_turn_and_nvidias_top_k(self, tmp_path):
        item = JobItem("k", "s", "text", (), max_tokens=2000)
        arguments = request_arguments(a_job("cosmos3_structured", sampling={
            **PROMPT_FORMATS["cosmos3_structured"].sampling, "seed": 7}), item, tmp_path)
        assert arguments["messages"][0] == {"role": "system", "content": "You are a helpful assistant."}
        assert arguments["response_format"] == {"type": "json_schema", "json_schema": {
            "name": "cosmos3_structured", "schema": COSMOS3_VIDEO_SCHEMA}}
        assert (arguments["temperature"], arguments["top_p"], arguments["seed"]) == (0.7, 0.8, 7)
        assert arguments["extra_body"] == {"top_k": 20} and arguments["max_tokens"] == 2000


def status_error(status: int, cls: type = openai.APIStatusError) -> openai.APIStatusError:
    request = httpx2.Request("POST", "http://svc/v1/chat/completions")
    response = httpx2.Response(status, request=request, json={"error": {"message": "nope"}})
    return cls(f"Error code: {status} - nope", response=response, body={"message": "nope"})


class TestErrors:
    @pytest.fixture
    def session(self, tmp_path):
        client = openai.AsyncOpenAI(base_url="http://svc/v1", api_key="k", max_retries=4)
        return JobSession(a_job("cosmos_upsampler"), tmp_path, Service("svc_conn", "http://svc/v1", "k"), client, 4)

    @pytest.mark.parametrize(("status", "cls", "words"), [
        (401, openai.AuthenticationError, "refused the API key (Error code: 401 - nope); put the service's key in the "
                                          "connection's password"),
        (403, openai.PermissionDeniedError, "refused the API key"),
        (404, openai.NotFoundError, "answered 404 for model 'served-name'"),
    ])
    def test_what_only_a_person_can_fix_is_not_retried_and_names_connection_and_fix(self, session, status, cls, words):
        problem = session.classified(status_error(status, cls), probe=False)
        assert isinstance(problem, EndpointMisconfigured)
        assert "(connection 'svc_conn')" in str(problem) and words in str(problem)

    def test_an_invalid_first_request_is_the_settings_fault_a_later_one_the_items(self, session):
        first = session.classified(status_error(400, openai.BadRequestError), probe=True)
        later = session.classified(status_error(400, openai.BadRequestError), probe=False)
        assert isinstance(first, EndpointMisconfigured) and "first request as invalid" in str(first)
        assert isinstance(later, RequestRefused) and "refused the request (Error code: 400 - nope)" in str(later)

    @pytest.mark.parametrize("error", [
        status_error(429, openai.RateLimitError), status_error(503, openai.InternalServerError),
        openai.APIConnectionError(request=httpx2.Request("POST", "http://svc/v1/chat/completions")),
        openai.APITimeoutError(request=httpx2.Request("POST", "http://svc/v1/chat/completions")),
    ])
    def test_what_a_retry_can_fix_is_retried_by_the_task_after_the_clients_tries(self, session, error):
        problem = session.classified(error, probe=False)
        assert isinstance(problem, EndpointUnavailable) and "after 5 tries" in str(problem)
        assert "answers already received are kept" in str(problem)
