"""The desktop's owner comes first (docs/owner.md): how fast the owner gets the desktop back.

1. **Owner back -> new jobs refused**, end to end: `chiffon orchestrator` on a fresh
   PostgreSQL database and one real `chiffon agent` with `accept_jobs: when_idle` and a
   30 s heartbeat interval (so only the immediate heartbeat can be quick), its session read
   from a fake `loginctl` (the OS boundary). Each round: the owner is away until the
   registry says the desktop accepts jobs; then `loginctl` says the owner is back, and the
   time until `GET /agents/{id}` says `accepts_jobs: false` is the latency. Target (issue
   23): within 2 s. Beside it, in the same run: one API round trip, and one read of the
   idle time through the fake `loginctl` (two short processes), the parts it is made of
   besides the agent's one-second reading period.
2. **Owner back -> GPU free**, with real job processes and the fake NVML: the agent's work
   loop (in process, as `chiffon agent` runs it) with `vacate_grace_seconds` G and a kill
   grace K, its GPU read through `NvmlProbe` on the fake `pynvml` whose process list and
   free memory follow the job's process (the driver frees a process's memory when it
   ends). Each round starts a job holding 8 GB, then the owner comes back; measured: until
   the job's process is gone, and until a GPU reading shows its memory back. A job that
   checkpoints on the signal and exits, and one that ignores the signal and SIGTERM (the
   ladder's slowest path: SIGKILL). Target (issue 23): the GPU free within G + 5 s.

    .venv/bin/python bench/owner.py [--rounds 10] [--grace 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    CHIFFON,
    api_headers,
    auth_env,
    fresh_postgres,
    machine,
    orchestrator,
    percentile,
    stop,
    timed,
    write_results,
)
from tests.fakes import fake_pynvml
from tests.fakes.nvidia_smi import gpu_row
from tests.fakes.nvidia_smi import install as install_smi
from tests.fakes.session import install as install_session

from chiffon.agent.bounded import in_daemon_thread
from chiffon.agent.probes.collect import Collector, FirstAvailable
from chiffon.agent.probes.nvidia_smi import NvidiaSmiProbe
from chiffon.agent.probes.nvml import NvmlProbe
from chiffon.agent.probes.owner import logind_idle
from chiffon.agent.runner import Ladder
from chiffon.agent.work import WorkLoop, WorkSettings
from chiffon.transport.orders import Order, encode, order_key

GB = 10**9


def _summary(values: list[float]) -> dict[str, float]:
    ms = sorted(v * 1000 for v in values)
    return {"n": len(ms), "p50": round(percentile(ms, 50), 1), "max": round(ms[-1], 1),
            "min": round(ms[0], 1)}  # fmt: skip


# ---- 1. owner back -> refused --------------------------------------------------------


def owner_back_refused(rounds: int) -> dict[str, Any]:
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        database = stack.enter_context(fresh_postgres())
        api, _ = stack.enter_context(orchestrator(database, log=tmp / "orch.log"))
        home, bin_dir = tmp / "agent", tmp / "agent" / "bin"
        away = int((time.time() - 3600) * 1e6)
        install_session(bin_dir, idle_hint="yes", idle_since_us=away)
        install_smi(bin_dir, rows=[gpu_row(0)], apps=[])
        env = {**os.environ, **auth_env(), "CHIFFON_ORCHESTRATOR_URL": api, "HOME": str(home),
               "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               "CHIFFON_ACCEPT_JOBS": "when_idle", "CHIFFON_IDLE_MINUTES": "10",
               "CHIFFON_ALLOW_ROOT_JOBS": "true", "CHIFFON_HEARTBEAT_INTERVAL": "30",
               "CHIFFON_HEARTBEAT_TIMEOUT": "90"}  # fmt: skip
        log = stack.enter_context((tmp / "agent.log").open("w"))
        agent = subprocess.Popen(
            [*CHIFFON, "agent", "--name", "owner-bench", "--state-dir", str(home / "state")],
            env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        stack.callback(stop, agent)
        http = stack.enter_context(httpx.Client(base_url=api, headers=api_headers(), timeout=5))
        agent_id = _wait_registered(http, home / "state" / "agent_id")

        def accepts() -> bool:
            return bool(http.get(f"/api/v1/agents/{agent_id}").json()["accepts_jobs"])

        latencies = []
        for _ in range(rounds):
            install_session(bin_dir, idle_hint="yes", idle_since_us=away)
            _until(accepts, True, 60)
            time.sleep(1.0 + random.random())  # any phase of the agent's reading period
            install_session(bin_dir, idle_hint="no")  # the owner touches the keyboard
            back = time.monotonic()
            _until(accepts, False, 30)
            latencies.append(time.monotonic() - back)
        round_trip = timed(lambda: http.get(f"/api/v1/agents/{agent_id}"), 50)
        loginctl = str(bin_dir / "loginctl")
        read = timed(lambda: _read_idle(loginctl), 20)
    return {
        "rounds": rounds,
        "owner_back_to_refused_ms": _summary(latencies),
        "floor_api_round_trip_ms": _summary(round_trip),
        "floor_idle_read_ms": _summary(read),
        "reading_period_ms": 1000,
    }


def _read_idle(loginctl: str) -> None:
    """One reading as the agent takes it (`probes.owner.logind_idle`: two runs)."""
    logind_idle(loginctl, time.time())


def _wait_registered(http: httpx.Client, id_file: Path, within: float = 60) -> str:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if id_file.exists():
            agent_id = id_file.read_text().strip()
            if http.get(f"/api/v1/agents/{agent_id}").status_code == 200:
                return agent_id
        time.sleep(0.1)
    raise SystemExit("the agent did not register")


def _until(check: Any, value: bool, within: float) -> None:
    deadline = time.monotonic() + within
    while check() != value:
        if time.monotonic() > deadline:
            raise SystemExit(f"not {value} within {within} s")
        time.sleep(0.01)


# ---- 2. owner back -> GPU free -------------------------------------------------------

COOPERATIVE = (
    "import signal, sys, time\nsignal.signal(signal.SIGUSR1, lambda *_: sys.exit(0))\n"
    "time.sleep(600)"
)
STUBBORN = ("import signal, time\nfor s in (signal.SIGUSR1, signal.SIGTERM):\n"
            "    signal.signal(s, signal.SIG_IGN)\ntime.sleep(600)")  # fmt: skip


class Reports:
    """The orchestrator's side of the channel, in process: every report is applied."""

    def __init__(self) -> None:
        self.said: list[dict[str, Any]] = []

    async def report(self, job_id: uuid.UUID, attempt: int, said: dict[str, Any]) -> str:
        self.said.append(dict(said))
        return "applied"

    async def ship_log(self, job_id: uuid.UUID, attempt: int, offset: int, data: bytes) -> str:
        return "applied"


