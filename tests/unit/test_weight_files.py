"""Reading weight files safely: only regular files, reads bounded by their size, one bad file one
invalid row, compressed torch files bounded before they unpack, and globs that cannot walk forever."""

from __future__ import annotations

import glob
import io
import json
import os
import re
import stat
import struct
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError
from safetensors.torch import save as st_save
from safetensors.torch import save_file

import sweep
import sweep.files as files
import sweep.model as model
from sweep.cli import main as cli_main
from sweep.files import check_file, glob_matches_a_file, path_kind
from sweep.errors import ConfigError, WeightsError
from sweep.files import glob_files
from sweep.model import load_weights, read_file_bytes, read_weights_file
from sweep.studies.checkpoints import Checkpoints, Config, FileContents, expand

REPO = Path(__file__).resolve().parents[2]
needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and RLIMIT_AS")


def good_file(path: Path, value: float = 1.0) -> Path:
    save_file({"weight": torch.full((1, 2), value), "bias": torch.zeros(1)}, str(path))
    return path


def safetensors_bytes(header: bytes, body: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + body


def finishes(fn, fifo: Path):
    """fn()'s result, or a failure (not a hung test) when fn blocks on the FIFO at `fifo`."""
    out = {}

    def call():
        try:
            out["value"] = fn()
        except BaseException as e:  # handed to the test below
            out["error"] = e

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout=60)
    if thread.is_alive():  # blocked opening the FIFO: a writer lets it go, then the test fails
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join()
        pytest.fail(f"reading {fifo} blocked")
    if "error" in out:
        raise out["error"]
    return out["value"]


def checkpoints_config(paths, base: Path, check_files: bool = True) -> Config:
    return Config.model_validate({"kind": "checkpoints", "paths": paths},
                                 context={"base_dir": base, "check_files": check_files})


# --------------------------------------------------------------------------- only regular files


@needs_fifo
def test_a_fifo_matched_by_a_glob_is_an_invalid_row_and_never_blocks(tmp_path):
    good_file(tmp_path / "a.safetensors")
    fifo = tmp_path / "x.safetensors"
    os.mkfifo(fifo)
    study = Checkpoints(checkpoints_config(["*.safetensors"], tmp_path, check_files=False))
    batches = finishes(lambda: list(study.batches(8)), fifo)
    cands = batches[0].source.candidates()
    assert isinstance(cands[0], dict)
    assert cands[1] == sweep.Invalid(f"{fifo}: a FIFO (named pipe), not a regular file")


@needs_fifo
def test_read_weights_file_refuses_a_fifo_without_blocking(tmp_path):
    fifo = tmp_path / "w.pt"
    os.mkfifo(fifo)
    with pytest.raises(WeightsError, match="a FIFO \\(named pipe\\), not a regular file"):
        finishes(lambda: read_weights_file(fifo), fifo)


def test_a_symlink_to_a_device_is_refused_naming_both(tmp_path):
    if not os.path.exists(os.devnull) or not stat.S_ISCHR(os.stat(os.devnull).st_mode):
        pytest.skip("needs a character device at os.devnull")
    link = tmp_path / "x.safetensors"
    link.symlink_to(os.devnull)
    with pytest.raises(WeightsError) as e:
        read_file_bytes(link)
    assert str(e.value) == (f"{link}: a symbolic link to {os.path.realpath(os.devnull)}, a character device, "
                            f"not a regular file")
    assert _read_row(link) == str(e.value)


def test_a_symlink_to_a_regular_file_is_read(tmp_path):
    target = good_file(tmp_path / "real.safetensors", 3.0)
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)
    assert read_weights_file(link)["weight"][0, 0].item() == 3.0
    assert path_kind(str(link)) == "file"


def test_a_folder_is_refused_without_reading(tmp_path):
    folder = tmp_path / "dir.safetensors"
    folder.mkdir()
    with pytest.raises(WeightsError, match="dir.safetensors: a folder, not a regular file"):
        read_file_bytes(folder)


def _read_row(path: Path) -> str:
    """The invalid row's reason for `path` in a checkpoints study, checked without the config check."""
    study = Checkpoints(checkpoints_config([str(path)], path.parent, check_files=False))
    (cand,) = next(study.batches(1)).source.candidates()
    assert isinstance(cand, sweep.Invalid)
    return cand.reason


