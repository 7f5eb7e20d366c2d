"""One contract for every registered study kind, run on a tiny model through real Ray workers.

Each kind's module gives `example(bench)`, the study section of a small working
config; from it the contract plans the study, runs it, checks the rows and the
roles their schema carries, draws the report's figures, and resumes the run
(or checks that the kind refuses to, by name). A kind added to `STUDIES` is
tested here without a new test file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pyarrow.dataset as ds
import pytest
import torch

from sweep.config import parse_config
from sweep.errors import SweepError
from sweep.model import write_weights_file
from sweep.report import write_report
from sweep.results import METRIC, ROLES, roles
from sweep.sinks.parquet import part_files, resolve
from sweep.studies import STUDIES, plan
from sweep.studies.base import StudyContext
from workers.driver import resume, run

pytestmark = pytest.mark.integration

#: The contract's model: the digits MLP with 8 hidden units (a few hundred parameters).
FACTORY = "sweep.examples.digits:make_model"
KWARGS = {"hidden": 8}


@dataclass
class Bench:
    """What a study's `example` may use: a folder for its files and checkpoints of the tiny model."""

    folder: Path
    train_loader: str = "sweep.examples.digits:train_batches"
    loss: str = "sweep.examples.digits:loss"

    @property
    def model(self) -> torch.nn.Module:
        from sweep.examples.digits import make_model

        torch.manual_seed(0)
        return make_model(**KWARGS)

    def checkpoint(self, i: int) -> str:
        """A checkpoint of the tiny model with random weights drawn under seed `i` (written once)."""
        from sweep.examples.digits import make_model

        path = self.folder / f"checkpoint-{i}.safetensors"
        if not path.exists():
            torch.manual_seed(1000 + i)
            write_weights_file(make_model(**KWARGS).state_dict(), path)
        return str(path)


def sweep_config(module: ModuleType, folder: Path, name: str, **sinks):
    bench = Bench(folder)
    raw = {
        "name": name,
        "model": {"factory": FACTORY, "kwargs": KWARGS},
        "data": {"loader": "sweep.examples.digits:eval_batches"},
        "metrics": {"function": "sweep.examples.digits:metrics", "objective": "accuracy", "mode": "max"},
        "study": module.example(bench),
        "workers": {"count": 1, "batch_size": 1},
        "sinks": {"mlflow": {"enabled": False}, "parquet": {"rows_per_file": 2, **sinks}},
    }
    return parse_config(raw, base_dir=folder)


@pytest.fixture(params=sorted(STUDIES))
def kind(request) -> str:
    return request.param


def test_the_module_is_a_complete_plugin(kind):
    module = STUDIES[kind]
    assert module.Config.model_fields["kind"].annotation.__args__ == (kind,)
    for name in ("plan", "example"):
        assert callable(getattr(module, name, None)), f"study kind {kind!r}: its module has no {name}()"
    if hasattr(module, "figures"):
        assert callable(module.figures) and module.FIGURES, f"study kind {kind!r}: figures() without FIGURES"


def test_the_study_plans_runs_reports_and_resumes(kind, tmp_path, ray_cluster):
    module = STUDIES[kind]
    config = sweep_config(module, tmp_path, f"contract-{kind}")
    study = plan(config.study, StudyContext.from_config(config))
    fields = study.fields()
    assert fields, f"{kind}: the study declares no columns"
    declared = {f.name: f for f in fields}
    assert len(declared) == len(fields), f"{kind}: a column is declared twice"

    result = run(config, tmp_path, progress=False)
    table = ds.dataset(result.results_dir, format="parquet").to_table().sort_by("candidate_id")
    ids = table.column("candidate_id").to_pylist()
    assert len(ids) == len(set(ids)) == len(study), f"{kind}: {len(ids)} rows for {len(study)} candidates"
    assert table.filter(ds.field("status") == "ok").num_rows > 0, table.column("error").to_pylist()[:3]

    # Every column says its role; the study's columns keep the roles and types it declared.
    found = roles(table.schema)
    assert set(found.values()) <= set(ROLES), found
    for name, f in declared.items():
        assert table.schema.field(name).type == f.type, name
        assert found[name] == (f.metadata or {}).get(b"sweep.role", b"").decode(), name
    metrics = [n for n, r in found.items() if r == METRIC]
    assert metrics[0] == "loss" and set(metrics) == {"loss", "accuracy"}
    accuracy = [v for v in table.column("accuracy").to_pylist() if v is not None]
    assert accuracy and all(0.0 <= v <= 1.0 for v in accuracy)

    report = write_report(result.run_dir, mlflow=False)
    drawn = {p.name for p in report.figures}
    assert drawn, f"{kind}: the report drew no figure ({report.warnings})"
    allowed = set(getattr(module, "FIGURES", ())) | {"objective.png"}
    assert drawn <= allowed, f"{kind}: figures {sorted(drawn - allowed)} are not in its FIGURES"
    assert not [w for w in report.warnings if "could not" in w], report.warnings
    page = report.html.read_text()
    for name in drawn:
        assert f'id="{Path(name).stem}"' in page

    if not study.resumable:
        assert study.not_resumable, f"{kind}: a study that cannot be resumed must say why"
        with pytest.raises(SweepError, match=kind):
            resume(result.run_dir)
        return
    # Lose the last Parquet file, as a killed sweep would, and finish the run: the same rows come back.
    fs, root = resolve(result.results_dir)
    files = part_files(fs, root)
    assert len(files) > 1
    fs.delete_file(files[-1])
    resumed = resume(result.run_dir, progress=False)
    again = ds.dataset(resumed.results_dir, format="parquet").to_table().sort_by("candidate_id")
    assert again.column("candidate_id").to_pylist() == ids
    for name in (*declared, "status", *metrics):
        before, after = table.column(name).to_pylist(), again.column(name).to_pylist()
        if name in metrics:
            assert all((a is None and b is None) or math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7)
                       or (math.isnan(a) and math.isnan(b)) for a, b in zip(before, after)), name
        else:
            assert before == after, name
