from __future__ import annotations

from include.cosmos_upsample.batching import chunk_evenly, job_key, plan_jobs


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
        jobs = plan_jobs([f"k{i}" for i in range(10)], 2, ["gpu_a", "gpu_b"], "fp")
        assert [job.conn_id for job in jobs] == ["gpu_a", "gpu_b"] * 2 + ["gpu_a"]

    def test_job_key_depends_on_items_and_settings_not_order(self):
        assert job_key(["a", "b"], "fp") == job_key(["b", "a"], "fp")
        assert job_key(["a", "b"], "fp") != job_key(["a", "c"], "fp")
        assert job_key(["a", "b"], "fp") != job_key(["a", "b"], "other")
