"""sweep.evaluate: numbers against an independent functional_call loop, row shape and order,
failure isolation, and the module / caller tensors left untouched."""

from __future__ import annotations

import inspect
import math
import pickle
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import List

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from torch._C._functorch import is_batchedtensor

import sweep
from sweep import evaluate
from sweep.evaluator import Evaluator
from sweep.examples import digits
from sweep.model import read_weights_file

# --------------------------------------------------------------------------- helpers


def make_mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(8, 3)
    )


def random_candidates(module: torch.nn.Module, n: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [
        {name: torch.randn(p.shape, generator=gen, dtype=p.dtype) for name, p in module.named_parameters()}
        for _ in range(n)
    ]


def regression_batches(sizes=(7, 3, 11, 1), seed: int = 2):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 5, generator=gen), torch.randn(n, 3, generator=gen)) for n in sizes]


def regression_metrics(out, y):
    return {"mse": F.mse_loss(out, y), "mae": (out - y).abs().mean()}


def classification_batches(sizes=(6, 2, 9), n_in: int = 5, n_cls: int = 3, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, n_in, generator=gen), torch.randint(0, n_cls, (n,), generator=gen)) for n in sizes
    ]


def classification_metrics(out, y):
    return {"loss": F.cross_entropy(out, y), "accuracy": (out.argmax(1) == y).float().mean()}


class BNNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(5, 6)
        self.bn = torch.nn.BatchNorm1d(6)
        self.fc2 = torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def make_bn_net() -> BNNet:
    torch.manual_seed(4)
    net = BNNet()
    with torch.no_grad():  # non-trivial running statistics, so eval mode visibly matters
        net.bn.running_mean.copy_(torch.linspace(-1.0, 1.0, 6))
        net.bn.running_var.copy_(torch.linspace(0.5, 3.0, 6))
        net.bn.num_batches_tracked.fill_(17)
    return net


class TiedNet(torch.nn.Module):
    """An embedding whose weight is shared with the output projection."""

    def __init__(self, vocab: int = 7, dim: int = 4):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.out = torch.nn.Linear(dim, vocab)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(self.emb(x).mean(dim=1))


def token_batches(sizes=(5, 2, 8), vocab: int = 7, seed: int = 5):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, vocab, (n, 3), generator=gen), torch.randint(0, vocab, (n,), generator=gen))
        for n in sizes
    ]


def ok_metric_rows(table: pa.Table, names):
    return [{k: row[k] for k in names} for row in table.to_pylist()]


# --------------------------------------------------------------------------- numbers


def test_mlp_matches_reference_with_unequal_batches(reference, snap, close):
    module = make_mlp()
    module.train()  # dropout on: evaluate must switch to eval mode to match the reference
    before = snap(module)
    cands = random_candidates(module, 4)
    data = regression_batches()
    table = evaluate(module, cands, data, regression_metrics)
    want = reference(module, cands, data, regression_metrics)

    assert table.num_rows == 4
    assert table.column_names[:3] == ["candidate_id", "status", "error"]
    assert set(table.column_names) == {"candidate_id", "status", "error", "mse", "mae"}
    assert table.schema.field("candidate_id").type == pa.int64()
    assert table.schema.field("mse").type == pa.float64()
    assert table.schema.field("mae").type == pa.float64()
    assert table.column("candidate_id").to_pylist() == [0, 1, 2, 3]
    assert table.column("status").to_pylist() == ["ok"] * 4
    assert table.column("error").to_pylist() == [None] * 4
    for got, exp in zip(table.to_pylist(), want):
        close(got, exp)
    # different candidates really give different numbers (the candidate is used, not the module)
    assert len({round(r["mse"], 9) for r in table.to_pylist()}) == 4
    snap.check(module, before)
    assert module.training and module[2].training


