"""RabbitMQ transport (the only package that imports aio-pika and its aiormq), by concern.

- `topology`: names, queue arguments, declarations (both sides);
- `publisher`: the agent's `RabbitPublisher` (the agent imports only this and `topology`);
- `acks`: `AckWindow`, the consumer's ack bookkeeping (no aio-pika: unit-tested alone);
- `consumer`: the orchestrator's `RabbitConsumer`, its states and its `Delivery`.

Topology (docs/protocol.md, "RabbitMQ"): agents publish to the durable topic exchange
`chiffon` with routing key `agent.<kind>.<agent_id>`; orchestrators share the durable queue
`chiffon.orchestrator.agent-events` bound to `agent.#` as competing consumers. The queue has
a length limit and each message an expiration (a heartbeat older than the liveness timeout
is worthless), so a stopped orchestrator never lets the broker fill up. A message that fails
validation is acked and copied to the bounded queue `chiffon.rejected` with the reason in a
header.
"""