def _change_size_after_stat(monkeypatch, path: Path, change):
    """os.fstat as a writer racing the reader would make it: `change` runs on the file just after it."""
    real_fstat = os.fstat

    def fstat(fd):
        result = real_fstat(fd)
        change(path)
        return result

    monkeypatch.setattr(model.os, "fstat", fstat)


def test_a_file_that_grows_while_read_is_refused_and_read_only_to_its_size(tmp_path, monkeypatch):
    path = good_file(tmp_path / "a.safetensors")
    size = path.stat().st_size

    def append(p):
        with open(p, "ab") as f:
            f.write(b"\0" * 4096)

    _change_size_after_stat(monkeypatch, path, append)
    with pytest.raises(WeightsError, match=f"changed while it was read \\({size:,} bytes when opened, more"):
        read_file_bytes(path)


def test_a_file_that_shrinks_while_read_is_refused(tmp_path, monkeypatch):
    path = good_file(tmp_path / "a.safetensors")
    size = path.stat().st_size
    _change_size_after_stat(monkeypatch, path, lambda p: os.truncate(p, 10))
    with pytest.raises(WeightsError, match=f"changed while it was read \\({size:,} bytes when opened, 10 when read"):
        read_file_bytes(path)


@needs_fifo
def test_config_names_a_fifo_given_as_a_path_or_matched_by_a_glob(tmp_path):
    good_file(tmp_path / "a.safetensors")
    fifo = tmp_path / "x.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=f"{fifo} is a FIFO \\(named pipe\\), not a regular file"):
        check_file(str(fifo))
    with pytest.raises(ValidationError, match=f"{fifo} is a FIFO \\(named pipe\\), not a regular file"):
        checkpoints_config(["x.safetensors"], tmp_path)
    with pytest.raises(ValidationError) as e:
        checkpoints_config(["*.safetensors"], tmp_path)
    assert f"matches what is not a regular file: {fifo} (a FIFO (named pipe))" in str(e.value)
    assert "remove them or narrow the pattern" in str(e.value)


def test_a_glob_matching_only_a_dangling_link_matches_no_file(tmp_path):
    (tmp_path / "gone.safetensors").symlink_to(tmp_path / "absent")
    assert glob_matches_a_file(str(tmp_path / "*.safetensors")) is False


@needs_fifo
def test_validate_command_reports_a_fifo_matched_by_a_glob(tmp_path, capsys):
    folder = tmp_path / "ck"
    folder.mkdir()
    for i in range(5):
        good_file(folder / f"{i}.safetensors")
    os.mkfifo(folder / "x.safetensors")
    raw = yaml.safe_load((REPO / "configs/quickstart.yaml").read_text())
    raw["study"]["paths"] = ["ck/*.safetensors"]
    raw["sinks"] = {"parquet": {}}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert cli_main(["validate", str(config)]) == 2
    captured = capsys.readouterr()
    assert "ok" not in captured.out
    assert f"{folder / 'x.safetensors'} (a FIFO (named pipe))" in captured.err


# --------------------------------------------------------------------------- one file, one row


def test_a_deeply_nested_header_is_that_files_invalid_row(tmp_path):
    header = b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    with pytest.raises(WeightsError, match="x.safetensors: not a safetensors file: its header is nested too deeply"):
        load_weights(safetensors_bytes(header), "x.safetensors")
    good = good_file(tmp_path / "a.safetensors")
    source = FileContents([str(good), "/x/x.safetensors"], [good.read_bytes(), safetensors_bytes(header)])
    cands = source.candidates()
    assert isinstance(cands[0], dict) and isinstance(cands[1], sweep.Invalid)


@pytest.mark.parametrize("raised, expected", [
    (MemoryError(), "w.pt: out of memory while loading it: the tensor sizes it declares do not fit"),
    (RecursionError("maximum recursion depth exceeded"), "w.pt: nested too deeply to parse"),
])
def test_any_exception_while_parsing_becomes_a_weights_error(monkeypatch, raised, expected):
    def load(*args, **kwargs):
        raise raised

    monkeypatch.setattr(torch, "load", load)
    data = io.BytesIO()
    torch.save({"w": torch.ones(2)}, data)
    with pytest.raises(WeightsError, match=expected):
        load_weights(data.getvalue(), "w.pt")


