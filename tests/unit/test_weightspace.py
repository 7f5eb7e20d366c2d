"""Weight-space recipes and studies checked against computations written here by hand.

SLERP (recipe and interpolate study), TIES and DARE (the helpers, the `Merge` recipe and the
`merge` study with its greedy soup), random filter-normalised landscape directions and
planes through checkpoints, the loss barrier, and permutation alignment. Every number is
compared with `reference_eval` (an independent per-candidate functional_call loop) over
candidates built in this file, never with the helper under test.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors.torch import save_file

import sweep
from sweep.analysis import barrier
from sweep.config import parse_config
from sweep.evaluator import Evaluator
from sweep.examples import digits, models
from sweep.model import read_weights_file
from sweep.recipes import Merge, MergeRows, Prepared, Slerp, elect_and_merge, trim
from sweep.studies import plan
from sweep.results import failed_rows
from sweep.studies.base import CandidateBatch, RecipeBatch, StudyContext, Wait

from conftest import reference_eval  # noqa: E402 - the one independent reference loop

EXAMPLES = Path(digits.__file__).parent
CKPT = EXAMPLES / "checkpoints"
STUDIES = EXAMPLES / "studies"
BASE = str(CKPT / "seed0-epoch02.safetensors")
FINETUNES = [str(STUDIES / f"finetune-{x}.safetensors") for x in "abc"]
SEEDS30 = [str(CKPT / f"seed{i}-epoch30.safetensors") for i in range(3)]
DEEP = [str(STUDIES / f"deep-seed{i}.safetensors") for i in range(2)]
DIGIT_METRICS = ["loss", "accuracy"]


# --------------------------------------------------------------------------- helpers


def load(path: str) -> Dict[str, torch.Tensor]:
    return read_weights_file(path)


def check_rel(got: Dict, want: Dict[str, float], tol: float = 1e-5) -> None:
    assert got["status"] == "ok", got["error"]
    for name, w in want.items():
        assert got[name] is not None, name
        assert abs(got[name] - w) <= tol * max(abs(w), 1e-12), (got.get("candidate_id"), name, got[name], w)


def digits_config(study: dict, tmp_path: Path, kwargs: Optional[dict] = None, objective: str = "loss",
                  mode: str = "min"):
    raw = {
        "name": "weightspace",
        "model": {"factory": "sweep.examples.digits:make_model", "kwargs": dict(kwargs or {})},
        "data": {"loader": "sweep.examples.digits:eval_batches"},
        "metrics": {"function": "sweep.examples.digits:metrics", "objective": objective, "mode": mode},
        "study": study,
    }
    return parse_config(raw, base_dir=tmp_path)


def digits_context(tmp_path: Optional[Path], **kwargs) -> StudyContext:
    module = digits.make_model(**kwargs)
    return StudyContext(module=lambda: module, artifacts=tmp_path)


def drive(study, module, data, metrics, *, batch_size: int = 8, chunk_size: int = 4,
          skip: frozenset = frozenset(), objective: Optional[str] = "loss", mode: str = "min",
          metric_names: Sequence[str] = DIGIT_METRICS, already: Optional[pa.Table] = None,
          lose: Callable[[CandidateBatch], Optional[str]] = lambda batch: None) -> List[Dict]:
    """A local driver: bind, (on resume) observe the rows already done, then pull batch after batch,
    evaluating each and observing its table before asking for the next. Returns the rows by id.

    A batch of a recipe is evaluated as a worker does it, any other through its candidates (with its
    columns added); a batch for which `lose` gives an error becomes failed rows, as the pool records
    a batch whose retries ran out.
    """
    study.bind(objective, mode, metric_names)
    if already is not None:
        study.observe(already)
    ev = Evaluator(module, data, metrics, chunk_size=chunk_size)
    rows: List[Dict] = []
    try:
        for key, anchors in study.anchors().items():
            assert ev.add_anchors(anchors, key) == key
        for item in study.batches(batch_size, skip):
            if isinstance(item, Wait):
                continue  # everything already ran (and was observed) synchronously
            assert isinstance(item, CandidateBatch)
            assert 0 < len(item) <= batch_size
            lost = lose(item)
            if lost is not None:
                table = failed_rows(item, lost)
            elif isinstance(item.source, RecipeBatch):
                table = ev.run_rows(item.source.rows, item.source.key, item.ids)
            else:
                table = ev.run(item.source.candidates(), item.ids)
                for name, values in item.columns.items():
                    table = table.append_column(name, pa.array(values))
            study.observe(table)
            for r in table.to_pylist():
                # batches of one study carry the columns their method uses; the results hold them all
                rows.append({**{c: None for c in study.columns}, **r})
    finally:
        ev.restore()
    return rows


def by_id(rows: Iterable[Dict]) -> Dict[int, Dict]:
    out = {}
    for r in rows:
        assert r["candidate_id"] not in out, f"id {r['candidate_id']} evaluated twice"
        out[r["candidate_id"]] = r
    return out


def materialise(recipe, names: Sequence[str]) -> Dict[str, torch.Tensor]:
    """The recipe's candidates as {name: [K, *shape]} float32 tensors, through the recipe's rows on CPU."""
    anchors = recipe.anchors()
    base = anchors["base"]
    keys = sorted((k for k in anchors if k.startswith("direction_")), key=lambda k: int(k.split("_")[1]))

    def flat(d):
        return torch.cat([d[n].to(torch.float32).reshape(-1) for n in names])

    prepared = Prepared(list(names), [tuple(base[n].shape) for n in names],
                        {"base": flat(base), "directions": torch.stack([flat(anchors[k]) for k in keys])}, {})
    out = recipe.rows().materialise(prepared, torch.device("cpu"))
    return prepared.unflatten(out, torch.float32)


def slerp_tensor(a: torch.Tensor, b: torch.Tensor, t: float, fallback: bool = True) -> torch.Tensor:
    """Per-tensor SLERP by hand, in float64: lerp when |cos| > 0.9995 (unless `fallback` is off)."""
    a64, b64 = a.double().reshape(-1), b.double().reshape(-1)
    cos = float(a64 @ b64) / (float(a64.norm()) * float(b64.norm()))
    if fallback and abs(cos) > 0.9995:
        out = (1.0 - t) * a64 + t * b64
    else:
        omega = math.acos(max(-1.0, min(1.0, cos)))
        out = math.sin((1.0 - t) * omega) / math.sin(omega) * a64 + math.sin(t * omega) / math.sin(omega) * b64
    return out.reshape(a.shape).to(torch.float32)


def slerp_dict(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor], t: float) -> Dict[str, torch.Tensor]:
    return {k: slerp_tensor(a[k], b[k], t) if a[k].is_floating_point() else a[k].clone() for k in a}


def lerp_tensor(a, b, t):
    return ((1.0 - t) * a.double() + t * b.double()).to(torch.float32)


def combine(base: Dict[str, torch.Tensor], terms: Sequence[tuple]) -> Dict[str, torch.Tensor]:
    """base + Σ c·d over base's floating tensors (float64, then float32)."""
    out = {}
    for k, v in base.items():
        if not v.is_floating_point():
            out[k] = v.clone()
            continue
        acc = v.double().clone()
        for c, d in terms:
            acc += c * d[k].double()
        out[k] = acc.to(torch.float32)
    return out


def diff(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: a[k].double() - b[k].double() for k in b if b[k].is_floating_point()}


