"""The loss ledger: every published message followed to its database row(s), its realtime publication(s) and the DLQ.

Vocabulary from Jepsen's queue checkers. Each provider id (UAZAPI ``message.id``) ends up as exactly one of:

- ``ok``: accepted by QStash, stored once, published to realtime once;
- ``lost``: accepted by QStash, and not stored once + published once (not stored at all, stored but never published,
  or sitting in the DLQ without a replay);
- ``duplicated``: stored more than once, or published more than once;
- ``unexpected``: stored or published, but never sent;
- ``recovered``: it went to the DLQ, was replayed, and is now stored once and published once;
- ``unknown``: its publish had no definite answer (a timeout, a transport error) and it was never stored: it may
  never have entered QStash, so it is neither lost nor ok. A publish with an unknown outcome whose message *was*
  stored once and published once counts as ``ok`` (the message is observed: Jepsen's "indeterminate but seen");
- ``undelivered``: accepted, not (yet) published to realtime, and QStash still holds it (its latest event is not
  DELIVERED, FAILED or CANCELED: it is being retried on QStash's backoff). Not lost, not proven either: it fails the
  verdict as "pending" until QStash delivers it or gives up (then it is ok, or in the DLQ).

:func:`classify` is the pure heart (plain records in, a :class:`Ledger` out); :func:`collect` gathers the records from
the store, Centrifugo's history and the QStash DLQ; :func:`replay_dlq` republishes the DLQ and deletes what it
republished. Plots and latency statistics are in :mod:`whatrack.proof.plots`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from whatrack.errors import PublishError

if TYPE_CHECKING:
    import pandas as pd

    from whatrack.qstash import Publisher
    from whatrack.realtime import Realtime

log = logging.getLogger("whatrack.proof.ledger")

Verdict = Literal["ok", "lost", "duplicated", "unexpected", "recovered", "unknown", "undelivered"]
VERDICTS: tuple[Verdict, ...] = ("ok", "lost", "duplicated", "unexpected", "recovered", "unknown", "undelivered")
PublishOutcome = Literal["accepted", "unknown"]

#: How many publications one history call asks for: above any one conversation's share of a load test.
HISTORY_LIMIT = 100_000


# -- the plain records the classification works on ---------------------------------------------------------------

@dataclass(frozen=True)
class Sent:
    """One publish attempt: ``qstash_id`` is set when QStash accepted it (``outcome == "accepted"``)."""

    provider_id: str
    at: float  # unix seconds, just before the publish call
    outcome: PublishOutcome
    qstash_id: str | None = None
    body: bytes = field(default=b"", repr=False, compare=False)


@dataclass(frozen=True)
class StoredRow:
    """One message row (``Store.message_rows``), reduced to what the ledger needs."""

    provider_id: str
    external_id: str
    conversation_id: int
    created_at: float  # unix seconds (the insert's transaction)
    published_at: float | None = None


@dataclass(frozen=True)
class Publication:
    """One publication seen in a channel's realtime history."""

    channel: str
    external_id: str
    message_id: int | None = None


@dataclass(frozen=True)
class DlqItem:
    """One DLQ entry: ``provider_id`` is read from the body (None when the body is not a UAZAPI message)."""

    dlq_id: str
    qstash_id: str
    provider_id: str | None
    status: int | None = None
    body: bytes = field(default=b"", repr=False, compare=False)


@dataclass(frozen=True)
class Replay:
    """A DLQ entry republished by :func:`replay_dlq` (``qstash_id`` is the new message's)."""

    provider_id: str
    dlq_id: str
    qstash_id: str | None


@dataclass(frozen=True)
class Observations:
    """Everything observed at check time."""

    rows: tuple[StoredRow, ...] = ()
    publications: tuple[Publication, ...] = ()
    dlq: tuple[DlqItem, ...] = ()
    #: provider ids whose QStash message is still held by QStash (latest state not settled: being retried)
    pending: frozenset[str] = frozenset()


# -- the verdict --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """One provider id's fate."""

    provider_id: str
    verdict: Verdict
    detail: str
    sent: int  # publish attempts
    accepted: bool
    rows: int
    publications: int
    in_dlq: bool
    replayed: bool
    sent_at: float | None = None
    created_at: float | None = None
    published_at: float | None = None


