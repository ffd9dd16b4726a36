from __future__ import annotations

from include.cosmos_upsample.batching import JobPlan, chunk_evenly, job_count, job_key, plan_jobs, split_evenly
from include.cosmos_upsample.gpu_slots import HostGpus, all_slots

EIGHT = tuple(str(i) for i in range(8))


class TestChunkEvenly:
    def test_sizes_within_one_and_bounded(self):
        chunks = chunk_evenly(list(range(1000)), 50)
        assert len(chunks) == 20
        assert {len(chunk) for chunk in chunks} == {50}
        assert [x for chunk in chunks for x in chunk] == list(range(1000))

    def test_uneven_split_is_balanced(self):
        chunks = chunk_evenly(list(range(101)), 50)
        assert [len(chunk) for chunk in chunks] == [34, 34, 33]

    def test_chunk_count_never_exceeds_max_map_length(self):
        assert len(chunk_evenly(list(range(5000)), 1, max_chunks=1024)) == 1024

    def test_empty(self):
        assert chunk_evenly([], 50) == []


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
