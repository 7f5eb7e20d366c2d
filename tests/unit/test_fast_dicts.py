"""Explicit dicts at chunk speed: metadata checked per dict (a dict shaped like a valid one costs one
comparison), values (finite, tied weights) once per chunk on the stacked tensors, and every row exactly
what today's path gives — the full per-candidate `Schema.check` and a plain `functional_call` loop, which
`reference_rows` below runs on its own (1e-5 relative in fp32)."""

from __future__ import annotations

import math
import types
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.func import functional_call

import sweep
from sweep import check_candidate
from sweep.evaluator import Evaluator
from sweep.examples import models
from sweep.validate import MAX_SIGNATURES, FastCheck, Schema, bad_rows

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}

# --------------------------------------------------------------------------- the reference path


def reference_rows(module: torch.nn.Module, candidates: Sequence[Any], data: List[Tuple[Any, Any]],
                   metrics: Callable[..., Dict[str, Any]], precision: str = "fp32") -> List[Dict[str, Any]]:
    """Today's path, one candidate at a time: `Invalid` passes its reason through, the full
    `Schema.check` gives the error of a bad candidate, and a plain `functional_call` loop (eval mode,
    buffers not given are the module's own, weights and inputs in the precision's dtype) the metrics of
    a good one, averaged over batches by batch size."""
    schema = Schema(module)
    dtype = PRECISIONS[precision]
    cast = lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
    own = {n: b.detach().clone() for n, b in module.named_buffers()}
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    rows: List[Dict[str, Any]] = []
    try:
        for cand in candidates:
            if isinstance(cand, sweep.Invalid):
                rows.append({"status": "invalid", "error": cand.reason})
                continue
            tensors, error = schema.check(cand, torch.device("cpu"))
            if error is not None:
                rows.append({"status": "invalid", "error": error})
                continue
            tensors = {n: cast(t.detach().clone()) for n, t in tensors.items()}
            for n, b in own.items():
                tensors.setdefault(n, cast(b.clone()))
            sums: Dict[str, float] = {}
            total = 0
            with torch.no_grad():
                for x, y in data:
                    out = functional_call(module, tensors, (cast(x),))
                    out = out.float() if out.is_floating_point() else out
                    for name, value in metrics(out, y).items():
                        sums[name] = sums.get(name, 0.0) + float(value) * len(y)
                    total += len(y)
            rows.append({"status": "ok", "error": None, **{k: v / total for k, v in sums.items()}})
    finally:
        for m, training in modes:
            m.train(training)
    return rows


def assert_rows(got: List[Dict[str, Any]], want: List[Dict[str, Any]], rtol: float = 1e-5) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g["candidate_id"] == i
        assert (g["status"], g["error"]) == (w["status"], w["error"]), i
        for name, value in w.items():
            if name in ("status", "error"):
                continue
            if not math.isfinite(value):
                assert g[name] == value or (math.isnan(value) and math.isnan(g[name])), (i, name, g[name], value)
            else:
                assert abs(g[name] - value) <= rtol * max(abs(value), 1e-12), (i, name, g[name], value)
        if w["status"] != "ok":
            assert all(g[name] is None for name in g if name not in ("candidate_id", "status", "error")), g


# --------------------------------------------------------------------------- models, data, candidates


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 4)
        self.bn = torch.nn.BatchNorm1d(4)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.fc(x))))


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(6, 3)
        self.out = torch.nn.Linear(3, 6, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(self.emb(x))


def make_net() -> Net:
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.bn.running_mean.copy_(torch.linspace(-0.5, 0.5, 4))
        net.bn.running_var.copy_(torch.linspace(0.5, 2.0, 4))
    return net


def net_data() -> List[Tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 3, generator=g), torch.randn(n, 2, generator=g)) for n in (5, 2, 7)]


def reg_metrics(out, y):
    return {"mse": ((out - y) ** 2).mean(), "l1": (out - y).abs().mean()}


def tied_data() -> List[Tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [(torch.randint(0, 6, (4,), generator=g), torch.randint(0, 6, (4,), generator=g))]


def tied_metrics(out, y):
    return {"loss": torch.nn.functional.cross_entropy(out, y)}


def good(module: torch.nn.Module, seed: int, scale: float = 0.5) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g) * scale for n, p in module.named_parameters()}


