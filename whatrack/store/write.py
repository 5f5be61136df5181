"""The store's hot path on PostgreSQL: each webhook write as one asyncpg prepared statement, one commit.

A message is one call of ``whatrack_save_message`` (migrations 0003, 0004, 0006): lead, conversation, open ticket,
message, a pending edit and the conversation touch in one round trip. Under load, the messages that arrive while
earlier writes are in flight share the next round trip and commit (``fetchmany``: one pipeline, one implicit
transaction), each caller answered only after that commit. Receipts, instance status and the instance
lookup are one statement each. The realtime outbox (unpublished rows) is claimed, marked and released here too, for
``webhook.publisher``. The SQLAlchemy ``Store`` keeps everything else (schema, CLI, reports) and routes these calls
here on PostgreSQL.

Errors come out as before: a value PostgreSQL can never hold (a NUL, a lone surrogate, an out-of-range number) is
:class:`~whatrack.errors.PayloadError` (the webhook answers 489); anything else (unreachable, timed out, restarted)
is :class:`~whatrack.errors.StoreError` (503, QStash retries). A deadlock, a serialization failure or a connection
that died in the pool is retried here first: every statement here is idempotent.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

import asyncpg
from sqlalchemy.engine import make_url

from whatrack.errors import PayloadError, StoreAuthError, StoreError
from whatrack.store.engine import CONNECT_TIMEOUT_S, MAX_ATTEMPTS, POOL_TIMEOUT_S

log = logging.getLogger("whatrack.store.write")

T = TypeVar("T")

#: The channel the outbox publisher LISTENs on. The follow-up worker's writes NOTIFY it (``Store.save_outbound``);
#: the webhook's write does not (migration 0004: a NOTIFY serializes commits database-wide), it wakes the publisher
#: of its own process through :meth:`Writer.on_saved`.
OUTBOX_CHANNEL = "whatrack_outbox"

#: ``whatrack_save_message``'s parameters after the seven lead/flags ones: the event's message columns, in order.
MESSAGE_COLUMNS = (
    "provider_id", "external_id", "direction", "sender_type", "type", "raw_type", "content", "participant_phone",
    "media_mime", "media_size", "media_duration", "media_file_name", "media_sha256", "media_url", "media_voice",
    "latitude", "longitude", "location_name", "location_address", "edit_of", "reaction_to", "reply_to",
    "sent_by_api", "track_id", "status", "sent_at", "delivered_at",
)
#: The last parameter (migration 0006): seconds the new row is claimed for this process's publisher (0: unclaimed).
SAVE_MESSAGE = (f"SELECT * FROM whatrack_save_message("  # noqa: S608 (placeholders only: $1 .. $35)
                f"{', '.join(f'${i}' for i in range(1, 9 + len(MESSAGE_COLUMNS)))})")

RECEIPT = """
UPDATE message SET status = $3::text,
       delivered_at = CASE WHEN $5 THEN coalesce(delivered_at, $4) ELSE delivered_at END,
       read_at = CASE WHEN $6 THEN coalesce(read_at, $4) ELSE read_at END,
       deleted_at = CASE WHEN $3::text = 'deleted' THEN coalesce(deleted_at, $4) ELSE deleted_at END
 WHERE instance_id = $1 AND external_id = ANY($2::text[]) AND status = ANY($7::text[])"""

INSTANCE_STATUS = """
UPDATE instance SET status = $2, status_reason = $3, status_at = $4, updated_at = $4, owner = coalesce($5, owner)
 WHERE id = $1"""

FIND_INSTANCE_BY_NAME = "SELECT id, organization_id, name, token_hash FROM instance WHERE name = $1"
FIND_INSTANCE_BY_TOKEN = "SELECT id, organization_id, name, token_hash FROM instance WHERE token_hash = $1"  # noqa: S105

#: Claim up to $1 unpublished rows for $2 seconds: a short transaction of its own (the HTTP call happens after it).
#: The outbox is ``message_outbox`` (migration 0007). A row whose message is published already (marked by a process
#: of the version before 0007, which set ``published_at`` only) is deleted here instead of claimed. The messages are
#: read by primary key (``id = ANY``): a join of the outbox to the message table was planned, once the statement's
#: plan was generic, over the whole message table (7.7 ms per claim at 3,000 msg/s, ``bench/webhook.py``'s open loop).
CLAIM = """
WITH c AS (SELECT o.message_id FROM message_outbox o
            WHERE o.claimed_until IS NULL OR o.claimed_until < clock_timestamp()
            ORDER BY o.message_id LIMIT $1 FOR UPDATE SKIP LOCKED),
     m AS (SELECT m.id, m.published_at IS NOT NULL AS done, m.conversation_id, m.external_id, m.provider_id,
                  m.content, m.sender_type, m.sent_at, m.type, m.direction
             FROM message m WHERE m.id = ANY(ARRAY(SELECT message_id FROM c))),
     gone AS (DELETE FROM message_outbox o WHERE o.message_id = ANY(ARRAY(SELECT id FROM m WHERE done))),
     claimed AS (UPDATE message_outbox o SET claimed_until = clock_timestamp() + make_interval(secs => $2)
                  WHERE o.message_id = ANY(ARRAY(SELECT id FROM m WHERE NOT done)) RETURNING o.message_id)
