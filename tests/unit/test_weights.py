"""Weights files are untrusted: safetensors and weights_only torch files only, no code ever runs."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct

import pytest
import torch
from safetensors.torch import save as st_save

import sweep
from sweep import WeightsError
from sweep.model import load_weights, read_weights_file


def sample_tensors():
    gen = torch.Generator().manual_seed(0)
    return {
        "layer.weight": torch.randn(4, 3, generator=gen),
        "layer.bias": torch.randn(4, generator=gen),
        "half": torch.randn(2, 2, generator=gen).to(torch.float16),
        "bf": torch.randn(3, generator=gen).to(torch.bfloat16),
        "steps": torch.tensor(7, dtype=torch.int64),
        "mask": torch.tensor([True, False]),
    }


def assert_same(got, want):
    assert set(got) == set(want)
    for k, v in want.items():
        assert isinstance(got[k], torch.Tensor), k
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(got[k], v), k


def torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_weights_error_is_a_sweep_error():
    assert issubclass(WeightsError, sweep.SweepError)


# --------------------------------------------------------------------------- round trips


def test_safetensors_round_trip_bytes_and_file(tmp_path):
    tensors = sample_tensors()
    data = st_save(tensors)
    assert_same(load_weights(data, "model.safetensors"), tensors)
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    assert_same(read_weights_file(path), tensors)
    assert_same(read_weights_file(str(path)), tensors)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".PT"])
def test_torch_round_trip(tmp_path, suffix):
    tensors = sample_tensors()
    data = torch_bytes(tensors)
    assert_same(load_weights(data, f"model{suffix}"), tensors)
    path = tmp_path / f"model{suffix}"
    path.write_bytes(data)
    assert_same(read_weights_file(path), tensors)


def test_torch_state_dict_of_a_module_round_trips():
    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    want = module.state_dict()
    assert_same(load_weights(torch_bytes(want), "ckpt.pt"), dict(want))


def test_torch_checkpoint_wrapping_state_dict_is_unwrapped():
    tensors = sample_tensors()
    got = load_weights(torch_bytes({"state_dict": tensors, "epoch": 3}), "ckpt.pt")
    assert_same(got, tensors)


def test_loaded_weights_evaluate_like_the_module():
    module = torch.nn.Linear(3, 2)
    for data, name in ((st_save(dict(module.state_dict())), "a.safetensors"),
                       (torch_bytes(module.state_dict()), "a.pt")):
        cand = load_weights(data, name)
        assert sweep.check_candidate(module, cand) is None


# --------------------------------------------------------------------------- broken safetensors


def test_truncated_safetensors(tmp_path):
    data = st_save(sample_tensors())
    with pytest.raises(WeightsError, match="truncated"):
        load_weights(data[: len(data) - 5], "cut.safetensors")
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="cut.safetensors"):
        read_weights_file(path)


@pytest.mark.parametrize("cut", [0, 3, 7])
def test_safetensors_shorter_than_header_length(cut):
    data = st_save(sample_tensors())
    with pytest.raises(WeightsError):
        load_weights(data[:cut], "tiny.safetensors")


@pytest.mark.parametrize("claimed", [2**63, 2**40, 100_000_001])
def test_safetensors_header_claiming_huge_length(claimed):
    data = struct.pack("<Q", claimed) + b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}' + b"\0" * 4
    with pytest.raises(WeightsError, match="header"):
        load_weights(data, "huge.safetensors")


def test_safetensors_header_longer_than_file():
    header = b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    data = struct.pack("<Q", len(header) + 1000) + header + b"\0" * 4
    with pytest.raises(WeightsError, match="truncated"):
        load_weights(data, "short.safetensors")


def test_safetensors_tensor_offsets_past_end():
    header = json.dumps({"a": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
    data = struct.pack("<Q", len(header)) + header + b"\0" * 8
    with pytest.raises(WeightsError):
        load_weights(data, "short.safetensors")


@pytest.mark.parametrize(
    "data",
    [
        b"hello, this is a text file and not safetensors at all" * 3,
        struct.pack("<Q", 12) + b"not json!!!!" + b"\0" * 16,
        struct.pack("<Q", 2) + b"[]",
        struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc",
        # shape and data length disagree
        (lambda h: struct.pack("<Q", len(h)) + h + b"\0" * 8)(
            json.dumps({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode()
        ),
        # unknown dtype
        (lambda h: struct.pack("<Q", len(h)) + h + b"\0" * 4)(
            json.dumps({"a": {"dtype": "NOPE", "shape": [1], "data_offsets": [0, 4]}}).encode()
        ),
    ],
    ids=["text", "header-not-json", "header-not-object", "header-not-utf8", "shape-mismatch", "bad-dtype"],
)
def test_not_a_safetensors_file(data):
    with pytest.raises(WeightsError):
        load_weights(data, "x.safetensors")


def test_torch_file_named_safetensors_is_rejected():
    with pytest.raises(WeightsError):
        load_weights(torch_bytes(sample_tensors()), "mislabelled.safetensors")


def test_safetensors_named_pt_is_rejected():
    with pytest.raises(WeightsError):
        load_weights(st_save(sample_tensors()), "mislabelled.pt")


@pytest.mark.parametrize("name", ["model.ckpt", "model", "model.pkl", "model.npz", "weights.safetensors.gz"])
def test_unknown_suffix(name):
    with pytest.raises(WeightsError, match="unsupported"):
        load_weights(st_save(sample_tensors()), name)


def test_unreadable_torch_bytes():
    with pytest.raises(WeightsError):
        load_weights(b"\x00\x01garbage" * 10, "garbage.pt")


@pytest.mark.parametrize("obj", [[torch.zeros(2)], torch.zeros(2), 3])
def test_torch_file_not_holding_a_dict(obj):
    with pytest.raises(WeightsError):
        load_weights(torch_bytes(obj), "x.pt")


def test_read_missing_file(tmp_path):
    with pytest.raises(WeightsError, match="cannot read"):
        read_weights_file(tmp_path / "absent.safetensors")


def test_read_a_directory(tmp_path):
    folder = tmp_path / "dir.safetensors"
    folder.mkdir()
    with pytest.raises(WeightsError):
        read_weights_file(folder)


# --------------------------------------------------------------------------- malicious pickles


class SystemPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class OpenPayload:
    """Unpickling calls the builtin open(marker, 'w'), which creates the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class ExecPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


