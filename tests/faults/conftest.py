"""The fault suite: every test here is marked `faults` (docs/reliability.md)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from chiffon.orchestrator.clock import ManualClock
from tests.rabbitmq.helpers import amqp_url, topology

__all__ = ["amqp_url", "topology"]  # fixtures shared with tests/rabbitmq/


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/faults/" in str(item.fspath):
            item.add_marker(pytest.mark.faults)


@pytest.fixture
def database_url(postgres_url: str) -> str:
    """The fault suite runs on PostgreSQL, the production registry."""
    return postgres_url


@pytest.fixture
def clock() -> ManualClock:
    """Real time to start with: signed messages must be inside the replay window."""
    return ManualClock(datetime.now(UTC))
