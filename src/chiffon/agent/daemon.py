"""The agent's runtime, assembled from its settings: probes, heartbeat loop, work loop,
order delivery and the owner's guard, started together and stopped in order.

`chiffon agent` (`run_agent`) and `chiffon up` (its own agent, on the in-memory transport)
both build a `Daemon`; the CLI only parses arguments, obtains the credential and prints.
A `Daemon` takes its dependencies as arguments (the publisher, the work channel, the
collector), so a test can hand it twins.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import signal
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chiffon.agent.bounded import in_daemon_thread
from chiffon.agent.identity import default_name, load_or_create_agent_id
from chiffon.agent.loop import AgentIdentity, AgentLoop

if TYPE_CHECKING:
    from chiffon.agent.probes.collect import Collector
    from chiffon.agent.report import Snapshot
    from chiffon.agent.sandbox import Sandbox
    from chiffon.agent.settings import AgentSettings
    from chiffon.agent.work import OrderSource, WorkChannel, WorkLoop, WorkSettings
    from chiffon.transport.auth import AgentCredential
    from chiffon.transport.base import Publisher

log = logging.getLogger(__name__)

# How orders reach a work loop: the tasks that feed it (a long-poll, a pushed queue).
OrderFeeds = Callable[["WorkLoop"], list[Coroutine[Any, Any, None]]]


def identity_of(settings: AgentSettings) -> AgentIdentity:
    """Who this agent says it is; `IdentityError` when its state directory cannot hold
    its id."""
    from chiffon.agent.work import may_run_jobs

    agent_id = load_or_create_agent_id(settings.state_dir, settings.agent_id)
    return AgentIdentity(
        agent_id=agent_id,
        name=settings.name or default_name(agent_id),
        pool_name=settings.agent_pool_name,
        labels=settings.labels,
        capabilities=settings.capabilities,
        specializations=settings.specializations,
        accepts_jobs=may_run_jobs(work_settings(settings)),
    )


def new_collector(settings: AgentSettings) -> Collector:
    from chiffon.agent.probes.collect import Collector, default_gpu_probes
    from chiffon.agent.probes.owner import read_owner_idle

    timeout = settings.gpu_detection_timeout_seconds
    return Collector(
        default_gpu_probes(timeout_seconds=timeout),
        timeout_seconds=timeout,
        owner_idle=read_owner_idle,
    )


def locked(collector: Collector) -> Callable[[], Snapshot]:
    """`collector.collect`, one pass at a time (the heartbeat and a job's pre-start check
    both read the GPUs)."""
    lock = threading.Lock()

    def collect() -> Snapshot:
        with lock:
            return collector.collect()

    return collect


def decided(settings: AgentSettings, res: Snapshot, *, sandbox: bool = True) -> Snapshot:
    """`res` with what the agent would decide now under its owner's policy, per GPU and
    for the desktop (`jobs_withheld`: `root` when it runs as root and may not run jobs as
    root), and the sandbox this desktop gives jobs (each mechanism tried). No job runs:
    all use is foreign. `chiffon probe` and `chiffon up` show it."""
    from chiffon.agent.guard import read_only

    found = started_sandbox(settings).protections.report() if sandbox else None
    return read_only(work_settings(settings), res, found)


def work_settings(settings: AgentSettings) -> WorkSettings:
    """The work loop's settings: the owner's rules handed over whole, and how jobs run."""
    from chiffon.agent.owner import OwnerRules
    from chiffon.agent.runner import Ladder
    from chiffon.agent.work import WorkSettings

    rules = {spec.name: getattr(settings, spec.name) for spec in dataclasses.fields(OwnerRules)}
    return WorkSettings(
        **rules,
        jobs_dir=settings.effective_jobs_dir,
        allow_root=settings.allow_root_jobs,
        grace_seconds=settings.job_grace_seconds,
        cache_dir=settings.effective_cache_dir,
        cache_max_gb=settings.cache_max_gb,
        ladder=Ladder(
            settings.checkpoint_signal, settings.vacate_grace_seconds, settings.vacate_kill_seconds
        ),
    )


def new_agent_loop(
    settings: AgentSettings,
    identity: AgentIdentity,
    publisher: Publisher,
    collect: Callable[[], Snapshot],
    work: WorkLoop | None = None,
) -> AgentLoop:
    """The heartbeat loop, collecting in a daemon thread so a hung driver cannot stall it;
    with `work`, each snapshot says what VRAM the agent's jobs hold (`WorkLoop.observe`)."""

    async def snapshot() -> Snapshot:
        taken = await in_daemon_thread(collect, name="chiffon-collect")
        return taken if work is None else work.observe(taken)

    return AgentLoop(
        identity,
        publisher,
        snapshot,
        accepts_jobs=None if work is None else work.accepting_now,
        interval_seconds=settings.heartbeat_interval_seconds,
        publish_timeout_seconds=settings.publish_timeout_seconds,
    )


