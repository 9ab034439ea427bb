"""Private PostgreSQL and RabbitMQ instances for the tests that stop a service.

A contributor's database server and broker must never be stopped by a test suite: the
tests that need an outage start their own instance from the installed binaries, in a
temporary directory, on free ports, stop and start *that*, and end it by its own pid. The
system services are only ever connected to.

- PostgreSQL: `initdb` and `pg_ctl` (as the `postgres` user when the suite runs as root,
  since `initdb` refuses root), trust authentication, listening on 127.0.0.1 only.
- RabbitMQ: a node with its own node name, AMQP and distribution ports, data, log and
  cookie (its own `HOME`), no plugins, the server script run in the foreground as our child.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import free_port
from tests.services import require_services


def _missing(what: str) -> None:
    message = f"{what} is not installed: the outage tests need it"
    if require_services():
        pytest.fail(f"{message} and CHIFFON_REQUIRE_SERVICES=1", pytrace=False)
    pytest.skip(message)


def _run(*command: str, timeout: float = 120, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr}")
    return done.stdout


# ------------------------------------------------------------------------------ PostgreSQL


def _postgres_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(versions[-1]).parent if versions else None


class PrivatePostgres:
    """A PostgreSQL cluster of the test run's own."""

    def __init__(self) -> None:
        bin_dir = _postgres_bin()
        if bin_dir is None:
            _missing("PostgreSQL (pg_ctl, initdb)")
        assert bin_dir is not None
        self._bin = bin_dir
        self._as: list[str] = []
        self.dir = Path(tempfile.mkdtemp(prefix="chiffon-pg-"))
        if os.geteuid() == 0:  # initdb refuses root: the cluster belongs to `postgres`
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        self.port = free_port()
        self.admin_url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._ctl("initdb", "-D", str(self.dir / "data"), "-U", "postgres", "--auth=trust",
                  "-E", "UTF8", "--no-sync")  # fmt: skip
        self.start()

    def _ctl(self, tool: str, *args: str) -> str:
        return _run(*self._as, str(self._bin / tool), *args)

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c full_page_writes=off"
        )
        self._ctl("pg_ctl", "-D", str(self.dir / "data"), "-o", options,
                  "-l", str(self.dir / "log"), "-w", "-t", "60", "start")  # fmt: skip

    def stop(self) -> None:
        self._ctl("pg_ctl", "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop")

    @property
    def pid(self) -> int:
        return int((self.dir / "data" / "postmaster.pid").read_text().split()[0])

    @contextlib.contextmanager
    def stopped(self) -> Iterator[None]:
        """This cluster stopped, and always started again."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, FileNotFoundError):
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# -------------------------------------------------------------------------------- RabbitMQ


def _rabbit_script(name: str) -> Path | None:
    direct = Path("/usr/lib/rabbitmq/bin") / name  # Debian: /usr/sbin wraps it in `su`
    if direct.exists():
        return direct
    found = shutil.which(name)
    return Path(found) if found else None


class PrivateRabbit:
    """A RabbitMQ node of the test run's own: `url`, `ctl(...)`, `stopped()`."""

    def __init__(self) -> None:
        server, ctl = _rabbit_script("rabbitmq-server"), _rabbit_script("rabbitmqctl")
        if server is None or ctl is None:
            _missing("RabbitMQ (rabbitmq-server, rabbitmqctl)")
        assert server is not None and ctl is not None
        self._ctl_path = ctl
        self.dir = Path(tempfile.mkdtemp(prefix="chiffon-rabbit-"))
        self.node = f"chiffon-test-{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        cookie = self.dir / ".erlang.cookie"
        cookie.write_text(uuid.uuid4().hex)
        cookie.chmod(0o400)
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq.conf").write_text(f"listeners.tcp.default = 127.0.0.1:{self.port}\n")
        (self.dir / "rabbitmq-env.conf").write_text("")
        self._env = {
            **os.environ,
            "HOME": str(self.dir),  # the cookie, shared with our rabbitmqctl
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }
        self._log = (self.dir / "server.log").open("w")
        self.process = subprocess.Popen(
            [str(server)],
            env=self._env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its group is ours to end, the Erlang VM with it
        )
        self._await_startup(within=90)

    def ctl(self, *args: str) -> str:
        """`rabbitmqctl -n <this node> ...`."""
        return _run(str(self._ctl_path), "-q", "-n", self.node, *args, env=self._env)

    def _await_startup(self, within: float) -> None:
        deadline = time.monotonic() + within
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"private RabbitMQ exited: {self._tail()}")
            try:
                self.ctl("await_startup", "--timeout", "10")
                return
            except (RuntimeError, subprocess.TimeoutExpired):  # not registered with epmd yet
                if time.monotonic() > deadline:
                    raise RuntimeError(f"private RabbitMQ did not start: {self._tail()}") from None
                time.sleep(0.5)

    def _tail(self) -> str:
        return (self.dir / "server.log").read_text()[-2000:]

    @contextlib.contextmanager
    def stopped(self) -> Iterator[None]:
        """The broker application stopped (`stop_app`), and always started again."""
        self.ctl("stop_app")
        try:
            yield
        finally:
            self.ctl("start_app")
            self.ctl("await_startup")

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.ctl("stop")
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:  # ended by its own process group, never by name
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