SELECT m.id, m.conversation_id, m.external_id, m.provider_id, m.content, m.sender_type, m.sent_at, m.type, m.direction
  FROM m JOIN claimed ON claimed.message_id = m.id"""

#: Mark published (first time only: the outbox row goes, whoever deletes it marks); returns each row's publish lag
#: in seconds (commit -> published). ``published_at`` is in no index: the update is HOT (migration 0007). The
#: messages are found by their primary key (``id = ANY``); a join to the CTE was planned as a hash join over a
#: sequential scan of the whole message table.
MARK = """
WITH gone AS (DELETE FROM message_outbox WHERE message_id = ANY($1::bigint[]) RETURNING message_id)
UPDATE message m SET published_at = clock_timestamp()
 WHERE m.id = ANY($1::bigint[]) AND m.published_at IS NULL AND m.id IN (SELECT message_id FROM gone)
RETURNING extract(epoch FROM m.published_at - m.created_at)::float8 AS lag"""

#: Give claimed rows back: at once ($2 = 0) after an outage, later for a row Centrifugo refused.
RELEASE = """
UPDATE message_outbox SET claimed_until = CASE WHEN $2 > 0 THEN clock_timestamp() + make_interval(secs => $2) END
 WHERE message_id = ANY($1::bigint[])"""

DEPTH = "SELECT count(*) FROM message_outbox"

#: Most message writes in one round trip and one commit. Under load, deliveries that arrive while earlier writes are
#: in flight go together: PostgreSQL's CPU per message falls from 0.207 to 0.120 ms in transactions of 20 (one
#: connection, ``fetchmany``), the commit and the round trip being shared. A lone delivery is written at once.
BATCH_MAX = 64
#: Message writes in flight at once per process (each on its own pooled connection). Two batches of 64, not four of
#: 32: fewer transactions contending for the same conversation rows once PostgreSQL's CPU is what saturates
#: (``bench/webhook.py -c 256``, runs alternated: 5,286-5,621 msg/s and PostgreSQL 0.122-0.129 ms/msg, against
#: 5,031-5,494 and 0.126-0.136; open-loop p99 at 2,500 msg/s 7.0-16.2 ms against 7.1-9.3).
FLIGHTS = 2

#: Errors that mean the connection, not the statement, failed: the pool replaces it, the call is tried again.
#: ``InternalClientError`` ("another operation is in progress"): a pooled connection whose server session was ended
#: (``pg_terminate_backend``, a restart) while it sat idle, taken before asyncpg saw the socket close.
_LOST = (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, ConnectionError, asyncpg.InternalClientError)
#: The server refused the credentials (28000 and 28P01) or the database (3D000): configuration, not an outage.
_REFUSED = (asyncpg.InvalidAuthorizationSpecificationError, asyncpg.InvalidCatalogNameError)
#: Values the database can never hold: asyncpg's DataError covers class 22 and its own argument encoding.
_UNSTORABLE = (asyncpg.DataError, UnicodeEncodeError, OverflowError)


def asyncpg_dsn(url: str) -> str:
    """``url`` (any PostgreSQL form whatrack accepts) as the plain ``postgresql://`` DSN asyncpg takes."""
    from whatrack.store.engine import normalise_url

    return make_url(normalise_url(url)).set(drivername="postgresql").render_as_string(hide_password=False)


