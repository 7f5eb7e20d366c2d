"""sweep/bench.py on a tiny scale: rows for every candidate form, the spot check against the loop, the notes
for what is missing, and the first call in fresh processes. No figure is asserted: speed is what the bench
prints, not what a test checks."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict

import pytest
import torch

import sweep
from sweep import bench, chunking
from sweep.bench import EVOTORCH_MISSING, FORMS, STACKED_MISSING, BenchMismatch, Result

#: The tiny MLP at this scale: 40 candidates, 4 in the naive loop.
SCALE = 0.002
#: What `sweep bench --json` gave before the forms and the first call: later readers still find it.
JSON_FIELDS = {"model", "params", "candidates", "loop", "engine", "ratio", "compile_seconds", "strategy",
               "chunk_size", "roofline", "roofline_fraction"}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(chunking.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(chunking, "_CHOSEN", {})
    return tmp_path / "cache"


def tiny(**options):
    (result,) = bench.run_bench("cpu", ["mlp-32"], compile=False, scale=SCALE, first=False, **options)
    return result


def has_evotorch() -> bool:
    try:
        import evotorch  # noqa: F401
    except ImportError:
        return False
    return True


def test_every_form_has_a_row_checked_against_the_loop(cache):
    result = tiny()
    assert not cache.exists(), "the bench measures chunk sizes in its own temporary cache"
    assert chunking.cache_dir() == cache
    assert result.candidates == 40 and result.form_candidates == 40
    expected = {"dicts", "noise"}
    expected |= {"stacked", "stacked_flat"} if hasattr(sweep, "Stacked") else set()
    expected |= {"evotorch"} if has_evotorch() else set()
    assert set(result.forms) == expected
    assert all(rate > 0 for rate in result.forms.values())
    assert result.form_loop > 0
    assert result.form_ratio == {f: pytest.approx(rate / result.form_loop) for f, rate in result.forms.items()}
    assert result.checked == ["fp32", "bf16", *[f for f in FORMS if f in expected]]
    for form in set(FORMS) - expected:
        assert form in result.notes
    text = bench.format_table([result], bench.environment("cpu"))
    for form in expected:
        assert FORMS[form] in text
    assert "checked equal to the functional_call loop" in text


def test_the_json_keeps_every_field_it_had():
    fields = asdict(Result("m", 1, 2, 3.0))
    assert JSON_FIELDS <= set(fields)
    json.dumps(fields)


def test_a_form_whose_rows_differ_from_the_loop_stops_the_bench(monkeypatch):
    real = bench.evaluate

    def off_for_dicts(module, candidates, *args, **kwargs):
        table = real(module, candidates, *args, **kwargs)
        if isinstance(candidates, list):  # the explicit dicts: one row's metric off by 1e-4 relative
            values = table.column("mse").to_pylist()
            values[-1] *= 1 + 1e-4
            table = table.set_column(table.column_names.index("mse"), "mse", [values])
        return table

    monkeypatch.setattr(bench, "evaluate", off_for_dicts)
    with pytest.raises(BenchMismatch, match=r"dicts row 39: metric 'mse' is .*, the functional_call loop gives"):
        tiny()


@pytest.mark.skipif(not has_evotorch(), reason="evotorch is not installed (.ci/run installs the bench extra)")
def test_a_compared_library_that_differs_from_the_loop_is_noted_and_the_bench_goes_on(monkeypatch):
    real = bench.evotorch_problem

    def off(*args, **kwargs):
        (run, row), note = real(*args, **kwargs)
        return (run, lambda i: {name: value * 2 for name, value in row(i).items()}), note

    def fails(*args, **kwargs):
        def run():
            raise AttributeError("'NoneType' object has no attribute 'evals'")
        return (run, lambda i: {}), ""

    for fake, expected in ((off, r"not shown: bench: EvoTorch row 0: metric 'mse' is .*, the functional_call loop "
                                 r"gives"), (fails, r"not shown: 'NoneType' object has no attribute 'evals'")):
        monkeypatch.setattr(bench, "evotorch_problem", fake)
        result = tiny()
        assert "evotorch" not in result.forms and "evotorch" not in result.checked
        assert re.match(expected, result.notes["evotorch"]), result.notes
        assert {"dicts", "noise"} <= set(result.forms)
        assert "mlp-32-16-1 EvoTorch: not shown: " in bench.format_table([result], bench.environment("cpu"))


def test_a_failed_row_fails_the_spot_check():
    candidate = lambda i: {n: p.detach() for n, p in module.named_parameters()}  # noqa: E731
    module = torch.nn.Linear(3, 1)
    data = [(torch.ones(4, 3), torch.zeros(4, 1))]
    metrics = lambda o, y: {"mse": ((o - y) ** 2).mean()}  # noqa: E731
    right = bench.reference_metrics(module, candidate(0), data, metrics)["mse"]
    bench.spot_check("f", lambda i: {"mse": right * (1 + 1e-6)}, candidate, 5, module, data, metrics)
    with pytest.raises(BenchMismatch, match="row 0"):
        bench.spot_check("f", lambda i: {"mse": None}, candidate, 5, module, data, metrics)
    with pytest.raises(BenchMismatch, match="none of the metrics"):
        bench.spot_check("f", lambda i: {"other": right}, candidate, 5, module, data, metrics)
    assert bench.spot_rows(5) == [0, 2, 4] and bench.spot_rows(1) == [0]


def test_without_evotorch_or_stacked_the_rows_say_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "evotorch", None)  # `import evotorch` raises, as where it is not installed
    monkeypatch.delattr(sweep, "Stacked", raising=False)
    monkeypatch.delitem(sweep._LAZY, "Stacked")  # nor found on first use, as in a release without it
    result = tiny()
    assert set(result.forms) == {"dicts", "noise"}
    assert result.notes["evotorch"] == EVOTORCH_MISSING == "evotorch not installed (pip install 'sweep[bench]')"
    assert result.notes["stacked"] == result.notes["stacked_flat"] == STACKED_MISSING
    text = bench.format_table([result], bench.environment("cpu"))
    assert f"mlp-32-16-1 EvoTorch: {EVOTORCH_MISSING}" in text


@pytest.mark.skipif(not has_evotorch(), reason="evotorch is not installed")
def test_evotorch_evaluates_the_same_population():
    torch.manual_seed(0)
    spec = bench.MODELS[0]
    module = spec.make().eval()
    data = spec.data()
    a, d = bench._anchors(module, torch.device("cpu"))
    pop = bench.population(module, a, d, torch.linspace(0, 1, 6))
    (run, row), note = bench.evotorch_problem(module, data, spec.metrics, pop, torch.device("cpu"))
    assert note == ""
    run()
    for i in range(6):
        expected = bench.reference_metrics(module, pop.row(i), data, spec.metrics)["mse"]
        assert row(i)["mse"] == pytest.approx(expected, rel=1e-5)
        alpha = torch.linspace(0, 1, 6)[i]
        assert all(torch.allclose(pop.row(i)[n], a[n] + alpha * d[n], rtol=1e-6) for n in a), "row i is A + α_i·d"


def test_the_first_call_runs_in_fresh_processes_on_their_own_cache(tmp_path):
    spec = bench.MODELS[0]
    folder = tmp_path / "bench-cache"
    seconds, note = bench.first_call(spec, "cpu", 40, cache=folder, k_loop=4)
    assert set(seconds) == {"cold", "warm", "steady", "loop"} and all(s > 0 for s in seconds.values())
    assert note == "", "the cold process kept its choice and the warm one found it"
    assert len(list((folder / chunking.CHUNK_FOLDER).glob("*.json"))) == 1
    assert not (tmp_path / "cache").exists(), "the caller's cache is neither read nor written"


def test_the_cli_leaves_out_the_forms_and_the_first_call_when_asked(capsys):
    from sweep.cli import main

    args = ["bench", "--models", "mlp-32", "--no-compile", "--scale", str(SCALE), "--json"]
    assert main([*args, "--no-forms", "--no-first-call"]) == 0
    (result,) = json.loads(capsys.readouterr().out)["results"]
    assert result["engine"] and result["forms"] == {} and result["first_call"] == {}
    assert main([*args, "--no-first-call"]) == 0
    (result,) = json.loads(capsys.readouterr().out)["results"]
    assert "dicts" in result["forms"] and result["first_call"] == {}
