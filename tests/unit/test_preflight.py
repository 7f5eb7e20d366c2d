"""Checks before a run (`sweep.preflight`): weights files held against the module from their headers alone."""

from __future__ import annotations

import json
import struct
import sys
import textwrap
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import sweep.preflight as preflight
from sweep.config import parse_config
from sweep.errors import ConfigError, WeightsError
from sweep.examples.models import cnn
from sweep.model import read_file_bytes, read_weights_file
from sweep.preflight import (ModuleFit, join_misfits, misfits, plan_checked, read_entries, read_safetensors_header,
                             read_torch_entries)
from sweep.studies.base import checking_anchors, read_weights
from sweep.validate import Schema

REPO = Path(__file__).resolve().parents[2]
CHECKPOINTS = REPO / "sweep/examples/checkpoints"


def state(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def fit_of(module: torch.nn.Module, label: str = "test:module") -> ModuleFit:
    return ModuleFit(Schema(module), label)


class Tied(torch.nn.Module):
    """An embedding and an output layer sharing one weight, and a BatchNorm's buffers."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.norm = torch.nn.BatchNorm1d(4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x):
        return self.head(self.norm(self.embed(x)))


# --------------------------------------------------------------------------- the header reader

def test_header_gives_each_key_with_its_shape_and_dtype(tmp_path):
    tensors = {"a": torch.zeros(2, 3), "b": torch.ones(5, dtype=torch.float16), "c": torch.arange(4),
               "d": torch.zeros(3, 1, 2, dtype=torch.bfloat16), "e": torch.tensor(True), "f": torch.zeros(0, 7)}
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path), metadata={"note": "kept out"})
    header = read_safetensors_header(str(path))
    # independently: what safetensors itself loads
    loaded = load_file(str(path))
    assert header == {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in loaded.items()}
    assert header["e"] == ((), "bool") and header["f"] == ((0, 7), "float32")


def test_header_reader_reads_no_tensor_data(tmp_path):
    """A 64 MB tensor: the header reader takes a few kilobytes where loading the file takes 64 MB."""
    path = tmp_path / "big.safetensors"
    save_file({"big": torch.zeros(4096, 4096), "small": torch.zeros(3)}, str(path))
    assert path.stat().st_size > 64 * 2**20
    tracemalloc.start()
    try:
        header = read_safetensors_header(str(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert header == {"big": ((4096, 4096), "float32"), "small": ((3,), "float32")}
    assert peak < 1 * 2**20, f"the header reader took {peak:,} bytes"
    tracemalloc.start()
    try:
        read_file_bytes(path)  # what reading the file whole takes, measured the same way
        _, whole = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert whole > 64 * 2**20


def test_a_file_whose_data_is_cut_short_is_refused_though_its_header_is_whole(tmp_path):
    """Decided: the header alone would pass, but the run could not load the file; it is called truncated,
    in the words loading it uses (the quickstart's bad-truncated.safetensors is such a file)."""
    path = tmp_path / "cut.safetensors"
    save_file({"w": torch.zeros(10, 10)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(WeightsError) as header_error:
        read_safetensors_header(str(path))
    with pytest.raises(WeightsError) as load_error:
        read_weights_file(path)
    assert "truncated safetensors file: its tensors need 400 bytes after the header, the file holds 300" \
        in str(header_error.value)
    assert str(header_error.value) == str(load_error.value)


@pytest.mark.parametrize("data, expected", [
    (b"\x01\x00", "shorter than its 8-byte header length"),
    (struct.pack("<Q", 500) + b"{}", "truncated safetensors file: header claims 500 bytes"),
    (struct.pack("<Q", 3) + b"{{{", "its header is not JSON"),
    (struct.pack("<Q", 2) + b"[]", "its header is not a JSON object"),
    (struct.pack("<Q", 2**40), "over the 100000000-byte limit"),
])
def test_malformed_headers_say_why(tmp_path, data, expected):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(WeightsError, match=expected):
        read_safetensors_header(str(path))


@pytest.mark.parametrize("entry, expected", [
    ({"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}, "dtype 'F99' is not one torch reads"),
    ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, "shape should be a list of sizes"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [4, 0]}, "data_offsets should be [begin, end]"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}, "shape (2,) float32 takes 8 bytes, its data_offsets give 4"),
])
def test_a_header_entry_that_loading_would_refuse(tmp_path, entry, expected):
    header = json.dumps({"w": entry}).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    with pytest.raises(WeightsError) as e:
        read_safetensors_header(str(path))
    assert "invalid safetensors file: key 'w': " in str(e.value) and expected in str(e.value)


def test_torch_files_through_mmap_and_legacy_ones_left_unread(tmp_path):
    module = cnn(4)
    path = tmp_path / "w.pt"
    torch.save({"state_dict": module.state_dict(), "epoch": 3}, path)
    assert read_torch_entries(str(path)) == {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in module.state_dict().items()}
    legacy = tmp_path / "legacy.pt"
    torch.save(module.state_dict(), legacy, _use_new_zipfile_serialization=False)
    assert read_weights_file(legacy).keys() == module.state_dict().keys()  # the run reads it ...
    assert read_torch_entries(str(legacy)) is None  # ... mmap cannot: not read before the run


def test_a_torch_file_on_a_network_file_system_is_not_opened(tmp_path, monkeypatch):
    path = tmp_path / "w.pt"
    torch.save(cnn(4).state_dict(), path)
    assert preflight.on_local_disk(str(path))
    monkeypatch.setattr(preflight, "_mounts", lambda: (("/", "ext4"), (str(tmp_path), "nfs4")))
    assert not preflight.on_local_disk(str(path)) and read_torch_entries(str(path)) is None
    monkeypatch.setattr(preflight, "_mounts", lambda: (("/", "ext4"), (str(tmp_path), "fuse.sshfs")))
    assert read_entries(str(path)) is None
    monkeypatch.setattr(preflight, "_mounts", lambda: (("/", "ext4"), (str(tmp_path) + "-other", "nfs4")))
    assert read_entries(str(path)) is not None  # a folder whose name merely begins the same


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/mountinfo")
def test_the_mount_table_is_read():
    points = dict(preflight._mounts())
    assert "/" in points and "/proc" in points and points["/proc"] == "proc"


def test_what_is_not_a_weights_file_is_said_cheaply(tmp_path):
    other = tmp_path / "w.npz"
    other.write_bytes(b"0" * 10)
    with pytest.raises(WeightsError, match="unsupported weights format '.npz'"):
        read_entries(str(other))
    folder = tmp_path / "d.safetensors"
    folder.mkdir()
    with pytest.raises(WeightsError, match="d.safetensors: a folder without a checkpoint: it holds none of "
                                           "model.safetensors, model.safetensors.index.json, pytorch_model.bin, "
                                           "pytorch_model.bin.index.json"):
        read_entries(str(folder))
    assert read_entries(str(tmp_path / "absent.safetensors")) is None  # the run's own reading says so
    assert read_entries("s3://bucket/w.safetensors") is None


# --------------------------------------------------------------------------- the file against the module

def test_a_wrong_architecture_names_the_field_the_file_the_first_keys_and_counts_the_rest(tmp_path):
    path = tmp_path / "e0.safetensors"
    save_file(state(cnn(8)), str(path))
    fit = fit_of(cnn(16), "sweep.examples.models:cnn {channels: 16}")
    with pytest.raises(ConfigError) as e:
        fit.check_anchor(str(path), "study.endpoints[0]")
    # independently: the keys whose shapes differ between the two modules
    wide, narrow = cnn(16).state_dict(), cnn(8).state_dict()
    differing = [k for k in wide if wide[k].shape != narrow[k].shape]
    assert len(differing) == 13
    message = str(e.value)
    assert message.startswith(f"study.endpoints[0] {preflight.shown_path(str(path))} does not fit the module built by "
                              f"sweep.examples.models:cnn {{channels: 16}}: ")
    assert ("conv1.weight: module has shape (16×3×3×3) float32, file has shape (8×3×3×3) float32; "
            "conv1.bias: module has shape (16,) float32, file has shape (8,) float32; "
            "bn1.weight: module has shape (16,) float32, file has shape (8,) float32; "
            f"and {len(differing) - 3} more keys") in message
    assert message.endswith("and 10 more keys")


def test_every_way_a_file_can_differ_is_one_entry_per_key():
    module = cnn(4)
    entries = {k: (tuple(v.shape), v.dtype) for k, v in module.state_dict().items()}
    entries["conv1.weight"] = ((4, 3, 3, 3), "float16")  # dtype
    del entries["head.bias"]  # a parameter missing
    entries["hed.weight"] = entries.pop("head.weight")  # misspelt
    problems = misfits(Schema(module), entries)
    assert problems == [
        "conv1.weight: module has shape (4×3×3×3) float32, file has shape (4×3×3×3) float16",
        "head.weight: module has shape (10×8) float32, the file lacks it",
        "head.bias: module has shape (10,) float32, the file lacks it",
        "hed.weight: file has shape (10×8) float32, the module has no such key (did you mean 'head.weight'?)",
    ]
    assert join_misfits(problems, 3).endswith("; and 1 more key")
    assert join_misfits(problems[:3], 3) == "; ".join(problems[:3])


def test_tied_weights_may_come_under_either_name_and_buffers_may_be_left_out(tmp_path):
    module = Tied()
    schema = Schema(module)
    full = state(module)
    assert "embed.weight" in full and "head.weight" in full
    norm = {"norm.weight": full["norm.weight"], "norm.bias": full["norm.bias"]}  # its parameters, not its buffers
    for name, given in [("embed", {"embed.weight": full["embed.weight"], **norm}),
                        ("head", {"head.weight": full["embed.weight"], **norm}), ("both", full)]:
        path = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in given.items()}, str(path))
        assert misfits(schema, read_safetensors_header(str(path))) == [], name
        # what the run will say of the same tensors: valid
        assert schema.check(load_file(str(path)), torch.device("cpu"))[1] is None, name
    path = tmp_path / "neither.safetensors"
    save_file(norm, str(path))
    assert misfits(schema, read_safetensors_header(str(path))) == [
        "embed.weight: module has shape (10×4) float32, the file lacks it"]


def test_a_buffer_given_must_fit(tmp_path):
    module = cnn(4)
    wrong = state(module)
    wrong["bn1.running_mean"] = torch.zeros(5)
    path = tmp_path / "w.safetensors"
    save_file(wrong, str(path))
    assert misfits(Schema(module), read_safetensors_header(str(path))) == [
        "bn1.running_mean: module has shape (4,) float32, file has shape (5,) float32"]
    assert "bn1.running_mean" in Schema(module).check(load_file(str(path)), torch.device("cpu"))[1]


def test_an_unreadable_anchor_is_a_config_error_in_the_words_of_reading_it(tmp_path):
    fit = fit_of(cnn(4))
    path = tmp_path / "cut.safetensors"
    save_file(state(cnn(4)), str(path))
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ConfigError) as checked:
        fit.check_anchor(str(path), "study.base")
    with pytest.raises(ConfigError) as read:
        read_weights(str(path), "study.base")
    assert str(checked.value) == str(read.value)