def mean_of(states: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    return {k: (sum(s[k].double() for s in states) / len(states)).to(torch.float32) for k in states[0]}


# =========================================================================== 1. SLERP


def test_slerp_recipe_matches_hand_slerp_on_digits():
    module = digits.make_model()
    data = digits.eval_batches()
    a, b = load(SEEDS30[0]), load(SEEDS30[1])
    ts = np.linspace(-0.25, 1.25, 7)  # -0.25, 0, 0.25, 0.5, 0.75, 1, 1.25
    table = sweep.evaluate(module, Slerp(a, b, ts), data, digits.metrics, chunk_size=3)
    assert table.column_names == ["candidate_id", "status", "error", "t", "loss", "accuracy"]
    assert table.column("t").to_pylist() == ts.tolist()
    want = reference_eval(module, [slerp_dict(a, b, float(t)) for t in ts], data, digits.metrics)
    rows = table.to_pylist()
    for got, w in zip(rows, want):
        check_rel(got, w)
    # t = 0 and t = 1 are A and B themselves: the materialised tensors are bit-equal
    names = [n for n, _ in module.named_parameters()]
    cands = materialise(Slerp(a, b, [0.0, 1.0]), names)
    for n in names:
        assert torch.equal(cands[n][0], a[n]), n
        assert torch.equal(cands[n][1], b[n]), n
    ends = reference_eval(module, [a, b], data, digits.metrics)
    check_rel(rows[1], ends[0], 1e-6)
    check_rel(rows[5], ends[1], 1e-6)
    # … and their metrics are exactly those of A and B evaluated as plain dicts
    plain = sweep.evaluate(module, [a, b], data, digits.metrics, chunk_size=3).to_pylist()
    for name in ("loss", "accuracy"):
        assert rows[1][name] == plain[0][name] and rows[5][name] == plain[1][name], name
    # the test tells SLERP from a straight line: the lerp midpoint differs clearly
    lerp_mid = reference_eval(module, [{k: lerp_tensor(a[k], b[k], 0.5) for k in a}], data, digits.metrics)[0]
    assert abs(lerp_mid["loss"] - rows[3]["loss"]) > 1e-3


def test_slerp_parallel_tensors_fall_back_to_lerp():
    g = torch.Generator().manual_seed(0)
    th_near = math.acos(0.9998)   # |cos| above the threshold: linear
    th_below = math.acos(0.999)   # below it: spherical
    a = {
        "anti": torch.tensor([1.0, 2.0, 3.0, 4.0]),
        "para": torch.tensor([1.0, 2.0, 2.0]),
        "near": torch.tensor([1.0, 0.0, 0.0]),
        "below": torch.tensor([1.0, 0.0, 0.0]),
        "free": torch.randn(5, 3, generator=g),
    }
    b = {
        "anti": -2.0 * a["anti"],     # cos = −1: SLERP's sin Ω is 0
        "para": 2.0 * a["para"],      # cos = 1: Ω = 0
        "near": 2.0 * torch.tensor([math.cos(th_near), math.sin(th_near), 0.0]),
        "below": 2.0 * torch.tensor([math.cos(th_below), math.sin(th_below), 0.0]),
        "free": torch.randn(5, 3, generator=g),
    }
    ts = [0.5, 1.5, -0.5]
    got = materialise(Slerp(a, b, ts), list(a))
    for n in a:
        assert torch.isfinite(got[n]).all(), n
    for i, t in enumerate(ts):
        for n in ("anti", "para", "near"):
            torch.testing.assert_close(got[n][i], lerp_tensor(a[n], b[n], t), rtol=0, atol=1e-6)
        for n in ("below", "free"):
            torch.testing.assert_close(got[n][i], slerp_tensor(a[n], b[n], t), rtol=0, atol=1e-6)
    # by hand: the anti-parallel pair gives (1 − 3t)·a, the parallel one (1 + t)·a
    torch.testing.assert_close(got["anti"][0], -0.5 * a["anti"], rtol=0, atol=1e-6)
    torch.testing.assert_close(got["para"][1], 2.5 * a["para"], rtol=0, atol=1e-6)
    # the checks discriminate: near-parallel SLERP and lerp differ by more than the tolerance,
    # as do lerp and SLERP just below the threshold
    assert (slerp_tensor(a["near"], b["near"], 0.5, fallback=False) - lerp_tensor(a["near"], b["near"], 0.5)).abs().max() > 1e-5
    assert (got["below"][0] - lerp_tensor(a["below"], b["below"], 0.5)).abs().max() > 1e-5


def test_interpolate_slerp_three_endpoints_piecewise(tmp_path):
    ends = [load(p) for p in SEEDS30]
    alphas = [-0.25, 0.0, 0.5, 1.0, 1.5, 2.0, 2.25]
    config = digits_config({"kind": "interpolate", "endpoints": SEEDS30, "alphas": alphas, "method": "slerp"},
                           tmp_path)
    study = plan(config.study, digits_context(tmp_path))
    assert len(study) == len(alphas)
    module = digits.make_model()
    data = digits.eval_batches()
    rows = by_id(drive(study, module, data, digits.metrics, batch_size=3, chunk_size=2))
    assert sorted(rows) == list(range(len(alphas)))

    def hand(alpha):
        j = min(max(math.floor(alpha), 0), 1)
        return slerp_dict(ends[j], ends[j + 1], alpha - j)

    want = reference_eval(module, [hand(a) for a in alphas], data, digits.metrics)
    for i, (alpha, w) in enumerate(zip(alphas, want)):
        assert rows[i]["alpha"] == alpha
        check_rel(rows[i], w)
    # the endpoints themselves
    at_ends = reference_eval(module, ends, data, digits.metrics)
    for i, e in zip((1, 3, 5), at_ends):
        check_rel(rows[i], e, 1e-6)
    # piecewise: α = 1.5 lies on E1→E2, not on the arc E0→E2
    direct = reference_eval(module, [slerp_dict(ends[0], ends[2], 0.75)], data, digits.metrics)[0]
    assert abs(direct["loss"] - rows[4]["loss"]) > 1e-3


# =========================================================================== 2. TIES


def test_ties_trim_and_elect_by_hand():
    tau = torch.tensor([[1.0, -2.0, 3.0, 0.5],
                        [-1.0, 1.0, 2.0, -4.0]])
    # trim at density 0.5 keeps int(0.5·4) = 2 largest magnitudes of each task vector:
    #   τ1: |3|, |−2|  → [0, −2, 3, 0]
    #   τ2: |−4|, |2|  → [0, 0, 2, −4]
    trimmed = trim(tau, 0.5)
    assert torch.equal(trimmed, torch.tensor([[0.0, -2.0, 3.0, 0.0], [0.0, 0.0, 2.0, -4.0]]))
    # elected sign = sign of the column sums [0, −2, 5, −4] → [0, −, +, −];
    # column 0 sums to zero: it gets the majority sign (−) but no entry of it is nonzero.
    # disjoint mean over the entries that agree, zeros not counted:
    #   col 0: none → 0;  col 1: {−2} → −2;  col 2: {3, 2} → 2.5;  col 3: {−4} → −4
    merged = elect_and_merge(trimmed)
    assert torch.equal(merged, torch.tensor([0.0, -2.0, 2.5, -4.0]))

    # ties at the cut are all kept: three magnitudes of 1 tie for the 2 places
    assert torch.equal(trim(torch.tensor([[1.0, -1.0, 1.0, 0.5]]), 0.5), torch.tensor([[1.0, -1.0, 1.0, 0.0]]))
    # density 1 keeps everything; a density below 1/P keeps nothing
    assert torch.equal(trim(tau, 1.0), tau)
    assert torch.equal(trim(tau, 0.2), torch.zeros_like(tau))

    # a zero column sum and zeros that do not count:
    #   τ1 = [2, 1, −1, 3], τ2 = [−2, 1, 0, −1]; sums [0, 2, −1, 2] → signs [0, +, −, +];
    #   the majority of the elected signs (and the sign of the total, 3) is + → column 0 is +;
    #   col 0: {2} → 2;  col 1: {1, 1} → 1;  col 2: {−1} (the 0 not counted) → −1;  col 3: {3} → 3
    tau2 = torch.tensor([[2.0, 1.0, -1.0, 3.0], [-2.0, 1.0, 0.0, -1.0]])
    assert torch.equal(elect_and_merge(trim(tau2, 1.0)), torch.tensor([2.0, 1.0, -1.0, 3.0]))
    # the same with signs flipped flips the result (TIES is odd in τ where no zero sum is all-zero)
    assert torch.equal(elect_and_merge(-tau2), torch.tensor([-2.0, -1.0, 1.0, -3.0]))


def test_ties_merge_recipe_on_a_hand_set_linear_layer():
    module = torch.nn.Linear(3, 1)
    base = {"weight": torch.tensor([[0.25, -0.125, 0.5]]), "bias": torch.tensor([0.0625])}
    # flattened in parameter order (weight, then bias): the τ vectors of the test above
    taus = [torch.tensor([1.0, -2.0, 3.0, 0.5]), torch.tensor([-1.0, 1.0, 2.0, -4.0])]
    ft = [{"weight": base["weight"] + t[:3].reshape(1, 3), "bias": base["bias"] + t[3:]} for t in taus]
    merged = torch.tensor([0.0, -2.0, 2.5, -4.0])  # derived by hand in test_ties_trim_and_elect_by_hand
    lambdas = [0.7, 1.3, -0.5]
    recipe = Merge(base, ft, "ties", lambdas, [0.5] * 3)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(n, 3, generator=g), torch.randn(n, 1, generator=g)) for n in (7, 5)]

    def metrics(out, y):
        return {"mse": ((out - y) ** 2).mean(), "mean": out.mean(), "first": out[0, 0]}

    table = sweep.evaluate(module, recipe, data, metrics, chunk_size=2)
    assert table.column("lambda").to_pylist() == lambdas
    assert table.column("density").to_pylist() == [0.5] * 3
    hand = [{"weight": base["weight"] + lam * merged[:3].reshape(1, 3), "bias": base["bias"] + lam * merged[3:]}
            for lam in lambdas]
    for got, w in zip(table.to_pylist(), reference_eval(module, hand, data, metrics)):
        check_rel(got, w)
    got = materialise(recipe, ["weight", "bias"])
    for i, h in enumerate(hand):
        torch.testing.assert_close(got["weight"][i], h["weight"], rtol=0, atol=1e-6)
        torch.testing.assert_close(got["bias"][i], h["bias"], rtol=0, atol=1e-6)


