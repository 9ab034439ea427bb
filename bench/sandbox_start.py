"""What the sandbox costs a job's start and end (agent.sandbox): `true` run as an attempt
(JobRun start + wait) bare and in its unit (control group, PID, mount and IPC namespaces,
the launcher), in alternating rounds, beside the machine's own fork+exec of `true`.

    .venv/bin/python bench/sandbox_start.py [--rounds 6] [--per-round 10]

Linux; as root the job runs as chiffon-job (made if missing). Prints medians and p90 in
ms; writes bench/results/sandbox_start.json.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, write_results

from chiffon.agent.runner import Assignment, JobRun
from chiffon.agent.sandbox import Sandbox, SandboxConfig


async def _attempt(base: Path, sandbox: Sandbox | None, n: int) -> float:
    name = f"bench{n}-{time.monotonic_ns()}"
    unit = sandbox.unit(name, memory_gb=0) if sandbox is not None else None
    run = JobRun(Assignment(job_id=name, attempt=1, command=["true"]),
                 attempt_dir=base / name, unit=unit)  # fmt: skip
    t0 = time.perf_counter()
    await run.start()
    await run.wait()
    return time.perf_counter() - t0


def _fork_exec() -> float:
    t0 = time.perf_counter()
    subprocess.run(["true"], check=True)
    return time.perf_counter() - t0


def _ms(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p90 = ordered[int(0.9 * (len(ordered) - 1))]
    return {"median_ms": round(1000 * statistics.median(values), 1), "p90_ms": round(1000 * p90, 1),
            "n": len(values)}  # fmt: skip


async def main(rounds: int, per_round: int) -> None:
    base = Path(tempfile.mkdtemp(prefix="chiffon-bench-", dir="/var/tmp"))
    sandbox = Sandbox(SandboxConfig(hide=[base], group="chiffon-jobs-bench"))
    found = sandbox.start()
    times: dict[str, list[float]] = {"fork+exec": [], "bare": [], "sandbox": []}
    try:
        for r in range(rounds):  # alternating, so drift in the machine's load hits both
            for mode in ("bare", "sandbox") if r % 2 == 0 else ("sandbox", "bare"):
                for i in range(per_round):
                    unit_of = sandbox if mode == "sandbox" else None
                    times[mode].append(await _attempt(base, unit_of, r * per_round + i))
            times["fork+exec"] += [_fork_exec() for _ in range(per_round)]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    results = {"machine": machine(), "protections": found.report(),
               **{mode: _ms(values) for mode, values in times.items()}}  # fmt: skip
    print(f"protections: {found.report()}")
    print(f"{'':12} {'median ms':>10} {'p90 ms':>8} {'n':>4}")
    for mode in ("fork+exec", "bare", "sandbox"):
        row = results[mode]
        print(f"{mode:12} {row['median_ms']:>10} {row['p90_ms']:>8} {row['n']:>4}")
    write_results("sandbox_start", results)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--per-round", type=int, default=10)
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.per_round))
