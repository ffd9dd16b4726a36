"""GPU slots planned for 1,000 specs on 2 hosts x 8 GPUs: the real slot and planning code, no Airflow.

These are the planner's figures (how many distinct slots its jobs are placed on), not containers seen running at once:
that is measured on the test bed by tests/remote/test_gpu_slots_remote.py (two slots, two containers overlapping in
time as the engine reports them), not at 16 slots here (no GPU hosts)."""

from __future__ import annotations

from include.cosmos_upsample.batching import plan_jobs
from include.cosmos_upsample.gpu_slots import all_slots, host_gpus, pool_size

EIGHT_GPUS = {"gpus": list(range(8)), "gpus_per_job": 1}


def slot_figures(specs: int = 1000, batch_max_items: int = 128) -> dict:
    hosts = [host_gpus(conn_id, EIGHT_GPUS) for conn_id in ("gpu_host_1", "gpu_host_2")]
    plans = plan_jobs([f"item-{index:05d}" for index in range(specs)], batch_max_items, all_slots(hosts), "bench")
    return {"gpu_slots_planned_for_1000_specs": len({(plan.conn_id, plan.slot) for plan in plans}),
            "gpu_pool_size_2x8": pool_size(hosts),
            "gpu_jobs_for_1000_specs_2x8": len(plans)}