# =========================================================================== 3. DARE


class Echo(torch.nn.Module):
    """Outputs its own parameter (one row per example): metrics can read the candidate."""

    def __init__(self, p: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(p))

    def forward(self, x):
        return self.w.unsqueeze(0) + 0.0 * x[:, :1]


def nonzero_tau(p: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(p, generator=g)
    return torch.where(t.abs() < 1e-3, torch.full_like(t, 0.5), t)


def test_dare_entries_and_kept_fraction_one_model():
    p, density = 20_000, 0.25
    tau = nonzero_tau(p, 3)
    scaled = tau * 4.0  # τ / 0.25, exact in float32
    base = {"w": torch.zeros(p)}
    seeds = [5, 5, 6, 7]
    recipe = Merge(base, [{"w": tau}], "dare", [1.0] * 4, [density] * 4, seeds)
    got = materialise(recipe, ["w"])["w"]
    sd = math.sqrt(density * (1 - density) / p)
    for i in range(4):
        theta = got[i] - base["w"]
        kept = theta != 0
        assert torch.equal(theta[kept], scaled[kept]), "kept entries must be exactly τ/density"
        assert abs(kept.double().mean().item() - density) <= 4 * sd
    assert torch.equal(got[0], got[1])       # same seed, same candidate
    assert not torch.equal(got[0], got[2])   # other seeds, other masks
    assert not torch.equal(got[2], got[3])

    # the same through the evaluator: metrics read the candidate off the Echo module
    def metrics(out, y):
        w = out[0]
        wrong = (w != 0) & (w != scaled)
        return {"wrong": wrong.sum().to(torch.float32), "kept": (w != 0).to(torch.float32).mean(),
                "sum": w.sum()}

    data = [(torch.zeros(2, 1), torch.zeros(2))]
    table = sweep.evaluate(Echo(p), recipe, data, metrics, chunk_size=3).to_pylist()
    assert table[0]["seed"] == 5 and table[2]["seed"] == 6
    for i, r in enumerate(table):
        assert r["status"] == "ok"
        assert r["wrong"] == 0.0
        assert abs(r["kept"] - density) <= 4 * sd
        assert r["kept"] == pytest.approx((got[i] != 0).double().mean().item(), abs=1e-6)
    assert table[0]["kept"] == table[1]["kept"] and table[0]["sum"] == table[1]["sum"]
    assert table[0]["sum"] != table[2]["sum"]

    # another density: the kept entries are τ/density to float32 rounding
    other = materialise(Merge(base, [{"w": tau}], "dare", [1.0], [0.7], [9]), ["w"])["w"][0]
    kept = other != 0
    torch.testing.assert_close(other[kept], tau[kept] / 0.7, rtol=1e-6, atol=0)
    assert abs(kept.double().mean().item() - 0.7) <= 4 * math.sqrt(0.7 * 0.3 / p)


def test_dare_per_model_lambdas_and_linearity():
    p, density, seed = 4000, 0.5, 11
    taus = [nonzero_tau(p, 20), nonzero_tau(p, 21)]
    zero = {"w": torch.zeros(p)}
    models_ = [{"w": t} for t in taus]
    lambdas = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, -1.3], [2.0, 2.0]])
    got = materialise(Merge(zero, models_, "dare", lambdas, [density] * 4, [seed] * 4), ["w"])["w"]
    # rows [1, 0] and [0, 1] give each model's own mask_i·τ_i/d (same seed → same masks in every row)
    masks = [got[0] != 0, got[1] != 0]
    for i in range(2):
        assert torch.equal(got[i][masks[i]], taus[i][masks[i]] * 2.0)
        assert abs(masks[i].double().mean().item() - density) <= 4 * math.sqrt(density * (1 - density) / p)
    assert not torch.equal(masks[0], masks[1]), "each model draws its own mask"
    for r, (l0, l1) in enumerate(lambdas):
        want = l0 * masks[0] * taus[0] * 2.0 + l1 * masks[1] * taus[1] * 2.0
        torch.testing.assert_close(got[r], want.to(torch.float32), rtol=1e-6, atol=1e-6)

    # columns: one λ per model
    cols = Merge(zero, models_, "dare", lambdas, [density] * 4, [seed] * 4).rows().columns()
    assert cols["lambda_1"].to_pylist() == [0.0, 1.0, -1.3, 2.0]

    # linearity in λ around a nonzero base, one model, same seed
    base = {"w": nonzero_tau(p, 30)}
    one = [{"w": base["w"] + taus[0]}]
    th = materialise(Merge(base, one, "dare", [1.0, 2.0, -0.5], [0.3] * 3, [4] * 3), ["w"])["w"]
    d1 = th[0].double() - base["w"].double()
    torch.testing.assert_close(th[1].double() - base["w"].double(), 2.0 * d1, rtol=0, atol=2e-5)
    torch.testing.assert_close(th[2].double() - base["w"].double(), -0.5 * d1, rtol=0, atol=2e-5)

    # ties and dare_ties take one λ only
    with pytest.raises(ValueError, match="per-model"):
        MergeRows("ties", lambdas, np.full(4, 0.5), np.zeros(4, np.int64))


def test_dare_density_one_is_task_arithmetic():
    base = load(BASE)
    fts = [load(p) for p in FINETUNES]
    module = digits.make_model()
    names = [n for n, _ in module.named_parameters()]
    got = materialise(Merge(base, fts, "dare", [0.6], [1.0], [3]), names)
    hand = combine(base, [(0.6, diff(f, base)) for f in fts])
    for n in names:
        torch.testing.assert_close(got[n][0], hand[n], rtol=0, atol=1e-6)


# =========================================================================== 4. merge study


