"""Recipes (`sweep.Affine`, `sweep.Noise`) through `sweep.evaluate`, checked against an
independent per-candidate `functional_call` loop whose candidate dicts are built by hand here."""

from __future__ import annotations

import math
from typing import Dict, List

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

import sweep
from sweep.evaluator import Evaluator
from sweep.examples import models
from sweep.recipes import NoiseRows

# --------------------------------------------------------------------------- helpers


from conftest import noise_by_hand, reference_eval as ref_loop  # noqa: E402 - the one independent reference loop


def assert_rel(table: pa.Table, want: List[Dict[str, float]], tol: float, names=None) -> None:
    rows = table.to_pylist()
    assert len(rows) == len(want)
    for i, (got, exp) in enumerate(zip(rows, want)):
        assert got["status"] == "ok", (i, got["error"])
        for name in names or exp:
            g, w = got[name], exp[name]
            assert g is not None, (i, name)
            assert abs(g - w) <= tol * max(abs(w), 1e-12), (i, name, g, w, abs(g - w) / max(abs(w), 1e-12))


def assert_distinct(table: pa.Table, name: str) -> None:
    values = [r[name] for r in table.to_pylist() if r["status"] == "ok"]
    assert len({round(v, 7) for v in values}) == len(values), values


def params_of(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def random_like(params: Dict[str, torch.Tensor], seed: int, scale: float = 1.0) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(t.shape, generator=g) * scale for n, t in params.items()}


def affine_by_hand(base, directions, coeffs) -> List[Dict[str, torch.Tensor]]:
    coeffs = np.asarray(coeffs, dtype=np.float64)
    if coeffs.ndim == 1:
        coeffs = coeffs[:, None]
    out = []
    for row in coeffs:
        cand = {}
        for n, t in base.items():
            if not t.is_floating_point():
                cand[n] = t.clone()
                continue
            value = t.clone()
            for c, d in zip(row.tolist(), directions):
                if n in d:
                    value = value + c * d[n]
            cand[n] = value
        out.append(cand)
    return out


def mlp_data(sizes=(5, 2, 9), seed=10):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 6, generator=g), torch.randn(n, 3, generator=g)) for n in sizes]


def mlp_metrics(out, y):
    return {"mse": ((out - y) ** 2).mean(), "l1": (out - y).abs().mean()}


def make_mlp(seed=0):
    torch.manual_seed(seed)
    return models.mlp((6, 16, 3))


def state_without_counters(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The state dict without BatchNorm's 0-dim `num_batches_tracked` (see the scalar-tensor test)."""
    return {n: t.detach().clone() for n, t in module.state_dict().items() if not n.endswith("num_batches_tracked")}


def make_cnn(seed=1):
    torch.manual_seed(seed)
    module = models.cnn(channels=4, classes=5)
    with torch.no_grad():  # non-trivial running statistics: eval mode must visibly use them
        module.bn1.running_mean.copy_(torch.linspace(-0.5, 0.7, 4))
        module.bn1.running_var.copy_(torch.linspace(0.3, 2.5, 4))
        module.bn2.running_mean.copy_(torch.linspace(0.4, -0.3, 8))
        module.bn2.running_var.copy_(torch.linspace(1.5, 0.2, 8))
        module.bn1.num_batches_tracked.fill_(9)
    module.train()  # evaluate must switch to eval mode
    return module


def cnn_data(sizes=(4, 1, 6), seed=11):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)) for n in sizes]


def cnn_metrics(out, y):
    return {"loss": F.cross_entropy(out, y), "sq": (out ** 2).mean()}


def make_gpt(seed=2):
    torch.manual_seed(seed)
    return models.gpt(vocab=32, dim=16, layers=2, heads=2, context=8)


def gpt_data(sizes=(3, 1, 2), seed=12):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        seq = torch.randint(0, 32, (n, 9), generator=g)
        out.append((seq[:, :-1], seq[:, 1:]))
    return out


def gpt_metrics(out, y):
    return {"loss": F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)), "sq": (out ** 2).mean()}


# --------------------------------------------------------------------------- construction


