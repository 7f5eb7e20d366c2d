"""The training worker: one shard of a population, trained and evaluated on one device."""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pyarrow as pa
import ray
import torch

from sweep.model import build_module, import_callable
from sweep.population import Member, Population
from sweep.studies.pbt import SEED_STRIDE

from .actor import Worker


class TrainWorker(Worker):
    """Members `members` of the population: their weights, optimiser state and hyperparameters live here."""

    def __init__(self, config: Dict[str, Any], weights: Optional[bytes], weights_name: str, members: Sequence[int],
                 hyper: Dict[str, List[float]]):
        # Every member of the shard in one evaluation chunk: no start-up measurement of chunk sizes.
        super().__init__(config, weights, weights_name, chunk_size=len(members))
        self.members = list(members)
        study = self.cfg.study
        module = self.evaluator.module
        names = [n for n, p in module.named_parameters() if p.is_floating_point()]
        if study.init == "model":
            own = dict(module.named_parameters())
            init = {n: own[n].detach().unsqueeze(0).expand(len(self.members), *own[n].shape) for n in names}
        else:
            starts = [dict(build_module(self.cfg.model.factory, self.cfg.model.kwargs,
                                        seed=study.seed * SEED_STRIDE + member).named_parameters())
                      for member in self.members]
            init = {n: torch.stack([s[n].detach() for s in starts]) for n in names}
        batches = import_callable(study.train.loader)(**study.train.kwargs)
        loss = import_callable(study.loss)
        self.population = Population(module, self.members, init, study.optimizer, hyper, list(batches), loss,
                                     self.evaluator.device)

    def describe(self) -> Dict[str, Any]:
        return {**super().describe(), "members": self.members}

    def generation(self, steps: int, copies: Sequence[Tuple[int, int]] = (),
                   hyper: Optional[Dict[int, Dict[str, float]]] = None) -> pa.Table:
        """Apply the last exploit (`copies` within this shard, then the explored `hyper` values),
        train every member `steps` steps, then evaluate each: rows keyed by member."""
        self.copy(copies)
        self.set_hyper(hyper or {})
        start = time.perf_counter()
        self.population.train(steps)
        trained = time.perf_counter() - start
        table = self.evaluator.run(self.population.candidates(), ids=self.members, timing=True)
        seconds = [s + trained / len(self.members) for s in table.column("eval_seconds").to_pylist()]
        table = table.set_column(table.schema.get_field_index("eval_seconds"), "eval_seconds",
                                 pa.array(seconds, pa.float64()))
        return self._stamp(table)

    def hyper(self) -> Dict[int, Dict[str, float]]:
        return {m: self.population.hyper_of(m) for m in self.members}

    def export(self, members: Sequence[int]) -> List[Member]:
        return self.population.export(members)

    def copy(self, pairs: Sequence[Tuple[int, int]]) -> None:
        """Exploit within this shard: each (receiver, donor) row copy happens on the device."""
        for receiver, donor in pairs:
            self.population.copy(donor, receiver)

    def load(self, receivers: Sequence[int], states: Sequence[Member]) -> None:
        """Exploit across shards: `states` (exported by another worker, passed through the
        object store) overwrite `receivers`, in order."""
        for receiver, state in zip(receivers, states):
            self.population.load(receiver, state)

    def set_hyper(self, values: Dict[int, Dict[str, float]]) -> None:
        """The explored hyperparameter values of exploited members."""
        for member, hyper in values.items():
            self.population.set_hyper(member, hyper)

    def state_dict(self, member: int) -> Dict[str, torch.Tensor]:
        """The member's weights with the module's buffers, on the CPU: a loadable state dict."""
        params = self.population.export([member])[0].params
        out = {n: b.detach().cpu().clone() for n, b in self.evaluator.module.named_buffers()}
        out.update(params)
        return {n: out[n] for n in self.evaluator.module.state_dict() if n in out}


RemoteTrainWorker = ray.remote(TrainWorker)
