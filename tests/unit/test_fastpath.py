"""The chunked vmap fast path: explicit dicts in chunks, chunk sizes (forced and measured),
the loop fallback for modules that do not vmap, per-candidate failures and torch.compile —
all checked against an independent per-candidate functional_call loop."""

from __future__ import annotations

import warnings
from typing import Dict

import numpy as np
import pyarrow as pa
import pytest
import torch

import sweep
from sweep.evaluator import Evaluator
from sweep.examples import models

# --------------------------------------------------------------------------- helpers


from conftest import reference_eval as ref_loop  # noqa: E402 - the one independent reference loop


def check_rel(got: Dict, want: Dict[str, float], tol: float) -> None:
    assert got["status"] == "ok", got["error"]
    assert got["error"] is None
    for name, w in want.items():
        g = got[name]
        assert g is not None, name
        assert abs(g - w) <= tol * max(abs(w), 1e-12), (name, g, w)


def params_of(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def random_params(module, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g) * scale for n, p in module.named_parameters()}


def reg_data(features=6, outputs=3, sizes=(5, 2, 9), seed=10):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, features, generator=g), torch.randn(n, outputs, generator=g)) for n in sizes]


def reg_metrics(out, y):
    return {"mse": ((out - y) ** 2).mean(), "l1": (out - y).abs().mean()}


class BNNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 8)
        self.bn = torch.nn.BatchNorm1d(8)
        self.fc2 = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def make_bn_net():
    torch.manual_seed(4)
    net = BNNet()
    with torch.no_grad():
        net.bn.running_mean.copy_(torch.linspace(-1.0, 1.0, 8))
        net.bn.running_var.copy_(torch.linspace(0.5, 3.0, 8))
    net.train()
    return net


class IfNet(torch.nn.Module):
    """Data-dependent Python control flow on a parameter-dependent tensor: does not vmap."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 8)
        self.fc2 = torch.nn.Linear(8, 3)

    def forward(self, x):
        h = self.fc1(x)
        if h.sum() > 0:
            h = torch.relu(h)
        else:
            h = torch.tanh(h) * 2.0
        return self.fc2(h)


class ItemNet(torch.nn.Module):
    """`.item()` in forward: does not vmap."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(6, 3)

    def forward(self, x):
        scale = float(self.fc.weight.abs().mean().item())
        return self.fc(x) / (1.0 + scale)


