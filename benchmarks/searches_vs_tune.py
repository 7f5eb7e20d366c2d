"""Searches that learn, side by side with the usual tools: Ray Tune's ASHA and PB2, and Optuna's pruned TPE.

    python benchmarks/searches_vs_tune.py                       # the three pairs, full size (minutes on 2 CPUs)
    python benchmarks/searches_vs_tune.py --quick               # a fast look: 8 trials of 250 steps, 4 members
    python benchmarks/searches_vs_tune.py --pairs asha,optuna --trials 32 --repeat 3
    python benchmarks/searches_vs_tune.py --json                # the figures as one JSON object
    python benchmarks/searches_vs_tune.py --quick --only other  # Tune and Optuna alone (--only sweep: sweep alone)

The problem is that of configs/pbt.yaml: the digits MLP 64-64-10 (`digits.make_model`),
SGD on `digits.train_batches()` (batches of 64, taken in order and cycled, the same
sequence for every trial), evaluated every 50 steps on the 500 held-out images
(`digits.eval_batches`, accuracy from `digits.metrics`, the higher the better),
1000 steps at most a trial; lr loguniform(1e-3, 1), momentum uniform(0, 0.99).
Trial i starts from `build_module("sweep.examples.digits:make_model", {}, seed=i)` on
the Tune and Optuna sides. Three pairs:

* asha: Ray Tune's `ASHAScheduler(time_attr="step", max_t=1000, grace_period=50,
  reduction_factor=4, brackets=1)` over `num_samples=N` random draws
  (`BasicVariantGenerator`), a function trainable reporting every 50 steps (no
  checkpoints: ASHA only stops trials), `reuse_actors=True`; against sweep's `search`,
  `method: random`, `population: N`, `trials: N`, `halving: {reduction_factor: 4,
  min_steps: 50, brackets: 1}` (rungs at 50, 200 and 800 steps on both sides).
  Tune's ASHA is asynchronous (a trial is judged against those that reached the rung
  before it); sweep's halving is synchronous (the whole bracket is judged at once).
* optuna: `optuna.create_study(direction="maximize", sampler=TPESampler(seed=seed),
  pruner=SuccessiveHalvingPruner(min_resource=50, reduction_factor=4))` and
  `study.optimize` of N trials one after the other in this process (the usual way:
  no Ray), each calling `trial.report(accuracy, step)` every 50 steps and raising
  `TrialPruned` when `trial.should_prune()`; against sweep's `search`, `method:
  optuna`, `trials: N`, `population: 16` (waves of 16 trials trained side by side),
  the same halving, `sampler: {name: TPESampler}`.
* pb2: Ray Tune's `PB2(time_attr="step", perturbation_interval=50, hyperparam_bounds=
  {lr: [1e-3, 1], momentum: [0, 0.99]}, quantile_fraction=0.25, synch=True)` over 16
  members of 1000 steps, in the checkpoint-and-restore pattern of
  benchmarks/pbt_vs_tune.py; against sweep's `pbt` with `explore: pb2` (16 members,
  1000 steps, interval 50, quantile 0.25). Ray 2.60's PB2 fits scikit-learn's
  GaussianProcessRegressor to the bounds as given (lr on a linear scale).

For every side: the wall time (fastest of --repeat runs, every run, the median), the
member-steps actually trained (Tune: the sum of the trials' final `step`; Optuna: the
sum of each trial's last reported step; sweep: from the rows, each trial's largest
`step`), the best final accuracy (the best among trials that trained the full budget),
the best accuracy of any evaluation, how many trials trained the full budget and how
many were stopped before it (and, for sweep, what synchronous halving should cost:
`sync_halving_budget`, and how many rows say why a trial stopped: `stopped_noted`).
Then each pair's ratio, other / sweep, fastest against fastest and median against
median. The wall time is that of `tuner.fit()`, of `study.optimize()` (with loading
the data and creating the study), and of sweep's `run()` (its workers' start
included). The two sides of a pair run one after the other, alternating which goes
first.

Ray is started once (`ray.init(num_cpus=2)`, timed apart) and shared: Tune's trials and
sweep's workers (`workers.count` from --workers; mlflow off) run on it, torch on one
thread in each (Ray's `num_cpus=1` a task). Optuna trains in this process on one torch
thread too (--optuna-threads): this MLP's operations are too small for two threads to
help, and with the two cores busy torch's default of two threads ran its training
20 times slower. Every figure printed is measured in this run. Nothing is downloaded; the temporary folders (Tune's storage, the sweep
runs) are removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import ray
import torch
import yaml
from ray import tune
from sklearn.exceptions import ConvergenceWarning

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/searches_vs_tune.py` from anywhere
    sys.path.insert(0, str(ROOT))

from pbt_vs_tune import _Count  # noqa: E402  (this script's folder is on the path: Tune's counts, one class)
from sweep.examples import digits  # noqa: E402
from sweep.model import build_module  # noqa: E402

FACTORY = "sweep.examples.digits:make_model"
LR = (1e-3, 1.0)
MOMENTUM = (0.0, 0.99)
PAIRS = ("asha", "optuna", "pb2")
#: The full problem and the --quick look: trials (asha, optuna), members (pb2, and the optuna pair's waves),
#: steps a trial, steps between evaluations.
FULL = {"trials": 64, "population": 16, "steps": 1000, "interval": 50}
QUICK = {"trials": 8, "population": 4, "steps": 250, "interval": 50}  # rungs at 50 and 200 steps
#: Successive halving on every side: the first rung (Tune's grace period, Optuna's min_resource) and η.
MIN_STEPS = 50
REDUCTION_FACTOR = 4
QUANTILE = 0.25


# --- training, shared by the Tune and Optuna sides ---------------------------------------------


#: Filled once per process (this script's globals travel to Tune's actors by value, not by reference).
_DATA: Dict[str, Any] = {}


def _data():
    """The training batches and the eval batches, loaded once per process (reuse_actors keeps them)."""
    if not _DATA:
        _DATA["train"], _DATA["eval"] = digits.train_batches(), digits.eval_batches()
    return _DATA["train"], _DATA["eval"]


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches, position: int, steps: int) -> int:
    """`steps` SGD steps on the batches in order from `position`; returns the next position."""
    model.train()
    for _ in range(steps):
        x, y = batches[position]
        position = (position + 1) % len(batches)
        optimizer.zero_grad()
        digits.loss(model(x), y).backward()
        optimizer.step()
    model.eval()
    return position


def _accuracy(model: torch.nn.Module, eval_batches) -> float:
    correct = total = 0.0
    with torch.no_grad():
        for x, y in eval_batches:
            correct += float(digits.metrics(model(x), y)["accuracy"]) * len(y)
            total += len(y)
    return correct / total


# --- Ray Tune: ASHA and PB2 --------------------------------------------------------------------


def tune_trial(config: Dict[str, Any]) -> None:
    """One trial; with `checkpoint` set (PB2) it resumes from the checkpoint Tune hands over and writes one
    at every report, Tune's documented pattern for population-based schedulers."""
    train_batches, eval_batches = _data()
    index = int(tune.get_context().get_trial_id().rsplit("_", 1)[-1])  # "<prefix>_00003" -> 3
    model = build_module(FACTORY, {}, seed=index)
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=config["momentum"], weight_decay=0)
    step = position = 0
    checkpoint = tune.get_checkpoint() if config["checkpoint"] else None
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = torch.load(os.path.join(folder, "state.pt"), weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, position = state["step"], state["position"]
        for group in optimizer.param_groups:  # the optimizer state carries the old values: use this trial's
            group["lr"], group["momentum"] = config["lr"], config["momentum"]
    while step < config["steps"]:
        position = _train(model, optimizer, train_batches, position, config["interval"])
        step += config["interval"]
        metrics = {"accuracy": _accuracy(model, eval_batches), "step": step}
        if not config["checkpoint"]:
            tune.report(metrics)
            continue
        with tempfile.TemporaryDirectory() as folder:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "step": step, "position": position}, os.path.join(folder, "state.pt"))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def _fit(name: str, scheduler, samples: int, steps: int, interval: int, seed: int, storage: Path,
         checkpoint: bool) -> Tuple[float, Any, _Count]:
    from ray.tune.search.basic_variant import BasicVariantGenerator

    count = _Count()
    random.seed(seed)  # the schedulers' draws use `random` and `np.random`
    np.random.seed(seed)
    tuner = tune.Tuner(
        tune_trial,
        param_space={"lr": tune.loguniform(*LR), "momentum": tune.uniform(*MOMENTUM),
                     "steps": steps, "interval": interval, "checkpoint": checkpoint},
        tune_config=tune.TuneConfig(metric="accuracy", mode="max", scheduler=scheduler, num_samples=samples,
                                    reuse_actors=True, search_alg=BasicVariantGenerator(random_state=seed)),
        run_config=tune.RunConfig(storage_path=str(storage), name=name, verbose=0,
                                  stop={"step": steps}, callbacks=[count]),
    )
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # Tune's experiment banner: keep stdout for the figures
        grid = tuner.fit()
    seconds = time.perf_counter() - start
    if grid.errors:
        raise RuntimeError(f"{len(grid.errors)} Tune trial(s) failed; the first: {grid.errors[0]!r}")
    return seconds, grid, count


