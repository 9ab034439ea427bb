"""Heartbeat ingest through RabbitMQ into PostgreSQL, against the machine's own ceiling.

Everything runs in one invocation on the same machine, so the ratios mean something on a
shared box:

1. Broker ceiling: raw aio-pika publishes the same message bodies (confirms, 500 in
   flight) to the same exchange and queue arguments, then raw-consumes them (the
   orchestrator's default prefetch, 2000, one multiple ack per 500 messages, as the
   orchestrator acks a committed batch). Both rates are reported; the ceiling is the
   lower.
2. PostgreSQL ceiling: raw psycopg upserts the same registry rows into the same
   `agent_registry` table in batches of 500 (executemany, one transaction per batch).
3. Chiffon's sustained rate: the same bodies are queued, then an `Orchestrator` with its
   `RabbitConsumer` (defaults: prefetch 2000, batches of 500, history on) drains the
   backlog into a fresh PostgreSQL database, acking each message after its batch
   commits. Rate = messages / (first delivery .. last ack).
4. Scale-out (`--processes`, default 2): the same backlog drained by that many
   `chiffon orchestrator --amqp-url` processes as competing consumers; rate = messages
   acked (the queue depth falls only on ack, after commit) / time from the first drop in
   queue depth to an empty queue.
5. Latency at a steady rate: `chiffon simulate --transport amqp` (a separate process)
   offers `--latency-rate` heartbeats/s; for each applied heartbeat, publish-to-visible =
   the commit's wall-clock time minus the message's `sent_at` (set just before publish).
   The first interval (registrations) is left out.

Every message is signed as its agent's (`x-chiffon-signature`), the raw ceilings' too, and
the agents' credentials are in the registry before a run, as enrollment leaves them: the
orchestrator checks each signature (docs/security.md). Bodies are made fresh for each
phase, so none falls outside the orchestrator's replay window.

    .venv/bin/python bench/ingest.py [--agents 10000] [--messages 50000]
                                     [--latency-rate 1000] [--latency-seconds 60]

Takes about 2.5 minutes. Needs PostgreSQL (CHIFFON_BENCH_POSTGRES_URL) and RabbitMQ
(CHIFFON_BENCH_AMQP_URL, with rabbitmqctl on this machine for a private vhost).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aio_pika
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    CHIFFON,
    SECRET_KEY,
    auth_env,
    free_port,
    fresh_postgres,
    insert_credentials,
    issue_credentials,
    machine,
    percentile,
    private_vhost,
    simulate_data_dir,
    write_results,
)

from chiffon.agent.simulate import make_fleet
from chiffon.orchestrator.ingest import Outcome, metric_columns
from chiffon.orchestrator.service import Orchestrator
from chiffon.orchestrator.settings import OrchestratorSettings
from chiffon.schemas.heartbeat import AgentMessage, RejectedMessage, parse_message
from chiffon.transport.auth import SIGNATURE_HEADER, AgentCredential, Proof
from chiffon.transport.rabbitmq.consumer import RabbitConsumer
from chiffon.transport.rabbitmq.topology import (
    AGENT_EVENTS_QUEUE,
    BINDING_KEY,
    EXCHANGE,
    Topology,
    agent_events_arguments,
    declare_exchange,
)

IN_FLIGHT = 500  # publishes awaiting their confirm
ACK_EVERY = 500  # the raw consumer's acks: one per batch, as the orchestrator's
# The drains start from a full queue; on a slow day its tail outlived the default 45 s TTL
# (= heartbeat timeout) before it was consumed. The TTL changes nothing in the consumer.
BACKLOG_TTL_SECONDS = 600
PREFETCH = OrchestratorSettings.model_fields["amqp_prefetch"].default  # the consumer's, both


SEED = 42
Body = tuple[str, bytes, str]  # routing key, body, signature


def make_bodies(agents: int, messages: int, creds: dict[Any, AgentCredential]) -> list[Body]:
    """`messages` signed heartbeats, round after round of the same fleet."""
    fleet = make_fleet(agents, seed=SEED)
    out = []
    for i in range(messages):
        msg = fleet[i % agents].message()
        body = msg.encode()
        out.append((f"agent.heartbeat.{msg.agent_id}", body, creds[msg.agent_id].sign(body)))
    return out


async def declare(channel: aio_pika.abc.AbstractChannel) -> aio_pika.abc.AbstractQueue:
    """The orchestrators' queue exactly as `RabbitConsumer` declares it."""
    exchange = await declare_exchange(channel, EXCHANGE)
    queue = await channel.declare_queue(
        AGENT_EVENTS_QUEUE,
        durable=True,
        arguments=agent_events_arguments(max_length=100_000),
    )
    await queue.bind(exchange, BINDING_KEY)
    return queue