def describe(e: BaseException) -> str:
    """A one-line, secret-free description of a driver error (no SQL, no parameters, no DSN)."""
    first = (str(e).strip().splitlines() or [""])[0][:240]
    state = getattr(e, "sqlstate", None)
    kind = type(e).__name__
    return f"{kind}{f' [{state}]' if state else ''}: {first}" if first else kind


async def _reset(conn: asyncpg.Connection) -> None:
    """Before a connection goes back to the pool: roll back a transaction left open (a cancelled request).

    asyncpg's default reset sends ``SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`` on every
    release, a round trip per request (about 9 % of the endpoint's CPU, profiled). Pooled connections here take no
    advisory lock, open no cursor outside a statement, LISTEN on nothing (the publisher has its own connection) and
    set nothing per session, so only an open transaction needs undoing.
    """
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


def _settle(f: asyncio.Future[Any], e: BaseException) -> None:
    if not f.done():
        f.set_exception(e)


class Writer:
    """An asyncpg pool on one PostgreSQL database, opened on first use (inside the running event loop)."""

    def __init__(self, url: str, *, safe_url: str, pool_size: int = 10, statement_timeout_ms: int | None = None,
                 batch_max: int = BATCH_MAX, flights: int = FLIGHTS) -> None:
        self._dsn = asyncpg_dsn(url)
        self.safe_url = safe_url
        self._size = pool_size
        self._settings = {"application_name": "whatrack"}
        if statement_timeout_ms:
            self._settings["statement_timeout"] = str(int(statement_timeout_ms))
        self._pool: asyncpg.Pool | None = None
        self._opening = asyncio.Lock()
        self._saved: list[Callable[[], None]] = []
        self._receiver: Callable[[list[dict[str, Any]]], None] | None = None
        self._receiver_lease_s = 0.0
        self.batch_max = batch_max
        self.flights = flights
        self._pending: list[tuple[tuple[Any, ...], asyncio.Future[dict[str, Any]]]] = []
        self._flying: set[asyncio.Task[None]] = set()

    def on_saved(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` after each commit that stored a new message (the outbox publisher's wake-up); returns
        the function that unsubscribes it."""
        self._saved.append(callback)
        return lambda: self._saved.remove(callback) if callback in self._saved else None

    def publish_from_memory(self, receive: Callable[[list[dict[str, Any]]], None],
                            lease_s: float) -> Callable[[], None] | None:
        """Hand the messages this process writes to ``receive`` (this process's outbox publisher), after their commit.

        While a receiver is set, each new message is written already claimed for ``lease_s`` seconds (migration 0006),
        and its stored columns go to ``receive`` in the order written: the publisher publishes it without claiming it
        again. A process that dies first loses nothing (the lease runs out; any publisher's sweep takes the row); a row
        whose receiver was removed before its commit is given back to the outbox at once. One receiver per writer:
        returns the function that removes it, or ``None`` when one is already set (that caller then publishes through
        claims, as before).
        """
        if self._receiver is not None:
            return None
        self._receiver, self._receiver_lease_s = receive, lease_s

        def remove() -> None:
            if self._receiver is receive:
                self._receiver, self._receiver_lease_s = None, 0.0

        return remove

    async def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            async with self._opening:
                if self._pool is None:
                    self._pool = await asyncpg.create_pool(
                        self._dsn, min_size=0, max_size=self._size, timeout=CONNECT_TIMEOUT_S,
                        server_settings=self._settings, max_inactive_connection_lifetime=300, reset=_reset)
        return self._pool

    async def connect(self) -> asyncpg.Connection:
        """A connection of its own (the publisher's LISTEN), outside the pool.

        Raises:
            StoreError: the database cannot be reached.
        """
        try:
            return await asyncpg.connect(self._dsn, timeout=CONNECT_TIMEOUT_S, server_settings=self._settings)
        except (asyncpg.PostgresError, OSError, TimeoutError, asyncpg.InterfaceError) as e:
            raise StoreError(f"database listen failed: {describe(e)}") from e

    async def run(self, op: str, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """``fn`` on a pooled connection, retried on deadlock / serialization failure / a dead connection.

        Raises:
            PayloadError: a value the database can never hold.
            StoreError: any other database failure.
        """
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                pool = await self.pool()
                async with pool.acquire(timeout=POOL_TIMEOUT_S) as conn:
                    try:
                        return await fn(conn)
                    except _LOST as e:
                        if not isinstance(e, _UNSTORABLE):  # asyncpg's DataError is an InterfaceError too
                            conn.terminate()  # not back into the pool: the next attempt gets a new connection
                        raise
            except _UNSTORABLE as e:
                raise PayloadError("unstorable_value", f"database {op} refused a value: {describe(e)}") from e
            except _REFUSED as e:
                log.error("%s: PostgreSQL refused the login on %s: %s: fix DATABASE_URL (user, password, "
                          "database name)", op, self.safe_url, describe(e))
                raise StoreAuthError(f"database {op}: PostgreSQL refused the login ({describe(e)}): fix the user, "
                                     "password or database name in DATABASE_URL") from e
            except (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError,
                    TimeoutError) as e:
                retry = isinstance(e, asyncpg.TransactionRollbackError) or (isinstance(e, _LOST) and attempt == 1)
                if attempt < MAX_ATTEMPTS and retry:
                    log.debug("%s: %s, attempt %d, retrying", op, describe(e), attempt)
                    await asyncio.sleep(random.uniform(0.005, 0.05) * attempt)  # jitter: do not collide again
                    continue
                log.warning("%s failed on %s: %s", op, self.safe_url, describe(e))
                raise StoreError(f"database {op} failed: {describe(e)}") from e
        raise AssertionError("unreachable")  # pragma: no cover

    async def save_message(self, org: int, inst: int, lead: tuple[str, str | None, str | None, bool],
                           new_message: bool, values: dict[str, Any]) -> dict[str, Any]:
        """One call of ``whatrack_save_message``, committed: the message's stored columns plus ``created``.

        Deliveries that arrive while :attr:`flights` writes are in flight wait and go together in the next one (up
        to :attr:`batch_max`: one round trip, one commit; see :data:`BATCH_MAX`). Each caller still returns only after
        the commit that holds its message, and gets its own result or error.

        Raises:
            PayloadError: a value the database can never hold (only this message's caller gets it).
            StoreError: the database failed; nothing of this message was written.
        """
        args = (org, inst, *lead, new_message, *(values[c] for c in MESSAGE_COLUMNS), self._receiver_lease_s)
        done: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending.append((args, done))
        if len(self._flying) < self.flights:
            task = asyncio.create_task(self._fly(), name="whatrack-store-write")
            self._flying.add(task)
            task.add_done_callback(self._flying.discard)
        return await done

    async def _fly(self) -> None:
        """Write what is pending, a batch at a time, until nothing is."""
        while self._pending:
            batch = [(a, f) for a, f in self._pending[:self.batch_max] if not f.done()]  # done: its caller gave up
            del self._pending[:self.batch_max]
            if batch:
                await self._write(batch)

    async def _write(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[dict[str, Any]]]]) -> None:
        # One lock order for every batch (by chat): two batches holding each other's conversation rows would deadlock.
        # The sort is stable, so a chat's messages keep their order (an edit after its message).
        batch.sort(key=lambda item: (item[0][1], item[0][2] or ""))
        try:
            if len(batch) == 1:
                rows = [await self.run("save_message", lambda conn: conn.fetchrow(SAVE_MESSAGE, *batch[0][0]))]
            else:  # one pipeline, one implicit transaction: all of them or none
                rows = await self.run("save_message", lambda conn: conn.fetchmany(SAVE_MESSAGE, [a for a, _ in batch]))
        except PayloadError as e:
            if len(batch) == 1:
                _settle(batch[0][1], e)
                return
            for item in batch:  # one of them cannot be stored: find which, without holding the others back
                if not item[1].done():  # done: its caller gave up meanwhile
                    await self._write([item])
            return
        except asyncio.CancelledError:  # the loop is shutting down: none of them is known to be written
            for _, f in batch:
                _settle(f, StoreError("database write abandoned: the process is stopping"))
            raise
        except Exception as e:  # StoreError (or StoreAuthError): the same for all of them
            for _, f in batch:
                _settle(f, e)
            return
        mine: list[dict[str, Any]] = []  # new rows written claimed for this process's publisher
        created = False
        for (args, f), row in zip(batch, rows, strict=True):
            stored = dict(row)
            if stored["created"]:
                created = True
                if args[-1] > 0:
                    mine.append(stored)
            if not f.done():
                f.set_result(stored)
        if mine:
            if self._receiver is not None:
                self._receiver(mine)
            else:  # written for a publisher that stopped meanwhile: back to the outbox now, not when the lease ends
                await self.give_back([r["id"] for r in mine])
        if created:
            for wake in self._saved:
                wake()

    async def give_back(self, ids: list[int]) -> None:
        """:meth:`release` at once, as far as the database lets it: a failure is logged, the rows' lease still brings
        them back."""
        try:
            await self.release(ids)
        except StoreError as e:
            log.debug("could not give %d row(s) back to the outbox at once (%s); their lease will", len(ids), e)

    async def apply_receipt(self, inst: int, ids: list[str], status: str, at: datetime, timestamps: tuple[bool, bool],
                            sources: tuple[str, ...]) -> int:
        async def call(conn: asyncpg.Connection) -> int:
            done = await conn.execute(RECEIPT, inst, ids, status, at, *timestamps, list(sources))
            return int(done.rsplit(" ", 1)[-1])

        return await self.run("apply_receipt", call)

    async def update_instance_status(self, inst: int, status: str, reason: str | None, at: datetime,
                                     owner: str | None) -> None:
        async def call(conn: asyncpg.Connection) -> None:
            await conn.execute(INSTANCE_STATUS, inst, status, reason, at, owner)

        await self.run("update_instance_status", call)

    async def find_instance(self, name: str | None, digest: str) -> dict[str, Any] | None:
        async def call(conn: asyncpg.Connection) -> dict[str, Any] | None:
            r = await (conn.fetchrow(FIND_INSTANCE_BY_NAME, name) if name
                       else conn.fetchrow(FIND_INSTANCE_BY_TOKEN, digest))
            return dict(r) if r else None

        return await self.run("find_instance", call)

    # -- the realtime outbox ----------------------------------------------------------------------------------------

    async def claim(self, limit: int, lease_s: float) -> list[dict[str, Any]]:
        """Up to ``limit`` unpublished, unclaimed rows, now claimed for ``lease_s`` seconds (oldest first)."""
        async def call(conn: asyncpg.Connection) -> list[dict[str, Any]]:
            return sorted((dict(r) for r in await conn.fetch(CLAIM, limit, float(lease_s))), key=lambda r: r["id"])

        return await self.run("outbox_claim", call)

    async def mark_published(self, ids: list[int]) -> list[float]:
        """Mark rows published; the publish lag (seconds since the row's commit) of each row marked now."""
        async def call(conn: asyncpg.Connection) -> list[float]:
            return [float(r["lag"]) for r in await conn.fetch(MARK, ids)]

        return await self.run("outbox_mark", call)

    async def release(self, ids: list[int], after_s: float = 0.0) -> None:
        """Give claimed rows back to the outbox, claimable again at once or after ``after_s`` seconds."""
        async def call(conn: asyncpg.Connection) -> None:
            await conn.execute(RELEASE, ids, float(after_s))

        await self.run("outbox_release", call)

    async def depth(self) -> int:
        """Rows not yet published."""
        async def call(conn: asyncpg.Connection) -> int:
            return int(await conn.fetchval(DEPTH))

        return await self.run("outbox_depth", call)

    async def aclose(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), 10)
            except TimeoutError:
                pool.terminate()
