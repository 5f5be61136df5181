"""Redis migration, legacy Redis -> Upstash Redis, with every BullMQ job accounted for.

    probe(target_url, ca_bundle=..., source_url=...)   what the target accepts; blockers for BullMQ
    inventory(url)                                     keys by prefix and type; jobs per state per queue
    copy(source_url, target_url, mode=..., checkpoint_path=...)   pause queues, copy every key, resumable
    verify(source_url, target_url)                     both ways, per key and per job; ``.verdict``, ``.ok``
    rollback(source_url, target_url, since=...)        changes since the cutover back to the source, verified
    resume_queues(url)                                 let workers go on the new server (copies stay paused)

``whatrack migrate ...`` is :mod:`whatrack.migration.cli` (``python -m whatrack.migration.cli copy ...`` too).
"""

from whatrack.migration.copy import CopyReport, copy
from whatrack.migration.inventory import Inventory, QueueInventory, inventory
from whatrack.migration.probe import Finding, ProbeReport, probe
from whatrack.migration.queues import pause_queues, resume_queues
from whatrack.migration.rollback import RollbackReport, cutover_marker, rollback
from whatrack.migration.verify import VerifyReport, verify

__all__ = [
    "CopyReport", "Finding", "Inventory", "ProbeReport", "QueueInventory", "RollbackReport", "VerifyReport",
    "copy", "cutover_marker", "inventory", "pause_queues", "probe", "resume_queues", "rollback", "verify",
]