MERGE_STUDY = {
    "kind": "merge",
    "base": BASE,
    "models": FINETUNES,
    "methods": ["task_arithmetic", "ties", "dare", "uniform_soup", "greedy_soup"],
    "lambdas": [0.5, 1.0],
    "densities": [0.5, 1.0],
    "seed": 3,
}


def hand_ties(base, fts, names, lam: float, density: float) -> Dict[str, torch.Tensor]:
    """TIES in numpy over the task vectors flattened in parameter order."""
    taus = np.stack([np.concatenate([(f[n].double() - base[n].double()).numpy().reshape(-1) for n in names])
                     for f in fts])
    p = taus.shape[1]
    k = int(density * p)
    trimmed = np.zeros_like(taus)
    for i in range(len(taus)):
        mags = np.abs(taus[i])
        cut = np.sort(mags)[::-1][k - 1]
        trimmed[i] = np.where(mags >= cut, taus[i], 0.0)
    sign = np.sign(trimmed.sum(axis=0))
    sign[sign == 0] = np.sign(sign.sum())
    agree = (np.sign(trimmed) == sign[None, :]) & (trimmed != 0)
    merged = (trimmed * agree).sum(axis=0) / np.maximum(agree.sum(axis=0), 1)
    out, offset = {}, 0
    for n in names:
        size = base[n].numel()
        out[n] = (base[n].double() + lam * torch.from_numpy(merged[offset: offset + size]).reshape(base[n].shape)
                  ).to(torch.float32)
        offset += size
    return out


def hand_greedy(module, data, models_, objective="loss"):
    """Wortsman et al.'s greedy soup by hand: (tried soups with their objective, final soup, its objective)."""
    own = reference_eval(module, models_, data, digits.metrics)
    order = sorted(range(len(models_)), key=lambda i: (own[i][objective], i))
    soup = [order[0]]
    best = own[order[0]][objective]
    tried = []
    for m in order[1:]:
        trial = soup + [m]
        value = reference_eval(module, [mean_of([models_[i] for i in trial])], data, digits.metrics)[0][objective]
        tried.append(("+".join(str(i) for i in sorted(trial)), value))
        if value < best:
            soup, best = trial, value
    final = reference_eval(module, [mean_of([models_[i] for i in soup])], data, digits.metrics)[0]
    return tried, "+".join(str(i) for i in sorted(soup)), final


def test_merge_study_rows_match_hand_merges(tmp_path):
    config = digits_config(dict(MERGE_STUDY), tmp_path)
    study = plan(config.study, digits_context(tmp_path))
    n, nl, nd = len(MERGE_STUDY["models"]), len(MERGE_STUDY["lambdas"]), len(MERGE_STUDY["densities"])
    # base, models, task arithmetic, ties, dare, uniform soup, greedy rounds + final soup
    assert len(study) == 1 + n + nl + nl * nd + nl * nd + 1 + n == 18
    module = digits.make_model()
    data = digits.eval_batches()
    rows = by_id(drive(study, module, data, digits.metrics, batch_size=3))
    assert sorted(rows) == list(range(len(study)))
    methods = [rows[i]["method"] for i in range(len(study))]
    assert methods == (["base"] + ["model"] * 3 + ["task_arithmetic"] * 2 + ["ties"] * 4 + ["dare"] * 4
                       + ["uniform_soup"] + ["greedy_step"] * 2 + ["greedy_soup"])
    for r in rows.values():
        assert r["status"] == "ok", r

    base = load(BASE)
    fts = [load(p) for p in FINETUNES]
    names = [nm for nm, _ in module.named_parameters()]
    # base and each model alone: the files themselves
    for i, w in enumerate(reference_eval(module, [base] + fts, data, digits.metrics)):
        check_rel(rows[i], w)
        assert rows[i]["soup"] == (None if i == 0 else str(i - 1))
    # task arithmetic: base + λ·Σ(ft_i − base)
    taus = [diff(f, base) for f in fts]
    for i, lam in zip((4, 5), (0.5, 1.0)):
        assert rows[i]["lambda"] == lam and rows[i]["density"] is None
        check_rel(rows[i], reference_eval(module, [combine(base, [(lam, t) for t in taus])], data, digits.metrics)[0])
    # TIES over λ × density, λ outer
    grid = [(lam, d) for lam in (0.5, 1.0) for d in (0.5, 1.0)]
    for i, (lam, d) in zip(range(6, 10), grid):
        assert (rows[i]["lambda"], rows[i]["density"], rows[i]["seed"]) == (lam, d, None)
        check_rel(rows[i], reference_eval(module, [hand_ties(base, fts, names, lam, d)], data, digits.metrics)[0])
    # DARE: seeds are seed·2³² + id; at density 1 it keeps everything, so it is task arithmetic
    for i, (lam, d) in zip(range(10, 14), grid):
        assert (rows[i]["lambda"], rows[i]["density"], rows[i]["seed"]) == (lam, d, 3 * 2**32 + i)
    check_rel(rows[11], {n: rows[4][n] for n in DIGIT_METRICS})
    check_rel(rows[13], {n: rows[5][n] for n in DIGIT_METRICS})
    assert abs(rows[10]["loss"] - rows[4]["loss"]) > 1e-4  # density 0.5 drops something
    # uniform soup: the mean of the three models
    assert rows[14]["soup"] == "0+1+2"
    check_rel(rows[14], reference_eval(module, [mean_of(fts)], data, digits.metrics)[0])
    # greedy soup, by hand
    tried, final_soup, final = hand_greedy(module, data, fts)
    assert [(rows[i]["soup"]) for i in (15, 16)] == [s for s, _ in tried]
    for i, (_, value) in zip((15, 16), tried):
        assert abs(rows[i]["loss"] - value) <= 1e-5 * value
    assert rows[17]["soup"] == final_soup
    check_rel(rows[17], final)
    assert study.summarise() == {"greedy_soup_loss": rows[17]["loss"]}
    assert abs(study.summarise()["greedy_soup_loss"] - final["loss"]) <= 1e-5 * final["loss"]


def test_merge_study_resume_yields_missing_ids_and_same_decisions(tmp_path):
    config = digits_config(dict(MERGE_STUDY), tmp_path)
    module = digits.make_model()
    data = digits.eval_batches()
    full = by_id(drive(plan(config.study, digits_context(tmp_path)), module, data, digits.metrics, batch_size=4))
    missing = {5, 8, 12, 16, 17}  # a TA, a TIES, a DARE row, the second greedy round and the final soup
    done_rows = [full[i] for i in sorted(full) if i not in missing]
    # the rows already in the results, as a driver reads them back
    already = pa.Table.from_pylist([{k: r[k] for k in ("candidate_id", "status", "loss", "accuracy")}
                                    for r in done_rows])
    study = plan(config.study, digits_context(tmp_path))
    skip = frozenset(r["candidate_id"] for r in done_rows)
    again = drive(study, module, data, digits.metrics, batch_size=4, skip=skip, already=already)
    assert sorted(r["candidate_id"] for r in again) == sorted(missing)
    for r in again:
        want = full[r["candidate_id"]]
        assert r["method"] == want["method"] and r["soup"] == want["soup"]
        assert r["lambda"] == want["lambda"] and r["density"] == want["density"] and r["seed"] == want["seed"]
        check_rel(r, {"loss": want["loss"], "accuracy": want["accuracy"]}, 1e-6)
    assert study.summarise() == {"greedy_soup_loss": by_id(again)[17]["loss"]}

    # a resume with every greedy round done, only the final soup missing, replays the decisions
    study = plan(config.study, digits_context(tmp_path))
    rest = [full[i] for i in sorted(full) if i != 17]
    already = pa.Table.from_pylist([{k: r[k] for k in ("candidate_id", "status", "loss", "accuracy")} for r in rest])
    last = drive(study, module, data, digits.metrics, skip=frozenset(r["candidate_id"] for r in rest),
                 already=already)
    assert [(r["candidate_id"], r["soup"]) for r in last] == [(17, full[17]["soup"])]