def _tune_row(system: str, seconds: float, grid, steps: int) -> Dict[str, Any]:
    finals = [(int(r.metrics.get("step", 0)), float(r.metrics["accuracy"])) for r in grid
              if r.metrics and "accuracy" in r.metrics]
    every = [float(a) for r in grid if r.metrics_dataframe is not None and "accuracy" in r.metrics_dataframe
             for a in r.metrics_dataframe["accuracy"].dropna()]
    return _row(system, seconds, member_steps=sum(s for s, _ in finals),
                finals=[a for s, a in finals if s >= steps], every=every,
                trials=len(grid), completed=sum(s >= steps for s, _ in finals),
                stopped=sum(s < steps for s, _ in finals))


def run_tune_asha(trials: int, steps: int, interval: int, seed: int, storage: Path) -> Dict[str, Any]:
    from ray.tune.schedulers import ASHAScheduler

    scheduler = ASHAScheduler(time_attr="step", max_t=steps, grace_period=MIN_STEPS,
                              reduction_factor=REDUCTION_FACTOR, brackets=1)
    seconds, grid, count = _fit("asha", scheduler, trials, steps, interval, seed, storage, checkpoint=False)
    row = _tune_row("ray-tune-asha", seconds, grid, steps)
    row.update(trial_starts=count.starts, actor_processes=len(count.pids))
    return row


