"""Hollow agents: many virtual desktops in one process, for load tests (like kubemark).

Each virtual agent has a stable identity derived from a seed and its index (`uuid5`), so a
second run with the same seed is the same fleet. Its hardware is drawn once from the same
seed (no GPU, one GPU, several GPUs of different sizes), its load and free VRAM change from
beat to beat, and every message goes through a real `Publisher` to a real orchestrator.
No probe runs: messages are built directly, so one process can stand for thousands of
desktops.

Beats are spread uniformly over the interval (agent `i` beats at `i / N` of it), so N
agents at interval S offer N / S heartbeats per second. With `offline_fraction`, that share
of the agents stops midway through the run, either silently (as if killed: the orchestrator
times them out) or with a goodbye.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from chiffon.agent.identity import write_private
from chiffon.agent.loop import AgentIdentity, outgoing
from chiffon.agent.report import GpuReading, Outgoing, Snapshot
from chiffon.agent.simwork import SimulatedWork
from chiffon.schemas.limits import MessageKind
from chiffon.transport.auth import AgentCredential
from chiffon.transport.base import Publisher, TransportError
from chiffon.transport.http import enroll

# A fixed namespace: the same seed and index give the same agent id on every machine.
SIMULATION_NAMESPACE = uuid.UUID("6f1e3c4a-2b7d-5e8f-9a0b-1c2d3e4f5a6b")
POOL_NAME = "simulated"
MAX_IN_FLIGHT = 2000  # publishes awaiting their confirm at once; beyond that, wait
OfflineMode = Literal["silent", "goodbye"]

# (name, VRAM GB) of the cards virtual desktops get.
GPU_MODELS = (
    ("NVIDIA GeForce RTX 3060", 12.0),
    ("NVIDIA GeForce RTX 4060", 8.0),
    ("NVIDIA GeForce RTX 4090", 24.0),
    ("NVIDIA RTX A6000", 48.0),
    ("NVIDIA A100 80GB PCIe", 80.0),
)


def agent_id_for(seed: int, index: int) -> uuid.UUID:
    """The stable id of virtual agent `index` in the fleet of `seed`."""
    return uuid.uuid5(SIMULATION_NAMESPACE, f"{seed}:{index}")


@dataclass(frozen=True, slots=True)
class Hardware:
    cores_physical: int
    memory_total_gb: float
    gpus: tuple[tuple[str, float], ...]  # (name, VRAM GB)


def draw_hardware(rng: random.Random) -> Hardware:
    """20% no GPU, 55% one GPU, 25% two to eight identical GPUs."""
    roll = rng.random()
    if roll < 0.20:
        gpus: tuple[tuple[str, float], ...] = ()
    elif roll < 0.75:
        gpus = (rng.choice(GPU_MODELS),)
    else:
        gpus = (rng.choice(GPU_MODELS),) * rng.choice((2, 2, 4, 8))
    return Hardware(
        cores_physical=rng.choice((4, 6, 8, 12, 16, 32)),
        memory_total_gb=float(rng.choice((16, 32, 64, 128))),
        gpus=gpus,
    )


@dataclass(slots=True)
class VirtualAgent:
    """One hollow desktop: its identity, hardware and message sequence."""

    index: int
    agent_id: uuid.UUID
    name: str
    hardware: Hardware
    rng: random.Random
    boot_id: uuid.UUID
    seq: int = 0
    stopped: bool = False
    accepts_jobs: bool = False
    # simulated attempts running on it: (job, attempt) -> (GPU ids, VRAM GB on each)
    running: dict[tuple[uuid.UUID, int], tuple[tuple[str, ...], float]] = field(
        default_factory=dict
    )

    def resources(self) -> Snapshot:
        """A plausible snapshot that changes at every beat."""
        hw, rng = self.hardware, self.rng
        # One that takes jobs is a desktop left idle: light load, its GPUs free but for
        # what its simulated attempts hold (their claims, as `jobs_vram_used_gb`).
        busy = 0.3 if self.accepts_jobs else 1.2
        load = round(rng.uniform(0, hw.cores_physical * busy), 2)
        mem_free = round(hw.memory_total_gb * rng.uniform(0.1, 0.9), 2)
        gpus = [self._gpu(i, name, total) for i, (name, total) in enumerate(hw.gpus)]
        free = [g.vram_free_gb or 0.0 for g in gpus]
        return Snapshot(
            cpu_load_1min=load,
            cpu_load_5min=load,
            cpu_load_15min=load,
            cpu_cores_physical=hw.cores_physical,
            cpu_cores_logical=hw.cores_physical * 2,
            cpu_cores_available=max(0, math.floor(hw.cores_physical - load)),
            memory_percent=round(100 * (1 - mem_free / hw.memory_total_gb), 1),
            memory_available_gb=mem_free,
            memory_total_gb=hw.memory_total_gb,
            gpus=gpus,
            gpu_count=len(gpus),
            gpu_type="nvidia" if gpus else "none",
            gpu_vram_total_gb=float(sum(total for _, total in hw.gpus)),
            gpu_vram_available_gb=round(float(sum(free)), 2),
            gpu_vram_available_max_gb=max(free, default=0.0),
            collection_ms=round(rng.uniform(0.1, 0.5), 3),
        )

    def _gpu(self, i: int, name: str, total: float) -> GpuReading:
        rng = self.rng
        gpu_id = f"GPU-{self.agent_id.hex[:8]}-{i}"
        held = sum(gb for ids, gb in self.running.values() if gpu_id in ids)
        seen = total * (rng.uniform(0.9, 1.0) if self.accepts_jobs else rng.uniform(0.0, 1.0))
        return GpuReading(
            index=i, uuid=gpu_id, name=name, vendor="nvidia", vram_total_gb=total,
            vram_free_gb=round(max(0.0, seen - held), 2),
            utilization_percent=round(rng.uniform(0, 100), 1),
            temperature_c=round(rng.uniform(30, 85), 1),
            jobs_vram_used_gb=round(held, 2) if self.accepts_jobs else None,
        )  # fmt: skip

    def message(self, kind: MessageKind = "heartbeat") -> Outgoing:
        identity = AgentIdentity(self.agent_id, self.name, POOL_NAME,
                                 labels={"simulated": "true"})  # fmt: skip
        msg = outgoing(identity, kind, boot_id=self.boot_id, seq=self.seq,
                       resources=self.resources() if kind == "heartbeat" else None,
                       accepts_jobs=self.accepts_jobs)  # fmt: skip
        self.seq += 1
        return msg


def make_fleet(agents: int, *, seed: int = 0, accept_jobs: bool = False) -> list[VirtualAgent]:
    """`agents` virtual desktops; the same seed gives the same ids, names and hardware.
    `accept_jobs`: they offer themselves for jobs (`agent.simwork` runs them)."""
    fleet = []
    for index in range(agents):
        rng = random.Random(f"{seed}:{index}")
        agent_id = agent_id_for(seed, index)
        fleet.append(
            VirtualAgent(
                index=index,
                agent_id=agent_id,
                name=f"sim-{seed}-{index:06d}",
                hardware=draw_hardware(rng),
                rng=rng,
                boot_id=uuid.uuid4(),
                accepts_jobs=accept_jobs,
            )
        )
    return fleet


@dataclass
class SimulationReport:
    agents: int
    interval_seconds: float
    elapsed_seconds: float = 0.0
    sent: int = 0
    failed: int = 0
    goodbyes: int = 0
    stopped_agents: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    jobs: dict[str, int] = field(default_factory=dict)  # simulated attempts, by outcome

    @property
    def target_rate(self) -> float:
        return self.agents / self.interval_seconds

    @property
    def achieved_rate(self) -> float:
        return self.sent / self.elapsed_seconds if self.elapsed_seconds else 0.0


class Simulation:
    """Drives a fleet of virtual agents through one shared publisher.

    `run()` returns after `duration_seconds` (or at `stop()`), once every publish in flight
    has been answered. A failed publish is counted, never retried: the agent's next beat
    carries newer data anyway.
    """

    def __init__(
        self,
        fleet: list[VirtualAgent],
        publisher: Publisher,
        *,
        interval_seconds: float,
        duration_seconds: float | None = None,
        offline_fraction: float = 0.0,
        offline_mode: OfflineMode = "silent",
        monotonic: Callable[[], float] = time.monotonic,
        max_in_flight: int = MAX_IN_FLIGHT,
        work: SimulatedWork | None = None,
    ) -> None:
        self.fleet = fleet
        self.work = work  # the fleet takes jobs
        self._publisher = publisher
        self.interval_seconds = interval_seconds
        self.duration_seconds = duration_seconds
        self.offline_mode = offline_mode
        self._monotonic = monotonic
        self._slots = asyncio.Semaphore(max_in_flight)
        self._pending: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()
        # Which agents stop midway: a seeded pick, so reruns stop the same ones.
        picks = random.Random(len(fleet)).sample(
            range(len(fleet)), round(offline_fraction * len(fleet))
        )
        self._leaving = {fleet[i].index for i in picks}
        self.report = SimulationReport(agents=len(fleet), interval_seconds=interval_seconds)

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> SimulationReport:
        await self._publisher.connect()
        if self.work is not None:
            await self.work.start()
        start = self._monotonic()
        try:
            await self._beat_until_done(start)
        finally:
            if self.work is not None:
                await self.work.close()
                self.report.jobs = dict(sorted(self.work.counts.items()))
            if self._pending:
                await asyncio.wait(set(self._pending))
            self.report.elapsed_seconds = self._monotonic() - start
            await self._publisher.close()
        return self.report

    async def _beat_until_done(self, start: float) -> None:
        n = len(self.fleet)
        midway = None if self.duration_seconds is None else start + self.duration_seconds / 2
        end = None if self.duration_seconds is None else start + self.duration_seconds
        step = 0
        while not self._stop.is_set():
            due = start + self.interval_seconds * (step // n + (step % n) / n)
            if end is not None and due >= end:
                return
            if midway is not None and due >= midway and self._leaving:
                await self._leave()
            await self._sleep_until(due)
            agent = self.fleet[step % n]
            if not agent.stopped:
                await self._send(agent.message("heartbeat"))
            step += 1

    async def _sleep_until(self, due: float) -> None:
        delay = due - self._monotonic()
        if delay > 0.001:  # behind schedule: send at once rather than sleep for nothing
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)

    async def _leave(self) -> None:
        """The chosen agents stop beating; with `goodbye` they say so."""
        for agent in self.fleet:
            if agent.index in self._leaving:
                agent.stopped = True
                if self.offline_mode == "goodbye":
                    self.report.goodbyes += 1
                    await self._send(agent.message("offline"))
        self.report.stopped_agents = len(self._leaving)
        self._leaving = set()

    async def _send(self, message: Outgoing) -> None:
        await self._slots.acquire()
        task = asyncio.create_task(self._publish(message))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _publish(self, message: Outgoing) -> None:
        try:
            await self._publisher.publish(message)
        except TransportError as exc:
            self.report.failed += 1
            reason = str(exc).split(":")[0][:80]
            self.report.errors[reason] = self.report.errors.get(reason, 0) + 1
        else:
            if message.kind == "heartbeat":
                self.report.sent += 1
        finally:
            self._slots.release()


class EnrollmentError(RuntimeError):
    """Some virtual agents could not get a credential; the message says which and why."""


ENROLL_CONCURRENCY = 32


def read_credentials(path: Path) -> dict[uuid.UUID, AgentCredential]:
    """The secrets a previous run of this seed got (a JSON object id -> secret)."""
    try:
        stored = json.loads(path.read_text())
        return {uuid.UUID(k): AgentCredential(uuid.UUID(k), str(v)) for k, v in stored.items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, AttributeError) as exc:
        raise EnrollmentError(
            f"cannot read the simulated agents' secrets in {path}: {exc}"
        ) from None


async def enroll_fleet(
    fleet: list[VirtualAgent],
    *,
    path: Path,
    orchestrator_url: str,
    token: str | None,
    timeout_seconds: float = 5.0,
) -> dict[uuid.UUID, AgentCredential]:
    """Each virtual agent's credential: kept in `path` (0600) from an earlier run of the
    same seed, else got by enrolling it now, as a real agent does on its first start."""
    known = read_credentials(path)
    missing = [a.agent_id for a in fleet if a.agent_id not in known]
    if missing and not token:
        raise EnrollmentError(
            f"{len(missing)} simulated agents need the orchestrator's enrollment token "
            "(--enroll-token or CHIFFON_ENROLL_TOKEN)"
        )
    gate = asyncio.Semaphore(ENROLL_CONCURRENCY)
    refused: list[str] = []

    async def one(agent_id: uuid.UUID) -> None:
        assert token is not None
        async with gate:
            try:
                known[agent_id] = await enroll(
                    orchestrator_url,
                    token=token,
                    agent_id=agent_id,
                    timeout_seconds=timeout_seconds,
                )
            except TransportError as exc:
                refused.append(str(exc))

    await asyncio.gather(*(one(agent_id) for agent_id in missing))
    if missing:
        write_private(path, json.dumps({str(k): v.secret for k, v in known.items()}))
    if refused:
        raise EnrollmentError(
            f"{len(refused)} of {len(missing)} simulated agents could not enroll "
            f"(first: {refused[0]}); an agent enrolled by another run whose secrets are not "
            f"in {path} needs `chiffon agents revoke` or another --seed"
        )
    return {a.agent_id: known[a.agent_id] for a in fleet}
