"""`sweep.Stacked`: a population as `[K, *shape]` tensors (what `torch.func.stack_module_state` returns)
or a `[K, P]` flat matrix (what EvoTorch and evosax hold). Each row's result is what the same candidate as
a dict gets on today's path (`reference_rows`: the full `Schema.check` and a plain `functional_call`
loop), in fp32 to 1e-5 relative; checked once per key, with no per-candidate check for a good row."""

from __future__ import annotations

import pickle
from typing import Any, Dict, List

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.func import stack_module_state

import sweep
from sweep import check_candidate
from sweep.evaluator import Evaluator
from sweep.examples import models
from sweep.validate import Schema
from test_fast_dicts import (TIED_MESSAGE, Tied, assert_rows, make_net, net_data, reference_rows, reg_metrics,
                             tied_data, tied_metrics)


def flat_of(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def rows_of(stacked: Dict[str, torch.Tensor], k: int) -> List[Dict[str, torch.Tensor]]:
    """The candidate dicts a stacked population stands for, one per row."""
    return [{n: t[i] for n, t in stacked.items()} for i in range(k)]


def unflatten(module: torch.nn.Module, matrix: torch.Tensor) -> List[Dict[str, torch.Tensor]]:
    out = []
    for row in matrix:
        cand, offset = {}, 0
        for name, p in module.named_parameters():
            cand[name] = row[offset:offset + p.numel()].reshape(p.shape)
            offset += p.numel()
        out.append(cand)
    return out


def population(module_fn, k: int, seed: int = 0):
    torch.manual_seed(seed)
    members = [module_fn() for _ in range(k)]
    return members, stack_module_state(members)


def evaluate(module, cands, data=None, metrics=reg_metrics, **kw) -> List[Dict[str, Any]]:
    return sweep.evaluate(module, cands, data or net_data(), metrics, **kw).to_pylist()


def mlp():
    return models.mlp((3, 5, 2))


# --------------------------------------------------------------------------- the two forms, against the loop


@pytest.mark.parametrize("form", ["params, buffers", "the pair", "params only"])
def test_stack_module_state_equals_the_loop(form):
    members, (params, buffers) = population(mlp, 7)
    stacked = {"params, buffers": lambda: sweep.Stacked(params, buffers), "the pair": lambda: sweep.Stacked(
        (params, buffers)), "params only": lambda: sweep.Stacked(params)}[form]()
    assert len(stacked) == 7
    want = reference_rows(members[0], [dict(m.named_parameters()) for m in members], net_data(), reg_metrics)
    assert_rows(evaluate(members[0], stacked, chunk_size=3), want)  # chunks 3, 3, 1


def test_flat_matrix_in_named_parameters_order_equals_the_loop():
    members, _ = population(mlp, 8)
    matrix = torch.stack([flat_of(m) for m in members])
    want = reference_rows(members[0], [dict(m.named_parameters()) for m in members], net_data(), reg_metrics)
    for chunk in (3, 8, 100):
        assert_rows(evaluate(members[0], sweep.Stacked(matrix), chunk_size=chunk), want)
    assert_rows(evaluate(members[0], sweep.Stacked(matrix)), want)  # the chunk size measured


def test_non_finite_rows_alone_invalid_with_the_row_dicts_error():
    module = make_net()
    matrix = torch.randn(9, sum(p.numel() for p in module.parameters())) * 0.5
    matrix[2, 5] = float("nan")
    matrix[5, -1] = float("inf")
    matrix[5, 0] = float("nan")
    matrix[7, 3] = 3e38  # finite
    matrix[7, 4] = 3e38
    cands = unflatten(module, matrix)
    rows = evaluate(module, sweep.Stacked(matrix), chunk_size=4)
    assert [r["status"] for r in rows] == ["ok", "ok", "invalid", "ok", "ok", "invalid", "ok", "ok", "ok"]
    assert rows[2]["error"] == "key 'fc.weight': expected finite values, got 1 NaN and 0 inf"
    assert rows[5]["error"] == ("key 'fc.weight': expected finite values, got 1 NaN and 0 inf; "
                                "key 'head.bias': expected finite values, got 0 NaN and 1 inf")
    assert_rows(rows, reference_rows(module, cands, net_data(), reg_metrics))


def test_a_good_row_costs_no_per_candidate_check(monkeypatch):
    module = make_net()
    matrix = torch.randn(50, sum(p.numel() for p in module.parameters()))
    matrix[31, 2] = float("nan")
    calls = []
    full = Schema.check
    monkeypatch.setattr(Schema, "check", lambda self, c, device, **kw: calls.append(c) or full(self, c, device, **kw))
    rows = evaluate(module, sweep.Stacked(matrix), chunk_size=16)
    assert len(calls) == 1 and rows[31]["status"] == "invalid"  # only the bad row, for its message
    torch.testing.assert_close(calls[0]["fc.weight"], matrix[31, :12].reshape(4, 3), equal_nan=True)
    assert [r["status"] for r in rows].count("ok") == 49


# --------------------------------------------------------------------------- what does not fit


def test_flat_matrix_of_the_wrong_width_makes_every_row_invalid():
    module = make_net()
    p = sum(t.numel() for t in module.parameters())
    rows = evaluate(module, sweep.Stacked(torch.zeros(3, p + 2)))
    assert [r["status"] for r in rows] == ["invalid"] * 3
    assert rows[0]["error"] == (
        f"the flat params matrix has P={p + 2} columns, expected P={p}: the module's parameter count, each "
        f"parameter flattened in named_parameters() order (fc.weight 12, fc.bias 4, bn.weight 4, bn.bias 4, "
        f"head.weight 8, head.bias 2)")
    assert rows[0]["mse"] is None


def test_wrong_k_across_keys_names_the_keys():
    with pytest.raises(ValueError, match=r"same number K of candidates .* got K=3 for 'a', 'c'; K=4 for 'b'"):
        sweep.Stacked({"a": torch.zeros(3, 2), "b": torch.zeros(4), "c": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"K=2 for the flat params matrix; K=5 for 'bn.running_mean'"):
        sweep.Stacked(torch.zeros(2, 30), {"bn.running_mean": torch.zeros(5, 4)})


@pytest.mark.parametrize("params, buffers, error, match", [
    ({"w": torch.tensor(1.0)}, None, ValueError, r"params key 'w' must be a \[K, \*shape\] tensor .* 0-d"),
    ({"w": [1.0, 2.0]}, None, TypeError, r"params key 'w' must be a \[K, \*shape\] tensor, got list"),
    (torch.zeros(4), None, ValueError, r"flat \[K, P\] matrix .* 1-d tensor of shape \(4,\)"),
    (torch.zeros(2, 3, 4), None, ValueError, r"flat \[K, P\] matrix .* 3-d tensor"),
    ([torch.zeros(2, 3)], None, TypeError, r"params must be a mapping .* got list"),
    ({}, None, ValueError, r"params holds no tensors"),
    ({"w": torch.zeros(2, 1)}, [torch.zeros(2)], TypeError, r"buffers must be a mapping .* got list"),
    ({"w": torch.zeros(2, 1)}, {"w": torch.zeros(2, 1)}, ValueError, r"key 'w' given in both params and buffers"),
    ({"w": torch.zeros(2, 1)}, {"b": torch.tensor(0)}, ValueError, r"buffers key 'b' .* 0-d"),
])
def test_what_is_not_a_stacked_population_is_refused_when_made(params, buffers, error, match):
    with pytest.raises(error, match=match):
        sweep.Stacked(params, buffers)


@pytest.mark.parametrize("change", ["dtype", "shape", "missing", "typo", "meta", "sparse"])
def test_a_key_that_does_not_fit_gives_every_row_its_dicts_error(change):
    members, (params, _) = population(make_net, 4)
    params = dict(params)
    if change == "dtype":
        params["fc.bias"] = params["fc.bias"].double()
    elif change == "shape":
        params["fc.weight"] = params["fc.weight"].transpose(1, 2)
    elif change == "missing":
        del params["head.bias"]
    elif change == "typo":
        params["head.wieght"] = params.pop("head.weight")
    elif change == "meta":
        params["fc.weight"] = torch.empty(4, 4, 3, device="meta")
    else:
        params["fc.weight"] = params["fc.weight"].detach().to_sparse()
    if change not in ("meta", "sparse"):
        params["bn.weight"] = params["bn.weight"].detach().clone()
        params["bn.weight"][1, 0] = float("nan")  # row 1 has a value problem too: its error lists both
    rows = evaluate(members[0], sweep.Stacked(params))
    dense = {n: t for n, t in params.items() if t.layout == torch.strided and t.device.type != "meta"}
    for i, row in enumerate(rows):
        cand = {n: (t[i] if n in dense else t if t.layout != torch.strided else t[0]) for n, t in params.items()}
        assert row["status"] == "invalid"
        assert row["error"] == check_candidate(members[0], cand), i
    if change not in ("meta", "sparse"):
        assert "finite" in rows[1]["error"] and "finite" not in rows[0]["error"]


# --------------------------------------------------------------------------- tied weights, buffers, precision


def test_gpt_population_with_a_tied_head_as_dict_and_as_flat_matrix():
    torch.manual_seed(7)
    make = lambda: models.gpt(vocab=32, dim=16, layers=1, heads=2, context=8)  # noqa: E731
    members, (params, buffers) = population(make, 5, seed=7)
    assert "head.weight" not in params  # named_parameters() lists the tied tensor once
    data = models.token_batches(32, 8, 3)
    want = reference_rows(members[0], [dict(m.named_parameters()) for m in members], data, models.language_model)
    assert_rows(evaluate(members[0], sweep.Stacked(params, buffers), data, models.language_model, chunk_size=2), want)
    matrix = torch.stack([flat_of(m) for m in members])
    assert matrix.shape[1] == sum(p.numel() for p in members[0].parameters())
    assert_rows(evaluate(members[0], sweep.Stacked(matrix), data, models.language_model, chunk_size=2), want)


def test_tied_pair_given_under_both_names_one_row_differs():
    torch.manual_seed(8)
    w = torch.randn(5, 6, 3)
    other = w.clone()
    other[3, 2, 1] += 0.5
    module = Tied()
    rows = evaluate(module, sweep.Stacked({"emb.weight": w, "out.weight": other}), tied_data(), tied_metrics,
                    chunk_size=2)
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "invalid", "ok"]
    assert rows[3]["error"] == TIED_MESSAGE
    cands = rows_of({"emb.weight": w, "out.weight": other}, 5)
    assert_rows(rows, reference_rows(module, cands, tied_data(), tied_metrics))


def test_cnn_buffers_per_candidate_or_the_modules_own():
    torch.manual_seed(9)
    members = [models.cnn(2) for _ in range(4)]
    for i, m in enumerate(members):
        m.bn1.running_mean.fill_(0.1 * i)
        m.bn2.running_var.fill_(1.0 + i)
    params, buffers = stack_module_state(members)
    data = models.image_batches(3, 8)
    own = members[0]
    with_buffers = [{**dict(m.named_parameters()), **dict(m.named_buffers())} for m in members]
    got = evaluate(own, sweep.Stacked(params, buffers), data, models.classification, chunk_size=3)
    assert_rows(got, reference_rows(own, with_buffers, data, models.classification))
    only_params = [dict(m.named_parameters()) for m in members]
    shared = evaluate(own, sweep.Stacked(params), data, models.classification, chunk_size=3)
    assert_rows(shared, reference_rows(own, only_params, data, models.classification))
    assert abs(got[3]["loss"] - shared[3]["loss"]) > 1e-6  # candidate 3's own buffers were used
    some = {"bn2.running_var": buffers["bn2.running_var"].clone()}
    some["bn2.running_var"][2, 0] = float("nan")
    rows = evaluate(own, sweep.Stacked(params, some), data, models.classification, chunk_size=3)
    cands = [{**p, "bn2.running_var": some["bn2.running_var"][i]} for i, p in enumerate(only_params)]
    assert [r["status"] for r in rows] == ["ok", "ok", "invalid", "ok"]
    assert_rows(rows, reference_rows(own, cands, data, models.classification))


def test_bf16_precision_matches_a_bf16_loop():
    members, (params, _) = population(make_net, 5)
    params = {n: t.detach().clone() for n, t in params.items()}
    params["head.weight"][4, 0, 0] = float("nan")
    rows = evaluate(members[0], sweep.Stacked(params), precision="bf16", chunk_size=3)
    assert rows[4]["error"] == "key 'head.weight': expected finite values, got 1 NaN and 0 inf"
    want = reference_rows(members[0], rows_of(params, 5), net_data(), reg_metrics, precision="bf16")
    assert_rows(rows, want, rtol=1e-2)


# --------------------------------------------------------------------------- the caller's tensors, pickling, ids


class RenormNet(torch.nn.Module):
    """An embedding with max_norm renormalises its weight in place during the forward."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4, max_norm=1.0)

    def forward(self, x):
        return self.emb(x).sum(-1)


@pytest.mark.parametrize("flat", [False, True])
def test_a_forward_that_writes_its_weights_leaves_the_callers_tensors_alone(flat):
    weight = torch.randn(3, 10, 4, generator=torch.Generator().manual_seed(9)) * 5.0
    saved = weight.clone()
    source = weight.reshape(3, 40) if flat else {"emb.weight": weight}
    data = [(torch.arange(10).reshape(2, 5), torch.zeros(2))]
    rows = evaluate(RenormNet(), sweep.Stacked(source), data, lambda o, y: {"s": o.sum()}, chunk_size=2)
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert torch.equal(weight, saved), "evaluate() wrote to the caller's stacked tensor"


def test_pickles_with_its_tensors():
    members, (params, buffers) = population(make_net, 3)
    for stacked in (sweep.Stacked(params, buffers), sweep.Stacked(torch.stack([flat_of(m) for m in members]))):
        again = pickle.loads(pickle.dumps(stacked))
        assert len(again) == 3 and repr(again) == repr(stacked)
        assert evaluate(members[0], again, chunk_size=2) == evaluate(members[0], stacked, chunk_size=2)


def test_empty_population_and_ids_and_timing():
    module = make_net()
    p = sum(t.numel() for t in module.parameters())
    empty = sweep.evaluate(module, sweep.Stacked(torch.zeros(0, p)), net_data(), reg_metrics)
    assert empty.num_rows == 0 and empty.column_names == ["candidate_id", "status", "error"]
    matrix = torch.randn(4, p)
    ev = Evaluator(module, net_data(), reg_metrics, chunk_size=3)
    table = ev.run(sweep.Stacked(matrix), ids=[10, 11, 12, 13], timing=True)
    assert table.column("candidate_id").to_pylist() == [10, 11, 12, 13]
    assert "eval_seconds" in table.column_names and all(s >= 0 for s in table.column("eval_seconds").to_pylist())


# --------------------------------------------------------------------------- random populations


@settings(deadline=None, derandomize=True, database=None, max_examples=30,
          suppress_health_check=[HealthCheck.too_slow])
@given(k=st.integers(1, 9), chunk=st.integers(1, 5), flat=st.booleans(),
       pokes=st.lists(st.tuples(st.integers(0, 8), st.integers(0, 33), st.sampled_from(["nan", "inf", "-inf"])),
                      max_size=6))
def test_random_populations_match_the_row_dicts(k, chunk, flat, pokes):
    module = make_net()
    p = sum(t.numel() for t in module.parameters())
    matrix = torch.randn(k, p, generator=torch.Generator().manual_seed(k)) * 0.5
    for row, col, value in pokes:
        matrix[row % k, col % p] = float(value)
    cands = unflatten(module, matrix)
    source = matrix if flat else {n: torch.stack([c[n] for c in cands]) for n in cands[0]}
    want = reference_rows(module, cands, net_data(), reg_metrics)
    assert_rows(evaluate(module, sweep.Stacked(source), chunk_size=chunk), want)


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_population_held_on_the_cpu_evaluated_on_the_device():
    module = make_net().cuda()
    p = sum(t.numel() for t in module.parameters())
    matrix = torch.randn(6, p) * 0.5
    matrix[4, 1] = float("nan")
    data = [(x.cuda(), y.cuda()) for x, y in net_data()]
    want = reference_rows(make_net(), unflatten(make_net(), matrix), net_data(), reg_metrics)
    for source in (matrix, matrix.cuda()):
        rows = sweep.evaluate(module, sweep.Stacked(source), data, reg_metrics, chunk_size=4).to_pylist()
        assert_rows(rows, want, rtol=1e-4)
