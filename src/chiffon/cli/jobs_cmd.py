"""Jobs from the command line, as `srun`, `squeue` and `docker run` users expect:
`chiffon run`, `chiffon jobs` (list, show, cancel), `chiffon logs` and `chiffon get` (a
job's outputs). All through `chiffon.client`.

`chiffon run` sends the current folder as the job's snapshot (cli/sync.py) unless
`--no-sync` or `--workdir`, and brings back what its `--out` patterns name into
`./chiffon-out/<job id>/` when it ends.

`chiffon run` writes the job's own output to stdout and its own words to stderr, so a
pipe gets only the job's output; it exits with the job's exit status.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import signal
import sys
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from rich.table import Table
from rich.text import Text

from chiffon.cli.common import EXIT_FAILED, EXIT_USAGE, CliError, console, err_console, plain
from chiffon.schemas.dispatch import JOB_STATES, is_active, is_out

if TYPE_CHECKING:
    from chiffon.cli.sync import Snapshot
    from chiffon.client import Client, LogCursor, Signals
    from chiffon.schemas.jobs import (
        FileSet,
        JobAccepted,
        JobAttempt,
        JobDetail,
        JobFiles,
        JobLog,
        JobView,
    )

RAW_OPTION = typer.Option(
    False, "--raw", help="Write the job's output as it is, control sequences included."
)

URL_OPTION = typer.Option(
    None,
    "--orchestrator-url",
    help="Default: env CHIFFON_ORCHESTRATOR_URL or http://127.0.0.1:8700.",
)
# `chiffon run`'s exit status when the job has none of its own (README, "Exit status").
EXIT_CANCELLED = 130  # as a shell reports a command ended by Ctrl-C
EXIT_TIMED_OUT = 124  # as timeout(1)
EXIT_LOST = 1
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
T = TypeVar("T")
# Where `run` and `get` put a job's outputs, ./chiffon-out/<id>: never sent (cli/sync.py).
OUT_FOLDER = Path("chiffon-out")
# A job's outputs are saved by its desktop as its attempt ends: a moment to land in the
# store after the job reads as ended.
OUTPUTS_WAIT_SECONDS = 3.0
CHECKPOINT_MIN_SECONDS = 10  # as JobSubmit's checkpoint_every_seconds allows

jobs_app = typer.Typer(help="List jobs (default), show one, or cancel one.", no_args_is_help=False)


def parse_duration(text: str, option: str) -> float:
    """`90`, `90s`, `30m`, `2h`, `1d` in seconds; a usage error otherwise."""
    match = _DURATION.match(text)
    if not match or float(match.group(1)) <= 0:
        raise CliError(f"{option} wants a duration such as 90s, 30m or 2h, not {text!r}",
                       code=EXIT_USAGE)  # fmt: skip
    return float(match.group(1)) * _UNIT[match.group(2)]


def _pairs(items: list[str] | None, option: str) -> dict[str, str]:
    found = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"{option} wants KEY=VALUE, not {item!r}", code=EXIT_USAGE)
        found[key] = value
    return found


def client(url: str | None) -> AbstractContextManager[Client]:
    """The one client every command uses: its errors are one line (cli.client.connect)."""
    from chiffon.cli.client import connect

    return connect(url)


def resolve(c: Client, ref: str) -> uuid.UUID:
    """A job id from its UUID or a unique prefix of it (as `chiffon jobs` shows)."""
    try:
        return uuid.UUID(ref)
    except ValueError:
        pass
    hits = [j.job_id for j in c.jobs(limit=10_000) if str(j.job_id).startswith(ref.lower())]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise CliError(f"no job has the id or id prefix {ref!r}", code=EXIT_USAGE)
    raise CliError(f"{ref!r} matches {len(hits)} jobs; give more of the id", code=EXIT_USAGE)


def say(message: str) -> None:
    """Chiffon's own words during `run`: on stderr, the job's output owns stdout."""
    line = Text.assemble(("chiffon: ", "dim"), plain(message))
    with contextlib.suppress(OSError):  # the terminal may be gone (SIGHUP)
        err_console.print(line, highlight=False, soft_wrap=True)


def where(job: JobDetail | JobView) -> str:
    name = job.agent_name or (str(job.agent_id)[:8] if job.agent_id else "?")
    return name + (f" (GPUs {', '.join(job.gpu_uuids)})" if job.gpu_uuids else "")


def exit_status(job: JobView) -> int:
    if job.state == "succeeded":
        return 0
    if job.state == "failed":
        return job.exit_code if job.exit_code else EXIT_FAILED
    return {"cancelled": EXIT_CANCELLED, "timed_out": EXIT_TIMED_OUT}.get(job.state, EXIT_LOST)


def run(
    command: list[str] = typer.Argument(..., help="The program and its arguments, after --."),
    gpus: int = typer.Option(None, "--gpus", min=0, help="GPUs [0; 1 with --vram]."),
    vram: float = typer.Option(0.0, "--vram", min=0, help="GB of free VRAM on each GPU."),
    cores: float = typer.Option(0.0, "--cores", min=0, help="CPU cores."),
    memory: float = typer.Option(0.0, "--memory", min=0, help="GB of memory."),
    pool: str = typer.Option(None, "--pool", help="Only agents in this pool."),
    label: list[str] = typer.Option(None, "--label", help="KEY=VALUE the agent has; repeatable."),
    gpu_vendor: str = typer.Option(None, "--gpu-vendor", help="nvidia, amd, intel or apple."),
    require_sandbox: bool = typer.Option(
        False,
        "--require-sandbox",
        help="Only a desktop whose job sandbox is full: processes contained, memory capped, "
        "the owner's home hidden.",
    ),
    timeout: str = typer.Option(None, "--timeout", help="End it after this long: 90s, 30m, 2h."),
    retries: int = typer.Option(0, "--retries", min=0, help="Times to run it again if lost."),
    retry_on_exit: bool = typer.Option(
        False, "--retry-on-exit", help="Also retry when it exits non-zero."
    ),
    name: str = typer.Option(None, "--name", help="A name to find it by."),
    env: list[str] = typer.Option(None, "--env", "-e", help="KEY=VALUE; repeatable."),
    workdir: str = typer.Option(
        None, "--workdir", help="Absolute directory on the desktop (implies --no-sync)."
    ),
    no_sync: bool = typer.Option(
        False, "--no-sync", help="Send no snapshot of this folder: the job runs in a fresh one."
    ),
    sync_max_mb: float = typer.Option(
        None, "--sync-max-mb", help="Send at most this many MB [500]; env CHIFFON_SYNC_MAX_MB."
    ),
    out_globs: list[str] = typer.Option(
        None,
        "--out",
        help="A glob in the job's folder to bring back into ./chiffon-out/<job id>/ when it "
        "ends ('results/**', model.pt); repeatable.",
    ),
    checkpoint_every: str = typer.Option(
        None,
        "--checkpoint-every",
        help="Save CHIFFON_CHECKPOINT_DIR this often while it runs (10m); it is always saved "
        "when an attempt ends.",
    ),
    python_env: bool = typer.Option(
        False,
        "--python-env",
        help="Build the snapshot's uv.lock or requirements.txt into a cached environment on "
        "the desktop and run the job in it.",
    ),
    spread: bool = typer.Option(
        False, "--spread", help="The most free VRAM first (default: the best fit)."
    ),
    detach: bool = typer.Option(False, "--detach", "-d", help="Print the job id and return."),
    raw: bool = RAW_OPTION,
    url: str = URL_OPTION,
) -> None:
    """Run a command once on a desktop with room for it; follow its output to its exit.
    Ctrl-C, SIGTERM or SIGHUP (the terminal closed) cancels the job, as with srun. The
    current folder is sent with it (less what .gitignore and .chiffonignore name), and
    what --out names comes back into ./chiffon-out/<job id>/.

    Example: chiffon run --gpus 1 --vram 8 --out 'results/**' -- python train.py --epochs 3
    """
    from chiffon.client import Interrupted, interruptible

    outputs = _out_patterns(out_globs)
    every = _checkpoint_every(checkpoint_every) if checkpoint_every else None
    snap = None if no_sync or workdir else _snapshot(sync_max_mb)
    spec: dict[str, Any] = {
        "gpus": gpus, "vram_gb": vram, "cpu_cores": cores, "memory_gb": memory, "pool": pool,
        "labels": _pairs(label, "--label"), "gpu_vendor": gpu_vendor, "name": name,
        "require_sandbox": require_sandbox,
        "env": _pairs(env, "--env"), "workdir": workdir, "retries": retries,
        "retry_on_exit": retry_on_exit, "policy": "spread" if spread else "best_fit",
        "timeout_seconds": parse_duration(timeout, "--timeout") if timeout else None,
        "outputs": outputs, "checkpoint_every_seconds": every, "python_env": python_env,
    }  # fmt: skip
    with client(url) as c:
        _checked(lambda: c.submission(command, **spec))  # a bad flag sends nothing
        with interruptible() as signals:
            if snap is not None:
                spec["snapshot"] = _send(c, snap)
            accepted, signum = _submit_shielded(c, command, spec, signals)
            job = accepted.job
            if accepted.warning:
                err_console.print(f"warning: {accepted.warning}", highlight=False, style="yellow")
            if detach and not signum:
                typer.echo(job.job_id)
                return
            say(f"job {job.job_id} queued")
            out = Output(c, job.job_id, raw=raw)
            try:
                if signum:
                    raise Interrupted(signum)
                final = follow(c, job.job_id, out, signals)
            except Interrupted as exc:
                final = _cancel(c, job.job_id, exc.signum, out, signals)
        if final.state != "succeeded":
            why = "" if final.reason in ("", final.state) else f": {final.reason}"
            say(f"job {final.job_id} {final.state}{why}")
        fetched = _bring_back(c, final.job_id) if outputs else True
    raise typer.Exit(exit_status(final) or (0 if fetched else EXIT_FAILED))


def _out_patterns(patterns: list[str] | None) -> list[str]:
    """The --out globs, each checked: one that could leave the job's folder is refused."""
    from chiffon.schemas.files import OUT_PATTERNS_MAX, ManifestError, check_out_pattern

    found = list(patterns or ())
    if len(found) > OUT_PATTERNS_MAX:
        raise CliError(f"--out: at most {OUT_PATTERNS_MAX} patterns, not {len(found)}",
                       code=EXIT_USAGE)  # fmt: skip
    for pattern in found:
        try:
            check_out_pattern(pattern)
        except ManifestError as exc:
            raise CliError(str(exc), code=EXIT_USAGE) from None
    return found