def test_read_weights_checks_each_anchor_before_reading_it_within_checking_anchors(tmp_path, monkeypatch):
    """The hook every study's anchors go through: a study that reads its files with `read_weights` is checked
    without preflight knowing it."""
    path = tmp_path / "w.safetensors"
    save_file(state(cnn(8)), str(path))
    fit = fit_of(cnn(16))
    reads = []
    real = read_weights_file
    monkeypatch.setattr("sweep.studies.base.read_weights_file", lambda p: reads.append(p) or real(p))
    with checking_anchors(fit.check_anchor):
        with pytest.raises(ConfigError, match=r"^study\.anything\[2\] .* does not fit the module"):
            read_weights(str(path), "study.anything[2]")
    assert reads == [], "the check comes before the file is read whole"
    assert read_weights(str(path), "study.anything[2]").keys() == cnn(8).state_dict().keys()  # outside: no check
    with checking_anchors(fit_of(cnn(8)).check_anchor):
        assert read_weights(str(path), "study.anything[2]").keys() == cnn(8).state_dict().keys()


def test_candidate_files_one_line_per_distinct_problem_with_counts(tmp_path):
    module = cnn(4)
    fit = fit_of(module, "m:cnn {channels: 4}")
    good = tmp_path / "good.safetensors"
    save_file(state(module), str(good))
    paths = [str(good)]
    for i in range(5):
        path = tmp_path / f"narrow{i}.safetensors"
        save_file(state(cnn(2)), str(path))
        paths.append(str(path))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-4])
    paths.append(str(cut))
    lines = fit.candidate_warnings(paths)
    assert lines[0] == f"6 of 7 candidate files (in {preflight.shown_path(str(tmp_path))}) will be invalid rows:"
    assert lines[1].startswith("  5 files (narrow0.safetensors, narrow1.safetensors, narrow2.safetensors, …): "
                               "does not fit the module built by m:cnn {channels: 4}: conv1.weight: module has "
                               "shape (4×3×3×3) float32, file has shape (2×3×3×3) float32; ")
    assert lines[2].startswith("  cut.safetensors: truncated safetensors file: its tensors need ")
    assert len(lines) == 3
    assert fit.candidate_warnings([str(good)]) == [] and fit.candidate_warnings([]) == []


