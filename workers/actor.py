"""The worker: one module and its eval data held on one device, many batches evaluated."""

from __future__ import annotations

import os
import time
from typing import Any, Dict, Optional

import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch

from sweep.config import SweepConfig
from sweep.evaluator import CandidateError
from sweep.model import load_weights
from sweep.studies.base import CandidateBatch, RecipeBatch
from sweep.workload import build_evaluator, resolve_device


class Worker:
    """What every worker holds: the config, the module and eval data on its device (an Evaluator)."""

    def __init__(self, config: Dict[str, Any], weights: Optional[bytes], weights_name: str,
                 chunk_size: Optional[int] = None):
        self.cfg = SweepConfig.model_validate(config, context={"check_files": False})
        torch.set_num_threads(max(1, int(self.cfg.workers.cpus)))
        device = resolve_device(self.cfg.workers.device, self.cfg.workers.gpus)
        tensors = load_weights(weights, weights_name) if weights is not None else None
        self.evaluator = build_evaluator(self.cfg, tensors, device, chunk_size=chunk_size)
        self.name = f"{ray.util.get_node_ip_address()}:{os.getpid()}"
        self.node = ray.get_runtime_context().get_node_id()
        try:
            self.metric_names = self.evaluator.probe_metric_names()
            self.setup_error = None
        except CandidateError as e:
            self.metric_names = ()
            self.setup_error = (
                f"the model with its own weights failed on the eval data ({e}); "
                f"check model.factory, data.loader and metrics.function"
            )

    def describe(self) -> Dict[str, Any]:
        return {
            "worker": self.name,
            "node": self.node,
            "pid": os.getpid(),
            "device": str(self.evaluator.device),
            "metric_names": list(self.metric_names),
            "mode": self.evaluator.mode,
            "chunk_size": self.evaluator.chunk_size,
            "error": self.setup_error,
        }

    def _stamp(self, table: pa.Table) -> pa.Table:
        """`table` with the `worker` and `node` columns of this worker."""
        table = table.append_column("worker", pa.array([self.name] * table.num_rows, pa.string()))
        return table.append_column("node", pa.array([self.node] * table.num_rows, pa.string()))


class EvalWorker(Worker):
    """Builds the module once from the config (and weights), then evaluates batches."""

    def __init__(self, config: Dict[str, Any], weights: Optional[bytes] = None, weights_name: str = "",
                 anchor_refs: Optional[Dict[str, Any]] = None):
        super().__init__(config, weights, weights_name)
        # Object refs of each recipe's anchors, fetched on first use and kept on the device.
        self.anchor_refs = dict(anchor_refs or {})

    def evaluate(self, batch: CandidateBatch) -> pa.Table:
        if isinstance(batch.source, RecipeBatch):
            key = batch.source.key
            if not self.evaluator.has_anchors(key):
                self.evaluator.add_anchors(ray.get(self.anchor_refs[key]), key)
            table = self.evaluator.run_rows(batch.source.rows, key, batch.ids, timing=True)
        else:
            start = time.perf_counter()
            candidates = batch.source.candidates()
            made = time.perf_counter() - start
            table = self.evaluator.run(candidates, batch.ids, timing=True)
            # Time spent making the candidates (parsing files) is shared out over the batch.
            seconds = pc.add(table.column("eval_seconds"), made / max(1, len(batch)))
            table = table.set_column(table.schema.get_field_index("eval_seconds"), "eval_seconds", seconds)
        for name, values in batch.columns.items():
            table = table.append_column(name, pa.array(values))
        return self._stamp(table)


RemoteEvalWorker = ray.remote(EvalWorker)