def _checkpoint_every(text: str) -> float:
    seconds = parse_duration(text, "--checkpoint-every")
    if seconds < CHECKPOINT_MIN_SECONDS:
        raise CliError(f"--checkpoint-every must be at least {CHECKPOINT_MIN_SECONDS}s, not "
                       f"{text!r}", code=EXIT_USAGE)  # fmt: skip
    return seconds


def _snapshot(max_mb: float | None) -> Snapshot:
    """The current folder as the job's snapshot (cli/sync.py)."""
    from chiffon.cli.sync import SyncSettings, snapshot

    return snapshot(Path.cwd(), max_bytes=SyncSettings.build(max_mb).max_bytes)


def _send(c: Client, snap: Snapshot) -> str:
    """Upload what the store lacks of the snapshot; a signal meanwhile ends `run` (nothing
    was submitted yet)."""
    from chiffon.cli.sync import send
    from chiffon.client import Interrupted

    try:
        return send(c, snap, say)
    except Interrupted as exc:
        say("stopped sending; no job was submitted")
        raise typer.Exit(128 + exc.signum) from None


def _bring_back(c: Client, job_id: uuid.UUID) -> bool:
    """Fetch the ended job's outputs into ./chiffon-out/<job id>/, saying where and how
    much in one line; whether that went well (a failure is said, `chiffon get` retries)."""
    from chiffon.cli.sync import fetch, outputs_of
    from chiffon.client import ChiffonError

    later = f"`chiffon get {job_id}` fetches them later"
    try:
        saved = outputs_of(c, job_id)
        deadline = time.monotonic() + OUTPUTS_WAIT_SECONDS
        while saved is None and time.monotonic() < deadline:
            time.sleep(0.2)
            saved = outputs_of(c, job_id)
        if saved is None:
            say("no outputs were saved: nothing matched --out, or its desktop could not save them")
            return True
        say(fetch(c, saved.manifest, OUT_FOLDER / str(job_id)).line())
        return True
    except (ChiffonError, CliError) as exc:
        say(f"fetching its outputs failed: {exc}; {later}")
    except KeyboardInterrupt:
        say(f"stopped fetching its outputs; {later}")
    return False


