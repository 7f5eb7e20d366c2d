"""What the driver alone can sustain: the real pool, sinks and tally, with workers that evaluate nothing.

    python benchmarks/driver_overhead.py --candidates 2000000 --batch-size 4096

A no-op worker answers each batch at once with rows of the real results schema
(the ids it was sent, status ok, one metric), so every cost that remains is
the driver's: planning batches, Ray task round trips, the Parquet sink, the
tally. Prints candidates/s, batches/s and the driver's time per batch, as JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import pyarrow as pa
import ray

from sweep.results import Tally, failed_rows, results_schema
from sweep.sinks.parquet import ParquetSink
from sweep.studies.perturb import Config, Perturb
from workers.pool import Pool


@ray.remote(num_cpus=0)
class NoopWorker:
    def evaluate(self, batch):
        n = len(batch.ids)
        return pa.table({"candidate_id": pa.array(batch.ids, pa.int64()), "status": pa.array(["ok"] * n),
                         "error": pa.nulls(n, pa.string()), "seed": batch.source.rows.seeds,
                         "loss": pa.array(np.zeros(n)), "worker": pa.array(["noop"] * n),
                         "eval_seconds": pa.array(np.zeros(n))})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", type=int, default=2_000_000)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-parquet", action="store_true")
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    study = Perturb(Config(kind="perturb", sigma=0.1, count=args.candidates))
    pool = Pool(NoopWorker.remote, args.workers, max_in_flight=2)
    schema = results_schema(study.columns, ["loss"])
    sink = None if args.no_parquet else ParquetSink(tempfile.mkdtemp(), schema)
    tally = Tally("loss")
    start = time.perf_counter()
    batches = 0
    for _, table in pool.map_unordered(study.batches(args.batch_size), failed_rows):
        if sink is not None:
            sink.write(table)
        tally.update(table)
        batches += 1
    if sink is not None:
        sink.close({})
    seconds = time.perf_counter() - start
    print(json.dumps({"candidates": tally.done, "batch_size": args.batch_size, "parquet": sink is not None,
                      "seconds": round(seconds, 2), "candidates_per_s": round(tally.done / seconds),
                      "batches_per_s": round(batches / seconds, 1),
                      "ms_per_batch": round(1000 * seconds / batches, 2)}))


if __name__ == "__main__":
    main()