def test_greedy_soup_keeps_models_that_improve(tmp_path):
    """Noisy copies of one fine-tune: averaging two cuts the noise (kept), a very noisy one is refused."""
    ft = load(FINETUNES[0])
    g = torch.Generator().manual_seed(4)
    paths = []
    for i, sigma in enumerate((0.15, 0.15, 0.6, 0.15)):
        noisy = {k: v + sigma * torch.randn(v.shape, generator=g) for k, v in ft.items()}
        path = tmp_path / f"noisy{i}.safetensors"
        save_file({k: v.contiguous() for k, v in noisy.items()}, str(path))
        paths.append(str(path))
    config = digits_config({"kind": "merge", "base": BASE, "models": paths, "methods": ["greedy_soup"]}, tmp_path)
    study = plan(config.study, digits_context(tmp_path))
    assert len(study) == 1 + 4 + 4
    module = digits.make_model()
    data = digits.eval_batches()
    rows = by_id(drive(study, module, data, digits.metrics, batch_size=2))
    assert sorted(rows) == list(range(9))
    models_ = [load(p) for p in paths]
    tried, final_soup, final = hand_greedy(module, data, models_)
    assert [rows[i]["soup"] for i in (5, 6, 7)] == [s for s, _ in tried]
    for i, (_, value) in zip((5, 6, 7), tried):
        assert abs(rows[i]["loss"] - value) <= 1e-5 * value
    assert rows[8]["method"] == "greedy_soup" and rows[8]["soup"] == final_soup
    # both branches ran: some model joined the soup, the very noisy one was refused
    members = final_soup.split("+")
    assert len(members) >= 2 and "2" not in members, final_soup
    assert any(s == "+".join(sorted(s.split("+"))) and "2" in s.split("+") for s, _ in tried)
    check_rel(rows[8], final)
    assert study.summarise() == {"greedy_soup_loss": rows[8]["loss"]}


def greedy_config(tmp_path: Path, models_: Sequence[str]):
    return digits_config({"kind": "merge", "base": BASE, "models": list(models_),
                          "methods": ["task_arithmetic", "greedy_soup"], "lambdas": [0.5]}, tmp_path)


def bad_copy(tmp_path: Path, name: str, change) -> str:
    """FINETUNES[1] with `change` applied to its first tensor, saved as `name`."""
    weights = {k: v.clone() for k, v in load(FINETUNES[1]).items()}
    change(weights[next(iter(weights))])
    path = tmp_path / name
    save_file(weights, str(path))
    return str(path)


GREEDY_IDS = (5, 6, 7)  # base, 3 models, 1 task arithmetic row, then 2 greedy rounds and the final soup
STOP_ADVICE = ("The soup ranks the models by their own loss, so every model's row must be ok with a finite loss: "
               "fix that model or leave it out of study.models")


def test_greedy_soup_stopped_by_an_invalid_model_gives_every_id_a_row_and_a_finding(tmp_path):
    """A fine-tune with a NaN makes the models' own rows invalid: the soup cannot rank them, so its
    rounds and final soup become invalid rows saying so, and the summary names the models and why."""
    nan = bad_copy(tmp_path, "nan.safetensors", lambda t: t.view(-1)[0].fill_(math.nan))
    config = greedy_config(tmp_path, [FINETUNES[0], nan, FINETUNES[2]])
    study = plan(config.study, digits_context(tmp_path))
    assert len(study) == 8
    rows = by_id(drive(study, digits.make_model(), digits.eval_batches(), digits.metrics, batch_size=2))
    assert sorted(rows) == list(range(8))
    # (a NaN in one task vector reaches every row of the Affine recipe, the other models' too)
    assert rows[2]["status"] == "invalid" and "not finite" in rows[2]["error"]
    stopped = study.summarise()["greedy_soup_stopped"]
    assert "greedy_soup_loss" not in study.summarise()
    assert stopped.startswith("greedy soup stopped: model 0 (finetune-a.safetensors, candidate 1) row was invalid: ")
    assert f"model 1 (nan.safetensors, candidate 2) row was invalid: {rows[2]['error']}" in stopped
    assert stopped.endswith(STOP_ADVICE.replace("that model or leave it", "those models or leave them"))
    assert [rows[i]["method"] for i in GREEDY_IDS] == ["greedy_step", "greedy_step", "greedy_soup"]
    for i in GREEDY_IDS:
        assert (rows[i]["status"], rows[i]["error"], rows[i]["soup"], rows[i]["loss"]) == (
            "invalid", stopped, None, None)


def test_greedy_soup_stopped_by_a_failed_model_row_says_so_and_survives_a_resume(tmp_path):
    config = greedy_config(tmp_path, FINETUNES)
    module, data = digits.make_model(), digits.eval_batches()
    lost = "RayActorError: the worker died (2 attempts, each alone on a worker)"
    study = plan(config.study, digits_context(tmp_path))
    rows = by_id(drive(study, module, data, digits.metrics, batch_size=1,
                       lose=lambda batch: lost if list(batch.ids) == [3] else None))
    assert sorted(rows) == list(range(8))
    assert rows[3]["status"] == "failed" and all(rows[i]["status"] == "ok" for i in (0, 1, 2, 4))
    want = f"greedy soup stopped: model 2 (finetune-c.safetensors, candidate 3) row was failed: {lost}. {STOP_ADVICE}"
    assert study.summarise() == {"greedy_soup_stopped": want}
    for i in GREEDY_IDS:
        assert (rows[i]["status"], rows[i]["error"]) == ("invalid", want)

    # A resume reads these rows back: nothing is left to run, and the summary still says why.
    again = plan(config.study, digits_context(tmp_path))

    def read_back(ids):
        keys = ("candidate_id", "status", "error", "loss", "accuracy")
        return pa.Table.from_pylist([{k: rows[i].get(k) for k in keys} for i in ids])

    assert drive(again, module, data, digits.metrics, skip=frozenset(rows), already=read_back(sorted(rows))) == []
    assert again.summarise() == {"greedy_soup_stopped": want}
    # A resume that lost the final soup's row makes it again, with the same error.
    again = plan(config.study, digits_context(tmp_path))
    last = drive(again, module, data, digits.metrics, skip=frozenset(rows) - {7}, already=read_back(range(7)))
    assert [(r["candidate_id"], r["method"], r["status"], r["error"]) for r in last] == [
        (7, "greedy_soup", "invalid", want)]


def test_greedy_soup_stopped_by_a_model_with_a_non_finite_loss(tmp_path):
    """A model row can be ok with an infinite loss (weights of 1e37 overflow the logits): unrankable too."""
    huge = bad_copy(tmp_path, "huge.safetensors", lambda t: t.mul_(1e37))
    config = greedy_config(tmp_path, [FINETUNES[0], huge, FINETUNES[2]])
    study = plan(config.study, digits_context(tmp_path))
    rows = by_id(drive(study, digits.make_model(), digits.eval_batches(), digits.metrics, batch_size=8))
    assert rows[2]["status"] == "ok" and rows[2]["loss"] == math.inf
    want = f"greedy soup stopped: model 1 (huge.safetensors, candidate 2) row was ok but its loss is inf. {STOP_ADVICE}"
    assert study.summarise() == {"greedy_soup_stopped": want}
    assert [(rows[i]["status"], rows[i]["error"]) for i in GREEDY_IDS] == [("invalid", want)] * 3