def test_weighting_is_by_batch_size_not_per_batch():
    module = torch.nn.Linear(1, 1)
    # batch of 1 with y=10 and batch of 3 with y=0 → weighted mean 2.5 (per-batch mean would be 5)
    data = [(torch.zeros(1, 1), torch.full((1,), 10.0)), (torch.zeros(3, 1), torch.zeros(3))]
    table = evaluate(
        module,
        [{"weight": torch.ones(1, 1), "bias": torch.zeros(1)}],
        data,
        lambda out, y: {"ymean": y.mean(), "out": out.mean()},
    )
    row = table.to_pylist()[0]
    assert row["status"] == "ok"
    assert row["ymean"] == pytest.approx(2.5, abs=1e-12)
    assert row["out"] == pytest.approx(0.0, abs=1e-12)


def test_batchnorm_model_uses_eval_mode_and_buffers(reference, snap, close):
    module = make_bn_net()
    module.train()
    before = snap(module)
    params = random_candidates(module, 2, seed=11)
    with_buffers = dict(params[0])
    with_buffers["bn.running_mean"] = torch.full((6,), 0.3)
    with_buffers["bn.running_var"] = torch.full((6,), 2.0)
    with_buffers["bn.num_batches_tracked"] = torch.tensor(3)
    cands = [params[0], params[1], with_buffers]
    saved = [{k: v.clone() for k, v in c.items()} for c in cands]
    data = classification_batches(sizes=(6, 1, 9))  # a batch of 1 would break train-mode BN

    table = evaluate(module, cands, data, classification_metrics)
    want = reference(module, cands, data, classification_metrics)

    assert table.column("status").to_pylist() == ["ok", "ok", "ok"]
    for got, exp in zip(table.to_pylist(), want):
        close(got, exp)
    # candidate 0 and 2 have the same parameters: the given buffers must change the result
    rows = table.to_pylist()
    assert abs(rows[0]["loss"] - rows[2]["loss"]) > 1e-4
    snap.check(module, before)  # running stats, num_batches_tracked and train flags untouched
    for c, s in zip(cands, saved):
        for k in s:
            assert torch.equal(c[k], s[k]), k


def test_tied_weights_model(reference, close):
    module = TiedNet()
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(7, 4, generator=gen)
    b = torch.randn(7, generator=gen)
    data = token_batches()
    metric = classification_metrics
    cands = [
        {"emb.weight": w, "out.bias": b},  # one name
        {"out.weight": w, "out.bias": b},  # the other name
        {"emb.weight": w, "out.weight": w.clone(), "out.bias": b},  # both, equal values
        {"emb.weight": w, "out.weight": w + 1.0, "out.bias": b},  # both, different values
        {"emb.weight": w * 2.0, "out.bias": b},
    ]
    table = evaluate(module, cands, data, metric)
    rows = table.to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "invalid", "ok"]
    assert "emb.weight" in rows[3]["error"] and "out.weight" in rows[3]["error"]
    assert rows[3]["loss"] is None
    want = reference(module, [cands[0], {"emb.weight": w * 2.0, "out.bias": b}], data, metric)
    for i in (0, 1, 2):
        close(rows[i], want[0])
    close(rows[4], want[1])
    assert abs(rows[4]["loss"] - rows[0]["loss"]) > 1e-4


def test_digits_mlp_committed_checkpoints_match_reference(reference, close):
    folder = Path(digits.__file__).with_name("checkpoints")
    paths = sorted(folder.glob("seed*.safetensors"))
    assert len(paths) == 5
    cands = [read_weights_file(p) for p in paths]
    module = digits.make_model()
    data = digits.eval_batches(batch_size=150)  # 150, 150, 150, 50
    assert [len(y) for _, y in data] == [150, 150, 150, 50]
    table = evaluate(module, cands, data, digits.metrics)
    want = reference(module, cands, data, digits.metrics)
    rows = table.to_pylist()
    assert [r["status"] for r in rows] == ["ok"] * 5
    for got, exp in zip(rows, want):
        close(got, exp)
        assert got["accuracy"] > 0.8
        assert 0 < got["loss"] < 2


def test_data_and_candidates_may_be_one_shot_generators(reference, close):
    module = make_mlp()
    cands = random_candidates(module, 3)
    data = regression_batches()
    table = evaluate(module, (c for c in cands), (b for b in data), regression_metrics)
    want = reference(module, cands, data, regression_metrics)
    rows = table.to_pylist()
    assert [r["status"] for r in rows] == ["ok"] * 3
    for got, exp in zip(rows, want):  # every candidate saw every batch
        close(got, exp)


