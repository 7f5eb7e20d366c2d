"""The `sweep` command line: run | resume | report | show | validate | bench."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .errors import ConfigError, SweepError
from .messages import first_line

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2

#: A row's error is printed in at most this many characters at the end of a run (the results keep it whole).
MAX_ERROR_SHOWN = 300
#: Rows with one error are printed once, naming at most this many of their candidate ids.
MAX_IDS_SHOWN = 5


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sweep", description="Distributed hyperparameter and weight sweeps.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a sweep from a config file")
    run.add_argument("config", type=Path, help="the sweep's YAML config")
    run.add_argument("--out", type=Path, default=Path("."), help="where runs/<name>/ is written (default: .)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set workers.count=2 (repeatable; VALUE is YAML)")
    run.add_argument("--address", default=None,
                     help="Ray cluster to join (default: $RAY_ADDRESS, else a new local cluster)")
    run.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run of this name")
    run.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    run.add_argument("--no-report", action="store_true", help="skip the figures and HTML page at the end")

    resume = sub.add_parser("resume", help="finish an interrupted sweep: each missing candidate once, none twice")
    resume.add_argument("run_dir", type=Path, help="the run folder, <out>/runs/<name>")
    resume.add_argument("--config", type=Path, default=None,
                        help="a config to check against the saved one (only workers.* may differ)")
    resume.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override workers.* for this resume (other keys must match the saved config)")
    resume.add_argument("--address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, else local)")
    resume.add_argument("--no-progress", action="store_true")
    resume.add_argument("--no-report", action="store_true", help="skip the figures and HTML page at the end")

    report = sub.add_parser("report", help="figures and one HTML page from a run's results (also logged to MLflow)")
    report.add_argument("run_dir", type=Path, help="the run folder, <out>/runs/<name>")
    report.add_argument("--top", type=int, default=10, help="best rows in the page's table (default 10)")
    report.add_argument("--no-mlflow", action="store_true", help="do not log the figures to the sweep's MLflow run")

    bench = sub.add_parser("bench", help="measure the naive loop and the engine side by side on this machine")
    bench.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    bench.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bench.add_argument("--models", nargs="*", default=None, metavar="NAME",
                       help="only models whose name contains one of these (mlp-32, mlp-784, gpt, cnn)")
    bench.add_argument("--no-compile", action="store_true", help="leave out torch.compile (slow to compile on CPUs)")
    bench.add_argument("--scale", type=float, default=1.0, help="multiply every candidate count (default 1)")
    bench.add_argument("--no-forms", action="store_true",
                       help="leave out the candidate forms (explicit dicts, Stacked, Noise, EvoTorch)")
    bench.add_argument("--no-first-call", action="store_true",
                       help="leave out the first call in fresh processes")

    show = sub.add_parser("show", help="print a run's results (streamed; nothing is loaded whole)")
    show.add_argument("run", help="a run folder (runs/<name>), a results folder or a results URI")
    show.add_argument("--top", type=int, default=None, help=f"at most N rows (table default: {20})")
    show.add_argument("--by", default=None, metavar="COLUMN", help="order by this column: best first when it is the run's objective (the mode the "
                           "results record), smallest first for any other column; --desc or --asc to choose")
    order = show.add_mutually_exclusive_group()
    order.add_argument("--desc", dest="descending", action="store_true", default=None, help="largest first")
    order.add_argument("--asc", dest="descending", action="store_false", help="smallest first")
    show.add_argument("--where", default=None, metavar="EXPR", help="SQL condition, e.g. \"status = 'ok' AND loss < 0.3\"")
    show.add_argument("--columns", default=None, help="comma-separated columns to show")
    show.add_argument("--format", choices=("table", "csv", "json"), default="table")

    validate = sub.add_parser("validate", help="check a config without running it")
    validate.add_argument("config", type=Path)
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "validate":
            return _validate(args)
        if args.command == "run":
            return _run(args)
        if args.command == "resume":
            return _resume(args)
        if args.command == "show":
            return _show(args)
        if args.command == "report":
            return _write_report(args.run_dir, top=args.top, mlflow=not args.no_mlflow)
        if args.command == "bench":
            from .bench import main as bench_main

            if args.device.startswith("cuda"):
                import torch

                if not torch.cuda.is_available():
                    raise SweepError(f"--device {args.device}: torch sees no CUDA device on this machine")
            return bench_main(args.device, args.json, args.models, not args.no_compile, args.scale,
                              forms=not args.no_forms, first=not args.no_first_call)
    except ConfigError as e:
        print(f"sweep: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except SweepError as e:
        if os.environ.get("SWEEP_DEBUG"):
            traceback.print_exception(e)  # with its cause: a worker's own traceback, a write's OSError
        print(f"sweep: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("sweep: interrupted; the rows written so far are kept", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("SWEEP_DEBUG"):
            raise
        print(f"sweep: {type(e).__name__}: {first_line(e)} (set SWEEP_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_FAILED


def _show(args: argparse.Namespace) -> int:
    from .show import DEFAULT_TOP, format_rows, query

    top = args.top if args.top is not None else (DEFAULT_TOP if args.format == "table" else None)
    if top is not None and top < 0:
        raise SweepError(f"--top must be 0 or more, got {top}")
    columns = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
    table = query(args.run, top=top, by=args.by, descending=args.descending, where=args.where, columns=columns)
    print(format_rows(table, args.format))
    return EXIT_OK


def _validate(args: argparse.Namespace) -> int:
    from .config import load_config
    from .preflight import plan_checked

    config = load_config(args.config, args.overrides)
    checked = plan_checked(config)  # the weights files against the module: no Ray, no MLflow
    for line in checked.warnings:
        print(f"warning: {line}", file=sys.stderr)
    print(f"{args.config}: ok — study '{config.study.kind}' with {len(checked.study)} candidates")
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    from .config import load_config

    config = load_config(args.config, args.overrides)  # fails here, before Ray starts
    from workers.driver import run

    result = run(config, args.out, address=args.address, overwrite=args.overwrite,
                 progress=False if args.no_progress else None)
    code = _report(result, config)
    if not args.no_report and config.sinks.parquet.enabled and result.summary.get("completed"):
        _write_report(result.run_dir)
    return code


def _resume(args: argparse.Namespace) -> int:
    from .config import load_config

    config = load_config(args.config, args.overrides) if args.config else None
    from workers.driver import resume

    result = resume(args.run_dir, args.overrides, address=args.address, config=config,
                    progress=False if args.no_progress else None)
    code = _report(result, None)
    if not args.no_report and result.summary.get("completed"):
        _write_report(result.run_dir)
    return code


def _write_report(run_dir: Path, *, top: int = 10, mlflow: bool = True) -> int:
    from .report import write_report

    if top < 0:
        raise SweepError(f"--top must be 0 or more, got {top}")
    report = write_report(run_dir, mlflow=mlflow, top=top)
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    logged = " (and to the MLflow run, under report/)" if report.mlflow_logged else ""
    n = len(report.figures)
    print(f"report: {report.html} with {n} figure{'' if n == 1 else 's'}{logged}")
    return EXIT_OK


def _report(result, config) -> int:
    s = result.summary
    line = (f"{result.name}: {s['candidates']} candidates: {s['ok']} ok, {s['invalid']} invalid, "
            f"{s['failed']} failed in {s['seconds']:.1f} s ({s['candidates_per_s']:,.1f} candidates/s)")
    objective = next((k.removeprefix("best_") for k in s if k.startswith("best_") and k != "best_candidate_id"), None)
    if objective is not None:
        line += f"; best {objective} {s['best_' + objective]:.6g} (candidate {s['best_candidate_id']})"
    print(line)
    for key, value in result.findings.items():
        # `+ 0.0` prints a negative zero (a barrier of -0.0 on a flat path) as 0.
        if isinstance(value, float):
            value += 0.0
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        print(f"  {key}: {value:.6g}" if numeric else f"  {key}: {value}")
    if s.get("worker_replacements") or s.get("batch_retries"):
        print(f"  {s['worker_replacements']} workers replaced, {s['batch_retries']} batches re-run")
    for line in _problem_lines(result, config is None or config.sinks.parquet.enabled):
        print(line)
    print(f"results: {result.results_dir}")
    if result.mlflow_run_id:
        experiment = (config.sinks.mlflow.experiment or config.name) if config is not None else result.name
        uri = result.mlflow_tracking_uri
        ui = f"mlflow ui --backend-store-uri {uri}" if uri else "mlflow ui"
        print(f"MLflow run: {result.mlflow_run_id} (experiment '{experiment}'; look at it with `{ui}`)")
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return EXIT_OK


def _problem_lines(result, stored: bool) -> List[str]:
    """The rows that were not ok (`result.problems`, the first few), rows with one error together: the count,
    the candidate ids (the first MAX_IDS_SHOWN) and the error cut to MAX_ERROR_SHOWN characters; then, when
    an error was cut or rows were left out and the results were `stored`, where to read them whole."""
    from .preflight import shown_path

    groups: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for p in result.problems:
        groups.setdefault((str(p["status"]), str(p["error"])), []).append(p)
    lines, cut = [], False
    for (status, error), rows in groups.items():
        if len(rows) == 1:
            p = rows[0]
            label = next((str(v) for k, v in p.items() if k not in ("candidate_id", "status", "error")), "")
            head = f"{status} candidate {p['candidate_id']}{' ' + label if label else ''}"
        else:
            ids = ", ".join(str(p["candidate_id"]) for p in rows[:MAX_IDS_SHOWN])
            head = f"{len(rows)} {status} candidates ({ids}{', …' if len(rows) > MAX_IDS_SHOWN else ''})"
        shown = _shorten(error, MAX_ERROR_SHOWN)
        cut = cut or shown != error
        lines.append(f"  {head}: {shown}")
    s = result.summary
    not_ok = s.get("invalid", 0) + s.get("failed", 0)
    more = not_ok > len(result.problems)
    if stored and (cut or more):
        which = f"the first {len(result.problems)} of {not_ok:,} rows that are not ok; all" if more else "full text"
        where = "status != 'ok'"
        lines.append(f"  {which}: sweep show {shlex.quote(shown_path(str(result.run_dir)))} --where \"{where}\" "
                     f"--columns candidate_id,status,error --format csv")
    return lines


def _shorten(text: str, limit: int) -> str:
    """`text` whole when it has at most `limit` characters; else its beginning, cut after a '; ' where one is
    near, and how long it is."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    boundary = head.rfind("; ")
    if boundary >= limit // 2:
        head = head[:boundary + 1]
    return f"{head.rstrip()} … ({len(text):,} characters)"


def console() -> None:
    """The `sweep` command: `main`, then the exit. A run that started its own local Ray cluster leaves
    without tearing it down: everything it wrote is flushed and closed by now, and the cluster's processes
    die with this one (Ray's fate-sharing, then `workers.reaper` for its agents), as when a driver is
    killed. Ray's own teardown at exit would add 2–4 s to every command."""
    code = main()
    if "workers.driver" in sys.modules:
        from workers.driver import started_own_cluster

        if started_own_cluster():
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    console()
