from __future__ import annotations

from pathlib import PurePosixPath

import pytest

from include.cosmos_upsample.batching import plan_jobs
from include.cosmos_upsample.gpu_slots import (
    GpuDeclarationError,
    GpuSlot,
    HostGpus,
    all_slots,
    choose_slot,
    engine_for,
    host_gpus,
    parse_nvidia_smi,
    placement,
    planned_slot,
    pool_size,
    wants_discovery,
)
from include.cosmos_upsample.jobformat import GPU_LOCK_NAME

WORK = PurePosixPath("/work")


def devices_of(slots):
    return [list(slot.device_ids) for slot in slots]


class TestHostSlots:
    def test_8_gpus_1_per_job_make_8_single_gpu_slots(self):
        slots = host_gpus("gpu_a", {"gpus": [0, 1, 2, 3, 4, 5, 6, 7]}).slots()
        assert devices_of(slots) == [[str(i)] for i in range(8)]
        assert [slot.index for slot in slots] == list(range(8))
        assert [slot.lock_name for slot in slots] == [f".gpu-{i}.lock" for i in range(8)]

    def test_8_gpus_2_per_job_make_4_pairs(self):
        slots = host_gpus("gpu_a", {"gpus": [0, 1, 2, 3, 4, 5, 6, 7], "gpus_per_job": 2}).slots()
        assert devices_of(slots) == [["0", "1"], ["2", "3"], ["4", "5"], ["6", "7"]]
        assert slots[1].lock_name == ".gpu-2,3.lock"
        assert slots[1].label == "gpu_a/1"

    def test_1_gpu_makes_1_slot(self):
        (slot,) = host_gpus("gpu_a", {"gpus": [3]}).slots()
        assert slot.device_ids == ("3",) and slot.gpu_count == 1

    def test_undeclared_host_is_one_slot_with_every_gpu_and_the_host_wide_lock(self):
        (slot,) = host_gpus("gpu_a", {"key_file": "/k"}).slots()
        assert slot.device_ids == () and slot.gpu_count is None
        assert slot.lock_name == GPU_LOCK_NAME

    def test_leftover_gpus_stay_unused(self):
        assert devices_of(host_gpus("g", {"gpus": [0, 1, 2, 3, 4], "gpus_per_job": 2}).slots()) == [
            ["0", "1"], ["2", "3"]]

    def test_string_forms_and_uuids(self):
        assert host_gpus("g", {"gpus": "0, 1", "gpus_per_job": "1"}).device_ids == ("0", "1")
        assert host_gpus("g", {"gpus": ["GPU-8f3c-11"]}).device_ids == ("GPU-8f3c-11",)

    @pytest.mark.parametrize("extra", [
        {"gpus": [0, 0]}, {"gpus": ["../x"]}, {"gpus": [0], "gpus_per_job": 2}, {"gpus": [0], "gpus_per_job": 0},
        {"gpus": [0], "gpus_per_job": "two"}, {"gpus": {"a": 1}},
    ])
    def test_bad_declarations_are_refused_with_the_connection_named(self, extra):
        with pytest.raises(GpuDeclarationError, match="connection g:"):
            host_gpus("g", extra)

    def test_discovery(self):
        assert wants_discovery({"gpus": "auto"}) and not wants_discovery({"gpus": [0]})
        found = parse_nvidia_smi("0\n1\n2\n3\n\n")
        assert host_gpus("g", {"gpus": "auto", "gpus_per_job": 2}, found).device_ids == ("0", "1", "2", "3")


