"""Prometheus metrics (``prometheus-client``) for the endpoint and the worker, served at ``GET /metrics``.

Each process keeps its own registry (with several uvicorn workers, scrape each or run one worker per container).
Label values are fixed vocabularies (outcomes, states): never a token, a phone or a message text.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

#: Webhook outcomes (``handler.Outcome.outcome``), pre-declared so every series exists from the first scrape.
WEBHOOK_OUTCOMES = ("stored", "duplicate", "receipt", "instance", "ignored", "rejected_signature", "non_retryable",
                    "transient")
FOLLOWUP_OUTCOMES = ("sent", "skipped", "failed", "retried")
QUEUE_STATES = ("wait", "active", "delayed", "prioritized", "completed", "failed", "paused")

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The metric families of one process. Create one per app/worker (tests create their own)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.webhooks = Counter("whatrack_webhooks", "Webhook deliveries by outcome", ["outcome"], registry=r)
        self.webhook_seconds = Histogram(
            "whatrack_webhook_duration_seconds", "Time to process one webhook delivery", registry=r,
            # Sub-millisecond rejections up to the 20 s processing timeout.
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20))
        self.realtime_failures = Counter("whatrack_realtime_publish_failures", "Centrifugo publications that failed",
                                         registry=r)
        self.publish_lag = Histogram(
            "whatrack_realtime_publish_lag_seconds", "Time from a message's commit to its Centrifugo publication",
            registry=r, buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900))
        self.outbox_depth = Gauge("whatrack_realtime_outbox_messages",
                                  "Messages committed but not yet published to Centrifugo", registry=r)
        # The follow-up worker's (whatrack.followups.monitor): it serves them at its own /metrics.
        self.redis_errors = Counter("whatrack_redis_connection_errors",
                                    "Redis connection failures the worker saw (its queue looks and its run loop)",
                                    registry=r)
        self.followups = Counter("whatrack_followup_jobs", "Follow-up job attempts by outcome (sent, skipped: lead "
                                 "replied, failed: for good, retried: BullMQ runs it again)", ["outcome"], registry=r)
        self.queue_depth = Gauge("whatrack_queue_jobs", "BullMQ jobs per state, sampled by the worker",
                                 ["queue", "state"], registry=r)
        self.queue_paused = Gauge("whatrack_queue_paused", "1 while the BullMQ queue is paused (no job runs)",
                                  ["queue"], registry=r)
        for o in WEBHOOK_OUTCOMES:
            self.webhooks.labels(o)
        for o in FOLLOWUP_OUTCOMES:
            self.followups.labels(o)

    def observe_webhook(self, outcome: str, seconds: float, *, realtime_failed: bool = False) -> None:
        self.webhooks.labels(outcome if outcome in WEBHOOK_OUTCOMES else "transient").inc()
        self.webhook_seconds.observe(seconds)
        if realtime_failed:
            self.realtime_failures.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def parse(text: str) -> dict[str, float]:
    """Prometheus text → ``{"name{label=\\"v\\"}": value}`` (samples only), for alerts and tests."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = float(s.value)
    return out
