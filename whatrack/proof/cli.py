"""The proof commands: ``whatrack loadtest``, ``whatrack faults`` and ``whatrack replay``.

Building the parser imports only :mod:`whatrack.proof.config` (the defaults); the tooling behind a command
(:mod:`~whatrack.proof.load`, :mod:`~whatrack.proof.faults`, :mod:`~whatrack.proof.replay`) is imported when it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from whatrack.proof.config import DEFAULT_CONCURRENCY, LoadConfig, MatrixConfig
from whatrack.settings import Settings

if TYPE_CHECKING:
    from whatrack.proof.replay import ReplayRow


# -- whatrack loadtest ----------------------------------------------------------------------------------------------

def _dotenv() -> dict[str, str]:
    from dotenv import dotenv_values

    return {k: v for k, v in dotenv_values(".env").items() if v is not None} if os.path.isfile(".env") else {}


def _cmd_loadtest(args: argparse.Namespace) -> int:
    from whatrack.proof.load import EndpointProcess, run_load, settle_timeout_for

    settings = Settings.from_env()
    config = LoadConfig(n=args.messages, seed=args.seed if args.seed is not None else int(time.time()) % 1_000_000,
                        instances=args.instances, leads=args.leads, rate=args.rate, concurrency=args.concurrency,
                        retries=args.retries, replay_dlq=not args.no_replay,
                        settle_timeout=args.settle_timeout if args.settle_timeout is not None
                        else settle_timeout_for(args.retries))
    endpoint = None
    if args.serve:
        env = {k: v for k, v in os.environ.items()}
        env.update({k: v for k, v in _dotenv().items() if k not in env})
        endpoint = EndpointProcess(env, workers=args.workers).start()
    try:
        result = asyncio.run(run_load(settings, config))
    finally:
        if endpoint is not None:
            endpoint.close()
    width = max(len(k) for k in result.summary())
    for k, v in result.summary().items():
        print(f"{k.ljust(width)}  {v}")
    print(result.ledger.summary())
    note = result.pending_note()
    if note:
        print(note)
    return 0 if result.passed else 1


def _add_loadtest(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("loadtest", help="publish N generated webhooks through QStash and prove none was lost")
    p.add_argument("-n", "--messages", type=int, default=1000, help="how many webhooks (default 1000)")
    p.add_argument("--rate", type=float, default=None, help="target publishes per second (default: as fast as it goes)")
    p.add_argument("--seed", type=int, default=None, help="repeat a run's exact bodies (default: a fresh seed)")
    p.add_argument("--instances", type=int, default=3)
    p.add_argument("--leads", type=int, default=50, help="leads (conversations) per instance")
    p.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="publishes in flight")
    p.add_argument("--retries", type=int, default=3, help="QStash delivery retries per message")
    p.add_argument("--settle-timeout", type=float, default=None,
                   help="seconds to wait for the last delivery (default: QStash's backoff for --retries, plus 60 s; "
                        "the wait ends as soon as QStash has settled every message)")
    p.add_argument("--no-replay", action="store_true", help="leave the DLQ alone")
    p.add_argument("--serve", action="store_true",
                   help="run the endpoint (whatrack serve) as a subprocess on WEBHOOK_PUBLIC_URL's port")
    p.add_argument("--workers", type=int, default=2, help="uvicorn workers with --serve")
    p.set_defaults(func=_cmd_loadtest)


# -- whatrack faults ------------------------------------------------------------------------------------------------

def _cloud_env() -> dict[str, str]:
    """This process's environment with ``.env`` under it (the environment wins), as ``loadtest --serve`` passes."""
    env = dict(os.environ)
    env.update({k: v for k, v in _dotenv().items() if k not in env})
    return env


