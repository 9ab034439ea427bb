"""Fixtures of the RabbitMQ tests (shared with the fault suite through `helpers`)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from chiffon.orchestrator.clock import ManualClock
from tests.rabbitmq.helpers import amqp_url, topology

__all__ = ["amqp_url", "topology"]


@pytest.fixture
def clock() -> ManualClock:
    """Real time to start with: signed messages must be inside the replay window."""
    return ManualClock(datetime.now(UTC))
