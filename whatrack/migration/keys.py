"""Pure helpers of the Redis migration: BullMQ key names, database remapping, URL handling.

Every BullMQ key name the migration knows lives here (protocols/bullmq.md §4), so the copy, the verify and the
rollback classify keys the same way. No I/O in this module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit, urlunsplit

from whatrack.followups import constants as bullmq_names

#: BullMQ's default key prefix (``bull:<queue>:...``): the one the follow-up queue uses.
BULL_PREFIX = bullmq_names.KEY_PREFIX
#: Our own bookkeeping namespace on a server: never copied, never compared.
OWN_PREFIX = b"whatrack:migration:"
#: Hash on the target recording the cutover (time, per-queue id counters): read by rollback.
CUTOVER_KEY = b"whatrack:migration:cutover"
#: Temp keys of the logical copy live here until RENAME puts them in place.
TMP_PREFIX = b"whatrack:migration:tmp:"

#: Job states and the structure that holds each (protocols/bullmq.md §4).
STATE_LISTS = ("wait", "paused", "active")
STATE_ZSETS = ("delayed", "prioritized", "completed", "failed", "waiting-children")
STATES = (*STATE_LISTS, *STATE_ZSETS)

#: Queue-level suffixes (everything in ``bull:<q>:`` that is not one job's key): the queue's own keys, plus the
#: dedup (``de:<id>``), metrics and ``pcl`` keys that newer BullMQ versions add.
QUEUE_SUFFIXES = frozenset({*bullmq_names.QUEUE_KEYS, *STATES, "de", "metrics", "pcl"})

#: Job hash fields that verify compares by name (wire names are BullMQ's).
JOB_FIELDS = {name: bullmq_names.JOB_FIELDS[name].encode()
              for name in ("attemptsMade", "payload", "delay", "timestamp")}


@dataclass(frozen=True)
class BullKey:
    """A key under ``bull:``: its queue, and either a queue-level suffix or a job id (with a job sub-key)."""

    queue: str
    suffix: str
    job_id: str | None = None
    job_sub: str | None = None

    @property
    def is_job_hash(self) -> bool:
        return self.job_id is not None and self.job_sub is None


def parse_bull_key(key: bytes, prefix: str = BULL_PREFIX) -> BullKey | None:
    """Classify ``key`` as a BullMQ key, or None when it is not one.

    ``bull:followup:wait`` is queue-level; ``bull:followup:42`` is job 42's hash; ``bull:followup:42:lock`` is a
    sub-key of job 42; ``bull:followup:repeat:abc`` and ``bull:followup:de:x`` are queue-level.
    """
    try:
        text = key.decode()
    except UnicodeDecodeError:
        return None
    head = prefix + ":"
    if not text.startswith(head):
        return None
    rest = text[len(head):]
    queue, sep, suffix = rest.partition(":")
    if not sep or not queue or not suffix:
        return None
    first, _, sub = suffix.partition(":")
    if first in QUEUE_SUFFIXES:
        return BullKey(queue, suffix)
    return BullKey(queue, suffix, job_id=first, job_sub=sub or None)


def queue_key(queue: str, suffix: str, prefix: str = BULL_PREFIX) -> bytes:
    return f"{prefix}:{queue}:{suffix}".encode()


def default_db_prefix(db: int) -> bytes:
    """Where keys of source database ``db`` (not 0) land on a database-0-only target: ``db3:<key>``."""
    return f"db{db}:".encode()


_DB_PREFIX = re.compile(rb"^db(\d+):")


def map_to_target(db: int, key: bytes, db_prefix_map: dict[int, str] | None = None, main_db: int = 0) -> bytes:
    """The target name of ``key`` from source database ``db``: unchanged for the source URL's own database
    (``main_db``), prefixed (``db3:<key>``, or ``db_prefix_map[3]``) for any other."""
    if db == main_db:
        return key
    if db_prefix_map and db in db_prefix_map:
        return db_prefix_map[db].encode() + key
    return default_db_prefix(db) + key


def map_to_source(key: bytes, db_prefix_map: dict[int, str] | None = None, main_db: int = 0) -> tuple[int, bytes]:
    """Inverse of :func:`map_to_target`: (source database, source key) of a target key."""
    for db, pfx in (db_prefix_map or {}).items():
        p = pfx.encode()
        if db != 0 and key.startswith(p):
            return db, key[len(p):]
    m = _DB_PREFIX.match(key)
    if m and not (db_prefix_map and int(m.group(1)) in db_prefix_map):
        return int(m.group(1)), key[m.end():]
    return main_db, key


def url_db(url: str) -> int:
    """The database number in a Redis URL's path (0 when absent)."""
    path = urlsplit(url).path.lstrip("/")
    return int(path) if path.isdigit() else 0


def with_db(url: str, db: int) -> str:
    """``url`` pointing at database ``db``."""
    p = urlsplit(url)
    return urlunsplit(SplitResult(p.scheme, p.netloc, f"/{db}", p.query, p.fragment))


def is_upstash_host(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return host == "upstash.io" or host.endswith(".upstash.io")


def is_own_key(key: bytes) -> bool:
    return key.startswith(OWN_PREFIX)


def key_prefix(key: bytes) -> str:
    """Inventory grouping: ``bull:<queue>`` for BullMQ keys, else the part before the first ``:``."""
    text = key.decode(errors="replace")
    parts = text.split(":")
    if parts[0] == BULL_PREFIX and len(parts) > 2:
        return f"{parts[0]}:{parts[1]}"
    return parts[0] if len(parts) > 1 else "(no prefix)"


def delayed_due_ms(score: float) -> int:
    """Due time (epoch ms) of a delayed job from its ``delayed`` zset score (ms × 4096 + sequence)."""
    return int(score) >> 12
