"""Weight matching (Git Re-Basin, Algorithm 2): permuted models compute the same
function, a permuted copy is recovered exactly, and aligned endpoints interpolate better."""

from __future__ import annotations

from typing import Dict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from sweep.align import AlignError, align, apply_permutation, permutation_spec, weight_matching
from sweep.examples.digits import eval_batches, make_model, train
from sweep.examples.models import SmallCNN, cnn, gpt


class FlatCNN(nn.Module):
    """Conv → BN → ReLU → Conv → ReLU → Flatten → Linear → ReLU → Linear: the first Linear sees C·H·W inputs."""

    def __init__(self, size: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6 * size * size, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return self.head(F.relu(self.fc(torch.flatten(x, 1))))


def digits_x() -> torch.Tensor:
    return eval_batches()[0][0]


def images(size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(32, 3, size, size, generator=torch.Generator().manual_seed(seed))


def with_running_stats(model: nn.Module, size: int, seed: int) -> nn.Module:
    """Train-mode forwards on shifted, scaled images give BN running stats far from 0 and 1."""
    torch.manual_seed(seed)
    model.train()
    with torch.no_grad():
        for i in range(3):
            model(images(size, seed + i) * 2.0 + 0.5)
    return model.eval()


def random_perms(state, seed: int) -> Dict[str, torch.Tensor]:
    spec = permutation_spec(state)
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randperm(n, generator=g) for name, n in spec.sizes(state).items()}


def outputs(model: nn.Module, state, x) -> torch.Tensor:
    with torch.no_grad():
        return functional_call(model, dict(state), (x,))


def mlp_cases():
    torch.manual_seed(0)
    return [
        ("random depth 1", make_model(64, 1), digits_x()),
        ("random depth 3", make_model(32, 3), digits_x()),
        ("trained", train(2, 5, 64), digits_x()),
    ]


def cnn_cases():
    torch.manual_seed(0)
    return [
        ("SmallCNN", with_running_stats(cnn(8), 8, 1), images(8, 9)),
        ("FlatCNN", with_running_stats(FlatCNN(5), 5, 2), images(5, 9)),
    ]


def test_spec_of_a_hand_built_mlp():
    net = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.ReLU(), nn.Linear(4, 3, bias=False),
                        nn.BatchNorm1d(3), nn.Linear(3, 2))
    state = net.state_dict()
    spec = permutation_spec(state)
    assert spec.groups == ["P_0", "P_1"]
    assert spec.axes == {
        "0.weight": ["P_0", None], "0.bias": ["P_0"],
        "1.weight": ["P_0"], "1.bias": ["P_0"],
        "3.weight": ["P_1", "P_0"],
        "4.weight": ["P_1"], "4.bias": ["P_1"], "4.running_mean": ["P_1"], "4.running_var": ["P_1"],
        "4.num_batches_tracked": [],
        "5.weight": [None, "P_1"], "5.bias": [None],
    }
    assert spec.blocks == {}
    assert spec.sizes(state) == {"P_0": 4, "P_1": 3}


def test_spec_of_cnns():
    small = permutation_spec(SmallCNN(8).state_dict())
    assert small.axes["conv2.weight"] == ["P_1", "P_0", None, None]
    assert small.axes["bn2.running_var"] == ["P_1"]
    assert small.axes["head.weight"] == [None, "P_1"]
    assert small.blocks == {}  # global pooling: one input per channel
    flat = permutation_spec(FlatCNN(5).state_dict())
    assert flat.groups == ["P_0", "P_1", "P_2"]
    assert flat.axes["fc.weight"] == ["P_2", "P_1"]
    assert flat.blocks == {("fc.weight", 1): 25}


@pytest.mark.parametrize("case", range(5))
def test_permuting_keeps_the_function(case):
    name, model, x = (mlp_cases() + cnn_cases())[case]
    state = model.state_dict()
    want = outputs(model, state, x)
    spec = permutation_spec(state)
    torch.manual_seed(100 + case)
    other = make_like(model, case).state_dict()
    found = weight_matching(spec, state, other)
    for perms in (random_perms(state, case), found):
        assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values()), name
        moved = apply_permutation(spec, perms, state)
        assert any(not torch.equal(moved[k], state[k]) for k in state), name
        torch.testing.assert_close(outputs(model, moved, x), want, atol=1e-5, rtol=1e-5, msg=name)


def make_like(model: nn.Module, case: int) -> nn.Module:
    """A fresh model of `model`'s architecture (a second endpoint to match against)."""
    fresh = [lambda: make_model(64, 1), lambda: make_model(32, 3), lambda: train(3, 5, 64),
             lambda: with_running_stats(cnn(8), 8, 5), lambda: with_running_stats(FlatCNN(5), 5, 6)][case]()
    assert fresh.state_dict().keys() == model.state_dict().keys()
    return fresh


@pytest.mark.parametrize("case", range(5))
def test_a_permuted_copy_is_recovered_exactly(case):
    name, model, _ = (mlp_cases() + cnn_cases())[case]
    reference = model.state_dict()
    other = apply_permutation(permutation_spec(reference), random_perms(reference, 10 + case), reference)
    aligned, info = align(reference, other)
    assert aligned.keys() == reference.keys()
    for k, v in reference.items():
        assert torch.equal(aligned[k], v), (name, k)
    self_similarity = sum(float((v.double() ** 2).sum()) for v in reference.values()
                          if v.is_floating_point() and v.dim() >= 1)
    assert info.similarity_after == self_similarity
    assert info.similarity_before < self_similarity
    assert info.groups == len(permutation_spec(reference).groups)
    assert 1 <= info.iterations <= 100