def test_merge_random_search_draws_within_bounds_and_repeats(tmp_path):
    def draws(seed):
        study_cfg = {"kind": "merge", "base": BASE, "models": FINETUNES, "methods": ["task_arithmetic", "ties", "dare"],
                     "lambdas": [0.2, 1.5, 0.9], "densities": [0.1, 0.9], "search": "random", "samples": 6,
                     "seed": seed}
        study = plan(digits_config(study_cfg, tmp_path).study, digits_context(tmp_path))
        assert len(study) == 1 + 3 + 3 * 6
        out = []
        for b in study.batches(5):
            assert not isinstance(b, Wait)
            cols = {k: v.to_pylist() for k, v in b.source.rows.columns().items()}
            out += [dict(zip(cols, vals), id=i) for i, vals in zip(b.ids, zip(*cols.values()))]
        return out

    first = draws(1)
    assert [r["id"] for r in first] == list(range(22))
    sampled = [r for r in first if r["method"] in ("task_arithmetic", "ties", "dare")]
    assert len(sampled) == 18
    for r in sampled:
        assert 0.2 <= r["lambda"] <= 1.5
        if r["method"] == "task_arithmetic":
            assert r.get("density") is None
        else:
            assert 0.1 <= r["density"] <= 0.9
    assert len({r["lambda"] for r in sampled}) == 18  # drawn, not a grid
    assert draws(1) == first
    assert [r["lambda"] for r in draws(2)[4:]] != [r["lambda"] for r in first[4:]]


def test_merge_config_errors(tmp_path):
    with pytest.raises(sweep.ConfigError, match="per_model"):
        digits_config(dict(MERGE_STUDY, per_model=True), tmp_path)
    with pytest.raises(sweep.ConfigError, match="per_model"):
        digits_config(dict(MERGE_STUDY, methods=["dare_ties"], per_model=True), tmp_path)
    digits_config(dict(MERGE_STUDY, methods=["task_arithmetic", "dare"], per_model=True), tmp_path)  # fine
    for bad in ([0.0, 0.5], [0.5, 1.5], [-0.1], {"start": 0.5, "stop": 1.2, "num": 3}):
        with pytest.raises(sweep.ConfigError, match="densities"):
            digits_config(dict(MERGE_STUDY, densities=bad), tmp_path)
    wrong = str(CKPT / "bad-hidden32.safetensors")
    config = digits_config(dict(MERGE_STUDY, models=[FINETUNES[0], wrong, FINETUNES[2]]), tmp_path)
    with pytest.raises(sweep.ConfigError, match=r"study\.models\[1\]"):
        plan(config.study, digits_context(tmp_path))


# =========================================================================== 5. landscape


def landscape_study(tmp_path, study, context=None, **config_kw):
    config = digits_config(dict({"kind": "landscape"}, **study), tmp_path, **config_kw)
    return plan(config.study, context or digits_context(tmp_path))


def anchors_of(study):
    (anchors,) = study.anchors().values()
    return anchors


def test_landscape_random_filter_normalised_directions(tmp_path):
    center = load(SEEDS30[0])
    study = landscape_study(tmp_path, {"center": SEEDS30[0], "x": {"start": -1, "stop": 1, "num": 3},
                                       "y": {"start": -0.5, "stop": 0.5, "num": 2}, "seed": 5})
    anchors = anchors_of(study)
    assert sorted(anchors) == ["base", "direction_0", "direction_1"]
    for k in center:
        assert torch.equal(anchors["base"][k], center[k])
    for name in ("direction_0", "direction_1"):
        d = anchors[name]
        assert set(d) == set(center)
        for k, v in d.items():
            c = center[k]
            if c.dim() >= 2:
                torch.testing.assert_close(v.flatten(1).norm(dim=1), c.flatten(1).norm(dim=1), rtol=1e-5, atol=0)
            else:
                assert torch.equal(v, torch.zeros_like(c)), k  # ignore: biasbn
    assert not torch.equal(anchors["direction_0"]["0.weight"], anchors["direction_1"]["0.weight"])
    # the same seed gives the same directions, another seed others
    again = anchors_of(landscape_study(tmp_path, {"center": SEEDS30[0], "x": {"start": -1, "stop": 1, "num": 3},
                                                  "y": {"start": -0.5, "stop": 0.5, "num": 2}, "seed": 5}))
    other = anchors_of(landscape_study(tmp_path, {"center": SEEDS30[0], "x": {"start": -1, "stop": 1, "num": 3},
                                                  "y": {"start": -0.5, "stop": 0.5, "num": 2}, "seed": 6}))
    assert torch.equal(again["direction_1"]["2.weight"], anchors["direction_1"]["2.weight"])
    assert not torch.equal(other["direction_0"]["0.weight"], anchors["direction_0"]["0.weight"])

    # candidates: centre + x·d0 + y·d1, ids row-major with x fastest
    module = digits.make_model()
    data = digits.eval_batches()
    rows = by_id(drive(study, module, data, digits.metrics, batch_size=4, chunk_size=3))
    xs, ys = [-1.0, 0.0, 1.0], [-0.5, 0.5]
    assert sorted(rows) == list(range(6))
    coords = [(x, y) for y in ys for x in xs]
    hand = [combine(center, [(x, anchors["direction_0"]), (y, anchors["direction_1"])]) for x, y in coords]
    for i, ((x, y), w) in enumerate(zip(coords, reference_eval(module, hand, data, digits.metrics))):
        assert (rows[i]["x"], rows[i]["y"]) == (x, y)
        check_rel(rows[i], w)


def test_landscape_ignore_none_and_layer_normalisation(tmp_path):
    center = load(SEEDS30[1])
    xr = {"start": -1, "stop": 1, "num": 2}
    none = anchors_of(landscape_study(tmp_path, {"center": SEEDS30[1], "x": xr, "ignore": "none"}))
    assert sorted(none) == ["base", "direction_0"]
    for k, v in none["direction_0"].items():
        if center[k].dim() == 1:
            assert torch.equal(v, center[k]), k
        else:
            torch.testing.assert_close(v.flatten(1).norm(dim=1), center[k].flatten(1).norm(dim=1), rtol=1e-5, atol=0)
    layer = anchors_of(landscape_study(tmp_path, {"center": SEEDS30[1], "x": xr, "normalization": "layer"}))
    for k, v in layer["direction_0"].items():
        if center[k].dim() >= 2:
            torch.testing.assert_close(v.norm(), center[k].norm(), rtol=1e-5, atol=0)
            # whole tensors, not filters: the rows' norms do not each match the centre's
            ratio = v.flatten(1).norm(dim=1) / center[k].flatten(1).norm(dim=1)
            assert (ratio - 1).abs().max() > 0.01, k
        else:
            assert torch.equal(v, torch.zeros_like(center[k]))


def cnn_context(tmp_path, module):
    return StudyContext(module=lambda: module, artifacts=tmp_path)


def cnn_config(study, tmp_path):
    raw = {
        "name": "weightspace-cnn",
        "model": {"factory": "sweep.examples.models:cnn", "kwargs": {"channels": 4}},
        "data": {"loader": "sweep.examples.models:image_batches", "kwargs": {"batch": 8, "size": 8}},
        "metrics": {"function": "sweep.examples.models:classification", "objective": "loss"},
        "study": dict({"kind": "landscape"}, **study),
    }
    return parse_config(raw, base_dir=tmp_path)