@dataclass(frozen=True)
class Ledger:
    """The classification of every message of a run; ``passed`` is the zero-loss verdict."""

    entries: tuple[Entry, ...]

    def count(self, verdict: Verdict) -> int:
        return sum(1 for e in self.entries if e.verdict == verdict)

    @property
    def ok(self) -> int:
        return self.count("ok")

    @property
    def lost(self) -> int:
        return self.count("lost")

    @property
    def duplicated(self) -> int:
        return self.count("duplicated")

    @property
    def unexpected(self) -> int:
        return self.count("unexpected")

    @property
    def recovered(self) -> int:
        return self.count("recovered")

    @property
    def unknown(self) -> int:
        return self.count("unknown")

    @property
    def undelivered(self) -> int:
        return self.count("undelivered")

    @property
    def total(self) -> int:
        return len(self.entries)

    @property
    def passed(self) -> bool:
        """No message lost, duplicated, unexpected or still undelivered (unknown publishes are reported, not
        failed; undelivered ones are not lost, but not proven yet either)."""
        return self.lost == 0 and self.duplicated == 0 and self.unexpected == 0 and self.undelivered == 0

    def counts(self) -> dict[str, int]:
        return {v: self.count(v) for v in VERDICTS} | {"total": self.total}

    def by_verdict(self, verdict: Verdict) -> list[Entry]:
        return [e for e in self.entries if e.verdict == verdict]

    def summary(self) -> str:
        c = self.counts()
        head = "PASS" if self.passed else "FAIL" if self.lost or self.duplicated or self.unexpected else "PENDING"
        return f"{head}: " + ", ".join(f"{k} {c[k]}" for k in (*VERDICTS, "total"))

    def frame(self) -> pd.DataFrame:
        """One row per message (pandas), with latencies in ms, for notebooks and plots."""
        import pandas as pd

        df = pd.DataFrame([asdict(e) for e in self.entries],
                          columns=[f.name for f in Entry.__dataclass_fields__.values()])
        df["commit_ms"] = (df["created_at"] - df["sent_at"]) * 1e3
        df["realtime_ms"] = (df["published_at"] - df["sent_at"]) * 1e3
        df["publish_lag_ms"] = (df["published_at"] - df["created_at"]) * 1e3  # commit -> published (outbox)
        return df


def classify(sent: Iterable[Sent], obs: Observations, replays: Iterable[Replay] = ()) -> Ledger:
    """Classify every provider id seen anywhere (sent, stored, published). Pure: no I/O, no clock.

    Publications are matched to provider ids through the rows' external ids, or, for a publication whose row is not
    there, through the sent provider ids' external part (``owner:messageid``).
    """
    sends: dict[str, list[Sent]] = defaultdict(list)
    for s in sent:
        sends[s.provider_id].append(s)
    rows: dict[str, list[StoredRow]] = defaultdict(list)
    for r in obs.rows:
        rows[r.provider_id].append(r)
    by_external: dict[str, str] = {pid.split(":", 1)[-1]: pid for pid in sends}
    by_external.update({r.external_id: r.provider_id for r in obs.rows})
    pubs: Counter[str] = Counter()
    for p in obs.publications:
        pubs[by_external.get(p.external_id, f"?:{p.external_id}")] += 1
    in_dlq = {d.provider_id for d in obs.dlq if d.provider_id}
    replayed = {r.provider_id for r in replays}
    pending = obs.pending - in_dlq

    entries: list[Entry] = []
    for pid in sorted(set(sends) | set(rows) | set(pubs) | in_dlq | replayed):
        attempts = sends.get(pid, [])
        accepted = any(s.outcome == "accepted" for s in attempts)
        n_rows, n_pubs = len(rows.get(pid, ())), pubs.get(pid, 0)
        verdict, detail = _verdict(bool(attempts), accepted, n_rows, n_pubs, pid in in_dlq, pid in replayed,
                                   pending=pid in pending)
        first_row = min(rows[pid], key=lambda r: r.created_at) if rows.get(pid) else None
        entries.append(Entry(
            provider_id=pid, verdict=verdict, detail=detail, sent=len(attempts), accepted=accepted, rows=n_rows,
            publications=n_pubs, in_dlq=pid in in_dlq, replayed=pid in replayed,
            sent_at=min((s.at for s in attempts), default=None),
            created_at=first_row.created_at if first_row else None,
            published_at=first_row.published_at if first_row else None))
    return Ledger(tuple(entries))