def poke(cand: Dict[str, torch.Tensor], key: str, index: Tuple[int, ...], value: float) -> Dict[str, torch.Tensor]:
    out = dict(cand)
    out[key] = out[key].clone()
    out[key][index] = value
    return out


def evaluate(module, cands, data=None, metrics=reg_metrics, **kw) -> List[Dict[str, Any]]:
    return sweep.evaluate(module, cands, data or net_data(), metrics, **kw).to_pylist()


# Every bad-dict case of tests/unit/test_validate.py, each a function of a good candidate.
def _with(key, value):
    return lambda c: {**c, key: value}


def _without(key):
    return lambda c: {k: v for k, v in c.items() if k != key}


def _renamed(old, new):
    return lambda c: {(new if k == old else k): v for k, v in c.items()}


def _several(c):
    c = {k: v for k, v in c.items() if k != "fc.bias"}
    c["fc.weight"] = torch.zeros(2, 2)
    c["head.bias"] = torch.zeros(2, dtype=torch.float16)
    c["bn.weight"] = torch.full((4,), float("inf"))
    c["head.wieght"] = c.pop("head.weight")
    return c


BAD_CASES: Dict[str, Callable[[Dict[str, torch.Tensor]], Any]] = {
    "missing": _without("head.weight"),
    "empty": lambda c: {},
    "typo": _renamed("head.weight", "head.weigth"),
    "typo of a buffer": _with("bn.running_mea", torch.zeros(4)),
    "far key": _with("completely.different", torch.zeros(1)),
    "non-string key": _with(0, torch.zeros(1)),
    "shape": _with("fc.weight", torch.zeros(3, 4)),
    "dtype": _with("fc.bias", torch.zeros(4, dtype=torch.float64)),
    "integer dtype": _with("head.bias", torch.zeros(2, dtype=torch.int64)),
    "buffer shape and dtype": lambda c: {**c, "bn.running_var": torch.ones(5),
                                         "bn.num_batches_tracked": torch.tensor(1.0)},
    "meta": _with("fc.weight", torch.empty(4, 3, device="meta")),
    "nan": lambda c: poke(c, "fc.weight", (1, 2), float("nan")),
    "inf": lambda c: poke(c, "fc.weight", (0, 0), float("inf")),
    "-inf": lambda c: poke(c, "head.bias", (1,), float("-inf")),
    "nan buffer": _with("bn.running_mean", torch.tensor([0.0, float("nan"), 0.0, 0.0])),
    "ndarray": _with("fc.weight", np.zeros((4, 3), dtype=np.float32)),
    "list": _with("fc.weight", [[0.0] * 3] * 4),
    "float": _with("fc.weight", 1.5),
    "None": _with("fc.weight", None),
    "sparse": lambda c: {**c, "fc.weight": c["fc.weight"].to_sparse()},
    "parameter subclass": lambda c: {**c, "fc.weight": torch.nn.Parameter(c["fc.weight"].double())},
    "several": _several,
    "not a mapping (pairs)": lambda c: list(c.items()),
    "not a mapping (tensor)": lambda c: torch.zeros(3),
    "not a mapping (None)": lambda c: None,
    "not a mapping (str)": lambda c: "fc.weight",
}


# --------------------------------------------------------------------------- the same errors as today


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_every_bad_dict_gets_todays_error_among_good_ones(case):
    module = make_net()
    bad = BAD_CASES[case](good(module, 99))
    expected = check_candidate(module, bad)
    assert expected is not None
    # After good ones (their shape remembered), first in its chunk, and alone in a chunk.
    for cands, chunk in (([good(module, 1), good(module, 2), bad, good(module, 3)], 4),
                         ([bad, good(module, 1), good(module, 2)], 3),
                         ([good(module, 1), bad, good(module, 2)], 1)):
        rows = evaluate(module, cands, chunk_size=chunk)
        assert [r["error"] for r in rows if r["status"] == "invalid"] == [expected]
        assert_rows(rows, reference_rows(module, cands, net_data(), reg_metrics))


def test_nan_in_one_row_marks_only_that_row():
    module = make_net()
    cands = [good(module, s) for s in range(7)]
    cands[3] = poke(cands[3], "fc.weight", (2, 1), float("nan"))
    cands[5] = {**cands[5], "bn.running_var": torch.tensor([1.0, float("inf"), 1.0, 1.0])}
    rows = evaluate(module, cands, chunk_size=7)
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "invalid", "ok", "invalid", "ok"]
    assert rows[3]["error"] == "key 'fc.weight': expected finite values, got 1 NaN and 0 inf"
    assert rows[5]["error"] == "key 'bn.running_var': expected finite values, got 0 NaN and 1 inf"
    assert_rows(rows, reference_rows(module, cands, net_data(), reg_metrics))


