"""The docker runner's container arguments and staged manifest, as values (no engine, no SSH)."""

from __future__ import annotations

from pathlib import PurePosixPath

from include.cosmos_upsample.containers import JOB_LABEL, SLOT_LABEL, SLOT_LOCK_LABEL, container_spec
from include.cosmos_upsample.gpu_slots import host_gpus, placement
from include.cosmos_upsample.settings import Settings
from include.cosmos_upsample.staging import RemoteJob, remote_manifest

JOB = RemoteJob("gpu_a", "job123", PurePosixPath("/srv/jobs"), PurePosixPath("/srv/models"))


def settings(**values) -> Settings:
    return Settings(runner="docker", gpu_conn_ids=["gpu_a"], worker_image="img:1", host_model_dir="/srv/models",
                    host_work_dir="/srv/jobs", **values)


class TestContainerSpec:
    def test_vllm_job_on_a_two_gpu_slot(self):
        slot = host_gpus("gpu_a", {"gpus": list(range(8)), "gpus_per_job": 2}).slots()[3]
        spec = container_spec(settings(backend="vllm"), JOB, placement(slot, "vllm"), "ab12")
        assert spec.image == "img:1"
        assert spec.name == "cosmos-upsample-job123-ab12"
        assert spec.command == ["--job-dir", "/work/job123", "--gpu-lock", "/work/.gpu-6,7.lock"]
        assert spec.device_ids == ("6", "7")
        assert spec.labels == {JOB_LABEL: "job123", SLOT_LABEL: "gpu_a/3", SLOT_LOCK_LABEL: ".gpu-6,7.lock"}
        assert spec.environment == {"COSMOS_UPSAMPLE_SLOT": "gpu_a/3", "COSMOS_UPSAMPLE_SLOT_GPUS": "6,7"}
        assert spec.binds == {"/srv/jobs": {"bind": "/work", "mode": "rw"},
                              "/srv/models": {"bind": "/models", "mode": "ro"}}

    def test_undeclared_host_keeps_the_host_wide_lock_and_every_gpu(self):
        (slot,) = host_gpus("gpu_a", {}).slots()
        spec = container_spec(settings(backend="vllm"), JOB, placement(slot, "vllm"), "x")
        assert spec.command[-1] == "/work/.gpu.lock" and spec.device_ids == ()

    def test_cpu_backend_requests_no_gpu(self):
        slot = host_gpus("gpu_a", {"gpus": [0, 1]}).slots()[0]
        assert container_spec(settings(), JOB, placement(slot, "llama_cpp"), "x").device_ids is None


class TestRemoteManifest:
    def test_slot_engine_settings_and_frame_names_reach_the_worker(self):
        manifest = {"job_key": "job123", "engine": {"gpu_memory_utilization": 0.9, "tensor_parallel_size": 1},
                    "items": [{"key": "k", "frames": ["/out/hints/h/frame-00.jpg"]}]}
        staged = remote_manifest(manifest, {"/out/hints/h/frame-00.jpg": "abc.jpg"}, "/models/m",
                                 {"tensor_parallel_size": 2})
        assert staged["engine"] == {"gpu_memory_utilization": 0.9, "tensor_parallel_size": 2}
        assert staged["items"][0]["frames"] == ["frames/abc.jpg"]
        assert staged["model"] == "/models/m"
        assert manifest["engine"]["tensor_parallel_size"] == 1  # the local record is not changed