def test_an_unexpected_exception_from_safetensors_becomes_a_weights_error(monkeypatch):
    import safetensors.torch

    def load(data):
        raise KeyError("surprise")

    monkeypatch.setattr(safetensors.torch, "load", load)
    with pytest.raises(WeightsError, match="a.safetensors: unreadable weights file: KeyError: 'surprise'"):
        load_weights(st_save({"w": torch.ones(2)}), "a.safetensors")


def test_a_duplicate_tensor_name_is_named():
    header = (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
              b'"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}')
    with pytest.raises(WeightsError, match="x.safetensors: invalid safetensors file: duplicate tensor name 'a'"):
        load_weights(safetensors_bytes(header, b"\0" * 8), "x.safetensors")


def test_a_key_twice_in_one_entry_is_named():
    header = b'{"a":{"dtype":"F32","dtype":"F16","shape":[1],"data_offsets":[0,4]}}'
    with pytest.raises(WeightsError, match="its header lists 'dtype' twice in one entry"):
        load_weights(safetensors_bytes(header, b"\0" * 4), "x.safetensors")


# --------------------------------------------------------------------------- a file's size bounds its memory


def compressed_torch_file(state) -> bytes:
    """torch.save's zip file re-zipped with DEFLATE, as someone shrinking (or crafting) a file would."""
    plain = io.BytesIO()
    torch.save(state, plain, _use_new_zipfile_serialization=True)
    packed = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(plain.getvalue())) as source, \
            zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as target:
        for entry in source.infolist():
            target.writestr(entry.filename, source.read(entry.filename))
    return packed.getvalue()


def test_a_compressed_torch_file_is_refused_before_torch_reads_it(monkeypatch):
    data = compressed_torch_file({"w": torch.zeros(16 * 2**20)})  # 64 MiB of zeros
    assert len(data) < 2**20
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    limit = model.MAX_UNCOMPRESSED_RATIO * len(data) + model.MAX_UNCOMPRESSED_EXTRA
    with pytest.raises(WeightsError) as e:
        load_weights(data, "zeros.pt")
    message = str(e.value)
    assert message.startswith("zeros.pt: a compressed torch file that unpacks to 67,1")
    assert f"over the limit of {limit:,}" in message and "save it with torch.save" in message


@linux_only
def test_a_compressed_torch_file_is_refused_without_the_memory_it_claims(tmp_path):
    """Under an address-space limit 32 MiB above what the process holds, torch.load itself fails on the
    64 MiB tensor; sweep refuses the file by its declared size and takes no memory for it."""
    path = tmp_path / "zeros.pt"
    path.write_bytes(compressed_torch_file({"w": torch.zeros(16 * 2**20)}))
    script = """
import io, json, os, resource, sys
import torch
torch.set_num_threads(1)
from sweep.errors import WeightsError
from sweep.model import load_weights, read_file_bytes

data = read_file_bytes(sys.argv[1])
held = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
resource.setrlimit(resource.RLIMIT_AS, (held + 32 * 2**20, held + 32 * 2**20))
out = {}
try:
    load_weights(data, "zeros.pt")
    out["sweep"] = "loaded"
except WeightsError as e:
    out["sweep"] = str(e)
try:
    torch.load(io.BytesIO(data), weights_only=True)
    out["torch"] = "loaded"
except Exception as e:
    out["torch"] = type(e).__name__
print(json.dumps(out))
"""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["torch"] != "loaded", out  # the limit is tight enough that loading the tensor fails
    assert out["sweep"].startswith("zeros.pt: a compressed torch file that unpacks to 67,1"), out


def test_a_lightly_compressed_torch_file_still_loads():
    state = {"w": torch.randn(64, 64, generator=torch.Generator().manual_seed(0)), "b": torch.zeros(64)}
    got = load_weights(compressed_torch_file(state), "small.pt")
    assert torch.equal(got["w"], state["w"]) and torch.equal(got["b"], state["b"])


def test_a_torch_zip_file_with_a_damaged_directory_is_refused():
    data = io.BytesIO()
    torch.save({"w": torch.ones(3)}, data)
    damaged = data.getvalue()[:-30]  # the end-of-directory record cut off
    with pytest.raises(WeightsError, match="w.pt: unreadable torch file: its zip directory is damaged"):
        load_weights(damaged, "w.pt")


def legacy_torch_bytes(state) -> bytes:
    data = io.BytesIO()
    torch.save(state, data, _use_new_zipfile_serialization=False)
    return data.getvalue()


