"""The sizes and durations of a load run and of the fault matrix: pure data, shared by the tooling and its commands.

:class:`LoadConfig` is one load run (:mod:`whatrack.proof.load`); :class:`MatrixConfig` the fault matrix
(:mod:`whatrack.proof.faults`, :mod:`whatrack.proof.worker_faults`). Both are re-exported by those modules.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Publishes in flight at once: enough to keep the broker and the endpoint busy on 2 cores without queueing for long
#: inside the client.
DEFAULT_CONCURRENCY = 48


@dataclass(frozen=True)
class LoadConfig:
    """What one load run does. Sizes and durations are parameters: CI small, the full run >= 5,000."""

    n: int = 1000
    seed: int = 0
    instances: int = 3
    leads: int = 50
    rate: float | None = None  # target publishes per second; None: as fast as it goes
    concurrency: int = DEFAULT_CONCURRENCY
    retries: int = 3  # QStash delivery retries per message (QStash's default)
    settle_timeout: float = 180.0  # seconds to wait for the last message after the last publish
    replay_dlq: bool = True  # republish the DLQ once everything settled, then check again
    progress: bool = True
    organization: str | None = None  # default: "whatrack loadtest <seed>"
    copies: int = 1  # QStash messages per webhook, same body (2: every webhook delivered twice, at least once)


@dataclass(frozen=True)
class MatrixConfig:
    """Sizes and durations: CI small (the defaults), the full run with ``n >= 5000`` and ``outage_s=10``."""

    n: int = 150
    outage_s: float = 2.0
    workers: int = 2
    time_scale: float = 0.2  # QStash broker backoff scale (1.0 = real QStash delays)
    seed: int = 1
    rate: float | None = None
    concurrency: int = 32
    settle_timeout: float = 120.0
    followup_jobs: int = 40
    idle_s: float = 10.0  # idle window for the Redis command rate (the follow-up worker polling); 0: skip
    progress: bool = False
