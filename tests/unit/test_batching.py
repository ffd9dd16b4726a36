from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from include.cosmos_upsample import stages
from include.cosmos_upsample.batching import (
    MAX_MAP_LENGTH,
    JobPlan,
    PlannedJob,
    job_count,
    job_key,
    plan_jobs,
    split_evenly,
)
from include.cosmos_upsample.gpu_slots import HostGpus, all_slots
from include.cosmos_upsample.layout import OutputLayout
from include.cosmos_upsample.settings import Settings

EIGHT = tuple(str(i) for i in range(8))


class TestPlanJobs:
    def test_1000_items_take_8_model_loads_at_128(self):
        jobs = plan_jobs([f"k{i}" for i in range(1000)], 128, [], "fp")
        assert len(jobs) == 8
        assert max(len(job.item_keys) for job in jobs) <= 128
        assert sorted(k for job in jobs for k in job.item_keys) == sorted(f"k{i}" for i in range(1000))

    def test_jobs_spread_round_robin_over_hosts(self):
        slots = all_slots([HostGpus("gpu_a", ()), HostGpus("gpu_b", ())])
        jobs = plan_jobs([f"k{i}" for i in range(10)], 2, slots, "fp")
        assert [job.conn_id for job in jobs] == ["gpu_a", "gpu_b"] * 2 + ["gpu_a"]
        assert {job.slot for job in jobs} == {0}

    def test_job_key_depends_on_items_and_settings_not_order(self):
        assert job_key(["a", "b"], "fp") == job_key(["b", "a"], "fp")
        assert job_key(["a", "b"], "fp") != job_key(["a", "c"], "fp")
        assert job_key(["a", "b"], "fp") != job_key(["a", "b"], "other")


class TestJobsForSlots:
    """Enough jobs for the slots: shrink below batch_max_items only while slots would sit idle."""

    def test_job_count_arithmetic(self):
        assert job_count(1000, 128, 1) == 8  # one slot: the fewest model loads
        assert job_count(1000, 128, 16) == 16  # 2 hosts x 8 GPUs: every slot busy, 63 items per job
        assert job_count(1000, 32, 16) == 32  # batch_max_items still caps the job size
        assert job_count(5, 128, 16) == 5  # fewer items than slots: one item per job, never an empty job
        assert job_count(0, 128, 16) == 0
        assert job_count(20, 128, 0) == 1  # no slots declared (local runner): as before

    def test_split_evenly_makes_exactly_count_chunks(self):
        assert [len(chunk) for chunk in split_evenly(list(range(17)), 16)] == [2] + [1] * 15
        assert split_evenly([1, 2], 5) == [[1], [2]]

    def test_1000_specs_on_2_hosts_x_8_gpus_use_16_slots(self):
        slots = all_slots([HostGpus("gpu_a", EIGHT), HostGpus("gpu_b", EIGHT)])
        jobs = plan_jobs([f"k{i}" for i in range(1000)], 128, slots, "fp")
        assert len(jobs) == 16
        assert len({(job.conn_id, job.slot) for job in jobs}) == 16
        assert {len(job.item_keys) for job in jobs} == {62, 63}
        assert sorted(k for job in jobs for k in job.item_keys) == sorted(f"k{i}" for i in range(1000))

    def test_few_items_spread_over_hosts_first(self):
        slots = all_slots([HostGpus("gpu_a", EIGHT), HostGpus("gpu_b", EIGHT)])
        jobs = plan_jobs(["a", "b", "c"], 128, slots, "fp")
        assert [(job.conn_id, job.slot) for job in jobs] == [("gpu_a", 0), ("gpu_b", 0), ("gpu_a", 1)]

    def test_pinned_jobs_are_kept_whole_and_their_items_not_replanned(self):
        slots = all_slots([HostGpus("gpu_a", ("0", "1"))])
        live = JobPlan("running", "gpu_a", ("k0", "k1", "k2"), 0)
        jobs = plan_jobs([f"k{i}" for i in range(6)], 128, slots, "fp", pinned=[live])
        assert jobs[0] == live
        assert [job.item_keys for job in jobs[1:]] == [("k3", "k4", "k5")]
        assert jobs[1].slot == 1  # the next slot, not the one the running container holds

    def test_never_more_jobs_than_airflow_maps(self):
        assert len(plan_jobs([f"k{i}" for i in range(5000)], 1, [], "fp")) == MAX_MAP_LENGTH


