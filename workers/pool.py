"""A pool of worker actors: bounded batches in flight, lost workers replaced, failing batches split.

Ray runs an actor call at most once: when a worker dies, its in-flight calls
fail. The pool re-queues those batches, replaces the worker, and re-runs each
one *alone* on a worker (nothing else in flight there), so a batch that kills
its worker is told apart from the batches that were merely queued behind it.

A batch that fails by its own doing (its call raised, or it killed its worker
while running alone) is split in halves, each run alone, and so on down to
single candidates: one bad candidate never takes good ones with it, and
finding it among n costs about 2·log2(n) extra runs. Only a single candidate
that fails `max_attempts` times becomes a `failed` row, with the error of its
last attempt. Every candidate is yielded exactly once, evaluated or failed.

A worker that cannot reach some checkpoints of a batch by their paths returns
the rows of the others and `Unreached`: the pool sends those candidates again,
their bytes read here (`source.shipped()`) just before they go and not kept
after (`shipped` counts them).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Tuple

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

from sweep.messages import last_line
from sweep.studies.base import CandidateBatch, Unreached, Wait

log = logging.getLogger("sweep")

#: Times a single candidate may fail (raise, or take its worker down running alone) before it is a failed row.
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
    failures: int = 0  # runs that failed by this batch's doing: it raised, or its worker died while it ran alone
    alone: int = 0  # of those, runs alone on a worker
    suspect: bool = False  # failed, or was in flight when a worker died: runs alone from now on
    origin: int = 0  # candidates in the batch it was split out of (0: not split)
    ship: bool = False  # its workers could not reach its files: their bytes are read here as it goes


class Pool:
    """`count` workers from `make_actor`. A single candidate is a failed row after `max_attempts` failures;
    the pool gives up (RuntimeError) when workers die `max_replacements` times in a row with no batch
    coming back in between: then every batch kills its worker and no split will help.
    """

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
        self.splits = 0
        #: candidates whose files a worker could not reach, read here and sent
        self.shipped = 0
        self._deaths_in_row = 0  # worker deaths with no batch coming back in between
        self._waiting = False
        self._resend: Deque[_Task] = deque()  # candidates to send again with their bytes

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
            if self._waiting and not pending and not retry and not self._resend:
                self._waiting = False
            exhausted = self._fill(source, retry, pending, exhausted)
            if not pending:
                if retry or self._resend:
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
                table = ray.get(ready[0])
            except RayActorError as e:
                error = f"the worker died: {last_line(e)}"
                own = task.suspect  # it ran alone: the death was its doing
                self._replace(index, generation, error)
            except RayTaskError as e:
                # The evaluation raised (not a candidate's error: those are rows).
                error, own = f"the worker raised: {last_line(e)}", True
            except RayError as e:
                error, own = f"{type(e).__name__}: {last_line(e)}", True
            else:
                self._deaths_in_row = 0
                if isinstance(table, Unreached):
                    rest = task.batch.take(table.positions)
                    self._ship(rest, task)
                    table = table.table
                    if table is None:
                        continue
                yield task.batch, table
                continue
            if own:
                task.failures += 1
                task.alone += task.suspect
                halves = task.batch.halves()
                if halves is not None:
                    # Some candidate in it fails: run each half alone to find which, and keep the rest.
                    self.splits += 1
                    self.retries += len(halves)
                    origin = task.origin or len(task.batch)
                    log.info("sweep: batch of candidates %s…%s failed (%s); splitting it in %d and %d",
                             task.batch.ids[0], task.batch.ids[-1], error, *map(len, halves))
                    retry.extend(_Task(half, suspect=True, origin=origin, ship=task.ship) for half in halves)
                    continue
                if task.failures >= self.max_attempts:
                    message = _failure_message(task, error)
                    log.warning("sweep: candidates %s…%s recorded as failed rows: %s",
                                task.batch.ids[0], task.batch.ids[-1], message)
                    yield task.batch, on_failure(task.batch, message)
                    continue
            task.suspect = True
            self.retries += 1
            retry.append(task)

    def _ship(self, rest: CandidateBatch, task: _Task) -> None:
        """Send `rest` (candidates of `task` whose files its worker could not reach) again, with their bytes."""
        if not self.shipped:
            log.warning("sweep: a worker could not reach %d of the files of candidates %s…%s by their paths (not "
                        "there, or other files there); the driver reads such files and sends them (said once)",
                        len(rest), task.batch.ids[0], task.batch.ids[-1])
        self.shipped += len(rest)
        self._resend.append(_Task(rest, ship=True))

    def _fill(self, source, retry: Deque[_Task], pending, exhausted: bool) -> bool:
        while True:
            if retry:
                index = self._idle_slot()
                if index is None:
                    return exhausted
                task = retry.popleft()
                self._submit(index, task, pending, exclusive=True)
                continue
            if self._resend:
                index = self._open_slot()
                if index is None:
                    return exhausted
                self._submit(index, self._resend.popleft(), pending, exclusive=False)
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
        # A batch to ship is read here as it goes (its bytes are in the object store once submitted, and not
        # kept here: a retry reads them again).
        batch = dataclasses.replace(task.batch, source=task.batch.source.shipped()) if task.ship else task.batch
        pending[slot.actor.evaluate.remote(batch)] = (index, slot.generation, task)
        del batch
        slot.load += 1
        slot.exclusive = exclusive

    def _open_slot(self) -> Optional[int]:
        loads = [(s.load, i) for i, s in enumerate(self.slots) if not s.exclusive and s.load < self.max_in_flight]
        return min(loads)[1] if loads else None

    def _idle_slot(self) -> Optional[int]:
        return next((i for i, s in enumerate(self.slots) if s.load == 0), None)

    def _replace(self, index: int, generation: int, error: str) -> None:
        slot = self.slots[index]
        if slot.generation != generation:
            return  # already replaced after an earlier failed call of the same worker
        # Deaths that isolate a bad candidate alternate with halves that come back; deaths with nothing
        # coming back in between mean every batch kills its worker: no split will help.
        if self._deaths_in_row >= self.max_replacements:
            raise RuntimeError(
                f"workers died {self._deaths_in_row} times in a row with no batch coming back in between "
                f"(last on slot {index}: {error}); giving up: check that the model and data run on a worker")
        self._deaths_in_row += 1
        try:
            ray.kill(slot.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - it is gone already
            pass
        self.replacements += 1
        log.warning("sweep: a worker died; starting a replacement (%d so far)", self.replacements)
        self.slots[index] = _Slot(self.make_actor(), generation=generation + 1)


def _failure_message(task: _Task, error: str) -> str:
    """What happened to a batch whose attempts ran out: the last error, how often and how it ran, true on every path."""
    runs = f"{task.failures} attempt{'s' if task.failures != 1 else ''}"
    if task.alone == task.failures:
        runs += ", each alone on a worker" if task.failures > 1 else ", alone on a worker"
    elif task.alone:
        runs += f", {task.alone} of them alone on a worker"
    if task.origin:
        runs += f"; split out of a batch of {task.origin} candidates"
    if len(task.batch) > 1:
        runs += (f"; its {type(task.batch.source).__name__} source cannot be split, so all "
                 f"{len(task.batch)} of its candidates are failed")
    return f"{error} ({runs})"
