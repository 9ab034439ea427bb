"""`chiffon probe` and `chiffon agent`: the desktop side.

Only the agent's own modules are imported here (lazily, inside the commands): never the
orchestrator, persistence, FastAPI or SQLAlchemy.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.table import Table
from rich.text import Text

from chiffon.cli.common import (
    DEBUG_HELP,
    CliError,
    console,
    err_console,
    plain,
    setup_logging,
)
from chiffon.schemas.limits import clean_text

if TYPE_CHECKING:
    from chiffon.agent.loop import AgentIdentity
    from chiffon.agent.report import GpuReading, Snapshot
    from chiffon.agent.settings import AgentSettings, LoadedSettings
    from chiffon.transport.auth import AgentCredential

CONFIG_OPTION = typer.Option(
    None, "--config", help="YAML file [~/.chiffon/agent.yml, else /etc/chiffon/agent.yml]."
)
GPU_TIMEOUT_OPTION = typer.Option(
    None, "--gpu-timeout", help="Seconds each GPU backend may take [5]; env CHIFFON_GPU_TIMEOUT."
)


def load(config: Path | None, flags: dict[str, Any]) -> LoadedSettings:
    """Settings from every layer; a bad value is one line and exit status 2."""
    from chiffon.agent.settings import SettingsError, load_settings

    try:
        return load_settings(config=config, flags=flags)
    except SettingsError as exc:
        raise CliError(str(exc), code=2) from None


def _num(value: float | int | None, fmt: str = "{:.1f}") -> str:
    return "?" if value is None else fmt.format(value)


def _idle(seconds: float | None, unknown_because: str | None) -> str:
    if seconds is None:
        return "unknown" + (f" ({unknown_because})" if unknown_because else "")
    if seconds < 1:
        return "in use now"
    return f"idle {seconds / 60:.0f} min" if seconds >= 90 else f"idle {seconds:.0f} s"


def _foreign(g: GpuReading) -> str:
    if g.foreign_processes is None:
        return "other programs on it: unknown (the driver does not list them)"
    names = f" ({', '.join(g.foreign_names)})" if g.foreign_names else ""
    return f"other programs on it: {g.foreign_processes}{names}, {_num(g.foreign_vram_gb)} GB"


def _decision(withheld: str | None) -> str:
    from chiffon.agent.owner import SAID

    return "jobs welcome" if withheld is None else f"no new jobs: {SAID[withheld]}"


def _sandbox(said: dict[str, Any]) -> str:
    """`cgroup+mem+home+dev`, or what is missing and why; and whether its owner requires
    it (then jobs are refused here unless it is full)."""
    from chiffon.schemas.sandbox import explained, is_full

    line = explained(said)
    if said.get("required"):
        line += "; required: " + ("jobs run" if is_full(said) else "jobs are refused")
    return line


def resources_table(res: Snapshot, owner_unknown_because: str | None = None) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False, show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    loads = (res.cpu_load_1min, res.cpu_load_5min, res.cpu_load_15min)
    table.add_row("CPU load 1/5/15", " / ".join(_num(x, "{:.2f}") for x in loads))
    table.add_row(
        "CPU cores",
        f"{_num(res.cpu_cores_available, '{}')} free of {_num(res.cpu_cores_physical, '{}')}"
        f" physical ({_num(res.cpu_cores_logical, '{}')} logical)",
    )
    table.add_row(
        "Memory",
        f"{_num(res.memory_available_gb)} GB free of {_num(res.memory_total_gb)} GB "
        f"({_num(res.memory_percent)}% used)",
    )
    table.add_row(
        "GPUs",
        f"{res.gpu_count} ({res.gpu_type}), {_num(res.gpu_vram_available_gb)} GB free of "
        f"{_num(res.gpu_vram_total_gb)} GB, best single GPU "
        f"{_num(res.gpu_vram_available_max_gb)} GB"
        if res.gpus
        else "none found" + (" (a GPU probe failed, below)" if res.probe_errors else ""),
    )
    for g in res.gpus:
        table.add_row(
            f"  {g.vendor} #{g.index}",
            plain(
                f"{g.name or '?'}: {_num(g.vram_free_gb)}/{_num(g.vram_total_gb)} GB free, "
                f"{_num(g.utilization_percent, '{:.0f}')}% busy, "
                f"{_num(g.temperature_c, '{:.0f}')} °C  {g.uuid or ''}"
            ),
        )
        table.add_row("", plain(f"{_foreign(g)}; {_decision(g.withheld)}"))
    for name, error in res.probe_errors.items():
        table.add_row(Text(f"probe {clean_text(name)}", style="red"), plain(error))
    table.add_row("Owner", plain(_idle(res.owner_idle_seconds, owner_unknown_because)))
    table.add_row("New jobs", plain(_decision(res.jobs_withheld)))
    if res.sandbox is not None:  # set by whoever checked the sandbox (the daemon's reading)
        table.add_row("Sandbox", plain(_sandbox(res.sandbox)))
    table.add_row("Collected in", f"{_num(res.collection_ms, '{:.2f}')} ms")
    return table


def probe(
    as_json: bool = typer.Option(False, "--json", help="The `resources` object of a heartbeat."),
    gpu_timeout: float = GPU_TIMEOUT_OPTION,
    config: Path = CONFIG_OPTION,
) -> None:
    """One snapshot of this machine: CPU, memory and every GPU the agent can see."""
    from chiffon.agent.daemon import decided, new_collector

    settings = load(config, {"gpu_detection_timeout_seconds": gpu_timeout}).settings
    collector = new_collector(settings)
    try:
        res = decided(settings, collector.collect())
    finally:
        collector.close()
    if as_json:
        typer.echo(json.dumps(res.as_json(), indent=2))
    else:
        console.print(resources_table(res, collector.owner_idle_unknown_because))


def identity_of(settings: AgentSettings) -> AgentIdentity:
    from chiffon.agent import daemon
    from chiffon.agent.identity import IdentityError

    try:
        return daemon.identity_of(settings)
    except IdentityError as exc:
        raise CliError(str(exc), code=2) from None


def print_config(loaded: LoadedSettings) -> None:
    from chiffon.agent.identity import ID_FILE

    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("SETTING", "VALUE", "FROM"):
        table.add_column(column)
    settings = loaded.settings
    for key, value in settings.as_json().items():
        origin = loaded.origins[key]
        if key == "agent_id" and value is None:
            value, origin = "(kept in the state directory)", str(settings.state_dir / ID_FILE)
        table.add_row(key, json.dumps(value) if not isinstance(value, str) else value, origin)
    console.print(f"config file: {loaded.config_file or 'none found'}")
    console.print(table)


async def obtain_credential(settings: AgentSettings, identity: AgentIdentity) -> AgentCredential:
    """The secret kept in the state directory, else one got by enrolling (and kept, 0600)."""
    from chiffon.agent.identity import IdentityError, load_secret, store_secret
    from chiffon.transport.auth import AgentCredential

    try:
        secret = load_secret(settings.state_dir)
    except IdentityError as exc:
        raise CliError(str(exc), code=2) from None
    if secret is not None:
        if settings.enroll_token is not None:
            console.print(
                "already enrolled: the enrollment token is not needed any more (remove it from "
                "this agent's command line, environment or config)",
                highlight=False,
            )
        return AgentCredential(identity.agent_id, secret)
    if settings.enroll_token is None or not settings.enroll_token.get_secret_value():
        raise CliError(
            f"this agent has no credential yet: give it the orchestrator's enrollment token "
            f"once (CHIFFON_ENROLL_TOKEN_FILE, CHIFFON_ENROLL_TOKEN or --enroll-token); it "
            f"keeps its own secret in "
            f"{settings.state_dir}",
            code=2,
        )
    credential = await _enroll(settings, identity)
    try:
        path = store_secret(settings.state_dir, credential.secret)
    except IdentityError as exc:
        raise CliError(str(exc), code=2) from None
    console.print(f"enrolled; the agent's secret is kept in {path} (mode 0600)", highlight=False)
    if not credential.approved:
        console.print(
            f"pending: this desktop takes no jobs until an admin runs `chiffon agents approve "
            f"{identity.agent_id}`",
            highlight=False,
        )
    return credential


async def _enroll(settings: AgentSettings, identity: AgentIdentity) -> AgentCredential:
    """Enroll over HTTP (the agent package retries while the orchestrator is unreachable)."""
    from chiffon.agent.enroll import enroll_with_retries
    from chiffon.transport.base import TransportError
    from chiffon.transport.http import EnrollmentRefusedError

    assert settings.enroll_token is not None
    try:
        return await enroll_with_retries(
            settings.orchestrator_url,
            token=settings.enroll_token.get_secret_value(),
            agent_id=identity.agent_id,
            timeout_seconds=settings.publish_timeout_seconds,
        )
    except EnrollmentRefusedError as exc:
        raise CliError(str(exc)) from None
    except TransportError as exc:
        raise CliError(f"cannot enroll: {exc}") from None


async def run_agent(settings: AgentSettings, identity: AgentIdentity) -> None:
    from chiffon.agent import daemon

    credential = await obtain_credential(settings, identity)
    await daemon.run_agent(settings, identity, credential)


def agent(
    config: Path = CONFIG_OPTION,
    transport: str = typer.Option(None, help="http or amqp [http]; env CHIFFON_TRANSPORT."),
    orchestrator_url: str = typer.Option(
        None, help="For --transport http [http://127.0.0.1:8700]; env CHIFFON_ORCHESTRATOR_URL."
    ),
    amqp_url: str = typer.Option(
        None, help="For --transport amqp; env CHIFFON_AMQP_URL, or CHIFFON_AMQP_URL_FILE."
    ),
    interval: float = typer.Option(
        None, "--interval", help="Seconds between heartbeats [15]; env CHIFFON_HEARTBEAT_INTERVAL."
    ),
    gpu_timeout: float = GPU_TIMEOUT_OPTION,
    pool: str = typer.Option(None, "--pool", help="Pool name; env CHIFFON_POOL_NAME."),
    name: str = typer.Option(None, "--name", help="Shown name [hostname-<id prefix>]."),
    state_dir: Path = typer.Option(
        None, help="Where the agent id and secret are kept [~/.chiffon]."
    ),
    enroll_token: str = typer.Option(
        None,
        "--enroll-token",
        help="The orchestrator's enrollment token, needed once; env CHIFFON_ENROLL_TOKEN, or "
        "CHIFFON_ENROLL_TOKEN_FILE (a flag is visible to other local users in ps).",
    ),
    label: list[str] = typer.Option(None, "--label", help="key=value; repeatable."),
    accept_jobs: bool = typer.Option(
        None,
        "--accept-jobs",
        help="Run jobs submitted to the orchestrator on this desktop, as this user [off]; "
        "env CHIFFON_ACCEPT_JOBS=never|when_idle|always (when_idle: only while its owner is "
        "away, docs/owner.md).",
        show_default=False,
    ),
    allow_root_jobs: bool = typer.Option(
        None,
        "--allow-root-jobs",
        help="Run jobs though the agent runs as root, as the unprivileged job_user "
        "(chiffon-job) [off]; env CHIFFON_ALLOW_ROOT_JOBS.",
        show_default=False,
    ),
    show_config: bool = typer.Option(
        False, "--print-config", help="Show the effective settings and where each came from."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
    debug: bool = typer.Option(False, "--debug", help=DEBUG_HELP),
) -> None:
    """Run the agent: a heartbeat at start (registration), then every interval; with
    --accept-jobs it also runs jobs."""
    from chiffon.agent.settings import SettingsError, parse_labels

    try:
        labels = parse_labels(label, "flag --label") if label else None
    except SettingsError as exc:
        raise CliError(str(exc), code=2) from None
    flags = {
        "transport": transport,
        "orchestrator_url": orchestrator_url,
        "amqp_url": amqp_url,
        "heartbeat_interval_seconds": interval,
        "gpu_detection_timeout_seconds": gpu_timeout,
        "agent_pool_name": pool,
        "name": name,
        "state_dir": state_dir,
        "labels": labels,
        "enroll_token": enroll_token,
        "accept_jobs": accept_jobs or None,
        "allow_root_jobs": allow_root_jobs or None,
    }
    loaded = load(config, flags)
    if show_config:
        print_config(loaded)
        return
    setup_logging(verbose, debug=debug or None)
    _warn_secrets_in_argv(enroll_token, amqp_url)
    settings = loaded.settings
    identity = identity_of(settings)
    _say_start(settings, identity)
    asyncio.run(run_agent(settings, identity))


def _say_start(settings: AgentSettings, identity: AgentIdentity) -> None:
    where = settings.orchestrator_url if settings.transport == "http" else "RabbitMQ"
    console.print(
        f"Chiffon agent {identity.name} ({identity.agent_id}) -> {where} "
        f"every {settings.heartbeat_interval_seconds:g} s",
        highlight=False,
    )
    if identity.accepts_jobs:
        when = (
            f" while its owner is away (no input for {settings.idle_minutes:g} min)"
            if settings.accept_jobs == "when_idle"
            else ""
        )
        console.print(
            f"accepting jobs{when}: they run as {job_user(settings)}, each in its sandbox, in "
            f"{settings.effective_jobs_dir}",
            highlight=False,
        )
    elif settings.accept_jobs != "never":
        err_console.print(
            "warning: not accepting jobs: the agent runs as root (add --allow-root-jobs to "
            f"run them as the unprivileged user {settings.job_user})",
            highlight=False,
        )


def _warn_secrets_in_argv(enroll_token: str | None, amqp_url: str | None) -> None:
    from urllib.parse import urlsplit

    given = [
        name
        for name, secret in (
            ("--enroll-token", enroll_token),
            ("--amqp-url with a password", amqp_url and urlsplit(amqp_url).password),
        )
        if secret
    ]
    if given:
        err_console.print(
            f"warning: {' and '.join(given)} on the command line can be read by every local "
            "user (ps) for as long as the agent runs; use CHIFFON_ENROLL_TOKEN_FILE and "
            "CHIFFON_AMQP_URL_FILE (or their plain variables) instead",
            highlight=False,
        )


def register(app: typer.Typer) -> None:
    app.command()(probe)
    app.command()(agent)


def job_user(settings: AgentSettings) -> str:
    """Who jobs run as, in words: the agent's own user, or, for a root agent, its
    unprivileged `job_user`."""
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    return f"the unprivileged user {settings.job_user}" if root else "this user"
