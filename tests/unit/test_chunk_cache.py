"""sweep/chunking.py: a measured chunk choice kept on disk, keyed by what decides it, harmless when stale.

Every test points the cache at its own tmp_path through SWEEP_CACHE_DIR and starts with an empty
in-process memo, so "a fresh process" is the same module, data and metrics with the memo cleared.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import List

import pytest
import torch
from torch._C._functorch import get_unwrapped, is_batchedtensor

import sweep
from sweep import chunking
from sweep.chunking import CACHE_ENV, CHUNK_FOLDER, choose_chunk_size, chunk_key
from sweep.evaluator import Evaluator

REPO = Path(__file__).resolve().parents[2]


class Counted(torch.nn.Module):
    """x @ w + b, counting its vmapped forwards (the trial's and the real chunks')."""

    def __init__(self, width: int = 4, fail_above: int = 0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(-1, 1, width * 2).reshape(width, 2))
        self.b = torch.nn.Parameter(torch.zeros(2))
        self.chunks: List[int] = []
        #: a vmapped chunk of more candidates than this runs out of memory (0: never)
        self.fail_above = fail_above

    def forward(self, x):
        if is_batchedtensor(self.w):
            k = get_unwrapped(self.w).shape[0]
            self.chunks.append(k)
            if self.fail_above and k > self.fail_above:
                raise torch.OutOfMemoryError(f"out of memory: a chunk of {k}")
        return x @ self.w + self.b


def mse(output, y):
    return {"mse": ((output - y) ** 2).mean()}


def mae(output, y):
    return {"mae": (output - y).abs().mean()}


def data(width: int = 4, batch: int = 8):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, width, generator=g), torch.randn(batch, 2, generator=g))]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(folder))
    monkeypatch.setattr(chunking, "_CHOSEN", {})
    return folder


def entries(folder: Path) -> List[Path]:
    return sorted((folder / CHUNK_FOLDER).glob("*.json")) if (folder / CHUNK_FOLDER).exists() else []


def new_process() -> None:
    """What a new process has: nothing chosen in memory."""
    chunking._CHOSEN.clear()


def test_a_measured_choice_is_kept_on_disk_and_read_back_without_measuring(cache):
    module = Counted()
    cold = Evaluator(module, data(), mse)
    chosen = cold._chunk_hint(1000), cold.strategy, cold.strategy_reason
    assert module.chunks, "the cold evaluator measured"
    assert chosen[1] in ("vmap", "loop") and chosen[2]
    (path,) = entries(cache)
    entry = json.loads(path.read_text())
    assert (entry["chunk"], entry["strategy"], entry["reason"]) == chosen
    assert entry["signature"]["torch"] == torch.__version__
    assert entry["signature"]["threads"] == torch.get_num_threads()

    new_process()
    module.chunks.clear()
    warm = Evaluator(module, data(), mse)
    assert (warm._chunk_hint(1000), warm.strategy, warm.strategy_reason) == chosen
    assert module.chunks == [], "the warm evaluator ran no vmapped trial"


def test_the_kept_choice_is_used_without_calling_the_trial(cache):
    ev = Evaluator(Counted(), data(), mse)
    first = choose_chunk_size(ev.trial(), 1000)
    new_process()
    calls = []
    trial = ev.trial()
    counted = dataclasses.replace(
        trial, loop=lambda *a: calls.append("loop") or trial.loop(*a),
        vmap=lambda *a: calls.append("vmap") or trial.vmap(*a))
    assert choose_chunk_size(counted, 1000) == first
    assert calls == []


def test_a_cold_and_a_warm_process_choose_the_same_chunk(tmp_path):
    # Two real processes: the key must read the same in both (code digests, not addresses).
    script = textwrap.dedent("""
        import json, torch
        from torch._C._functorch import get_unwrapped, is_batchedtensor
        from sweep.evaluator import Evaluator

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(2))
                self.vmapped = 0

            def forward(self, x):
                if is_batchedtensor(self.layers[0].weight):
                    self.vmapped += 1
                return sum(layer(x) for layer in self.layers)  # a generator: a nested code object

        torch.manual_seed(0)
        net = Net()
        ev = Evaluator(net, [(torch.randn(16, 4), torch.randn(16, 4))], lambda o, y: {"mse": ((o - y) ** 2).mean()})
        chunk = ev._chunk_hint(20000)
        print(json.dumps([chunk, ev.strategy, ev.strategy_reason, net.vmapped]))
    """)
    env = {**os.environ, CACHE_ENV: str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    runs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    (cold_chunk, cold_strategy, cold_reason, cold_calls), (warm_chunk, warm_strategy, warm_reason, warm_calls) = runs
    assert cold_calls > 0, "the first process measured"
    assert (warm_chunk, warm_strategy, warm_reason) == (cold_chunk, cold_strategy, cold_reason)
    assert warm_calls == 0, "the second process read the choice instead of measuring"


class Other(Counted):
    def forward(self, x):  # the same tensors, another forward
        return super().forward(x).relu()


@pytest.mark.parametrize("change", ["module width", "module code", "data shape", "precision", "compile", "metrics",
                                    "threads", "torch version", "device name", "trial sizes"])
def test_a_change_in_any_key_part_is_measured_afresh(cache, monkeypatch, change):
    base = Evaluator(Counted(), data(), mse)
    choose_chunk_size(base.trial(), 1000)
    base_key = chunk_key(base.trial(), 1000)
    new_process()

    module, batches, options, limit = Counted(), data(), {}, 1000
    if change == "module width":
        module, batches = Counted(width=6), data(width=6)
    elif change == "module code":
        module = Other()
    elif change == "data shape":
        batches = data(batch=16)
    elif change == "precision":
        options = {"precision": "bf16"}
    elif change == "compile":
        options = {"compile": True}
    elif change == "threads":
        threads = torch.get_num_threads()
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads + 1)
    elif change == "torch version":
        monkeypatch.setattr(torch, "__version__", torch.__version__ + "+other")
    elif change == "device name":
        monkeypatch.setattr(chunking, "device_name", lambda device: "another processor")
    elif change == "trial sizes":
        limit = 20  # trials stop at 32
    ev = Evaluator(module, batches, mae if change == "metrics" else mse, **options)
    assert chunk_key(ev.trial(), limit) != base_key
    if change == "compile":
        return  # measuring is the same (uncompiled) trial; the key alone tells the choices apart
    module.chunks.clear()
    choose_chunk_size(ev.trial(), limit)
    assert module.chunks, f"a changed {change} is measured, not read from the other entry"
    assert len(entries(cache)) == 2


def test_the_same_parts_give_the_same_key_and_a_lambda_has_a_stable_id():
    a = Evaluator(Counted(), data(), mse)
    b = Evaluator(Counted(), data(), mse)
    assert chunk_key(a.trial(), 1000) == chunk_key(b.trial(), 1000)
    assert chunking.callable_id(mse) == f"{__name__}.mse:{chunking._code_digest(mse)}"
    assert chunking.callable_id(lambda o, y: 1) != chunking.callable_id(lambda o, y: 2)


def valid_entry(key_signature, **changes):
    entry = {"format": chunking.CACHE_FORMAT, "chunk": 64, "strategy": "vmap", "reason": "kept",
             "signature": key_signature}
    entry.update(changes)
    return json.dumps(entry)


@pytest.mark.parametrize("contents", [
    b"\xff\xfe\x00 not text",
    b"{\"format\": 1, \"chunk\": 6",  # cut short
    b"[64, \"vmap\"]",
    "format 2", "chunk a string", "chunk zero", "chunk a bool", "strategy unknown", "reason missing",
    "another signature",
])
def test_an_unreadable_or_wrong_entry_is_measured_again_and_overwritten(cache, contents):
    module = Counted()
    ev = Evaluator(module, data(), mse)
    trial = ev.trial()
    key = chunk_key(trial, 1000)
    signature = chunking._signature(trial, chunking._sizes(1000))
    if isinstance(contents, str):
        contents = {
            "format 2": valid_entry(signature, format=2),
            "chunk a string": valid_entry(signature, chunk="64"),
            "chunk zero": valid_entry(signature, chunk=0),
            "chunk a bool": valid_entry(signature, chunk=True),
            "strategy unknown": valid_entry(signature, strategy="fast"),
            "reason missing": valid_entry(signature, reason=None),
            "another signature": valid_entry({**signature, "threads": -1}),
        }[contents].encode()
    path = cache / CHUNK_FOLDER / f"{key}.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(contents)
    assert chunking._read(key, signature) is None

    choice = choose_chunk_size(trial, 1000)
    assert module.chunks, "measured again"
    entry = json.loads(path.read_text())
    assert (entry["chunk"], entry["strategy"], entry["reason"]) == choice
    assert entry["signature"] == json.loads(json.dumps(signature))


def test_a_well_formed_entry_is_used_as_it_is(cache):
    module = Counted()
    trial = Evaluator(module, data(), mse).trial()
    signature = chunking._signature(trial, chunking._sizes(1000))
    chunking._write(chunk_key(trial, 1000), signature, (64, "vmap", "kept"))
    assert choose_chunk_size(trial, 1000) == (64, "vmap", "kept")
    assert module.chunks == []


def test_a_kept_chunk_that_no_longer_fits_in_memory_is_measured_again(cache):
    module = Counted()
    trial = Evaluator(module, data(), mse).trial()
    key = chunk_key(trial, 1000)
    chunking._write(key, chunking._signature(trial, chunking._sizes(1000)), (8192, "vmap", "kept"))
    # memory for 40 candidates: three copies of the weights (10 float32) and two of the output (8×2 float32)
    per_candidate = 3 * (10 * 4) + 2 * (8 * 2 * 4)
    chunk, strategy, reason = choose_chunk_size(trial, 1000, budget=lambda device: 40 * per_candidate)
    assert chunk <= 40 and reason != "kept"
    assert module.chunks and max(module.chunks) <= 40
    assert json.loads((cache / CHUNK_FOLDER / f"{key}.json").read_text())["chunk"] == chunk


def test_a_chunk_that_runs_out_of_memory_in_use_is_forgotten(cache):
    module = Counted(fail_above=16)
    ev = Evaluator(module, data(), mse)
    trial = ev.trial()
    key = chunk_key(trial, 128)
    chunking._write(key, chunking._signature(trial, chunking._sizes(128)), (64, "vmap", "kept"))
    coeffs = torch.linspace(0, 1, 128)[:, None]
    base = {n: p.detach() for n, p in module.named_parameters()}
    with pytest.warns(RuntimeWarning, match="ran out of memory"):
        table = ev.run(sweep.Affine(base, [{n: torch.ones_like(t) for n, t in base.items()}], coeffs))
    assert table.column("status").to_pylist() == ["ok"] * 128
    assert ev.chunk_size <= 16
    assert entries(cache) == [], "the entry whose chunk ran out of memory is gone: the next process measures"
    assert key not in chunking._CHOSEN


@pytest.mark.parametrize("kind", ["recipe", "dicts"])
def test_a_kept_chunk_that_runs_out_of_memory_in_the_last_chunk_is_forgotten_at_once(cache, kind):
    """The sweep's only chunk is halved: no later chunk asks for the size again, and still the entry goes."""
    module = Counted(fail_above=16)
    ev = Evaluator(module, data(), mse)
    trial = ev.trial()
    key = chunk_key(trial, 64)
    chunking._write(key, chunking._signature(trial, chunking._sizes(64)), (64, "vmap", "kept"))
    base = {n: p.detach() for n, p in module.named_parameters()}
    candidates = (sweep.Affine(base, [{n: torch.ones_like(t) for n, t in base.items()}],
                               torch.linspace(0, 1, 64)[:, None]) if kind == "recipe"
                  else [{n: t + i for n, t in base.items()} for i in range(64)])
    with pytest.warns(RuntimeWarning, match="ran out of memory"):
        table = ev.run(candidates)
    assert table.column("status").to_pylist() == ["ok"] * 64
    assert entries(cache) == [] and key not in chunking._CHOSEN


