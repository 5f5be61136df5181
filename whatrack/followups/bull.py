"""``bullmq.Worker`` (bullmq-py 3.4.4) with two fixes that bring a Python worker's Redis traffic level with Node's.

Both override Worker internals (``getNextJob``, ``processJob``): pin bullmq to 3.4.x and re-run the follow-up tests
when upgrading it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bullmq import Job, UnrecoverableError, Worker
from bullmq.custom_errors import DelayedError, WaitingChildrenError


class FollowupBullWorker(Worker):  # type: ignore[misc]
    """``bullmq.Worker`` that polls an empty queue once per wait, not once per concurrency slot.

    bullmq-py's run loop starts ``concurrency`` fetches at once; on an empty queue one blocks in BZPOPMIN and every
    other one runs a ``moveToActive`` script that finds nothing, each time the wait ends (measured: 60 scripts a
    minute at concurrency 10, against Node's 6; Node awaits its fetches one by one). Here, while the queue is
    drained, fetches take turns: the first waits for the marker, the next ones find work or wait in their turn.
    While jobs keep coming, fetches still run side by side (a remote Redis needs them in parallel).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._drained_turn = asyncio.Lock()

    async def getNextJob(self, token: str) -> Job | None:
        if not self.drained:
            return await super().getNextJob(token)
        async with self._drained_turn:
            if self.closing:
                return None
            return await super().getNextJob(token)

    async def processJob(self, job: Job, token: str) -> None:
        """Run ``job``, then the next one its completion fetched, and so on, in the same concurrency slot.

        bullmq-py completes a job with ``fetch_next=False`` and then spends a second round trip on ``moveToActive``;
        Node's ``moveToFinished`` hands back the next job in the same script call. Doing the same here halves the
        round trips per job, which is what limits a worker on a remote Redis (protocols/bullmq.md §3).
        """
        next_job: Job | None = job
        while next_job is not None:
            next_job = await self._process_one(next_job, token)

    async def _process_one(self, job: Job, token: str) -> Job | None:
        # bullmq 3.4.4's Worker.processJob, with fetch_next on success (the rest unchanged).
        moved: dict[str, Any] | None = None
        try:
            if "removeOnComplete" not in job.opts and "removeOnComplete" in self.opts:
                job.opts["removeOnComplete"] = self.opts["removeOnComplete"]
            if "removeOnFail" not in job.opts and "removeOnFail" in self.opts:
                job.opts["removeOnFail"] = self.opts["removeOnFail"]
            self.jobs.add((job, token))
            self.lockManager.track_job(job.id, token, int(time.time() * 1000))
            if job.deferredFailure:
                await job.moveToFailed(UnrecoverableError(job.deferredFailure), token)
                self.emit("failed", job, UnrecoverableError(job.deferredFailure))
                return None
            result = await self.processor(job, token)
            if not self.forceClosing:
                fetch = not (self.closing or self.paused)
                moved = await self.backend.moveToCompleted(job, result, job.opts.get("removeOnComplete", False),
                                                           token, fetch_next=fetch)
                moved["fetch"] = fetch
                job.returnvalue = result
                job.attemptsMade = job.attemptsMade + 1
            self.emit("completed", job, result)
        except (DelayedError, WaitingChildrenError):
            return None
        except Exception as err:
            if moved is not None:  # completed already: a listener failed, the job must not be failed too
                self.emit("error", err, job)
                return None
            try:
                if not self.forceClosing:
                    await job.moveToFailed(err, token)
                self.emit("failed", job, err)
            except Exception as err2:
                self.emit("error", err2, job)
            return None
        finally:
            self.jobs.discard((job, token))
            self.lockManager.untrack_job(job.id)
        if moved is None or not moved["fetch"]:
            return None
        try:
            # [job data, job id, limitUntil, delayUntil]; all None when the queue was empty.
            data, job_id, limit_until, delay_until = moved["result"] or (None, None, None, None)
            fetched: Job | None = await self.nextJobFromJobData(data, job_id, limit_until or 0, delay_until or 0,
                                                                token)
        except Exception as err:  # the fetched job (if any) stays locked and comes back through stalled recovery
            self.emit("error", err)
            return None
        if fetched is not None:
            fetched.token = token
            self.emit("active", fetched, "waiting")
        return fetched
