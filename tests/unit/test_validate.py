"""Strict candidate validation: every problem named, with expected and received shape/dtype."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sweep
from sweep import check_candidate, evaluate


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 4)
        self.bn = torch.nn.BatchNorm1d(4)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.bn(self.fc(x)))


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(6, 3)
        self.out = torch.nn.Linear(3, 6, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(self.emb(x))


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net()


def params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def only_error(module, cand):
    """The error, checked to be the same one evaluate() puts in the invalid row."""
    err = check_candidate(module, cand)
    rows = evaluate(module, [cand], [(torch.zeros(2, 3), torch.zeros(2))], lambda o, y: {"m": o.mean()}).to_pylist()
    if err is None:
        assert rows[0]["status"] == "ok", rows[0]
    else:
        assert rows[0]["status"] == "invalid"
        assert rows[0]["error"] == err
    return err


def test_valid_candidate_parameters_only(net):
    assert only_error(net, params(net)) is None


def test_valid_candidate_with_buffers(net):
    cand = params(net)
    cand.update({n: b.clone() for n, b in net.named_buffers()})
    assert only_error(net, cand) is None


def test_full_state_dict_is_valid(net):
    assert only_error(net, net.state_dict()) is None


def test_missing_key_names_key_and_expected(net):
    cand = params(net)
    del cand["head.weight"]
    err = only_error(net, cand)
    assert err is not None
    assert "missing" in err and "head.weight" in err
    assert "(2×4)" in err and "float32" in err


def test_empty_dict_is_invalid_naming_every_parameter(net):
    err = only_error(net, {})
    assert err is not None
    for name in ("fc.weight", "fc.bias", "bn.weight", "bn.bias", "head.weight", "head.bias"):
        assert name in err
    assert "running_mean" not in err  # buffers are optional


@pytest.mark.parametrize("typo, meant", [("head.weigth", "head.weight"), ("fc.bais", "fc.bias")])
def test_unexpected_near_miss_gets_did_you_mean(net, typo, meant):
    cand = params(net)
    cand[typo] = cand.pop(meant)
    err = only_error(net, cand)
    assert err is not None
    assert "unexpected" in err and typo in err
    assert f"did you mean '{meant}'" in err


def test_unexpected_near_miss_of_optional_buffer_gets_hint(net):
    cand = params(net)
    cand["bn.running_mea"] = torch.zeros(4)
    err = only_error(net, cand)
    assert err is not None and "bn.running_mea" in err
    assert "did you mean 'bn.running_mean'" in err


def test_unexpected_far_key_has_no_hint(net):
    cand = params(net)
    cand["completely.different"] = torch.zeros(1)
    err = only_error(net, cand)
    assert err is not None and "completely.different" in err and "unexpected" in err
    assert "did you mean" not in err


def test_non_string_key_is_unexpected(net):
    cand = params(net)
    cand[0] = torch.zeros(1)
    err = only_error(net, cand)
    assert err is not None and "unexpected key 0 " in err


def test_wrong_shape_names_expected_and_received(net):
    cand = params(net)
    cand["fc.weight"] = torch.zeros(3, 4)
    err = only_error(net, cand)
    assert err is not None
    assert "fc.weight" in err and "(4×3)" in err and "(3×4)" in err


def test_wrong_dtype_names_expected_and_received(net):
    cand = params(net)
    cand["fc.bias"] = torch.zeros(4, dtype=torch.float64)
    err = only_error(net, cand)
    assert err is not None
    assert "fc.bias" in err and "float32" in err and "float64" in err


def test_integer_tensor_for_float_parameter(net):
    cand = params(net)
    cand["head.bias"] = torch.zeros(2, dtype=torch.int64)
    err = only_error(net, cand)
    assert err is not None and "head.bias" in err and "int64" in err


def test_wrong_buffer_shape_or_dtype(net):
    cand = params(net)
    cand["bn.running_var"] = torch.ones(5)
    cand["bn.num_batches_tracked"] = torch.tensor(1.0)
    err = only_error(net, cand)
    assert err is not None
    assert "bn.running_var" in err and "(5,)" in err and "(4,)" in err
    assert "bn.num_batches_tracked" in err and "int64" in err


def test_meta_device_tensor(net):
    cand = params(net)
    cand["fc.weight"] = torch.empty(4, 3, device="meta")
    err = only_error(net, cand)
    assert err is not None and "fc.weight" in err and "meta" in err


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_parameter(net, bad):
    cand = params(net)
    cand["fc.weight"] = cand["fc.weight"].clone()
    cand["fc.weight"][1, 2] = bad
    err = only_error(net, cand)
    assert err is not None and "fc.weight" in err and "finite" in err


def test_non_finite_buffer(net):
    cand = params(net)
    cand["bn.running_mean"] = torch.tensor([0.0, float("nan"), 0.0, 0.0])
    err = only_error(net, cand)
    assert err is not None and "bn.running_mean" in err and "NaN" in err


@pytest.mark.parametrize(
    "value, kind",
    [
        (np.zeros((4, 3), dtype=np.float32), "ndarray"),
        ([[0.0] * 3] * 4, "list"),
        (1.5, "float"),
        (None, "NoneType"),
    ],
)
def test_non_tensor_value(net, value, kind):
    cand = params(net)
    cand["fc.weight"] = value
    err = only_error(net, cand)
    assert err is not None and "fc.weight" in err and kind in err and "tensor" in err


@pytest.mark.parametrize("cand", [[("fc.weight", torch.zeros(4, 3))], torch.zeros(3), None, "fc.weight", 42])
def test_non_mapping_candidate(net, cand):
    err = only_error(net, cand)
    assert err is not None and "mapping" in err


def test_sparse_tensor(net):
    cand = params(net)
    cand["fc.weight"] = cand["fc.weight"].to_sparse()
    err = only_error(net, cand)
    assert err is not None and "fc.weight" in err and "sparse" in err


def test_all_problems_in_one_message(net):
    cand = params(net)
    del cand["fc.bias"]
    cand["fc.weight"] = torch.zeros(2, 2)
    cand["head.bias"] = torch.zeros(2, dtype=torch.float16)
    cand["bn.weight"] = torch.full((4,), float("inf"))
    cand["head.wieght"] = cand.pop("head.weight")
    err = only_error(net, cand)
    assert err is not None
    for piece in ("fc.bias", "fc.weight", "(2×2)", "head.bias", "float16", "bn.weight", "finite",
                  "head.wieght", "did you mean 'head.weight'"):
        assert piece in err, piece


def test_validation_does_not_mutate_or_replace_caller_tensors(net):
    cand = params(net)
    cand["fc.weight"] = cand["fc.weight"].clone()
    cand["fc.weight"][0, 0] = float("nan")
    saved = {k: v.clone() for k, v in cand.items()}
    ids = {k: id(v) for k, v in cand.items()}
    assert check_candidate(net, cand) is not None
    assert {k: id(v) for k, v in cand.items()} == ids
    for k in saved:
        torch.testing.assert_close(cand[k], saved[k], rtol=0, atol=0, equal_nan=True)


# --------------------------------------------------------------------------- tied weights


def test_tied_one_name_either_way_is_valid():
    m = Tied()
    w = torch.randn(6, 3)
    assert check_candidate(m, {"emb.weight": w}) is None
    assert check_candidate(m, {"out.weight": w}) is None


def test_tied_both_names_equal_values_valid():
    m = Tied()
    w = torch.randn(6, 3)
    assert check_candidate(m, {"emb.weight": w, "out.weight": w.clone()}) is None
    assert check_candidate(m, {"emb.weight": w, "out.weight": w}) is None


def test_tied_both_names_different_values_invalid():
    m = Tied()
    w = torch.randn(6, 3)
    err = check_candidate(m, {"emb.weight": w, "out.weight": w + 1e-3})
    assert err is not None
    assert "emb.weight" in err and "out.weight" in err and "tied" in err


def test_tied_neither_name_is_missing():
    err = check_candidate(Tied(), {})
    assert err is not None and "missing" in err and "emb.weight" in err


def test_tied_wrong_shape_on_alias_reported():
    err = check_candidate(Tied(), {"out.weight": torch.zeros(3, 6)})
    assert err is not None and "out.weight" in err and "(6×3)" in err and "(3×6)" in err


def test_invalid_reason_passthrough():
    rows = evaluate(
        torch.nn.Linear(3, 1), [sweep.Invalid("could not read x.safetensors")],
        [(torch.zeros(1, 3), torch.zeros(1))], lambda o, y: {"m": o.mean()},
    ).to_pylist()
    assert rows[0]["status"] == "invalid" and rows[0]["error"] == "could not read x.safetensors"
