"""The shared noise table (`sweep.noise`): `Noise` candidates and DARE masks read it, per the documented contract.

The reference is `noise_by_contract` (tests/unit/conftest.py): the table made
here from its documented seed, offsets from a plain-Python SplitMix64, one
piece at a time. Metrics are checked against the independent
`functional_call` loop.
"""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import sweep
from sweep import noise
from sweep.evaluator import Evaluator
from sweep.examples import models
from sweep.recipes import Merge, MergeRows, NoiseRows, dare, dare_keep, elect_and_merge
from sweep.studies import plan
from sweep.studies import perturb as pert

from conftest import noise_by_contract, noise_table, reference_eval  # noqa: E402 - the independent references

REPO = Path(__file__).resolve().parents[2]
SEEDS = [0, 1, 2, 5, 2**32 + 7, 2**40 + 3, 2**63 - 1, 123_456_789]


def tiny():
    torch.manual_seed(0)
    module = models.mlp(widths=[32, 16, 1])
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(64, 32, generator=g), torch.randn(64, 1, generator=g)) for _ in range(2)]
    return module, data


def mse(out, y):
    return {"mse": ((out - y) ** 2).mean(), "l1": (out - y).abs().mean()}


def check_rel(got, want, tol=1e-5):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g["status"] == "ok", g["error"]
        for name, value in w.items():
            assert abs(g[name] - value) <= tol * max(abs(value), 1e-12), (g["seed"], name, g[name], value)


# --------------------------------------------------------------------------- the table and ε


def test_table_is_the_documented_block_of_normals():
    table = noise.table()
    assert table.dtype == torch.float32 and table.shape == (noise.TABLE_SIZE,) and table.device.type == "cpu"
    assert noise.TABLE_SIZE * 4 == 128 * 2**20
    assert torch.equal(table, noise_table())
    assert noise.table() is table, "made once per process and device"
    assert bool(torch.isfinite(table).all())
    assert noise.largest() == float(table.abs().max())