def test_affine_coefficient_shapes_and_columns():
    base = {"weight": torch.zeros(1, 2), "bias": torch.zeros(1)}
    d = {"weight": torch.ones(1, 2), "bias": torch.ones(1)}
    one = sweep.Affine(base, [d], [0.0, 0.5, 1.0])  # 1-D allowed when D = 1
    assert one.rows().coeffs.shape == (3, 1)
    assert len(one) == 3
    assert list(one.rows().columns()) == ["coeff_0"]
    assert sweep.Affine(base, [d], torch.tensor([[1.0], [2.0]])).rows().coeffs.tolist() == [[1.0], [2.0]]
    two = sweep.Affine(base, [d, d], np.array([[1.0, 2.0]]), names=["x", "y"])
    cols = two.rows().columns()
    assert list(cols) == ["x", "y"] and cols["x"].type == pa.float64()
    assert cols["y"].to_pylist() == [2.0]
    with pytest.raises(ValueError):
        sweep.Affine(base, [d, d], [0.0, 1.0])  # 1-D with D = 2
    with pytest.raises(ValueError):
        sweep.Affine(base, [d], np.zeros((3, 2)))  # D mismatch
    with pytest.raises(ValueError):
        sweep.Affine(base, [], np.zeros((3, 0)))
    with pytest.raises(ValueError):
        sweep.Affine(base, [d, d], np.zeros((1, 2)), names=["a", "a"])
    with pytest.raises(ValueError):
        sweep.Affine(base, [d, d], np.zeros((1, 2)), names=["a"])


def test_noise_construction_checks_seeds_and_sigma():
    base = {"weight": torch.zeros(1, 2), "bias": torch.zeros(1)}
    noise = sweep.Noise(base, 0.1, torch.tensor([3, 1, 2]))
    assert noise.rows().seeds.tolist() == [3, 1, 2]
    assert noise.rows().columns()["seed"].type == pa.int64()
    assert sweep.Noise(base, 0.1, [2**63 - 1]).rows().seeds.tolist() == [2**63 - 1]
    for bad in ([-1], [0.5, 1.5], [[1, 2]]):
        with pytest.raises(ValueError):
            sweep.Noise(base, 0.1, bad)
    with pytest.raises(ValueError):
        sweep.Noise(base, float("nan"), [1])


# --------------------------------------------------------------------------- Affine numbers


def test_affine_mlp_plane_matches_reference_forced_and_auto():
    module = make_mlp()
    base = params_of(module)
    dirs = [random_like(base, 20, 0.3), random_like(base, 21, 0.3)]
    coeffs = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-0.5, 0.25], [2.0, -1.5], [0.3, 0.3], [1.5, 1.0]])
    data = mlp_data()
    want = ref_loop(module, affine_by_hand(base, dirs, coeffs), data, mlp_metrics)

    ev = Evaluator(module, data, mlp_metrics, chunk_size=3)  # chunks of 3, 3, 1
    table = ev.run(sweep.Affine(base, dirs, coeffs))
    ev.restore()
    assert ev.strategy == "vmap" and ev.chunk_size == 3
    assert table.column_names == ["candidate_id", "status", "error", "coeff_0", "coeff_1", "mse", "l1"]
    assert table.column("candidate_id").to_pylist() == list(range(7))
    assert table.column("coeff_0").to_pylist() == coeffs[:, 0].tolist()
    assert table.column("coeff_1").to_pylist() == coeffs[:, 1].tolist()
    assert table.schema.field("mse").type == pa.float64()
    assert table.column("error").to_pylist() == [None] * 7
    assert_rel(table, want, 1e-5)
    assert_distinct(table, "mse")

    ev = Evaluator(module, data, mlp_metrics)
    auto = ev.run(sweep.Affine(base, dirs, torch.tensor(coeffs)))
    ev.restore()
    assert isinstance(ev.chunk_size, int) and ev.chunk_size >= 1
    assert ev.strategy in ("vmap", "loop") and ev.strategy_reason
    assert_rel(auto, want, 1e-5)