def test_explicit_cpu_device_gives_same_numbers(close):
    module = make_mlp()
    cands = random_candidates(module, 2)
    data = regression_batches()
    a = evaluate(module, cands, data, regression_metrics)
    b = evaluate(module, cands, data, regression_metrics, device="cpu")
    for ra, rb in zip(a.to_pylist(), b.to_pylist()):
        close(rb, {"mse": ra["mse"], "mae": ra["mae"]}, tol=1e-12)


def test_non_finite_metric_values_are_kept():
    module = torch.nn.Linear(2, 1)

    def metrics(out, y):
        zero = out.sum() * 0.0
        return {"neg_inf": torch.log(zero), "nan": zero / zero, "pos_inf": 1.0 / zero.abs(), "fine": zero + 1}

    table = evaluate(
        module, [{"weight": torch.ones(1, 2), "bias": torch.zeros(1)}], [(torch.ones(3, 2), torch.ones(3))], metrics
    )
    row = table.to_pylist()[0]
    assert row["status"] == "ok" and row["error"] is None
    assert row["neg_inf"] == -math.inf
    assert math.isnan(row["nan"])
    assert row["pos_inf"] == math.inf
    assert row["fine"] == 1.0


# --------------------------------------------------------------------------- rows, statuses, isolation


def test_mixed_statuses_keep_input_order_and_null_metrics(reference, close):
    module = make_mlp()
    good = random_candidates(module, 2)
    huge = {k: v * 1e6 for k, v in good[0].items()}

    def metrics(out, y):
        if out.abs().max() > 1e4:
            raise ValueError("output exploded")
        return regression_metrics(out, y)

    cands = [
        good[0],
        sweep.Invalid("file vanished"),
        [1, 2, 3],  # not a mapping
        huge,  # metrics raise → failed
        {},  # empty dict → invalid
        good[1],
    ]
    data = regression_batches()
    table = evaluate(module, iter(cands), data, metrics)
    rows = table.to_pylist()
    assert [r["candidate_id"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert [r["status"] for r in rows] == ["ok", "invalid", "invalid", "failed", "invalid", "ok"]
    assert rows[1]["error"] == "file vanished"
    assert "mapping" in rows[2]["error"]
    assert "output exploded" in rows[3]["error"]
    assert rows[0]["error"] is None and rows[5]["error"] is None
    for r in rows:
        if r["status"] != "ok":
            assert r["mse"] is None and r["mae"] is None
            assert r["error"]
    want = reference(module, good, data, regression_metrics)
    close(rows[0], want[0])
    close(rows[5], want[1])


class Picky(torch.nn.Module):
    """Forward raises for one candidate (a negative scale)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        if self.scale < 0:
            raise RuntimeError("negative scale is not allowed")
        return x * self.scale


def test_forward_raising_fails_only_that_row():
    data = [(torch.ones(2, 1), torch.ones(2)), (torch.ones(3, 1), torch.ones(3))]
    cands = [{"scale": torch.tensor(2.0)}, {"scale": torch.tensor(-1.0)}, {"scale": torch.tensor(3.0)}]
    table = evaluate(Picky(), cands, data, lambda o, y: {"m": o.mean()})
    rows = table.to_pylist()
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"]
    assert "negative scale is not allowed" in rows[1]["error"]
    assert rows[1]["m"] is None
    assert rows[0]["m"] == pytest.approx(2.0) and rows[2]["m"] == pytest.approx(3.0)


def test_failed_first_candidate_does_not_stop_later_ones():
    data = [(torch.ones(2, 1), torch.ones(2))]
    cands = [{"scale": torch.tensor(-1.0)}, {"scale": torch.tensor(4.0)}]
    rows = evaluate(Picky(), cands, data, lambda o, y: {"m": o.mean()}).to_pylist()
    assert [r["status"] for r in rows] == ["failed", "ok"]
    assert rows[1]["m"] == pytest.approx(4.0)


def test_metrics_returning_non_scalar_tensor_fails_row():
    data = [(torch.ones(2, 1), torch.ones(2))]
    cands = [{"scale": torch.tensor(1.0)}, {"scale": torch.tensor(2.0)}]

    def metrics(o, y):
        return {"m": o.mean() if o.mean() < 1.5 else o.reshape(-1)}

    rows = evaluate(Picky(), cands, data, metrics).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "failed"]
    assert "scalar" in rows[1]["error"] and "'m'" in rows[1]["error"]
    assert rows[1]["m"] is None


def test_metrics_returning_non_mapping_fails_row():
    data = [(torch.ones(2, 1), torch.ones(2))]
    rows = evaluate(
        Picky(), [{"scale": torch.tensor(1.0)}], data, lambda o, y: o.mean()
    ).to_pylist()
    assert rows[0]["status"] == "failed"
    assert "mapping" in rows[0]["error"]


def test_metrics_with_changed_names_fails_later_rows():
    data = [(torch.ones(2, 1), torch.ones(2)), (torch.ones(1, 1), torch.ones(1))]
    cands = [{"scale": torch.tensor(float(s))} for s in (1, 2, 3)]

    def metrics(o, y):
        m = {"a": o.mean()}
        if o.mean() > 1.5:
            m["b"] = o.mean()
        return m

    table = evaluate(Picky(), cands, data, metrics)
    rows = table.to_pylist()
    assert [r["status"] for r in rows] == ["ok", "failed", "failed"]
    assert "'b'" in rows[1]["error"] and "'a'" in rows[1]["error"]
    assert "b" not in table.column_names
    assert rows[0]["a"] == pytest.approx(1.0)


def test_invalid_candidate_row_error_names_key_and_types():
    module = make_mlp()
    cand = random_candidates(module, 1)[0]
    cand["0.weight"] = torch.zeros(3, 3, dtype=torch.float64)
    rows = evaluate(module, [cand], regression_batches(), regression_metrics).to_pylist()
    assert rows[0]["status"] == "invalid"
    err = rows[0]["error"]
    assert "0.weight" in err and "(8×5)" in err and "float32" in err and "(3×3)" in err and "float64" in err


def test_only_invalid_candidates_still_give_metric_columns(snap):
    module = make_mlp()
    before = snap(module)
    table = evaluate(module, [sweep.Invalid("a"), {}], regression_batches(), regression_metrics)
    assert table.column("status").to_pylist() == ["invalid", "invalid"]
    assert table.column("mse").to_pylist() == [None, None]
    assert table.schema.field("mse").type == pa.float64()
    snap.check(module, before)


def test_no_candidates_gives_empty_table():
    table = evaluate(make_mlp(), [], regression_batches(), regression_metrics)
    assert table.num_rows == 0
    assert table.schema.field("candidate_id").type == pa.int64()
    assert table.schema.field("status").type == pa.string()


def test_invalid_candidates_never_reach_the_module():
    seen = []

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.full((2,), 5.0))

        def forward(self, x):
            # .item() does not vmap: every forward runs one candidate, and is recorded.
            seen.append((tuple(self.w.shape), self.w.dtype, self.w.sum().item()))
            return x * self.w

    data = [(torch.ones(3, 2), torch.ones(3)), (torch.ones(1, 2), torch.ones(1))]
    cands = [
        {"w": torch.full((2,), 5.0)},
        {"w": torch.tensor([1.0, float("nan")])},
        {"w": torch.ones(3)},
        {"w": torch.ones(2, dtype=torch.float64)},
        {"w": torch.ones(2), "extra": torch.ones(1)},
    ]
    with pytest.warns(RuntimeWarning, match="does not evaluate under torch.vmap"):
        rows = evaluate(Counting(), cands, data, lambda o, y: {"s": o.sum()}).to_pylist()
    assert [r["status"] for r in rows] == ["ok"] + ["invalid"] * 4
    assert seen, "the valid candidate was evaluated"
    # Only the module's own weights (start-up measurement) and the valid candidate,
    # both 5.0 everywhere, ever reached the forward.
    assert all(s == ((2,), torch.float32, 10.0) for s in seen), seen


# --------------------------------------------------------------------------- nothing mutated


def test_caller_tensors_and_module_untouched(snap):
    module = make_bn_net()
    module.eval()
    before = snap(module)
    cands = random_candidates(module, 2, seed=8)
    cands[1]["bn.running_mean"] = torch.full((6,), 0.5)
    cands[1]["bn.running_var"] = torch.full((6,), 1.5)
    for c in cands:
        for v in c.values():
            if v.is_floating_point():
                v.requires_grad_(True)
    saved = [{k: v.detach().clone() for k, v in c.items()} for c in cands]
    table = evaluate(module, cands, classification_batches(), classification_metrics)
    assert table.column("status").to_pylist() == ["ok", "ok"]
    for c, s in zip(cands, saved):
        assert set(c) == set(s)
        for k in s:
            assert torch.equal(c[k].detach(), s[k]), k
            assert c[k].grad is None
    snap.check(module, before)
    assert not module.training


class RenormNet(torch.nn.Module):
    """nn.Embedding(max_norm=...) renormalises its weight rows in place during forward."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4, max_norm=1.0)

    def forward(self, x):
        return self.emb(x).sum(dim=1)


def test_forward_that_writes_its_weight_does_not_mutate_caller_tensor():
    module = RenormNet()
    weight = torch.randn(10, 4, generator=torch.Generator().manual_seed(9)) * 5.0
    saved = weight.clone()
    data = [(torch.arange(10).reshape(2, 5), torch.zeros(2))]
    rows = evaluate(module, [{"emb.weight": weight}], data, lambda o, y: {"s": o.sum()}).to_pylist()
    assert rows[0]["status"] == "ok"
    assert torch.equal(weight, saved), "evaluate() mutated the caller's candidate tensor"


def test_probe_for_metric_names_does_not_modify_module(snap):
    module = RenormNet()
    with torch.no_grad():
        module.emb.weight.mul_(5.0)  # rows with norm > max_norm
    before = snap(module)
    data = [(torch.arange(10).reshape(2, 5), torch.zeros(2))]
    table = evaluate(module, [sweep.Invalid("nothing valid")], data, lambda o, y: {"s": o.sum()})
    assert table.column("status").to_pylist() == ["invalid"]
    snap.check(module, before)


def test_training_flags_restored_when_evaluate_raises():
    module = make_mlp()
    module.train()
    with pytest.raises(ValueError):
        evaluate(module, [random_candidates(module, 1)[0]], [], regression_metrics)  # no batches
    assert module.training and all(m.training for m in module.modules())
    with pytest.raises(TypeError):
        evaluate(module, [random_candidates(module, 1)[0]], [torch.ones(3)], regression_metrics)  # not (x, y)
    assert module.training and all(m.training for m in module.modules())


def test_training_flags_restored_when_metrics_fail():
    module = make_bn_net()
    module.train()
    module.bn.eval()  # a mixed set of flags must come back exactly
    flags = [m.training for m in module.modules()]

    def metrics(o, y):
        raise KeyError("nope")

    rows = evaluate(module, random_candidates(module, 1), classification_batches(), metrics).to_pylist()
    assert rows[0]["status"] == "failed" and "nope" in rows[0]["error"]
    assert [m.training for m in module.modules()] == flags


def test_module_must_be_a_module():
    with pytest.raises(TypeError):
        evaluate(lambda x: x, [], regression_batches(), regression_metrics)


def test_module_on_meta_device_is_only_a_schema(reference, close):
    with torch.device("meta"):
        module = torch.nn.Linear(2, 1)
    data = [(torch.ones(3, 2), torch.ones(3)), (torch.full((1, 2), 2.0), torch.ones(1))]
    cands = [{"weight": torch.ones(1, 2), "bias": torch.zeros(1)}, sweep.Invalid("x")]
    rows = evaluate(module, cands, data, lambda o, y: {"m": o.mean()}).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "invalid"]
    assert rows[0]["m"] == pytest.approx((3 * 2.0 + 1 * 4.0) / 4)
    assert module.weight.device.type == "meta"


# --------------------------------------------------------------------------- metrics that return numbers


class RecordsVmap(torch.nn.Linear):
    """A Linear(5, 3) that records, for every forward, whether it ran under vmap (its weight batched)."""

    def __init__(self):
        super().__init__(5, 3)
        self.under_vmap: List[bool] = []

    def forward(self, x):
        self.under_vmap.append(is_batchedtensor(self.weight))
        return super().forward(x)


def sweep_warnings(record) -> List[str]:
    return [str(w.message) for w in record if str(w.message).startswith("sweep:")]


@pytest.mark.parametrize("chunk", [2, None])
def test_metrics_may_return_constant_numbers_under_vmap(reference, close, chunk):
    torch.manual_seed(0)
    module = RecordsVmap()
    cands = random_candidates(module, 5)
    data = regression_batches()

    def metrics(out, y):
        # Numbers that do not depend on the candidate: vmap repeats them for every candidate.
        return {"mse": F.mse_loss(out, y), "one": 1.0, "batch": len(y), "half": np.float32(0.5)}

    ev = Evaluator(module, data, metrics, chunk_size=chunk)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        rows = ev.run(cands).to_pylist()
    ev.restore()
    assert sweep_warnings(record) == []
    assert ev.metrics_reason == ""
    if chunk is not None:  # (a measured chunk size may pick the loop for a module this small)
        assert ev.strategy == "vmap"
        assert all(module.under_vmap)
    assert [r["status"] for r in rows] == ["ok"] * 5
    for got, exp in zip(rows, reference(module, cands, data, metrics)):
        close(got, exp)


def item_metrics(out, y):
    """Reads the loss out with .item(): a number computed from the output, which vmap cannot batch."""
    return {"mse": F.mse_loss(out, y).item(), "one": 1.0}


def test_metrics_returning_item_numbers_are_blamed_and_the_module_stays_under_vmap(reference, close):
    torch.manual_seed(0)
    module = RecordsVmap()
    cands = random_candidates(module, 5)
    data = regression_batches()
    ev = Evaluator(module, data, item_metrics, chunk_size=2)
    with pytest.warns(RuntimeWarning) as record:
        first = ev.run(cands[:3])
    messages = sweep_warnings(record)
    assert len(messages) == 1, messages
    message = messages[0]
    assert f"the metrics function {__name__}.item_metrics does not run under torch.vmap (RuntimeError: " in message
    assert "metric 'mse' came back as a Python number computed from the output" in message
    assert "'one'" not in message, "a constant is not what fails"
    assert "return tensors from it" in message and "The module still runs under vmap" in message
    assert "does not evaluate under torch.vmap" not in message, "the module is not blamed"
    assert ev.strategy == "vmap" and ev.metrics_reason.startswith("RuntimeError: ")

    module.under_vmap.clear()
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        second = ev.run(cands[3:])
    ev.restore()
    assert sweep_warnings(again) == [], "one warning per evaluator"
    assert module.under_vmap and all(module.under_vmap), "later chunks run the forward under vmap too"
    rows = first.to_pylist() + second.to_pylist()
    assert [r["status"] for r in rows] == ["ok"] * 5
    for got, exp in zip(rows, reference(module, cands, data, item_metrics)):
        close(got, exp)


def test_metrics_run_per_candidate_still_fail_only_their_row():
    torch.manual_seed(0)
    module = torch.nn.Linear(5, 3)
    cands = random_candidates(module, 4)
    cands[1] = {n: t * 100 for n, t in cands[1].items()}

    def picky(out, y):
        loss = F.mse_loss(out, y).item()
        if loss > 100:
            raise ValueError(f"loss {loss:.0f} is too large")
        return {"mse": loss}

    with pytest.warns(RuntimeWarning, match="the metrics function .*picky does not run under torch.vmap"):
        rows = evaluate(module, cands, regression_batches(), picky, chunk_size=4).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "failed", "ok", "ok"]
    assert rows[1]["error"].startswith("ValueError: loss ") and rows[1]["error"].endswith("is too large")
    assert rows[1]["mse"] is None and all(math.isfinite(r["mse"]) for r in rows if r["status"] == "ok")


