"""The executor of a study with a population (`pbt`, `search`): its members sharded over the workers.

Each worker holds a contiguous shard of the members on its device for the
whole sweep. A round's batch is cut by shard (`CandidateBatch.slice`), one
call per worker. A member that takes the weights of a member another worker
holds gets them through the object store: the donor's worker exports them
(a call sent before that worker's own round, so it exports the state the
donor had before it), and the receiving worker's call carries the object
reference and the donor's place in the exported list; the driver never
holds the weights. Ray runs one caller's calls
to an actor in the order they were sent, so nothing here waits between them.

The executor offers the driver what `workers.pool.Pool` offers
(`map_unordered`, `actors`, `replacements`, `retries`) and `state_dict(member)`
for the members a study saves. A worker that dies takes the only copy of its
members' weights with it: the sweep stops (nothing is retried or replaced).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import pyarrow as pa
import ray
from ray.exceptions import RayActorError, RayTaskError

from sweep.errors import SweepError
from sweep.messages import last_line
from sweep.population import PopulationPlan, Train, shards
from sweep.studies.base import CandidateBatch, Wait


class Members:
    """`plan.size` members on min(`count`, size) workers made by `make_actor(members)`, a contiguous shard each."""

    def __init__(self, make_actor: Callable[[List[int]], Any], plan: PopulationPlan, count: int):
        if count < 1:
            raise ValueError("a population needs at least one worker")
        self.shards = shards(plan.size, count)
        self.owner: Dict[int, int] = {m: i for i, members in enumerate(self.shards) for m in members}
        self.actors: List[Any] = [make_actor(members) for members in self.shards]
        # What `Pool` counts: a population's workers are never replaced and its rounds never re-run.
        self.replacements = 0
        self.retries = 0

    def map_unordered(self, batches: Iterable[Union[CandidateBatch, Wait]],
                      on_failure: Optional[Callable[[CandidateBatch, str], Any]] = None
                      ) -> Iterator[Tuple[CandidateBatch, Any]]:
        """Yield `(batch, table)` for each round: the rows of every worker's part, in member order, as one
        table (the study settles a round from all of its rows: a rung ranks every member that reached it).

        A `Wait` among the batches holds back the next round until the rounds
        before it have been yielded (the study decides the next round from those
        rows). `on_failure` is not called: a round that fails stops the sweep,
        since the members' weights are only on their workers.
        """
        pending: Dict[Any, Tuple[CandidateBatch, int]] = {}
        round_ = 0
        sent: List[CandidateBatch] = []
        for batch in batches:
            if isinstance(batch, Wait):
                yield from self._rounds(sent, pending)
                round_ += 1
                continue
            sent.append(batch)
            for ref, part in self._submit(batch):
                pending[ref] = (part, round_)
        yield from self._rounds(sent, pending)

    def _rounds(self, sent: List[CandidateBatch], pending: Dict[Any, Tuple[CandidateBatch, int]]
                ) -> Iterator[Tuple[CandidateBatch, Any]]:
        """The batches sent since the last `Wait`, each with its parts' rows as one table. Parts come back in
        the order they were sent, so a batch's parts follow one another."""
        tables: List[Any] = []
        position = 0
        for part, table in self._drain(pending):
            tables.append(table)
            position += len(part)
            if position == len(sent[0]):
                yield sent.pop(0), tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="default")
                tables, position = [], 0

    def _submit(self, batch: CandidateBatch) -> List[Tuple[Any, CandidateBatch]]:
        """Send each worker its part of `batch`, after the exports its members need from other workers."""
        source = batch.source
        if not isinstance(source, Train):
            raise TypeError(f"a population's workers take Train batches, got a {type(source).__name__} source")
        parts = self._parts(batch)
        # (donor's worker, receiver's worker) → the donors the receiver's members take
        wanted: Dict[Tuple[int, int], List[int]] = {}
        for w, part in parts:
            for donor in part.source.donors:
                if donor is not None and self._owner(donor) != w:
                    donors = wanted.setdefault((self._owner(donor), w), [])
                    if donor not in donors:
                        donors.append(donor)
        imports: Dict[int, Dict[int, Tuple[Any, int]]] = {w: {} for w, _ in parts}
        for (a, w), donors in wanted.items():
            ref = self.actors[a].export.remote(donors)
            imports[w].update({donor: (ref, i) for i, donor in enumerate(donors)})
        return [(self.actors[w].evaluate.remote(part, imports[w] or None), part) for w, part in parts]

    def _parts(self, batch: CandidateBatch) -> List[Tuple[int, CandidateBatch]]:
        """(worker, its part of `batch`): each worker's members must be one contiguous run of the batch."""
        owners = [self._owner(m) for m in batch.source.members]
        parts: List[Tuple[int, CandidateBatch]] = []
        start = 0
        for i in range(1, len(owners) + 1):
            if i == len(owners) or owners[i] != owners[start]:
                if any(w == owners[start] for w, _ in parts):
                    raise ValueError(f"the members of worker {owners[start]} ({self._span(owners[start])}) are "
                                     f"not one contiguous run of the batch: list each worker's members together")
                parts.append((owners[start], batch.slice(start, i)))
                start = i
        return parts

    def _owner(self, member: int) -> int:
        try:
            return self.owner[member]
        except KeyError:
            raise ValueError(f"member {member} is not in the population of {len(self.owner)} members") from None

    def _span(self, worker: int) -> str:
        members = self.shards[worker]
        return f"members {members[0]}…{members[-1]}"

    def _drain(self, pending: Dict[Any, Tuple[CandidateBatch, int]]) -> Iterator[Tuple[CandidateBatch, Any]]:
        # In the order sent (by member): the rows of a round land as one table sorted by id would, so the
        # tally's best among equal values is the lowest id, whichever worker finishes first.
        while pending:
            ref = next(iter(pending))
            part, round_ = pending.pop(ref)
            try:
                table = ray.get(ref)
            except RayActorError as e:
                raise SweepError(f"a training worker died in generation {round_} ({last_line(e)}); its members' "
                                 f"weights were only on it: run the study again") from None
            except RayTaskError as e:
                raise SweepError(f"a training worker failed in generation {round_}: {last_line(e)}") from None
            yield part, table

    def state_dict(self, member: int) -> Dict[str, Any]:
        """Member `member`'s weights with the module's buffers, from the worker that holds it (CPU tensors)."""
        return ray.get(self.actors[self._owner(member)].state_dict.remote(member))

    def member_file(self, member: int, metadata: Optional[Dict[str, str]] = None) -> bytes:
        """`state_dict(member)` as the bytes of a safetensors file, made by the worker that holds it."""
        return ray.get(self.actors[self._owner(member)].member_file.remote(member, metadata))