def run_tune_pb2(population: int, steps: int, interval: int, seed: int, storage: Path) -> Dict[str, Any]:
    from ray.tune.schedulers.pb2 import PB2

    scheduler = PB2(time_attr="step", perturbation_interval=interval,
                    hyperparam_bounds={"lr": list(LR), "momentum": list(MOMENTUM)},
                    quantile_fraction=QUANTILE, synch=True)
    seconds, grid, count = _fit("pb2", scheduler, population, steps, interval, seed, storage, checkpoint=True)
    row = _tune_row("ray-tune-pb2", seconds, grid, steps)
    checkpoints = [p for p in storage.rglob("checkpoint_*") if p.is_dir()]
    row.update(
        exploits=scheduler._num_perturbations, trial_starts=count.starts, checkpoints_reported=count.checkpoints,
        actor_processes=len(count.pids), checkpoint_dirs_on_disk=len(checkpoints),
        storage_mb=sum(f.stat().st_size for f in storage.rglob("*") if f.is_file()) / 2**20)
    return row


# --- Optuna: TPE with successive-halving pruning, one process ------------------------------------


def run_optuna(trials: int, steps: int, interval: int, seed: int, threads: int) -> Dict[str, Any]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    default_threads = torch.get_num_threads()

    def objective(trial: "optuna.Trial") -> float:
        train_batches, eval_batches = _data()
        model = build_module(FACTORY, {}, seed=trial.number)
        lr = trial.suggest_float("lr", *LR, log=True)
        momentum = trial.suggest_float("momentum", *MOMENTUM)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=0)
        step = position = 0
        accuracy = float("nan")
        while step < steps:
            position = _train(model, optimizer, train_batches, position, interval)
            step += interval
            accuracy = _accuracy(model, eval_batches)
            trial.report(accuracy, step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return accuracy

    _DATA.clear()  # loading the data is part of the wall time, as it is for the other sides
    if threads:
        torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        study = optuna.create_study(
            direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed),
            pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=MIN_STEPS,
                                                          reduction_factor=REDUCTION_FACTOR))
        study.optimize(objective, n_trials=trials)
        seconds = time.perf_counter() - start
    finally:
        _DATA.clear()  # else the batches travel with Tune's trainable, which refers to them, to every actor
        torch.set_num_threads(default_threads)
    states = [t.state for t in study.trials]
    finals = [(max(t.intermediate_values, default=0), t.intermediate_values) for t in study.trials]
    return _row("optuna-tpe-sha", seconds, member_steps=sum(s for s, _ in finals),
                finals=[values[s] for s, values in finals if s >= steps],
                every=[v for _, values in finals for v in values.values()],
                trials=len(study.trials), completed=sum(s >= steps for s, _ in finals),
                stopped=sum(s < steps for s, _ in finals), failed=states.count(optuna.trial.TrialState.FAIL),
                pruned=states.count(optuna.trial.TrialState.PRUNED), torch_threads=threads or default_threads)