def test_row_with_several_value_problems_lists_them_all_in_todays_order():
    module = make_net()
    cand = poke(poke(good(module, 4), "head.bias", (0,), float("inf")), "fc.weight", (0, 1), float("nan"))
    cand = poke(cand, "fc.weight", (3, 2), float("nan"))
    rows = evaluate(module, [good(module, 1), cand, good(module, 2)], chunk_size=3)
    assert rows[1]["error"] == ("key 'fc.weight': expected finite values, got 2 NaN and 0 inf; "
                                "key 'head.bias': expected finite values, got 0 NaN and 1 inf")
    assert rows[1]["error"] == check_candidate(module, cand)


def test_invalid_placeholders_keep_their_reason_between_fast_rows():
    module = make_net()
    cands = [good(module, 1), sweep.Invalid("could not read a.pt"), good(module, 2), sweep.Invalid("b")]
    rows = evaluate(module, cands, chunk_size=4)
    assert [r["error"] for r in rows] == [None, "could not read a.pt", None, "b"]
    assert_rows(rows, reference_rows(module, cands, net_data(), reg_metrics))


# --------------------------------------------------------------------------- tied weights


TIED_MESSAGE = ("tied weights 'emb.weight' and 'out.weight' are one tensor in the module but were given "
                "different values; give one of them, or equal values")


def test_tied_weights_every_way_of_giving_them_in_one_chunk():
    torch.manual_seed(3)
    module = Tied()
    w = [torch.randn(6, 3) for _ in range(6)]
    nan = w[5].clone()
    nan[0, 0] = float("nan")
    cands = [{"emb.weight": w[0]}, {"out.weight": w[1]}, {"emb.weight": w[2], "out.weight": w[2].clone()},
             {"emb.weight": w[3], "out.weight": w[3] + 1e-3}, {"out.weight": w[4], "emb.weight": w[4]},
             {"emb.weight": nan, "out.weight": w[5]}, {"emb.weight": w[5], "out.weight": nan}]
    rows = evaluate(module, cands, tied_data(), tied_metrics, chunk_size=len(cands))
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "invalid", "ok", "invalid", "invalid"]
    assert rows[3]["error"] == TIED_MESSAGE
    assert_rows(rows, reference_rows(module, cands, tied_data(), tied_metrics))


def test_tied_pair_given_by_every_row_one_row_differs():
    torch.manual_seed(4)
    module = Tied()
    w = [torch.randn(6, 3) for _ in range(5)]
    cands = [{"emb.weight": t, "out.weight": t.clone()} for t in w]
    cands[2] = {"emb.weight": w[2], "out.weight": w[2] * 2}
    rows = evaluate(module, cands, tied_data(), tied_metrics, chunk_size=5)
    assert [r["status"] for r in rows] == ["ok", "ok", "invalid", "ok", "ok"]
    assert rows[2]["error"] == TIED_MESSAGE
    assert_rows(rows, reference_rows(module, cands, tied_data(), tied_metrics))


def test_gpt_tied_head_dicts():
    torch.manual_seed(5)
    module = models.gpt(vocab=32, dim=16, layers=1, heads=2, context=8)
    data = models.token_batches(32, 8, 3)
    a, b, c = (good(module, s, 0.1) for s in (1, 2, 3))
    via_head = {("head.weight" if n == "tok.weight" else n): t for n, t in b.items()}
    both = {**c, "head.weight": c["tok.weight"].clone()}
    differ = {**a, "head.weight": b["tok.weight"]}
    cands = [a, via_head, both, differ]
    rows = evaluate(module, cands, data, models.language_model, chunk_size=4)
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "invalid"]
    assert "tied weights 'tok.weight' and 'head.weight'" in rows[3]["error"]
    assert_rows(rows, reference_rows(module, cands, data, models.language_model))


# --------------------------------------------------------------------------- buffers, precision, chunks