def _submit_shielded(
    c: Client, command: list[str], spec: dict[str, Any], signals: Signals
) -> tuple[JobAccepted, int]:
    """Submit; a signal meanwhile waits for the job's id (so it can be cancelled) and is
    returned with it (0: none)."""
    from chiffon.client import Interrupted

    accepted = None
    try:
        with signals.shield():
            accepted = _submit(c, command, spec)
    except Interrupted as exc:
        if accepted is None:  # not submitted
            raise typer.Exit(128 + exc.signum) from None
        return accepted, exc.signum
    return accepted, 0


def _cancel(c: Client, job_id: uuid.UUID, signum: int, out: Output, signals: Signals) -> JobDetail:
    """Cancel the job on a signal, as srun does (more signals are held meanwhile). After
    Ctrl-C, go on showing its output until it has ended (a second Ctrl-C stops showing
    it; the cancel stands); after SIGTERM or SIGHUP (the terminal is gone), exit at once
    with 128 + the signal."""
    from chiffon.client import Interrupted

    name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    say(f"{name}: cancelling job {job_id} (it gets its grace period to end)")
    c.cancel(job_id)
    if (later := signals.rearm()) not in (0, signal.SIGINT):  # SIGTERM, SIGHUP outrank it
        signum = later
    if signum != signal.SIGINT:
        raise typer.Exit(128 + signum)
    try:
        return follow(c, job_id, out, signals)
    except Interrupted:
        say(f"stopped showing job {job_id}; it is cancelled and ends within its grace period")
        raise typer.Exit(EXIT_CANCELLED) from None


