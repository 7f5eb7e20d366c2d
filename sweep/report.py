"""`sweep report`: figures and one self-contained HTML page for a finished run.

`write_report(run_dir)` reads a run folder written by `sweep run`
(`config.yaml`, `run.json` and the Parquet results it names), asks the run's
study module (`sweep.studies.STUDIES[kind]`) for its figures, drawn into
`<run_dir>/report/` (a study without `figures` gets the objective's histogram),
writes `report.html` there with every figure embedded (the page can be mailed
or attached on its own), and logs the folder to the sweep's MLflow run.

What each results column is comes from its role in the Parquet field metadata
(`sweep.results`): metrics, recipe and lineage columns; the report knows no
study kind. Only rows with status `ok` and finite values are drawn; the others
are counted, and their errors listed, on the page. Rows with a lineage column
`generation` (a population trained over generations) are ranked in their last
generation only.

Matplotlib is imported when a report is written, never when this module is.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .analysis import lineage
from .analysis import metric_mode as _metric_mode
from .errors import ConfigError, SweepError
from .plotting import (PAGE_WIDTH_PX, Figure, RunView, better, column_floats, draw_each, escape, histogram,
                       html_table, ok_rows, status_mask)
from .results import LEADING, LINEAGE, METRIC, RECIPE, TRAILING, roles
from .studies import STUDIES
from .types import FAILED, INVALID, OK

#: Columns every results table has that are neither recipe, lineage nor metric (key, outcome, provenance).
FIXED_COLUMNS = frozenset(name for name, _, _ in LEADING + TRAILING)
#: The lineage column that counts a population's rounds of training: only its last value is ranked.
GENERATION = "generation"
#: The figure a study without its own `figures` gets.
DEFAULT_FIGURE = "objective.png"
#: Invalid and failed rows listed with their errors on the page.
MAX_ERRORS_LISTED = 20
#: Characters of one error shown on the page.
MAX_ERROR_CHARS = 2000

#: The rule for metrics other than the objective, which has its own mode in the config.
MODE_RULE = ("metrics other than the objective count as lower-is-better when their name holds 'loss', 'error' "
             "or 'perplexity', else higher-is-better")


@dataclass
class Report:
    """What `write_report` wrote, and whether it reached MLflow."""

    folder: Path  # <run_dir>/report
    html: Path  # <run_dir>/report/report.html
    figures: List[Path]  # the PNGs written
    mlflow_logged: bool  # True when the folder went to the sweep's MLflow run
    warnings: List[str] = field(default_factory=list)  # what could not be done (all but MLflow's also on the page)


def figure_names() -> Tuple[str, ...]:
    """Every file name a report may write: each registered study's FIGURES and the default histogram
    (removed first, so a re-run leaves no stale figure behind)."""
    names = [name for module in STUDIES.values() for name in getattr(module, "FIGURES", ())]
    return tuple(dict.fromkeys(names + [DEFAULT_FIGURE]))


# --------------------------------------------------------------------------- reading a run


def write_report(run_dir: Path, *, mlflow: bool = True, top: int = 10) -> Report:
    """Draw the run's figures and write `<run_dir>/report/report.html`; log the folder to MLflow.

    `top` best ok rows (by the objective, in the config's mode) are listed on
    the page. With `mlflow` (and MLflow enabled in the run's config, and an
    MLflow run recorded in run.json) the report folder is logged as the run's
    `report/` artifacts; a failure there is a warning in the returned Report,
    never an exception.
    """
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise SweepError(f"top must be a whole number of at least 1, got {top!r}")
    run_dir = Path(run_dir)
    record = _read_record(run_dir)
    cfg = _load(run_dir)
    location = str(record.get("results") or run_dir / "results")
    table = _read_table(location, run_dir)
    warnings: List[str] = []
    run = _describe(cfg, table, location, warnings, record=record, run_dir=run_dir)

    folder = run_dir / "report"
    folder.mkdir(exist_ok=True)
    for name in figure_names():
        (folder / name).unlink(missing_ok=True)
    summary: List[str] = []
    sections = _sections(run)
    figures = _draw(run, folder, summary)
    page = folder / "report.html"
    page.write_text(_page(run, figures, sections, summary, top), encoding="utf-8")

    logged = False
    if mlflow:
        logged = _log_to_mlflow(cfg, record, folder, warnings)
    return Report(folder=folder, html=page, figures=[f.path for f in figures], mlflow_logged=logged,
                  warnings=warnings)


_GIVE = "give the runs/<name> folder of an earlier `sweep run`"


def _read_record(run_dir: Path) -> Dict[str, Any]:
    """run.json, after checking the folder holds config.yaml and run.json."""
    if not run_dir.is_dir():
        raise SweepError(f"{run_dir}: no such folder; {_GIVE}")
    for name in ("config.yaml", "run.json"):
        if not (run_dir / name).is_file():
            raise SweepError(f"{run_dir}: not a run folder: {name} is missing; {_GIVE} "
                             f"(it holds config.yaml, run.json and the results)")
    path = run_dir / "run.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SweepError(f"{path}: cannot read it ({e}); {_GIVE}") from None
    if not isinstance(record, dict):
        raise SweepError(f"{path}: should hold a JSON object, got {type(record).__name__}; {_GIVE}")
    return record


def _load(run_dir: Path) -> Any:
    """The run's resolved config (imports not checked: the report runs no model).

    A run folder looked at elsewhere may have lost the files its config names
    (checkpoints, endpoints): those are then not checked either, since the
    report needs only the config's settings.
    """
    from .config import load_config, parse_config
    from .yaml_io import read_yaml

    path = run_dir / "config.yaml"
    try:
        return load_config(path, check_imports=False)
    except ConfigError as first:
        try:
            raw = read_yaml(path.read_text(encoding="utf-8"), source=str(path))
            return parse_config(raw, base_dir=path.resolve().parent, source=str(path), check_imports=False,
                                check_files=False)
        except Exception:
            raise SweepError(f"cannot read the run's config: {first}") from None


def _read_table(location: str, run_dir: Path) -> pa.Table:
    from .sinks.parquet import read_results

    try:
        return read_results(location)
    except FileNotFoundError:
        raise SweepError(f"{run_dir}: no results at {location} (named by run.json); {_GIVE} that wrote rows") from None
    except (OSError, pa.ArrowException) as e:
        raise SweepError(f"{run_dir}: cannot read the results at {location}: {e}") from None


def metric_mode(name: str) -> str:
    """'min' or 'max' for a metric that is not the objective (the rule of `sweep.analysis.metric_mode`)."""
    return _metric_mode(name, None, "min")


def _columns_by_role(schema: pa.Schema, warnings: List[str]) -> Tuple[List[str], List[str], List[str]]:
    """(recipe, lineage, metric) columns of a results schema, in schema order, read from their roles.

    A column without a role (results written before roles were) is taken for
    a metric when it holds floats, else for a recipe column; the page says so.
    """
    found = roles(schema)
    recipe: List[str] = []
    lineage_columns: List[str] = []
    metrics: List[str] = []
    unmarked = [f.name for f in schema if found[f.name] is None and f.name not in FIXED_COLUMNS]
    for f in schema:
        role = found[f.name]
        if role is None and f.name not in FIXED_COLUMNS:
            role = METRIC if pa.types.is_floating(f.type) else RECIPE
        {RECIPE: recipe, LINEAGE: lineage_columns, METRIC: metrics}.get(role, []).append(f.name)
    if unmarked:
        which = ("the results carry no column roles" if all(r is None for r in found.values())
                 else f"results columns {', '.join(unmarked)} carry no role")
        warnings.append(f"{which} (written before sweep recorded them): float columns are taken for metrics "
                        f"({', '.join(m for m in metrics if m in unmarked) or 'none'}), the others for recipe "
                        f"columns")
    return recipe, lineage_columns, metrics


def _describe(cfg: Any, table: pa.Table, location: str, warnings: List[str], *,
              record: Optional[Dict[str, Any]] = None, run_dir: Optional[Path] = None) -> RunView:
    study = getattr(cfg, "study", None)
    kind = str(getattr(study, "kind", "") or "unknown")
    recipe, lineage_columns, metrics = _columns_by_role(table.schema, warnings)
    config_metrics = getattr(cfg, "metrics", None)
    objective = getattr(config_metrics, "objective", None)
    mode = getattr(config_metrics, "mode", "min") or "min"
    if objective is not None and objective not in metrics:
        fallback = metrics[0] if metrics else None
        warnings.append(f"metrics.objective is {objective!r}, but the results have no such metric column "
                        f"(metrics: {', '.join(metrics) or 'none'}); ranking by {fallback!r} instead"
                        + (f" ({mode} is better)" if fallback else ""))
        objective = fallback
    elif objective is None:
        objective = metrics[0] if metrics else None
    if objective is not None:
        metrics = [objective] + [m for m in metrics if m != objective]
    return RunView(name=str(getattr(cfg, "name", "sweep")), kind=kind, study=study, location=location, table=table,
                   ok=ok_rows(table), recipe=recipe, lineage=lineage_columns, metrics=metrics, objective=objective,
                   mode=mode, record=record or {}, run_dir=run_dir, warnings=warnings,
                   describe=metric_descriptions(config_metrics, metrics))


def metric_descriptions(metrics: Any, names: Sequence[str] = ()) -> Dict[str, str]:
    """What each metric is ("loss" → "cross-entropy, nats"), for the figures' labels: the config's
    `metrics.describe`, over the `describe` dict of the metrics function it names (imported here, unless the
    config describes every one of `names` already; a function that does not import, or has no such dict,
    gives nothing, and the labels carry the bare names)."""
    found: Dict[str, str] = {}
    given = getattr(metrics, "describe", None)
    given = given if isinstance(given, dict) else {}
    spec = getattr(metrics, "function", None)
    if isinstance(spec, str) and (not names or any(name not in given for name in names)):
        from .model import import_object

        try:
            attribute = getattr(import_object(spec), "describe", None)
        except Exception:  # the report runs no model: a metrics module that does not import here is no error
            attribute = None
        if isinstance(attribute, dict):
            found = {k: v for k, v in attribute.items() if isinstance(k, str) and isinstance(v, str) and k and v}
    found.update(given)
    return found


# --------------------------------------------------------------------------- ranking


def best_rows(table: pa.Table, objective: str, mode: str, top: int) -> pa.Table:
    """The `top` best ok rows with a finite objective, best first (ties: lower candidate_id first)."""
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    ok = ok_rows(table)
    values = column_floats(ok, objective)
    keep = np.flatnonzero(np.isfinite(values))
    ids = column_floats(ok, "candidate_id")[keep]
    key = values[keep] if mode == "min" else -values[keep]
    order = keep[np.lexsort((ids, key))][:top]
    return ok.take(pa.array(order, pa.int64()))


def _last_generation(run: RunView) -> Optional[int]:
    """The last value of the lineage column `generation` among the ok rows with a finite objective (None
    when the rows have no such column or no such row)."""
    if GENERATION not in run.lineage or run.objective is None:
        return None
    generation = run.floats(GENERATION)
    keep = np.isfinite(generation) & np.isfinite(run.floats(run.objective))
    return int(generation[keep].max()) if keep.any() else None


def _trial_ends(run: RunView) -> Optional[np.ndarray]:
    """Where trials end at different generations (a search with waves or halving: lineage `trial` or
    `stopped`), a mask of each trial's last row (its largest `step`; key `trial`, else `member`); else None."""
    if "trial" not in run.lineage and "stopped" not in run.lineage:
        return None
    key = run.floats("trial" if "trial" in run.lineage else "member")
    step = run.floats("step") if "step" in run.lineage else column_floats(run.table, "candidate_id")
    last: Dict[float, int] = {}
    for i, (k, s) in enumerate(zip(key.tolist(), step.tolist())):
        if k == k and (k not in last or s > step[last[k]]):
            last[k] = i
    mask = np.zeros(len(key), dtype=bool)
    mask[list(last.values())] = True
    return mask


# --------------------------------------------------------------------------- the study's figures and sections


def _draw(run: RunView, folder: Path, summary: List[str]) -> List[Figure]:
    """The figures of the run's study (its module's `figures`, else the histogram); a figure that fails
    is a warning, not the end of the report."""
    if run.objective is None:
        run.warnings.append("the results have no metric columns: no figures, no ranking")
        return []
    if not np.isfinite(run.floats(run.objective)).any():
        run.warnings.append(f"no ok row has a finite {run.objective}: nothing to draw")
        return []
    draw = getattr(STUDIES.get(run.kind), "figures", None)
    if draw is None:
        return draw_each(run, folder, summary, {"histogram": histogram})
    try:
        return list(draw(run, folder, summary))
    except Exception as e:  # the page still shows the counts, the table and the errors
        run.warnings.append(f"could not draw the {run.kind} figures: {type(e).__name__}: {e}")
        return []


def _sections(run: RunView) -> List[str]:
    """The study's own sections of the page (its module's `page(run)`), HTML; none when it has no `page`."""
    page = getattr(STUDIES.get(run.kind), "page", None)
    if page is None:
        return []
    try:
        return list(page(run))
    except Exception as e:  # the page still shows the counts, the table and the errors
        run.warnings.append(f"could not write the {run.kind} section of the page: {type(e).__name__}: {e}")
        return []


# --------------------------------------------------------------------------- the page


#: The page's style. Its content is PAGE_WIDTH_PX wide, as wide as the widest figure: every figure is shown at its
#: own size, so its text keeps its point size.
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: {page}px; color: #222; padding: 0 1em; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #555; } .warn { color: #a40; } pre { white-space: pre-wrap; margin: 0; }
""".replace("{page}", str(PAGE_WIDTH_PX))


def _counts(table: pa.Table) -> Dict[str, int]:
    counts = {"rows": table.num_rows, OK: 0, INVALID: 0, FAILED: 0}
    if "status" in table.column_names:
        for item in pc.value_counts(table.column("status")).to_pylist():
            key = item["values"] if item["values"] in (OK, INVALID, FAILED) else "other"
            counts[key] = counts.get(key, 0) + item["counts"]
    return counts


def _described_by(run: RunView, table: pa.Table) -> List[str]:
    """The recipe and lineage columns of `table`, in table order: what says which candidate a row is."""
    named = set(run.recipe) | set(run.lineage)
    return [c for c in table.column_names if c in named]


def _page(run: RunView, figures: List[Figure], sections: Sequence[str], summary: List[str], top: int) -> str:
    e = escape
    counts = _counts(run.table)
    parts = [f"<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
             f"<title>sweep report: {e(run.name)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n",
             f"<h1>{e(run.name)}</h1>\n",
             f"<p>Study kind: <b>{e(run.kind)}</b>. Objective: <b>{e(run.objective or 'none')}</b> "
             f"({e(better(run.mode))}). Results: <code>{e(run.location)}</code>. "
             f"Written {e(datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'))}.</p>\n",
             "<h2>Rows</h2>\n",
             html_table(list(counts), [list(counts.values())], "counts")]
    if run.objective is not None:
        nonfinite = int((~np.isfinite(run.floats(run.objective))).sum())
        if nonfinite:
            parts.append(f"<p>{nonfinite} ok rows have a non-finite {e(run.objective)}: "
                         f"they are neither drawn nor ranked.</p>\n")
    if run.warnings:
        parts.append("<h2>Warnings</h2>\n<ul>" + "".join(f'<li class="warn">{e(w)}</li>' for w in run.warnings)
                     + "</ul>\n")
    if summary:
        parts.append("<h2>Summary</h2>\n<ul>" + "".join(f"<li>{e(s)}</li>" for s in summary) + "</ul>\n")
    parts.extend(sections)
    if figures:
        parts.append("<h2>Figures</h2>\n")
        for figure in figures:
            data = base64.b64encode(figure.path.read_bytes()).decode("ascii")
            parts.append(f'<figure id="{e(figure.path.stem)}"><img src="data:image/png;base64,{data}" '
                         f'alt="{e(figure.caption)}">\n<figcaption>{e(figure.path.name)}: '
                         f"{e(figure.caption)}</figcaption></figure>\n")
    if run.objective is not None:
        ranked, last, ends = run.table, _last_generation(run), _trial_ends(run)
        if ends is not None:
            ranked = run.table.filter(pa.array(ends))
        elif last is not None:
            ranked = run.table.filter(pa.array(column_floats(run.table, GENERATION) == last))
        best = best_rows(ranked, run.objective, run.mode, top)
        columns = ["candidate_id"] + _described_by(run, best) + run.metrics
        rows = [[row.get(c) for c in columns] for row in best.select(columns).to_pylist()]
        if ends is not None:
            parts.append(f"<h2>Best {len(rows)} trials by {e(run.objective)} at their last evaluation "
                         f"({e(better(run.mode))})</h2>\n<p>Each trial's last row is ranked: where it ended, at the "
                         f"full budget or at the rung where it stopped (its <code>step</code> says which).</p>\n")
        else:
            of = "" if last is None else f" of the last generation ({last})"
            parts.append(f"<h2>Best {len(rows)} rows{of} by {e(run.objective)} ({e(better(run.mode))})</h2>\n")
            if last is not None:
                parts.append(f"<p>Only the rows of the last generation ({last}) are ranked: the rows of earlier "
                             f"generations are the same members part-trained.</p>\n")
        parts.append(html_table(columns, rows, "best") + "\n")
    parts.append(_problems(run))
    parts.append(f"<p><small>Figures draw the ok rows with finite values only. The objective's direction comes "
                 f"from the config; {e(MODE_RULE)}.</small></p>\n</body>\n</html>\n")
    return "".join(parts)


def _problems(run: RunView) -> str:
    table = run.table
    bad = table.filter(pa.array(~status_mask(table, OK)))
    if not bad.num_rows:
        return "<h2>Invalid and failed rows</h2>\n<p>None.</p>\n"
    columns = [c for c in ("candidate_id", "status") if c in bad.column_names]
    columns += _described_by(run, bad)
    shown = bad.slice(0, MAX_ERRORS_LISTED)
    errors = shown.column("error").to_pylist() if "error" in shown.column_names else [None] * shown.num_rows
    rows = []
    for row, error in zip(shown.select(columns).to_pylist(), errors):
        text = "" if error is None else str(error)
        if len(text) > MAX_ERROR_CHARS:
            text = text[:MAX_ERROR_CHARS] + " …"
        rows.append([row[c] for c in columns] + [text])
    more = bad.num_rows - shown.num_rows
    return (f"<h2>Invalid and failed rows ({bad.num_rows})</h2>\n"
            + html_table(columns + ["error"], rows, "problems")
            + (f"\n<p>… and {more} more (see the results table).</p>" if more else "") + "\n")


# --------------------------------------------------------------------------- MLflow


def _log_to_mlflow(cfg: Any, record: Dict[str, Any], folder: Path, warnings: List[str]) -> bool:
    """Log the report folder as the run's `report/` artifacts; False (and a warning) when it could not be."""
    settings = getattr(getattr(cfg, "sinks", None), "mlflow", None)
    if settings is None or not getattr(settings, "enabled", False):
        return False
    run_id = record.get("mlflow_run_id")
    if not run_id:
        warnings.append("run.json names no MLflow run (the sweep never reached MLflow): the report was not logged")
        return False
    # Where the sweep logged (run.json), so a report made from another directory finds the run.
    uri = record.get("mlflow_tracking_uri") or getattr(settings, "tracking_uri", None)
    try:
        from mlflow.tracking import MlflowClient

        # One attempt with a bounded wait, as the sweep's own MLflow sink does: a server that is
        # away costs seconds here, not MLflow's minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        MlflowClient(tracking_uri=uri).log_artifacts(str(run_id), str(folder), artifact_path="report")
    except Exception as e:  # a server that is down, a run that is gone: the report on disk stands
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        warnings.append(f"the report was not logged to MLflow run {run_id} ({uri or 'the default tracking URI'}): "
                        f"{type(e).__name__}: {lines[0] if lines else ''}")
        return False
    return True


__all__ = ("Report", "write_report", "best_rows", "lineage", "metric_mode")
