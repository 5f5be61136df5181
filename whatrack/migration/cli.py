"""``whatrack migrate probe|inventory|copy|verify|rollback|resume``: the migration's commands."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from whatrack.errors import ConfigError
from whatrack.migration.copy import copy
from whatrack.migration.guard import NOTHING_COPIED, copied_yet, default_checkpoint, parse_time_ms
from whatrack.migration.inventory import inventory
from whatrack.migration.probe import probe
from whatrack.migration.queues import resume_queues
from whatrack.migration.rollback import rollback
from whatrack.migration.verify import verify
from whatrack.settings import Settings

log = logging.getLogger("whatrack.migration.cli")

ORDER = """order:
  cutover:   probe -> inventory -> copy --dry-run -> copy -> verify -> resume
  way back:  rollback -> resume --source

  copy refuses a target that already holds a copy (cutover marker, finished checkpoint, keys changed since):
  verify, rollback, or copy --force (says what it overwrites and that the cutover marker moves)."""


def _urls(need_target: bool = True) -> tuple[str, str, str | None]:
    s = Settings.from_env()
    s.require("LEGACY_REDIS_URL", *(["UPSTASH_REDIS_URL"] if need_target else []))
    assert s.legacy_redis_url is not None
    return s.legacy_redis_url, s.upstash_redis_url or "", s.redis_ca_bundle


def _db_map(items: Sequence[str] | None) -> dict[int, str] | None:
    if not items:
        return None
    out: dict[int, str] = {}
    for item in items:
        db, sep, pfx = item.partition("=")
        if not sep or not db.isdigit() or not pfx:
            raise ConfigError("--db-prefix", f"{item!r} is not DB=PREFIX", "3=db3:")
        out[int(db)] = pfx
    return out


def _cmd_probe(args: argparse.Namespace) -> int:
    source, target, ca = _urls()
    rep = probe(target, ca_bundle=ca, source_url=source)
    for f in rep.findings:
        print(f"{f.status:8} {f.check:12} {f.detail}")
    print(rep.verdict)
    return 0 if rep.ok else 1


def _cmd_inventory(args: argparse.Namespace) -> int:
    source, target, ca = _urls(need_target=args.target)
    inv = inventory(target if args.target else source, ca_bundle=ca)
    for row in inv.to_rows():
        print(f"db{row['db']:<3} {row['prefix']:40} {row['type']:8} {row['keys']}")
    for q in inv.queue_rows():
        print("queue " + " ".join(f"{k}={v}" for k, v in q.items()))
    print(inv.verdict)
    return 0


def _cmd_copy(args: argparse.Namespace) -> int:
    source, target, ca = _urls()
    checkpoint = Path(args.checkpoint) if args.checkpoint else default_checkpoint(source, target)
    if not args.dry_run:
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
    rep = copy(source, target, mode=args.mode, checkpoint_path=checkpoint, dry_run=args.dry_run,
               batch=args.batch, db_prefix_map=_db_map(args.db_prefix), pause_queues=not args.no_pause,
               active_wait_s=args.active_wait, progress=not args.no_progress, ca_bundle=ca, force=args.force)
    print(rep.verdict)
    if args.dry_run:
        print("next: whatrack migrate copy" + (" (see above: it would be refused)" if rep.refusal else ""))
    else:
        print(f"checkpoint: {checkpoint}")
        paused = f"the queues stay paused on the target ({', '.join(rep.queues)}); " if rep.queues else ""
        print(f"next: whatrack migrate verify; {paused}then whatrack migrate resume")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    source, target, ca = _urls()
    if not copied_yet(target, ca_bundle=ca, checkpoint=default_checkpoint(source, target)):
        print(NOTHING_COPIED)
        return 2
    rep = verify(source, target, ca_bundle=ca, ttl_tolerance_s=args.ttl_tolerance,
                 db_prefix_map=_db_map(args.db_prefix))
    for kind, names in rep.samples.items():
        for n in names:
            print(f"{kind:8} {n}")
    print(rep.verdict)
    return 0 if rep.ok else 1


def _cmd_rollback(args: argparse.Namespace) -> int:
    source, target, ca = _urls()
    since = parse_time_ms(args.since) if args.since else None
    rep = rollback(source, target, since=since, ca_bundle=ca, mode=args.mode, dry_run=args.dry_run,
                   db_prefix_map=_db_map(args.db_prefix))
    print(rep.verdict)
    print(rep.next_step)
    return 0 if rep.ok else 1


def _cmd_resume(args: argparse.Namespace) -> int:
    source, target, ca = _urls(need_target=not args.source)
    names = resume_queues(source if args.source else target, ca_bundle=ca)
    print(f"resumed {len(names)} queue(s): {', '.join(names) or '-'}")
    return 0


def add_commands(subparsers: Any) -> None:
    """``whatrack migrate probe|inventory|copy|verify|rollback|resume`` (LEGACY_REDIS_URL -> UPSTASH_REDIS_URL)."""
    p = subparsers.add_parser("migrate", help="move Redis (BullMQ queues included) from the legacy server to Upstash",
                              epilog=ORDER, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="migrate_command", metavar="STEP", required=True)
    s = sub.add_parser("probe", help="what the target accepts; exit 1 on a blocker")
    s.set_defaults(func=_cmd_probe)
    s = sub.add_parser("inventory", help="keys by prefix and type, jobs per state")
    s.add_argument("--target", action="store_true", help="inventory the target instead of the source")
    s.set_defaults(func=_cmd_inventory)
    s = sub.add_parser("copy", help="pause queues, copy every key with its TTL (resumable)")
    s.add_argument("--mode", choices=["auto", "dump", "logical"], default="auto")
    s.add_argument("--dry-run", action="store_true", help="count what would be copied; write nothing")
    s.add_argument("--checkpoint", default=None,
                   help="resume file (default: $WHATRACK_STACK_DIR/migration/ offline, else "
                        "~/.local/state/whatrack/migration/; never the current directory)")
    s.add_argument("--force", action="store_true",
                   help="copy over a target that already holds a copy: says what it overwrites, moves the marker")
    s.add_argument("--batch", type=int, default=500, help="keys per SCAN page and pipeline")
    s.add_argument("--db-prefix", action="append", metavar="DB=PREFIX", help="prefix for keys of database DB")
    s.add_argument("--no-pause", action="store_true", help="do not pause the source queues (not recommended)")
    s.add_argument("--active-wait", type=float, default=30.0, help="seconds to wait for active jobs")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_copy)
    s = sub.add_parser("verify", help="compare both ways; exit 1 on any mismatch, 2 when nothing was copied yet")
    s.add_argument("--ttl-tolerance", type=float, default=2.0, help="seconds")
    s.add_argument("--db-prefix", action="append", metavar="DB=PREFIX")
    s.set_defaults(func=_cmd_verify)
    s = sub.add_parser("rollback", help="bring changes since the cutover back to the source, then verify")
    s.add_argument("--since", default=None,
                   help="epoch ms or ISO-8601 time (default: the cutover marker the copy recorded)")
    s.add_argument("--mode", choices=["auto", "dump", "logical"], default="auto")
    s.add_argument("--dry-run", action="store_true")
    s.add_argument("--db-prefix", action="append", metavar="DB=PREFIX")
    s.set_defaults(func=_cmd_rollback)
    s = sub.add_parser("resume", help="resume the BullMQ queues on the target (or --source)")
    s.add_argument("--source", action="store_true")
    s.set_defaults(func=_cmd_resume)


if __name__ == "__main__":  # ``python -m whatrack.migration.cli ARGS`` is ``python -m whatrack.cli migrate ARGS``
    import runpy

    sys.argv[1:1] = ["migrate"]  # run the top-level command as a program: this module never imports it
    runpy.run_module("whatrack.cli", run_name="__main__", alter_sys=True)
