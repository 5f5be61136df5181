"""Writes per second of the webhook's message write with and without a ``NOTIFY`` in its transaction, on a durable
PostgreSQL (fsync on, as in production), from many connections at once.

Why it matters: PostgreSQL delivers notifications in commit order, so a transaction that issued ``NOTIFY`` takes a
database-wide lock before its commit and holds it until the commit is flushed: notifying commits queue one behind the
other and lose group commit. Migration 0004 took the ``NOTIFY`` out of ``whatrack_save_message`` (the endpoint wakes
its own outbox publisher in memory). The devstack runs PostgreSQL with fsync off, where the difference does not show;
this script measures it where it does.

The baseline is the shipped function (no ``NOTIFY``); the other leg is the same function with the ``PERFORM
pg_notify(...)`` 0003 had, created under another name in the same database. Both legs run in the same database,
alternating, with the same load (``-c`` connections, new messages for 200 known leads).

Usage: ``python bench/notify.py [-n 4000] [-c 16] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from whatrack.devstack import servers  # noqa: E402
from whatrack.store.write import MESSAGE_COLUMNS, SAVE_MESSAGE, asyncpg_dsn  # noqa: E402

NOTIFYING = "whatrack_save_message_notifying"


def _function_source() -> str:
    """The shipped function's text (the head migration's), renamed, with 0003's NOTIFY after the insert."""
    import runpy

    versions = ROOT / "whatrack" / "store" / "alembic" / "versions"
    text = str(runpy.run_path(str(versions / "0006_message_write_claims_for_its_publisher.py"))
               ["save_message_function"]())
    marker = "        ELSE  -- a concurrent delivery of the same message won"
    assert marker in text and "pg_notify" not in text, "the function changed: update bench/notify.py"
    text = text.replace("whatrack_save_message(", f"{NOTIFYING}(", 1)
    return text.replace(marker, "            PERFORM pg_notify('whatrack_outbox', '');\n" + marker, 1)


async def measure(dsn: str, n: int, connections: int, rounds: int) -> None:
    import asyncpg

    pool = await asyncpg.create_pool(dsn, min_size=connections, max_size=connections)
    async with pool.acquire() as c:
        await c.execute(_function_source())
        org = await c.fetchval("INSERT INTO organization (name, created_at) VALUES ($1, now()) RETURNING id",
                               f"bench {uuid.uuid4().hex[:8]}")
        inst = await c.fetchval(
            "INSERT INTO instance (organization_id, name, token_hash, status, created_at, updated_at) "
            "VALUES ($1, $2, $3, 'connected', now(), now()) RETURNING id", org, uuid.uuid4().hex, uuid.uuid4().hex)
    now = dt.datetime.now(dt.UTC)

    def args(i: int) -> tuple[Any, ...]:
        phone = f"55119{i % 200:08d}"
        mid = uuid.uuid4().hex.upper()
        v: dict[str, Any] = dict.fromkeys(MESSAGE_COLUMNS)
        v.update(provider_id=f"bench:{mid}", external_id=mid, direction="inbound", sender_type="LEAD", type="text",
                 raw_type="conversation", content=f"bench {i}", media_voice=False, sent_by_api=False,
                 status="delivered", sent_at=now, delivered_at=now)
        return (org, inst, f"{phone}@s.whatsapp.net", phone, "Lead", False, True, *(v[k] for k in MESSAGE_COLUMNS),
                0.0)  # unclaimed (the claim for an in-process publisher is the same in both legs)

    async def leg(query: str) -> float:
        todo = iter(range(n))

        async def worker() -> None:
            for i in todo:
                async with pool.acquire() as conn:
                    await conn.fetchrow(query, *args(i))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        return n / (time.perf_counter() - t0)

    notifying = SAVE_MESSAGE.replace("whatrack_save_message(", f"{NOTIFYING}(", 1)
    await leg(SAVE_MESSAGE)  # warm: plans, caches, the leads
    print(f"{n} writes per leg, {connections} connections, fsync on")
    for r in range(1, rounds + 1):
        plain, notified = await leg(SAVE_MESSAGE), await leg(notifying)
        print(f"round {r}: shipped (no NOTIFY) {plain:7.0f} writes/s   with NOTIFY {notified:7.0f} writes/s   "
              f"ratio with/without {notified / plain:.2f}")
    await pool.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=4000, help="writes per leg")
    ap.add_argument("-c", "--connections", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()

    from whatrack.store import Store

    tmp = Path(tempfile.mkdtemp(prefix="bench-notify-"))
    pg = servers.EmbeddedPostgres(tmp / "pg", durable=True).start()
    try:
        url = servers.create_database(pg.url, "bench_notify")

        async def migrate() -> None:
            store = Store.from_url(url)
            await store.upgrade()
            await store.aclose()

        asyncio.run(migrate())
        asyncio.run(measure(asyncpg_dsn(url), a.n, a.connections, a.rounds))
    finally:
        pg.stop()
        pg.remove()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    from whatrack.cli import run_script

    run_script(main)  # SIGTERM (timeout, CI) stops the servers it started, as Ctrl-C does