# --------------------------------------------------------------------------- the whole check of a config

def digits_config(tmp_path: Path, study: dict, **model) -> object:
    raw = {"name": "t", "model": {"factory": "sweep.examples.digits:make_model", **model},
           "data": {"loader": "sweep.examples.digits:eval_batches"},
           "metrics": {"function": "sweep.examples.digits:metrics"}, "study": study}
    return parse_config(raw, base_dir=tmp_path)


def test_quickstart_candidates_are_warnings_and_its_study_is_planned():
    from sweep.config import load_config

    checked = plan_checked(load_config(REPO / "configs/quickstart.yaml"))
    assert len(checked.study) == 7
    assert checked.warnings[0] == f"2 of 7 candidate files (in {preflight.shown_path(str(CHECKPOINTS))}) will be " \
                                  f"invalid rows:"
    assert checked.warnings[1].startswith("  bad-hidden32.safetensors: does not fit the module built by "
                                          "sweep.examples.digits:make_model {hidden: 64}: 0.weight: module has "
                                          "shape (64×64) float32, file has shape (32×64) float32")
    assert checked.warnings[2].startswith("  bad-truncated.safetensors: truncated safetensors file")
    assert len(checked.warnings) == 3


def test_a_merge_model_of_another_architecture_is_named(tmp_path):
    base = CHECKPOINTS / "seed0-epoch02.safetensors"
    config = digits_config(tmp_path, {"kind": "merge", "base": str(base),
                                      "models": [str(CHECKPOINTS / "seed0-epoch10.safetensors"),
                                                 str(CHECKPOINTS / "bad-hidden32.safetensors")]})
    with pytest.raises(ConfigError) as e:
        plan_checked(config)
    shown = preflight.shown_path(str(CHECKPOINTS / "bad-hidden32.safetensors"))  # relative to the working folder
    assert str(e.value).startswith(f"study.models[1] {shown} does not fit the "
                                   f"module built by sweep.examples.digits:make_model: 0.weight: module has shape "
                                   f"(64×64) float32, file has shape (32×64) float32; ")


