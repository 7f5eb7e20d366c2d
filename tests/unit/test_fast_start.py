"""What a command imports and waits for: the help and `sweep show` start without torch, a slow start says what
it waits for, MLflow's store is opened ahead of its sink. Times are measured by the README's commands, not
asserted here: these tests check the means."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[2]


def imported_after(code: str, cwd: Path) -> set:
    """The modules a fresh interpreter holds after running `code` (which must not print)."""
    probe = f"import sys\n{code}\nprint(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def test_the_help_imports_neither_torch_nor_the_config(tmp_path):
    code = ("from sweep.cli import main\n"
            "import contextlib, io\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n        main(['--help'])\n    except SystemExit:\n        pass")
    modules = imported_after(code, tmp_path)
    assert "sweep.cli" in modules
    assert not {"torch", "sweep.config", "pydantic", "ray", "mlflow", "pyarrow"} & modules


def test_sweep_show_reads_results_without_torch_ray_or_mlflow(tmp_path):
    results = tmp_path / "runs" / "t" / "results"
    results.mkdir(parents=True)
    pq.write_table(pa.table({"candidate_id": [0, 1], "status": ["ok", "ok"], "loss": [0.5, 0.25]}),
                   results / "part-000000.parquet")
    code = ("from sweep.cli import main\n"
            "import contextlib, io\n"
            f"with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            f"    assert main(['show', {str(tmp_path / 'runs' / 't')!r}]) == 0\n"
            "assert '0.25' in out.getvalue()")
    modules = imported_after(code, tmp_path)
    assert "sweep.show" in modules and "duckdb" in modules
    assert not {"torch", "ray", "mlflow", "sweep.config"} & modules


def test_reading_a_config_and_the_code_that_runs_it_imports_no_torch(tmp_path, repo):
    """torch is imported where it is first used (`sweep.lazy`): reading a config, the driver and the worker's
    class leave it out (and pyarrow.dataset's pandas), so a run whose checks were kept starts Ray sooner."""
    code = (f"from sweep.config import load_config\n"
            f"config = load_config({str(repo / 'configs/pbt.yaml')!r}, check_imports=False)\n"
            "import workers.driver, workers.actor, sweep.population, sweep.recipes, sweep.preflight")
    modules = imported_after(code, tmp_path)
    assert {"sweep.config", "workers.actor", "sweep.studies.pbt", "ray"} <= modules
    assert not {"torch", "pandas", "pyarrow.dataset"} & modules


def test_lazy_torch_is_torch_once_used(tmp_path):
    code = ("from sweep.lazy import no_grad, torch\n"
            "import sys\n"
            "assert 'torch' not in sys.modules\n"
            "@no_grad\n"
            "def grad_enabled():\n"
            "    return torch.is_grad_enabled()\n"
            "assert 'torch' not in sys.modules\n"
            "assert grad_enabled() is False and torch.is_grad_enabled() is True\n"
            "assert torch.Tensor is sys.modules['torch'].Tensor and grad_enabled.__name__ == 'grad_enabled'")
    assert "torch" in imported_after(code, tmp_path)


def test_the_public_names_are_there_when_asked_for(tmp_path):
    modules = imported_after("import sweep\nassert sweep.ConfigError", tmp_path)
    assert "torch" not in modules
    code = "import sweep\nassert callable(sweep.evaluate) and sweep.OK == 'ok' and 'Stacked' in dir(sweep)"
    assert "torch" in imported_after(code, tmp_path)


def test_a_wait_says_what_it_waits_for_every_interval_and_a_short_one_says_nothing(monkeypatch, capsys):
    import workers.driver as driver

    monkeypatch.setattr(driver, "LOG_INTERVAL", 0.05)
    with driver.waiting("starting Ray", enabled=False):
        time.sleep(0.18)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) >= 2 and all(line.startswith("sweep: starting Ray: ") and line.endswith(" s so far")
                                   for line in lines)
    monkeypatch.setattr(driver, "LOG_INTERVAL", 10.0)
    with driver.waiting("starting 2 workers", enabled=False):
        pass
    assert capsys.readouterr().err == ""


def test_what_starting_workers_waits_for_names_compiling_when_the_config_compiles():
    import workers.driver as driver

    config = SimpleNamespace(evaluation=SimpleNamespace(compile=True))
    assert driver._starting(2, config).startswith("starting 2 workers (each imports torch, builds the model")
    assert driver._starting(1, config).endswith(", then compiles it)")
    config.evaluation.compile = False
    assert "compiles" not in driver._starting(1, config)


def test_mlflow_s_store_is_opened_ahead_of_the_sink_and_the_sink_waits_for_it(tmp_path):
    import sqlite3

    from sweep.sinks import mlflow as sink

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = SimpleNamespace(sinks=SimpleNamespace(mlflow=SimpleNamespace(tracking_uri=uri)))
    sink.prepare(config)
    thread = sink._PREPARING[uri]
    sink._prepared(uri)  # what the sink's thread does before its first request
    assert not thread.is_alive()
    tables = {row[0] for row in sqlite3.connect(tmp_path / "mlflow.db").execute(
        "select name from sqlite_master where type = 'table'")}
    assert {"experiments", "runs", "metrics"} <= tables
    # A server's store is not prepared: its client opens nothing.
    server = SimpleNamespace(sinks=SimpleNamespace(mlflow=SimpleNamespace(tracking_uri="http://127.0.0.1:9")))
    sink.prepare(server)
    assert "http://127.0.0.1:9" not in sink._PREPARING
