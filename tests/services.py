"""Reaching the real local services tests need: skip when absent, fail in CI."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterator

import pytest

POSTGRES_ADMIN_URL = os.environ.get(
    "CHIFFON_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
AMQP_URL = os.environ.get("CHIFFON_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def require_services() -> bool:
    return os.environ.get("CHIFFON_REQUIRE_SERVICES") == "1"


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def need(service: str, host: str, port: int) -> None:
    """Skip (locally) or fail (CHIFFON_REQUIRE_SERVICES=1) when a service is down."""
    if port_open(host, port):
        return
    message = f"{service} is not reachable at {host}:{port}"
    if require_services():
        pytest.fail(f"{message} and CHIFFON_REQUIRE_SERVICES=1", pytrace=False)
    pytest.skip(message)


def _run(*command: str) -> None:
    import subprocess

    subprocess.run(command, check=True, timeout=120, capture_output=True)


@contextlib.contextmanager
def broker_stopped() -> Iterator[None]:
    """RabbitMQ's app stopped (`rabbitmqctl stop_app`) and always started again."""
    _run("rabbitmqctl", "-q", "stop_app")
    try:
        yield
    finally:
        _run("rabbitmqctl", "-q", "start_app")
        _run("rabbitmqctl", "-q", "await_startup")


def postgres_version() -> str:
    versions = sorted(os.listdir("/etc/postgresql"))
    return versions[-1]


@contextlib.contextmanager
def postgres_stopped() -> Iterator[None]:
    """The local PostgreSQL cluster stopped (pg_ctlcluster) and always started again."""
    ctl = ("pg_ctlcluster", "--skip-systemctl-redirect", postgres_version(), "main")
    _run(*ctl, "stop", "-m", "fast")
    try:
        yield
    finally:
        _run(*ctl, "start")


async def eventually(check: Callable[[], Awaitable[bool]], within_seconds: float = 10) -> None:
    """Wait until `await check()` is true; fail after `within_seconds`."""
    deadline = time.monotonic() + within_seconds
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)