# --- this project's side -----------------------------------------------------------------------


def _halving_budget(trials: int, steps: int, min_steps: int, eta: int) -> int:
    """Member-steps of synchronous successive halving in one bracket: the best 1/η (at least 1) go on."""
    rungs = []
    rung = min_steps
    while rung < steps:
        rungs.append(rung)
        rung *= eta
    total, alive, done = 0, trials, 0
    for rung in rungs + [steps]:
        total += alive * (rung - done)
        done, alive = rung, max(1, alive // eta)
    return total


def sweep_config(pair: str, trials: int, population: int, steps: int, interval: int, workers: int, seed: int):
    """The sweep config of one pair, made from configs/search.yaml or configs/pbt.yaml."""
    from sweep.config import parse_config

    kind = "pbt" if pair == "pb2" else "search"
    raw = yaml.safe_load((ROOT / "configs" / f"{kind}.yaml").read_text(encoding="utf-8"))
    raw["name"] = f"bench-{pair}"
    raw["sinks"] = {"mlflow": {"enabled": False}}
    raw["workers"] = {"count": workers}
    study = raw["study"]
    study.update(steps=steps, interval=interval, seed=seed)
    halving = {"reduction_factor": REDUCTION_FACTOR, "min_steps": MIN_STEPS, "brackets": 1}
    if pair == "asha":
        study.update(method="random", population=trials, trials=trials, halving=halving)
    elif pair == "optuna":
        study.update(method="optuna", population=min(population, trials), trials=trials, halving=halving,
                     sampler={"name": "TPESampler", "kwargs": {}})
    else:  # pb2 explores by its own rule: the perturbation settings do not apply
        for key in ("perturbation_factors", "resample_probability"):
            study.pop(key, None)
        study.update(population=population, explore="pb2", quantile=QUANTILE)
    return parse_config(raw, base_dir=ROOT / "configs", source=f"configs/{kind}.yaml ({pair})")


def run_sweep(pair: str, trials: int, population: int, steps: int, interval: int, workers: int, seed: int,
              out: Path) -> Dict[str, Any]:
    import pyarrow.dataset as ds

    from workers.driver import run

    config = sweep_config(pair, trials, population, steps, interval, workers, seed)
    start = time.perf_counter()
    result = run(config, out, overwrite=True, progress=False)
    seconds = time.perf_counter() - start
    table = ds.dataset(result.results_dir).to_table().to_pandas()
    objective = config.metrics.objective
    by_trial = table.groupby("trial" if "trial" in table.columns else "member")  # pbt: a member is a trial
    trained = by_trial["step"].max()
    row = _row(f"sweep-{'pbt-pb2' if pair == 'pb2' else 'search-' + pair}", seconds,
               member_steps=int(trained.sum()),
               finals=[float(a) for a in table.loc[table["step"] >= steps, objective].dropna()],
               every=[float(a) for a in table[objective].dropna()], trials=len(trained),
               completed=int((trained >= steps).sum()), stopped=int((trained < steps).sum()),
               failed=int(by_trial["status"].apply(lambda s: bool((s != "ok").any())).sum()))
    row.update(rows=len(table), problems=len(result.problems))
    if "member_steps" in result.summary:  # the run's own count, to check the one from the rows against
        row["summary_member_steps"] = int(result.summary["member_steps"])
    if "stopped" in table.columns:  # the rows' own account of the stops, to check against the steps
        row["stopped_noted"] = int(table["stopped"].notna().sum())
    if pair == "pb2":  # a row continued from another member: an exploit, as Tune's PB2 counts them
        row["exploits"] = int((table["parent"] != table["member"]).sum())
    else:
        wave = config.study.population
        waves = [wave] * (trials // wave) + ([trials % wave] if trials % wave else [])
        row["sync_halving_budget"] = sum(_halving_budget(n, steps, MIN_STEPS, REDUCTION_FACTOR) for n in waves)
    return row


# --- output ------------------------------------------------------------------------------------


def _row(system: str, seconds: float, *, member_steps: int, finals: Sequence[float], every: Sequence[float],
         trials: int, completed: int, stopped: int, failed: int = 0, **extra: Any) -> Dict[str, Any]:
    return {"system": system, "wall_s": seconds, "member_steps": int(member_steps),
            "best_final_accuracy": max(finals) if finals else None, "best_any_accuracy": max(every, default=None),
            "trials": trials, "completed": completed, "stopped": stopped, "failed": failed, **extra}


def _summarise(attempts: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The fastest run's figures, with every run's wall time and their median."""
    fastest = dict(min(attempts, key=lambda r: r["wall_s"]))
    fastest["all_walls_s"] = [round(r["wall_s"], 2) for r in attempts]
    fastest["median_wall_s"] = statistics.median(r["wall_s"] for r in attempts)
    return fastest


def _times(ratio: float) -> str:
    """10.3x, 2.0x, 0.62x: two significant figures below 1."""
    return f"{ratio:.1f}x" if ratio >= 1 else f"{ratio:.2f}x"


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


MAIN_COLUMNS = ("system", "wall_s", "all_walls_s", "median_wall_s", "member_steps", "best_final_accuracy",
                "best_any_accuracy", "trials", "completed", "stopped", "failed")


def print_table(ray_start_s: float, settings: Dict[str, Any], pairs: Dict[str, Dict[str, Any]]) -> None:
    print(f"ray.init(num_cpus=2): {ray_start_s:.2f} s (not in the wall times below)")
    print(f"{settings['trials']} trials (asha, optuna; the optuna pair's sweep side in waves of "
          f"{min(settings['population'], settings['trials'])}), {settings['population']} members (pb2), "
          f"{settings['steps']} steps a trial, evaluated every {settings['interval']}; "
          f"halving η {REDUCTION_FACTOR} from {MIN_STEPS} steps; fastest of {settings['repeat']}")
    header = (f"{'pair':<7} {'system':<20} {'wall s':>7} {'median':>7} {'member-steps':>12} {'best final':>10} "
              f"{'best any':>9} {'done/stopped/trials':>19}")
    print(header)
    for pair, sides in pairs.items():
        for side in sides["rows"]:
            counts = f"{side['completed']}/{side['stopped']}/{side['trials']}"
            print(f"{pair:<7} {side['system']:<20} {side['wall_s']:>7.2f} {side['median_wall_s']:>7.2f} "
                  f"{side['member_steps']:>12,} {_fmt(side['best_final_accuracy'], '.4f'):>10} "
                  f"{_fmt(side['best_any_accuracy'], '.4f'):>9} {counts:>19}")
        if sides.get("ratio_fastest") is not None:
            print(f"{'':<7} {sides['rows'][0]['system']} / sweep: {_times(sides['ratio_fastest'])} fastest, "
                  f"{_times(sides['ratio_median'])} median; member-steps {sides['steps_ratio']:.2f}x")
    for pair, sides in pairs.items():
        for side in sides["rows"]:
            extra = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in side.items()
                     if k not in MAIN_COLUMNS or k == "all_walls_s"}
            print(f"  {side['system']}: " + ", ".join(f"{k}={v}" for k, v in extra.items()))


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", default=",".join(PAIRS),
                        help=f"which pairs, comma-separated, of {', '.join(PAIRS)} (default all)")
    parser.add_argument("--trials", type=int, help=f"trials of the asha and optuna pairs (default "
                                                   f"{FULL['trials']}, {QUICK['trials']} with --quick)")
    parser.add_argument("--population", type=int, help=f"pb2's members and the optuna pair's wave size on "
                                                        f"sweep's side (default {FULL['population']}, "
                                                        f"{QUICK['population']} with --quick)")
    parser.add_argument("--steps", type=int, help=f"a trial's full budget in SGD steps (default {FULL['steps']}, "
                                                  f"{QUICK['steps']} with --quick)")
    parser.add_argument("--interval", type=int, help=f"SGD steps between evaluations (default {FULL['interval']})")
    parser.add_argument("--quick", action="store_true", help="a fast look: few trials, few steps")
    parser.add_argument("--workers", type=int, default=2, help="sweep's workers.count")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1,
                        help="run each pair this many times, alternating which side goes first; each side's "
                             "fastest run is shown with every wall time and the median")
    parser.add_argument("--optuna-threads", type=int, default=1,
                        help="torch threads for the Optuna side (default 1, as each Tune trial and each sweep "
                             "worker has; 0: torch's default)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--only", choices=("other", "sweep"),
                        help="measure one side of each pair alone (the other tool's, or sweep's)")
    args = parser.parse_args(argv)

    pairs = [p.strip() for p in args.pairs.split(",") if p.strip()]
    unknown = [p for p in pairs if p not in PAIRS]
    if unknown or not pairs:
        parser.error(f"--pairs {args.pairs!r}: expected a comma-separated subset of {','.join(PAIRS)}, "
                     f"e.g. --pairs asha,pb2")
    defaults = QUICK if args.quick else FULL
    settings = {name: getattr(args, name) if getattr(args, name) is not None else defaults[name]
                for name in ("trials", "population", "steps", "interval")}
    settings.update(repeat=max(1, args.repeat), workers=args.workers, seed=args.seed, quick=args.quick,
                    optuna_threads=args.optuna_threads)
    trials, population, steps, interval = (settings[k] for k in ("trials", "population", "steps", "interval"))
    for name in ("trials", "population", "steps", "interval"):
        if settings[name] < 1:
            parser.error(f"--{name} {settings[name]}: expected a positive number")
    if steps % interval or MIN_STEPS % interval:
        parser.error(f"--steps {steps} and the first rung ({MIN_STEPS} steps) must be multiples of "
                     f"--interval {interval}")

    logging.getLogger("ray.tune").setLevel(logging.ERROR)  # the schedulers' per-decision INFO, loggers' WARNINGs
    # PB2's Gaussian process, refitted at every exploit, warns when a kernel parameter meets its bound.
    warnings.filterwarnings("ignore", category=ConvergenceWarning)
    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray_start_s = time.perf_counter() - start
    runs: Dict[str, Dict[str, List[Dict[str, Any]]]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="searches-vs-tune-") as tmp:
            tmp_path = Path(tmp)
            others: Dict[str, Callable[[int], Dict[str, Any]]] = {
                "asha": lambda a: run_tune_asha(trials, steps, interval, args.seed, tmp_path / f"asha-{a}"),
                "optuna": lambda a: run_optuna(trials, steps, interval, args.seed, args.optuna_threads),
                "pb2": lambda a: run_tune_pb2(population, steps, interval, args.seed, tmp_path / f"pb2-{a}"),
            }
            for pair in pairs:
                for attempt in range(settings["repeat"]):
                    # Alternate the order, so that each side goes first as often as second.
                    order = ["other", "sweep"] if attempt % 2 == 0 else ["sweep", "other"]
                    for side in order:
                        if args.only and side != args.only:
                            continue
                        if side == "other":
                            row = others[pair](attempt)
                        else:
                            row = run_sweep(pair, trials, population, steps, interval, args.workers, args.seed,
                                            tmp_path / f"sweep-{pair}-{attempt}")
                        runs.setdefault(pair, {}).setdefault(side, []).append(row)
    finally:
        ray.shutdown()

    table: Dict[str, Dict[str, Any]] = {}
    for pair, sides in runs.items():
        rows = {side: _summarise(attempts) for side, attempts in sides.items()}
        entry: Dict[str, Any] = {"rows": [rows[s] for s in ("other", "sweep") if s in rows]}
        if "other" in rows and "sweep" in rows:
            other, mine = rows["other"], rows["sweep"]
            entry.update(ratio_fastest=other["wall_s"] / mine["wall_s"],
                         ratio_median=other["median_wall_s"] / mine["median_wall_s"],
                         steps_ratio=other["member_steps"] / max(1, mine["member_steps"]))
        table[pair] = entry
    if args.json:
        def rounded(value):
            if isinstance(value, float):
                return round(value, 4)
            if isinstance(value, dict):
                return {k: rounded(v) for k, v in value.items()}
            if isinstance(value, list):
                return [rounded(v) for v in value]
            return value

        print(json.dumps({"ray_start_s": round(ray_start_s, 3), **settings, "pairs": rounded(table)}))
    else:
        print_table(ray_start_s, settings, table)


if __name__ == "__main__":
    main()
