"""8. More than half of the fleet silent at once while the orchestrator is healthy."""

from __future__ import annotations

import logging

import httpx
import pytest

from chiffon.api.app import create_app
from chiffon.orchestrator.clock import ManualClock
from chiffon.orchestrator.service import Orchestrator
from tests import factories as f


async def test_8_a_silent_majority_is_marked_offline_and_reported_as_a_network_event(
    orchestrator: Orchestrator, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    fleet = [f.message(name=f"desk-{i}") for i in range(4)]
    for msg in fleet:
        await orchestrator.ingest(f.raw(msg))
    liveness = orchestrator.settings
    grace = liveness.heartbeat_interval_seconds + liveness.heartbeat_timeout_seconds
    clock.advance(grace + 1)  # past start-up grace
    await orchestrator.ingest(f.raw(f.message(fleet[0].agent_id)))  # one still beats
    with caplog.at_level(logging.WARNING):
        gone = await orchestrator.sweeper.sweep_once()
    assert sorted(gone) == sorted(str(m.agent_id) for m in fleet[1:])  # real: they are offline
    assert "3 of 4 online agents went silent at once: likely a network event" in caplog.text
    app = create_app(orchestrator, manage_lifecycle=False)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://chiffon"
    ) as client:
        metrics = (await client.get("/metrics")).text
    assert "chiffon_last_sweep_offline_fraction 0.75" in metrics
    assert 'chiffon_agents_marked_offline_total{reason="timeout"} 3.0' in metrics