PAYLOADS = [SystemPayload, OpenPayload, ExecPayload]


def _payload_works(make, tmp_path, fmt):
    """Sanity check: the payload really runs code when loaded unsafely."""
    probe = tmp_path / f"probe-{make.__name__}-{fmt}"
    data = torch_bytes({"w": make(probe)}) if fmt == "zip" else pickle.dumps({"w": make(probe)}, protocol=2)
    if fmt == "zip":
        obj = torch.load(io.BytesIO(data), weights_only=False)
    else:
        obj = pickle.loads(data)
    if hasattr(obj.get("w"), "close"):
        obj["w"].close()
    return probe.exists()


@pytest.mark.parametrize("make", PAYLOADS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("fmt", ["zip", "legacy-pickle"])
@pytest.mark.parametrize("suffix", [".pt", ".bin"])
def test_pickle_payload_is_refused_and_never_runs(tmp_path, make, fmt, suffix):
    marker = tmp_path / "pwned-marker"
    payload = {"layer.weight": torch.zeros(2), "evil": make(marker)}
    data = torch_bytes(payload) if fmt == "zip" else pickle.dumps(payload, protocol=2)
    assert not marker.exists()
    with pytest.raises(WeightsError):
        load_weights(data, f"evil{suffix}")
    assert not marker.exists(), "loading a weights file ran code from it"
    path = tmp_path / f"evil{suffix}"
    path.write_bytes(data)
    with pytest.raises(WeightsError):
        read_weights_file(path)
    assert not marker.exists(), "loading a weights file ran code from it"
    # the payload is real: an unsafe load would have run it
    assert _payload_works(make, tmp_path, fmt)


def test_pickle_payload_as_safetensors_name_never_runs(tmp_path):
    marker = tmp_path / "pwned-marker"
    data = torch_bytes({"evil": SystemPayload(marker)})
    with pytest.raises(WeightsError):
        load_weights(data, "evil.safetensors")
    assert not marker.exists()