class TestPlacement:
    def test_vllm_container_gets_exactly_the_slot_devices_and_tensor_parallel_size(self):
        slot = host_gpus("gpu_a", {"gpus": list(range(8)), "gpus_per_job": 2}).slots()[2]
        place = placement(slot, "vllm")
        assert place.device_ids == ("4", "5")
        assert place.engine == {"tensor_parallel_size": 2}
        assert place.environment == {"COSMOS_UPSAMPLE_SLOT": "gpu_a/2", "COSMOS_UPSAMPLE_SLOT_GPUS": "4,5"}
        assert place.lock_path(WORK) == WORK / ".gpu-4,5.lock"

    def test_single_gpu_slot_runs_without_tensor_parallelism(self):
        place = placement(host_gpus("g", {"gpus": [0]}).slots()[0], "vllm")
        assert place.device_ids == ("0",) and place.engine == {"tensor_parallel_size": 1}

    def test_undeclared_host_gets_every_gpu_and_vllm_decides(self):
        place = placement(host_gpus("g", {}).slots()[0], "vllm")
        assert place.device_ids == () and place.engine == {}
        assert place.environment["COSMOS_UPSAMPLE_SLOT_GPUS"] == "all"

    def test_cpu_backend_asks_for_no_gpu_but_keeps_the_slot_lock(self):
        place = placement(host_gpus("g", {"gpus": [0, 1]}).slots()[1], "llama_cpp")
        assert place.device_ids is None and place.engine == {}
        assert place.lock_path(WORK) == WORK / ".gpu-1.lock"

    @pytest.mark.parametrize("gpus,per_job", [(8, 1), (8, 2), (1, 1), (8, 3)])
    def test_no_two_concurrent_jobs_share_a_device(self, gpus, per_job):
        hosts = [host_gpus(name, {"gpus": list(range(gpus)), "gpus_per_job": per_job}) for name in ("a", "b")]
        slots = all_slots(hosts)
        plans = plan_jobs([f"k{i}" for i in range(1000)], 128, slots, "fp")
        by_place = {(slot.conn_id, slot.index): slot for slot in slots}
        # The jobs that can run at once: one per slot (the pool's size); each takes its slot's devices.
        running = [by_place[(plan.conn_id, plan.slot)] for plan in plans[:pool_size(hosts)]]
        taken = [(slot.conn_id, device) for slot in running for device in placement(slot, "vllm").device_ids]
        assert len(taken) == len(set(taken)) == 2 * (gpus // per_job) * per_job
        assert len({slot.lock_name for slot in running if slot.conn_id == "a"}) == gpus // per_job

    def test_engine_for_a_planned_job(self):
        slots = all_slots([host_gpus("a", {"gpus": [0, 1, 2, 3], "gpus_per_job": 4})])
        assert engine_for(slots, "a", 0, "vllm") == {"tensor_parallel_size": 4}
        assert engine_for(slots, None, None, "vllm") == {}


class TestPool:
    def test_pool_size_is_the_total_slot_count(self):
        eight = {"gpus": list(range(8))}
        assert pool_size([host_gpus("a", eight), host_gpus("b", eight)]) == 16
        assert pool_size([host_gpus("a", {**eight, "gpus_per_job": 2}), host_gpus("b", eight)]) == 12
        assert pool_size([host_gpus("a", {}), host_gpus("b", {})]) == 2  # undeclared: one per host, as before

    def test_slots_interleave_hosts(self):
        slots = all_slots([HostGpus("a", ("0", "1", "2")), HostGpus("b", ("0",))])
        assert [slot.label for slot in slots] == ["a/0", "b/0", "a/1", "a/2"]


class TestChooseSlot:
    SLOTS = [GpuSlot("a", index, (str(index),)) for index in range(4)]

    def test_planned_slot_when_free(self):
        assert choose_slot(self.SLOTS, {".gpu-0.lock"}, self.SLOTS[2]).index == 2

    def test_first_free_slot_when_the_planned_one_is_busy(self):
        assert choose_slot(self.SLOTS, {".gpu-0.lock", ".gpu-2.lock"}, self.SLOTS[2]).index == 1

    def test_planned_slot_when_all_are_busy_its_worker_waits(self):
        assert choose_slot(self.SLOTS, {slot.lock_name for slot in self.SLOTS}, self.SLOTS[1]).index == 1


class TestPlannedSlot:
    """A job runs on the devices recorded with its chunk at discover, never on a wider request."""

    SLOTS = [GpuSlot("a", index, (str(index),)) for index in range(4)]

    def test_the_recorded_devices_wherever_they_are_now(self):
        assert planned_slot(self.SLOTS, "a", 0, ["2"]) is self.SLOTS[2]

    def test_recorded_devices_no_longer_declared_stay_as_recorded(self):
        slot = planned_slot(self.SLOTS, "a", 1, ["7"])
        assert slot.device_ids == ("7",) and slot.lock_name == ".gpu-7.lock"

    def test_a_job_planned_without_a_record_takes_its_index(self):
        assert planned_slot(self.SLOTS, "a", 5, None) is self.SLOTS[1]

    def test_auto_without_nvidia_smi_answer_is_an_error_not_every_gpu(self):
        # Before: no answer meant "one slot with every GPU" and the host-wide lock, beside other jobs' GPU locks.
        with pytest.raises(GpuDeclarationError, match="no nvidia-smi answer"):
            host_gpus("g", {"gpus": "auto"})

    def test_a_host_declared_without_gpus_gets_no_device_request(self):
        (slot,) = host_gpus("testbed", {"gpus": "none"}).slots()
        place = placement(slot, "vllm")
        assert slot.cpu_only and place.device_ids is None and place.engine == {}
        assert place.environment["COSMOS_UPSAMPLE_SLOT_GPUS"] == "none" and slot.lock_name == ".gpu.lock"