# --------------------------------------------------------------------------- candidates that raise midway


@pytest.mark.parametrize("before", [0, 5])
def test_candidates_that_raise_midway_keep_the_rows_evaluated(reference, close, before):
    module = make_mlp()
    cands = random_candidates(module, before)
    data = regression_batches()

    def candidates():
        yield from cands
        raise OSError("the checkpoint folder went away")

    with pytest.raises(sweep.CandidatesError) as caught:
        evaluate(module, candidates(), data, regression_metrics, chunk_size=2)  # chunks of 2, 2, then 1
    error = caught.value
    assert isinstance(error, sweep.SweepError)
    assert isinstance(error.__cause__, OSError) and str(error.__cause__) == "the checkpoint folder went away"
    assert f"raised OSError after yielding {before} candidate(s): the checkpoint folder went away" in str(error)
    assert f"the {before} row(s) evaluated before it are kept" in str(error) and ".table" in str(error)
    table = error.table
    assert table.num_rows == before
    assert table.column("candidate_id").to_pylist() == list(range(before))
    if before:
        assert table.column_names == ["candidate_id", "status", "error", "mse", "mae"]
        assert table.column("status").to_pylist() == ["ok"] * before
        for got, exp in zip(table.to_pylist(), reference(module, cands, data, regression_metrics)):
            close(got, exp)
    assert pickle.loads(pickle.dumps(error)).table.equals(table)


