"""The orchestrator's CPU per heartbeat in a steady fleet: what sizing a deployment needs.

`chiffon simulate --transport amqp` (a separate process) beats at `--agents` /
`--interval` (default 10,000 agents every 15 s: 667 heartbeats/s) into an `Orchestrator`
with its `RabbitConsumer` in this process, writing to a fresh PostgreSQL database. Every
message is signed and checked; the agents' credentials are in the registry, as enrollment
leaves them. This process's CPU (`time.process_time`) is measured from the end of the first
interval (every agent has beaten once, so every credential has been looked up once) to
10 s before the end, and divided by the heartbeats applied meanwhile.

Beside it, in the same run and at the same rate, the reference: the same fleet beating into
a bare aio-pika consumer that only acks each message (same queue arguments and prefetch),
the least any Python consumer of these messages pays. The ratio of the two is what to
compare between runs and machines.

With `--transport http` the beats go over HTTP to `chiffon orchestrator` in its own
process (its CPU read from /proc, its applied count from /metrics), and the reference is
uvicorn serving `bench/bare_http.py`, which only reads each body and answers 200. This
machine cannot offer 10,000 agents' rate over HTTP and serve it too (the simulator's HTTP
client alone needs most of a core at that rate): pass fewer agents, e.g. `--agents 3000`.

    .venv/bin/python bench/steady_cpu.py [--agents 10000] [--interval 15] [--seconds 75]
                                         [--transport amqp|http] [--results NAME]

Takes about 2 x (seconds + 15) s. Needs PostgreSQL and RabbitMQ (see bench/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aio_pika
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    CpuWatch,
    cpu_seconds,
    free_port,
    fresh_postgres,
    insert_credentials,
    issue_credentials,
    machine,
    messages_counted,
    orchestrator,
    percentile,
    private_vhost,
    simulate_data_dir,
    stop,
    wait_http,
    write_results,
)
from bench.ingest import PREFETCH, SEED, chiffon_consumer, declare, simulate

from chiffon.agent.simulate import make_fleet

ROOT = Path(__file__).resolve().parents[1]
Count = Callable[[], float]


async def cpu_window(
    args: argparse.Namespace, url: str, sim_env: dict[str, str], count: Count, cpu: Count
) -> dict[str, Any]:
    """Run the fleet against `url`; the consumer's CPU seconds (`cpu`) and messages
    (`count`) between the end of the first interval and 10 s before the end."""
    sim = await simulate(args.agents, args.interval, args.seconds, url, sim_env, args.transport)
    await asyncio.sleep(args.interval + 2)
    others = CpuWatch({"simulate": sim.pid})
    cpu0, n0, t0 = cpu(), count(), time.perf_counter()
    await asyncio.sleep(args.seconds - args.interval - 12)
    cpu1, n1, t1 = cpu(), count(), time.perf_counter()
    shares = others.shares()
    out, _ = await sim.communicate()
    n = n1 - n0
    return {
        "messages_in_window": n,
        "window_seconds": t1 - t0,
        "rate_per_s": n / (t1 - t0),
        "cpu_us_per_message": 1e6 * (cpu1 - cpu0) / n,
        "cpu_share_of_one_core": (cpu1 - cpu0) / (t1 - t0),
        "simulate_output": out.decode().strip().splitlines()[-1],
        **shares,
    }


async def chiffon_amqp(
    args: argparse.Namespace, cred_rows: list[dict[str, Any]], sim_env: dict[str, str]
) -> dict[str, Any]:
    """The orchestrator in this process, consuming RabbitMQ: its CPU is ours."""
    with private_vhost() as amqp_url, fresh_postgres() as db_url:
        insert_credentials(db_url, cred_rows)
        orch, consumer, target = await chiffon_consumer(db_url, amqp_url)
        try:
            result = await cpu_window(
                args, amqp_url, sim_env, lambda: target.applied, time.process_time
            )
            await asyncio.sleep(1)  # the last batch commits
        finally:
            await consumer.stop()
            await orch.stop()
    if target.rejected:
        raise SystemExit(f"the orchestrator rejected {target.rejected} heartbeats")
    latencies = [lat for _, lat in target.latencies]
    result["publish_to_visible_p50_ms"] = 1000 * statistics.median(latencies)
    result["publish_to_visible_p99_ms"] = 1000 * percentile(latencies, 99)
    return result


async def chiffon_http(
    args: argparse.Namespace, cred_rows: list[dict[str, Any]], sim_env: dict[str, str]
) -> dict[str, Any]:
    """`chiffon orchestrator` (uvicorn) taking the beats over HTTP, in its own process."""
    with tempfile.TemporaryDirectory() as tmp, fresh_postgres() as db_url:
        insert_credentials(db_url, cred_rows)
        with orchestrator(db_url, log=Path(tmp) / "orchestrator.log") as (api, proc):
            result = await cpu_window(
                args,
                api,
                sim_env,
                lambda: messages_counted(api)["accepted"],
                lambda: cpu_seconds(proc.pid),
            )
            if messages_counted(api)["rejected"]:
                raise SystemExit("the orchestrator rejected heartbeats")
    return result


async def bare_amqp(args: argparse.Namespace, sim_env: dict[str, str]) -> dict[str, Any]:
    with private_vhost() as amqp_url:
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=PREFETCH)
            queue = await declare(channel)
            seen = 0

            async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                nonlocal seen
                await message.ack()
                seen += 1

            await queue.consume(on_message)
            return await cpu_window(args, amqp_url, sim_env, lambda: seen, time.process_time)


@contextmanager
def bare_http_server() -> Iterator[tuple[str, int]]:
    """`bench/bare_http.py` under uvicorn on a free port: (url, pid)."""
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "bench.bare_http:app",
            "--lifespan",
            "off",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        cwd=ROOT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/count", server)
        yield url, server.pid
    finally:
        stop(server)


async def bare_http(args: argparse.Namespace, sim_env: dict[str, str]) -> dict[str, Any]:
    with bare_http_server() as (url, pid):

        def answered() -> float:
            return float(httpx.get(f"{url}/count", timeout=10).text)

        return await cpu_window(args, url, sim_env, answered, lambda: cpu_seconds(pid))


async def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    fleet = make_fleet(args.agents, seed=SEED)
    cred_rows, creds = issue_credentials([a.agent_id for a in fleet])
    sim_env = simulate_data_dir(tmp, SEED, creds)
    out: dict[str, Any] = {
        "transport": args.transport,
        "agents": args.agents,
        "interval_seconds": args.interval,
        "offered_per_s": args.agents / args.interval,
        "seconds": args.seconds,
    }
    if args.transport == "amqp":
        out["bare_consumer"] = await bare_amqp(args, sim_env)
        out["chiffon"] = await chiffon_amqp(args, cred_rows, sim_env)
    else:
        out["bare_consumer"] = await bare_http(args, sim_env)
        out["chiffon"] = await chiffon_http(args, cred_rows, sim_env)
    out["cpu_ratio_to_bare_consumer"] = (
        out["chiffon"]["cpu_us_per_message"] / out["bare_consumer"]["cpu_us_per_message"]
    )
    return out


def report(r: dict[str, Any]) -> None:
    path = "RabbitMQ -> PostgreSQL" if r["transport"] == "amqp" else "HTTP -> PostgreSQL"
    bare = "bare aio-pika ack" if r["transport"] == "amqp" else "bare uvicorn 200"
    print(
        f"{r['agents']:,} agents every {r['interval_seconds']:g} s "
        f"({r['offered_per_s']:.0f} heartbeats/s offered), {path}:"
    )
    print(f"{'consumer':<22}{'msg/s':>8}{'CPU us/msg':>12}{'of a core':>11}")
    for name, key in (("chiffon orchestrator", "chiffon"), (bare, "bare_consumer")):
        row = r[key]
        print(
            f"{name:<22}{row['rate_per_s']:>8.0f}{row['cpu_us_per_message']:>12.0f}"
            f"{row['cpu_share_of_one_core']:>10.1%}"
        )
    c = r["chiffon"]
    print(
        f"meanwhile (chiffon run): simulate {c['simulate_of_one_core']:.0%} of a core, the "
        f"machine {c['machine_busy_of_all_cores']:.0%} busy on all cores"
    )
    print(f"chiffon / bare consumer CPU: {r['cpu_ratio_to_bare_consumer']:.2f}x")
    if "publish_to_visible_p50_ms" in c:
        print(
            f"publish -> visible p50 {c['publish_to_visible_p50_ms']:.1f} ms, "
            f"p99 {c['publish_to_visible_p99_ms']:.1f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=10_000)
    parser.add_argument("--interval", type=float, default=15.0)
    parser.add_argument("--seconds", type=float, default=75.0)
    parser.add_argument("--transport", choices=("amqp", "http"), default="amqp")
    parser.add_argument("--results", default="steady_cpu", help="name of the JSON file")
    args = parser.parse_args()
    if args.seconds < args.interval + 20:
        parser.error("--seconds must be at least --interval + 20 (warm-up and tail)")
    results: dict[str, Any] = {"machine": machine()}
    with tempfile.TemporaryDirectory() as tmp:
        results.update(asyncio.run(run(args, Path(tmp))))
    report(results)
    write_results(args.results, results)


if __name__ == "__main__":
    main()
