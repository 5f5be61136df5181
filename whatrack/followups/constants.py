"""The BullMQ vocabulary of the ``followup`` queue: names, key layout, job options and worker timings.

One place for what the Node producers, the Python worker, the scheduling code and the Redis migration must agree on
(protocols/bullmq.md §4). Pure data: no I/O and no imports beyond the standard library, so the migration can read
it without loading bullmq.
"""

from __future__ import annotations

from typing import Any

#: Queue and job name used by the existing Node producers (PRD): both languages must agree on them.
QUEUE_NAME = "followup"
JOB_NAME = "follow-up"
#: BullMQ's default key prefix. Every key of the queue is ``bull:followup:<suffix>``.
KEY_PREFIX = "bull"
#: The queue-level keys BullMQ keeps under ``bull:followup:`` (protocols/bullmq.md §4); the migration copies them all.
#: ``id`` is the auto-id counter and must be copied, or new jobs overwrite old ones.
QUEUE_KEYS = (
    "id", "wait", "paused", "active", "delayed", "prioritized", "pc", "completed", "failed", "waiting-children",
    "stalled", "stalled-check", "marker", "meta", "events", "limiter", "repeat",
)
#: Per-job keys: ``bull:followup:<id>`` (hash), ``:lock`` (PX lockDuration), ``:logs``; dedup keys ``:de:<id>``.
JOB_KEY_SUFFIXES = ("", ":lock", ":logs")
#: Fields of a job's hash, by the name BullMQ's ``Job`` gives them (protocols/bullmq.md §4).
JOB_FIELDS = {"attemptsMade": "atm", "attemptsStarted": "ats", "stalledCounter": "stc", "payload": "data",
              "delay": "delay", "timestamp": "timestamp"}
#: whatrack's own per-job key, ``bull:followup:<id>:sent``: the UAZAPI send result, written right after the send
#: and before the database write, so a retry never sends twice. Kept under the queue's prefix so a migration that
#: copies ``bull:followup:*`` carries it along.
SENT_KEY_SUFFIX = ":sent"
#: Longer than any job can live (retries end within a minute, failed jobs are kept 14 days): a retried job always
#: finds its record, and Redis does not keep it forever after BullMQ removed the job.
SENT_RECORD_TTL_S = 30 * 24 * 3600

#: PRD: 3 attempts, exponential backoff from 5 s: retries 5 s and 10 s after the failures.
ATTEMPTS = 3
BACKOFF: dict[str, Any] = {"type": "exponential", "delay": 5_000}
#: Without limits BullMQ keeps every finished job forever (Upstash bills storage). Completed: a day, at most 1,000,
#: enough to check recent sends. Failed: 14 days, at most 10,000, enough for someone to look and retry.
REMOVE_ON_COMPLETE: dict[str, int] = {"age": 24 * 3600, "count": 1_000}
REMOVE_ON_FAIL: dict[str, int] = {"age": 14 * 24 * 3600, "count": 10_000}
DEFAULT_JOB_OPTIONS: dict[str, Any] = {
    "attempts": ATTEMPTS, "backoff": BACKOFF,
    "removeOnComplete": REMOVE_ON_COMPLETE, "removeOnFail": REMOVE_ON_FAIL,
}

#: A killed worker's job comes back once its lock expired and a stalled check saw it twice: at most
#: lockDuration + stalledInterval after the kill (the lock is renewed every lockDuration/2) = 13 s, inside the 15 s
#: goal. BullMQ's 30 s / 30 s took 31-61 s (protocols/bullmq.md §1.2).
LOCK_DURATION_MS = 8_000
STALLED_INTERVAL_MS = 5_000
#: BullMQ's default 1 fails a job at its second stall (two worker crashes): that would drop a follow-up. 3 still
#: stops a job that crashes every worker it lands on.
MAX_STALLED_COUNT = 3
#: Idle wait per BZPOPMIN, in seconds. New jobs wake the worker at once through the marker key; this only sets how
#: often an idle worker polls (billed commands on Upstash). BullMQ caps a wait at 10 s anyway.
DRAIN_DELAY_S = 10
DEFAULT_CONCURRENCY = 10

#: Payload version written by this code.
PAYLOAD_VERSION = 1
MAX_TEXT_CHARS = 65_536  # WhatsApp's own limit for a text message


def sent_key(job_id: str) -> str:
    """The Redis key of a job's send record."""
    return f"{KEY_PREFIX}:{QUEUE_NAME}:{job_id}{SENT_KEY_SUFFIX}"
