"""Inputs the hardening issue names that the other unit tests do not cover."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save
from torch._C._functorch import get_unwrapped, is_batchedtensor
from torch.func import functional_call

import sweep
from sweep.evaluator import Evaluator
from sweep.model import load_weights


def metrics(output, y):
    return {"mse": ((output - y) ** 2).mean()}


def data():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g)) for _ in range(2)]


def reference(module, params):
    buffers = {n: b.clone() for n, b in module.named_buffers()}
    total, n = 0.0, 0
    with torch.no_grad():
        for x, y in data():
            total += float(metrics(functional_call(module, {**params, **buffers}, (x,)), y)["mse"]) * len(y)
            n += len(y)
    return total / n


class SmallDevice(torch.nn.Module):
    """Behaves as if the device held at most 4 candidates at once (vmap shows the chunk size)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(4, 1))

    def forward(self, x):
        if is_batchedtensor(self.w) and get_unwrapped(self.w).shape[0] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return x @ self.w


def test_a_chunk_that_does_not_fit_is_split_and_retried():
    module = SmallDevice()
    base = {"w": torch.ones(4, 1)}
    direction = {"w": torch.full((4, 1), 0.1)}
    alphas = torch.linspace(0, 1, 19)
    with pytest.warns(RuntimeWarning, match="ran out of memory"):
        table = sweep.evaluate(module, sweep.Affine(base, [direction], alphas[:, None]), data(), metrics,
                               chunk_size=16)
    rows = table.to_pylist()
    assert [r["status"] for r in rows] == ["ok"] * 19
    for a, row in zip(alphas.tolist(), rows):
        assert row["mse"] == pytest.approx(reference(module, {"w": base["w"] + a * direction["w"]}), rel=1e-6)


class Huge(torch.nn.Module):
    """Its forward asks the allocator for 4 TB: no chunk, not even one candidate, fits."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(4, 1))

    def forward(self, x):
        return x @ self.w + torch.empty(2**40, dtype=torch.float32).sum() * 0


def test_a_candidate_that_does_not_fit_alone_fails_with_its_size():
    candidates = [{"w": torch.full((4, 1), float(i))} for i in range(3)]
    table = sweep.evaluate(Huge(), candidates, data(), metrics, chunk_size=3)
    rows = table.to_pylist()
    assert [r["status"] for r in rows] == ["failed"] * 3
    for candidate, row in zip(candidates, rows):
        # The candidate's own size (4×1 float32: 16 bytes), not the 4 TB the forward asked for.
        size = sum(t.numel() * t.element_size() for t in candidate.values())
        assert row["error"].startswith(f"out of memory evaluating this candidate alone on cpu "
                                       f"(its weights take {size:,} bytes; "), row["error"]


class Counter(torch.nn.Module):
    """Writes to its buffer in every forward (as train-mode BatchNorm does to its statistics)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(4, 1))
        self.register_buffer("calls", torch.zeros(1))

    def forward(self, x):
        self.calls += 1
        return x @ self.w + self.calls


@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_buffer_writes_do_not_leak_between_candidates(chunk_size):
    module = Counter()
    candidates = [{"w": torch.full((4, 1), 0.1 * i)} for i in range(7)]
    rows = sweep.evaluate(module, candidates, data(), metrics, chunk_size=chunk_size).to_pylist()
    expected = [reference(Counter(), c) for c in candidates]  # each from a fresh counter
    assert [r["mse"] for r in rows] == pytest.approx(expected, rel=1e-6)
    assert module.calls.item() == 0, "the module's own buffer never changes"


def test_non_contiguous_candidates_are_accepted_and_exact():
    module = torch.nn.Linear(4, 1)
    weight = torch.randn(1, 8)[:, ::2]  # shape (1, 4), every other element: not contiguous
    assert not weight.is_contiguous()
    candidate = {"weight": weight, "bias": torch.zeros(1)}
    row = sweep.evaluate(module, [candidate], data(), metrics).to_pylist()[0]
    assert row["status"] == "ok"
    assert row["mse"] == pytest.approx(reference(module, {k: v.contiguous() for k, v in candidate.items()}), rel=1e-6)


def _safetensors_with_header(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


@pytest.mark.parametrize("offsets", [[0, 64], [8, 4], [0, 8]])
def test_a_header_that_lies_about_offsets_is_refused(offsets):
    # Four float32 values (16 bytes) declared with offsets that overrun, run backwards or undersize.
    header = {"w": {"dtype": "F32", "shape": [4], "data_offsets": offsets}}
    with pytest.raises(sweep.WeightsError, match="w.safetensors"):
        load_weights(_safetensors_with_header(header, b"\0" * 16), "w.safetensors")


def test_a_header_that_lies_about_the_shape_is_refused():
    good = save({"w": torch.zeros(4)})
    header_len = struct.unpack("<Q", good[:8])[0]
    header = json.loads(good[8 : 8 + header_len])
    header["w"]["shape"] = [400]
    with pytest.raises(sweep.WeightsError):
        load_weights(_safetensors_with_header(header, good[8 + header_len :]), "w.safetensors")


def test_data_with_inconsistent_shapes_is_refused_up_front():
    batches = [(torch.zeros(8, 4), torch.zeros(8, 1)), (torch.zeros(8, 5), torch.zeros(8, 1))]
    with pytest.raises(ValueError, match="data batch 1 does not match batch 0"):
        Evaluator(torch.nn.Linear(4, 1), batches, metrics)


def test_a_loader_that_raises_midway_surfaces_its_error():
    def loader():
        yield torch.zeros(8, 4), torch.zeros(8, 1)
        raise OSError("disk went away")

    with pytest.raises(OSError, match="disk went away"):
        sweep.evaluate(torch.nn.Linear(4, 1), [], loader(), metrics)


def test_a_quantized_tensor_where_a_dense_one_is_expected_is_invalid():
    module = torch.nn.Linear(4, 1)
    weight = torch.quantize_per_tensor(torch.randn(1, 4), scale=0.1, zero_point=0, dtype=torch.qint8)
    rows = sweep.evaluate(module, [{"weight": weight, "bias": torch.zeros(1)},
                                   {"weight": torch.ones(1, 4), "bias": torch.zeros(1)}], data(), metrics).to_pylist()
    assert rows[0]["status"] == "invalid" and "'weight'" in rows[0]["error"] and "quantized" in rows[0]["error"]
    assert rows[1]["status"] == "ok"
