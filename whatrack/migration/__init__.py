"""Redis migration, legacy Redis -> Upstash Redis, with every BullMQ job accounted for.

    probe(target_url, ca_bundle=..., source_url=...)   what the target accepts; blockers for BullMQ
    inventory(url)                                     keys by prefix and type; jobs per state per queue
    copy(source_url, target_url, mode=..., checkpoint_path=..., force=...)   pause queues, copy every key,
                                                       resumable; refuses a target holding a copy
    verify(source_url, target_url)                     both ways, per key and per job; ``.verdict``, ``.ok``
    rollback(source_url, target_url, since=...)        changes since the cutover back to the source, verified
    resume_queues(url)                                 let workers go on the new server (copies stay paused)
    real_run(target_url, confirm_target_host, cloud=...)   a notebook's real copy/rollback, or a dry run (and why)
    reset_devstack_target(target_url, cloud=...)       empty the offline devstack's target (a re-run starts over)
    default_checkpoint(source_url, target_url)         where the CLI keeps a copy's checkpoint (never the CWD)
    iso_ms(ms)                                         how the migration prints a time (ISO-8601, UTC)

A copy never runs over a target that already holds one (cutover marker, finished checkpoint, keys changed since)
unless forced: see :mod:`whatrack.migration.guard`.

``whatrack migrate ...`` is :mod:`whatrack.migration.cli` (``python -m whatrack.migration.cli copy ...`` too).
"""

from whatrack.migration.copy import CopyReport, copy
from whatrack.migration.guard import copied_yet, default_checkpoint, real_run, reset_devstack_target
from whatrack.migration.inventory import Inventory, QueueInventory, inventory
from whatrack.migration.probe import Finding, ProbeReport, probe
from whatrack.migration.queues import pause_queues, resume_queues
from whatrack.migration.rollback import RollbackReport, cutover_marker, rollback
from whatrack.migration.verify import VerifyReport, verify
from whatrack.times import iso as iso_ms

__all__ = [
    "CopyReport", "Finding", "Inventory", "ProbeReport", "QueueInventory", "RollbackReport", "VerifyReport",
    "copied_yet", "copy", "cutover_marker", "default_checkpoint", "inventory", "iso_ms", "pause_queues", "probe",
    "real_run", "reset_devstack_target", "resume_queues", "rollback", "verify",
]