def test_a_legacy_torch_file_loads():
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    assert torch.equal(load_weights(legacy_torch_bytes(state), "old.pt")["w"], state["w"])


def test_a_legacy_torch_file_claiming_more_than_it_holds_is_refused():
    """Legacy files are not compressed: torch reads each storage from the file and checks its length,
    so a 1 GiB storage claimed by a 4 KB file is refused (its memory is reserved, never written)."""
    data = legacy_torch_bytes({"w": torch.zeros(1000)})
    numel = b"M\xe8\x03"  # the pickle's BININT2 1000, the storage's element count
    assert data.count(numel) >= 1
    crafted = data.replace(numel, b"J" + struct.pack("<i", 2**28))
    with pytest.raises(WeightsError, match="old.pt: unreadable torch file"):
        load_weights(crafted, "old.pt")


@pytest.mark.parametrize("entries, body", [
    # one tensor claiming 1 GiB in a 16-byte body
    ({"a": {"dtype": "F32", "shape": [2**28], "data_offsets": [0, 2**30]}}, 16),
    # two tensors on the same 16 bytes: 32 bytes declared, 16 held
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
      "b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 16),
    # a shape larger than its offsets
    ({"a": {"dtype": "F32", "shape": [2**28], "data_offsets": [0, 16]}}, 16),
], ids=["past-the-end", "overlapping", "shape-over-offsets"])
def test_safetensors_declared_sizes_are_bounded_by_the_file(entries, body):
    """safetensors needs the tensors to tile the body exactly, so the sum of their declared sizes is the
    file's body size: no header can claim more memory than the file holds."""
    data = safetensors_bytes(json.dumps(entries).encode(), b"\0" * body)
    with pytest.raises(WeightsError, match="x.safetensors: (truncated|invalid) safetensors file"):
        load_weights(data, "x.safetensors")


# --------------------------------------------------------------------------- bounded globs


def tree(root: Path) -> Path:
    """Folders, hidden names, a linked folder and a few weights files."""
    for folder in ["a", "a/b", "a/b/c", ".hidden", "a/.dot", "d"]:
        (root / folder).mkdir(parents=True, exist_ok=True)
    for name in ["top.safetensors", "a/x.safetensors", "a/b/y.pt", "a/b/c/z.safetensors", ".hidden/h.safetensors",
                 "a/.dot/in.safetensors", "a/.top.safetensors", "d/readme.txt"]:
        (root / name).write_bytes(b"")
    (root / "link").symlink_to(root / "a/b", target_is_directory=True)
    return root


@pytest.mark.parametrize("pattern", [
    "**/*.safetensors", "*/*.safetensors", "**", "**/", "a/**/*", "a/*/c/*", "*/b/*.pt", "a/.*",
    "a/.*/*.safetensors", ".hidden/*", "link/*", "a/b/y.pt", "absent/*", "a/[bx]*", "a/?.safetensors", "**/c/**",
])
@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
def test_glob_files_matches_like_glob(tmp_path, monkeypatch, pattern, relative):
    root = tree(tmp_path)
    if relative:
        monkeypatch.chdir(root)
    full = pattern if relative else str(root / pattern)
    assert sorted(glob_files(full)) == sorted(glob.glob(full, recursive=True))


def test_a_glob_that_walks_too_far_is_refused_naming_the_pattern(tmp_path, monkeypatch):
    for i in range(20):
        (tmp_path / f"f{i:02d}").mkdir()
        (tmp_path / f"f{i:02d}" / "w.safetensors").write_bytes(b"")
    monkeypatch.setattr(files, "MAX_GLOB_ENTRIES", 10)
    pattern = str(tmp_path / "**" / "*.safetensors")
    with pytest.raises(ValueError) as e:
        glob_matches_a_file(pattern)
    assert str(e.value).startswith(f"pattern {pattern} looks through more than 10 folder entries; narrow it")
    with pytest.raises(ValidationError, match="looks through more than 10 folder entries"):
        checkpoints_config(["**/*.safetensors"], tmp_path)
    with pytest.raises(ConfigError, match=re.escape(f"study.paths: pattern {pattern} looks through more than 10")):
        expand([pattern])
    monkeypatch.setattr(files, "MAX_GLOB_ENTRIES", 1000)  # the same tree under a bound it fits in
    assert len(expand([pattern])) == 20 and glob_matches_a_file(pattern)
