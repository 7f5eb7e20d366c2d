"""A pool of worker actors with a bounded number of batches in flight per worker."""

from __future__ import annotations

from typing import Any, Dict, Iterable, Iterator, List, Tuple

import ray

from sweep.studies.base import CandidateBatch


class Pool:
    def __init__(self, actors: List[Any], max_in_flight: int = 2):
        if not actors:
            raise ValueError("a pool needs at least one worker")
        self.actors = actors
        self.max_in_flight = max_in_flight

    def map_unordered(self, batches: Iterable[CandidateBatch]) -> Iterator[Tuple[CandidateBatch, Any]]:
        """Evaluate every batch; yield `(batch, table)` as each finishes, in completion order.

        At most `max_in_flight` batches wait at each worker, so the driver
        holds a bounded number of batches however long the study is.
        """
        source = iter(batches)
        pending: Dict[Any, Tuple[int, CandidateBatch]] = {}
        load = [0] * len(self.actors)
        exhausted = False
        while True:
            while not exhausted and min(load) < self.max_in_flight:
                batch = next(source, None)
                if batch is None:
                    exhausted = True
                    break
                index = load.index(min(load))
                pending[self.actors[index].evaluate.remote(batch)] = (index, batch)
                load[index] += 1
            if not pending:
                return
            ready, _ = ray.wait(list(pending), num_returns=1)
            index, batch = pending.pop(ready[0])
            load[index] -= 1
            yield batch, ray.get(ready[0])