# The command line's words for the fields of a job (a refusal names the flag to fix).
_FLAGS = {
    "workdir": "--workdir", "timeout_seconds": "--timeout", "name": "--name", "env": "--env",
    "command": "the command", "retries": "--retries", "requirements.gpus": "--gpus",
    "requirements.vram_gb": "--vram", "requirements.cpu_cores": "--cores",
    "requirements.memory_gb": "--memory", "requirements.pool": "--pool",
    "requirements.labels": "--label", "requirements.gpu_vendor": "--gpu-vendor",
    "requirements.require_sandbox": "--require-sandbox", "outputs": "--out",
    "checkpoint_every_seconds": "--checkpoint-every", "python_env": "--python-env",
    "snapshot": "the snapshot",
}  # fmt: skip


def _submit(c: Client, command: list[str], spec: dict[str, Any]) -> JobAccepted:
    return _checked(lambda: c.submit(command, **spec))


def _checked(submit: Callable[[], T]) -> T:
    """`submit()`, its refusal said as a flag's: it is checked here before it is sent, as
    the server would check it."""
    from pydantic import ValidationError

    try:
        return submit()
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        field = ".".join(str(p) for p in first["loc"] if not isinstance(p, int)) or "job"
        message = str(first["msg"]).removeprefix("Value error, ")
        flag = _FLAGS.get(field, field)
        name = field.rpartition(".")[2]
        said = flag + message[len(name) :] if message.startswith(f"{name} ") else None
        raise CliError(said or f"{flag}: {message}", code=EXIT_USAGE) from None


