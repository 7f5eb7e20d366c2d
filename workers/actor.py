"""The worker: one module and its eval data held on one device, many batches evaluated.

A worker of a study with a population (`pbt`, `search`) also holds a shard of
its members (weights, optimiser state, hyperparameters) on that device, from
the study's `PopulationPlan`: a batch whose source is a `Train` is a round of
them (exploit, explore, train, evaluate).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import pyarrow as pa
import pyarrow.compute as pc
import ray

from sweep.checkpoint_keys import ModuleKeys, reading_for
from sweep.config import SweepConfig
from sweep.errors import WeightsError
from sweep.lazy import torch
from sweep.results import arrow_array
from sweep.model import Stamp, build_module, checkpoint_stamp, load_checkpoint, read_weights_file
from sweep.population import Member, PopulationPlan, Train, start_population, train_round
from sweep.studies.base import CandidateBatch, RecipeBatch, Unreached


@dataclass
class ModelWeights:
    """`model.weights` as the driver saw it: its path and stamp (`sweep.model.Stamp`, None for a URI), and, where
    a worker may run on another node, an object ref to its contents (`sweep.model.checkpoint_bytes`). A worker
    reads the path itself when it looks the same there, else it takes the contents."""

    path: str
    stamp: Optional[Stamp]
    ref: Any = None

    def read(self) -> Dict[str, torch.Tensor]:
        if self.ref is not None and self.stamp is not None:
            try:
                here = checkpoint_stamp(self.path)
            except WeightsError:
                here = None
            if here != self.stamp:
                return load_checkpoint(ray.get(self.ref), self.path)
        return read_weights_file(self.path)


class SweepWorker:
    """Builds the module once from the config (and weights), then evaluates batches: recipe rows (anchors
    fetched once by key from `anchor_refs`), explicit candidates, or rounds of its members.

    With `population`, the worker holds members `members` of it, all of them in
    one evaluation chunk (no start-up measurement of chunk sizes).
    """

    def __init__(self, config: Dict[str, Any], weights: Optional[ModelWeights] = None,
                 anchor_refs: Optional[Dict[str, Any]] = None, population: Optional[PopulationPlan] = None,
                 members: Sequence[int] = ()):
        # Imported here, where the worker runs: the driver imports this module before torch is needed.
        from sweep.evaluator import CandidateError
        from sweep.workload import build_evaluator, resolve_device

        self.cfg = SweepConfig.model_validate(config, context={"check_files": False})
        torch.set_num_threads(max(1, int(self.cfg.workers.cpus)))
        device = resolve_device(self.cfg.workers.device, self.cfg.workers.gpus)
        tensors = weights.read() if weights is not None else None
        self.members = list(members)
        chunk_size = len(self.members) if population is not None else None
        self.evaluator = build_evaluator(self.cfg, tensors, device, chunk_size=chunk_size)
        del tensors  # loaded into the module
        # How checkpoints read here have their keys matched to the module's.
        self.keys = ModuleKeys.of(self.evaluator.module)
        self.name = f"{ray.util.get_node_ip_address()}:{os.getpid()}"
        self.node = ray.get_runtime_context().get_node_id()
        # Object refs of each recipe's anchors, fetched on first use and kept on the device.
        self.anchor_refs = dict(anchor_refs or {})
        try:
            self.metric_names = self.evaluator.probe_metric_names()
            self.setup_error = None
        except CandidateError as e:
            self.metric_names = ()
            self.setup_error = (
                f"the model with its own weights failed on the eval data ({e}); "
                f"check model.factory, data.loader and metrics.function"
            )
        self.population = None
        if population is not None:
            model = self.cfg.model
            self.population = start_population(
                population, self.members, self.evaluator.module, self.evaluator.device,
                factory=lambda seed: build_module(model.factory, model.kwargs, seed=seed))

    def describe(self) -> Dict[str, Any]:
        info = {
            "worker": self.name,
            "node": self.node,
            "pid": os.getpid(),
            "device": str(self.evaluator.device),
            "metric_names": list(self.metric_names),
            "strategy": self.evaluator.strategy,
            "chunk_size": self.evaluator.chunk_size,
            "error": self.setup_error,
        }
        if self.population is not None:
            info["members"] = self.members
        return info

    def evaluate(self, batch: CandidateBatch,
                 imports: Optional[Mapping[int, Tuple[Any, int]]] = None) -> Union[pa.Table, Unreached]:
        """The batch's rows with its columns, this worker and its node.

        `imports` serves a `Train` batch whose members take the weights of
        members another worker holds: {donor: (object ref of the list another
        worker's `export` returned, the donor's place in it)}. A batch of
        checkpoints some of which this worker cannot reach by their paths
        (their source's `unreached()`) comes back as `Unreached`: the rows of
        the others, and where those it could not reach are in the batch.
        """
        if isinstance(batch.source, Train):
            if self.population is None:
                raise TypeError("a Train batch is a round of a population: this worker holds none")
            refs = list({ref: None for ref, _ in (imports or {}).values()})  # each export fetched once
            exported = dict(zip(refs, ray.get(refs)))
            states = {donor: exported[ref][i] for donor, (ref, i) in (imports or {}).items()}
            table = train_round(self.population, self.evaluator, batch.ids, batch.source, states)
        elif isinstance(batch.source, RecipeBatch):
            key = batch.source.key
            if not self.evaluator.has_anchors(key):
                self.evaluator.add_anchors(ray.get(self.anchor_refs[key]), key)
            table = self.evaluator.run_rows(batch.source.rows, key, batch.ids, timing=True)
        else:
            unreached = getattr(batch.source, "unreached", None)
            away = unreached() if callable(unreached) else []
            if away:
                gone = set(away)
                here = [i for i in range(len(batch)) if i not in gone]
                return Unreached(self._explicit(batch.take(here)) if here else None, away)
            return self._explicit(batch)
        for name, values in batch.columns.items():
            table = table.append_column(name, arrow_array(values))
        return self._stamp(table)

    def _explicit(self, batch: CandidateBatch) -> pa.Table:
        """The rows of a batch of explicit candidates (read here: checkpoints have their keys matched to the
        module's), with its columns, this worker and its node."""
        start = time.perf_counter()
        with reading_for(self.keys):
            candidates = batch.source.candidates()
        made = time.perf_counter() - start
        table = self.evaluator.run(candidates, batch.ids, timing=True)
        del candidates
        # Time spent making the candidates (parsing files) is shared out over the batch.
        seconds = pc.add(table.column("eval_seconds"), made / max(1, len(batch)))
        table = table.set_column(table.schema.get_field_index("eval_seconds"), "eval_seconds", seconds)
        for name, values in batch.columns.items():
            table = table.append_column(name, arrow_array(values))
        return self._stamp(table)

    def export(self, members: Sequence[int]) -> List[Member]:
        """Copies of `members`' weights, optimiser state and hyperparameters, on the CPU (for another worker)."""
        return self._held().export(members)

    def state_dict(self, member: int) -> Dict[str, torch.Tensor]:
        """The member's weights with the module's buffers, on the CPU: a loadable state dict."""
        params = self._held().export([member])[0].params
        out = {n: b.detach().cpu().clone() for n, b in self.evaluator.module.named_buffers()}
        out.update(params)
        return {n: out[n] for n in self.evaluator.module.state_dict() if n in out}

    def member_file(self, member: int, metadata: Optional[Dict[str, str]] = None) -> bytes:
        """The member's state dict (`state_dict`) as the bytes of a safetensors file: what the driver writes
        without importing torch."""
        from safetensors.torch import save

        return save({k: v.contiguous() for k, v in self.state_dict(member).items()}, metadata=metadata)

    def _held(self) -> Any:
        if self.population is None:
            raise TypeError("this worker holds no population: it has no members to export")
        return self.population

    def _stamp(self, table: pa.Table) -> pa.Table:
        """`table` with the `worker` and `node` columns of this worker."""
        table = table.append_column("worker", arrow_array([self.name] * table.num_rows, pa.string()))
        return table.append_column("node", arrow_array([self.node] * table.num_rows, pa.string()))


RemoteSweepWorker = ray.remote(SweepWorker)
