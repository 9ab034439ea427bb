"""`chiffon simulate`: load-test a deployment with a fleet of virtual agents."""

from __future__ import annotations

import asyncio
import signal
from typing import TYPE_CHECKING

import typer

from chiffon.cli.common import CliError, console, setup_logging
from chiffon.transport.base import TransportError

if TYPE_CHECKING:
    from chiffon.agent.simulate import OfflineMode, SimulationReport
    from chiffon.agent.simwork import JobPlan

TRANSPORTS = ("http", "amqp")
OFFLINE_MODES = ("silent", "goodbye")


def check_args(
    agents: int, interval: float, transport: str, duration: float | None, fraction: float, mode: str
) -> None:
    """One line and exit status 2 for anything that cannot be simulated."""
    problems = [
        (agents < 1, f"--agents must be at least 1, not {agents}"),
        (not interval > 0, f"--interval must be greater than 0, not {interval:g}"),
        (transport not in TRANSPORTS, f"--transport must be http or amqp, not {transport!r}"),
        (duration is not None and not duration > 0, f"--duration must be > 0, not {duration}"),
        (not 0 <= fraction <= 1, f"--offline-fraction must be in 0..1, not {fraction:g}"),
        (fraction > 0 and duration is None, "--offline-fraction needs --duration (halfway)"),
        (mode not in OFFLINE_MODES, f"--offline-mode must be silent or goodbye, not {mode!r}"),
    ]
    for bad, message in problems:
        if bad:
            raise CliError(message, code=2)


def job_seconds(text: str) -> tuple[float, float]:
    """`--job-seconds`: "3" or "1-5" (uniform); one line and exit 2 when it is neither."""
    low, _, high = text.partition("-")
    try:
        span = (float(low), float(high or low))
    except ValueError:
        span = (-1.0, -1.0)
    if not (0 <= span[0] <= span[1] < 1e6):
        raise CliError(f"--job-seconds must be seconds (3) or a range (1-5), not {text!r}", code=2)
    return span


async def run_simulation(
    *,
    agents: int,
    interval: float,
    transport: str,
    duration: float | None,
    offline_fraction: float,
    offline_mode: OfflineMode,
    seed: int,
    orchestrator_url: str,
    amqp_url: str,
    publish_timeout_seconds: float,
    enroll_token: str | None,
    plan: JobPlan | None = None,
) -> SimulationReport:
    from chiffon.agent.simulate import EnrollmentError, Simulation, enroll_fleet, make_fleet
    from chiffon.agent.simwork import SimulatedWork
    from chiffon.cli.client import data_dir
    from chiffon.transport.factory import make_publisher

    fleet = make_fleet(agents, seed=seed, accept_jobs=plan is not None)
    try:
        credentials = await enroll_fleet(
            fleet,
            path=data_dir() / "simulate" / f"seed-{seed}.json",
            orchestrator_url=orchestrator_url,
            token=enroll_token,
            timeout_seconds=publish_timeout_seconds,
        )
    except EnrollmentError as exc:
        raise CliError(str(exc)) from None
    # One shared publisher (one AMQP connection, or one pooled HTTP client) for the fleet.
    publisher = make_publisher(
        transport,
        amqp_url=amqp_url,
        orchestrator_url=orchestrator_url,
        timeout_seconds=publish_timeout_seconds,
        credential=credentials,
        message_ttl_seconds=3 * interval,  # an agent's default timeout: three missed beats
    )
    work = None
    if plan is not None:
        work = SimulatedWork(fleet, credentials, orchestrator_url=orchestrator_url,
                             amqp_url=amqp_url, plan=plan, seed=seed,
                             timeout_seconds=publish_timeout_seconds)  # fmt: skip
    sim = Simulation(
        fleet,
        publisher,
        interval_seconds=interval,
        duration_seconds=duration,
        offline_fraction=offline_fraction,
        offline_mode=offline_mode,
        work=work,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, sim.stop)
    try:
        return await sim.run()
    except TransportError as exc:
        raise CliError(str(exc)) from None