def test_cnn_buffers_given_by_some_rows_one_non_finite():
    torch.manual_seed(6)
    module = models.cnn(2)
    data = models.image_batches(3, 8)
    cands = [good(module, s, 0.3) for s in range(5)]
    cands[1] = {**cands[1], "bn1.running_mean": torch.full((2,), 0.3), "bn1.running_var": torch.full((2,), 2.0)}
    cands[3] = {**cands[3], "bn2.running_var": torch.tensor([1.0, float("nan"), 1.0, 1.0])}
    cands[4] = {**cands[4], "bn2.num_batches_tracked": torch.tensor(3)}
    for chunk in (5, 2):
        rows = evaluate(module, cands, data, models.classification, chunk_size=chunk)
        assert [r["status"] for r in rows] == ["ok", "ok", "ok", "invalid", "ok"]
        assert_rows(rows, reference_rows(module, cands, data, models.classification))
    assert abs(rows[0]["loss"] - rows[1]["loss"]) > 1e-6  # the given running stats are used


def test_bf16_dicts_match_a_bf16_loop():
    module = make_net()
    cands = [good(module, s) for s in range(5)]
    cands[2] = poke(cands[2], "head.weight", (1, 3), float("nan"))
    rows = evaluate(module, cands, precision="bf16", chunk_size=5)
    assert rows[2]["error"] == "key 'head.weight': expected finite values, got 1 NaN and 0 inf"
    assert_rows(rows, reference_rows(module, cands, net_data(), reg_metrics, precision="bf16"), rtol=1e-2)


def test_chunk_size_that_splits_the_candidates_unevenly():
    module = make_net()
    cands: List[Any] = [good(module, s) for s in range(11)]
    cands[1] = poke(cands[1], "fc.bias", (0,), float("nan"))
    cands[6] = sweep.Invalid("unreadable")
    cands[9] = BAD_CASES["shape"](cands[9])
    want = reference_rows(module, cands, net_data(), reg_metrics)
    for chunk in (4, 3, 11):
        assert_rows(evaluate(module, cands, chunk_size=chunk), want)


def test_huge_finite_values_whose_sum_overflows_are_valid():
    module = make_net()
    big = good(module, 7)
    big["fc.bias"] = torch.full((4,), 3e38)  # finite, but the row's sum is not
    cands = [good(module, 1), big, good(module, 2)]
    rows = evaluate(module, cands, chunk_size=3)
    assert [r["status"] for r in rows] == ["ok", "ok", "ok"]
    assert_rows(rows, reference_rows(module, cands, net_data(), reg_metrics))


def test_parameters_that_require_grad_and_mappings_that_are_not_dicts():
    module = make_net()
    cands = [dict(module.named_parameters()), types.MappingProxyType(good(module, 1)),
             {n: torch.nn.Parameter(t) for n, t in good(module, 2).items()}]
    saved = [{n: t.detach().clone() for n, t in c.items()} for c in cands]
    rows = evaluate(module, cands, chunk_size=3)
    assert_rows(rows, reference_rows(module, cands, net_data(), reg_metrics))
    for c, s in zip(cands, saved):
        assert all(torch.equal(c[n].detach(), s[n]) for n in s)


# --------------------------------------------------------------------------- the fast path itself


def test_a_population_of_one_shape_is_checked_in_full_once(monkeypatch):
    module = make_net()
    calls = []
    full = Schema.check

    def counting(self, candidate, device, **kw):
        calls.append(candidate)
        return full(self, candidate, device, **kw)

    monkeypatch.setattr(Schema, "check", counting)
    cands = [good(module, s) for s in range(40)]
    cands[17] = poke(cands[17], "head.weight", (0, 0), float("nan"))
    ev = Evaluator(module, net_data(), reg_metrics, chunk_size=16)
    rows = ev.run(cands).to_pylist()
    # The first dict in full (its shape is then known); only the row found bad on its values again.
    assert [c is cands[0] or c is cands[17] for c in calls] == [True, True]
    assert [r["status"] for r in rows].count("invalid") == 1 and rows[17]["status"] == "invalid"


def test_a_dict_that_differs_from_the_known_shape_is_checked_in_full():
    module = make_net()
    fast = FastCheck(Schema(module), torch.device("cpu"))
    plan, error = fast.metadata(good(module, 1))
    assert error is None and plan is not None and plan.error is None
    assert fast.metadata(good(module, 2)) == (plan, None)
    for case in ("dtype", "shape", "meta", "sparse", "typo", "missing", "ndarray", "parameter subclass"):
        bad = BAD_CASES[case](good(module, 3))
        assert fast.metadata(bad) == (None, check_candidate(module, bad)), case
    with_buffer = {**good(module, 4), "bn.running_mean": torch.zeros(4)}
    other, error = fast.metadata(with_buffer)
    assert error is None and other is not plan and ("bn.running_mean", "bn.running_mean") in other.chosen
    assert fast.metadata(good(module, 5)) == (plan, None)  # both shapes remembered


