"""``whatrack alerts check`` and ``whatrack alerts rules`` (the rules and the sources: :mod:`whatrack.alerts.rules`)."""

from __future__ import annotations

import argparse
import asyncio
import os

from whatrack.alerts.rules import check, default_metrics_url, default_rules, notify, parse_window, render_table
from whatrack.settings import Settings


def _seconds(text: str) -> float:
    try:
        return parse_window(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _cmd_check(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    metrics_url = args.metrics_url or default_metrics_url(settings)
    notify_url = args.notify_url or os.environ.get("WHATRACK_ALERT_WEBHOOK_URL") or None
    rules = default_rules(slow_s=args.slow_seconds, window_s=args.window)
    results = asyncio.run(check(settings, metrics_url=metrics_url, window_s=args.window, rules=rules))
    print(render_table(results))
    if notify_url:
        problem = asyncio.run(notify(notify_url, results))
        if problem:
            print(f"whatrack alerts: {problem}")
    firing = [r.rule for r in results if r.state == "firing"]
    if firing:
        print(f"whatrack alerts: firing: {', '.join(firing)}")
        return 1
    return 0


def _cmd_rules(args: argparse.Namespace) -> int:
    for r in default_rules():
        limit = f"> {r.threshold:g} {r.unit}"
        print(f"{r.name:<20} {r.severity:<8} {limit:<16} {r.description}")
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("alerts", help="evaluate the PRD §10.3 alert rules against a running service")
    s = p.add_subparsers(dest="alerts_command", metavar="SUBCOMMAND", required=True)
    c = s.add_parser("check", help="two snapshots WINDOW apart; exit 1 when a rule fires")
    c.add_argument("--metrics-url", default=None, help="default: /metrics beside WEBHOOK_PUBLIC_URL")
    c.add_argument("--window", type=_seconds, default=30.0, help="time between the two snapshots (default 30s)")
    c.add_argument("--notify-url", default=None,
                   help="POST firing alerts here as JSON (default: env WHATRACK_ALERT_WEBHOOK_URL)")
    c.add_argument("--slow-seconds", type=float, default=10.0,
                   help="a delivery slower than this counts as slow (default 10; the handler times out at 20)")
    c.set_defaults(func=_cmd_check)
    r = s.add_parser("rules", help="list the rules and thresholds")
    r.set_defaults(func=_cmd_rules)
