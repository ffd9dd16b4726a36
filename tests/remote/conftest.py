"""The remote test bed: sshd on loopback + podman's Docker API behind it + the worker image (cpu target)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from include.cosmos_upsample.settings import local_model_path
from tests.conftest import ROOT

CONN_ID = "cosmos_testbed_gpu"
# Overridable, so two checkouts sharing one test bed build and run their own worker images.
WORKER_IMAGE = os.environ.get("COSMOS_TEST_WORKER_IMAGE", "cosmos-upsampler:cpu")


@pytest.fixture(scope="session")
def testbed() -> dict[str, str]:
    from tests.testbed import ensure_testbed, testbed_available

    available, why = testbed_available()
    if not available:
        pytest.fail(f"the remote test bed is required for tests marked remote: {why}")
    env = ensure_testbed()
    subprocess.run(["bash", str(ROOT / "scripts" / "build-worker-image.sh"), WORKER_IMAGE], check=True)
    # The "GPU host" keeps its models in a folder the container mounts read-only at /models.
    models = Path(env["COSMOS_TESTBED_DIR"]) / "models"
    models.mkdir(parents=True, exist_ok=True)
    model = Path(local_model_path("smollm2"))
    if not (models / model.name).exists():
        shutil.copy(model, models / model.name)
    return env


def ssh_connection(env: dict[str, str], port: int | None = None, host_key: str | None = "pinned", **gpus) -> str:
    """An Airflow SSH connection (as AIRFLOW_CONN_* JSON) to the test bed, its host key pinned by default;
    `gpus`/`gpus_per_job` declare GPU slots."""
    extra = {"key_file": env["COSMOS_TESTBED_SSH_KEY"], "look_for_keys": "false", **gpus}
    if host_key:
        extra["host_key"] = env["COSMOS_TESTBED_HOST_KEY"] if host_key == "pinned" else host_key
    return json.dumps({"conn_type": "ssh", "host": env["COSMOS_TESTBED_SSH_HOST"],
                       "port": port or int(env["COSMOS_TESTBED_SSH_PORT"]),
                       "login": env["COSMOS_TESTBED_SSH_USER"], "extra": extra})


def docker_conf(input_dir, output_dir, conn_ids=(CONN_ID,), **extra) -> dict:
    return {"input_dir": str(input_dir), "output_dir": str(output_dir), "runner": "docker",
            "gpu_conn_ids": list(conn_ids), **extra}


def host_work_dir(env: dict[str, str]) -> Path:
    """The test bed folder of this checkout's jobs and slot locks (overridable, so checkouts sharing one test bed
    never see each other's jobs)."""
    return Path(os.environ.get("COSMOS_TEST_HOST_WORK_DIR", f"{env['COSMOS_TESTBED_DIR']}/jobs"))


def deployment_env(env: dict[str, str], **connections: str) -> dict[str, str]:
    """What a deployment sets once (here as environment): the image, the host folders and the connections."""
    return {
        "COSMOS_UPSAMPLE_WORKER_IMAGE": WORKER_IMAGE,
        "COSMOS_UPSAMPLE_HOST_MODEL_DIR": f"{env['COSMOS_TESTBED_DIR']}/models",
        "COSMOS_UPSAMPLE_HOST_WORK_DIR": str(host_work_dir(env)),
        **{f"AIRFLOW_CONN_{conn_id.upper()}": value for conn_id, value in connections.items()},
    }


async def first_event(trigger, within: float | None = None):
    """What a triggerer does with a trigger: run it until its first event; `within`: cancel it after that long, as a
    triggerer that dies or is stopped does (None comes back)."""
    events = trigger.run()
    try:
        return await asyncio.wait_for(anext(events), within)
    except TimeoutError:
        return None
    finally:
        await events.aclose()


def run_docker_job(settings, job_info: dict) -> dict:
    """One upsample try of runner `docker` in this process, as `airflow dags test` runs it: take the job as XCom
    hands it, start (or adopt) the container, follow it with the real trigger run in line, then finish (fetch the
    ledger, remove, raise)."""
    from include.cosmos_upsample.batching import PlannedJob
    from include.cosmos_upsample.docker_trigger import DockerJobTrigger
    from include.cosmos_upsample.remote import finish_docker_job, start_docker_job, trigger_kwargs

    job = PlannedJob.model_validate(job_info)
    started_at = time.time()
    container_id = start_docker_job(settings, job)
    trigger = DockerJobTrigger(**trigger_kwargs(settings, job, container_id, started_at))
    return finish_docker_job(settings, job, asyncio.run(first_event(trigger)).payload)