def test_an_unwritable_cache_still_chooses(tmp_path, monkeypatch):
    monkeypatch.setattr(chunking, "_CHOSEN", {})
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(CACHE_ENV, str(blocker / "cache"))
    module = Counted()
    ev = Evaluator(module, data(), mse)
    assert ev._chunk_hint(1000) >= 1 and ev.strategy in ("vmap", "loop") and module.chunks
    assert blocker.read_text() == "not a folder"
    table = sweep.evaluate(module, [dict(module.named_parameters())], data(), mse)
    assert table.column("status").to_pylist() == ["ok"]


def test_off_keeps_nothing_and_measures_in_each_process(tmp_path, monkeypatch):
    monkeypatch.setattr(chunking, "_CHOSEN", {})
    monkeypatch.setenv(CACHE_ENV, "OFF")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert chunking.cache_dir() is None
    module = Counted()
    Evaluator(module, data(), mse)._chunk_hint(1000)
    new_process()
    module.chunks.clear()
    Evaluator(module, data(), mse)._chunk_hint(1000)
    assert module.chunks, "measured again"
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_the_default_folder_follows_xdg_then_home(tmp_path, monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert chunking.cache_dir() == tmp_path / "xdg" / "sweep"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # the XDG spec: ignored
    assert chunking.cache_dir() == tmp_path / "home" / ".cache" / "sweep"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert chunking.cache_dir() == tmp_path / "home" / ".cache" / "sweep"
    monkeypatch.setattr(chunking, "_CHOSEN", {})
    Evaluator(Counted(), data(), mse)._chunk_hint(1000)
    assert len(entries(tmp_path / "home" / ".cache" / "sweep")) == 1
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "moved"))
    assert chunking.cache_dir() == tmp_path / "moved"


def test_concurrent_writers_leave_whole_entries_and_no_temporary_files(cache):
    trial = Evaluator(Counted(), data(), mse).trial()
    key = chunk_key(trial, 1000)
    signature = chunking._signature(trial, chunking._sizes(1000))
    chunking._write(key, signature, (8, "vmap", "first"))
    seen, stop = [], threading.Event()

    def writer(n: int) -> None:
        for i in range(150):
            chunking._write(key, signature, (n * 1000 + i + 1, "vmap", "x" * (i % 7) * 500))

    def reader() -> None:
        while not stop.is_set():
            seen.append(chunking._read(key, signature))

    threads = [threading.Thread(target=writer, args=(n,)) for n in (1, 2)]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    assert seen and all(choice is not None for choice in seen), "a reader never sees half an entry"
    assert [p.name for p in (cache / CHUNK_FOLDER).iterdir()] == [f"{key}.json"]
    assert chunking._read(key, signature)[0] in (1150, 2150)
