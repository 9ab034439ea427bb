"""Probes against fakes at the driver boundary: NVML, nvidia-smi, sysfs."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from chiffon.agent.probes.amd import AmdSysfsProbe
from chiffon.agent.probes.collect import Collector, FirstAvailable, default_gpu_probes
from chiffon.agent.probes.host import cores_available, read_host
from chiffon.agent.probes.nvidia_smi import NvidiaSmiProbe
from chiffon.agent.probes.nvml import NvmlProbe
from chiffon.agent.probes.pci import PciProbe
from chiffon.schemas.heartbeat import Resources
from tests.fakes import fake_pynvml, sysfs
from tests.fakes.fake_pynvml import FakeGpu
from tests.fakes.nvidia_smi import gpu_row, install, path_with

GIB = 1024**3


@pytest.fixture
def fake_smi_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    install(bin_dir)
    monkeypatch.setenv("PATH", path_with(bin_dir))
    return bin_dir


def nvidia_only(nvml: NvmlProbe, timeout: float = 2.0) -> Collector:
    smi = NvidiaSmiProbe(timeout_seconds=timeout)
    return Collector([FirstAvailable("nvidia", nvml, smi)], timeout_seconds=timeout)


@pytest.mark.parametrize(
    ("physical", "load", "free"), [(8, 1.5, 6), (8, 7.9, 0), (8, 12.0, 0), (4, 0.0, 4)]
)
def test_free_cores_can_be_zero_on_a_saturated_desktop(
    physical: int, load: float, free: int
) -> None:
    assert cores_available(physical, load) == free
    assert cores_available(None, load) is None


def test_host_reading_is_this_machine() -> None:
    host = read_host()
    assert host.cpu_cores_logical == os.cpu_count()
    assert host.memory_total_gb is not None and host.memory_total_gb > 0
    assert host.cpu_load_1min is not None and host.cpu_load_1min == round(os.getloadavg()[0], 2)


def test_nvml_reads_every_gpu_and_unsupported_is_unknown() -> None:
    fake_pynvml.reset(
        [
            FakeGpu(total_bytes=24 * GIB, free_bytes=20 * GIB),
            FakeGpu(
                name="Tesla T4",
                total_bytes=16 * GIB,
                free_bytes=GIB,
                utilization=None,
                temperature=None,
                uuid="GPU-t4",
            ),
        ]
    )
    res = nvidia_only(NvmlProbe(fake_pynvml)).collect()
    assert res.gpu_count == 2 and res.gpu_type == "nvidia" and res.probe_errors == {}
    first, second = res.gpus
    assert (first.vram_total_gb, first.vram_free_gb) == (25.77, 21.475)  # GiB -> 10^9 bytes
    assert (first.utilization_percent, first.temperature_c) == (7.0, 41.0)
    assert (second.name, second.uuid, second.utilization_percent, second.temperature_c) == (
        "Tesla T4",
        "GPU-t4",
        None,
        None,
    )
    assert res.gpu_vram_available_gb == round(21.475 + 1.074, 3)
    assert res.gpu_vram_available_max_gb == 21.475


def test_nvml_lists_the_processes_holding_memory_on_each_gpu() -> None:
    fake_pynvml.reset(
        [
            FakeGpu(compute=[(4242, 6 * 10**9), (77, 10**9)], graphics=[(501, 5 * 10**8)]),
            FakeGpu(uuid="GPU-hidden", compute=[(4243, None)]),  # the driver does not say
            FakeGpu(uuid="GPU-old", failing={"nvmlDeviceGetGraphicsRunningProcesses": "old"}),
        ]
    )
    res = nvidia_only(NvmlProbe(fake_pynvml)).collect()
    busy, hidden, old = res.gpus
    assert busy.processes == ((77, 1.0), (501, 0.5), (4242, 6.0))
    assert hidden.processes is None and old.processes is None  # unknown, never empty
    assert "GraphicsRunningProcesses: old" in res.probe_errors["nvidia"]  # and named
    assert (busy.vram_free_gb, old.vram_free_gb) == (21.475, 21.475)  # the rest is kept


def test_nvml_is_initialised_once_not_per_pass() -> None:
    state = fake_pynvml.reset([FakeGpu()])
    collector = nvidia_only(NvmlProbe(fake_pynvml))
    for _ in range(5):
        assert collector.collect().gpu_count == 1
    assert state.init_calls == 1 and state.memory_calls == 5


def test_hung_nvml_call_is_skipped_until_it_answers_without_piling_threads() -> None:
    state = fake_pynvml.reset([FakeGpu()])
    state.hang = threading.Event()
    collector = nvidia_only(NvmlProbe(fake_pynvml), timeout=0.2)
    started = time.monotonic()
    first = collector.collect()
    assert time.monotonic() - started < 1.0
    assert "timed out" in first.probe_errors["nvidia"]
    assert first.gpu_vram_total_gb is None  # unknown, not 0: the scheduler sees no capacity
    threads = threading.active_count()
    second = collector.collect()
    assert "still blocked" in second.probe_errors["nvidia"]
    assert threading.active_count() == threads and state.memory_calls == 1
    state.hang.set()  # the driver answers at last
    time.sleep(0.05)
    state.hang = None
    third = collector.collect()
    assert third.probe_errors == {} and third.gpu_count == 1


def test_no_nvml_library_falls_back_to_nvidia_smi(fake_smi_dir: Path) -> None:
    fake_pynvml.reset(missing_library=True)
    install(fake_smi_dir, rows=[gpu_row(0, total_mib="8192", free_mib="2048")])
    res = nvidia_only(NvmlProbe(fake_pynvml)).collect()
    assert res.probe_errors == {}
    assert [(g.name, g.vram_total_gb, g.vram_free_gb) for g in res.gpus] == [
        ("NVIDIA GeForce RTX 4090", 8.59, 2.147)
    ]


def test_nvidia_smi_lists_compute_processes_when_it_can(fake_smi_dir: Path) -> None:
    rows = [gpu_row(0), gpu_row(1)]
    uuid0 = rows[0][1]
    install(fake_smi_dir, rows=rows, apps=[[uuid0, "4242", "6144"], [uuid0, "77", "512"]])
    busy, idle = NvidiaSmiProbe(timeout_seconds=5).read()
    assert busy.processes == ((77, 0.537), (4242, 6.442)) and idle.processes == ()
    install(fake_smi_dir, rows=rows, apps=[[uuid0, "4242", "[N/A]"]])  # hidden: unknown
    assert [g.processes for g in NvidiaSmiProbe(timeout_seconds=5).read()] == [None, None]
    install(fake_smi_dir, rows=rows)  # a driver refusing the query: unknown, GPUs kept
    gpus = NvidiaSmiProbe(timeout_seconds=5).read()
    assert [g.processes for g in gpus] == [None, None] and gpus[0].vram_free_gb is not None


@pytest.mark.parametrize("count", [1, 2, 8])
def test_nvidia_smi_one_two_and_eight_gpus(fake_smi_dir: Path, count: int) -> None:
    install(fake_smi_dir, rows=[gpu_row(i, free_mib=str(1000 * (i + 1))) for i in range(count)])
    gpus = NvidiaSmiProbe(timeout_seconds=5).read()
    assert [g.index for g in gpus] == list(range(count))
    assert gpus[-1].vram_free_gb == round(1000 * count * 1024**2 / 1e9, 3)
    assert all(g.uuid and g.uuid.startswith("GPU-") for g in gpus)


def test_nvidia_smi_not_available_fields_are_unknown_not_zero(fake_smi_dir: Path) -> None:
    install(
        fake_smi_dir,
        rows=[gpu_row(0, util="[N/A]", temp="[Not Supported]", free_mib="[N/A]")],
    )
    (gpu,) = NvidiaSmiProbe(timeout_seconds=5).read()
    assert gpu.vram_total_gb == 25.757
    assert (gpu.vram_free_gb, gpu.utilization_percent, gpu.temperature_c) == (None, None, None)


def test_nvidia_smi_hang_is_killed_at_the_timeout(fake_smi_dir: Path) -> None:
    pid_file = install(fake_smi_dir, rows=[gpu_row(0)], hang_seconds=30)
    collector = Collector([NvidiaSmiProbe(timeout_seconds=0.5)], timeout_seconds=0.5)
    started = time.monotonic()
    res = collector.collect()
    assert time.monotonic() - started < 2.0
    assert "timed out after 0.5 s (killed)" in res.probe_errors["nvidia-smi"]
    assert res.gpus == [] and res.gpu_vram_available_gb is None
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped, not left behind


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_nvidia_smi_streaming_forever_is_cut_at_the_bound_and_killed(fake_smi_dir: Path) -> None:
    pid_file = install(fake_smi_dir, rows=[gpu_row(0)], stream_forever=True)
    collector = Collector([NvidiaSmiProbe(timeout_seconds=5)], timeout_seconds=5)
    started = time.monotonic()
    res = collector.collect()
    assert time.monotonic() - started < 4.0  # the bound, not the timeout, stopped it
    assert res.probe_errors["nvidia-smi"] == "nvidia-smi wrote more than 65536 bytes (killed)"
    assert res.gpus == []
    assert _gone(int(pid_file.read_text()))


def test_a_wrapper_killed_at_the_timeout_takes_its_children_with_it(
    fake_smi_dir: Path, tmp_path: Path
) -> None:
    child_pid_file = tmp_path / "child.pid"
    install(fake_smi_dir, rows=[gpu_row(0)], hang_seconds=30, child_pid_file=child_pid_file)
    res = Collector([NvidiaSmiProbe(timeout_seconds=1)], timeout_seconds=1).collect()
    assert "timed out after 1 s (killed)" in res.probe_errors["nvidia-smi"]
    child = int(child_pid_file.read_text())
    deadline = time.monotonic() + 2
    while not _gone(child):  # SIGKILLed with its group; reaped by init
        assert time.monotonic() < deadline, f"child {child} of the wrapper survived"
        time.sleep(0.05)


def test_one_implausible_nvidia_smi_row_keeps_the_valid_gpu(fake_smi_dir: Path) -> None:
    install(
        fake_smi_dir,
        rows=[gpu_row(0, total_mib="8192", free_mib="99999"), gpu_row(1, free_mib="10000")],
    )
    res = Collector([NvidiaSmiProbe(timeout_seconds=5)], timeout_seconds=5).collect()
    assert (res.gpu_count, res.gpu_type) == (2, "nvidia")
    assert [g.vram_free_gb for g in res.gpus] == [None, 10.486]
    assert res.gpu_vram_available_gb == 10.486
    assert "gpu 0: implausible driver answer" in res.probe_errors["nvidia-smi"]
    Resources.model_validate(res.as_json())  # and the wire takes it


def test_one_failing_nvml_call_loses_only_its_own_number() -> None:
    fake_pynvml.reset(
        [
            FakeGpu(failing={"nvmlDeviceGetTemperature": "Function Not Found"}),
            FakeGpu(failing={"nvmlDeviceGetHandleByIndex": "GPU is lost"}),
            FakeGpu(failing={"nvmlDeviceGetUtilizationRates": "Unknown Error"}, free_bytes=GIB),
        ]
    )
    res = nvidia_only(NvmlProbe(fake_pynvml)).collect()
    gpu0, gpu1, gpu2 = res.gpus
    assert (gpu0.vram_free_gb, gpu0.utilization_percent, gpu0.temperature_c) == (21.475, 7.0, None)
    assert (gpu1.vram_total_gb, gpu1.vram_free_gb) == (None, None)  # lost: counted, unknown
    assert (gpu2.vram_free_gb, gpu2.utilization_percent, gpu2.temperature_c) == (1.074, None, 41.0)
    assert (res.gpu_count, res.gpu_vram_available_gb) == (3, 22.549)
    error = res.probe_errors["nvidia"]
    assert "gpu 0 nvmlDeviceGetTemperature: Function Not Found" in error
    assert "gpu 1 nvmlDeviceGetHandleByIndex: GPU is lost" in error
    assert "gpu 2 nvmlDeviceGetUtilizationRates: Unknown Error" in error
    # lost is unhealthy; a missing temperature or utilisation is not
    assert [g.fault for g in res.gpus] == [None, "gpu 1 nvmlDeviceGetHandleByIndex: GPU is lost",
                                           None]  # fmt: skip
    Resources.model_validate(res.as_json())


def test_a_gpu_that_fails_its_memory_query_or_reports_an_xid_is_unhealthy_until_it_recovers() -> (
    None
):
    from chiffon.agent.probes.nvml import XID_HOLD_SECONDS

    clock = [1000.0]
    state = fake_pynvml.reset([FakeGpu(uuid="GPU-a"), FakeGpu(uuid="GPU-b"), FakeGpu(uuid="GPU-c")])
    state.gpus[2].failing["nvmlDeviceGetMemoryInfo"] = "Unknown Error"
    collector = nvidia_only(NvmlProbe(fake_pynvml, clock=lambda: clock[0]))
    first = collector.collect()
    assert [g.fault is not None for g in first.gpus] == [False, False, True]
    assert state.registered == {0, 1, 2}  # each GPU watched for XID events
    state.xids.append((1, 79))  # "GPU has fallen off the bus"
    del state.gpus[2].failing["nvmlDeviceGetMemoryInfo"]  # GPU c reads well again
    second = collector.collect()
    assert [g.fault for g in second.gpus] == [
        None, "XID 79 (a critical error reported by the driver)", None]  # fmt: skip
    clock[0] += XID_HOLD_SECONDS + 1
    assert [g.fault for g in collector.collect().gpus] == [None, None, None]  # healthy again
    Resources.model_validate(second.as_json())


def test_nvidia_smi_failure_is_named(fake_smi_dir: Path) -> None:
    install(
        fake_smi_dir,
        exit_code=9,
        stderr="NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.",
    )
    res = Collector([NvidiaSmiProbe(timeout_seconds=5)], timeout_seconds=5).collect()
    assert res.probe_errors["nvidia-smi"].startswith("nvidia-smi exited 9: NVIDIA-SMI has failed")
    assert res.gpu_count == 0 and res.gpu_vram_total_gb is None


def test_amd_sysfs_cards(tmp_path: Path) -> None:
    sysfs.add_card(tmp_path, 0, vendor=sysfs.INTEL)
    sysfs.add_card(
        tmp_path,
        1,
        vendor=sysfs.AMD,
        vram_total=16 * 10**9,
        vram_used=4 * 10**9,
        busy_percent=35,
        product_name="Radeon RX 7800 XT",
        temp_millidegrees=52000,
    )
    sysfs.add_card(tmp_path, 2, vendor=sysfs.AMD, vram_total=8 * 10**9, vram_used=10**9)
    gpus = AmdSysfsProbe(sysfs_root=tmp_path).read()
    assert [(g.index, g.vram_total_gb, g.vram_free_gb) for g in gpus] == [
        (0, 16.0, 12.0),
        (1, 8.0, 7.0),
    ]
    assert (gpus[0].name, gpus[0].utilization_percent, gpus[0].temperature_c) == (
        "Radeon RX 7800 XT",
        35.0,
        52.0,
    )
    assert gpus[1].utilization_percent is None  # file absent: unknown


def test_intel_gpu_without_memory_counters_has_unknown_vram(tmp_path: Path) -> None:
    sysfs.add_card(tmp_path, 0, vendor=sysfs.INTEL)
    sysfs.add_card(tmp_path, 1, vendor=0x1AF4)  # a virtual GPU of another vendor
    gpus = PciProbe(sysfs_root=tmp_path).read()
    assert [(g.vendor, g.vram_total_gb, g.vram_free_gb) for g in gpus] == [
        ("intel", None, None),
        ("other", None, None),
    ]


def test_no_sys_tree_means_no_gpus_not_a_crash(tmp_path: Path) -> None:
    assert AmdSysfsProbe(sysfs_root=tmp_path / "absent").read() == []
    assert PciProbe(sysfs_root=tmp_path / "absent").read() == []


def test_mixed_desktop_aggregates(tmp_path: Path, fake_smi_dir: Path) -> None:
    install(fake_smi_dir, rows=[gpu_row(0, total_mib="10000", free_mib="5000")])
    sysfs.add_card(tmp_path, 0, vendor=sysfs.AMD, vram_total=16 * 10**9, vram_used=2 * 10**9)
    sysfs.add_card(tmp_path, 1, vendor=sysfs.INTEL)
    probes = default_gpu_probes(timeout_seconds=5, sysfs_root=tmp_path)
    res = Collector(probes, timeout_seconds=5).collect()
    Resources.model_validate(res.as_json())  # what the agent sends passes the contract
    assert res.probe_errors == {}
    assert [g.vendor for g in res.gpus] == ["nvidia", "amd", "intel"]
    assert (res.gpu_count, res.gpu_type) == (3, "mixed")
    assert res.gpu_vram_total_gb == round(10.486 + 16.0, 3)  # the Intel GPU adds nothing
    assert (res.gpu_vram_available_gb, res.gpu_vram_available_max_gb) == (19.243, 14.0)
    assert res.collection_ms is not None and res.collection_ms > 0