async def publish_all(url: str, bodies: list[Body]) -> float:
    """Raw publish with confirms, IN_FLIGHT outstanding; returns messages per second."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await declare(channel)
        exchange = await channel.get_exchange(EXCHANGE)
        slots = asyncio.Semaphore(IN_FLIGHT)

        async def one(key: str, body: bytes, signature: str) -> None:
            message = aio_pika.Message(
                body, content_type="application/json", headers={SIGNATURE_HEADER: signature}
            )
            async with slots:
                await exchange.publish(message, key)

        started = time.perf_counter()
        await asyncio.gather(*(one(*b) for b in bodies))
        return len(bodies) / (time.perf_counter() - started)


async def consume_all(url: str, count: int) -> float:
    """Raw consume with the orchestrator's default prefetch, acking every ACK_EVERY-th
    message with `multiple` (the orchestrator's one ack per committed batch); messages per
    second."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=PREFETCH)
        queue = await declare(channel)
        done = asyncio.Event()
        seen = 0
        started = 0.0

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal seen, started
            if seen == 0:
                started = time.perf_counter()
            seen += 1
            if seen % ACK_EVERY == 0 or seen == count:
                await message.ack(multiple=True)
            if seen == count:
                done.set()

        await queue.consume(on_message)
        await asyncio.wait_for(done.wait(), 300)
        return (count - 1) / (time.perf_counter() - started)


def registry_rows(bodies: list[Body]) -> list[dict[str, Any]]:
    from datetime import UTC, datetime

    from psycopg.types.json import Jsonb

    now = datetime.now(UTC)
    rows = []
    for _, body, _ in bodies:
        msg = parse_message(body)
        assert msg.resources is not None
        cols = metric_columns(msg.resources)
        cols["resource_metrics"] = Jsonb(msg.resources.model_dump(mode="json"))
        rows.append(
            {
                "agent_id": msg.agent_id,
                "name": msg.name,
                "agent_type": msg.agent_type,
                "pool_name": msg.pool_name,
                "agent_version": msg.agent_version,
                "labels": Jsonb(msg.labels),
                "capabilities": Jsonb(msg.capabilities),
                "specializations": Jsonb(msg.specializations),
                "status": "online",
                "last_heartbeat_at": now,
                "created_at": now,
                "updated_at": now,
                **cols,
                "last_boot_id": msg.boot_id,
                "last_seq": msg.seq,
                "last_sent_at": msg.sent_at,
            }
        )
    return rows


def postgres_ceiling(url: str, rows: list[dict[str, Any]], batch: int = 500) -> float:
    """Raw batched upsert of the registry rows; rows per second."""
    columns = list(rows[0])
    kept = ("agent_id", "created_at")
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in columns if c not in kept)
    sql = (
        f"INSERT INTO agent_registry ({', '.join(columns)}) "
        f"VALUES ({', '.join(f'%({c})s' for c in columns)}) "
        f"ON CONFLICT (agent_id) DO UPDATE SET {updates}"
    )
    conninfo = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(conninfo) as conn:
        started = time.perf_counter()
        for i in range(0, len(rows), batch):
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(sql, rows[i : i + batch])
        return len(rows) / (time.perf_counter() - started)


class TimedTarget:
    """The orchestrator, as the consumer sees it, noting each message's commit time."""

    def __init__(self, orchestrator: Orchestrator) -> None:
        self._orch = orchestrator
        self.metrics = orchestrator.metrics
        self.latencies: list[tuple[float, float]] = []  # (committed at, seconds since sent)
        self.first: float | None = None
        self.applied = 0
        self.rejected = 0

    def reject(self, reason: str) -> None:
        self.rejected += 1
        self._orch.reject(reason)

    async def admit(self, raw: bytes, proof: Proof) -> AgentMessage:
        if self.first is None:
            self.first = time.perf_counter()
        try:
            return await self._orch.admit(raw, proof)
        except RejectedMessage:
            self.rejected += 1
            raise

    def receive(self, message: AgentMessage) -> asyncio.Future[Outcome]:
        future = self._orch.receive(message)
        sent = message.sent_at.timestamp()

        def committed(done: asyncio.Future[Outcome]) -> None:
            if not done.cancelled() and done.exception() is None and done.result() == "applied":
                now = time.time()
                self.applied += 1
                self.latencies.append((now, now - sent))

        future.add_done_callback(committed)
        return future