class Driver(threading.Thread):
    """The fake NVML's GPU as a driver keeps it: the job's process holds 8 GB while it
    lives; its memory is free the moment it is gone."""

    def __init__(self, gpu: fake_pynvml.FakeGpu) -> None:
        super().__init__(daemon=True)
        self.gpu, self.pid, self.done = gpu, 0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.005):
            held = self.pid and _running(self.pid)
            self.gpu.compute = [(self.pid, 8 * GB)] if held else []
            self.gpu.free_bytes = self.gpu.total_bytes - (8 * GB if held else 0)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def vacate_round(tmp: Path, script: str, grace: float, kill: float) -> tuple[float, float]:
    gpu = fake_pynvml.FakeGpu(uuid="GPU-bench", total_bytes=24 * GB, free_bytes=24 * GB)
    fake_pynvml.reset([gpu])
    driver = Driver(gpu)
    driver.start()
    probe = FirstAvailable("nvidia", NvmlProbe(fake_pynvml), NvidiaSmiProbe(timeout_seconds=2))
    collector = Collector([probe], timeout_seconds=2)
    idle = [3600.0]
    settings = WorkSettings(accept_jobs="when_idle", jobs_dir=tmp / f"jobs-{uuid.uuid4()}",
                            allow_root=True, idle_minutes=10,
                            ladder=Ladder("SIGUSR1", grace, kill))  # fmt: skip
    secret, agent_id = "b" * 43, uuid.uuid4()

    async def fresh() -> Any:
        return await in_daemon_thread(collector.collect, name="bench-collect")

    work = WorkLoop(settings, agent_id=agent_id, secret=secret, channel=Reports(), fresh=fresh)
    guard = asyncio.create_task(work.guard(lambda: (idle[0], None), lambda: None))
    await _until_async(work.accepting_now)
    job = uuid.uuid4()
    payload = {"command": [sys.executable, "-c", script], "gpu_uuids": ["GPU-bench"], "vram_gb": 8}
    await work.handle(
        *encode(Order("assign", agent_id, job, 1, time.time(), payload), order_key(secret))
    )
    [run] = list(work.runs.values())
    driver.pid = run.pid or 0
    await _until_async(lambda: gpu.free_bytes < gpu.total_bytes)  # the job holds its memory
    await asyncio.sleep(1.0 + random.random())  # any phase of the agent's reading period
    idle[0] = 0.0  # the owner is back
    back = time.monotonic()
    gone = freed = None
    while freed is None:
        now = time.monotonic()
        if gone is None and not _running(driver.pid):
            gone = now - back
        reading = await fresh()  # what the agent reads now
        if reading.gpus[0].vram_free_gb == 24.0:
            freed = time.monotonic() - back
        await asyncio.sleep(0.02)
    guard.cancel()
    await work.stop()
    driver.done.set()
    collector.close()
    return gone or freed, freed