class Output:
    """Where `run` and `logs` write a job's output: stdout, byte for byte when it is a
    pipe or a file, made harmless for a terminal (cli/terminal.py) unless `raw`. Bytes the
    orchestrator no longer kept are said on stderr with their count and where the whole
    log is. `cursor` is what has been written: a reader interrupted goes on from there."""

    def __init__(self, c: Client, job_id: uuid.UUID, *, raw: bool = False) -> None:
        from chiffon.cli.terminal import TerminalSafe
        from chiffon.client import LogCursor

        self._client, self._job_id = c, job_id
        self._safe = None if raw or not sys.stdout.isatty() else TerminalSafe()
        self.cursor = LogCursor()
        self.landed = 0  # the attempt whose placement was said
        self._line_open = False  # what was written ends inside a line

    def write(self, piece: JobLog) -> None:
        if piece.skipped_bytes:
            if self._line_open:  # a line shown before the skip is ended, not glued on
                sys.stdout.buffer.write(b"\n")
            self._skipped(piece)
        data = piece.data if self._safe is None else self._safe.feed(piece.data)
        if data:
            self._line_open = not data.endswith(("\n", "\r"))
        sys.stdout.buffer.write(data.encode())
        sys.stdout.flush()
        self.cursor.attempt, self.cursor.offset = piece.attempt, piece.next_offset

    def close(self) -> None:
        """Write what the terminal filter held back (an unfinished escape sequence)."""
        if self._safe is not None and (rest := self._safe.flush()):
            sys.stdout.buffer.write(rest.encode())
            sys.stdout.flush()

    def resume(self) -> LogCursor:
        """A reading cursor from what has been written."""
        from chiffon.client import LogCursor

        return LogCursor(self.cursor.attempt, self.cursor.offset)

    def _skipped(self, piece: JobLog) -> None:
        job = self._client.get(self._job_id)
        attempt = next((a for a in job.attempts if a.attempt == piece.attempt), None)
        desktop = attempt and (attempt.agent_name or str(attempt.agent_id)[:8])
        path = getattr(attempt, "log_path", None)
        where = f"on {desktop} at {path}" if path else f"on {desktop or 'its desktop'}"
        say(f"{piece.skipped_bytes:,} bytes of output skipped: the orchestrator keeps only "
            f"part of a log; the whole log is {where}")  # fmt: skip


def _how_placed(job: JobDetail) -> str:
    if is_out(job.state):
        return "running"
    return "ran" if job.started_at is not None else "placed"  # over at the first look


def follow(c: Client, job_id: uuid.UUID, out: Output, signals: Signals) -> JobDetail:
    """Say why it waits and where it lands, write its output as it comes (from where `out`
    stopped), and return the job once it has ended."""
    said_reason = ""
    while not out.landed:
        job = c.get(job_id)
        if job.state != "queued":
            if job.agent_id is not None:  # placed (and maybe already over: a quick job)
                say(f"{_how_placed(job)} on {where(job)}")
                out.landed = job.attempt
            break
        if job.reason and job.reason != said_reason:
            say(f"waiting: {job.reason}")
            said_reason = job.reason
        time.sleep(0.2)
    for piece in c.logs(job_id, follow=True, cursor=out.resume()):
        with signals.shield():  # a signal waits until the piece is written and counted
            if piece.attempt > max(out.landed, 1):  # placed again: a retry
                say(f"placed again: attempt {piece.attempt} running on {where(c.get(job_id))}")
            out.landed = max(out.landed, piece.attempt)
            out.write(piece)
    out.close()
    return c.wait(job_id)


def _age(at: datetime | None, until: datetime | None = None) -> str:
    if at is None:
        return ""
    seconds = ((until or datetime.now(UTC)) - at).total_seconds()
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _runtime(j: JobView) -> str:
    """How long its current attempt has run (to its end, or until now)."""
    if j.started_at is None:
        return ""
    return _age(j.started_at, j.ended_at)