def test_landscape_buffers_on_a_batchnorm_cnn(tmp_path):
    torch.manual_seed(0)
    module = models.cnn(channels=4)
    with torch.no_grad():
        module.bn1.running_mean.uniform_(-0.5, 0.5)
        module.bn2.running_var.uniform_(0.5, 2.0)
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    params = {n for n, _ in module.named_parameters()}
    floating = {k for k, v in state.items() if v.is_floating_point()}
    assert floating - params  # the running statistics
    xr = {"start": -0.5, "stop": 0.5, "num": 3}

    no_buffers = anchors_of(plan(cnn_config({"x": xr}, tmp_path).study, cnn_context(tmp_path, module)))
    d = no_buffers["direction_0"]
    assert set(d) == params
    assert not any("running" in k or "num_batches" in k for k in d)
    for k, v in d.items():
        if state[k].dim() >= 2:  # conv filters (4-D) and the head
            torch.testing.assert_close(v.flatten(1).norm(dim=1), state[k].flatten(1).norm(dim=1), rtol=1e-5, atol=0)

    study = plan(cnn_config({"x": xr, "buffers": True, "ignore": "none"}, tmp_path).study,
                 cnn_context(tmp_path, module))
    anchors = anchors_of(study)
    d = anchors["direction_0"]
    assert set(d) == floating
    assert "bn1.running_mean" in d and "bn2.running_var" in d and "bn1.num_batches_tracked" not in d
    assert torch.equal(d["bn2.running_var"], state["bn2.running_var"])  # 1-D with ignore none: the centre's own

    # the candidates move the running statistics too
    data = models.image_batches(batch=8, size=8, batches=2)
    rows = by_id(drive(study, module, data, models.classification, batch_size=2, chunk_size=2))
    xs = [-0.5, 0.0, 0.5]
    hand = [combine(state, [(x, d)]) for x in xs]
    for i, w in enumerate(reference_eval(module, hand, data, models.classification)):
        assert rows[i]["x"] == xs[i]
        check_rel(rows[i], w)
    params_only = reference_eval(module, [{k: v for k, v in hand[2].items() if k in params}], data,
                                 models.classification)[0]
    assert abs(params_only["loss"] - rows[2]["loss"]) > 1e-4


def test_landscape_plane_and_line_through_checkpoints(tmp_path):
    a, b, c = (load(p) for p in SEEDS30)
    module = digits.make_model()
    data = digits.eval_batches()
    study = landscape_study(tmp_path, {"center": SEEDS30[0], "directions": SEEDS30[1:],
                                       "x": {"start": 0, "stop": 1, "num": 2}, "y": {"start": 0, "stop": 1, "num": 2}})
    assert study.columns == {"x": pa.float64(), "y": pa.float64()}
    rows = by_id(drive(study, module, data, digits.metrics, batch_size=3))
    own = reference_eval(module, [a, b, c], data, digits.metrics)
    assert [(rows[i]["x"], rows[i]["y"]) for i in range(4)] == [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0)]
    check_rel(rows[0], own[0])
    check_rel(rows[1], own[1])
    check_rel(rows[2], own[2])
    check_rel(rows[3], reference_eval(module, [combine(b, [(1.0, diff(c, a))])], data, digits.metrics)[0])

    line = landscape_study(tmp_path, {"center": SEEDS30[0], "directions": [SEEDS30[2]],
                                      "x": {"start": -0.5, "stop": 1.5, "num": 5}})
    assert line.columns == {"x": pa.float64()} and len(line) == 5
    rows = by_id(drive(line, module, data, digits.metrics, batch_size=2))
    xs = [-0.5, 0.0, 0.5, 1.0, 1.5]
    want = reference_eval(module, [combine(a, [(x, diff(c, a))]) for x in xs], data, digits.metrics)
    for i, w in enumerate(want):
        assert rows[i]["x"] == xs[i] and "y" not in rows[i]
        check_rel(rows[i], w)
    check_rel(rows[3], own[2])


def test_landscape_config_errors(tmp_path):
    with pytest.raises(sweep.ConfigError, match="directions"):
        digits_config({"kind": "landscape", "center": SEEDS30[0], "directions": SEEDS30[1:],
                       "x": {"start": 0, "stop": 1, "num": 2}}, tmp_path)
    with pytest.raises(sweep.ConfigError, match="directions"):
        digits_config({"kind": "landscape", "center": SEEDS30[0], "directions": [SEEDS30[1]],
                       "x": {"start": 0, "stop": 1, "num": 2}, "y": {"start": 0, "stop": 1, "num": 2}}, tmp_path)


# =========================================================================== 6. barrier


def test_barrier_on_hand_made_curves():
    alpha = np.linspace(0.0, 1.0, 11)
    loss = 1.0 + 0.5 * np.sin(np.pi * alpha)
    got = barrier(alpha, loss, 1)
    assert got.height == pytest.approx(0.5, abs=1e-12)
    assert got.alpha == pytest.approx(0.5, abs=1e-12)
    assert got.value == pytest.approx(1.5, abs=1e-12) and got.chord == pytest.approx(1.0, abs=1e-12)

    # two segments, endpoint values 1, 2, 0.5; bumps of 0.3 and 0.8 above each segment's chord
    alpha = np.linspace(0.0, 2.0, 21)
    j = np.minimum(np.floor(alpha), 1).astype(int)
    t = alpha - j
    ends = np.array([1.0, 2.0, 0.5])
    chord = (1 - t) * ends[j] + t * ends[j + 1]
    values = chord + np.where(j == 0, 0.3, 0.8) * np.sin(np.pi * t)
    got = barrier(alpha, values, 2)
    assert got.height == pytest.approx(0.8, abs=1e-12) and got.alpha == pytest.approx(1.5, abs=1e-12)
    assert got.chord == pytest.approx(1.25, abs=1e-12)  # (2 + 0.5) / 2
    # higher is better: a dip below the chord is the barrier (dips of 0.2 and 0.1 under each segment)
    acc_ends = np.array([0.9, 0.8, 0.85])
    acc = (1 - t) * acc_ends[j] + t * acc_ends[j + 1] - np.where(j == 0, 0.2, 0.1) * np.sin(np.pi * t)
    got = barrier(alpha, acc, 2, mode="max")
    assert got.height == pytest.approx(0.2, abs=1e-12) and got.alpha == pytest.approx(0.5, abs=1e-12)
    assert got.value == pytest.approx(0.65, abs=1e-12) and got.chord == pytest.approx(0.85, abs=1e-12)
    # as a loss the same curve lies below its chord: no bump above it
    assert barrier(alpha, acc, 2, mode="min").height == pytest.approx(0.0, abs=1e-12)

    # a missing or non-finite endpoint: no barrier
    assert barrier(np.array([0.0, 0.5]), np.array([1.0, 2.0]), 1) is None
    assert barrier(np.array([0.0, 0.5, 1.0]), np.array([1.0, 2.0, np.nan]), 1) is None
    # a NaN inside the path: infinite
    got = barrier(np.array([0.0, 0.25, 0.5, 1.0]), np.array([1.0, 1.1, np.nan, 1.0]), 1)
    assert got.height == math.inf and got.alpha == 0.5
    # extrapolated alphas do not count, however high
    a = np.array([-0.5, 0.0, 0.5, 1.0, 1.5])
    got = barrier(a, np.array([100.0, 1.0, 1.2, 1.0, 100.0]), 1)
    assert got.height == pytest.approx(0.2, abs=1e-12) and got.alpha == 0.5
    # order does not matter
    got = barrier(a[::-1].copy(), np.array([100.0, 1.0, 1.2, 1.0, 100.0])[::-1].copy(), 1)
    assert got.height == pytest.approx(0.2, abs=1e-12) and got.alpha == 0.5
    # a path on its chord: height 0, placed at the smallest alpha whatever the rows' order
    got = barrier(np.array([1.0, 0.5, 0.0, 0.25]), np.array([2.0, 1.5, 1.0, 1.25]), 1)
    assert got.height == 0.0 and got.alpha == 0.0


def hand_barrier(alphas, values, segments, sign):
    at = {float(a): v for a, v in zip(alphas, values)}
    ends = [at[float(j)] for j in range(segments + 1)]
    best = None
    for a, v in sorted(zip(alphas, values), key=lambda p: p[0]):  # equal heights: the smallest alpha
        if a < 0 or a > segments:
            continue
        j = min(int(math.floor(a)), segments - 1)
        t = a - j
        h = sign * (v - ((1 - t) * ends[j] + t * ends[j + 1]))
        if best is None or h > best[0]:
            best = (h, a)
    return best