class RaiseNet(torch.nn.Module):
    """Raises for candidates whose weights are large, evaluates the others."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(6, 3)

    def forward(self, x):
        if self.fc.weight.abs().max() > 3.0:
            raise ValueError("weights too large for this model")
        return self.fc(x)


def vmap_warnings(record) -> list:
    return [w for w in record if issubclass(w.category, RuntimeWarning)
            and "does not evaluate under torch.vmap" in str(w.message)]


# --------------------------------------------------------------------------- explicit dicts, chunked


def test_mixed_valid_and_invalid_dicts_in_one_chunk_keep_order():
    module = models.mlp((6, 8, 3))
    good = [random_params(module, s) for s in (1, 2, 3)]
    missing = {k: v for k, v in random_params(module, 4).items() if k != "0.bias"}
    nan = random_params(module, 5)
    nan["2.weight"][0, 0] = float("nan")
    shaped = random_params(module, 6)
    shaped["0.weight"] = torch.zeros(8, 5)
    cands = [good[0], sweep.Invalid("could not read file x"), missing, good[1], nan, shaped, [1, 2], good[2]]
    data = reg_data()

    ev = Evaluator(module, data, reg_metrics, chunk_size=16)  # all eight in one chunk
    table = ev.run(cands)
    assert ev.strategy == "vmap"
    rows = table.to_pylist()
    assert table.column_names == ["candidate_id", "status", "error", "mse", "l1"]
    assert table.schema.field("mse").type == pa.float64()
    assert [r["candidate_id"] for r in rows] == list(range(8))
    assert [r["status"] for r in rows] == ["ok", "invalid", "invalid", "ok", "invalid", "invalid", "invalid", "ok"]
    assert rows[1]["error"] == "could not read file x"
    assert "0.bias" in rows[2]["error"] and "missing" in rows[2]["error"]
    assert "2.weight" in rows[4]["error"] and "NaN" in rows[4]["error"]
    assert "0.weight" in rows[5]["error"]
    assert "mapping" in rows[6]["error"]
    for i in (1, 2, 4, 5, 6):
        assert rows[i]["mse"] is None and rows[i]["l1"] is None

    want = ref_loop(module, good, data, reg_metrics)
    alone = sweep.evaluate(module, good, data, reg_metrics, chunk_size=16).to_pylist()
    for i, w, a in zip((0, 3, 7), want, alone):
        check_rel(rows[i], w, 1e-5)
        assert abs(rows[i]["mse"] - a["mse"]) <= 1e-6 * a["mse"]  # invalid neighbours change nothing

    split = sweep.evaluate(module, cands, data, reg_metrics, chunk_size=3).to_pylist()  # chunks 3, 3, 2
    assert [r["status"] for r in split] == [r["status"] for r in rows]
    assert [r["error"] for r in split] == [r["error"] for r in rows]
    for i, w in zip((0, 3, 7), want):
        check_rel(split[i], w, 1e-5)


def test_buffers_given_by_some_candidates_only():
    module = make_bn_net()
    p0, p1 = random_params(module, 11, 0.5), random_params(module, 12, 0.5)
    with_mean = dict(p0)
    with_mean["bn.running_mean"] = torch.full((8,), 0.4)
    with_var = dict(p1)
    with_var["bn.running_var"] = torch.linspace(2.0, 0.2, 8)
    cands = [p0, with_mean, p1, with_var, p0]
    data = reg_data()
    want = ref_loop(module, cands, data, reg_metrics)

    for chunk in (5, 2):
        ev = Evaluator(module, data, reg_metrics, chunk_size=chunk)
        rows = ev.run(cands).to_pylist()
        ev.restore()
        assert ev.strategy == "vmap"
        for got, w in zip(rows, want):
            check_rel(got, w, 1e-5)
        assert abs(rows[0]["mse"] - rows[1]["mse"]) > 1e-4  # the given running_mean is used
        assert abs(rows[2]["mse"] - rows[3]["mse"]) > 1e-4  # … and the given running_var
        assert abs(rows[0]["mse"] - rows[4]["mse"]) <= 1e-6 * rows[0]["mse"]  # and does not leak
    assert module.training


def test_gpt_explicit_dicts_tied_weights_vmap():
    torch.manual_seed(2)
    module = models.gpt(vocab=32, dim=16, layers=1, heads=2, context=8)
    g = torch.Generator().manual_seed(5)
    data = []
    for n in (3, 1, 2):
        seq = torch.randint(0, 32, (n, 9), generator=g)
        data.append((seq[:, :-1], seq[:, 1:]))
    base = params_of(module)
    a = {n: t + 0.05 * torch.randn(t.shape, generator=g) for n, t in base.items()}
    b = {n: t - 0.05 * torch.randn(t.shape, generator=g) for n, t in base.items()}
    via_head = {("head.weight" if n == "tok.weight" else n): t for n, t in b.items()}
    both = dict(a)
    both["head.weight"] = a["tok.weight"].clone()
    cands = [a, via_head, both]
    ev = Evaluator(module, data, models.language_model, chunk_size=3)
    rows = ev.run(cands).to_pylist()
    assert ev.strategy == "vmap"
    want = ref_loop(module, [a, b, a], data, models.language_model)
    for got, w in zip(rows, want):
        check_rel(got, w, 1e-5)
    assert abs(rows[0]["loss"] - rows[1]["loss"]) > 1e-5


def test_explicit_dicts_bf16_close_to_fp32_reference():
    module = make_bn_net()
    cands = [random_params(module, s, 0.5) for s in (21, 22, 23)]
    data = reg_data()
    want = ref_loop(module, cands, data, reg_metrics)
    rows = sweep.evaluate(module, cands, data, reg_metrics, precision="bf16", chunk_size=2).to_pylist()
    for got, w in zip(rows, want):
        check_rel(got, w, 1e-2)
    with pytest.raises(ValueError):
        sweep.evaluate(module, cands, data, reg_metrics, precision="fp16")


# --------------------------------------------------------------------------- chunk size


def test_chunk_size_forced_and_measured():
    module = models.mlp((6, 8, 3))
    cands = [random_params(module, s) for s in range(7)]
    data = reg_data()
    want = ref_loop(module, cands, data, reg_metrics)

    forced = Evaluator(module, data, reg_metrics, chunk_size=3)
    rows = forced.run(cands).to_pylist()
    assert forced.chunk_size == 3 and forced.strategy == "vmap"
    for got, w in zip(rows, want):
        check_rel(got, w, 1e-5)

    measured = Evaluator(module, data, reg_metrics)
    assert measured.chunk_size is None
    rows = measured.run(cands).to_pylist()
    assert isinstance(measured.chunk_size, int) and measured.chunk_size >= 1
    assert measured.strategy in ("vmap", "loop")
    assert isinstance(measured.strategy_reason, str) and measured.strategy_reason
    for got, w in zip(rows, want):
        check_rel(got, w, 1e-5)

    for bad in (0, -2, 2.5):
        with pytest.raises(ValueError):
            Evaluator(module, data, reg_metrics, chunk_size=bad)


def test_recipe_chunks_and_ids_via_run_rows():
    module = models.mlp((6, 8, 3))
    base = params_of(module)
    d = random_params(module, 31, 0.2)
    coeffs = np.linspace(-1.0, 2.0, 10)
    data = reg_data()
    recipe = sweep.Affine(base, [d], coeffs, names=["t"])
    ev = Evaluator(module, data, reg_metrics, chunk_size=4)  # 4, 4, 2
    key = ev.add_anchors(recipe.anchors())
    assert ev.add_anchors(recipe.anchors()) == key and ev.has_anchors(key)
    ids = list(range(100, 110))
    table = ev.run_rows(recipe.rows(), key, ids, timing=True)
    assert table.column("candidate_id").to_pylist() == ids
    assert table.column("t").to_pylist() == coeffs.tolist()
    assert "eval_seconds" in table.column_names
    cands = [{n: base[n] + float(c) * d[n] for n in base} for c in coeffs]
    for got, w in zip(table.to_pylist(), ref_loop(module, cands, data, reg_metrics)):
        check_rel(got, w, 1e-5)
    part = ev.run_rows(recipe.rows().slice(3, 7), key, ids[3:7]).to_pylist()
    for a, b in zip(part, table.to_pylist()[3:7]):
        assert a["candidate_id"] == b["candidate_id"] and a["t"] == b["t"]
        assert abs(a["mse"] - b["mse"]) <= 1e-6 * b["mse"]


# --------------------------------------------------------------------------- fallback to the loop


@pytest.mark.parametrize("cls", [IfNet, ItemNet])
@pytest.mark.parametrize("chunk", [3, None])
def test_module_that_does_not_vmap_falls_back_to_loop(cls, chunk):
    torch.manual_seed(7)
    module = cls()
    cands = [random_params(module, s) for s in range(5)]
    cands[1] = {n: -t for n, t in cands[0].items()}  # flips IfNet's branch
    data = reg_data()
    want = ref_loop(module, cands, data, reg_metrics)
    ev = Evaluator(module, data, reg_metrics, chunk_size=chunk)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        rows = ev.run(cands).to_pylist()
    ev.restore()
    assert len(vmap_warnings(record)) == 1, [str(w.message) for w in record]
    assert ev.strategy == "loop" and ev.strategy_reason
    for got, w in zip(rows, want):
        check_rel(got, w, 1e-6)
    assert len({round(r["mse"], 8) for r in rows}) == 5


def test_recipe_on_module_that_does_not_vmap():
    torch.manual_seed(8)
    module = IfNet()
    base = params_of(module)
    d = random_params(module, 41)
    coeffs = [0.0, 1.0, -1.0, 0.5, -2.0]
    data = reg_data()
    want = ref_loop(module, [{n: base[n] + c * d[n] for n in base} for c in coeffs], data, reg_metrics)
    with pytest.warns(RuntimeWarning, match="does not evaluate under torch.vmap"):
        table = sweep.evaluate(module, sweep.Affine(base, [d], coeffs), data, reg_metrics, chunk_size=2)
    for got, w in zip(table.to_pylist(), want):
        check_rel(got, w, 1e-6)


def test_forward_raising_for_some_candidates_fails_only_those():
    torch.manual_seed(9)
    module = RaiseNet()
    small = [random_params(module, s, 0.3) for s in (1, 2, 3)]
    big = {n: t * 100.0 for n, t in small[1].items()}
    cands = [small[0], big, small[1], big, small[2]]
    data = reg_data()
    with pytest.warns(RuntimeWarning, match="does not evaluate under torch.vmap"):
        table = sweep.evaluate(module, cands, data, reg_metrics, chunk_size=3)
    rows = table.to_pylist()
    assert [r["status"] for r in rows] == ["ok", "failed", "ok", "failed", "ok"]
    for i in (1, 3):
        assert "ValueError" in rows[i]["error"] and "weights too large" in rows[i]["error"]
        assert rows[i]["mse"] is None
    for i, w in zip((0, 2, 4), ref_loop(module, small, data, reg_metrics)):
        check_rel(rows[i], w, 1e-6)

    # the same through a recipe: large coefficients fail, small ones are evaluated
    base = small[0]
    d = {n: torch.ones_like(t) for n, t in base.items()}
    coeffs = [0.0, 10.0, 0.5, -10.0]
    with pytest.warns(RuntimeWarning, match="does not evaluate under torch.vmap"):
        rows = sweep.evaluate(module, sweep.Affine(base, [d], coeffs), data, reg_metrics, chunk_size=4).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "failed", "ok", "failed"]
    want = ref_loop(module, [{n: base[n] + c * d[n] for n in base} for c in (0.0, 0.5)], data, reg_metrics)
    check_rel(rows[0], want[0], 1e-6)
    check_rel(rows[2], want[1], 1e-6)


# --------------------------------------------------------------------------- torch.compile


def test_compile_tiny_mlp_agrees_with_fp32():
    torch.manual_seed(0)
    module = models.mlp((8, 4, 1))
    base = params_of(module)
    d = random_params(module, 51, 0.3)
    coeffs = np.array([0.0, 1.0, -0.5, 2.0, 0.25])
    data = reg_data(features=8, outputs=1, sizes=(6, 3))
    eager = sweep.evaluate(module, sweep.Affine(base, [d], coeffs), data, models.mse, chunk_size=5)
    ev = Evaluator(module, data, models.mse, compile=True, chunk_size=5)
    compiled = ev.run(sweep.Affine(base, [d], coeffs))
    ev.restore()
    assert ev.compile_seconds > 0.0 and ev.strategy == "vmap"
    want = ref_loop(module, [{n: base[n] + float(c) * d[n] for n in base} for c in coeffs], data, models.mse)
    for e, c, w in zip(eager.to_pylist(), compiled.to_pylist(), want):
        check_rel(c, {"mse": e["mse"]}, 1e-5)
        check_rel(c, w, 1e-5)


def test_non_finite_rows_with_loop_fallback_keep_row_mapping():
    """Rows dropped by the finite check must not shift the loop's results onto other rows."""
    torch.manual_seed(10)
    module = IfNet()
    base = params_of(module)
    d = {n: torch.zeros_like(t) for n, t in base.items()}
    d["fc1.bias"][2] = 3e38  # |c| ≥ 2 overflows float32
    d["fc2.weight"] = torch.randn(3, 8, generator=torch.Generator().manual_seed(1)) * 1e-37
    coeffs = [5.0, 1e-37, -4.0, 0.0, 1e-38, 2.0]
    data = reg_data()
    with pytest.warns(RuntimeWarning, match="does not evaluate under torch.vmap"):
        rows = sweep.evaluate(module, sweep.Affine(base, [d], coeffs), data, reg_metrics, chunk_size=6).to_pylist()
    assert [r["status"] for r in rows] == ["invalid", "ok", "invalid", "ok", "ok", "invalid"]
    for i in (0, 2, 5):
        assert "fc1.bias" in rows[i]["error"] and rows[i]["mse"] is None
    ok = [1, 3, 4]
    want = ref_loop(module, [{n: base[n] + coeffs[i] * d[n] for n in base} for i in ok], data, reg_metrics)
    for i, w in zip(ok, want):
        check_rel(rows[i], w, 1e-6)
    assert len({round(rows[i]["mse"], 6) for i in ok}) == 3  # distinct: a shifted row would show
