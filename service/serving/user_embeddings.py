"""Stored users' embeddings, one row per row of the version's user table.

A stored user's tower inputs are fixed for the version's lifetime, so each embedding is
computed once: in bulk right after the version is switched in (``fill``, on its own thread),
or by the first request that names the user before the bulk pass reaches them. A lone
request for a user not seen before took 4.57 ms at the median against 3.08 once the users were
computed (100k items, bench/serving.py's random users).

One float32 matrix instead of an array per user: 256 bytes a user at d = 64 where a dict of
arrays took about 470. ``np.empty`` leaves untouched pages unmapped, so only the users kept cost
memory, and at most ``limit`` of them are kept (the others are computed on every request).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import numpy as np
from numpy.typing import NDArray

log = logging.getLogger(__name__)

# Users per user-tower call in the bulk pass: large enough to amortise the call, small enough
# that a request waiting for the GIL never waits long.
FILL_BATCH = 512
# Users kept per version: 256 MB at d = 64, 512 MB for a fused model's d = 128.
LIMIT = 1_000_000
T = TypeVar("T")


class UserEmbeddings:
    def __init__(self, users: int, dim: int, limit: int = LIMIT) -> None:
        self.matrix = np.empty((users, dim), dtype=np.float32)
        self.known = np.zeros(users, dtype=bool)
        self.limit = limit
        self.kept = 0
        self._writing = threading.Lock()

    @property
    def full(self) -> bool:
        return self.kept >= self.limit

    def get(self, row: int) -> NDArray[np.float32] | None:
        return self.matrix[row] if self.known[row] else None

    def put(self, rows: Sequence[int], embeddings: NDArray[np.float32]) -> None:
        """Keeps the rows not known yet: the first value computed stays, so a user's scores
        never change within a version (another batch's float rounding may differ slightly)."""
        with self._writing:
            at = np.asarray(rows, dtype=np.intp)
            new = np.flatnonzero(~self.known[at])[:max(0, self.limit - self.kept)]
            self.matrix[at[new]] = embeddings[new]
            self.known[at[new]] = True  # after the values: never read half written
            self.kept += len(new)

    def fill(self, users: Iterable[tuple[int, T]], embed: Callable[[list[T]], NDArray[np.float32]],
             keep_going: Callable[[], bool] = lambda: True) -> int:
        """Computes the embedding of every (row, user) whose row is not known yet, FILL_BATCH
        at a time, while ``keep_going()`` (false once the version is no longer served).
        Returns how many it computed."""
        started, done = time.monotonic(), 0
        for chunk in _chunks(users, FILL_BATCH):
            if not keep_going():
                return done
            if self.full:
                break
            batch = [(row, user) for row, user in chunk if not self.known[row]]
            if batch:
                self.put([row for row, _ in batch], embed([user for _, user in batch]))
                done += len(batch)
        log.info("%d stored users' embeddings computed in %.2fs (%d kept, at most %d)", done,
                 time.monotonic() - started, self.kept, self.limit)
        return done


def _chunks(values: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(values)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk
