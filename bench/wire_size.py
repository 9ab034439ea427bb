"""Bytes on the wire per heartbeat: the JSON body, and what HTTP and AMQP add around it.

Bodies are `Outgoing.encode()`, exactly what the publishers send: this
machine's own snapshot (`Collector.collect()`), and simulated desktops with 0, 1, 2 and 8
GPUs. The HTTP size is the request as `HttpPublisher` writes it (request line and
headers with the agent's `Authorization: Bearer` secret, not counting TCP/IP); the AMQP
size is the three frames `RabbitPublisher` writes (basic.publish, content header with its
properties and the `x-chiffon-signature` header, body), marshalled with pamqp, the
broker's basic.ack in reply not counted. Takes a second.

    .venv/bin/python bench/wire_size.py
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Any

import h11
from pamqp import commands, frame
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, write_results

from chiffon.agent.loop import AgentIdentity, AgentLoop
from chiffon.agent.probes.collect import Collector
from chiffon.agent.report import Outgoing
from chiffon.agent.simulate import VirtualAgent, make_fleet
from chiffon.transport.auth import SIGNATURE_HEADER, AgentCredential
from chiffon.transport.http import HttpClient, encode_request
from chiffon.transport.memory import InMemoryPublisher
from chiffon.transport.rabbitmq.topology import CONTENT_TYPE, EXCHANGE, routing_key


def credential(message: Outgoing) -> AgentCredential:
    """A secret of the length enrollment issues (43 characters of base64url)."""
    return AgentCredential(message.agent_id, "s" * 43)


def http_bytes(message: Outgoing, body: bytes) -> int:
    route = f"/api/v1/agents/{message.agent_id}/heartbeat"
    headers = {"content-type": "application/json", "authorization": credential(message).bearer}
    client = HttpClient("http://orchestrator.example:8700")
    fields = client.header_fields(body, headers)
    return len(encode_request(h11.Connection(h11.CLIENT), "POST", route, fields, body))


def amqp_bytes(message: Outgoing, body: bytes) -> int:
    publish = commands.Basic.Publish(
        exchange=EXCHANGE, routing_key=routing_key(message), mandatory=True
    )
    props = commands.Basic.Properties(
        content_type=CONTENT_TYPE,
        message_type=message.kind,
        app_id="chiffon-agent",
        headers={SIGNATURE_HEADER: credential(message).sign(body)},
    )
    frames = [publish, ContentHeader(0, len(body), props), ContentBody(body)]
    return sum(len(frame.marshal(f, 1)) for f in frames)


def this_machine() -> Outgoing:
    collector = Collector([], timeout_seconds=5)
    try:
        resources = collector.collect()
    finally:
        collector.close()
    identity = AgentIdentity(agent_id=uuid.uuid4(), name="this-machine-0a1b2c3d")
    loop = AgentLoop(identity, InMemoryPublisher(lambda _: None), lambda: None, interval_seconds=15)  # type: ignore[arg-type,return-value]
    return loop.message("heartbeat", resources)


def with_gpus(fleet: list[VirtualAgent], count: int) -> Outgoing:
    agent = next(a for a in fleet if len(a.hardware.gpus) == count)
    return agent.message()


def main() -> None:
    fleet = make_fleet(500, seed=3)
    cases: dict[str, Outgoing] = {"this machine (no GPU)": this_machine()}
    for count in (0, 1, 2, 8):
        cases[f"simulated, {count} GPU(s)"] = with_gpus(fleet, count)
    results: dict[str, Any] = {}
    print(f"{'heartbeat':<26}{'JSON':>7}{'HTTP':>7}{'AMQP':>7}  bytes")
    for name, message in cases.items():
        body = message.encode()
        row = {
            "json": len(body),
            "http": http_bytes(message, body),
            "amqp": amqp_bytes(message, body),
        }
        results[name] = row
        print(f"{name:<26}{row['json']:>7}{row['http']:>7}{row['amqp']:>7}")
    write_results("wire_size", {"machine": machine(), "sizes_bytes": results})


if __name__ == "__main__":
    main()
