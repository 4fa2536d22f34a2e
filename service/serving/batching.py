"""Dynamic batching: concurrent requests share one user-tower call, one matrix product and one
head call (TensorFlow Serving's max_batch_size / batch_timeout_micros).

Requests wait on futures while one worker thread runs whatever is queued when it becomes free,
plus, for up to ``timeout_s``, the requests this process has already received and not queued
yet. So one client never waits, and many clients get larger batches: one matrix product costs
little more for 16 users than for 8. Model work never runs on the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any

from starlette.concurrency import run_in_threadpool

from service.serving.servable import Recommendation, RecommendCall, ScoreCall, ServingModel

log = logging.getLogger(__name__)

# While waiting for requests in flight, how often the batch worker looks whether some are left
# (a request may leave without being queued: an error, or a score call with no known item).
RECHECK_S = 0.0002


class InFlight:
    """Requests for the runner that this process has received and not yet answered: counted
    on the event loop (middleware.CountInFlight), read by the batch worker."""

    def __init__(self) -> None:
        self.count = 0


@dataclass
class Job:
    model: ServingModel
    call: RecommendCall | ScoreCall
    future: concurrent.futures.Future[Any] = field(default_factory=concurrent.futures.Future)

    @property
    def group(self) -> tuple[int, str, int]:
        """Jobs run together only on the same version, of the same kind and retrieval depth
        (a larger depth would change the candidates, so batching never changes a result)."""
        depth = self.call.depth(self.model) if isinstance(self.call, RecommendCall) else 0
        return id(self.model), type(self.call).__name__, depth


class Runner:
    """Runs model calls: through the batch worker, or (max_size 1) alone on the thread pool."""

    def __init__(self, max_size: int, timeout_s: float,
                 on_batch: Callable[[int], None] = lambda _size: None,
                 in_flight: InFlight | None = None) -> None:
        """on_batch(size) is called for every batch (the batch-size metric)."""
        self.max_size = max_size
        self.timeout_s = timeout_s
        self.on_batch = on_batch
        self.in_flight = in_flight or InFlight()
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    @property
    def batching(self) -> bool:
        return self.max_size > 1

    def start(self) -> None:
        if self.batching and self._thread is None:
            self._thread = threading.Thread(target=self._work, name="batcher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=10)
            self._thread = None

    async def recommend(self, model: ServingModel, call: RecommendCall) -> Recommendation:
        result: Recommendation = await self._run(model, call)
        return result

    async def score(self, model: ServingModel, call: ScoreCall) -> list[float]:
        result: list[float] = await self._run(model, call)
        return result

    async def _run(self, model: ServingModel, call: RecommendCall | ScoreCall) -> Any:
        if not self.batching:
            return (await run_in_threadpool(execute, model, [call]))[0]
        job = Job(model, call)
        self._queue.put(job)
        return await asyncio.wrap_future(job.future)

    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first, *self._stragglers()]
            self.on_batch(len(batch))
            for _, jobs in groupby(sorted(batch, key=lambda j: j.group), key=lambda j: j.group):
                self._execute(list(jobs))

    def _stragglers(self) -> list[Job]:
        """Whatever else is queued, then, for at most timeout_s, the requests in flight as
        they are queued; up to max_size in all. Never waits for a request not yet received."""
        jobs: list[Job] = []
        deadline = time.monotonic() + self.timeout_s
        while len(jobs) + 1 < self.max_size:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.in_flight.count <= len(jobs) + 1:
                    break
                try:
                    job = self._queue.get(timeout=min(remaining, RECHECK_S))
                except queue.Empty:
                    continue
            if job is None:  # stop: finish this batch first, then leave
                self._queue.put(None)
                break
            jobs.append(job)
        return jobs

    @staticmethod
    def _execute(jobs: list[Job]) -> None:
        try:
            results = execute(jobs[0].model, [j.call for j in jobs])
        except Exception as exc:  # delivered to every waiting request, never lost
            for job in jobs:
                job.future.set_exception(exc)
            return
        for job, result in zip(jobs, results, strict=True):
            job.future.set_result(result)


def execute(model: ServingModel, calls: Sequence[RecommendCall | ScoreCall]) -> list[Any]:
    """Calls of one kind on one version, computed together."""
    if isinstance(calls[0], RecommendCall):
        return list(model.recommend_many([c for c in calls if isinstance(c, RecommendCall)]))
    return list(model.score_many([c for c in calls if isinstance(c, ScoreCall)]))
