"""Drive a training study (`pbt`, `search`): the population sharded across workers, generation by generation.

Each worker holds a contiguous shard of the members on its device. A
generation is one call per worker (train `interval` steps, evaluate every
member); the driver gathers the rows, writes them, and — for `pbt` — decides
the exploits with the study's generator. A receiver on the donor's worker
copies the donor's row on the device; a receiver elsewhere gets the donor's
state through the object store (exported by the donor's worker, handed to the
receiver's worker as an object reference: the driver never holds it).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from sweep.config import SweepConfig
from sweep.errors import SweepError
from sweep.model import write_weights_file
from sweep.results import Tally, results_schema
from sweep.sinks import close_sinks

from .trainer import RemoteTrainWorker

log = logging.getLogger("sweep")


def shards(population: int, workers: int) -> List[List[int]]:
    """Contiguous, near-equal shards of the member ids 0 … population − 1."""
    workers = max(1, min(workers, population))
    bounds = np.linspace(0, population, workers + 1).round().astype(int)
    return [list(range(bounds[i], bounds[i + 1])) for i in range(workers)]


def train(config: SweepConfig, study: Any, run_dir: Path, count: int, weights: Optional[bytes],
          open_sinks: Callable[[pa.Schema, List[str]], List[Any]], progress: Any,
          on_batch: Optional[Callable[[int, int], None]]) -> Tuple[Dict[str, Any], Tally, List[Any], Dict[str, float]]:
    """Run the study to the end (or the first error); the sinks are closed with the summary either way.

    Returns (summary, tally, sinks, findings).
    """
    options = {"num_cpus": config.workers.cpus, "num_gpus": config.workers.gpus}
    spec = config.to_dict()
    weights_ref = ray.put(weights) if weights is not None else None
    groups = shards(study.population, count)
    hyper = study.hyper_values()
    owner = {m: w for w, members in enumerate(groups) for m in members}
    workers = [
        RemoteTrainWorker.options(name=f"sweep:{config.name}:train-{i}", **options).remote(
            spec, weights_ref, config.model.weights or "", members, {n: [v[m] for m in members] for n, v in hyper.items()})
        for i, members in enumerate(groups)
    ]
    sinks: List[Any] = []
    tally: Optional[Tally] = None
    findings: Dict[str, float] = {}
    completed = False
    try:
        from .driver import check_metrics, describe_workers, land

        metric_names = describe_workers(workers)
        # The members' child runs log the hyperparameters as metrics too.
        objective = check_metrics(config, metric_names, logged=study.hyper_names)
        study.bind(objective, config.metrics.mode, metric_names)
        sinks = open_sinks(results_schema(study.columns, metric_names), metric_names)
        tally = Tally(objective, config.metrics.mode, label="member")
        parents = {m: m for m in range(study.population)}
        current = {m: {n: hyper[n][m] for n in hyper} for m in range(study.population)}
        scores: Dict[int, float] = {}
        # What each worker applies before its next generation: (copies within it, explored values).
        pending: List[Tuple[List[Tuple[int, int]], Dict[int, Dict[str, float]]]] = [([], {}) for _ in workers]
        with progress:
            for generation in range(study.generations):
                try:
                    tables = ray.get([w.generation.remote(study.interval, *pending[i]) for i, w in enumerate(workers)])
                except ray.exceptions.RayActorError as e:
                    from .driver import _cause

                    raise SweepError(f"a training worker died in generation {generation} ({_cause(e)}); its members' "
                                     f"weights were only on it: run the study again") from None
                table = _rows(pa.concat_tables(tables), generation, study, parents, current)
                land(table, sinks, tally, study, progress, on_batch)
                scores = _scores(table, objective)
                parents = {m: m for m in range(study.population)}
                pending = [([], {}) for _ in workers]
                if study.exploit and generation < study.generations - 1:
                    moves = study.next_generation(scores, current)
                    pending = _exploit(moves, workers, owner)
                    for receiver, donor, values in moves:
                        parents[receiver] = donor
                        current[receiver] = {**current[donor], **values}
        findings = _best(study, workers, owner, scores, run_dir)
        completed = True
    finally:
        summary = tally.summary() if tally is not None else {}
        summary.update(findings)
        summary["completed"] = completed
        summary["workers"] = len(workers)
        failure = close_sinks(sinks, summary)
        for w in workers:
            ray.kill(w)
    if failure is not None:  # the last rows did not reach the results
        raise failure
    return summary, tally, sinks, findings


def _rows(table: pa.Table, generation: int, study: Any, parents: Dict[int, int],
          current: Dict[int, Dict[str, float]]) -> pa.Table:
    """The workers' rows with the study's columns: member, generation, parent, step, the hyperparameters."""
    members = table.column("candidate_id").to_pylist()
    table = table.set_column(table.schema.get_field_index("candidate_id"), "candidate_id",
                             pa.array([generation * study.population + m for m in members], pa.int64()))
    columns = {
        "member": pa.array(members, pa.int64()),
        "generation": pa.array([generation] * len(members), pa.int64()),
        "parent": pa.array([parents[m] for m in members], pa.int64()),
        "step": pa.array([(generation + 1) * study.interval] * len(members), pa.int64()),
    }
    for name in study.hyper_names:
        values = [current[m][name] for m in members]
        columns[name] = pa.array([int(v) for v in values] if pa.types.is_integer(study.columns[name]) else values,
                                 study.columns[name])
    for name, values in columns.items():
        table = table.append_column(name, values)
    return table.sort_by("candidate_id")


def _scores(table: pa.Table, objective: Optional[str]) -> Dict[int, float]:
    """Each member's objective this generation (NaN where not ok or not finite: ranked last)."""
    ok = pc.equal(table.column("status"), "ok").to_pylist()
    values = table.column(objective).to_pylist() if objective in table.column_names else [None] * table.num_rows
    return {m: (v if okay and v is not None else float("nan"))
            for m, okay, v in zip(table.column("member").to_pylist(), ok, values)}