def test_matching_raises_the_similarity_of_trained_models():
    a, b = train(0, 5, 64).state_dict(), train(1, 5, 64).state_dict()
    aligned, info = align(a, b)
    assert info.similarity_after > info.similarity_before + 10.0
    # The reported numbers are Σ⟨W_a, W_b⟩ over the floating tensors.
    dot = lambda x, y: sum(float((x[k].double() * y[k].double()).sum()) for k in x)  # noqa: E731
    assert info.similarity_before == pytest.approx(dot(a, b), rel=1e-12)
    assert info.similarity_after == pytest.approx(dot(a, aligned), rel=1e-12)


@pytest.mark.parametrize("case", range(5))
def test_matching_never_lowers_the_similarity(case):
    name, model, _ = (mlp_cases() + cnn_cases())[case]
    torch.manual_seed(200 + case)
    _, info = align(model.state_dict(), make_like(model, case).state_dict(), seed=case)
    assert info.similarity_after >= info.similarity_before, name


def test_alignment_lowers_the_midpoint_loss():
    a, b = train(0, 5, 64).state_dict(), train(1, 5, 64).state_dict()
    aligned, _ = align(a, b)
    model = make_model(64)
    x, y = eval_batches()[0]

    def loss(state):
        with torch.no_grad():
            return float(F.cross_entropy(functional_call(model, state, (x,)), y))

    def midpoint(p, q):
        return loss({k: (p[k] + q[k]) / 2 for k in p})

    before, after = midpoint(a, b), midpoint(a, aligned)
    assert after < before - 0.05, (before, after)
    # Aligning changes b's parameters, not its function.
    assert loss(aligned) == pytest.approx(loss(b), abs=1e-6)


def test_same_seed_same_permutations():
    torch.manual_seed(0)
    a, b = make_model(32, 3).state_dict(), make_model(32, 3).state_dict()
    spec = permutation_spec(a)
    first = weight_matching(spec, a, b, seed=7)
    again = weight_matching(spec, a, b, seed=7)
    assert first.keys() == again.keys() == {"P_0", "P_1", "P_2"}
    for g in first:
        assert first[g].dtype == torch.long
        assert torch.equal(first[g], again[g]), g


def test_inputs_are_not_modified():
    a, b = train(0, 5, 64).state_dict(), train(1, 5, 64).state_dict()
    copies = {k: v.clone() for k, v in b.items()}
    aligned, _ = align(a, b)
    for k, v in copies.items():
        assert torch.equal(b[k], v), k
        assert aligned[k].data_ptr() != b[k].data_ptr(), k


def test_gpt_is_not_plain():
    with pytest.raises(AlignError, match="'pos.weight'"):
        permutation_spec(gpt().state_dict())
    with pytest.raises(AlignError, match="'pos.weight'"):
        align(gpt().state_dict(), gpt().state_dict())


def test_mismatched_shapes_name_the_key():
    a = make_model(64).state_dict()
    b = make_model(32).state_dict()
    with pytest.raises(AlignError, match=r"'0\.weight'.*\(64, 64\).*\(32, 64\)"):
        align(a, b)
    spec = permutation_spec(a)
    with pytest.raises(AlignError, match=r"'0\.weight'"):
        weight_matching(spec, a, b)
    missing = {k: v for k, v in a.items() if k != "2.bias"}
    with pytest.raises(AlignError, match=r"'2\.bias'.*missing"):
        align(a, missing)


def test_non_plain_shapes_name_the_key():
    with pytest.raises(AlignError, match="at least 2 layers"):
        permutation_spec(nn.Linear(3, 2).state_dict())
    bad_bias = {"a.weight": torch.zeros(4, 3), "a.bias": torch.zeros(5), "b.weight": torch.zeros(2, 4)}
    with pytest.raises(AlignError, match="'a.bias'"):
        permutation_spec(bad_bias)
    # A linear taking twice a linear's outputs is not a flatten of conv channels.
    bad_in = {"a.weight": torch.zeros(4, 3), "b.weight": torch.zeros(2, 8)}
    with pytest.raises(AlignError, match="'b.weight'"):
        permutation_spec(bad_in)
    shared = torch.zeros(4, 4)
    with pytest.raises(AlignError, match="'b.weight'.*tied"):
        permutation_spec({"a.weight": shared, "b.weight": shared, "c.weight": torch.zeros(2, 4)})


def test_biases_and_norm_stats_count_in_the_cost():
    # With every weight zero, only the 1-D tensors tell the units apart.
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))
    g = torch.Generator().manual_seed(0)
    reference = {k: (torch.randn(v.shape, generator=g) if v.dim() == 1 and v.is_floating_point() else v * 0)
                 for k, v in net.state_dict().items()}
    reference["1.running_var"] = reference["1.running_var"].abs() + 0.5
    other = apply_permutation(permutation_spec(reference), random_perms(reference, 1), reference)
    aligned, _ = align(reference, other)
    for k, v in reference.items():
        assert torch.equal(aligned[k], v), k
