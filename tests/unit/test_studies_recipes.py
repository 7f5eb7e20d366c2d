"""Recipe studies: `interpolate` (a piecewise-straight path through checkpoints) and `perturb`
(seeded Gaussian perturbations), planned from configs and evaluated batch by batch through an
Evaluator, checked against candidates built by hand."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import sweep
from sweep.config import parse_config
from sweep.evaluator import Evaluator
from sweep.examples import models
from sweep.model import build_module
from sweep.studies import plan
from sweep.studies import interpolate as interp
from sweep.studies import perturb as pert
from sweep.studies._path import path_coefficients

# --------------------------------------------------------------------------- helpers


from conftest import noise_by_hand, reference_eval as ref_loop  # noqa: E402 - the one independent reference loop


def check_rel(got: Dict, want: Dict[str, float], tol: float = 1e-5) -> None:
    assert got["status"] == "ok", got["error"]
    for name, w in want.items():
        assert got[name] is not None, name
        assert abs(got[name] - w) <= tol * max(abs(w), 1e-12), (name, got[name], w)


def theta(endpoints: List[Dict[str, torch.Tensor]], alpha: float) -> Dict[str, torch.Tensor]:
    """θ(α) by hand: on segment j = clamp(floor α, 0, n−2), E_j + (α − j)(E_{j+1} − E_j)."""
    n = len(endpoints)
    j = min(max(math.floor(alpha), 0), n - 2)
    t = alpha - j
    a, b = endpoints[j], endpoints[j + 1]
    return {k: (a[k] + t * (b[k] - a[k])) if a[k].is_floating_point() else endpoints[0][k].clone() for k in a}


def reg_data(sizes=(5, 2, 9), seed=10):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 6, generator=g), torch.randn(n, 3, generator=g)) for n in sizes]


def reg_metrics(out, y):
    return {"mse": ((out - y) ** 2).mean(), "l1": (out - y).abs().mean()}


MLP_KW = {"widths": [6, 8, 3]}


def mlp_states(n: int, seed: int = 0) -> List[Dict[str, torch.Tensor]]:
    out = []
    for i in range(n):
        torch.manual_seed(seed + i)
        out.append({k: v.detach().clone() for k, v in models.mlp(MLP_KW["widths"]).state_dict().items()})
    return out


def write(tmp_path: Path, name: str, tensors: Dict[str, torch.Tensor]) -> str:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / name))
    return name


def full_config(study: dict, tmp_path: Path):
    raw = {
        "name": "recipe-study",
        "model": {"factory": "sweep.examples.models:mlp", "kwargs": dict(MLP_KW)},
        "data": {"loader": "sweep.examples.models:regression_batches", "kwargs": {"features": 6}},
        "metrics": {"function": "sweep.examples.models:mse"},
        "study": study,
    }
    return parse_config(raw, base_dir=tmp_path)


def run_study(study, module, data, metrics, batch_size, chunk_size=3, skip=frozenset()) -> pa.Table:
    ev = Evaluator(module, data, metrics, chunk_size=chunk_size)
    try:
        for key, anchors in study.anchors().items():
            assert ev.add_anchors(anchors, key) == key
        tables = []
        for batch in study.batches(batch_size, skip):
            assert len(batch) <= batch_size
            tables.append(ev.run_rows(batch.source.rows, batch.source.key, batch.ids))
        return pa.concat_tables(tables)
    finally:
        ev.restore()


# --------------------------------------------------------------------------- path coefficients


def test_path_coefficients_two_endpoints():
    alphas = np.array([-0.5, 0.0, 0.3, 1.0, 1.75])
    got = path_coefficients(alphas, 1)
    assert got.shape == (5, 1)
    np.testing.assert_allclose(got, [[-0.5], [0.0], [0.3], [1.0], [1.75]], rtol=0, atol=1e-15)


def test_path_coefficients_three_endpoints():
    alphas = np.array([-0.5, 0.0, 0.25, 0.999, 1.0, 1.5, 2.0, 2.5, -2.0, 3.25])
    want = [
        [-0.5, 0.0],   # extends the first segment backwards
        [0.0, 0.0],    # E0
        [0.25, 0.0],
        [0.999, 0.0],
        [1.0, 0.0],    # E1
        [1.0, 0.5],
        [1.0, 1.0],    # E2
        [1.0, 1.5],    # extends the last segment
        [-2.0, 0.0],
        [1.0, 2.25],
    ]
    np.testing.assert_allclose(path_coefficients(alphas, 2), want, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- interpolate


def test_interpolate_two_endpoints_from_full_config(tmp_path):
    e = mlp_states(2)
    names = [write(tmp_path, f"e{i}.safetensors", s) for i, s in enumerate(e)]
    config = full_config({"kind": "interpolate", "endpoints": names,
                          "alphas": {"start": -0.5, "stop": 1.5, "num": 9}}, tmp_path)
    assert config.study.endpoints == [str(tmp_path / n) for n in names]
    study = plan(config.study)
    assert isinstance(study, interp.Interpolate) and len(study) == 9
    assert study.columns == {"alpha": pa.float64()}
    module = build_module(config.model.factory, config.model.kwargs)
    data = reg_data()
    table = run_study(study, module, data, reg_metrics, batch_size=4)

    alphas = np.linspace(-0.5, 1.5, 9)
    assert table.column_names == ["candidate_id", "status", "error", "alpha", "mse", "l1"]
    assert table.schema.field("alpha").type == pa.float64()
    assert table.column("candidate_id").to_pylist() == list(range(9))
    np.testing.assert_allclose(table.column("alpha").to_numpy(), alphas, rtol=0, atol=1e-12)
    want = ref_loop(module, [theta(e, float(a)) for a in alphas], data, reg_metrics)
    for got, w in zip(table.to_pylist(), want):
        check_rel(got, w)
    # α = 0 and α = 1 are the endpoints themselves
    ends = ref_loop(module, e, data, reg_metrics)
    check_rel(table.to_pylist()[2], ends[0])
    check_rel(table.to_pylist()[6], ends[1])
    assert len({round(r["mse"], 8) for r in table.to_pylist()}) == 9


def test_interpolate_three_endpoints_piecewise(tmp_path):
    e = mlp_states(3, seed=10)
    names = [write(tmp_path, f"p{i}.safetensors", s) for i, s in enumerate(e)]
    alphas = [-0.5, 0.0, 0.5, 1.0, 1.25, 2.0, 2.75, 0.9]
    config = interp.Config.model_validate({"kind": "interpolate", "endpoints": names, "alphas": alphas},
                                          context={"base_dir": tmp_path})
    study = interp.Interpolate(config)
    anchors = next(iter(study.anchors().values()))
    assert sorted(anchors) == ["base", "direction_0", "direction_1"]
    module = models.mlp(MLP_KW["widths"])
    data = reg_data()
    table = run_study(study, module, data, reg_metrics, batch_size=3, chunk_size=2)
    assert table.column("alpha").to_pylist() == alphas
    want = ref_loop(module, [theta(e, a) for a in alphas], data, reg_metrics)
    for got, w in zip(table.to_pylist(), want):
        check_rel(got, w)
    ends = ref_loop(module, e, data, reg_metrics)
    check_rel(table.to_pylist()[1], ends[0])
    check_rel(table.to_pylist()[3], ends[1])
    check_rel(table.to_pylist()[5], ends[2])
    # the kink: on segment 1, E1→E2 is followed, not E0→E2
    straight = ref_loop(module, [theta([e[0], e[2]], 1.25 / 2)], data, reg_metrics)[0]
    assert abs(straight["mse"] - table.to_pylist()[4]["mse"]) > 1e-5


def test_interpolate_batches_honour_skip(tmp_path):
    e = mlp_states(2)
    names = [write(tmp_path, f"s{i}.safetensors", s) for i, s in enumerate(e)]
    config = interp.Config.model_validate(
        {"kind": "interpolate", "endpoints": names, "alphas": {"start": 0.0, "stop": 1.0, "num": 11}},
        context={"base_dir": tmp_path})
    study = interp.Interpolate(config)
    skip = frozenset({0, 3, 4, 10})
    batches = list(study.batches(3, skip))
    ids = [i for b in batches for i in b.ids]
    assert ids == [i for i in range(11) if i not in skip]
    assert all(len(b) <= 3 for b in batches)
    for b in batches:
        np.testing.assert_allclose(b.source.rows.columns()["alpha"].to_numpy(), np.linspace(0, 1, 11)[b.ids])
    module = models.mlp(MLP_KW["widths"])
    data = reg_data()
    full = run_study(study, module, data, reg_metrics, batch_size=5).to_pylist()
    part = run_study(study, module, data, reg_metrics, batch_size=3, skip=skip).to_pylist()
    assert [r["candidate_id"] for r in part] == ids
    for r in part:
        assert abs(r["mse"] - full[r["candidate_id"]]["mse"]) <= 1e-6 * full[r["candidate_id"]]["mse"]


def test_interpolate_batchnorm_running_stats_follow_the_path(tmp_path):
    """Floating buffers in the checkpoints (running stats) are interpolated too."""
    states = []
    for i in range(2):
        torch.manual_seed(20 + i)
        cnn = models.cnn(channels=2, classes=3)
        with torch.no_grad():
            cnn.bn1.running_mean.uniform_(-1, 1)
            cnn.bn2.running_var.uniform_(0.5, 2.0)
        # without BatchNorm's 0-dim counter (covered by the next test)
        states.append({k: v.clone() for k, v in cnn.state_dict().items() if not k.endswith("num_batches_tracked")})
    names = [write(tmp_path, f"c{i}.safetensors", s) for i, s in enumerate(states)]
    alphas = [-0.25, 0.0, 0.5, 1.0, 1.5]
    study = interp.Interpolate(interp.Config.model_validate(
        {"kind": "interpolate", "endpoints": names, "alphas": alphas}, context={"base_dir": tmp_path}))
    module = models.cnn(channels=2, classes=3)
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in (4, 1, 3)]

    def metrics(out, y):
        return {"loss": F.cross_entropy(out, y)}

    table = run_study(study, module, data, metrics, batch_size=4, chunk_size=2)
    want = ref_loop(module, [theta(states, a) for a in alphas], data, metrics)
    for got, w in zip(table.to_pylist(), want):
        check_rel(got, w)
    # with the module's own running stats the numbers differ: the checkpoint's are used
    params_only = [{k: v for k, v in theta(states, a).items() if "running" not in k} for a in alphas]
    other = ref_loop(module, params_only, data, metrics)
    assert max(abs(o["loss"] - w["loss"]) for o, w in zip(other, want)) > 1e-4


def test_interpolate_full_state_dict_checkpoints(tmp_path):
    """Checkpoints saved straight from `state_dict()` of a BatchNorm model (with the 0-dim
    int64 `num_batches_tracked`) must plan and evaluate."""
    states = []
    for i in range(2):
        torch.manual_seed(30 + i)
        states.append({k: v.clone() for k, v in models.cnn(channels=2, classes=3).state_dict().items()})
    names = [write(tmp_path, f"f{i}.safetensors", s) for i, s in enumerate(states)]
    study = interp.Interpolate(interp.Config.model_validate(
        {"kind": "interpolate", "endpoints": names, "alphas": [0.0, 0.5, 1.0]}, context={"base_dir": tmp_path}))
    module = models.cnn(channels=2, classes=3)
    g = torch.Generator().manual_seed(4)
    data = [(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in (3, 2)]

    def metrics(out, y):
        return {"loss": F.cross_entropy(out, y)}

    table = run_study(study, module, data, metrics, batch_size=4)
    for got, w in zip(table.to_pylist(), ref_loop(module, [theta(states, a) for a in (0.0, 0.5, 1.0)], data, metrics)):
        check_rel(got, w)


def test_interpolate_endpoint_mismatch_is_a_config_error(tmp_path):
    e = mlp_states(3, seed=40)
    ok0 = write(tmp_path, "m0.safetensors", e[0])
    ok1 = write(tmp_path, "m1.safetensors", e[1])
    extra = dict(e[2])
    extra["3.weight"] = torch.zeros(2, 2)
    extra_name = write(tmp_path, "extra.safetensors", extra)
    missing = write(tmp_path, "missing.safetensors", {k: v for k, v in e[2].items() if k != "2.bias"})
    shaped = dict(e[2])
    shaped["0.weight"] = torch.zeros(8, 7)
    shaped_name = write(tmp_path, "shaped.safetensors", shaped)
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")

    def make(names):
        return interp.Interpolate(interp.Config.model_validate(
            {"kind": "interpolate", "endpoints": names, "alphas": [0.5]}, context={"base_dir": tmp_path}))

    with pytest.raises(sweep.ConfigError, match=r"study\.endpoints\[2\]") as info:
        make([ok0, ok1, extra_name])
    assert "3.weight" in str(info.value)
    with pytest.raises(sweep.ConfigError, match=r"study\.endpoints\[1\]") as info:
        make([ok0, missing])
    assert "2.bias" in str(info.value)
    with pytest.raises(sweep.ConfigError, match=r"study\.endpoints\[2\]") as info:
        make([ok0, ok1, shaped_name])
    assert "0.weight" in str(info.value)
    with pytest.raises(sweep.ConfigError, match=r"study\.endpoints\[1\]"):
        make([ok0, "junk.safetensors"])
    with pytest.raises(sweep.ConfigError, match="study"):
        full_config({"kind": "interpolate", "endpoints": [ok0, "nope.safetensors"], "alphas": [0.5]}, tmp_path)
    with pytest.raises(sweep.ConfigError):
        full_config({"kind": "interpolate", "endpoints": [ok0], "alphas": [0.5]}, tmp_path)


# --------------------------------------------------------------------------- perturb


def test_perturb_seeds_and_skip(tmp_path):
    study = pert.Perturb(pert.Config.model_validate({"kind": "perturb", "sigma": 0.1, "count": 10, "seed": 3}))
    batches = list(study.batches(4))
    assert len(study) == 11  # the base is the last row
    assert [list(b.ids) for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [10]]
    for b in batches[:-1]:
        assert b.source.rows.seeds.tolist() == [3 * 2**32 + k for k in b.ids]
        assert b.source.key == study.key
    assert isinstance(batches[-1].source.rows, pert.BaseRow) and batches[-1].source.key == study.key
    assert batches[-1].source_columns()["seed"].to_pylist() == [None]
    skip = frozenset({1, 4, 5, 6, 7, 9})
    kept = list(study.batches(4, skip))
    assert [i for b in kept for i in b.ids] == [0, 2, 3, 8, 10]
    assert all(0 < len(b) <= 4 for b in kept)
    for b in kept[:-1]:
        assert b.source.rows.seeds.tolist() == [3 * 2**32 + k for k in b.ids]
    assert [i for b in study.batches(4, frozenset({10})) for i in b.ids] == list(range(10))
    without = pert.Perturb(pert.Config.model_validate({"kind": "perturb", "sigma": 0.1, "count": 10,
                                                       "base_row": False}))
    assert len(without) == 10 and [i for b in without.batches(4) for i in b.ids] == list(range(10))

    top = pert.Perturb(pert.Config.model_validate({"kind": "perturb", "sigma": 0.1, "count": 3, "seed": 2**31 - 1}))
    seeds = next(iter(top.batches(8))).source.rows.seeds
    assert seeds.dtype == np.int64
    assert seeds.tolist() == [(2**31 - 1) * 2**32 + k for k in range(3)]


def test_perturb_from_file_matches_reference_and_repeats(tmp_path):
    base = mlp_states(1, seed=50)[0]
    name = write(tmp_path, "base.safetensors", base)
    config = full_config({"kind": "perturb", "base": name, "sigma": 0.05, "count": 7, "seed": 1}, tmp_path)
    study = plan(config.study)
    assert isinstance(study, pert.Perturb) and len(study) == 8
    assert study.columns == {"seed": pa.int64()}
    module = build_module(config.model.factory, config.model.kwargs)  # its own weights differ from base
    data = reg_data()
    first = run_study(study, module, data, reg_metrics, batch_size=3)
    second = run_study(plan(config.study), module, data, reg_metrics, batch_size=3)
    assert first.to_pylist() == second.to_pylist()
    assert first.column_names == ["candidate_id", "status", "error", "seed", "mse", "l1"]
    seeds = [2**32 + k for k in range(7)]
    assert first.column("seed").to_pylist() == seeds + [None]  # the unperturbed base last
    want = ref_loop(module, [noise_by_hand(module, base, 0.05, s) for s in seeds] + [base], data, reg_metrics)
    for got, w in zip(first.to_pylist(), want):
        check_rel(got, w)
    # other batch and chunk sizes, and skipping, give the same candidates
    other = run_study(study, module, data, reg_metrics, batch_size=2, chunk_size=5, skip=frozenset({2, 5}))
    assert other.column("candidate_id").to_pylist() == [0, 1, 3, 4, 6, 7]
    for got in other.to_pylist():
        check_rel(got, want[got["candidate_id"]], 1e-6)


def test_perturb_base_null_perturbs_module_weights(tmp_path):
    config = full_config({"kind": "perturb", "base": None, "sigma": 0.1, "count": 5, "seed": 0}, tmp_path)
    study = plan(config.study)
    module = build_module(config.model.factory, config.model.kwargs)
    own = {n: p.detach().clone() for n, p in module.named_parameters()}
    data = reg_data()
    table = run_study(study, module, data, reg_metrics, batch_size=2)
    again = run_study(study, module, data, reg_metrics, batch_size=5)
    want = ref_loop(module, [noise_by_hand(module, own, 0.1, k) for k in range(5)] + [own], data, reg_metrics)
    assert table.num_rows == 6
    for got, w in zip(table.to_pylist(), want):
        check_rel(got, w)
    for a, b in zip(table.to_pylist(), again.to_pylist()):
        assert abs(a["mse"] - b["mse"]) <= 1e-6 * a["mse"]
    for n, p in module.named_parameters():
        assert torch.equal(p, own[n]), n  # the module's weights are not changed by the study
    # a module with other weights gives other numbers: the module's own weights are the base
    other_module = build_module(config.model.factory, config.model.kwargs)
    with torch.no_grad():
        for p in other_module.parameters():
            p.add_(0.05)
    other = run_study(study, other_module, data, reg_metrics, batch_size=5).to_pylist()
    assert abs(other[0]["mse"] - table.to_pylist()[0]["mse"]) > 1e-5


def test_perturb_base_from_batchnorm_state_dict(tmp_path):
    """A perturb base saved straight from a BatchNorm model's `state_dict()` must plan and evaluate."""
    torch.manual_seed(70)
    cnn = models.cnn(channels=2, classes=3)
    base = {k: v.clone() for k, v in cnn.state_dict().items()}
    name = write(tmp_path, "bn.safetensors", base)
    study = pert.Perturb(pert.Config.model_validate({"kind": "perturb", "base": name, "sigma": 0.05, "count": 3},
                                                    context={"base_dir": tmp_path}))
    g = torch.Generator().manual_seed(5)
    data = [(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in (3, 2)]

    def metrics(out, y):
        return {"loss": F.cross_entropy(out, y)}

    table = run_study(study, cnn, data, metrics, batch_size=4)
    want = ref_loop(cnn, [noise_by_hand(cnn, base, 0.05, k) for k in range(3)] + [base], data, metrics)
    assert table.num_rows == 4
    for got, w in zip(table.to_pylist(), want):
        check_rel(got, w)