def print_report(report: SimulationReport) -> None:
    console.print(
        f"sent {report.sent} heartbeats from {report.agents} agents in "
        f"{report.elapsed_seconds:.1f} s: {report.achieved_rate:,.1f}/s "
        f"(target {report.target_rate:,.1f}/s), {report.failed} failed",
        highlight=False,
    )
    if report.stopped_agents:
        console.print(
            f"{report.stopped_agents} agents stopped midway"
            + (f", {report.goodbyes} with a goodbye" if report.goodbyes else ", silently"),
            highlight=False,
        )
    for reason, count in sorted(report.errors.items(), key=lambda kv: -kv[1]):
        console.print(f"  {count} x {reason}", highlight=False)
    if report.jobs:
        said = ", ".join(f"{n} {what}" for what, n in report.jobs.items())
        console.print(f"simulated attempts: {said}", highlight=False)


def simulate(
    agents: int = typer.Option(..., "--agents", help="Number of virtual agents."),
    interval: float = typer.Option(15.0, "--interval", help="Seconds between an agent's beats."),
    transport: str = typer.Option("http", "--transport", help="http or amqp."),
    duration: float = typer.Option(None, "--duration", help="Seconds to run [until Ctrl-C]."),
    offline_fraction: float = typer.Option(
        0.0, "--offline-fraction", help="Share of agents that stop halfway through the run."
    ),
    offline_mode: str = typer.Option(
        "silent", "--offline-mode", help="How they stop: silent (like a kill) or goodbye."
    ),
    seed: int = typer.Option(0, "--seed", help="Same seed, same agent ids and hardware."),
    orchestrator_url: str = typer.Option(
        "http://127.0.0.1:8700", envvar="CHIFFON_ORCHESTRATOR_URL", help="For --transport http."
    ),
    amqp_url: str = typer.Option(
        "amqp://guest:guest@127.0.0.1:5672/",
        envvar="CHIFFON_AMQP_URL",
        help="For --transport amqp.",
    ),
    timeout: float = typer.Option(5.0, "--timeout", help="Seconds one publish may take."),
    enroll_token: str = typer.Option(
        None,
        "--enroll-token",
        help="Enrolls agents this seed has not enrolled yet [env CHIFFON_ENROLL_TOKEN, "
        "else the orchestrator's data dir]; their secrets are kept for the next run.",
    ),
    accept_jobs: bool = typer.Option(
        False,
        "--accept-jobs",
        help="The agents take jobs and run them as simulated attempts "
        "(their orders come from the broker at --amqp-url; the orchestrator must push them there).",
    ),
    seconds: str = typer.Option(
        "1-5",
        "--job-seconds",
        help="How long an attempt runs: 3, or 1-5 (uniform), unless "
        "the job sets SIMULATE_SECONDS in its env (and SIMULATE_EXIT, its exit code).",
    ),
    die_fraction: float = typer.Option(
        0.0,
        "--die-fraction",
        help="Share of attempts whose agent dies midway (silently).",
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> int:
    """Run N virtual agents in this process against a real orchestrator (a load test)."""
    from chiffon.agent.simwork import JobPlan
    from chiffon.cli.client import local_secret

    check_args(agents, interval, transport, duration, offline_fraction, offline_mode)
    if not 0 <= die_fraction <= 1:
        raise CliError(f"--die-fraction must be in 0..1, not {die_fraction:g}", code=2)
    plan = JobPlan(job_seconds(seconds), die_fraction) if accept_jobs else None
    setup_logging(verbose)
    console.print(
        f"simulating {agents} agents every {interval:g} s over {transport} "
        f"({agents / interval:,.1f} heartbeats/s)",
        highlight=False,
    )
    report = asyncio.run(
        run_simulation(
            agents=agents,
            interval=interval,
            transport=transport,
            duration=duration,
            offline_fraction=offline_fraction,
            offline_mode=offline_mode,  # type: ignore[arg-type]  # checked above
            seed=seed,
            orchestrator_url=orchestrator_url,
            amqp_url=amqp_url,
            publish_timeout_seconds=timeout,
            enroll_token=enroll_token or local_secret("CHIFFON_ENROLL_TOKEN", "enroll_token"),
            plan=plan,
        )
    )
    print_report(report)
    return 1 if report.sent == 0 else 0


def register(app: typer.Typer) -> None:
    app.command()(simulate)