async def _until_async(check: Any) -> None:
    for _ in range(3000):
        if check():
            return
        await asyncio.sleep(0.01)
    raise SystemExit("not within 30 s")


async def owner_back_gpu_free(rounds: int, grace: float, kill: float) -> dict[str, Any]:
    out: dict[str, Any] = {"vacate_grace_seconds": grace, "kill_grace_seconds": kill,
                           "target_ms": (grace + 5) * 1000}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for name, script in (("checkpoints_and_exits", COOPERATIVE), ("ignores_signals", STUBBORN)):
            gone, freed = [], []
            for _ in range(rounds):
                g, f = await vacate_round(Path(tmp), script, grace, kill)
                gone.append(g)
                freed.append(f)
            out[name] = {"process_gone_ms": _summary(gone), "gpu_free_ms": _summary(freed)}
    out["floor_ladder_ms"] = {
        "checkpoints_and_exits": 0.0,
        "ignores_signals": (grace + kill) * 1000,
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--grace", type=float, default=5.0, help="vacate_grace_seconds")
    parser.add_argument("--kill", type=float, default=3.0, help="vacate_kill_seconds")
    args = parser.parse_args()
    results: dict[str, Any] = {"machine": machine()}
    results["owner_back_refused"] = refused = owner_back_refused(args.rounds)
    print(
        "owner back -> new jobs refused (registry says so), ms:",
        refused["owner_back_to_refused_ms"],
    )
    print("  floor: API round trip", refused["floor_api_round_trip_ms"], "; idle read",
          refused["floor_idle_read_ms"], "; reading period 1000 ms")  # fmt: skip
    results["owner_back_gpu_free"] = free = asyncio.run(
        owner_back_gpu_free(max(3, args.rounds // 2), args.grace, args.kill)
    )
    for kind in ("checkpoints_and_exits", "ignores_signals"):
        print(f"owner back -> GPU free, job that {kind.replace('_', ' ')}, ms:", free[kind])
    print(f"  target: within vacate_grace + 5 s = {free['target_ms']:.0f} ms; the ladder alone:",
          free["floor_ladder_ms"])  # fmt: skip
    print("results:", write_results("owner", results))


if __name__ == "__main__":
    main()