def test_model_weights_are_checked_first(tmp_path):
    config = digits_config(tmp_path, {"kind": "checkpoints", "paths": [str(CHECKPOINTS / "seed0-*.safetensors")]},
                           weights=str(CHECKPOINTS / "bad-hidden32.safetensors"), kwargs={"hidden": 64})
    with pytest.raises(ConfigError, match=r"^model\.weights .*bad-hidden32\.safetensors does not fit the module "
                                          r"built by sweep\.examples\.digits:make_model \{hidden: 64\}: "):
        plan_checked(config)
    config = digits_config(tmp_path, {"kind": "checkpoints", "paths": [str(CHECKPOINTS / "seed0-*.safetensors")]},
                           weights=str(CHECKPOINTS / "bad-truncated.safetensors"))
    with pytest.raises(ConfigError, match=r"^model\.weights: .*bad-truncated\.safetensors: truncated"):
        plan_checked(config)


def test_a_fitting_config_plans_as_before(tmp_path):
    ends = [str(CHECKPOINTS / "seed0-epoch30.safetensors"), str(CHECKPOINTS / "seed1-epoch30.safetensors")]
    config = digits_config(tmp_path, {"kind": "interpolate", "endpoints": ends,
                                      "alphas": {"start": 0, "stop": 1, "num": 5}})
    checked = plan_checked(config)
    assert checked.warnings == [] and len(checked.study) == 5