class TestChunksAreTheJobs:
    """discover plans one chunk per model job, so each job can start once its own chunk is validated."""

    @staticmethod
    def entries(keyed: int, unreadable: int) -> list[dict]:
        return ([{"source_path": f"/in/s{i}.json", "key": f"k{i}"} for i in range(keyed)]
                + [{"source_path": f"/in/bad{i}.json", "key": None} for i in range(unreadable)])

    def test_local_runner_chunks_follow_batch_max_items(self, tmp_path):
        pending = self.entries(5, 2)
        settings = Settings(input_dir=str(tmp_path), output_dir=str(tmp_path), batch_max_items=2)
        chunks, held = stages.plan_chunks(pending, settings, OutputLayout.at(tmp_path))
        assert held == []
        assert [len(chunk["entries"]) for chunk in chunks] == [3, 3, 1]  # 2+1, 2+1 unreadable riding along, 1
        assert sorted(e["source_path"] for c in chunks for e in c["entries"]) == sorted(
            e["source_path"] for e in pending)
        assert {(c["conn_id"], c["slot"], c["job_key"]) for c in chunks} == {(None, None, None)}
        assert all(c["engine"] == {} for c in chunks)

    def test_nothing_to_validate_is_still_one_chunk(self, tmp_path):
        settings = Settings(input_dir=str(tmp_path), output_dir=str(tmp_path))
        assert stages.plan_chunks([], settings, OutputLayout.at(tmp_path)) == ([
            {"conn_id": None, "slot": None, "devices": None, "engine": {}, "job_key": None, "entries": []}], [])

    def test_slots_and_a_running_job_shape_the_chunks(self, tmp_path, monkeypatch):
        hosts = [HostGpus("gpu_a", ("0", "1", "2", "3"), 2)]
        live = JobPlan("running-job", "gpu_a", ("k0", "k1"), 0)
        monkeypatch.setattr(stages, "_gpu_hosts_and_live_jobs", lambda *_args: (hosts, [live], {}))
        settings = Settings(input_dir=str(tmp_path), output_dir=str(tmp_path), backend="vllm", runner="docker",
                            gpu_conn_ids=["gpu_a"])
        chunks, _ = stages.plan_chunks(self.entries(6, 0), settings, OutputLayout.at(tmp_path))
        # The running job keeps its key, items and slot; the rest fills the other slot; 2 GPUs each -> TP 2.
        assert [(c["conn_id"], c["slot"], c["job_key"]) for c in chunks] == [
            ("gpu_a", 0, "running-job"), ("gpu_a", 1, None)]
        assert [[e["key"] for e in c["entries"]] for c in chunks] == [["k0", "k1"], ["k2", "k3", "k4", "k5"]]
        assert [c["engine"] for c in chunks] == [{"tensor_parallel_size": 2}] * 2
        # Each chunk records its slot's devices: its job runs on exactly these, never on a wider guess.
        assert [c["devices"] for c in chunks] == [["0", "1"], ["2", "3"]]


class TestPlannedJob:
    """The job batch hands to upsample travels through XCom as JSON and is read back typed."""

    def test_xcom_carries_the_plan_files_json_and_gives_back_the_same_job(self):
        job = PlannedJob(job_key="k1", job_dir=Path("/work/jobs/k1"), conn_id="gpu_a", slot=1, devices=("2", "3"),
                         items=12)
        carried = json.loads(json.dumps(job.model_dump(mode="json")))
        assert carried == {"job_key": "k1", "job_dir": "/work/jobs/k1", "conn_id": "gpu_a", "slot": 1,
                           "devices": ["2", "3"], "items": 12}
        assert PlannedJob.model_validate(carried) == job

    def test_a_job_planned_before_slots_and_devices_were_recorded_still_reads(self):
        job = PlannedJob.model_validate({"job_key": "k1", "job_dir": "/w/k1", "conn_id": "gpu_a", "items": 3})
        assert (job.slot, job.devices, job.job_dir) == (None, None, Path("/w/k1"))

    def test_it_is_frozen_and_refuses_what_is_not_a_job(self):
        job = PlannedJob(job_key=None, job_dir=None, conn_id=None, items=0)
        with pytest.raises(ValidationError):
            job.items = 3
        with pytest.raises(ValidationError, match="items"):
            PlannedJob.model_validate({"job_key": "k1", "job_dir": "/w/k1", "conn_id": None})