def _cmd_faults(args: argparse.Namespace) -> int:
    from urllib.parse import urlsplit

    from whatrack.proof.faults import run_matrix
    from whatrack.proof.scenarios import SCENARIOS, cloud_safe, offline_only, select

    cfg = MatrixConfig(n=args.messages, outage_s=args.outage, workers=args.workers, time_scale=args.time_scale,
                       seed=args.seed, concurrency=args.concurrency, rate=args.rate, settle_timeout=args.settle_timeout,
                       followup_jobs=args.jobs, idle_s=args.idle, progress=False)
    settings = Settings.from_env()
    if settings.mode == "cloud":
        # The configured services, no stack: the cloud-safe scenarios only (an offline-only --only is refused).
        chosen = select(args.only, mode="cloud", what="--only") if args.only else cloud_safe()
        settings.require("QSTASH_TOKEN", "WEBHOOK_PUBLIC_URL")
        print(f"whatrack faults: cloud mode, no devstack: QStash at "
              f"{urlsplit(settings.qstash_url).hostname}, endpoint run here for {settings.webhook_public_url}; "
              f"scenarios {', '.join(s.name for s in chosen)} (offline only, not run: "
              f"{', '.join(s.name for s in offline_only())})", flush=True)
        run = run_matrix(chosen, cfg, env=_cloud_env())
    else:
        chosen = select(args.only, mode="offline", what="--only") if args.only else list(SCENARIOS)
        print(f"whatrack faults: offline mode: its own devstack in {args.stack_dir} (brought up and down here); "
              f"scenarios {', '.join(s.name for s in chosen)}", flush=True)
        run = run_matrix(chosen, cfg, stack_dir=Path(args.stack_dir))
    rows = run.rows()
    cols = ["scenario", "passed", "messages", "ok", "lost", "duplicated", "unexpected", "recovered", "unknown",
            "undelivered", "retries", "dlq", "stored_per_s", "commit_p99_ms", "seconds"]
    print("  ".join(cols))
    for r in rows:
        print("  ".join(str(r.get(c, "")) for c in cols) + f"  | {r['notes']} {r['error']}".rstrip())
    projection = run.projection(webhooks_per_day=args.webhooks_per_day, followups_per_day=args.followups_per_day)
    if projection is not None:
        print()
        for row in projection.table():
            print(f"{row['item']}: {row['projection']}  [{row['plan figure']}]  ({row['source']})")
    if args.out:
        out = {"config": asdict(cfg), "rows": rows, "idle_cmds": run.idle_cmds, "idle_s": run.idle_s,
               "projection": projection.table() if projection else None}
        Path(args.out).write_text(json.dumps(out, indent=2, default=str))
    return 0 if run.passed else 1


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def _add_faults(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("faults", help="run the fault matrix under load and reconcile every message (offline: on its "
                       "own devstack; WHATRACK_MODE=cloud: the cloud-safe scenarios against the configured services)")
    p.add_argument("-n", "--messages", type=int, default=MatrixConfig.n, help="messages per scenario")
    p.add_argument("--outage", type=float, default=MatrixConfig.outage_s, help="seconds each outage lasts")
    p.add_argument("--workers", type=int, default=MatrixConfig.workers, help="uvicorn worker processes")
    p.add_argument("--time-scale", type=float, default=MatrixConfig.time_scale, help="QStash backoff scale")
    p.add_argument("--seed", type=int, default=MatrixConfig.seed)
    p.add_argument("--concurrency", type=int, default=MatrixConfig.concurrency, help="publishes in flight")
    p.add_argument("--rate", type=float, default=None, help="publishes per second (default: as fast as it goes)")
    p.add_argument("--settle-timeout", type=float, default=MatrixConfig.settle_timeout)
    p.add_argument("--jobs", type=int, default=MatrixConfig.followup_jobs, help="follow-up jobs (worker row)")
    p.add_argument("--idle", type=float, default=MatrixConfig.idle_s, help="idle window for the Redis rate (s)")
    p.add_argument("--only", type=_names, default=None,
                   help="comma-separated scenario names (cloud mode: cloud-safe ones only)")
    p.add_argument("--stack-dir", default="runs/.faults-stack")
    p.add_argument("--webhooks-per-day", type=float, default=20_000.0, help="for the cost projection")
    p.add_argument("--followups-per-day", type=float, default=2_000.0, help="for the cost projection")
    p.add_argument("--out", default=None, help="write the rows and the projection as JSON here")
    p.set_defaults(func=_cmd_faults)


# -- whatrack replay ------------------------------------------------------------------------------------------------

def _print_rows(rows: Sequence[ReplayRow]) -> None:
    cols = ["file", "event", "expected", "qstash_state", "stored", "published", "ok"]
    data = [{**asdict(r), "ok": r.ok} for r in rows]
    widths = {c: max(len(c), *(len(str(d[c])) for d in data)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for d in data:
        print("  ".join(str(d[c]).ljust(widths[c]) for c in cols))


def _cmd_replay(args: argparse.Namespace) -> int:
    from whatrack.proof.replay import endpoint_for, replay

    settings = Settings.from_env()
    paths = [Path(p) for p in args.paths] or None

    async def main() -> list[ReplayRow]:
        if args.serve:
            async with endpoint_for(settings):
                return await replay(settings, paths, unique=args.unique)
        return await replay(settings, paths, unique=args.unique)

    rows = asyncio.run(main())
    _print_rows(rows)
    bad = [r for r in rows if not r.ok]
    print(f"{len(rows) - len(bad)}/{len(rows)} bodies ended as expected")
    return 1 if bad else 0


def _add_replay(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("replay", help="replay UAZAPI webhook bodies through QStash to the endpoint")
    p.add_argument("paths", nargs="*", help="JSON bodies (default: the bundled UAZAPI fixtures)")
    p.add_argument("--serve", action="store_true", help="run the endpoint in-process on WEBHOOK_PUBLIC_URL's port")
    p.add_argument("--unique", action="store_true", help="give every message a fresh id")
    p.set_defaults(func=_cmd_replay)


# -- whatrack dlq ---------------------------------------------------------------------------------------------------

def _cmd_dlq(args: argparse.Namespace) -> int:
    from whatrack.proof.ledger import dlq_items, replay_dlq
    from whatrack.proof.replay import require_endpoint
    from whatrack.qstash import Publisher

    settings = Settings.from_env()
    settings.require("QSTASH_TOKEN", "WEBHOOK_PUBLIC_URL")

    async def main() -> int:
        publisher = Publisher.from_settings(settings)
        try:
            items = await dlq_items(publisher)
            print(f"{len(items)} DLQ entr{'y' if len(items) == 1 else 'ies'} for {publisher.destination}")
            for it in items:
                print(f"  {it.dlq_id}  status {it.status}  {it.provider_id or '(not a UAZAPI message)'}")
            if not args.replay or not items:
                if items and not args.replay:
                    print("replay them, once the cause is fixed (e.g. DATABASE_URL): whatrack dlq --replay")
                return 0
            await require_endpoint(settings.webhook_public_url)  # a replay into a silent endpoint lands here again
            done = await replay_dlq(publisher, items)
            left = len(items) - len(done)
            print(f"replayed {len(done)}; {left} left in the DLQ" + (" (not UAZAPI messages, or refused: see the "
                                                                       "log)" if left else ""))
            return 1 if left else 0
        finally:
            await publisher.aclose()

    return asyncio.run(main())


def _add_dlq(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("dlq", help="list QStash's DLQ entries for WEBHOOK_PUBLIC_URL; --replay publishes them again")
    p.add_argument("--replay", action="store_true", help="republish every entry (new QStash messages), then delete "
                   "it from the DLQ; the endpoint is idempotent, so a message already stored is not stored twice")
    p.set_defaults(func=_cmd_dlq)


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``whatrack loadtest``, ``whatrack faults``, ``whatrack replay`` and ``whatrack dlq``."""
    _add_loadtest(sub)
    _add_faults(sub)
    _add_replay(sub)
    _add_dlq(sub)