def test_known_shapes_are_bounded():
    module = torch.nn.Linear(2, 1)
    fast = FastCheck(Schema(module), torch.device("cpu"))
    for i in range(MAX_SIGNATURES + 10):  # each with its keys in another order or with a subclass
        cand = {"weight": torch.zeros(1, 2), "bias": torch.zeros(1)}
        cand = cand if i % 2 else dict(reversed(list(cand.items())))
        cand["weight"] = torch.nn.Parameter(cand["weight"]) if i % 3 else cand["weight"]
        assert fast.metadata(cand)[1] is None
    assert len(fast._plans) <= MAX_SIGNATURES


def test_bad_rows_marks_exactly_the_rows_that_fail():
    t = torch.randn(6, 3, 2)
    t[1, 2, 0] = float("nan")
    t[4, 0, 1] = float("-inf")
    big = torch.zeros(6, 2)
    big[3] = 3e38  # finite; the row's sum overflows
    scalar = torch.tensor([0.0, float("inf"), 1.0, 0.0])  # rows 0, 2, 3, 5 of the chunk
    rows = torch.tensor([0, 2, 3, 5])
    a = torch.randn(6, 4)
    b = a.clone()
    b[5, 1] += 1.0
    ints = torch.zeros(6, 3, dtype=torch.int64)
    assert bad_rows(6, [(t, None), (big, None), (scalar, rows), (ints, None)], [(a, b, None)]) == [1, 2, 4, 5]
    assert bad_rows(6, [(big, None)], []) == []
    assert bad_rows(6, [], []) == []
    empty = torch.zeros(6, 0)
    assert bad_rows(6, [(empty, None)], [(empty, empty, None)]) == []


# --------------------------------------------------------------------------- random mixes


def _kinds() -> Dict[str, Callable[[Dict[str, torch.Tensor]], Any]]:
    kinds = {name: BAD_CASES[name] for name in ("missing", "dtype", "nan", "inf", "nan buffer", "typo", "several")}
    kinds["good"] = lambda c: c
    kinds["good with buffers"] = lambda c: {**c, "bn.running_mean": torch.full((4,), 0.2),
                                            "bn.running_var": torch.full((4,), 1.5)}
    kinds["good with a buffer"] = lambda c: {**c, "bn.running_var": torch.full((4,), 0.7)}
    kinds["invalid"] = lambda c: sweep.Invalid("placeholder")
    kinds["nan in a second key"] = lambda c: poke(poke(c, "head.bias", (1,), float("nan")), "bn.weight", (2,), 1.0)
    kinds["keys reordered"] = lambda c: dict(reversed(list(c.items())))
    return kinds


KINDS = _kinds()


@settings(deadline=None, derandomize=True, database=None, max_examples=40,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(sorted(KINDS)), min_size=1, max_size=12), st.integers(1, 6))
def test_random_mixes_of_valid_and_invalid_dicts_match_the_reference(kinds, chunk):
    module = make_net()
    cands = [KINDS[kind](good(module, i)) for i, kind in enumerate(kinds)]
    want = reference_rows(module, cands, net_data(), reg_metrics)
    assert_rows(evaluate(module, cands, chunk_size=chunk), want)


# --------------------------------------------------------------------------- GPU


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
def test_dicts_on_the_cpu_and_on_the_device_in_one_chunk():
    module = make_net().cuda()
    data = [(x.cuda(), y.cuda()) for x, y in net_data()]
    cpu_cands = [good(module, s) for s in range(4)]
    cands = [cpu_cands[0], {n: t.cuda() for n, t in cpu_cands[1].items()},
             poke(cpu_cands[2], "fc.weight", (0, 0), float("nan")), {**cpu_cands[3], "bn.running_var": torch.ones(4)}]
    rows = sweep.evaluate(module, cands, data, reg_metrics, chunk_size=4).to_pylist()
    want = reference_rows(make_net(), cpu_cands[:2] + cands[2:], net_data(), reg_metrics)
    assert_rows(rows, want, rtol=1e-4)
