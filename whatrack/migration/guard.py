"""What keeps a copy or a rollback from destroying anything: look at the target before writing, say what is there.

* :func:`inspect_target` reads the cutover marker a copy left on the target and, when there is one, compares the two
  sides (the verify's key pass) to find keys changed after the cutover; :class:`TargetState` says whether a new copy
  would overwrite something, and words the refusal (with the choices: verify, rollback, ``--force``) or, under
  ``--force``, what is about to be overwritten.
* :func:`default_checkpoint`: where a copy keeps its checkpoint when none is given (the devstack's folder offline,
  else a per-user state folder), never the working directory.
* :func:`real_run`: in cloud mode a notebook copies or rolls back for real only when told the target's host name.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import redis

from whatrack import redis_tcp
from whatrack.errors import MigrationError
from whatrack.migration.keys import BULL_PREFIX, CUTOVER_KEY
from whatrack.migration.verify import verify
from whatrack.settings import mask_url
from whatrack.times import iso as iso_ms

log = logging.getLogger("whatrack.migration.guard")

#: Key names quoted in a refusal or a --force notice (the counts are always complete).
SHOWN = 5

CHOICES = ("`whatrack migrate verify` (compare the two sides, change nothing), `whatrack migrate rollback` (bring "
           "the target's changes back to the legacy Redis), or `whatrack migrate copy --force` (copy(force=True): "
           "overwrite them and move the cutover marker)")

NEXT_AFTER_ROLLBACK = ("the legacy Redis's queues stay paused: check it, then resume them with "
                       "`whatrack migrate resume --source`")

NOTHING_COPIED = "nothing copied yet: run `whatrack migrate copy` first"


def parse_time_ms(text: str) -> int:
    """Epoch milliseconds from ``1764853806123`` or an ISO-8601 time (``2026-12-04T13:10:06Z``; UTC when no zone).

    Raises:
        MigrationError: neither.
    """
    t = text.strip()
    if t.isdigit():
        return int(t)
    try:
        dt = datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        raise MigrationError(f"{text!r} is not a time: give epoch milliseconds or ISO-8601, e.g. "
                             "2026-12-04T13:10:06Z") from None
    return int((dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp() * 1000)


def _state_home(environ: Mapping[str, str]) -> Path:
    base = environ.get("XDG_STATE_HOME") or str(Path(environ.get("HOME") or Path.home()) / ".local" / "state")
    return Path(base) / "whatrack"


def default_checkpoint(source_url: str, target_url: str, *, environ: Mapping[str, str] | None = None) -> Path:
    """The checkpoint of a copy from ``source_url`` to ``target_url`` when none is given: in the devstack's folder
    (``$WHATRACK_STACK_DIR/migration/``, offline) or else in ``$XDG_STATE_HOME/whatrack/migration/`` (by default
    ``~/.local/state/whatrack/migration/``); one file per source/target pair. Never the working directory."""
    env = os.environ if environ is None else environ
    stack = env.get("WHATRACK_STACK_DIR")
    offline = (env.get("WHATRACK_MODE") or "offline").lower() != "cloud"
    folder = Path(stack) / "migration" if stack and offline else _state_home(env) / "migration"
    pair = f"{mask_url(source_url)} -> {mask_url(target_url)}".encode()
    return folder / f"copy-{hashlib.sha256(pair).hexdigest()[:12]}.checkpoint.json"


def _names(names: list[str]) -> str:
    return ", ".join(names[:SHOWN]) + (", ..." if len(names) > SHOWN else "")


@dataclass
class TargetState:
    """What a new copy would find on the target: the marker, a finished checkpoint, keys changed since."""

    target: str
    marker: dict[str, str] = field(default_factory=dict)
    checkpoint: str | None = None     # path of a finished (or orphaned) checkpoint of this pair
    checkpoint_note: str = ""
    differ: int = 0                   # keys whose type or value differs from the source's
    differ_names: list[str] = field(default_factory=list)
    target_only: int = 0
    target_only_names: list[str] = field(default_factory=list)
    source_only: int = 0

    @property
    def at_ms(self) -> int | None:
        v = self.marker.get("at_ms")
        return int(v) if v else None

    @property
    def blocking(self) -> bool:
        """A new copy would overwrite a finished copy (and whatever changed on the target since)."""
        return bool(self.marker or self.checkpoint)

    def found(self) -> str:
        """What is on the target, in one sentence."""
        parts = []
        if self.marker:
            done = self.marker.get("completed_ms")
            parts.append(f"a cutover marker (copy from {self.marker.get('source', '?')} at {iso_ms(self.at_ms)}, "
                         + (f"finished {iso_ms(int(done))})" if done else "never finished)"))
        if self.checkpoint:
            parts.append(f"checkpoint {self.checkpoint} ({self.checkpoint_note})")
        if self.marker:
            parts.append(f"{self.differ} key(s) changed after the cutover (differ from the source"
                         + (f": {_names(self.differ_names)})" if self.differ else ")"))
            parts.append(f"{self.target_only} key(s) only on the target"
                         + (f" ({_names(self.target_only_names)})" if self.target_only else ""))
        return "; ".join(parts)

    def refusal(self, *, dry_run: bool = False) -> str:
        head = "a real copy would be refused" if dry_run else "copy refused"
        return (f"{head}: {self.target} already holds a copy: {self.found()}. Copying again would overwrite them "
                f"and move the cutover marker. Choose {CHOICES}")

    def force_notice(self, new_at_ms: int, *, dry_run: bool = False) -> str:
        """What a forced copy is about to do (or would do, in a dry run), said before it does it."""
        moves = (f"the cutover marker moves from {iso_ms(self.at_ms)} to {iso_ms(new_at_ms)}" if self.at_ms
                 else f"a new cutover marker at {iso_ms(new_at_ms)}")
        kept = f"; {self.target_only} key(s) only on the target stay as they are" if self.target_only else ""
        return (f"copy --force: {'would overwrite' if dry_run else 'overwriting'} {self.differ} key(s) changed on "
                "the target"
                + (f" ({_names(self.differ_names)})" if self.differ else "")
                + f" with the source's values{kept}; {moves}"
                + (f"; checkpoint {self.checkpoint} is started over" if self.checkpoint else ""))


def read_marker(client: redis.Redis) -> dict[str, str]:
    """The cutover marker hash on a target (empty when there is none)."""
    raw: dict[bytes, bytes] = client.hgetall(CUTOVER_KEY)  # type: ignore[assignment]
    return {k.decode(): v.decode(errors="replace") for k, v in raw.items()}


def inspect_target(source_url: str, target_url: str, marker: dict[str, str], *, checkpoint: str | None = None,
                   checkpoint_note: str = "", ca_bundle: str | None = None,
                   db_prefix_map: dict[int, str] | None = None, prefix: str = BULL_PREFIX) -> TargetState:
    """The target's state for a new copy. With a marker, both sides are compared key by key (no job pass), so
    the refusal can name the keys changed after the cutover; without one, nothing is read."""
    st = TargetState(target=mask_url(target_url) or "", marker=marker, checkpoint=checkpoint,
                     checkpoint_note=checkpoint_note)
    if marker:

        v = verify(source_url, target_url, ca_bundle=ca_bundle, db_prefix_map=db_prefix_map, prefix=prefix,
                   check_jobs=False)
        st.differ = v.counts["value"] + v.counts["type"]
        st.differ_names = v.samples["value"] + [s.split(" ")[0] for s in v.samples["type"]]
        st.target_only, st.target_only_names = v.counts["extra"], v.samples["extra"]
        st.source_only = v.counts["missing"]
    return st


def copied_yet(target_url: str, *, ca_bundle: str | None = None, checkpoint: Path | None = None) -> bool:
    """Whether a copy ever ran into ``target_url``: its cutover marker is there, or its checkpoint exists."""
    c = redis_tcp.connect_sync(target_url, ca_bundle=ca_bundle)
    try:
        there = bool(c.exists(CUTOVER_KEY))
    finally:
        c.close()
    return there or (checkpoint is not None and checkpoint.is_file())


def target_host(url: str) -> str:
    return urlsplit(url).hostname or ""


def real_run(target_url: str, confirm_target_host: str, *, cloud: bool, what: str = "copy") -> tuple[bool, str]:
    """Whether a notebook does ``what`` (a verb: "copy", "roll back") for real, else a dry run, and why, in one
    sentence. ``target_url`` is the server the real run writes into.

    Offline that is the devstack's own Redis: real. In cloud mode only when ``confirm_target_host`` is that URL's
    host name, so that "Run all" on a notebook never writes to a real server by itself.

    Raises:
        MigrationError: ``confirm_target_host`` names another host (a typo, or the wrong server): nothing is done.
    """
    host = target_host(target_url)
    if not cloud:
        return True, f"offline: will {what} for real (into the devstack's Redis on {host})"
    given = confirm_target_host.strip().lower()
    if not given:
        return False, (f"cloud mode: dry run only; to {what} for real, set the parameter "
                       f"confirm_target_host={host} (whatrack run ... -p confirm_target_host={host})")
    if given != host.lower():
        raise MigrationError(f"confirm_target_host={confirm_target_host!r} is not the host written into ({host}): "
                             f"nothing done; give that host name to {what} for real, or leave it empty for a dry run")
    return True, f"cloud mode: will {what} for real, confirmed for {host}"


def reset_devstack_target(target_url: str, *, cloud: bool, ca_bundle: str | None = None) -> int:
    """Empty the devstack's target Redis so an offline re-run starts over; returns the keys it held.

    Raises:
        MigrationError: in cloud mode, or when the target is not on this machine (never empties a real server).
    """
    host = target_host(target_url)
    if cloud or not (host in ("localhost", "::1") or host.startswith("127.")):
        raise MigrationError(f"refusing to empty {mask_url(target_url)}: only the offline devstack's target (on "
                             "127.0.0.1) is ever reset")
    c = redis_tcp.connect_sync(target_url, ca_bundle=ca_bundle)
    try:
        n = int(c.dbsize())
        c.flushdb()
    finally:
        c.close()
    log.info("emptied the devstack's target Redis (%d keys)", n)
    return n
