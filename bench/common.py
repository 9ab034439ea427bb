"""What the benchmarks share: the machine, processes ended by pid, throwaway databases and
virtual hosts, results written as JSON."""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy.engine import make_url

RESULTS = Path(__file__).parent / "results"
CHIFFON = [sys.executable, "-m", "chiffon.cli"]
ADMIN_URL = os.environ.get(
    "CHIFFON_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
AMQP_URL = os.environ.get("CHIFFON_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def machine() -> dict[str, Any]:
    """The machine and what else was running on it when the numbers were taken."""
    load = os.getloadavg()
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": [round(x, 2) for x in load],
        "busiest_other_processes": busiest_processes(),
    }


def busiest_processes(top: int = 5) -> list[str]:
    out = subprocess.run(
        ["ps", "-eo", "pcpu,comm", "--sort=-pcpu", "--no-headers"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return [" ".join(line.split()) for line in out.splitlines()[:top]]


def write_results(name: str, results: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"results: {path}")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def stop(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 15) -> None:
    """End a process we started, by its own pid."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (10 ms resolution)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of all cores since boot, from /proc/stat."""
    # user nice system idle iowait irq softirq steal
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = fields[3] + fields[4]
    return (sum(fields) - idle) / CLK_TCK, sum(fields) / CLK_TCK


class CpuWatch:
    """Who used the machine's CPU between `__init__` and `shares()`: each named process as
    a share of one core, and the whole machine as a share of all its cores."""

    def __init__(self, pids: dict[str, int]) -> None:
        self._pids = pids
        self._started = time.monotonic()
        self._cpu = {name: cpu_seconds(pid) for name, pid in pids.items()}
        self._machine = machine_cpu_seconds()

    def shares(self) -> dict[str, float]:
        elapsed = time.monotonic() - self._started
        out = {
            f"{name}_of_one_core": (cpu_seconds(pid) - self._cpu[name]) / elapsed
            for name, pid in self._pids.items()
        }
        busy, total = machine_cpu_seconds()
        out["machine_busy_of_all_cores"] = (busy - self._machine[0]) / (total - self._machine[1])
        return out


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def timed(fn: Any, repeats: int) -> list[float]:
    """Seconds each of `repeats` calls of `fn` took (a floor measured beside a result)."""
    out = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        out.append(time.perf_counter() - started)
    return out


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


@contextmanager
def fresh_postgres(migrate: bool = True) -> Iterator[str]:
    """A throwaway PostgreSQL database (migrated to head), dropped afterwards."""
    from chiffon.persistence import db

    admin = make_url(ADMIN_URL)
    name = f"chiffon_bench_{uuid.uuid4().hex[:10]}"
    conninfo = admin.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = admin.set(database=name).render_as_string(hide_password=False)
    try:
        if migrate:
            db.upgrade(url)
        yield url
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def rabbitmqctl(*args: str) -> str:
    return subprocess.run(
        ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60, check=True
    ).stdout


@contextmanager
def private_vhost() -> Iterator[str]:
    """An AMQP URL on a virtual host of its own, deleted afterwards."""
    vhost = f"chiffon-bench-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield f"{AMQP_URL.rstrip('/')}/{vhost}"
    finally:
        delete_vhost(vhost)


def delete_vhost(vhost: str, attempts: int = 10) -> None:
    """Delete our vhost, waiting out a broker that someone is restarting."""
    for attempt in range(attempts):
        try:
            rabbitmqctl("delete_vhost", vhost)
            return
        except subprocess.CalledProcessError:
            if attempt == attempts - 1:
                raise
            time.sleep(3)


def wait_http(url: str, proc: subprocess.Popen[Any], timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


@contextmanager
def orchestrator(
    database_url: str,
    *args: str,
    env: dict[str, str] | None = None,
    log: Path | None = None,
    nice: int = 0,
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """`chiffon orchestrator` on a free port against `database_url`, with the benchmark's
    server key and tokens (`auth_env`), `nice` added to its scheduling priority; yields
    (url, process)."""
    port = free_port()
    full_env = {**os.environ, **auth_env(), "CHIFFON_DATABASE_URL": database_url, **(env or {})}
    sink = log.open("w") if log else subprocess.DEVNULL
    proc = subprocess.Popen(
        [*CHIFFON, "orchestrator", "--port", str(port), *args],
        env=full_env,
        stdout=sink,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=(lambda: os.nice(nice)) if nice else None,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/healthz", proc)
        yield url, proc
    finally:
        stop(proc)
        if log:
            sink.close()  # type: ignore[union-attr]


# Trust: the benchmarks run the orchestrator with a known server key and tokens, and give
# their agents credentials issued under that key (written straight into the registry, as
# enrollment would, so a 100,000-agent fleet does not take 100,000 HTTP round trips).
def _per_run(name: str) -> str:
    """A random value for this run, inherited by the processes a benchmark starts."""
    return os.environ.setdefault(f"CHIFFON_BENCH_{name}", f"bench-{uuid.uuid4().hex}")


SECRET_KEY = _per_run("SECRET_KEY")
API_TOKEN = _per_run("API_TOKEN")
ENROLL_TOKEN = _per_run("ENROLL_TOKEN")


def auth_env() -> dict[str, str]:
    """What `chiffon orchestrator` (and its agents) need to share the benchmark's trust."""
    return {
        "CHIFFON_SECRET_KEY": SECRET_KEY,
        "CHIFFON_API_TOKEN": API_TOKEN,
        "CHIFFON_ENROLL_TOKEN": ENROLL_TOKEN,
        # The benchmark's own desktops take jobs at once (an admin's approval is not
        # what is measured; docs/security.md).
        "CHIFFON_AUTO_APPROVE": "1",
    }


def api_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_TOKEN}"}


def issue_credentials(
    agent_ids: list[uuid.UUID],
) -> tuple[list[dict[str, Any]], dict[uuid.UUID, Any]]:
    """(agent_credentials rows, {agent id: AgentCredential}) as enrollment issues them."""
    from chiffon.orchestrator.credentials import new_credential

    now = datetime.now(UTC)
    issued = [new_credential(SECRET_KEY.encode(), agent_id, now) for agent_id in agent_ids]
    # Approved, as an admin's enrollment leaves them: the benchmark's own desktops.
    return [{**row, "approved_at": now} for row, _ in issued], {
        cred.agent_id: cred for _, cred in issued
    }


def insert_credentials(database_url: str, rows: list[dict[str, Any]]) -> None:
    """Put issued credentials into a (migrated) registry, PostgreSQL or SQLite."""
    from sqlalchemy import create_engine, insert

    from chiffon.persistence import db
    from chiffon.persistence.models import AgentCredentialRow

    engine = create_engine(db.sync_url(database_url))
    try:
        with engine.begin() as conn:
            for start in range(0, len(rows), 5_000):
                conn.execute(insert(AgentCredentialRow), rows[start : start + 5_000])
    finally:
        engine.dispose()


def simulate_data_dir(directory: Path, seed: int, creds: dict[uuid.UUID, Any]) -> dict[str, str]:
    """Env for `chiffon simulate --seed SEED` that finds these credentials (no enrollment)."""
    path = directory / "simulate" / f"seed-{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({str(k): v.secret for k, v in creds.items()}))
    path.chmod(0o600)
    return {"CHIFFON_DATA_DIR": str(directory)}


def messages_counted(api: str) -> dict[str, float]:
    """The orchestrator's accepted and rejected message counts, from its /metrics."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{api}/metrics", headers=api_headers(), timeout=10).text
    counts = {"accepted": 0.0, "rejected": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for kind in counts:
                if sample.name == f"chiffon_messages_{kind}_total":
                    counts[kind] += sample.value
    return counts
