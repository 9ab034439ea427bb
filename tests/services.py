"""Reaching the real local services tests need: skip when absent, fail in CI."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable

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


def listening_pids(ports: tuple[int, ...] = (5432, 5672)) -> dict[int, set[int]]:
    """The pids listening on the system services' ports on this machine (those visible)."""
    import psutil

    found: dict[int, set[int]] = {port: set() for port in ports}
    try:
        connections = psutil.net_connections("tcp")
    except psutil.AccessDenied:  # not root: nothing to compare
        return found
    for conn in connections:
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port in found and conn.pid:
            found[conn.laddr.port].add(conn.pid)
    return found


async def eventually(check: Callable[[], Awaitable[bool]], within_seconds: float = 10) -> None:
    """Wait until `await check()` is true; fail after `within_seconds`."""
    deadline = time.monotonic() + within_seconds
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)
