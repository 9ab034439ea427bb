"""Prometheus metrics of one orchestrator, on its own registry (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class OrchestratorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.accepted = Counter(
            "chiffon_messages_accepted",
            "Agent messages applied or ignored as stale",
            ["kind", "outcome"],
            registry=r,
        )
        self.rejected = Counter(
            "chiffon_messages_rejected",
            "Agent messages refused, by reason",
            ["reason"],
            registry=r,
        )
        self.enrollments = Counter(
            "chiffon_enrollments",
            "Enrollment requests, by outcome (issued, already_enrolled, banned, bad_token)",
            ["outcome"],
            registry=r,
        )
        self.agents = Gauge("chiffon_agents", "Registered agents by status", ["status"], registry=r)
        self.marked_offline = Counter(
            "chiffon_agents_marked_offline",
            "Agents marked offline, by reason",
            ["reason"],
            registry=r,
        )
        self.mass_offline = Gauge(
            "chiffon_last_sweep_offline_fraction",
            "Fraction of online agents the last sweep marked offline (a network event if high)",
            registry=r,
        )
        self.batch_size = Histogram(
            "chiffon_ingest_batch_size",
            "Messages per ingest transaction",
            buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000),
            registry=r,
        )
        self.batch_seconds = Histogram(
            "chiffon_ingest_batch_seconds",
            "Time to apply one ingest batch",
            buckets=_FAST,
            registry=r,
        )
        self.ingest_errors = Counter(
            "chiffon_ingest_errors", "Ingest batches that failed to commit", registry=r
        )
        self.amqp_connected = Gauge(
            "chiffon_amqp_consumer_connected",
            "1 while the RabbitMQ consumer is subscribed to its queue",
            registry=r,
        )
        self.amqp_reconnects = Counter(
            "chiffon_amqp_reconnects", "Times the RabbitMQ connection was restored", registry=r
        )
        self.amqp_requeued = Counter(
            "chiffon_amqp_requeued",
            "RabbitMQ messages nacked with requeue because the registry write failed",
            registry=r,
        )
        self.sweep_seconds = Histogram(
            "chiffon_sweep_seconds", "Time of one offline sweep", buckets=_FAST, registry=r
        )
        self.history_record_seconds = Histogram(
            "chiffon_history_record_seconds",
            "Time of one metrics history tick that wrote at least one tier",
            buckets=_FAST,
            registry=r,
        )
        self.query_seconds = Histogram(
            "chiffon_query_seconds",
            "Time of registry queries",
            ["query"],
            buckets=_FAST,
            registry=r,
        )
