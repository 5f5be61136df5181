"""QStash's logs (the Upstash console's Logs tab) reconciled one to one against a run's ledger.

The console's Logs tab shows ``GET /v2/events``; this module reads the same events with the official SDK
(``AsyncQStash.log.list``, every page through the cursor), folds them per QStash message id into the message's final
state, and holds them against what the run sent (the ledger's :class:`~whatrack.proof.ledger.Sent` records and any DLQ
replays). Each message the run sent ends up as exactly one of:

- ``found``: the logs have it, with its final state (``DELIVERED``, ``FAILED``, ``CANCELED``, or still ``RETRY``...);
- ``missing``: QStash accepted it (it gave us its message id) and its logs have no event for it;
- ``unknown``: its publish had no definite answer, so there is no id to look for.

Log entries of the run's URL and time window that the run did not send are ``unexpected`` when they were created in
the window, ``earlier`` when only their later events fall in it (a previous run's message still retrying). Messages in
the DLQ are listed with their reason (``dlq.list``: last response status, headers, body; the FAILED event's error).

:func:`fold` and :func:`reconcile` are pure (plain records in, frozen dataclasses out); :func:`read_run_logs` and
:func:`reconcile_load` do the reading. ``LogReconciliation.passed`` is the verdict a notebook asserts.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Literal, Protocol

from whatrack.errors import PublishError
from whatrack.proof.ledger import Ledger, Replay, Sent, provider_id_of
from whatrack.qstash import NON_RETRYABLE_HEADER, NON_RETRYABLE_STATUS, SETTLED_STATES, _safe

if TYPE_CHECKING:
    import pandas as pd
    from qstash import AsyncQStash
    from qstash.dlq import DlqMessage
    from qstash.log import Log, LogFilter

    from whatrack.qstash import Publisher
    from whatrack.settings import Settings

log = logging.getLogger("whatrack.proof.qstash_logs")

LogVerdict = Literal["found", "missing", "unknown", "unexpected", "earlier"]
LOG_VERDICTS: tuple[LogVerdict, ...] = ("found", "missing", "unknown", "unexpected", "earlier")
Kind = Literal["sent", "replay", "other"]

#: Page size of ``/v2/events`` and ``/v2/dlq`` reads: OpenAPI caps both at 100 (the py docstring's 1000 for logs is
#: not what the OpenAPI says, and 100 is valid under both), so every page is a full page on the real QStash too.
PAGE = 100
#: Message ids per ``messageIds`` lookup: ~50 ids of ~40 characters keep the query string near 3 kB.
IDS_PER_LOOKUP = 50
#: The window starts this long before the first publish: an event's time is QStash's clock, ``Sent.at`` ours.
DEFAULT_SLACK_MS = 2_000
#: A response body is shown in a DLQ reason up to this many characters.
REASON_BODY_CHARS = 160
#: Order of a message's events within one millisecond: the broker writes ERROR+RETRY or ERROR+FAILED in one step
#: (same ``time``), and the listing is newest first only roughly, so ties are broken by the lifecycle.
_RANK = {"CREATED": 0, "ACTIVE": 1, "ERROR": 2, "RETRY": 3, "CANCEL_REQUESTED": 4, "IN_PROGRESS": 1,
         "DELIVERED": 5, "FAILED": 5, "CANCELED": 5}


# -- plain records ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LogEvent:
    """One log entry, reduced to what the reconciliation needs (``time`` in ms, QStash's clock)."""

    message_id: str
    time: int
    state: str
    url: str = ""
    error: str | None = None
    response_status: int | None = None


@dataclass(frozen=True)
class MessageLog:
    """One message's events folded: ``state`` is the last event's (its final state when it is settled)."""

    message_id: str
    state: str
    time: int  # ms, of the final event
    first_time: int  # ms, of the first event read
    states: tuple[str, ...]  # oldest first
    attempts: int  # ACTIVE events: delivery attempts
    retries: int  # RETRY events: attempts scheduled again
    url: str = ""
    error: str | None = None  # the last error an attempt reported
    response_status: int | None = None  # the last attempt's answer

    @property
    def settled(self) -> bool:
        return self.state in SETTLED_STATES


@dataclass(frozen=True)
class DlqEntry:
    """One DLQ message of the run with why it is there."""

    dlq_id: str
    message_id: str
    provider_id: str | None
    response_status: int | None
    reason: str
    non_retryable: bool
    max_retries: int | None = None


@dataclass(frozen=True)
class LogRow:
    """One message's line in the reconciliation table."""

    message_id: str | None
    provider_id: str | None
    kind: Kind
    verdict: LogVerdict
    state: str | None
    attempts: int
    retries: int
    in_dlq: bool
    detail: str
    dlq_reason: str | None = None
    ledger_verdict: str | None = None


@dataclass(frozen=True)
class LogReconciliation:
    """Every message of a run held against QStash's logs; ``passed`` is the verdict."""

    rows: tuple[LogRow, ...]
    dlq: tuple[DlqEntry, ...] = ()
    events: int = 0  # log entries read
    window: tuple[int, int] | None = None  # ms, the from/to filter of the URL read

    def count(self, verdict: LogVerdict) -> int:
        return sum(1 for r in self.rows if r.verdict == verdict)

    @property
    def found(self) -> int:
        return self.count("found")

    @property
    def missing(self) -> int:
        return self.count("missing")

    @property
    def unexpected(self) -> int:
        return self.count("unexpected")

    @property
    def unknown(self) -> int:
        return self.count("unknown")

    @property
    def passed(self) -> bool:
        """Every accepted message is in the logs, and no message created in the window is unaccounted for (each
        unexpected one may be a publish whose answer was lost: up to ``unknown`` of them are explained)."""
        return self.missing == 0 and self.unexpected <= self.unknown

    @property
    def settled(self) -> bool:
        """Every found message of the run has a final state (DELIVERED, FAILED or CANCELED)."""
        return all(r.state in SETTLED_STATES for r in self.rows if r.verdict == "found")

    def states(self) -> dict[str, int]:
        """Final states of the run's found messages (the console's state column, counted)."""
        return dict(Counter(r.state for r in self.rows if r.verdict == "found" and r.state))

    def by_verdict(self, verdict: LogVerdict) -> list[LogRow]:
        return [r for r in self.rows if r.verdict == verdict]

    def summary(self) -> str:
        head = "PASS" if self.passed else "FAIL"
        counts = ", ".join(f"{v} {self.count(v)}" for v in LOG_VERDICTS)
        states = ", ".join(f"{k} {n}" for k, n in sorted(self.states().items()))
        return f"{head}: {counts}; final states: {states or 'none'}; DLQ {len(self.dlq)}; {self.events} events read"

    def frame(self) -> pd.DataFrame:
        """One row per message (pandas), for notebooks."""
        import pandas as pd

        return pd.DataFrame([asdict(r) for r in self.rows], columns=[f.name for f in fields(LogRow)])

    def dlq_frame(self) -> pd.DataFrame:
        """One row per DLQ message of the run, with its reason."""
        import pandas as pd

        return pd.DataFrame([asdict(d) for d in self.dlq], columns=[f.name for f in fields(DlqEntry)])


# -- pure: from the SDK's objects, folding, reasons, reconciling --------------------------------------------------

def event_of(entry: Log) -> LogEvent:
    """The SDK's ``Log`` → :class:`LogEvent`."""
    return LogEvent(message_id=entry.message_id, time=int(entry.time), state=entry.state.value, url=entry.url,
                    error=entry.error, response_status=entry.response_status)


def fold(events: Iterable[LogEvent]) -> dict[str, MessageLog]:
    """Per message id, its events in order and its final state (the last event by time; same-millisecond ties by
    lifecycle: a settled state after ERROR, RETRY after ERROR). ``events`` as listed (newest first) or in any order."""
    by_id: dict[str, list[tuple[int, int, int, LogEvent]]] = defaultdict(list)
    listed = list(events)
    for i, ev in enumerate(reversed(listed)):  # the listing is newest first: reversed index = oldest first
        by_id[ev.message_id].append((ev.time, _RANK.get(ev.state, 1), i, ev))
    out: dict[str, MessageLog] = {}
    for mid, items in by_id.items():
        items.sort(key=lambda t: t[:3])
        evs = [t[3] for t in items]
        last = evs[-1]
        errors = [e.error for e in evs if e.error]
        answers = [e.response_status for e in evs if e.response_status is not None]
        out[mid] = MessageLog(
            message_id=mid, state=last.state, time=last.time, first_time=evs[0].time,
            states=tuple(e.state for e in evs), attempts=sum(1 for e in evs if e.state == "ACTIVE"),
            retries=sum(1 for e in evs if e.state == "RETRY"), url=last.url,
            error=errors[-1] if errors else None, response_status=answers[-1] if answers else None)
    return out


def dlq_reason(status: int | None, headers: Mapping[str, Sequence[str]] | None, body: str | None, *,
               error: str | None = None, max_retries: int | None = None) -> tuple[str, bool]:
    """Why a message is in the DLQ, in one line, and whether the endpoint declared it non-retryable."""
    marked = any(k.lower() == NON_RETRYABLE_HEADER.lower() and any(str(v).lower() == "true" for v in vs)
                 for k, vs in (headers or {}).items())
    non_retryable = status == NON_RETRYABLE_STATUS and marked
    if non_retryable:
        reason = f"non-retryable: the endpoint answered {status} with {NON_RETRYABLE_HEADER}"
    elif not status:
        reason = f"no HTTP answer ({error or 'connection failed'})"
    else:
        tries = "" if max_retries is None else f" ({max_retries} retries)"
        reason = f"retries exhausted{tries}: last answer HTTP {status}"
    if body:
        text = body if len(body) <= REASON_BODY_CHARS else body[:REASON_BODY_CHARS] + "…"
        reason += f": {text!r}"
    return reason, non_retryable


def dlq_entry(msg: DlqMessage, *, error: str | None = None) -> DlqEntry:
    """The SDK's ``DlqMessage`` → :class:`DlqEntry` (``error``: the FAILED event's, when the logs have it)."""
    import base64

    raw = msg.body.encode() if msg.body is not None else base64.b64decode(msg.body_base64 or "")
    reason, non_retryable = dlq_reason(msg.response_status, msg.response_headers, msg.response_body, error=error,
                                       max_retries=msg.max_retries)
    return DlqEntry(dlq_id=msg.dlq_id, message_id=msg.message_id, provider_id=provider_id_of(raw),
                    response_status=msg.response_status, reason=reason, non_retryable=non_retryable,
                    max_retries=msg.max_retries)


def run_message_ids(sent: Iterable[Sent], replays: Iterable[Replay] = ()) -> dict[str, tuple[Kind, str]]:
    """QStash message id → (kind, provider ids) of everything the run published (a deduplicated publish returns the
    existing id: its provider ids are joined with commas)."""
    out: dict[str, tuple[Kind, str]] = {}
    pairs: list[tuple[str | None, str, Kind]] = [(s.qstash_id, s.provider_id, "sent") for s in sent]
    pairs += [(r.qstash_id, r.provider_id, "replay") for r in replays]
    for mid, pid, kind in pairs:
        if not mid:
            continue
        if mid not in out:
            out[mid] = (kind, pid)
        elif pid not in out[mid][1].split(","):
            out[mid] = (out[mid][0], f"{out[mid][1]},{pid}")
    return out


def reconcile(sent: Iterable[Sent], messages: Mapping[str, MessageLog], dlq: Iterable[DlqEntry] = (), *,
              replays: Iterable[Replay] = (), ledger: Ledger | None = None, events: int = 0,
              window: tuple[int, int] | None = None) -> LogReconciliation:
    """Hold the run's messages against the folded logs, one to one. Pure: no I/O, no clock."""
    sent = list(sent)
    expected = run_message_ids(sent, replays)
    dlq_by_mid = {d.message_id: d for d in dlq}
    verdicts = {e.provider_id: e.verdict for e in ledger.entries} if ledger is not None else {}
    rows: list[LogRow] = []
    for mid in sorted(expected):
        kind, pid = expected[mid]
        m, d = messages.get(mid), dlq_by_mid.get(mid)
        rows.append(LogRow(
            message_id=mid, provider_id=pid, kind=kind, verdict="found" if m else "missing",
            state=m.state if m else None, attempts=m.attempts if m else 0, retries=m.retries if m else 0,
            in_dlq=d is not None, dlq_reason=d.reason if d else None, ledger_verdict=_ledger_verdict(verdicts, pid),
            detail=_found_detail(m, d is not None) if m else
            "accepted by QStash, yet its logs have no event for this message id"))
    unknown = [s for s in sent if not s.qstash_id]
    for s in unknown:
        rows.append(LogRow(message_id=None, provider_id=s.provider_id, kind="sent", verdict="unknown", state=None,
                           attempts=0, retries=0, in_dlq=False, ledger_verdict=verdicts.get(s.provider_id),
                           detail="the publish had no definite answer: no message id to look for"))
    for mid in sorted(set(messages) - set(expected)):
        m = messages[mid]
        created = "CREATED" in m.states
        rows.append(LogRow(
            message_id=mid, provider_id=None, kind="other", verdict="unexpected" if created else "earlier",
            state=m.state, attempts=m.attempts, retries=m.retries, in_dlq=mid in dlq_by_mid,
            detail=(f"created in the run's window at its URL, not sent by the run ({len(unknown)} publishes had an "
                    "unknown outcome)") if created else "created before the run's window, still active in it"))
    run_dlq = tuple(d for d in dlq_by_mid.values() if d.message_id in expected)
    return LogReconciliation(rows=tuple(rows), dlq=run_dlq, events=events, window=window)


def _ledger_verdict(verdicts: Mapping[str, str], pids: str) -> str | None:
    got = [verdicts[p] for p in pids.split(",") if p in verdicts]
    return ",".join(got) if got else None


def _found_detail(m: MessageLog, in_dlq: bool) -> str:
    path = " → ".join(m.states)
    if m.state == "FAILED" and not in_dlq:
        return f"{path} (FAILED, not in the DLQ: replayed or deleted)"
    if not m.settled:
        return f"{path} (not settled yet)"
    return path


# -- reading (I/O) ------------------------------------------------------------------------------------------------

async def read_events(client: AsyncQStash, flt: LogFilter, *, page: int = PAGE) -> list[LogEvent]:
    """Every log entry the filter matches, all pages (newest first, as listed).

    Raises:
        PublishError: QStash could not be read, or its cursor came back twice (a paging loop).
    """
    out: list[LogEvent] = []
    cursor: str | None = None
    seen: set[str] = set()
    while True:
        try:
            res = await client.log.list(cursor=cursor, count=page, filter=flt)
        except Exception as e:  # QStashError, RateLimitExceededError, httpx transport errors
            raise PublishError(f"QStash logs could not be read: {_safe(e)}") from e
        out.extend(event_of(e) for e in res.logs)
        if not res.cursor or not res.logs:
            return out
        if res.cursor in seen:
            raise PublishError(f"QStash logs returned cursor {res.cursor!r} twice: paging would not end")
        seen.add(res.cursor)
        cursor = res.cursor


async def read_dlq(client: AsyncQStash, *, url: str, message_ids: Iterable[str] | None = None,
                   errors: Mapping[str, str | None] | None = None, page: int = PAGE) -> list[DlqEntry]:
    """The DLQ messages delivered to ``url`` (only ``message_ids``' when given), each with its reason.

    Raises:
        PublishError: QStash could not be read.
    """
    from qstash.dlq import DlqFilter

    wanted = set(message_ids) if message_ids is not None else None
    out: dict[str, DlqEntry] = {}
    cursor: str | None = None
    seen: set[str] = set()
    while True:
        try:
            res = await client.dlq.list(cursor=cursor, count=page, filter=DlqFilter(url=url))
        except Exception as e:
            raise PublishError(f"QStash DLQ could not be read: {_safe(e)}") from e
        for m in res.messages:
            if wanted is None or m.message_id in wanted:
                out.setdefault(m.dlq_id, dlq_entry(m, error=(errors or {}).get(m.message_id)))
        if not res.cursor or not res.messages or res.cursor in seen:
            return list(out.values())
        seen.add(res.cursor)
        cursor = res.cursor


async def read_run_logs(publisher: Publisher, sent: Sequence[Sent], *, replays: Sequence[Replay] = (),
                        ledger: Ledger | None = None, since_ms: int | None = None, until_ms: int | None = None,
                        slack_ms: int = DEFAULT_SLACK_MS, page: int = PAGE) -> LogReconciliation:
    """Read the run's logs and DLQ as the console shows them, and reconcile them against ``sent`` (and ``replays``).

    The logs of the publisher's destination URL in the run's window (first publish − ``slack_ms`` to now) are read
    page by page; a run message not among them is then looked up by id without a window (a clock skew between us
    and QStash must not make a message "missing").

    Raises:
        PublishError: QStash could not be read.
    """
    from qstash.log import LogFilter

    started = time.monotonic()
    now = int(time.time() * 1000)
    first = min((int(s.at * 1000) for s in sent), default=now)
    window = (since_ms if since_ms is not None else first - slack_ms,
              until_ms if until_ms is not None else now + slack_ms)
    expected = run_message_ids(sent, replays)
    events = await read_events(publisher.client,
                               LogFilter(url=publisher.destination, from_time=window[0], to_time=window[1]),
                               page=page)
    have = {e.message_id for e in events}
    absent = sorted(m for m in expected if m not in have)
    for i in range(0, len(absent), IDS_PER_LOOKUP):
        events += await read_events(publisher.client, LogFilter(message_ids=absent[i:i + IDS_PER_LOOKUP]), page=page)
    messages = fold(events)
    dlq = await read_dlq(publisher.client, url=publisher.destination, message_ids=expected,
                         errors={mid: m.error for mid, m in messages.items()}, page=page)
    result = reconcile(sent, messages, dlq, replays=replays, ledger=ledger, events=len(events), window=window)
    log.info("[evidence] QStash logs of %d messages read in %.1f s: %s", len(expected),
             time.monotonic() - started, result.summary())
    return result


class RunRecord(Protocol):
    """What :func:`reconcile_load` reads of a ``LoadResult`` (a protocol: ``load`` may call us without a cycle)."""

    @property
    def sent(self) -> list[Sent]: ...

    @property
    def replays(self) -> list[Replay]: ...

    @property
    def ledger(self) -> Ledger: ...


async def reconcile_load(settings: Settings, result: RunRecord, **kw: Any) -> LogReconciliation:
    """:func:`read_run_logs` for a finished :func:`~whatrack.proof.load.run_load` (its sends, replays and ledger),
    with a publisher built from ``settings`` (``QSTASH_URL``, ``QSTASH_TOKEN``, ``WEBHOOK_PUBLIC_URL``).

    Raises:
        ConfigError: a needed setting is missing.
        PublishError: QStash could not be read.
    """
    from whatrack.qstash import Publisher

    publisher = Publisher.from_settings(settings)
    try:
        return await read_run_logs(publisher, result.sent, replays=result.replays, ledger=result.ledger, **kw)
    finally:
        await publisher.aclose()
