"""``whatrack worker`` and ``whatrack followup schedule|resume``; ``python -m whatrack.followups.cli`` runs the worker
alone.

The queue (:mod:`whatrack.followups.jobs`) and the worker (:mod:`whatrack.followups.worker`) are imported by the
command that runs, not by building the parser.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime, timedelta

from whatrack import logs
from whatrack.durations import parse_seconds
from whatrack.errors import ConfigError, WhatrackError
from whatrack.followups.constants import DEFAULT_CONCURRENCY
from whatrack.settings import Settings


def parse_duration(text: str) -> timedelta:
    """``"10m"``, ``"1h30m"``, ``"45s"``, ``"500ms"``, ``"2d"`` or plain seconds (``"90"``) as a timedelta.

    Raises:
        ValueError: not a duration (the message shows good ones).
    """
    return timedelta(seconds=parse_seconds(text))


def _duration_arg(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _redis_from_env() -> tuple[str, str | None]:
    settings = Settings.from_env()
    settings.require("UPSTASH_REDIS_URL")
    assert settings.upstash_redis_url
    return settings.upstash_redis_url, settings.redis_ca_bundle


def _cmd_schedule(args: argparse.Namespace) -> int:
    from whatrack.followups.jobs import open_queue, schedule_followup

    url, ca = _redis_from_env()

    async def go() -> str:
        q = open_queue(url, ca_bundle=ca)
        try:
            return await schedule_followup(q, organization_id=args.organization_id, instance_id=args.instance_id,
                                           lead_id=args.lead_id, text=args.text,
                                           run_at=datetime.now(UTC) + args.in_, job_id=args.job_id)
        finally:
            await q.close()

    job_id = asyncio.run(go())
    print(job_id)
    return 0


def _cmd_resume(args: argparse.Namespace) -> int:
    from whatrack.followups.jobs import open_queue
    from whatrack.settings import mask_url

    url, ca = _redis_from_env()

    async def go() -> bool:
        q = open_queue(url, ca_bundle=ca)
        try:
            was = bool(await q.isPaused())
            if was:
                await q.resume()
            return was
        finally:
            await q.close()

    was_paused = asyncio.run(go())
    print(f"queue followup on {mask_url(url)} " + ("resumed: workers take its jobs again" if was_paused
                                                   else "was not paused: nothing to do"))
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    from whatrack.followups import worker

    return worker.main(concurrency=args.concurrency, context=args.context, metrics_port=args.metrics_port,
                       metrics_host=args.metrics_host)


def _port_arg(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (0-65535; 0 picks a free one), e.g. 9101")
    return int(text)


def _add_worker_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="jobs run at the same time")
    p.add_argument("--context", default=None, metavar="MODULE:FUNCTION",
                   help="async factory (settings) -> WorkerContext; default: the real store, UAZAPI and Centrifugo")
    p.add_argument("--metrics-port", type=_port_arg, default=None, metavar="PORT",
                   help="serve the worker's Prometheus metrics at http://HOST:PORT/metrics (queue paused, jobs "
                        "per state, job outcomes, Redis errors); default: not served")
    p.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST",
                   help="address the metrics server binds (default 127.0.0.1; 0.0.0.0 for a scraper elsewhere)")


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``whatrack worker`` and ``whatrack followup schedule``."""
    w = subparsers.add_parser("worker", help="run the follow-up worker (UPSTASH_REDIS_URL) until SIGTERM/SIGINT")
    _add_worker_options(w)
    w.set_defaults(func=_cmd_worker)

    f = subparsers.add_parser("followup", help="follow-up jobs")
    fsub = f.add_subparsers(dest="followup_command", metavar="ACTION", required=True)
    s = fsub.add_parser("schedule", help="schedule one follow-up (prints its job id)",
                        description="Schedule one follow-up on the followup queue (UPSTASH_REDIS_URL). The ids are "
                                    "whatrack's database ids: `whatrack leads` lists them (organization, instance, "
                                    "lead); the worker sends through that instance to that lead, unless the lead "
                                    "replied in the meantime.")
    s.add_argument("--organization-id", type=int, required=True, metavar="ID",
                   help="the organization the instance and the lead belong to (`whatrack leads`, column org)")
    s.add_argument("--instance-id", type=int, required=True, metavar="ID",
                   help="the UAZAPI instance that sends (`whatrack leads` or `whatrack instances list`, column id); "
                        "its token must be in UAZAPI_INSTANCE_TOKENS where the worker runs")
    s.add_argument("--lead-id", type=int, required=True, metavar="ID",
                   help="the lead to write to (`whatrack leads`, column lead)")
    s.add_argument("--text", required=True, help="the message text (1 to 65536 characters)")
    s.add_argument("--in", dest="in_", type=_duration_arg, required=True, metavar="DURATION",
                   help="when, from now: 10m, 1h30m, 45s, 2d")
    s.add_argument("--job-id", default=None, help="stable id: scheduling again with it is a no-op")
    s.set_defaults(func=_cmd_schedule)
    r = fsub.add_parser("resume", help="resume the followup queue if it is paused (a migration leaves it paused)")
    r.set_defaults(func=_cmd_resume)


def cli_main(argv: list[str] | None = None) -> int:
    """``python -m whatrack.followups.cli [--concurrency N] [--context M:F]``: ``whatrack worker`` without loading every
    other subcommand's module."""
    from whatrack.followups import worker

    parser = argparse.ArgumentParser(prog="python -m whatrack.followups.cli", description="run the follow-up worker")
    _add_worker_options(parser)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logs.configure("DEBUG" if args.verbose else "INFO")
    try:
        return worker.main(concurrency=args.concurrency, context=args.context, metrics_port=args.metrics_port,
                           metrics_host=args.metrics_host)
    except WhatrackError as e:
        print(f"whatrack worker: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1


if __name__ == "__main__":
    raise SystemExit(cli_main())