def test_affine_cnn_batchnorm_eval_matches_reference():
    module = make_cnn()
    base = params_of(module)
    direction = random_like(base, 30, 0.2)
    coeffs = np.array([0.0, 1.0, -1.0, 0.5, 2.0, -0.25, 1.25])
    data = cnn_data()
    want = ref_loop(module, affine_by_hand(base, [direction], coeffs), data, cnn_metrics)

    ev = Evaluator(module, data, cnn_metrics, chunk_size=3)
    table = ev.run(sweep.Affine(base, [direction], coeffs, names=["alpha"]))
    ev.restore()
    assert ev.strategy == "vmap"
    assert table.column_names == ["candidate_id", "status", "error", "alpha", "loss", "sq"]
    assert table.column("alpha").to_pylist() == coeffs.tolist()
    assert_rel(table, want, 1e-5)
    assert_distinct(table, "loss")
    assert module.training  # mode restored

    auto = sweep.evaluate(module, sweep.Affine(base, [direction], coeffs, names=["alpha"]), data, cnn_metrics)
    assert_rel(auto, want, 1e-5)
    assert module.training

    # The running statistics matter (eval mode): a reference with default stats differs.
    fresh = models.cnn(channels=4, classes=5)
    other = ref_loop(fresh, affine_by_hand(base, [direction], coeffs[:1]), data, cnn_metrics)
    assert abs(other[0]["loss"] - want[0]["loss"]) > 1e-4


def test_affine_cnn_base_and_direction_buffers():
    """Floating buffers in base are used; buffers in a direction are varied."""
    module = make_cnn()
    base = state_without_counters(module)
    base["bn1.running_mean"] = torch.tensor([0.3, -0.2, 0.1, 0.6])
    base["bn2.running_var"] = torch.linspace(0.5, 1.5, 8)
    direction = random_like(params_of(module), 31, 0.1)
    direction["bn2.running_mean"] = torch.linspace(-1.0, 1.0, 8)
    coeffs = np.array([0.0, 1.0, -0.5, 0.75, 2.0])
    data = cnn_data()
    by_hand = affine_by_hand(base, [direction], coeffs)
    want = ref_loop(module, by_hand, data, cnn_metrics)
    table = sweep.evaluate(module, sweep.Affine(base, [direction], coeffs), data, cnn_metrics, chunk_size=2)
    assert_rel(table, want, 1e-5)
    # the base's buffers are really used: the module's own stats give other numbers
    plain = ref_loop(module, [{n: base[n] for n in params_of(module)}], data, cnn_metrics)
    assert abs(plain[0]["loss"] - want[0]["loss"]) > 1e-4
    # and the direction's buffer is varied: coefficient 2 differs from a run without it
    no_buf = {k: v for k, v in direction.items() if k != "bn2.running_mean"}
    other = ref_loop(module, affine_by_hand(base, [no_buf], coeffs[4:]), data, cnn_metrics)
    assert abs(other[0]["loss"] - want[4]["loss"]) > 1e-4