def _verdict(was_sent: bool, accepted: bool, rows: int, pubs: int, in_dlq: bool,
             replayed: bool, *, pending: bool = False) -> tuple[Verdict, str]:
    """The one decision table (the unit tests walk every cell of it)."""
    if rows > 1 or pubs > 1:
        return "duplicated", f"{rows} rows, {pubs} publications"
    if not was_sent:
        return "unexpected", f"never sent, yet {rows} rows and {pubs} publications"
    if rows == 1 and pubs == 1:
        if replayed:
            return "recovered", "replayed from the DLQ, stored and published once"
        return "ok", "stored and published once" + ("" if accepted else " (publish outcome was unknown)")
    if pending and not in_dlq:
        return "undelivered", "QStash retrying: " + ("stored, not yet published" if rows else "not delivered yet")
    if not accepted and rows == 0 and pubs == 0 and not in_dlq:
        return "unknown", "publish had no definite answer and nothing arrived"
    if rows == 0 and pubs == 1:
        return "lost", "published to realtime, but no row in the database"
    if rows == 1:
        return "lost", "stored but never published to realtime" + (" (in the DLQ)" if in_dlq else "")
    if in_dlq:
        return "lost", "in the DLQ, not replayed" if not replayed else "in the DLQ again after a replay"
    return "lost", "accepted by QStash, never stored" + (" (replayed)" if replayed else "")


# -- collection (I/O) ---------------------------------------------------------------------------------------------

def _ts(v: Any) -> float | None:
    if v is None:
        return None
    if isinstance(v, datetime):
        return v.timestamp()
    return float(v)


def rows_from_store(raw: Iterable[dict[str, Any]], provider_ids: set[str] | None = None) -> list[StoredRow]:
    """``Store.message_rows`` dicts → :class:`StoredRow`; with ``provider_ids``, only rows whose owner part matches
    a sent owner (the load's instances) are kept, so other traffic in a shared database is not "unexpected"."""
    owners = {p.split(":", 1)[0] for p in provider_ids} if provider_ids else None
    out = []
    for r in raw:
        pid = str(r["provider_id"])
        if owners is not None and pid.split(":", 1)[0] not in owners:
            continue
        out.append(StoredRow(provider_id=pid, external_id=str(r["external_id"]),
                             conversation_id=int(r["conversation_id"]), created_at=_ts(r["created_at"]) or 0.0,
                             published_at=_ts(r.get("published_at"))))
    return out


def provider_id_of(body: bytes) -> str | None:
    """UAZAPI ``message.id`` of a webhook body, or None (not JSON, not a message). Pure."""
    try:
        d = json.loads(body)
    except ValueError:
        return None
    msg = d.get("message") if isinstance(d, dict) else None
    pid = msg.get("id") if isinstance(msg, dict) else None
    return pid if isinstance(pid, str) and pid else None


async def history_publications(realtime: Realtime, channels: Iterable[str], *, concurrency: int = 8,
                               limit: int = HISTORY_LIMIT) -> list[Publication]:
    """Every publication in each channel's history.

    Raises:
        PublishError: Centrifugo could not be read.
    """
    sem = asyncio.Semaphore(concurrency)

    async def one(ch: str) -> list[Publication]:
        async with sem:
            data = await realtime.history(ch, limit=limit)
        return [Publication(channel=ch, external_id=str(d.get("externalId")),
                            message_id=d.get("id") if isinstance(d.get("id"), int) else None) for d in data]

    out: list[Publication] = []
    for chunk in await asyncio.gather(*(one(c) for c in sorted(set(channels)))):
        out.extend(chunk)
    return out


async def dlq_items(publisher: Publisher, *, destination: str | None = None) -> list[DlqItem]:
    """Every DLQ entry (for ``destination``, default: the publisher's).

    Raises:
        PublishError: QStash could not be asked.
    """
    import base64

    dest = destination or publisher.destination
    out: list[DlqItem] = []
    cursor: str | None = None
    while True:
        try:
            res = await publisher.client.dlq.list(cursor=cursor, count=100, filter={"url": dest})
        except Exception as e:
            raise PublishError(f"QStash DLQ could not be read: {type(e).__name__}") from e
        for m in res.messages:
            body = (m.body or "").encode() if m.body is not None else base64.b64decode(m.body_base64 or "")
            out.append(DlqItem(dlq_id=m.dlq_id, qstash_id=m.message_id, provider_id=provider_id_of(body),
                               status=m.response_status, body=body))
        cursor = res.cursor
        if not cursor or not res.messages:
            return out