USER_CODE = textwrap.dedent('''
    import torch

    def meta_refused():
        """A factory that fills its weights from a tensor it makes on the CPU: it cannot build on meta."""
        module = torch.nn.Linear(3, 2)
        module.weight.data = torch.ones(2, 3, device="cpu") + module.weight.data.to("cpu")
        return module

    def needs_gpu():
        raise RuntimeError("this model needs a GPU")

    SEEN = []

    def recording(widths):
        """sweep.examples.models.mlp, noting the device its tensors are made on and the seed it runs under."""
        from sweep.examples.models import mlp

        SEEN.append((torch.empty(0).device.type, torch.initial_seed()))
        return mlp(widths)
''')


def test_a_module_that_cannot_be_built_on_meta_is_built_on_the_cpu_and_one_that_cannot_be_built_is_a_warning(
        tmp_path, monkeypatch):
    (tmp_path / "preflight_user.py").write_text(USER_CODE)
    monkeypatch.syspath_prepend(str(tmp_path))
    good = tmp_path / "linear.safetensors"
    save_file({"weight": torch.zeros(2, 3), "bias": torch.zeros(2)}, str(good))
    wide = tmp_path / "wide.safetensors"
    save_file({"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}, str(wide))

    def config(factory: str, path: Path):
        raw = {"name": "t", "model": {"factory": factory},
               "data": {"loader": "sweep.examples.digits:eval_batches"},
               "metrics": {"function": "sweep.examples.digits:metrics"},
               "study": {"kind": "checkpoints", "paths": [str(path)]}}
        return parse_config(raw, base_dir=tmp_path)

    with pytest.raises(Exception):
        with torch.device("meta"):
            __import__("preflight_user").meta_refused()
    assert plan_checked(config("preflight_user:meta_refused", good)).warnings == []
    warnings = plan_checked(config("preflight_user:meta_refused", wide)).warnings
    assert warnings[1].startswith("  wide.safetensors: does not fit the module built by preflight_user:meta_refused: "
                                  "weight: module has shape (2×3) float32, file has shape (2×4) float32")
    checked = plan_checked(config("preflight_user:needs_gpu", wide))
    assert checked.warnings == ["the module could not be built here to check the weights files against it "
                                "(RuntimeError: this model needs a GPU); the workers build it where they run"]
    assert len(checked.study) == 1


def test_the_module_is_built_on_meta_under_the_config_seed(tmp_path, monkeypatch):
    """Its tensors take no memory (a 1.6 GB module is checked at no cost), and the factory runs under the seed."""
    (tmp_path / "preflight_user.py").write_text(USER_CODE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import preflight_user

    path = tmp_path / "w.safetensors"
    save_file({"weight": torch.zeros(2, 2), "bias": torch.zeros(2)}, str(path))
    raw = {"name": "t", "model": {"factory": "preflight_user:recording", "kwargs": {"widths": [20000, 20000]},
                                  "seed": 7},
           "data": {"loader": "sweep.examples.digits:eval_batches"},
           "metrics": {"function": "sweep.examples.digits:metrics"},
           "study": {"kind": "checkpoints", "paths": [str(path)]}}
    preflight_user.SEEN.clear()
    fit, why = ModuleFit.of(parse_config(raw, base_dir=tmp_path))
    assert why is None and fit.schema.by_alias["0.weight"].shape == (20000, 20000)
    assert preflight_user.SEEN == [("meta", torch.Generator().manual_seed(7).initial_seed())]
    assert fit.label == "preflight_user:recording {widths: [20000, 20000]}"
    assert "0.weight: module has shape (20000×20000) float32" in fit.candidate_warnings([str(path)])[1]


# --------------------------------------------------------------------------- the problem rows at the end of a run

def run_result(problems, invalid, failed=0, run_dir="/elsewhere/runs/x"):
    from types import SimpleNamespace

    return SimpleNamespace(problems=problems, summary={"invalid": invalid, "failed": failed}, run_dir=Path(run_dir))


def test_rows_with_one_error_are_one_line_with_their_count_and_others_keep_their_own():
    from sweep.cli import MAX_ERROR_SHOWN, MAX_IDS_SHOWN, _problem_lines

    long = "; ".join(f"key 'layer{i}.weight': expected shape (16×3) float32, got shape (8×3) float32"
                     for i in range(20))
    problems = ([{"candidate_id": i, "status": "invalid", "error": long, "path": f"f{i}.safetensors"}
                 for i in (0, 2, 3, 5, 6, 8)]
                + [{"candidate_id": 1, "status": "invalid", "error": "short reason", "path": "g.safetensors"},
                   {"candidate_id": 4, "status": "failed", "error": long, "path": "h.safetensors"}])
    lines = _problem_lines(run_result(problems, invalid=7, failed=1), stored=True)
    assert MAX_IDS_SHOWN == 5 and len(long) > MAX_ERROR_SHOWN
    head, shown = lines[0].split(": ", 1)
    assert head == "  6 invalid candidates (0, 2, 3, 5, 6, …)"
    assert shown.endswith(f"; … ({len(long):,} characters)") and len(shown) <= MAX_ERROR_SHOWN + 30
    assert long.startswith(shown.removesuffix(f" … ({len(long):,} characters)"))
    assert lines[1] == "  invalid candidate 1 g.safetensors: short reason"
    assert lines[2].startswith("  failed candidate 4 h.safetensors: key 'layer0.weight'")
    assert lines[3] == ("  full text: sweep show /elsewhere/runs/x --where \"status != 'ok'\" "
                        "--columns candidate_id,status,error --format csv")
    assert len(lines) == 4


def test_short_errors_all_shown_need_no_pointer_and_unstored_results_get_none():
    from sweep.cli import _problem_lines

    problems = [{"candidate_id": 3, "status": "invalid", "error": "bad", "path": "a.safetensors"}]
    assert _problem_lines(run_result(problems, invalid=1), stored=True) == ["  invalid candidate 3 a.safetensors: bad"]
    more = _problem_lines(run_result(problems, invalid=40), stored=True)
    assert more[-1].startswith("  the first 1 of 40 rows that are not ok; all: sweep show ")
    assert _problem_lines(run_result(problems, invalid=40), stored=False) == more[:-1]


def test_the_factory_s_module_is_imported_off_the_meta_device(tmp_path, monkeypatch):
    """A tensor the user's module makes when imported is a real one, though the module is built on meta."""
    (tmp_path / "preflight_import_user.py").write_text(textwrap.dedent('''
        import torch

        MEAN = torch.tensor([0.5, 0.25])

        def model():
            return torch.nn.Linear(2, 1)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "preflight_import_user", raising=False)
    raw = {"name": "t", "model": {"factory": "preflight_import_user:model"},
           "data": {"loader": "sweep.examples.digits:eval_batches"},
           "metrics": {"function": "sweep.examples.digits:metrics"},
           "study": {"kind": "checkpoints", "paths": [str(CHECKPOINTS / "seed0-epoch02.safetensors")]}}
    config = parse_config(raw, base_dir=tmp_path, check_imports=False)
    assert "preflight_import_user" not in sys.modules
    fit, why = ModuleFit.of(config)
    assert why is None and fit.schema.by_alias["weight"].shape == (1, 2)
    assert sys.modules["preflight_import_user"].MEAN.device.type == "cpu"
    assert sys.modules["preflight_import_user"].MEAN.tolist() == [0.5, 0.25]


def test_the_run_summary_prints_findings_without_a_negative_zero(capsys):
    """A flat path's barrier comes out of a max as -0.0: the summary prints 0, and a bool stays a bool."""
    from types import SimpleNamespace

    from sweep.cli import _report

    summary = {"candidates": 3, "ok": 3, "invalid": 0, "failed": 0, "seconds": 0.5, "candidates_per_s": 6.0}
    result = SimpleNamespace(name="flat", summary=summary, findings={"barrier_loss": -0.0, "aligned": True},
                             problems=[], results_dir="/r", mlflow_run_id=None, warnings=[])
    _report(result, None)
    out = capsys.readouterr().out.splitlines()
    assert out[1:3] == ["  barrier_loss: 0", "  aligned: True"]