def _exploit(moves: List[tuple], workers: List[Any], owner: Dict[int, int]
             ) -> List[Tuple[List[Tuple[int, int]], Dict[int, Dict[str, float]]]]:
    """Receivers take their donors' rows: across workers through the object store now, within a
    worker (and the explored values) with its next generation call.

    Nothing here waits: a worker runs its calls in the order they were sent,
    so a donor's export runs before its worker's next generation, and a
    receiver's load before its worker's. Donors are never receivers in one
    round (the top and bottom quantiles are disjoint).
    """
    local: List[List[Tuple[int, int]]] = [[] for _ in workers]
    remote: Dict[Tuple[int, int], List[Tuple[int, int]]] = {}
    hyper: List[Dict[int, Dict[str, float]]] = [{} for _ in workers]
    for receiver, donor, values in moves:
        a, b = owner[donor], owner[receiver]
        if a == b:
            local[b].append((receiver, donor))
        else:
            remote.setdefault((a, b), []).append((receiver, donor))
        hyper[b][receiver] = values
    for (a, b), pairs in remote.items():
        states = workers[a].export.remote([d for _, d in pairs])
        workers[b].load.remote([r for r, _ in pairs], states)
    return list(zip(local, hyper))


def best_member(scores: Dict[int, float], mode: str) -> Optional[int]:
    """The member with the best finite score (the lowest id among equals); None when no score is finite.

    A NaN or ±inf score is never best, whatever the mode: a loss of −inf is a
    diverged member, not the winner.
    """
    finite = {m: v for m, v in scores.items() if v is not None and math.isfinite(v)}
    if not finite:
        return None
    pick = max if mode == "max" else min
    return pick(sorted(finite), key=lambda m: finite[m])


def _best(study: Any, workers: List[Any], owner: Dict[int, int], scores: Dict[int, float],
          run_dir: Path) -> Dict[str, float]:
    """Save the best member of the last generation as `best.safetensors`; its numbers for the summary."""
    best = best_member(scores, study.mode)
    if best is None:
        return {}
    state = ray.get(workers[owner[best]].state_dict.remote(best))
    write_weights_file(state, run_dir / "best.safetensors", metadata={"member": str(best)})
    return {"best_member": float(best), f"best_member_{study.objective}": scores[best]}