def started_sandbox(settings: AgentSettings) -> Sandbox:
    """This desktop's sandbox, each mechanism tried (`agent.sandbox`); the agent's own
    files (its state, its jobs, its configuration) hidden from jobs."""
    from chiffon.agent.sandbox import Sandbox, SandboxConfig

    hide = [settings.state_dir, settings.effective_jobs_dir, settings.effective_cache_dir]
    # One group per agent (by its jobs folder): an agent's start ends only its own leftovers.
    jobs = hashlib.sha256(str(settings.effective_jobs_dir.resolve()).encode()).hexdigest()
    config = SandboxConfig(
        group=f"chiffon-jobs-{jobs[:12]}",
        hide=hide, expose=[Path(p) for p in settings.job_paths], job_user=settings.job_user,
        require=settings.require_sandbox, jobs_max_memory_gb=settings.jobs_max_memory_gb,
        jobs_max_cores=settings.jobs_max_cores, max_processes=settings.job_max_processes,
    )  # fmt: skip
    sandbox = Sandbox(config)
    found = sandbox.start()
    log.debug("sandbox: %s", found.report())
    return sandbox


def swept(sandbox: Sandbox) -> Sandbox:
    """The agent's own leftovers ended, before any job starts here, whatever a previous
    run's files say (they may be gone). Never from `chiffon probe`: a probe beside a
    running agent must not end its jobs."""
    if ended := sandbox.sweep():
        log.warning("ended %d job unit(s) a previous run of the agent left", ended)
    return sandbox


def new_work_loop(
    settings: AgentSettings,
    credential: AgentCredential,
    channel: WorkChannel,
    collect: Callable[[], Snapshot],
) -> WorkLoop:
    """The loop that runs jobs, reading the GPUs afresh before each start."""
    from chiffon.agent.work import WorkLoop

    async def fresh() -> Snapshot:
        return await in_daemon_thread(collect, name="chiffon-fresh")

    return WorkLoop(
        work_settings(settings), agent_id=credential.agent_id, secret=credential.secret,
        channel=channel, fresh=fresh, sandbox=swept(started_sandbox(settings)),
    )  # fmt: skip


async def guard(work: WorkLoop, agent: AgentLoop) -> None:
    """The owner's policy, decided every second (idle time read only for when_idle)."""
    from chiffon.agent.probes.owner import read_owner_idle

    when_idle = work.settings.accept_jobs == "when_idle"
    await work.guard(read_owner_idle if when_idle else None, agent.nudge)


def polled(source: OrderSource) -> OrderFeeds:
    """Orders asked for over a long-poll only (HTTP, or the in-memory transport)."""
    return lambda work: [work.poll(source)]


def http_and_amqp(
    settings: AgentSettings, credential: AgentCredential, source: OrderSource
) -> OrderFeeds:
    """How orders reach the agent: a long-poll over HTTP; over RabbitMQ, its own queue, and
    an HTTP ask every 30 s for any published while it had none."""
    if settings.transport != "amqp":
        return polled(source)

    def feeds(work: WorkLoop) -> list[Coroutine[Any, Any, None]]:
        from chiffon.agent.work import PUSHED_POLL_PAUSE_SECONDS
        from chiffon.transport.rabbitmq.orders import consume_orders

        # While its queue is not consumed (the broker is away, or refuses it), orders come
        # over the HTTP long-poll at once, not at the next 30 s ask.
        consumed = asyncio.Event()
        pushed = consume_orders(settings.amqp_url, credential.agent_id, work.handle,
                                ready=consumed)  # fmt: skip
        asked = work.poll(source, wait_seconds=0, pause_seconds=PUSHED_POLL_PAUSE_SECONDS,
                          pushed=consumed)  # fmt: skip
        return [pushed, asked]

    return feeds


