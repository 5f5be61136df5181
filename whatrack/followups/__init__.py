"""Follow-up messages as BullMQ jobs: the ``followup`` queue (scheduling), and the worker that sends them."""

from whatrack.followups.constants import ATTEMPTS, BACKOFF, JOB_NAME, KEY_PREFIX, QUEUE_NAME
from whatrack.followups.jobs import FollowupJob, open_queue, schedule_followup

__all__ = [
    "ATTEMPTS", "BACKOFF", "JOB_NAME", "KEY_PREFIX", "QUEUE_NAME", "FollowupJob", "open_queue", "schedule_followup",
]