def test_interpolate_appends_endpoints_and_summarises_barrier(tmp_path):
    alphas = [0.25, 0.5, 1.0, 1.5, 2.5]
    config = digits_config({"kind": "interpolate", "endpoints": SEEDS30, "alphas": alphas}, tmp_path)
    study = plan(config.study, digits_context(tmp_path))
    assert len(study) == 7  # α = 0 and α = 2 appended, α = 1 already there
    module = digits.make_model()
    data = digits.eval_batches()
    study.bind("loss", "min", DIGIT_METRICS)
    assert study.summarise() == {}
    rows = by_id(drive(study, module, data, digits.metrics, batch_size=3))
    assert sorted(rows) == list(range(7))
    got_alphas = [rows[i]["alpha"] for i in range(7)]
    assert got_alphas == alphas + [0.0, 2.0]
    ends = [load(p) for p in SEEDS30]
    own = reference_eval(module, ends, data, digits.metrics)
    check_rel(rows[5], own[0])
    check_rel(rows[2], own[1])
    check_rel(rows[6], own[2])

    summary = study.summarise()
    loss_h, loss_a = hand_barrier(got_alphas, [rows[i]["loss"] for i in range(7)], 2, 1.0)
    acc_h, acc_a = hand_barrier(got_alphas, [rows[i]["accuracy"] for i in range(7)], 2, -1.0)
    assert summary["barrier_loss"] == pytest.approx(loss_h, rel=1e-12, abs=1e-12)
    assert summary["barrier_loss_alpha"] == loss_a
    assert summary["barrier_accuracy"] == pytest.approx(acc_h, rel=1e-12, abs=1e-12)
    assert summary["barrier_accuracy_alpha"] == acc_a
    assert loss_h > 0.1  # independent networks: a real bump


# =========================================================================== 7. alignment


def test_interpolate_weight_matching_keeps_function_and_lowers_midpoint(tmp_path):
    module = digits.make_model(64, depth=3)
    data = digits.eval_batches()
    runs = {}
    for align in ("none", "weight_matching"):
        artifacts = tmp_path / align
        config = digits_config({"kind": "interpolate", "endpoints": DEEP, "alphas": [0.5], "align": align},
                               tmp_path, kwargs={"hidden": 64, "depth": 3})
        study = plan(config.study, digits_context(artifacts, hidden=64, depth=3))
        runs[align] = by_id(drive(study, module, data, digits.metrics))
    saved = tmp_path / "weight_matching" / "aligned" / "01-deep-seed1.safetensors"
    assert saved.is_file()
    assert not (tmp_path / "none" / "aligned").exists()
    aligned = load(str(saved))
    seed1 = load(DEEP[1])
    assert set(aligned) == set(seed1)
    assert any(not torch.equal(aligned[k], seed1[k]) for k in seed1)  # permuted
    got, want = reference_eval(module, [aligned, seed1], data, digits.metrics)
    for name in DIGIT_METRICS:
        assert abs(got[name] - want[name]) <= 1e-5 * max(abs(want[name]), 1e-12), name
    # α = 0.5 is id 0; α = 0 and 1 were appended
    for align in runs:
        assert [runs[align][i]["alpha"] for i in range(3)] == [0.5, 0.0, 1.0]
    check_rel(runs["weight_matching"][2], want)
    assert runs["weight_matching"][0]["loss"] < runs["none"][0]["loss"]


def test_align_study_paths(tmp_path):
    module = digits.make_model(64, depth=3)
    data = digits.eval_batches()
    config = digits_config({"kind": "align", "reference": DEEP[0], "model": DEEP[1],
                            "alphas": {"start": 0, "stop": 1, "num": 5}}, tmp_path, kwargs={"hidden": 64, "depth": 3})
    study = plan(config.study, digits_context(tmp_path, hidden=64, depth=3))
    k = 5
    assert len(study) == 2 * k
    rows = by_id(drive(study, module, data, digits.metrics, batch_size=3, chunk_size=3))
    assert sorted(rows) == list(range(2 * k))
    assert [rows[i]["path"] for i in range(2 * k)] == ["original"] * k + ["aligned"] * k
    assert [rows[i]["alpha"] for i in range(2 * k)] == [0.0, 0.25, 0.5, 0.75, 1.0] * 2
    assert (tmp_path / "aligned" / "deep-seed1.safetensors").is_file()
    # α = 0 is the reference on both paths; α = 1 is the model, permuted or not
    for name in DIGIT_METRICS:
        assert rows[0][name] == rows[k][name]
    own = reference_eval(module, [load(p) for p in DEEP], data, digits.metrics)
    check_rel(rows[0], own[0])
    check_rel(rows[k - 1], own[1])
    check_rel(rows[2 * k - 1], own[1])
    check_rel(rows[2 * k - 1], {n: rows[k - 1][n] for n in DIGIT_METRICS})
    summary = study.summarise()
    assert summary["original_barrier_loss"] > summary["aligned_barrier_loss"] + 0.3, summary
    assert summary["align_similarity_after"] > summary["align_similarity_before"]
    # the summary's barriers are the hand barriers of each path's rows
    for p, ids in (("original", range(k)), ("aligned", range(k, 2 * k))):
        h, a = hand_barrier([rows[i]["alpha"] for i in ids], [rows[i]["loss"] for i in ids], 1, 1.0)
        assert summary[f"{p}_barrier_loss"] == pytest.approx(h, rel=1e-12, abs=1e-12)
        assert summary[f"{p}_barrier_loss_alpha"] == a


# =========================================================================== the batch protocol


@pytest.mark.parametrize("kind", ["merge", "interpolate", "landscape", "align"])
def test_batches_hold_at_most_batch_size_candidates(tmp_path, kind):
    """The Study protocol: `batches(batch_size)` yields batches of at most `batch_size` candidates."""
    kwargs = {}
    if kind == "merge":
        study_cfg = {"kind": "merge", "base": BASE, "models": FINETUNES, "methods": ["task_arithmetic", "greedy_soup"],
                     "lambdas": [0.5, 1.0]}
    elif kind == "interpolate":
        study_cfg = {"kind": "interpolate", "endpoints": SEEDS30, "alphas": [0.25, 0.5, 0.75]}
    elif kind == "landscape":
        study_cfg = {"kind": "landscape", "center": SEEDS30[0], "directions": SEEDS30[1:],
                     "x": {"start": 0, "stop": 1, "num": 3}, "y": {"start": 0, "stop": 1, "num": 2}}
    else:
        study_cfg = {"kind": "align", "reference": DEEP[0], "model": DEEP[1], "alphas": [0.0, 0.5, 1.0]}
        kwargs = {"hidden": 64, "depth": 3}
    config = digits_config(study_cfg, tmp_path, kwargs=kwargs)
    module = digits.make_model(**kwargs)
    for batch_size in (1, 2, 3):
        study = plan(config.study, digits_context(tmp_path, **kwargs))
        study.bind("loss", "min", DIGIT_METRICS)
        ev = Evaluator(module, digits.eval_batches(), digits.metrics, chunk_size=4)
        for key, anchors in study.anchors().items():
            ev.add_anchors(anchors, key)
        sizes, seen = [], []
        for item in study.batches(batch_size):
            if isinstance(item, Wait):
                continue
            sizes.append(len(item))
            seen += list(item.ids)
            study.observe(ev.run_rows(item.source.rows, item.source.key, item.ids))
        ev.restore()
        assert sorted(seen) == list(range(len(study)))
        assert max(sizes) <= batch_size, (kind, batch_size, sizes)


def test_ties_breaks_a_tied_sign_election_towards_plus():
    # Column 0: 3 − 3 sums to zero, and so do the elected signs (+1 for column 1, −1 for column 2):
    # the tie goes to +, so only the positive entry of column 0 is kept.
    tau = torch.tensor([[3.0, 1.0, -2.0], [-3.0, 0.5, -1.0]])
    merged = elect_and_merge(tau)
    assert merged.tolist() == [3.0, 0.75, -1.5]
    assert elect_and_merge(-tau).tolist() == [3.0, -0.75, 1.5]