# --------------------------------------------------------------------------- names


def test_the_evaluator_module_and_the_evaluate_function_have_their_own_names():
    import sweep.evaluator

    assert sweep.evaluator.Evaluator.__module__ == "sweep.evaluator"
    assert inspect.isfunction(sweep.evaluate) and sweep.evaluate is sweep.evaluator.evaluate
    table = sweep.evaluate(torch.nn.Linear(2, 1), [{"weight": torch.ones(1, 2), "bias": torch.zeros(1)}],
                           [(torch.ones(3, 2), torch.ones(3, 1))], lambda o, y: {"m": o.mean()}, chunk_size=1)
    assert table.column("m").to_pylist() == [2.0]


#: What a GPU box with only torch, pyarrow, numpy, pyyaml and rich lacks, among what sweep uses elsewhere.
NOT_ON_A_GPU_BOX = ("ray", "mlflow", "pydantic", "pydantic_core", "matplotlib", "safetensors", "sklearn", "scipy",
                    "duckdb", "workers")


def test_evaluate_and_bench_run_without_ray_mlflow_or_pydantic(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        for name in {NOT_ON_A_GPU_BOX!r}:
            sys.modules[name] = None  # `import name` raises ImportError, as where it is not installed
        import torch
        import sweep, sweep.bench, sweep.evaluator
        table = sweep.evaluate(torch.nn.Linear(2, 1), [{{"weight": torch.ones(1, 2), "bias": torch.zeros(1)}}],
                               [(torch.ones(3, 2), torch.ones(3, 1))], lambda o, y: {{"m": o.mean()}}, chunk_size=1)
        print(table.column("status").to_pylist(), table.column("m").to_pylist())
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['ok'] [2.0]"


def test_a_broken_metrics_function_is_named_with_its_file_and_line_when_the_module_s_own_weights_are_probed():
    from sweep.evaluator import CandidateError

    def metrics_taking_a_batch(out, batch):
        x, y = batch  # the eval loader's labels come as the second argument, not an (x, y) pair
        return {"loss": F.mse_loss(out, y)}

    line = inspect.getsourcelines(metrics_taking_a_batch)[1] + 1
    ev = Evaluator(make_mlp(), regression_batches(), metrics_taking_a_batch)
    with pytest.raises(CandidateError) as caught:
        ev.probe_metric_names()
    assert str(caught.value).startswith("ValueError: ")
    assert str(caught.value).endswith(f", at test_evaluate.py:{line} in metrics_taking_a_batch")