async def chiffon_consumer(
    db_url: str, amqp_url: str, *, sweep: bool = True, **overrides: Any
) -> tuple[Orchestrator, RabbitConsumer, TimedTarget]:
    """An orchestrator in this process whose ingest is timed; `sweep`: with its periodic
    tasks (the offline sweep, the dispatcher)."""
    # No amqp_url in the settings: the orchestrator would start its own consumer beside
    # this one (the timed one), and the two would share the backlog.
    settings = OrchestratorSettings(
        database_url=db_url,
        secret_key=SECRET_KEY,  # type: ignore[arg-type]  # pydantic makes it a SecretStr
        **{"heartbeat_timeout_seconds": BACKLOG_TTL_SECONDS, **overrides},
    )
    orch = Orchestrator(settings)
    await orch.start(sweep=sweep)
    target = TimedTarget(orch)
    topology = Topology()
    consumer = RabbitConsumer(amqp_url, target, topology=topology, prefetch=settings.amqp_prefetch)  # type: ignore[arg-type]
    await consumer.start()
    await consumer.wait_consuming(30)
    return orch, consumer, target


async def chiffon_drain(db_url: str, amqp_url: str, bodies: list[Body], **overrides: Any) -> float:
    await publish_all(amqp_url, bodies)
    orch, consumer, target = await chiffon_consumer(db_url, amqp_url, **overrides)
    try:
        progress, stalled_since = -1, time.monotonic()
        while consumer.consumed < len(bodies):
            if consumer.consumed != progress:
                progress, stalled_since = consumer.consumed, time.monotonic()
            elif time.monotonic() - stalled_since > 30:
                raise SystemExit(f"drain stalled at {progress} of {len(bodies)} messages")
            await asyncio.sleep(0.01)
        assert target.first is not None
        elapsed = time.perf_counter() - target.first
        rejected = target.rejected
    finally:
        await consumer.stop()
        await orch.stop()
    if target.applied != len(bodies) or rejected:
        raise SystemExit(f"applied {target.applied} of {len(bodies)}, {rejected} rejected")
    return len(bodies) / elapsed


async def queue_depth(channel: aio_pika.abc.AbstractChannel) -> int:
    queue = await channel.declare_queue(AGENT_EVENTS_QUEUE, passive=True)
    count: int = queue.declaration_result.message_count
    return count


