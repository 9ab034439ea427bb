"""The agent's pydantic-free messages against the wire contract the orchestrator enforces.

`chiffon.agent.report` restates `chiffon.schemas.heartbeat` in plain dataclasses so that the
agent stays small; these tests hold the two to each other: the same fields, the same
bounds on both sides of every limit, and JSON the contract parses back to the same bytes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from chiffon.agent.loop import AgentIdentity, AgentLoop
from chiffon.agent.probes.collect import Collector, FirstAvailable
from chiffon.agent.probes.nvidia_smi import NvidiaSmiProbe
from chiffon.agent.probes.nvml import NvmlProbe
from chiffon.agent.report import _GPU_RANGES, _SNAPSHOT_RANGES, GpuReading, Outgoing, Snapshot
from chiffon.schemas.heartbeat import AgentMessage, GpuInfo, Resources, parse_message
from chiffon.transport.memory import InMemoryPublisher
from tests.fakes import fake_pynvml
from tests.fakes.fake_pynvml import FakeGpu

GPU = {"index": 0, "vendor": "nvidia", "vram_total_gb": 24.0, "vram_free_gb": 20.5}


def snapshot_fields(gpu: dict[str, Any] | None = None) -> dict[str, Any]:
    gpus = [GpuReading(**(gpu or GPU))]
    return {
        "memory_total_gb": 64.0,
        "memory_available_gb": 30.0,
        "gpus": gpus,
        "gpu_count": 1,
        "gpu_type": "nvidia",
        "gpu_vram_total_gb": 24.0,
        "gpu_vram_available_gb": 20.5,
        "gpu_vram_available_max_gb": 20.5,
    }


def outgoing(resources: Snapshot | None, **changes: Any) -> Outgoing:
    fields: dict[str, Any] = {
        "kind": "heartbeat",
        "agent_id": uuid.uuid4(),
        "boot_id": uuid.uuid4(),
        "seq": 7,
        "sent_at": datetime.now(UTC),
        "name": "desk-1",
        "pool_name": "render",
        "agent_version": "0.1.0",
        "labels": {"room": "b12"},
        "capabilities": ["cuda"],
        "specializations": [],
        "resources": resources,
    }
    return Outgoing(**{**fields, **changes})


@pytest.mark.parametrize(
    ("plain", "contract", "extra", "local"),
    [
        (GpuReading, GpuInfo, set(), {"processes"}),  # the process list stays on the desktop
        (Snapshot, Resources, set(), set()),
        (Outgoing, AgentMessage, {"schema_version"}, set()),  # a constant the encoder writes
    ],
)
def test_same_fields_as_the_contract(
    plain: type[Any], contract: type[BaseModel], extra: set[str], local: set[str]
) -> None:
    names = {f.name for f in dataclasses.fields(plain)}
    assert (names - local) | extra == set(contract.model_fields)


def test_the_gpus_process_list_is_never_sent() -> None:
    gpu = GpuReading(index=0, vendor="nvidia", vram_total_gb=24.0, vram_free_gb=20.0,
                     jobs_vram_used_gb=3.0, processes=((4242, 3.0), (77, 1.0)))  # fmt: skip
    snapshot = Snapshot(gpus=[gpu], gpu_count=1, gpu_type="nvidia", gpu_vram_total_gb=24.0,
                        gpu_vram_available_gb=20.0, gpu_vram_available_max_gb=20.0)  # fmt: skip
    sent = snapshot.as_json()
    assert sent["gpus"][0]["jobs_vram_used_gb"] == 3.0 and "processes" not in sent["gpus"][0]
    Resources.model_validate(sent)  # and the orchestrator's schema takes it


def test_a_collected_heartbeat_is_byte_for_byte_what_the_contract_writes() -> None:
    fake_pynvml.reset([FakeGpu(uuid="GPU-a"), FakeGpu(uuid="GPU-b", free_bytes=3 * 1024**3)])
    nvml = FirstAvailable("nvidia", NvmlProbe(fake_pynvml), NvidiaSmiProbe(timeout_seconds=2))
    collector = Collector([nvml], timeout_seconds=2)
    identity = AgentIdentity(agent_id=uuid.uuid4(), name="desk-1", labels={"room": "b12"})
    loop = AgentLoop(
        identity, InMemoryPublisher(lambda raw: None), collector.collect, interval_seconds=15
    )
    messages = (loop.message("heartbeat", collector.collect()), loop.message("offline"))
    for seq, message in enumerate(messages):
        raw = message.encode()
        parsed = parse_message(raw)  # what the orchestrator does with it
        assert parsed.encode() == raw
        assert (parsed.kind, parsed.agent_id, parsed.seq) == (message.kind, identity.agent_id, seq)
    assert parsed.kind == "offline" and parsed.resources is None
    heartbeat = parse_message(loop.message("heartbeat", collector.collect()).encode())
    assert heartbeat.resources is not None and heartbeat.resources.gpu_count == 2
    assert heartbeat.resources.gpus[1].vram_free_gb == round(3 * 1024**3 / 1e9, 3)


def test_sent_at_is_the_same_instant_in_utc_and_a_naive_time_is_refused() -> None:
    resources = Snapshot(**snapshot_fields())
    local = datetime(2026, 12, 1, 4, 0, tzinfo=timezone(timedelta(hours=2)))
    parsed = parse_message(outgoing(resources, sent_at=local).encode())
    assert parsed.sent_at == local
    assert parsed.sent_at.utcoffset() == timedelta(0)
    with pytest.raises(ValueError, match="time zone"):
        outgoing(resources, sent_at=datetime(2026, 12, 1, 4, 0))
    with pytest.raises(ValueError, match="must carry resources"):
        outgoing(None)


def _edges(ranges: dict[str, tuple[float, float]]) -> list[tuple[str, float, bool]]:
    cases = []
    for name, (low, high) in ranges.items():
        step = 1 if isinstance(high, int) and isinstance(low, int) else 0.5
        cases += [(name, low, True), (name, high, True)]
        cases += [(name, low - step, False), (name, high + step, False)]
    return cases


def _both_sides(build_plain: Any, build_contract: Any) -> tuple[bool, bool]:
    try:
        build_plain()
        plain_ok = True
    except ValueError:
        plain_ok = False
    try:
        build_contract()
        contract_ok = True
    except ValidationError:
        contract_ok = False
    return plain_ok, contract_ok


@pytest.mark.parametrize(("name", "value", "ok"), _edges(_GPU_RANGES))
def test_gpu_bounds_agree_with_the_contract(name: str, value: float, ok: bool) -> None:
    gpu = {**GPU, "vram_free_gb": None, name: value}
    if name == "vram_free_gb":
        gpu["vram_total_gb"] = None  # only the bound itself, not free <= total
    assert _both_sides(lambda: GpuReading(**gpu), lambda: GpuInfo(**gpu)) == (ok, ok)


# gpu_count and the VRAM aggregates must also agree with the GPUs listed: the consistency
# test below covers them
SNAPSHOT_NUMBERS = {
    k: v for k, v in _SNAPSHOT_RANGES.items() if k != "gpu_count" and not k.startswith("gpu_vram")
}


@pytest.mark.parametrize(("name", "value", "ok"), _edges(SNAPSHOT_NUMBERS))
def test_snapshot_bounds_agree_with_the_contract(name: str, value: float, ok: bool) -> None:
    fields = {name: value}
    if name == "memory_available_gb":
        fields["memory_total_gb"] = None
    if name == "gpu_vram_available_gb":
        fields["gpu_vram_total_gb"] = None
    if name == "gpu_vram_available_max_gb":
        fields["gpu_vram_available_gb"] = None
    assert _both_sides(lambda: Snapshot(**fields), lambda: Resources(**fields)) == (ok, ok)


@pytest.mark.parametrize(
    "changes",
    [
        {"memory_available_gb": 65.0},  # more free than total
        {"gpu_vram_available_gb": 25.0},
        {"gpu_vram_available_max_gb": 21.0},
        {"gpu_count": 2},  # not the number of GPUs listed
        {"gpu_vram_total_gb": 48.0},  # not the sum of the GPUs listed
        {"gpu_vram_available_gb": 10.0},
        {"gpu_vram_available_max_gb": 10.0},
        {"gpu_vram_available_gb": None},  # the GPU's free VRAM is known
        {"gpu_type": "amd"},  # not the GPUs' vendor
        {"gpu_type": "none"},
        # no GPU at all, yet a million GB free: ranked first for every capacity query
        {"gpus": [], "gpu_count": 0, "gpu_type": "none", "gpu_vram_available_gb": 1e6},
        {"cpu_load_1min": math.nan},
        {"cpu_load_1min": math.inf},
        {"cpu_cores_physical": True},  # a bool is not a number on the wire
        {"memory_total_gb": "64"},
    ],
)
def test_inconsistent_snapshots_are_refused_by_both(changes: dict[str, Any]) -> None:
    fields = {**snapshot_fields(), **changes}
    contract = {**fields, "gpus": [GpuInfo(**dataclasses.asdict(g)) for g in fields["gpus"]]}
    assert _both_sides(lambda: Snapshot(**fields), lambda: Resources(**contract)) == (
        False,
        False,
    )


@pytest.mark.parametrize(
    "changes",
    [
        {"vram_free_gb": 30.0},  # free above total
        {"index": 1.0},
        {"name": "x" * 256},
        {"name": ""},
        {"uuid": "u" * 129},
        {"temperature_c": math.nan},
    ],
)
def test_implausible_gpus_are_refused_by_both(changes: dict[str, Any]) -> None:
    gpu = {**GPU, **changes}
    assert _both_sides(lambda: GpuReading(**gpu), lambda: GpuInfo(**gpu)) == (False, False)


def test_the_agent_side_loads_neither_pydantic_nor_httpx_nor_orchestrator_code() -> None:
    code = (
        "import sys, chiffon.cli.main, chiffon.agent.loop, chiffon.agent.probes.collect, "
        "chiffon.transport.factory, chiffon.transport.rabbitmq.publisher; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'pydantic', 'pydantic_core', 'httpx', 'httpcore', 'anyio', 'sqlalchemy', 'fastapi'}"
        " | {m for m in sys.modules if m.startswith(('chiffon.orchestrator', "
        "'chiffon.transport.rabbitmq.consumer', 'chiffon.transport.rabbitmq.acks'))}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.replace("'", '"')) == []