def test_table_moments_are_standard_normal():
    n = noise.TABLE_SIZE
    sums = torch.zeros(4, dtype=torch.float64)  # Σx, Σx², Σx³, Σx⁴, in blocks (no 256 MB float64 copy)
    over = torch.zeros(2, dtype=torch.float64)  # how many |x| > 2 and |x| > 3
    for part in noise.table().split(2**22):
        x = part.double()
        sums += torch.stack([x.sum(), (x**2).sum(), (x**3).sum(), (x**4).sum()])
        over += torch.stack([(x.abs() > 2.0).sum(), (x.abs() > 3.0).sum()]).double()
    m1, m2, m3, m4 = (float(v) / n for v in sums)
    var = m2 - m1**2
    # standard errors of the sample moments of N(0, 1): 1/√n, √(2/n), √(15/n) for E x³, √(96/n) for E x⁴
    assert abs(m1) < 5 / math.sqrt(n)
    assert abs(var - 1) < 5 * math.sqrt(2 / n)
    assert abs(m3) < 5 * math.sqrt(15 / n)
    assert abs(m4 - 3) < 5 * math.sqrt(96 / n)
    # tails: P(|x| > 2) and P(|x| > 3) of a normal
    for count, p in zip(over.tolist(), (0.0455003, 0.0026998)):
        assert abs(count / n - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_epsilon_is_the_documented_slice_for_every_seed():
    size = 545  # the tiny MLP 32-16-1
    got = noise.epsilon(SEEDS, size)
    assert got.shape == (len(SEEDS), size) and got.dtype == torch.float32
    for row, seed in zip(got, SEEDS):
        assert torch.equal(row, noise_by_contract(seed, size)), seed
    # a seed is a 64-bit word: the int64 view of a uint64 seed reads the same noise
    assert torch.equal(noise.epsilon(np.array([2**64 - 5], np.uint64), 9)[0],
                       noise.epsilon(np.array([-5], np.int64), 9)[0])
    assert noise.epsilon([], 5).shape == (0, 5) and noise.epsilon([3], 0).shape == (1, 0)
    with pytest.raises(ValueError, match="seeds must be a 1-D sequence of integers"):
        noise.epsilon([0.5], 3)


def test_epsilon_pieces_of_small_sizes():
    # one value: one piece, from the first half; two values: one from each half
    assert noise.pieces(1) == [(0, 1)] and noise.pieces(2) == [(0, 1), (1, 2)]
    assert noise.pieces(545) == [(0, 272), (272, 545)]
    half = noise.table()[noise.HALF:]
    for size in (1, 2, 3):
        row = noise.epsilon([77], size)[0]
        assert torch.equal(row, noise_by_contract(77, size))
    (_, _, o0), (_, _, o1) = noise.offsets([77], 545)
    row = noise.epsilon([77], 545)[0]
    assert torch.equal(row[:272], noise.table()[int(o0[0]): int(o0[0]) + 272])
    assert torch.equal(row[272:], half[int(o1[0]): int(o1[0]) + 273])


def test_epsilon_of_a_model_larger_than_two_segments():
    size = 2 * noise.SEGMENT + 10  # three pieces: H0, H1, H0 again
    assert len(noise.pieces(size)) == 3
    got = noise.epsilon([4], size)[0]
    assert torch.equal(got, noise_by_contract(4, size))


def test_epsilon_in_many_pieces_and_into_out(monkeypatch):
    monkeypatch.setattr(noise, "SEGMENT", 300)
    seeds = list(range(40, 47))
    assert len(noise.pieces(1000)) == 4
    got = noise.epsilon(seeds, 1000)
    for row, seed in zip(got, seeds):
        assert torch.equal(row, noise_by_contract(seed, 1000))
    out = torch.full((7, 1000), float("nan"))
    assert noise.epsilon(seeds, 1000, out=out) is out
    assert torch.equal(out, got)
    with pytest.raises(ValueError, match=r"out must be a float32 tensor of shape \(7, 1000\)"):
        noise.epsilon(seeds, 1000, out=torch.empty(7, 999))


def test_different_seeds_different_noise_and_no_correlation():
    seeds = np.arange(10_000, 10_400, dtype=np.int64)
    eps = noise.epsilon(seeds, 545).double()
    assert len({hashlib.sha1(r.numpy().tobytes()).hexdigest() for r in eps}) == len(seeds)
    n = eps.numel()
    assert abs(float(eps.mean())) < 5 / math.sqrt(n)
    assert abs(float(eps.var()) - 1) < 5 * math.sqrt(2 / n)
    # entry by entry, two candidates are uncorrelated
    corr = torch.corrcoef(eps)
    off = corr[~torch.eye(len(seeds), dtype=torch.bool)]
    assert float(off.abs().max()) < 6 / math.sqrt(545)
    assert abs(float(off.mean())) < 0.01


def test_epsilon_is_the_same_in_another_process_with_other_threads():
    code = ("import sys, hashlib, torch; torch.set_num_threads(1); from sweep import noise; "
            "e = noise.epsilon([0, 7, 2**40 + 3], 545); "
            "print(hashlib.sha256(e.numpy().tobytes()).hexdigest())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    here = hashlib.sha256(noise.epsilon([0, 7, 2**40 + 3], 545).numpy().tobytes()).hexdigest()
    assert proc.stdout.strip() == here


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_table_and_epsilon_equal_the_cpu_ones():
    device = torch.device("cuda")
    assert torch.equal(noise.table(device).cpu(), noise.table())
    got = noise.epsilon(SEEDS, 545, device)
    assert got.device.type == "cuda"
    assert torch.equal(got.cpu(), noise.epsilon(SEEDS, 545))
    keep = dare_keep([3, 4], [0.3, 0.9], (2, 500), device)
    assert torch.equal(keep.cpu(), dare_keep([3, 4], [0.3, 0.9], (2, 500)))


# --------------------------------------------------------------------------- Noise through the engine


def test_public_epsilon_rebuilds_what_the_engine_evaluated():
    module, data = tiny()
    base = {n: p.detach() + 0.1 for n, p in module.named_parameters()}
    seeds = [11, 12, 2**50 + 1, 11, 0]
    sigma = 0.3
    table = sweep.evaluate(module, sweep.Noise(base, sigma, seeds), data, mse, chunk_size=2).to_pylist()
    rebuilt = []
    for seed in seeds:
        eps = sweep.Noise.epsilon(seed, like=module)
        assert list(eps) == [n for n, _ in module.named_parameters()]
        flat = torch.cat([e.reshape(-1) for e in eps.values()])
        assert torch.equal(flat, noise_by_contract(seed, flat.numel()))
        rebuilt.append({n: base[n] + sigma * eps[n] for n in base})
    check_rel(table, reference_eval(module, rebuilt, data, mse))
    assert [r["seed"] for r in table] == seeds
    assert table[0]["mse"] == table[3]["mse"] and table[0]["mse"] != table[1]["mse"]
    # a mapping in named_parameters() order gives the same ε; other arguments are refused
    same = sweep.Noise.epsilon(12, like=dict(module.named_parameters()))
    assert all(torch.equal(same[n], sweep.Noise.epsilon(12, like=module)[n]) for n in same)
    with pytest.raises(TypeError, match="like must be a module or a mapping"):
        sweep.Noise.epsilon(1, like=[1, 2])
    with pytest.raises(ValueError, match=r"seed must lie in \[0, 2\*\*63 − 1\], got -1"):
        sweep.Noise.epsilon(-1, like=module)


def test_noise_rows_at_any_chunk_size_and_bound_holds():
    module, data = tiny()
    seeds = np.arange(300, 337, dtype=np.int64)
    ev = Evaluator(module, data, mse, chunk_size=8)
    key = ev.add_anchors({"base": None})
    prepared = ev._anchors[key]
    rows = NoiseRows(seeds, 2.5)
    whole = rows.materialise(prepared, torch.device("cpu")).clone()
    parts = torch.cat([rows.slice(a, b).materialise(prepared, torch.device("cpu")).clone()
                       for a, b in ((0, 1), (1, 9), (9, 37))])
    assert torch.equal(whole, parts)
    own = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    want = torch.stack([own + 2.5 * noise_by_contract(int(s), own.numel()) for s in seeds])
    torch.testing.assert_close(whole, want, rtol=1e-6, atol=1e-6)
    bound = rows.bound(prepared, torch.device("cpu"))
    assert bound.shape == (len(seeds),) and bound.dtype == torch.float64
    assert bool((whole.abs().amax(dim=1).double() <= bound).all())
    tables = [ev.run_rows(rows, key).to_pylist()] + [
        Evaluator(module, data, mse, chunk_size=c).run(sweep.Noise(None, 2.5, seeds)).to_pylist() for c in (1, 5, None)]
    for t in tables[1:]:
        for a, b in zip(tables[0], t):
            assert b["status"] == "ok" and abs(a["mse"] - b["mse"]) <= 1e-6 * abs(a["mse"])


def test_noise_rows_that_are_not_finite_are_marked_invalid():
    module, data = tiny()
    base = {n: p.detach().clone() for n, p in module.named_parameters()}
    base["0.bias"] = base["0.bias"].clone()
    base["0.bias"][3] = float("inf")
    table = sweep.evaluate(module, sweep.Noise(base, 0.1, [1, 2]), data, mse, chunk_size=2).to_pylist()
    assert [r["status"] for r in table] == ["invalid", "invalid"]
    assert all("not finite" in r["error"] and "0.bias" in r["error"] for r in table)
    # a finite base, but sigma so large that base + sigma·ε overflows float32 in some entries
    table = sweep.evaluate(module, sweep.Noise(None, 3e38, [1, 2, 3]), data, mse, chunk_size=3).to_pylist()
    assert all(r["status"] == "invalid" and "not finite" in r["error"] for r in table)
    # and the bound lets a normal chunk through without a finite check's false alarms
    table = sweep.evaluate(module, sweep.Noise(None, 1e30, [1, 2]), data, mse, chunk_size=2).to_pylist()
    assert [r["status"] for r in table] == ["ok", "ok"]


# --------------------------------------------------------------------------- the perturb study


def test_perturb_study_rows_equal_the_contract():
    study = plan(pert.Config.model_validate({"kind": "perturb", "sigma": 0.02, "count": 9, "seed": 4}))
    assert isinstance(study, pert.Perturb)
    module, data = tiny()
    ev = Evaluator(module, data, mse, chunk_size=4)
    for key, anchors in study.anchors().items():
        ev.add_anchors(anchors, key)
    rows = []
    for batch in study.batches(4):
        rows += ev.run_rows(batch.source.rows, batch.source.key, ids=batch.ids).to_pylist()
    seeds = [4 * 2**32 + k for k in range(9)]
    assert [r["seed"] for r in rows] == seeds + [None]  # the unperturbed base last
    assert [r["candidate_id"] for r in rows] == list(range(10))
    own = {n: p.detach().clone() for n, p in module.named_parameters()}
    sizes = [t.numel() for t in own.values()]
    want = []
    for s in seeds:
        eps = torch.split(noise_by_contract(s, sum(sizes)), sizes)
        want.append({n: own[n] + 0.02 * e.reshape(own[n].shape) for n, e in zip(own, eps)})
    check_rel(rows, reference_eval(module, want + [own], data, mse))


# --------------------------------------------------------------------------- DARE masks


def phi(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.erfc(-x.double() / math.sqrt(2.0))


def test_dare_masks_are_the_normal_cdf_of_the_seeds_noise():
    shape = (3, 4000)
    seeds, densities = [5, 6, 5, 2**62], [0.1, 0.5, 0.9, 1.0]
    keep = dare_keep(seeds, densities, shape)
    assert keep.shape == (4,) + shape and keep.dtype == torch.bool
    for r, (seed, d) in enumerate(zip(seeds, densities)):
        want = phi(noise_by_contract(seed, 3 * 4000)).reshape(shape) < d
        assert int((keep[r] != want).sum()) <= 1, "Φ(ε) < density, up to the float32 rounding of the threshold"
        frac = float(keep[r].double().mean())
        assert abs(frac - d) <= 5 * math.sqrt(d * (1 - d) / keep[r].numel()) + 1e-12
    assert bool(keep[3].all())  # density 1 keeps everything
    assert noise.keep_threshold(0.5) == 0.0 and noise.keep_threshold(1.0) == math.inf
    assert noise.keep_threshold(0.975) == pytest.approx(1.959964, abs=1e-6)
    with pytest.raises(ValueError, match=r"density must lie in \(0, 1\], got 0.0"):
        noise.keep_threshold(0.0)


def test_merge_rows_dare_equal_a_hand_merge_from_the_contract():
    g = torch.Generator().manual_seed(3)
    n, p = 3, 700
    base = {"w": torch.randn(p, generator=g)}
    models_ = [{"w": base["w"] + torch.randn(p, generator=g)} for _ in range(n)]
    taus = torch.stack([m["w"] - base["w"] for m in models_])
    seeds, densities = [7, 8, 7, 9], [0.3, 0.6, 0.3, 0.8]
    lambdas = np.array([[1.0, 0.5, -0.2], [0.3, 0.3, 0.3], [2.0, 0.0, 1.0], [-1.0, 1.0, 0.5]])
    module = torch.nn.Module()
    module.w = torch.nn.Parameter(torch.zeros(p))
    ev = Evaluator(module, [(torch.zeros(1), torch.zeros(1))], lambda out, y: {"x": torch.zeros(())}, chunk_size=4)

    def made(recipe):
        key = ev.add_anchors(recipe.anchors())
        return recipe.rows().materialise(ev._anchors[key], torch.device("cpu"))

    def masks(seed, d):
        return phi(noise_by_contract(seed, n * p)).reshape(n, p) < d

    got = made(Merge(base, models_, "dare", lambdas, densities, seeds))
    for r in range(4):
        keep = masks(seeds[r], densities[r])
        hand = base["w"].double() + sum(lambdas[r, i] * torch.where(keep[i], taus[i].double() / densities[r], 0.0)
                                        for i in range(n))
        torch.testing.assert_close(got[r].double(), hand, rtol=1e-5, atol=1e-5)
        assert torch.equal(dare(taus, densities[r], seeds[r]) != 0, keep & (taus != 0))
    assert not torch.equal(masks(7, 0.3), masks(8, 0.3)), "other seeds, other masks"

    lam = np.array([0.7, 1.0, -0.5, 2.0])
    got = made(Merge(base, models_, "dare_ties", lam, densities, seeds))
    for r in range(4):
        keep = masks(seeds[r], densities[r])
        dropped = torch.where(keep, taus / densities[r], torch.zeros(()))
        # TIES by hand: the elected sign of the sum, the mean of the agreeing nonzero entries
        sign = torch.sign(dropped.sum(0))
        maj = torch.sign(sign.sum()) or torch.tensor(1.0)
        sign = torch.where(sign == 0, maj, sign)
        agree = (torch.sign(dropped) == sign) & (dropped != 0)
        merged = (dropped * agree).sum(0) / agree.sum(0).clamp(min=1)
        torch.testing.assert_close(got[r], base["w"] + lam[r] * merged, rtol=1e-5, atol=1e-5)

    # many rows in blocks of rows give the same rows as one at a time
    many = MergeRows("dare", np.linspace(-1, 1, 11), np.full(11, 0.4), np.arange(11, dtype=np.int64))
    key = ev.add_anchors(Merge(base, models_, "dare", [1.0], [0.4], [0]).anchors())
    prepared = ev._anchors[key]
    whole = many.materialise(prepared, torch.device("cpu")).clone()
    ones = torch.cat([many.slice(i, i + 1).materialise(prepared, torch.device("cpu")).clone() for i in range(11)])
    torch.testing.assert_close(whole, ones, rtol=1e-6, atol=1e-6)


def test_batched_elect_and_merge_is_row_by_row():
    g = torch.Generator().manual_seed(8)
    tau = torch.randn(5, 3, 40, generator=g)
    tau[1, :, :10] = 0.0  # zero sums: the majority decides
    tau[2] = torch.sign(tau[2])
    batched = elect_and_merge(tau)
    assert batched.shape == (5, 40)
    for r in range(5):
        assert torch.equal(batched[r], elect_and_merge(tau[r]))