async def processes_drain(db_url: str, amqp_url: str, bodies: list[Body], processes: int) -> float:
    """Scale-out: `processes` `chiffon orchestrator` processes as competing consumers.

    A message leaves the queue only when acked, after its batch committed, so the rate is
    messages / (first drop in queue depth .. empty queue).
    """
    await publish_all(amqp_url, bodies)
    env = {
        **os.environ,
        **auth_env(),
        "CHIFFON_DATABASE_URL": db_url,
        "CHIFFON_AMQP_URL": amqp_url,
        "CHIFFON_HEARTBEAT_TIMEOUT": str(BACKLOG_TTL_SECONDS),
    }
    procs = [
        await asyncio.create_subprocess_exec(
            *CHIFFON,
            "orchestrator",
            "--port",
            str(free_port()),
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        for _ in range(processes)
    ]
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        first = None
        while (depth := await queue_depth(channel)) > 0:
            if first is None and depth < len(bodies):
                first = (time.perf_counter(), depth)
            await asyncio.sleep(0.05)
        assert first is not None
        return first[1] / (time.perf_counter() - first[0])
    finally:
        await connection.close()
        for proc in procs:
            proc.terminate()
            await proc.wait()


async def simulate(
    agents: int,
    interval: float,
    seconds: float,
    url: str,
    sim_env: dict[str, str],
    transport: str = "amqp",
) -> asyncio.subprocess.Process:
    """`chiffon simulate` (the benchmark's fleet, seed SEED) to `url`, a broker's for
    amqp, an orchestrator's for http; started."""
    target = {"CHIFFON_AMQP_URL" if transport == "amqp" else "CHIFFON_ORCHESTRATOR_URL": url}
    return await asyncio.create_subprocess_exec(
        *CHIFFON,
        "simulate",
        "--agents",
        str(agents),
        "--interval",
        f"{interval:g}",
        "--transport",
        transport,
        "--duration",
        f"{seconds:g}",
        "--seed",
        str(SEED),
        env={**os.environ, **sim_env, **target},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


async def steady_latency(
    db_url: str, amqp_url: str, rate: float, seconds: float, agents: int, sim_env: dict[str, str]
) -> dict[str, Any]:
    """`chiffon simulate` at `rate`/s over AMQP; publish-to-visible latencies."""
    interval = agents / rate
    orch, consumer, target = await chiffon_consumer(db_url, amqp_url)
    try:
        sim = await simulate(agents, interval, seconds, amqp_url, sim_env)
        started = time.time()
        out, _ = await sim.communicate()
        await asyncio.sleep(1)  # the last batch commits
    finally:
        await consumer.stop()
        await orch.stop()
    steady = [lat for at, lat in target.latencies if at - started > interval]
    return {
        "offered_per_s": rate,
        "interval_seconds": interval,
        "simulate_output": out.decode().strip().splitlines()[-1],
        "applied": target.applied,
        "measured": len(steady),
        "p50_ms": 1000 * statistics.median(steady),
        "p99_ms": 1000 * percentile(steady, 99),
        "max_ms": 1000 * max(steady),
    }


async def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    fleet = make_fleet(max(args.agents, args.latency_agents), seed=SEED)
    cred_rows, creds = issue_credentials([a.agent_id for a in fleet])
    bodies = make_bodies(args.agents, args.messages, creds)
    out: dict[str, Any] = {"messages": len(bodies), "agents": args.agents}
    with private_vhost() as amqp_url:
        out["broker_publish_per_s"] = await publish_all(amqp_url, bodies)
        out["broker_consume_per_s"] = await consume_all(amqp_url, len(bodies))
    with fresh_postgres() as db_url:
        out["postgres_upsert_per_s"] = postgres_ceiling(db_url, registry_rows(bodies))
    with private_vhost() as amqp_url, fresh_postgres() as db_url:
        insert_credentials(db_url, cred_rows)
        bodies = make_bodies(args.agents, args.messages, creds)
        out["chiffon_per_s"] = await chiffon_drain(db_url, amqp_url, bodies)
    if args.processes > 1:
        with private_vhost() as amqp_url, fresh_postgres() as db_url:
            insert_credentials(db_url, cred_rows)
            bodies = make_bodies(args.agents, args.messages, creds)
            out["chiffon_processes"] = args.processes
            out["chiffon_processes_per_s"] = await processes_drain(
                db_url, amqp_url, bodies, args.processes
            )
    broker = min(out["broker_publish_per_s"], out["broker_consume_per_s"])
    out["ceiling_per_s"] = min(broker, out["postgres_upsert_per_s"])
    out["fraction_of_ceiling"] = out["chiffon_per_s"] / out["ceiling_per_s"]
    sim_env = simulate_data_dir(tmp, SEED, creds)
    with private_vhost() as amqp_url, fresh_postgres() as db_url:
        insert_credentials(db_url, cred_rows)
        out["latency"] = await steady_latency(
            db_url, amqp_url, args.latency_rate, args.latency_seconds, args.latency_agents, sim_env
        )
    return out


def report(r: dict[str, Any]) -> None:
    print(f"{r['messages']:,} heartbeats from {r['agents']:,} agents")
    print(f"{'path':<52}{'msg/s':>10}")
    rows = [
        ("RabbitMQ raw publish (confirms)", r["broker_publish_per_s"]),
        ("RabbitMQ raw consume (ack per 500)", r["broker_consume_per_s"]),
        ("PostgreSQL raw batched upsert (500/txn)", r["postgres_upsert_per_s"]),
        ("Chiffon: RabbitMQ -> orchestrator -> PostgreSQL", r["chiffon_per_s"]),
    ]
    for name, rate in rows:
        print(f"{name:<52}{rate:>10,.0f}")
    if "chiffon_processes_per_s" in r:
        name = f"Chiffon, {r['chiffon_processes']} orchestrator processes"
        print(f"{name:<52}{r['chiffon_processes_per_s']:>10,.0f}")
    print(f"Chiffon (one process) / lower ceiling: {r['fraction_of_ceiling']:.2f}")
    lat = r["latency"]
    print(
        f"publish-to-visible at {lat['offered_per_s']:,.0f}/s: p50 {lat['p50_ms']:.1f} ms, "
        f"p99 {lat['p99_ms']:.1f} ms, max {lat['max_ms']:.1f} ms ({lat['measured']:,} beats)"
    )
    print(f"  simulate: {lat['simulate_output']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=10_000)
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--latency-rate", type=float, default=1000)
    parser.add_argument("--latency-seconds", type=float, default=60)
    parser.add_argument("--latency-agents", type=int, default=10_000)
    parser.add_argument("--processes", type=int, default=2, help="scale-out run; 1: none")
    args = parser.parse_args()
    info = machine()
    with tempfile.TemporaryDirectory() as tmp:
        results = asyncio.run(run(args, Path(tmp)))
    report(results)
    write_results("ingest", {"machine": info, "args": vars(args), **results})


if __name__ == "__main__":
    main()
