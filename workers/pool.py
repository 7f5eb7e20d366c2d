"""A pool of worker actors: bounded batches in flight, lost workers replaced, lost batches re-run.

Ray runs an actor call at most once: when a worker dies, its in-flight calls
fail. The pool re-queues those batches, replaces the worker, and re-runs each
one *alone* on a worker (nothing else in flight there), so a batch that kills
its worker is told apart from the batches that were merely queued behind it.
A batch that kills its worker `max_attempts` times alone becomes `failed` rows.
Every batch is yielded exactly once, evaluated or failed.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Tuple

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

from sweep.studies.base import CandidateBatch, Wait

log = logging.getLogger("sweep")

#: Times a batch may take its worker down, run alone, before its rows are recorded as failed.
MAX_ATTEMPTS = 3


@dataclass
class _Slot:
    actor: Any
    generation: int = 0
    load: int = 0
    exclusive: bool = False  # running a suspect batch alone


@dataclass
class _Task:
    batch: CandidateBatch
    failures: int = 0  # deaths of a worker while this batch ran alone
    suspect: bool = False  # was in flight when a worker died: runs alone next time
    last_error: str = ""


class Pool:
    def __init__(self, make_actor: Callable[[], Any], count: int, max_in_flight: int = 2,
                 max_attempts: int = MAX_ATTEMPTS, max_replacements: Optional[int] = None):
        if count < 1:
            raise ValueError("a pool needs at least one worker")
        self.make_actor = make_actor
        self.slots = [_Slot(make_actor()) for _ in range(count)]
        self.max_in_flight = max_in_flight
        self.max_attempts = max_attempts
        self.max_replacements = max_replacements if max_replacements is not None else 4 * count + 2 * max_attempts
        self.replacements = 0
        self.retries = 0
        self._waiting = False

    @property
    def actors(self) -> List[Any]:
        return [s.actor for s in self.slots]

    def map_unordered(
        self,
        batches: Iterable[CandidateBatch],
        on_failure: Callable[[CandidateBatch, str], Any],
    ) -> Iterator[Tuple[CandidateBatch, Any]]:
        """Yield `(batch, table)` as batches finish; `on_failure(batch, error)` makes the table of a lost batch.

        A `Wait` among the batches holds back the ones after it until every
        batch before it has been yielded (an adaptive study's next round
        depends on them).
        """
        source = iter(batches)
        retry: Deque[_Task] = deque()
        pending: Dict[Any, Tuple[int, int, _Task]] = {}
        exhausted = False
        self._waiting = False
        while True:
            if self._waiting and not pending and not retry:
                self._waiting = False
            exhausted = self._fill(source, retry, pending, exhausted)
            if not pending:
                if retry:
                    raise RuntimeError("batches are waiting but no worker can take them")
                if self._waiting:
                    continue
                return
            ready, _ = ray.wait(list(pending), num_returns=1)
            index, generation, task = pending.pop(ready[0])
            slot = self.slots[index]
            if slot.generation == generation:
                slot.load -= 1
                if slot.exclusive and slot.load == 0:
                    slot.exclusive = False
            try:
                yield task.batch, ray.get(ready[0])
                continue
            except RayActorError as e:
                error = f"the worker died: {_cause(e)}"
                if task.suspect:
                    task.failures += 1
                self._replace(index, generation)
            except RayTaskError as e:
                # The evaluation raised (not a candidate's error: those are rows). Retry alone, bounded.
                error = f"the worker raised: {_cause(e)}"
                task.failures += 1
            except RayError as e:
                error = f"{type(e).__name__}: {_cause(e)}"
                task.failures += 1
            task.last_error = error
            if task.failures >= self.max_attempts:
                log.warning("sweep: batch of candidates %s…%s failed %d times; recorded as failed rows (%s)",
                            task.batch.ids[0], task.batch.ids[-1], task.failures, error)
                yield task.batch, on_failure(task.batch, f"{error} ({task.failures} attempts, each alone on a worker)")
                continue
            task.suspect = True
            self.retries += 1
            retry.append(task)

    def _fill(self, source, retry: Deque[_Task], pending, exhausted: bool) -> bool:
        while True:
            if retry:
                index = self._idle_slot()
                if index is None:
                    return exhausted
                task = retry.popleft()
                self._submit(index, task, pending, exclusive=True)
                continue
            if exhausted:
                return True
            if self._waiting:
                return False
            index = self._open_slot()
            if index is None:
                return False
            batch = next(source, None)
            if batch is None:
                return True
            if isinstance(batch, Wait):
                self._waiting = True
                continue
            self._submit(index, _Task(batch), pending, exclusive=False)

    def _submit(self, index: int, task: _Task, pending, exclusive: bool) -> None:
        slot = self.slots[index]
        pending[slot.actor.evaluate.remote(task.batch)] = (index, slot.generation, task)
        slot.load += 1
        slot.exclusive = exclusive

    def _open_slot(self) -> Optional[int]:
        loads = [(s.load, i) for i, s in enumerate(self.slots) if not s.exclusive and s.load < self.max_in_flight]
        return min(loads)[1] if loads else None

    def _idle_slot(self) -> Optional[int]:
        return next((i for i, s in enumerate(self.slots) if s.load == 0), None)

    def _replace(self, index: int, generation: int) -> None:
        slot = self.slots[index]
        if slot.generation != generation:
            return  # already replaced after an earlier failed call of the same worker
        if self.replacements >= self.max_replacements:
            raise RuntimeError(f"workers died {self.replacements} times; giving up (last on slot {index})")
        try:
            ray.kill(slot.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - it is gone already
            pass
        self.replacements += 1
        log.warning("sweep: a worker died; starting a replacement (%d so far)", self.replacements)
        self.slots[index] = _Slot(self.make_actor(), generation=generation + 1)


def _cause(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in reversed(lines):
        if not line.startswith(("File ", "Traceback", "^")):
            return line[:500]
    return type(error).__name__