class PermNet(torch.nn.Module):
    """A linear layer whose outputs are permuted by an integer buffer."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(6, 3)
        self.register_buffer("perm", torch.tensor([0, 1, 2]))

    def forward(self, x):
        return self.fc(x)[:, self.perm]


def test_affine_non_floating_tensors_come_from_base():
    torch.manual_seed(3)
    module = PermNet()
    base = params_of(module)
    base["perm"] = torch.tensor([2, 0, 1])
    direction = random_like(params_of(module), 32, 0.3)
    direction["perm"] = torch.tensor([1, 1, 1])  # non-floating: not scaled, not added
    coeffs = np.array([0.0, 1.0, -1.5])
    data = mlp_data()
    by_hand = affine_by_hand(base, [direction], coeffs)
    assert all(torch.equal(c["perm"], torch.tensor([2, 0, 1])) for c in by_hand)
    want = ref_loop(module, by_hand, data, mlp_metrics)
    table = sweep.evaluate(module, sweep.Affine(base, [direction], coeffs), data, mlp_metrics, chunk_size=2)
    assert_rel(table, want, 1e-5)
    own = ref_loop(module, [{**by_hand[0], "perm": torch.tensor([0, 1, 2])}], data, mlp_metrics)
    assert abs(own[0]["mse"] - want[0]["mse"]) > 1e-4  # the base's permutation mattered
    noise = sweep.evaluate(module, sweep.Noise(base, 0.1, [4, 5]), data, mlp_metrics, chunk_size=2)
    assert_rel(noise, ref_loop(module, [noise_by_hand(module, base, 0.1, s) for s in (4, 5)], data, mlp_metrics), 1e-5)


def test_state_dict_base_with_zero_dim_tensors():
    """A base straight from `state_dict()` of a BatchNorm model holds the 0-dim int64
    `num_batches_tracked`; a recipe with such a base must evaluate like any other."""
    module = make_cnn()
    base = {n: t.detach().clone() for n, t in module.state_dict().items()}
    assert base["bn1.num_batches_tracked"].dim() == 0
    direction = random_like(params_of(module), 33, 0.1)
    coeffs = np.array([0.0, 1.0, -1.0])
    data = cnn_data()
    want = ref_loop(module, affine_by_hand(base, [direction], coeffs), data, cnn_metrics)
    assert_rel(sweep.evaluate(module, sweep.Affine(base, [direction], coeffs), data, cnn_metrics, chunk_size=2), want, 1e-5)
    want = ref_loop(module, [noise_by_hand(module, base, 0.1, s) for s in (1, 2)], data, cnn_metrics)
    assert_rel(sweep.evaluate(module, sweep.Noise(base, 0.1, [1, 2]), data, cnn_metrics, chunk_size=2), want, 1e-5)


def test_affine_gpt_tied_weights_matches_reference():
    module = make_gpt()
    base = params_of(module)
    assert "head.weight" not in base  # tied: named_parameters lists tok.weight once
    direction = random_like(base, 40, 0.05)
    coeffs = torch.tensor([0.0, 1.0, -1.0, 0.5, 3.0, -2.0, 0.25])  # 1-D tensor, D = 1
    data = gpt_data()
    want = ref_loop(module, affine_by_hand(base, [direction], coeffs.numpy()), data, gpt_metrics)

    ev = Evaluator(module, data, gpt_metrics, chunk_size=3)
    table = ev.run(sweep.Affine(base, [direction], coeffs))
    assert ev.strategy == "vmap"
    assert_rel(table, want, 1e-5)
    assert_distinct(table, "loss")

    # the whole state dict (both tied names, equal values) is accepted as base and direction
    sd_base = {n: t.detach().clone() for n, t in module.state_dict().items()}
    sd_dir = dict(direction)
    sd_dir["head.weight"] = direction["tok.weight"].clone()
    auto = sweep.evaluate(module, sweep.Affine(sd_base, [sd_dir], coeffs), data, gpt_metrics)
    assert_rel(auto, want, 1e-5)


@pytest.mark.parametrize("which", ["mlp", "cnn", "gpt"])
def test_affine_bf16_within_1e_2_of_fp32_reference(which):
    module, data, metrics = {
        "mlp": (make_mlp, mlp_data, mlp_metrics),
        "cnn": (make_cnn, cnn_data, cnn_metrics),
        "gpt": (make_gpt, gpt_data, gpt_metrics),
    }[which]
    module, data = module(), data()
    base = params_of(module)
    direction = random_like(base, 50, 0.05)
    coeffs = np.array([0.0, 1.0, -1.0, 0.5])
    want = ref_loop(module, affine_by_hand(base, [direction], coeffs), data, metrics)
    table = sweep.evaluate(module, sweep.Affine(base, [direction], coeffs), data, metrics,
                           precision="bf16", chunk_size=3)
    assert table.schema.field("loss" if which != "mlp" else "mse").type == pa.float64()
    assert_rel(table, want, 1e-2)


# --------------------------------------------------------------------------- Noise numbers


def test_noise_matches_hand_drawn_reference_mlp():
    module = make_mlp()
    base = random_like(params_of(module), 60, 0.5)  # an explicit base, not the module's weights
    seeds = [5, 0, 2**40 + 3, 17, 5, 99]
    sigma = 0.2
    data = mlp_data()
    want = ref_loop(module, [noise_by_hand(module, base, sigma, s) for s in seeds], data, mlp_metrics)
    ev = Evaluator(module, data, mlp_metrics, chunk_size=4)
    table = ev.run(sweep.Noise(base, sigma, seeds))
    assert ev.strategy == "vmap"
    assert table.column_names == ["candidate_id", "status", "error", "seed", "mse", "l1"]
    assert table.column("seed").to_pylist() == seeds
    assert table.schema.field("seed").type == pa.int64()
    assert_rel(table, want, 1e-5)
    rows = table.to_pylist()
    assert rows[0]["mse"] == rows[4]["mse"]  # same seed, same candidate
    assert abs(rows[0]["mse"] - rows[1]["mse"]) > 1e-6


def test_noise_gpt_and_cnn_buffers_from_base():
    gpt = make_gpt()
    base = params_of(gpt)
    seeds = [1, 2, 3, 4]
    data = gpt_data()
    want = ref_loop(gpt, [noise_by_hand(gpt, base, 0.05, s) for s in seeds], data, gpt_metrics)
    assert_rel(sweep.evaluate(gpt, sweep.Noise(base, 0.05, seeds), data, gpt_metrics, chunk_size=3), want, 1e-5)

    cnn = make_cnn()
    base = state_without_counters(cnn)
    base["bn2.running_mean"] = torch.linspace(1.0, -1.0, 8)  # differs from the module's
    data = cnn_data()
    want = ref_loop(cnn, [noise_by_hand(cnn, base, 0.1, s) for s in seeds], data, cnn_metrics)
    table = sweep.evaluate(cnn, sweep.Noise(base, 0.1, seeds), data, cnn_metrics, chunk_size=3)
    assert_rel(table, want, 1e-5)


def test_noise_same_seed_same_candidate_at_any_chunk_size():
    module = make_mlp()
    base = params_of(module)
    seeds = np.array([7, 8, 9, 10, 11, 7, 12], dtype=np.int64)
    data = mlp_data()
    ev = Evaluator(module, data, mlp_metrics, chunk_size=7)
    key = ev.add_anchors({"base": base})
    prepared = ev._anchors[key]
    rows = NoiseRows(seeds, 0.3)
    whole = rows.materialise(prepared, torch.device("cpu"))
    parts = torch.cat([rows.slice(a, b).materialise(prepared, torch.device("cpu")) for a, b in ((0, 2), (2, 3), (3, 7))])
    assert torch.equal(whole, parts)
    assert torch.equal(whole[0], whole[5]) and not torch.equal(whole[0], whole[1])

    tables = [sweep.evaluate(module, sweep.Noise(base, 0.3, seeds), data, mlp_metrics, chunk_size=c) for c in (1, 3, None)]
    again = sweep.evaluate(module, sweep.Noise(base, 0.3, seeds), data, mlp_metrics, chunk_size=3)
    assert again.to_pylist() == tables[1].to_pylist()  # identical on a second run
    for t in tables[1:]:
        for a, b in zip(tables[0].to_pylist(), t.to_pylist()):
            assert b["status"] == "ok"
            assert abs(a["mse"] - b["mse"]) <= 1e-6 * abs(a["mse"])


def test_noise_base_none_uses_module_parameters():
    module = make_mlp()
    seeds = [3, 4, 5]
    data = mlp_data()
    want = ref_loop(module, [noise_by_hand(module, params_of(module), 0.1, s) for s in seeds], data, mlp_metrics)
    table = sweep.evaluate(module, sweep.Noise(None, 0.1, seeds), data, mlp_metrics, chunk_size=2)
    assert_rel(table, want, 1e-5)


def test_noise_base_none_through_anchors_uses_module_parameters():
    module = make_mlp()
    seeds = np.array([3, 4, 5], dtype=np.int64)
    data = mlp_data()
    want = ref_loop(module, [noise_by_hand(module, params_of(module), 0.1, s) for s in seeds], data, mlp_metrics)
    ev = Evaluator(module, data, mlp_metrics, chunk_size=2)
    key = ev.add_anchors({"base": None})
    assert ev.has_anchors(key)
    table = ev.run_rows(NoiseRows(seeds, 0.1), key, ids=[10, 11, 12])
    ev.restore()
    assert table.column("candidate_id").to_pylist() == [10, 11, 12]
    assert_rel(table, want, 1e-5)


# --------------------------------------------------------------------------- validation


def _all_invalid(table: pa.Table, prefix: str, *needles: str, metrics=("mse", "l1")) -> None:
    rows = table.to_pylist()
    assert rows, "no rows"
    for r in rows:
        assert r["status"] == "invalid"
        assert r["error"].startswith(prefix), r["error"]
        for n in needles:
            assert n in r["error"], (n, r["error"])
        for m in metrics:
            assert m in r and r[m] is None  # metric columns exist, null when not ok


def test_recipe_base_problems_make_every_row_invalid():
    module = make_mlp()
    base = params_of(module)
    d = random_like(base, 70)
    data = mlp_data()
    coeffs = [0.0, 1.0, 2.0, 3.0]

    missing = {k: v for k, v in base.items() if k != "2.bias"}
    _all_invalid(sweep.evaluate(module, sweep.Affine(missing, [d], coeffs), data, mlp_metrics, chunk_size=2),
                 "recipe base:", "2.bias")
    misnamed = dict(missing)
    misnamed["2.biass"] = base["2.bias"]
    _all_invalid(sweep.evaluate(module, sweep.Affine(misnamed, [d], coeffs), data, mlp_metrics),
                 "recipe base:", "2.biass", "2.bias")
    shaped = dict(base)
    shaped["0.weight"] = torch.zeros(16, 5)
    _all_invalid(sweep.evaluate(module, sweep.Affine(shaped, [d], coeffs), data, mlp_metrics),
                 "recipe base:", "0.weight")
    _all_invalid(sweep.evaluate(module, sweep.Noise(shaped, 0.1, [1, 2, 3]), data, mlp_metrics),
                 "recipe base:", "0.weight")


def test_recipe_direction_problems_name_the_direction_and_key():
    module = make_mlp()
    base = params_of(module)
    good = random_like(base, 71)
    bad = dict(good)
    bad["0.bias"] = torch.zeros(15)
    data = mlp_data()
    table = sweep.evaluate(module, sweep.Affine(base, [good, bad], np.ones((3, 2))), data, mlp_metrics)
    _all_invalid(table, "recipe direction 1:", "0.bias")
    assert table.column_names == ["candidate_id", "status", "error", "coeff_0", "coeff_1", "mse", "l1"]
    wrong_dtype = dict(good)
    wrong_dtype["2.weight"] = good["2.weight"].double()
    _all_invalid(sweep.evaluate(module, sweep.Affine(base, [wrong_dtype], [1.0]), data, mlp_metrics),
                 "recipe direction 0:", "2.weight")

    gpt = make_gpt()
    gbase = params_of(gpt)
    gdir = random_like(gbase, 72)
    gdir["head.weight"] = gdir["tok.weight"] + 1.0  # tied names with different values
    _all_invalid(sweep.evaluate(gpt, sweep.Affine(gbase, [gdir], [0.0, 1.0]), gpt_data(), gpt_metrics),
                 "recipe direction 0:", "tok.weight", "head.weight", metrics=("loss", "sq"))


def test_finite_check_marks_only_overflowing_rows():
    module = make_mlp()
    base = params_of(module)
    direction = {n: torch.zeros_like(t) for n, t in base.items()}
    direction["0.weight"][2, 3] = 3e38  # fine at |c| ≤ 1, overflows float32 at c = ±2
    coeffs = [0.0, 2.0, 0.5, -2.0, 1.0, 1e-38]
    data = mlp_data()
    table = sweep.evaluate(module, sweep.Affine(base, [direction], coeffs), data, mlp_metrics, chunk_size=4)
    rows = table.to_pylist()
    assert [r["status"] for r in rows] == ["ok", "invalid", "ok", "invalid", "ok", "ok"]
    for i in (1, 3):
        assert "0.weight" in rows[i]["error"] and "inf" in rows[i]["error"]
        assert rows[i]["mse"] is None and rows[i]["l1"] is None
    ok = [0, 2, 4, 5]
    want = ref_loop(module, affine_by_hand(base, [direction], [coeffs[i] for i in ok]), data, mlp_metrics)
    for i, w in zip(ok, want):
        g = rows[i]
        assert g["error"] is None
        if math.isfinite(w["mse"]):
            assert abs(g["mse"] - w["mse"]) <= 1e-5 * abs(w["mse"]), (i, g["mse"], w["mse"])
        else:  # a finite but huge weight can give inf/NaN metrics: those are kept, not nulled
            assert g["mse"] is not None and not math.isfinite(g["mse"])
    assert abs(rows[0]["mse"] - want[0]["mse"]) <= 1e-5 * want[0]["mse"]


def test_direction_with_inf_makes_rows_invalid_including_coefficient_zero():
    module = make_mlp()
    base = params_of(module)
    direction = {n: torch.zeros_like(t) for n, t in base.items()}
    direction["2.bias"][1] = float("inf")
    table = sweep.evaluate(module, sweep.Affine(base, [direction], [0.0, 1.0, -1.0]), mlp_data(), mlp_metrics)
    rows = table.to_pylist()
    assert [r["status"] for r in rows] == ["invalid"] * 3
    assert "2.bias" in rows[0]["error"] and "NaN" in rows[0]["error"]  # 0·inf = NaN
    assert all("2.bias" in r["error"] and "0.weight" not in r["error"] for r in rows)

    nan_base = params_of(module)
    nan_base["0.bias"][0] = float("nan")
    good = random_like(base, 73)
    rows = sweep.evaluate(module, sweep.Affine(nan_base, [good], [0.0, 1.0]), mlp_data(), mlp_metrics).to_pylist()
    assert [r["status"] for r in rows] == ["invalid", "invalid"]
    assert all("0.bias" in r["error"] for r in rows)


def test_nan_metric_kept_for_ok_rows():
    module = make_mlp()
    base = params_of(module)
    direction = {n: torch.zeros_like(t) for n, t in base.items()}
    direction["2.bias"] = torch.ones(3)

    def metrics(out, y):
        return {"logmean": torch.log(out.mean() - 5.0)}  # NaN while the output mean is below 5

    table = sweep.evaluate(module, sweep.Affine(base, [direction], [0.0, 100.0]), mlp_data(), metrics, chunk_size=2)
    rows = table.to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert rows[0]["logmean"] is not None and math.isnan(rows[0]["logmean"])
    assert math.isfinite(rows[1]["logmean"])


# --------------------------------------------------------------------------- nothing is mutated


def test_module_and_caller_tensors_unchanged(snap):
    module = make_cnn()
    before = snap(module)
    base = state_without_counters(module)
    direction = random_like(params_of(module), 80, 0.1)
    direction["bn1.running_mean"] = torch.ones(4)
    saved_base = {k: v.clone() for k, v in base.items()}
    saved_dir = {k: v.clone() for k, v in direction.items()}
    coeffs = torch.tensor([0.0, 1.0, -2.0])
    saved_coeffs = coeffs.clone()
    data = cnn_data()
    saved_data = [(x.clone(), y.clone()) for x, y in data]
    sweep.evaluate(module, sweep.Affine(base, [direction], coeffs), data, cnn_metrics, chunk_size=2)
    sweep.evaluate(module, sweep.Noise(base, 0.5, [1, 2, 3]), data, cnn_metrics, chunk_size=2)
    sweep.evaluate(module, sweep.Affine(base, [direction], coeffs), data, cnn_metrics, precision="bf16")
    snap.check(module, before)
    assert module.training and module.bn1.training
    for k in saved_base:
        assert torch.equal(base[k], saved_base[k]), k
    for k in saved_dir:
        assert torch.equal(direction[k], saved_dir[k]), k
    assert torch.equal(coeffs, saved_coeffs)
    for (x, y), (sx, sy) in zip(data, saved_data):
        assert torch.equal(x, sx) and torch.equal(y, sy)


def test_bf16_overflow_marks_only_that_row_invalid():
    module = torch.nn.Linear(2, 1)
    base = {n: p.detach().clone() for n, p in module.named_parameters()}
    direction = {n: torch.full_like(p, 3.4e38) for n, p in module.named_parameters()}  # finite in fp32, inf in bf16
    x = torch.ones(4, 2)
    table = sweep.evaluate(module, sweep.Affine(base, [direction], torch.tensor([[0.0], [1.0]])),
                           [(x, torch.zeros(4, 1))], lambda o, y: {"m": o.mean()}, precision="bf16")
    rows = table.to_pylist()
    assert rows[0]["status"] == "ok"
    assert rows[1]["status"] == "invalid" and "'weight'" in rows[1]["error"]
