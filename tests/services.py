"""Reaching the real local services tests need: skip when absent, fail in CI."""

from __future__ import annotations

import os
import socket

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
