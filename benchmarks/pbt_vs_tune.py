"""Ray Tune's PopulationBasedTraining against this project's `pbt` study, side by side in one process.

    python benchmarks/pbt_vs_tune.py                 # both, the full problem (under a minute on 2 CPUs)
    python benchmarks/pbt_vs_tune.py --search        # also the `search` study (random search, same budget)
    python benchmarks/pbt_vs_tune.py --tune-only --population 4 --iterations 3   # a quick look
    python benchmarks/pbt_vs_tune.py --json          # the figures as one JSON object
    python benchmarks/pbt_vs_tune.py --commands --repeat 3   # as whole commands, each a fresh process

The problem is configs/pbt.yaml: the digits MLP 64-64-10 (`digits.make_model`),
SGD with momentum on `digits.train_batches()` (batches of 64, taken in order and
cycled, the same sequence for every member), evaluated on the 500 held-out images
(`digits.eval_batches`, accuracy from `digits.metrics`). Population 16, 1000 steps
a member in 20 generations of 50 steps; lr loguniform(1e-3, 1), momentum
uniform(0, 0.99); synchronous PBT, quantile 0.25, resample probability 0.25,
perturbation factors (1.2, 0.8). Member m starts from
`build_module("sweep.examples.digits:make_model", {}, seed=m)` on both sides.

* Ray Tune: a function trainable in Tune's documented PBT pattern: restore model,
  optimizer, step and batch position from `tune.get_checkpoint()`, then every 50
  steps `tune.report({"accuracy": ...}, checkpoint=...)`; `PopulationBasedTraining(
  synch=True, ...)`, `num_samples=population`, `reuse_actors=True`. The wall time is
  that of `tuner.fit()`; the final accuracies are each trial's last `accuracy`.
* sweep: `workers.driver.run` on configs/pbt.yaml (mlflow off, `workers.count`
  from --workers), joining the Ray this script started. The wall time is that of
  `run()`; the final accuracies are the results' rows of the last generation.

Besides the table it prints what Tune did besides training (exploits, trial
restarts, checkpoints written and their size on disk, actor processes). Tune's
"steps" is the sum of the members' final step counters.

With `--commands` both are timed as a user meets them instead, each a fresh
process end to end, alternating: Ray Tune as this script itself (`--tune-only`:
Python's start, the imports, `ray.init`, `tuner.fit()`, the shutdown) against
`sweep run configs/pbt.yaml` as the README runs it (Ray's start, two workers,
MLflow on with a SQLite store in the temporary folder, the report written).

Ray is started once (`ray.init(num_cpus=2)`, timed separately) and shared. Every
figure printed is measured in this run. Nothing is downloaded; the temporary
folders (Tune's storage, the sweep runs) are removed at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import ray
import torch
from ray import tune

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/pbt_vs_tune.py` from anywhere
    sys.path.insert(0, str(ROOT))

from sweep.examples import digits  # noqa: E402
from sweep.model import build_module  # noqa: E402

FACTORY = "sweep.examples.digits:make_model"
LR = (1e-3, 1.0)
MOMENTUM = (0.0, 0.99)


# --- the Ray Tune side -------------------------------------------------------------------------


#: Filled once per Tune actor (this script's globals travel to the actors by value, not by reference).
_DATA: Dict[str, Any] = {}


def _data():
    """The training batches and the eval batches, loaded once per actor (reuse_actors keeps them)."""
    if not _DATA:
        _DATA["train"], _DATA["eval"] = digits.train_batches(), digits.eval_batches()
    return _DATA["train"], _DATA["eval"]


def _accuracy(model: torch.nn.Module, eval_batches) -> float:
    correct = total = 0.0
    with torch.no_grad():
        for x, y in eval_batches:
            correct += float(digits.metrics(model(x), y)["accuracy"]) * len(y)
            total += len(y)
    return correct / total


def tune_member(config: Dict[str, Any]) -> None:
    """One PBT member: resume from the checkpoint Tune hands over (its own, or the one it exploits)."""
    train_batches, eval_batches = _data()
    member = int(tune.get_context().get_trial_id().rsplit("_", 1)[-1])  # "<prefix>_00003" -> 3
    model = build_module(FACTORY, {}, seed=member)
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=config["momentum"], weight_decay=0)
    step = position = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = torch.load(os.path.join(folder, "state.pt"), weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, position = state["step"], state["position"]
        for group in optimizer.param_groups:  # the optimizer state carries the old values: use this trial's
            group["lr"], group["momentum"] = config["lr"], config["momentum"]
    while step < config["steps"]:
        model.train()
        for _ in range(config["interval"]):
            x, y = train_batches[position]
            position = (position + 1) % len(train_batches)
            optimizer.zero_grad()
            digits.loss(model(x), y).backward()
            optimizer.step()
            step += 1
        model.eval()
        accuracy = _accuracy(model, eval_batches)
        with tempfile.TemporaryDirectory() as folder:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "step": step, "position": position}, os.path.join(folder, "state.pt"))
            tune.report({"accuracy": accuracy, "step": step}, checkpoint=tune.Checkpoint.from_directory(folder))


class _Count(tune.Callback):
    """What Tune did besides training: trial (re)starts, checkpoints registered, actor processes."""

    def __init__(self) -> None:
        self.starts = self.checkpoints = 0
        self.pids: set = set()

    def on_trial_start(self, iteration, trials, trial, **info):
        self.starts += 1

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        self.checkpoints += 1

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.pids.add(result.get("pid"))


def run_tune(population: int, iterations: int, interval: int, seed: int, storage: Path) -> Dict[str, Any]:
    from ray.tune.schedulers import PopulationBasedTraining
    from ray.tune.search.basic_variant import BasicVariantGenerator

    count = _Count()
    random.seed(seed)  # PBT's exploit / explore draws use `random`
    np.random.seed(seed)
    scheduler = PopulationBasedTraining(
        time_attr="training_iteration", perturbation_interval=1,
        hyperparam_mutations={"lr": tune.loguniform(*LR), "momentum": tune.uniform(*MOMENTUM)},
        quantile_fraction=0.25, resample_probability=0.25, perturbation_factors=(1.2, 0.8), synch=True)
    tuner = tune.Tuner(
        tune_member,
        param_space={"lr": tune.loguniform(*LR), "momentum": tune.uniform(*MOMENTUM),
                     "steps": iterations * interval, "interval": interval},
        tune_config=tune.TuneConfig(metric="accuracy", mode="max", scheduler=scheduler, num_samples=population,
                                    reuse_actors=True, search_alg=BasicVariantGenerator(random_state=seed)),
        run_config=tune.RunConfig(storage_path=str(storage), name="pbt", verbose=0,
                                  stop={"training_iteration": iterations}, callbacks=[count]),
    )
    start = time.perf_counter()
    grid = tuner.fit()
    seconds = time.perf_counter() - start
    if grid.errors:
        raise RuntimeError(f"{len(grid.errors)} Tune trial(s) failed; the first: {grid.errors[0]!r}")
    finals = [r.metrics["accuracy"] for r in grid if r.metrics and "accuracy" in r.metrics]
    steps = sum(int(r.metrics.get("step", 0)) for r in grid if r.metrics)
    checkpoints = [p for p in storage.rglob("checkpoint_*") if p.is_dir()]
    return {
        "system": "ray-tune-pbt", "wall_s": seconds, "steps": steps,
        "best_accuracy": max(finals), "mean_accuracy": statistics.fmean(finals),
        "members": len(finals), "errors": len(grid.errors),
        # what PBT did (the scheduler object is the one the controller used)
        "exploits": scheduler._num_perturbations, "pbt_checkpoint_requests": scheduler._num_checkpoints,
        "trial_starts": count.starts, "checkpoints_reported": count.checkpoints,
        "actor_processes": len(count.pids), "checkpoint_dirs_on_disk": len(checkpoints),
        "storage_mb": sum(f.stat().st_size for f in storage.rglob("*") if f.is_file()) / 2**20,
    }


# --- this project's side -----------------------------------------------------------------------


def run_sweep(kind: str, population: int, iterations: int, interval: int, workers: int, seed: int,
              out: Path) -> Dict[str, Any]:
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    from sweep.config import load_config
    from workers.driver import run

    config = load_config(ROOT / "configs" / f"{kind}.yaml", [
        "sinks.mlflow.enabled=false", f"name=bench-{kind}", f"workers.count={workers}",
        f"study.population={population}", f"study.steps={iterations * interval}", f"study.interval={interval}",
        f"study.seed={seed}",
    ])
    start = time.perf_counter()
    result = run(config, out, overwrite=True, progress=False)
    seconds = time.perf_counter() - start
    table = ds.dataset(result.results_dir).to_table()
    last = table.filter(pc.equal(table["generation"], pc.max(table["generation"])))
    finals = [a for a in last["accuracy"].to_pylist() if a is not None]
    return {
        "system": f"sweep-{kind}", "wall_s": seconds, "steps": population * iterations * interval,
        "best_accuracy": max(finals), "mean_accuracy": statistics.fmean(finals),
        "members": len(finals), "rows": table.num_rows, "problems": len(result.problems),
    }


# --- output ------------------------------------------------------------------------------------


def print_table(ray_start_s: float, rows: List[Dict[str, Any]], ratio: Optional[float]) -> None:
    print(f"ray.init(num_cpus=2): {ray_start_s:.2f} s (not in the wall times below)")
    print(f"{'system':<14} {'wall s':>8} {'steps':>7} {'best acc':>9} {'mean acc':>9}")
    for r in rows:
        print(f"{r['system']:<14} {r['wall_s']:>8.2f} {r['steps']:>7} {r['best_accuracy']:>9.4f} "
              f"{r['mean_accuracy']:>9.4f}")
    if ratio is not None:
        print(f"Tune wall / sweep-pbt wall: {ratio:.1f}x")
    for r in rows:
        extra = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()
                 if k not in ("system", "wall_s", "steps", "best_accuracy", "mean_accuracy")}
        print(f"  {r['system']}: " + ", ".join(f"{k}={v}" for k, v in extra.items()))


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--tune-only", action="store_true", help="measure Ray Tune alone")
    only.add_argument("--sweep-only", action="store_true", help="measure this project alone")
    parser.add_argument("--search", action="store_true", help="also this project's `search` study (same budget)")
    parser.add_argument("--population", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=20, help="generations (Tune: training iterations)")
    parser.add_argument("--interval", type=int, default=50, help="SGD steps per generation")
    parser.add_argument("--workers", type=int, default=2, help="sweep's workers.count")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--commands", action="store_true",
                        help="time both as whole commands in fresh processes (the user's wall time) instead")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the systems this many times, alternating; each system's fastest run is shown "
                             "(with every wall time), so neither gains from going second")
    args = parser.parse_args(argv)

    if args.commands:
        return commands(args)
    logging.getLogger("ray.tune").setLevel(logging.ERROR)  # PBT's per-exploit INFO, the loggers' WARNINGs
    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray_start_s = time.perf_counter() - start
    runs: Dict[str, List[Dict[str, Any]]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="pbt-vs-tune-") as tmp:
            tmp_path = Path(tmp)
            for attempt in range(max(1, args.repeat)):
                # Alternate the order, so that each system goes first as often as second.
                order = ["tune", "sweep"] if attempt % 2 == 0 else ["sweep", "tune"]
                for system in order:
                    if system == "tune" and not args.sweep_only:
                        row = run_tune(args.population, args.iterations, args.interval, args.seed,
                                       tmp_path / f"tune-{attempt}")
                        runs.setdefault(row["system"], []).append(row)
                    if system == "sweep" and not args.tune_only:
                        for kind in ("pbt", "search") if args.search else ("pbt",):
                            row = run_sweep(kind, args.population, args.iterations, args.interval, args.workers,
                                            args.seed, tmp_path / f"sweep-{attempt}")
                            runs.setdefault(row["system"], []).append(row)
    finally:
        ray.shutdown()
    rows = []
    for system, attempts in runs.items():
        fastest = dict(min(attempts, key=lambda r: r["wall_s"]))
        if len(attempts) > 1:
            fastest["all_walls_s"] = [round(r["wall_s"], 2) for r in attempts]
        rows.append(fastest)
    walls = {r["system"]: r["wall_s"] for r in rows}
    ratio = (walls["ray-tune-pbt"] / walls["sweep-pbt"]
             if "ray-tune-pbt" in walls and "sweep-pbt" in walls else None)
    if args.json:
        print(json.dumps({"ray_start_s": round(ray_start_s, 3), "tune_over_sweep": ratio and round(ratio, 2),
                          "population": args.population, "iterations": args.iterations,
                          "interval": args.interval, "workers": args.workers,
                          "systems": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                                      for r in rows]}))
    else:
        print_table(ray_start_s, rows, ratio)


def commands(args: argparse.Namespace) -> None:
    """Both systems as whole commands, each run a fresh process, alternating which goes first."""
    import shutil
    import subprocess

    sweep_bin = shutil.which("sweep", path=str(Path(sys.executable).parent)) or "sweep"
    walls: Dict[str, List[float]] = {"ray-tune-pbt (python benchmarks/pbt_vs_tune.py --tune-only)": [],
                                     "sweep (sweep run configs/pbt.yaml)": []}
    tune_label, sweep_label = list(walls)
    with tempfile.TemporaryDirectory(prefix="pbt-vs-tune-commands-") as tmp:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
        env.pop("RAY_ADDRESS", None)
        shape = [f"study.population={args.population}", f"study.steps={args.iterations * args.interval}",
                 f"study.interval={args.interval}", f"study.seed={args.seed}", f"workers.count={args.workers}"]
        tune_cmd = [sys.executable, str(Path(__file__).resolve()), "--tune-only", "--json",
                    "--population", str(args.population), "--iterations", str(args.iterations),
                    "--interval", str(args.interval), "--seed", str(args.seed)]
        for attempt in range(max(1, args.repeat)):
            order = [tune_label, sweep_label] if attempt % 2 == 0 else [sweep_label, tune_label]
            for label in order:
                if label == tune_label:
                    cmd = tune_cmd
                else:
                    cmd = [sweep_bin, "run", str(ROOT / "configs" / "pbt.yaml"), "--out", tmp, "--overwrite",
                           "--no-progress"] + [a for kv in shape for a in ("--set", kv)]
                start = time.perf_counter()
                proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
                took = time.perf_counter() - start
                if proc.returncode != 0:
                    raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
                walls[label].append(took)
    rows = {label: {"fastest_s": round(min(w), 2), "median_s": round(statistics.median(w), 2),
                    "all_s": [round(x, 2) for x in w]} for label, w in walls.items()}
    ratio = rows[tune_label]["fastest_s"] / rows[sweep_label]["fastest_s"]
    median_ratio = rows[tune_label]["median_s"] / rows[sweep_label]["median_s"]
    if args.json:
        print(json.dumps({"commands": rows, "tune_over_sweep": round(ratio, 2),
                          "tune_over_sweep_median": round(median_ratio, 2)}))
        return
    print(f"{'command (a fresh process, end to end)':<62} {'fastest s':>9} {'median s':>9}  all")
    for label, row in rows.items():
        print(f"{label:<62} {row['fastest_s']:>9.2f} {row['median_s']:>9.2f}  {row['all_s']}")
    print(f"Tune / sweep: {ratio:.1f}x fastest against fastest, {median_ratio:.1f}x median against median")


if __name__ == "__main__":
    main()
