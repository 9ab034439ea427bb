"""Simulated job execution for `chiffon simulate`: hollow agents that take jobs.

A virtual agent that accepts jobs says so in its heartbeats, so the orchestrator places
work on it. Its orders come over RabbitMQ like a real agent's (one queue for the whole
simulation, bound to each agent's routing key) and each is checked as a real agent checks
it: the HMAC under that agent's own key, addressed to it, fresh (`transport.orders`). An
assignment is started at most once. Nothing is executed: the attempt "runs" for a
duration taken from the job (`SIMULATE_SECONDS` in its environment) or drawn from the
simulation's range, then ends with the job's `SIMULATE_EXIT` (default 0). Start and
end are reported over HTTP with the agent's own credential, exactly as `HttpWork` does
for a real agent. A cancel ends the attempt `cancelled`.

With `die_fraction`, that share of attempts kills their agent midway: it stops beating
and reporting at once, as if its power were cut, and stays silent for the rest of the
run, so the orchestrator times it out and loses its attempts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from chiffon.agent.work import PUSHED_POLL_PAUSE_SECONDS
from chiffon.schemas import dispatch
from chiffon.schemas.dispatch import Work, ended
from chiffon.transport.base import TransportError
from chiffon.transport.http import HttpClient, HttpWork
from chiffon.transport.orders import Order, OrderRefused, order_key, verify
from chiffon.transport.rabbitmq.orders import consume_orders_of

if TYPE_CHECKING:
    from chiffon.agent.simulate import VirtualAgent
    from chiffon.transport.auth import AgentCredential

log = logging.getLogger(__name__)
REPORT_TRIES = 5  # a report the orchestrator did not answer is sent again, this often
POLLS_AT_ONCE = 32
# Reports in flight at once, the whole simulated fleet together. Unbounded, thousands of
# attempts ending together queued more requests than the orchestrator could answer
# within the timeout; each was then sent again, and the load fed on itself.
REPORTS_AT_ONCE = 32


@dataclass(frozen=True, slots=True)
class JobPlan:
    """How simulated attempts run: for `seconds` (uniform in the range) unless the job
    says, and how often one kills its agent midway."""

    seconds: tuple[float, float] = (1.0, 5.0)
    die_fraction: float = 0.0


class SimulatedWork:
    """The hollow fleet's side of jobs: orders in, attempts "run", reports out."""

    def __init__(
        self,
        fleet: list[VirtualAgent],
        credentials: Mapping[uuid.UUID, AgentCredential],
        *,
        orchestrator_url: str,
        amqp_url: str,
        plan: JobPlan = JobPlan(),
        seed: int = 0,
        timeout_seconds: float = 5.0,
    ) -> None:
        self.plan = plan
        self.counts: Counter[str] = Counter()
        self._agents = {a.agent_id: a for a in fleet if a.accepts_jobs}
        self._keys = {a: order_key(credentials[a].secret) for a in self._agents}
        self._client = HttpClient(orchestrator_url)
        self._work = {
            a: HttpWork(orchestrator_url, credentials[a], timeout_seconds=timeout_seconds,
                        client=self._client)
            for a in self._agents
        }  # fmt: skip
        self._rng = random.Random(f"simwork:{seed}")
        self._reporting = asyncio.Semaphore(REPORTS_AT_ONCE)
        self._started: set[tuple[uuid.UUID, int]] = set()
        self._runs: dict[tuple[uuid.UUID, int], asyncio.Task[None]] = {}
        self._closing = False
        self._amqp_url = amqp_url
        self._consumer: asyncio.Task[None] | None = None
        self._poller: asyncio.Task[None] | None = None

    @property
    def agent_ids(self) -> list[uuid.UUID]:
        return list(self._agents)

    async def handle(self, agent_id: uuid.UUID, body: bytes, signature: str | None) -> None:
        """One delivered order. Never raises for the order's sake: refusals are counted."""
        agent = self._agents.get(agent_id)
        if agent is None or agent.stopped:
            return  # not one of ours, or dead: a dead desktop hears nothing
        try:
            order = verify(body, signature, key=self._keys[agent_id], agent_id=agent_id,
                           now=time.time())  # fmt: skip
        except OrderRefused as exc:
            self.counts[f"refused:{exc.reason}"] += 1
            return
        key = (order.job_id, order.attempt)
        if order.kind == "assign":
            if key in self._started:
                return  # a repeat (orders are sent again until the start is heard)
            self._started.add(key)
            self.counts["assigned"] += 1
            task = asyncio.create_task(self._run(agent, order), name="chiffon-sim-attempt")
            self._runs[key] = task
            task.add_done_callback(lambda _done: self._runs.pop(key, None))
        elif (run := self._runs.get(key)) is not None:  # cancel or kill
            run.cancel()

    async def _run(self, agent: VirtualAgent, order: Order) -> None:
        work = Work.from_payload(order.payload)  # the real orchestrator's: well formed
        env = work.env
        seconds = _number(env.get("SIMULATE_SECONDS"))
        if seconds is None:
            seconds = self._rng.uniform(*self.plan.seconds)
        exit_code = int(_number(env.get("SIMULATE_EXIT")) or 0)
        dies = self._rng.random() < self.plan.die_fraction
        agent.running[(order.job_id, order.attempt)] = (work.gpu_uuids, work.vram_gb)
        try:
            await self._attempt(agent, order, seconds, exit_code, dies=dies)
        except asyncio.CancelledError:
            if agent.stopped or self._closing:
                raise  # its agent died, or the simulation ends: nothing more is said
            with contextlib.suppress(asyncio.CancelledError):
                said = ended("cancelled", "cancelled")
                await asyncio.shield(self._say(agent, order, said))
            self.counts["cancelled"] += 1
        finally:
            agent.running.pop((order.job_id, order.attempt), None)

    async def _attempt(
        self, agent: VirtualAgent, order: Order, seconds: float, exit_code: int, *, dies: bool
    ) -> None:
        """Started, then `seconds` later ended with `exit_code` (or its agent dies midway)."""
        started = time.monotonic()
        await self._say(agent, order, dispatch.started())
        if dies:
            await asyncio.sleep(seconds * self._rng.random())
            self._die(agent)
            return
        await asyncio.sleep(max(0.0, seconds - (time.monotonic() - started)))
        said = ended("exit", "", exit_code=exit_code)
        await self._say(agent, order, said)
        self.counts["succeeded" if exit_code == 0 else "failed"] += 1

    async def _poll(self) -> None:
        """As a real agent does over RabbitMQ, each agent also asks over HTTP every
        `PUSHED_POLL_PAUSE_SECONDS` for orders published while it had no queue (the
        broker was away): the fleet's asks spread evenly over that period."""
        agents = list(self._agents.values())
        gap = PUSHED_POLL_PAUSE_SECONDS / max(1, len(agents))
        gate = asyncio.Semaphore(POLLS_AT_ONCE)
        tasks: set[asyncio.Task[None]] = set()

        async def ask(agent: VirtualAgent) -> None:
            async with gate:
                try:
                    orders = await self._work[agent.agent_id].orders(wait_seconds=0)
                except TransportError:
                    self.counts["poll_failed"] += 1
                    return
            for body, signature in orders:
                await self.handle(agent.agent_id, body, signature)

        while True:
            for agent in agents:
                await asyncio.sleep(gap)
                if not agent.stopped:
                    task = asyncio.create_task(ask(agent))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)

    def _die(self, agent: VirtualAgent) -> None:
        agent.stopped = True
        self.counts["died"] += 1
        for (job_id, attempt), run in list(self._runs.items()):
            if (job_id, attempt) in agent.running and run is not asyncio.current_task():
                run.cancel()

    async def _say(self, agent: VirtualAgent, order: Order, said: dict[str, Any]) -> None:
        """Report, asking again on a transport error; a stale verdict ends nothing more:
        the attempt is the orchestrator's to judge."""
        for attempt in range(REPORT_TRIES):
            if agent.stopped:
                raise asyncio.CancelledError
            try:
                async with self._reporting:
                    work = self._work[agent.agent_id]
                    verdict = await work.report(order.job_id, order.attempt, said)
            except TransportError:
                await asyncio.sleep(0.2 * 2**attempt)
                continue
            self.counts[f"verdict:{verdict}"] += 1
            return
        self.counts["report_failed"] += 1

    async def start(self, *, within_seconds: float = 30.0) -> None:
        """Consume the fleet's orders from the broker; returns once the queue is bound
        (`TransportError` if not within `within_seconds`)."""
        ready = asyncio.Event()
        self._consumer = asyncio.create_task(
            consume_orders_of(self._amqp_url, self.agent_ids, self.handle, ready=ready),
            name="chiffon-sim-orders",
        )
        self._poller = asyncio.create_task(self._poll(), name="chiffon-sim-poll")
        try:
            await asyncio.wait_for(ready.wait(), within_seconds)
        except TimeoutError:
            await self.close()
            raise TransportError(
                f"cannot consume the simulated agents' orders from the broker within "
                f"{within_seconds:g} s (is --amqp-url right?)"
            ) from None

    async def close(self) -> None:
        """The simulation ends: attempts still running stop without a word (their agents
        stop beating too)."""
        self._closing = True
        for task in (self._consumer, self._poller):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        runs = list(self._runs.values())
        for run in runs:
            run.cancel()
        await asyncio.gather(*runs, return_exceptions=True)
        await self._client.aclose()


def _number(value: object) -> float | None:
    try:
        return None if value is None else float(str(value))
    except ValueError:
        return None