class Daemon:
    """One agent: its heartbeat, its work loop fed by `orders`, and the owner's guard.
    `start()`, then `stop()` (its jobs end and say so before the goodbye)."""

    def __init__(
        self,
        settings: AgentSettings,
        identity: AgentIdentity,
        credential: AgentCredential,
        *,
        publisher: Publisher,
        channel: WorkChannel,
        collector: Collector,
        orders: OrderFeeds,
    ) -> None:
        self.identity = identity
        self._collector = collector
        self._orders = orders
        collect = locked(collector)
        self.work = new_work_loop(settings, credential, channel, collect)
        self.heart = new_agent_loop(settings, identity, publisher, collect, self.work)
        self._beating: asyncio.Task[None] | None = None
        self._recovering: asyncio.Task[None] | None = None
        self._jobs: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._beating = asyncio.create_task(self.heart.run(), name="chiffon-agent")
        self._recovering = asyncio.create_task(self.work.recover(), name="chiffon-recover")
        if self.identity.accepts_jobs:
            self._jobs = [asyncio.create_task(feed, name="chiffon-orders")
                          for feed in self._orders(self.work)]  # fmt: skip
            self._jobs.append(asyncio.create_task(guard(self.work, self.heart),
                                                  name="chiffon-owner"))  # fmt: skip

    async def until(self, stopping: asyncio.Event) -> None:
        """Until the heartbeat loop ends or `stopping` is set."""
        assert self._beating is not None, "start() first"
        waiting = asyncio.create_task(stopping.wait())
        await asyncio.wait([self._beating, waiting], return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()

    async def stop(self, *, goodbye_timeout_seconds: float | None = None) -> None:
        """Orders stop, jobs end and say so, then the goodbye (waited for at most
        `goodbye_timeout_seconds`; it is best effort: the sweep judges an agent that did
        not say it)."""
        try:
            for task in self._jobs:
                task.cancel()
            await self.work.stop()
            self.heart.stop()
            tasks = [t for t in (self._beating, self._recovering, *self._jobs) if t is not None]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True),
                                       goodbye_timeout_seconds)  # fmt: skip
        finally:
            self._collector.close()


def install_signal_handlers(stop: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop)
        except (NotImplementedError, RuntimeError):  # Windows: no add_signal_handler
            signal.signal(sig, lambda *_: loop.call_soon_threadsafe(stop))


async def run_agent(
    settings: AgentSettings,
    identity: AgentIdentity,
    credential: AgentCredential,
    *,
    handle_signals: bool = True,
    stopping: asyncio.Event | None = None,
) -> None:
    """`chiffon agent`: heartbeats over the settings' transport, reports and output over
    HTTP, until SIGTERM or SIGINT (or `stopping` is set)."""
    from chiffon.transport.factory import make_publisher
    from chiffon.transport.http import HttpWork

    collector = new_collector(settings)
    publisher = make_publisher(
        settings.transport,
        amqp_url=settings.amqp_url,
        orchestrator_url=settings.orchestrator_url,
        timeout_seconds=settings.publish_timeout_seconds,
        credential=credential,
        message_ttl_seconds=settings.heartbeat_timeout_seconds,
    )
    # Reports and output go over HTTP whatever carries the heartbeats (enrollment does too).
    channel = HttpWork(
        settings.orchestrator_url, credential, timeout_seconds=settings.publish_timeout_seconds
    )
    orders = http_and_amqp(settings, credential, channel)
    daemon = Daemon(settings, identity, credential, publisher=publisher, channel=channel,
                    collector=collector, orders=orders)  # fmt: skip
    stopping = stopping or asyncio.Event()
    if handle_signals:
        install_signal_handlers(stopping.set)
    daemon.start()
    try:
        await daemon.until(stopping)
    finally:
        try:
            await daemon.stop()
        finally:
            await channel.aclose()