def jobs_table(rows: list[JobView]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("JOB", "NAME", "STATE", "AGENT", "AGE", "RUNTIME", "EXIT", "REASON"):
        table.add_column(column, overflow="fold" if column == "REASON" else "ellipsis")
    for j in rows:
        table.add_row(
            str(j.job_id)[:8], plain(j.name or ""), j.state, plain(j.agent_name or ""),
            _age(j.submitted_at), _runtime(j), "" if j.exit_code is None else str(j.exit_code),
            plain(j.reason),
        )  # fmt: skip
    return table


@jobs_app.callback(invoke_without_command=True)
def jobs(
    ctx: typer.Context,
    state: str = typer.Option(None, "--state", help="Only jobs in this state."),
    agent: str = typer.Option(None, "--agent", help="Only jobs on this agent (id or name)."),
    limit: int = typer.Option(100, "--limit", min=1, max=10_000, help="At most this many."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
    url: str = URL_OPTION,
) -> None:
    """One row per job, newest first, like squeue."""
    if ctx.invoked_subcommand is not None:
        return
    if state is not None and state not in JOB_STATES:
        raise CliError(f"--state must be one of {', '.join(JOB_STATES)}, not {state!r}",
                       code=EXIT_USAGE)  # fmt: skip
    agent_id = _agent_id(url, agent) if agent else None
    with client(url) as c:
        rows = c.jobs(state=state, agent_id=agent_id, limit=limit)
    if as_json:
        typer.echo("[" + ",".join(r.model_dump_json() for r in rows) + "]")
    elif rows:
        console.print(jobs_table(rows))
    else:
        console.print("no jobs" + (f" {state}" if state else ""), highlight=False)


def _agent_id(url: str | None, ref: str) -> str:
    with client(url) as c:
        return c.resolve_agent(ref)


@jobs_app.command("show")
def show(
    job: str = typer.Argument(..., help="The job (id or id prefix)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
    url: str = URL_OPTION,
) -> None:
    """One job: requirements, placement with GPU UUIDs, attempts, events, why it waits."""
    with client(url) as c:
        detail = c.get(resolve(c, job))
        files = None if as_json else _files_of(c, detail)
    if as_json:
        typer.echo(detail.model_dump_json(indent=2))
        return
    console.print(detail_table(detail, files))


def _files_of(c: Client, j: JobDetail) -> JobFiles | None:
    """What the job saved (`GET /jobs/{id}/files`: any job may leave a checkpoint); None
    when the orchestrator does not say (an older one)."""
    from chiffon.client import ChiffonError

    try:
        return c.job_files(j.job_id)
    except ChiffonError as exc:
        if exc.status in (404, 405):
            return None
        raise


def _wants(j: JobDetail) -> str:
    r = j.requirements
    wants = [f"{r.gpus} GPU" + ("s" if r.gpus > 1 else "")
             + (f" x {r.vram_gb:g} GB free" if r.vram_gb else "")] if r.gpus else []  # fmt: skip
    wants += [f"{r.cpu_cores:g} cores"] if r.cpu_cores else []
    wants += [f"{r.memory_gb:g} GB memory"] if r.memory_gb else []
    wants += [f"pool {r.pool}"] if r.pool else []
    wants += [f"{k}={v}" for k, v in r.labels.items()]
    wants += ["a full sandbox"] if r.require_sandbox else []
    return ", ".join(wants) or "nothing in particular"


def _attempt_line(a: JobAttempt) -> str:
    how = a.state if a.reason in ("", a.state) else f"{a.state}, {a.reason}"
    gpus = f" GPUs {', '.join(a.gpu_uuids)}" if a.gpu_uuids else ""
    peak = a.peak_vram_gb or {}
    most = f"; peak VRAM {', '.join(f'{g} {gb:g} GB' for g, gb in peak.items())}" if peak else ""
    line = f"{a.agent_name or a.agent_id}{gpus}: {how}{most}"
    if a.log_path:
        cut = f" ({a.log_bytes_cut:,} bytes at its start no longer kept here)"
        line += f"; whole log at {a.log_path}" + (cut if a.log_bytes_cut else "")
    if a.resumed_from is not None:  # null from an older orchestrator too
        size = _mb(a.resumed_bytes or 0)
        line += f"; resumed from attempt {a.resumed_from}'s checkpoint ({size})"
    if a.snapshot_cached is not None:  # null: no snapshot (or an older orchestrator)
        line += "; files in its cache" if a.snapshot_cached else "; files fetched"
    return line.strip()


def _mb(n: int) -> str:
    from chiffon.cli.sync import human_bytes

    return human_bytes(n)


def _files_rows(j: JobDetail, files: JobFiles | None) -> list[tuple[str, str]]:
    """The snapshot it runs in, its --out patterns, what it saved."""
    snapshot, patterns = j.snapshot, j.outputs
    outputs, checkpoint = (files.outputs, files.checkpoint) if files else (None, None)
    return [
        ("snapshot", snapshot[:12] if snapshot else ""), ("--out", "  ".join(patterns)),
        ("outputs saved", _saved(outputs) if outputs else "none yet" if patterns else ""),
        ("checkpoint", _saved(checkpoint) if checkpoint else ""),
    ]  # fmt: skip


def _saved(found: FileSet) -> str:
    n = found.files
    return f"{n} file{'s' if n != 1 else ''}, {_mb(found.bytes)} (attempt {found.attempt})"


def detail_table(j: JobDetail, files: JobFiles | None = None) -> Table:
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    for what, value in _detail_rows(j) + _files_rows(j, files):
        if value:
            table.add_row(what, plain(value))
    for a in j.attempts:
        table.add_row(f"attempt {a.attempt}", plain(_attempt_line(a)))
    for e in j.events:
        table.add_row(e.at.strftime("%H:%M:%S"),
                      plain(f"{e.from_state or '-'} -> {e.to_state}: {e.reason}"))  # fmt: skip
    return table


def _detail_rows(j: JobDetail) -> list[tuple[str, str]]:
    cancel_asked = " (cancel asked)" if j.cancel_requested and is_active(j.state) else ""
    return [
        ("job", str(j.job_id)), ("name", j.name or ""), ("command", shlex.join(j.command)),
        ("workdir", j.workdir or ""),
        ("timeout", f"{j.timeout_seconds:g}s" if j.timeout_seconds else ""),
        ("env", ", ".join(j.env_names)),
        ("state", j.state + cancel_asked),
        ("waits because" if j.state == "queued" else "reason", j.reason),
        ("needs", _wants(j)),
        ("on", where(j) if j.agent_id else ""),
        ("submitted", f"{j.submitted_at:%Y-%m-%d %H:%M:%S} ({_age(j.submitted_at)} ago)"),
        ("ran for", _runtime(j)),
        ("exit code", "" if j.exit_code is None else str(j.exit_code)),
        ("taken back", f"{j.preemptions}x by a desktop's owner (no retry used)"
                       if j.preemptions else ""),
    ]  # fmt: skip


def get(
    job: str = typer.Argument(..., help="The job (id or id prefix)."),
    to: Path = typer.Option(
        None, "--to", help="The folder to write them into [./chiffon-out/<job id>]."
    ),
    url: str = URL_OPTION,
) -> None:
    """Fetch what a job's --out patterns saved into a folder. Each file is written to a
    temporary file, checked against its hash and renamed into place; a file already there
    with the same content is kept."""
    from chiffon.cli.sync import fetch, outputs_of

    with client(url) as c:
        job_id = resolve(c, job)
        saved = outputs_of(c, job_id)
        if saved is None:
            raise CliError(f"job {job_id} has no saved outputs{_why_none(c.get(job_id))}")
        got = fetch(c, saved.manifest, to if to is not None else OUT_FOLDER / str(job_id))
    console.print(got.line(), highlight=False)


def _why_none(j: JobDetail) -> str:
    if not j.outputs:
        return " (it was run without --out)"
    if is_active(j.state):
        return f" yet: it is {j.state}, and they are saved when an attempt ends"
    return f": nothing matched {'  '.join(j.outputs)}, or its desktop could not save them"


@jobs_app.command("cancel")
def cancel(
    job: str = typer.Argument(..., help="The job (id or id prefix)."),
    url: str = URL_OPTION,
) -> None:
    """Cancel a job: at once when queued; a running one gets its grace period to end."""
    with client(url) as c:
        view = c.cancel(resolve(c, job))
    if is_out(view.state):
        what = f"{view.state}; its desktop ends it now (SIGTERM, then SIGKILL after the grace)"
    else:
        what = view.state if view.state == "cancelled" else f"already {view.state}"
    console.print(f"job {view.job_id}: {what}", highlight=False)


def logs(
    job: str = typer.Argument(..., help="The job (id or id prefix)."),
    follow_: bool = typer.Option(False, "--follow", "-f", help="Keep printing as it runs."),
    raw: bool = RAW_OPTION,
    url: str = URL_OPTION,
) -> None:
    """A job's output (stdout and stderr as they interleaved); the tail the orchestrator
    keeps, the whole log stays on the desktop (`jobs show` says where)."""
    with client(url) as c:
        job_id = resolve(c, job)
        found = c.get(job_id)
        if found.state == "queued" and found.attempt == 0:
            then = ("waiting for it to start (Ctrl-C stops reading; the job stays queued)"
                    if follow_ else "no output yet (`chiffon logs -f` waits for it)")  # fmt: skip
            say(f"job {job_id} is queued: {found.reason or 'not yet placed'}; {then}")
        out = Output(c, job_id, raw=raw)
        try:
            for piece in c.logs(job_id, follow=follow_):
                out.write(piece)
        except KeyboardInterrupt:
            pass
        out.close()


def register(app: typer.Typer) -> None:
    app.command(context_settings={"allow_interspersed_args": False})(run)
    app.add_typer(jobs_app, name="jobs")
    app.command()(logs)
    app.command()(get)