async def collect(store: Any, realtime: Realtime, publisher: Publisher | None, sent: Sequence[Sent], *,
                  organization_id: int | None = None, replays: Sequence[Replay] = ()) -> Observations:
    """Read back rows, realtime history (the channels of every row), the DLQ entries of the sent messages (a
    shared QStash account's DLQ holds other traffic too: not this run's to judge) and which of the messages not
    yet published QStash still holds (:func:`still_held`).

    Raises:
        StoreError / PublishError: a part could not be read.
    """
    pids = {s.provider_id for s in sent}
    rows = rows_from_store(await store.message_rows(organization_id=organization_id), pids or None)
    from whatrack.store.rows import channel

    pubs = await history_publications(realtime, {channel(r.conversation_id) for r in rows})
    dlq = [d for d in await dlq_items(publisher) if d.provider_id in pids] if publisher is not None else []
    published = {r.provider_id for r in rows if r.published_at is not None}
    waiting = [s for s in sent if s.provider_id not in published]
    pending = await still_held(publisher, waiting, replays) if publisher is not None and waiting else frozenset()
    return Observations(rows=tuple(rows), publications=tuple(pubs), dlq=tuple(dlq), pending=pending)


async def still_held(publisher: Publisher, sent: Sequence[Sent], replays: Sequence[Replay] = ()) -> frozenset[str]:
    """The provider ids of ``sent`` whose QStash message (the replayed copy's, when replayed) QStash still holds:
    its latest event is not DELIVERED, FAILED or CANCELED, so QStash is retrying it on its backoff. Best effort:
    when the events cannot be read, none (the ledger then judges on what arrived)."""
    from whatrack.qstash import SETTLED_STATES

    latest = {r.provider_id: r.qstash_id for r in replays if r.qstash_id}
    ids = {s.provider_id: latest.get(s.provider_id, s.qstash_id) for s in sent if s.qstash_id}
    if not ids:
        return frozenset()
    try:
        states = await publisher.states(sorted({q for q in ids.values() if q}))
    except PublishError as e:
        log.warning("[evidence] QStash events could not be read, no message counted as still retried: %s", e)
        return frozenset()
    return frozenset(p for p, q in ids.items() if q in states and states[q] not in SETTLED_STATES)


def retry_schedule(retries: int, time_scale: float = 1.0) -> list[float]:
    """Seconds QStash waits before each retry with its default backoff, ``min(86400, e^(2.5 n))`` for retry n
    (protocols/qstash.md §retries): 12 s, 148 s, 1808 s, ... (``time_scale``: the devstack broker's factor)."""
    return [min(86400.0, math.exp(2.5 * n)) * time_scale for n in range(1, retries + 1)]


async def replay_dlq(publisher: Publisher, items: Sequence[DlqItem], *, retries: int = 3) -> list[Replay]:
    """Republish each DLQ entry's body (a new QStash message), then delete the entry. Entries whose body is not a
    UAZAPI message are left in the DLQ (nothing to replay them into). A failed republish leaves its entry in place.

    Raises:
        PublishError: QStash refused a delete (the republished copy is then already out: safe, the endpoint is
            idempotent).
    """
    out: list[Replay] = []
    for item in items:
        if not item.provider_id:
            continue
        try:
            qid = await publisher.publish_webhook(item.body, retries=retries)
        except PublishError as e:
            log.warning("[evidence] replay of DLQ entry %s failed, left in place: %s", item.dlq_id, e)
            continue
        try:
            await publisher.client.dlq.delete(item.dlq_id)
        except Exception as e:
            raise PublishError(f"DLQ entry {item.dlq_id} republished but not deleted: {type(e).__name__}") from e
        out.append(Replay(provider_id=item.provider_id, dlq_id=item.dlq_id, qstash_id=qid))
    log.info("[evidence] replayed %d of %d DLQ entries", len(out), len(items))
    return out


async def wait_until(predicate: Any, *, timeout: float, interval: float = 0.5) -> bool:
    """Await ``predicate()`` (an async callable returning bool) until it is true or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        if await predicate():
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(interval)
