"""`sweep bench`: the naive loop and the engine, measured side by side in one run.

The naive loop is what people write by hand: build each candidate's dict
(`A + α·(B − A)`), call `functional_call(..., strict=True)`, read each metric
with `.item()`. The engine is `sweep.evaluate` with an Affine recipe (fp32,
bf16) and the compiled vmapped call. Every figure is candidates per second on
this machine, from this run (chunk sizes too: the bench measures them in a
temporary chunk cache, not the user's); ratios are against the loop of the
same run.

Beside the Affine recipe, every candidate form is measured on one population
(row k = A + α_k·(B − A), flattened in `named_parameters()` order): a list of
explicit dicts, `sweep.Stacked` (a dict of `[K, *shape]` tensors and the flat
`[K, P]` matrix), the `sweep.Noise` recipe, and, when `evotorch` is installed
(`pip install 'sweep[bench]'`), EvoTorch's vectorised `Problem` holding the
same population matrix. The forms and the naive loop are timed in rounds,
each once per round in turn, each keeping its best round; the forms' ratios
are against that loop. A few rows of every form are checked against a plain
`functional_call` loop: a mismatch of the engine's own forms stops the bench
(`BenchMismatch`); EvoTorch's row then says why it has no figure.

The first call of `sweep.evaluate` is timed apart, in fresh processes: once
with an empty chunk cache (the chunk size is measured) and once with the
choice the first process kept (see `sweep.chunking`), against the second
call of the same process (the steady state).
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import torch
from torch.func import functional_call

from . import chunking
from .errors import SweepError
from .evaluator import Evaluator, evaluate, is_out_of_memory
from .examples import models as M
from .examples import zoo as Z  # imports transformers only when one of its models is built
from .messages import first_line
from .recipes import Affine, Noise


@dataclass(frozen=True)
class BenchModel:
    name: str
    make: Callable[[], torch.nn.Module]
    data: Callable[[], List[Any]]
    metrics: Callable[..., Dict[str, torch.Tensor]]
    #: candidates for the engine and for the loop, on (cpu, cuda)
    candidates: Dict[str, int]
    loop_candidates: Dict[str, int]
    #: optional packages the model needs ("transformers"): without one, its row is a note, not figures
    requires: Tuple[str, ...] = ()
    #: on the CPU, only the main row (loop, fp32, bf16): compile, the candidate forms and the first call in
    #: fresh processes each take minutes for a model of GPT-2's size there (CPU_MAIN_ONLY says so in a note)
    cpu_main_only: bool = False


MODELS = (
    BenchModel("mlp-32-16-1 (batch 64)", lambda: M.mlp((32, 16, 1)), lambda: M.regression_batches(32, 64),
               M.mse, {"cpu": 20_000, "cuda": 200_000}, {"cpu": 2_000, "cuda": 2_000}),
    BenchModel("mlp-784-1024-1024-10 (batch 1024)", lambda: M.mlp((784, 1024, 1024, 10)),
               lambda: M.classification_batches(784, 10, 1024), M.classification,
               {"cpu": 48, "cuda": 8_192}, {"cpu": 12, "cuda": 500}),
    BenchModel("gpt-2x128 (8x64 tokens)", lambda: M.gpt(256, 128, 2, 4, 64), lambda: M.token_batches(256, 64, 8),
               M.language_model, {"cpu": 96, "cuda": 4_096}, {"cpu": 24, "cuda": 300}),
    BenchModel("cnn-bn (batch 64, 32x32)", lambda: M.cnn(16), lambda: M.image_batches(64, 32),
               M.classification, {"cpu": 96, "cuda": 4_096}, {"cpu": 24, "cuda": 300}),
    # transformers' own models, random weights from their configs (sweep.examples.zoo): shown when
    # transformers is installed (`pip install 'sweep[transformers]'`), a note otherwise.
    BenchModel("gpt2-small (1x32 tokens)", Z.gpt2_small, lambda: Z.token_batches(vocab=50257, length=32, batch=1, batches=1),
               Z.causal_lm, {"cpu": 4, "cuda": 256}, {"cpu": 2, "cuda": 32}, requires=("transformers",),
               cpu_main_only=True),
    BenchModel("resnet-18 (8 images 64x64)", lambda: Z.resnet18(10),
               lambda: Z.image_batches(size=64, classes=10, batch=8, batches=1),
               Z.classification, {"cpu": 8, "cuda": 1_024}, {"cpu": 4, "cuda": 100}, requires=("transformers",),
               cpu_main_only=True),
)


#: The note of a model measured on the CPU by its main row alone (`BenchModel.cpu_main_only`).
CPU_MAIN_ONLY = ("loop, fp32 and bf16 only on the CPU (compiling it, the candidate forms and the first call "
                 "in fresh processes take minutes each for a model this size there); --device cuda measures all")


def missing_requirement(spec: "BenchModel") -> Optional[str]:
    """Why `spec` cannot be measured here (an optional package it needs is missing or fails to import), or None."""
    from .zoo import TORCHVISION_EXTRA, TRANSFORMERS_EXTRA

    extras = {"transformers": TRANSFORMERS_EXTRA, "torchvision": TORCHVISION_EXTRA}
    for package in spec.requires:
        try:
            __import__(package)
        except Exception as e:  # noqa: BLE001 - a package that fails on import counts as missing
            return f"not measured: {package} is not importable ({first_line(e, 120)}): {extras.get(package, package)}"
    return None


#: The candidate forms measured on one population, in the order shown, with their column titles.
FORMS = {"dicts": "dicts", "stacked": "Stacked", "stacked_flat": "Stacked[K,P]", "noise": "Noise",
         "evotorch": "EvoTorch"}
#: Bytes the population of the candidate forms may take (a [K, P] float32 matrix; K is capped to fit).
FORM_BYTES = {"cpu": 1 * 1024**3, "cuda": 8 * 1024**3}
#: Times the naive loop is timed; it keeps its best.
LOOP_ROUNDS = 3
#: Rounds the forms are timed in, each form once per round in turn; each keeps its best.
FORM_ROUNDS = 5
#: Noise's sigma for the Noise form.
NOISE_SIGMA = 0.01
#: Rows of every form checked against the functional_call loop: the first, the middle and the last.
SPOT_ROWS = 3
#: The check's tolerance: relative for fp32 (results equal to the loop's), looser for bf16 weights.
SPOT_RTOL = {"fp32": 1e-5, "bf16": 5e-2}
SPOT_ATOL = 1e-7
#: Forms of other libraries, measured for comparison: when one fails or differs from the loop, its cell
#: says why and the bench goes on (the engine's own forms stop it).
COMPARED = ("evotorch",)
EVOTORCH_MISSING = "evotorch not installed (pip install 'sweep[bench]')"
STACKED_MISSING = "not available (this sweep has no sweep.Stacked)"
#: The first-call rows: seconds a fresh process may take (importing torch included) before it counts as failed.
FIRST_CALL_TIMEOUT = 600


class BenchMismatch(SweepError):
    """A form's rows differ from the functional_call loop's: the bench stops rather than print its figures."""


@dataclass
class Result:
    model: str
    params: int
    candidates: int
    loop: float
    engine: Dict[str, float] = field(default_factory=dict)
    ratio: Dict[str, float] = field(default_factory=dict)
    compile_seconds: Optional[float] = None
    #: how the engine ran its chunks: "vmap" or "loop"
    strategy: str = ""
    chunk_size: int = 0
    roofline: Optional[float] = None
    #: each engine figure's and each form's rate over the roofline rate
    roofline_fraction: Dict[str, float] = field(default_factory=dict)
    #: candidates in the population the forms are measured on (K, capped by FORM_BYTES)
    form_candidates: int = 0
    #: candidates/s of each form in FORMS (fp32), and × the naive loop
    forms: Dict[str, float] = field(default_factory=dict)
    form_ratio: Dict[str, float] = field(default_factory=dict)
    #: candidates/s of the naive loop timed in the same rounds as the forms (their ratios are against it)
    form_loop: float = 0.0
    #: why a form (or the first-call rows) has no figure
    notes: Dict[str, str] = field(default_factory=dict)
    #: what was checked equal to the functional_call loop ("fp32", "bf16", "compiled", and the forms)
    checked: List[str] = field(default_factory=list)
    #: seconds of a fresh process's first `sweep.evaluate` (Affine, fp32, `candidates` rows): "cold" (empty
    #: chunk cache), "warm" (the kept choice read back), and "steady" (the second call in that process)
    first_call: Dict[str, float] = field(default_factory=dict)
    first_call_rate: Dict[str, float] = field(default_factory=dict)
    first_call_ratio: Dict[str, float] = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _anchors(module: torch.nn.Module, device: torch.device):
    torch.manual_seed(0)
    a = {n: p.detach().to(device) for n, p in module.named_parameters()}
    d = {n: torch.randn_like(t) * 0.01 for n, t in a.items()}
    return a, d


def naive_loop(module, a, d, alphas, data, metrics) -> None:
    """The hand-written loop every peer runs: one dict and one functional_call per candidate."""
    buffers = dict(module.named_buffers())
    with torch.no_grad():
        for alpha in alphas:
            params = {n: a[n] + alpha * d[n] for n in a}
            for x, y in data:
                out = functional_call(module, {**params, **buffers}, (x,), strict=True)
                {k: v.item() for k, v in metrics(out, y).items()}


def _rate(n: int, fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return n / (time.perf_counter() - start)


def _seconds(fn: Callable[[], Any], device: torch.device) -> float:
    return _timed_call(fn, device)[0]


def _timed_call(fn: Callable[[], Any], device: torch.device) -> Tuple[float, Any]:
    """(seconds, what `fn` returned), the device synchronised before and after."""
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


# -- the spot check ----------------------------------------------------------------
def reference_metrics(module: torch.nn.Module, params: Dict[str, torch.Tensor], data, metrics) -> Dict[str, float]:
    """One candidate's metrics from a plain functional_call over the data, each batch weighted by its size
    (as `sweep.evaluate` averages them)."""
    buffers = dict(module.named_buffers())
    sums: Dict[str, float] = {}
    total = 0
    with torch.no_grad():
        for x, y in data:
            n = int(y.shape[0]) if isinstance(y, torch.Tensor) and y.dim() else 1
            out = functional_call(module, {**buffers, **params}, (x,), strict=True)
            for name, value in metrics(out, y).items():
                sums[name] = sums.get(name, 0.0) + float(value) * n
            total += n
    return {name: value / total for name, value in sums.items()}


def spot_rows(k: int) -> List[int]:
    """The rows the spot check looks at: the first, the middle and the last (SPOT_ROWS of them)."""
    return sorted({int(i) for i in np.linspace(0, k - 1, SPOT_ROWS)})


def spot_check(form: str, got: Callable[[int], Dict[str, Optional[float]]],
               candidate: Callable[[int], Dict[str, torch.Tensor]], k: int, module, data, metrics,
               precision: str = "fp32") -> None:
    """Raise `BenchMismatch` when row i of `form` (`got(i)`: metric name → value, None when the row is not
    ok) differs from the functional_call loop on `candidate(i)`, for the rows of `spot_rows(k)`."""
    rtol = SPOT_RTOL[precision]
    for i in spot_rows(k):
        expected = reference_metrics(module, candidate(i), data, metrics)
        values = got(i)
        for name, value in values.items():
            if name not in expected:
                continue
            want = expected[name]
            if value is None or not math.isclose(value, want, rel_tol=rtol, abs_tol=SPOT_ATOL):
                raise BenchMismatch(
                    f"bench: {form} row {i}: metric '{name}' is {value!r}, the functional_call loop gives {want!r} "
                    f"(relative tolerance {rtol:g}); this form's results are wrong, so its figures are not shown")
        if not set(values) & set(expected):
            raise BenchMismatch(f"bench: {form} row {i} has none of the metrics {sorted(expected)}")


def table_row(table: pa.Table) -> Callable[[int], Dict[str, Optional[float]]]:
    """Row i of a results table as float column → value (None when the row is not ok)."""
    names = [f.name for f in table.schema if pa.types.is_floating(f.type) and f.name != "eval_seconds"]

    def row(i: int) -> Dict[str, Optional[float]]:
        ok = table.column("status")[i].as_py() == "ok"
        return {n: (table.column(n)[i].as_py() if ok else None) for n in names}
    return row


# -- the candidate forms -------------------------------------------------------------
class Population:
    """K candidates as one [K, P] float32 matrix (row k flattened in `named_parameters()` order), and the
    same candidates as the other forms see them."""

    def __init__(self, module: torch.nn.Module, matrix: torch.Tensor):
        self.module, self.matrix = module, matrix
        self.names: List[Tuple[str, Tuple[int, ...]]] = [(n, tuple(p.shape)) for n, p in module.named_parameters()]
        self.sizes = [math.prod(shape) for _, shape in self.names]

    def __len__(self) -> int:
        return int(self.matrix.shape[0])

    def row(self, i: int) -> Dict[str, torch.Tensor]:
        """Candidate i as a dict of views into the matrix."""
        parts = torch.split(self.matrix[i], self.sizes)
        return {n: t.view(shape) for (n, shape), t in zip(self.names, parts)}

    def dicts(self) -> List[Dict[str, torch.Tensor]]:
        return [self.row(i) for i in range(len(self))]

    def stacked(self) -> Dict[str, torch.Tensor]:
        """One contiguous [K, *shape] tensor per parameter (what `torch.func.stack_module_state` gives)."""
        parts = torch.split(self.matrix, self.sizes, dim=1)
        return {n: t.reshape((len(self),) + shape).contiguous() for (n, shape), t in zip(self.names, parts)}


def population(module: torch.nn.Module, a, d, alphas: torch.Tensor) -> Population:
    """Row k = a + α_k·d, flattened: the Affine recipe's candidates, held as a matrix."""
    flat_a = torch.cat([a[n].reshape(-1) for n, _ in module.named_parameters()])
    flat_d = torch.cat([d[n].reshape(-1) for n, _ in module.named_parameters()])
    return Population(module, torch.addcmul(flat_a.unsqueeze(0), alphas[:, None].to(flat_a), flat_d.unsqueeze(0)))


def recipe_candidate(module, recipe, data, metrics, device: torch.device) -> Callable[[int], Dict[str, torch.Tensor]]:
    """Candidate i of `recipe`, materialised alone through the recipe's own rows (the check then evaluates
    it with functional_call, apart from the engine's chunks)."""
    ev = Evaluator(module, data[:1], metrics, device=device, chunk_size=1)
    prepared = ev._prepare(recipe.anchors())
    if isinstance(prepared, str):
        raise BenchMismatch(f"bench: the recipe's anchors are invalid: {prepared}")
    ev.restore()

    def candidate(i: int) -> Dict[str, torch.Tensor]:
        flat = recipe.rows().slice(i, i + 1).materialise(prepared, device)
        return {n: t[0] for n, t in prepared.unflatten(flat, torch.float32).items()}
    return candidate


def evotorch_problem(module: torch.nn.Module, data, metrics, pop: Population, device: torch.device):
    """EvoTorch's vectorised `Problem` over `pop`'s matrix: (evaluate(), fitness of row i), or the note that
    says why there is none. Its fitness is the first metric, each batch weighted by its size."""
    try:
        from evotorch import Problem
        from evotorch.neuroevolution.net import make_functional_module
    except ImportError as e:
        if getattr(e, "name", None) == "evotorch":
            return None, EVOTORCH_MISSING
        return None, f"evotorch not importable ({first_line(e)})"
    logging.getLogger("evotorch").setLevel(logging.WARNING)  # its INFO lines go to stdout (--json reads it)
    fnet = make_functional_module(module, disable_autograd_tracking=True)
    if fnet.parameter_length != pop.matrix.shape[1]:
        return None, f"EvoTorch counts {fnet.parameter_length} parameters, the population has {pop.matrix.shape[1]}"
    with torch.no_grad():
        name = next(iter(metrics(module(data[0][0]), data[0][1])))
    total = sum(int(y.shape[0]) for _, y in data)

    def fitness(matrix: torch.Tensor) -> torch.Tensor:
        out = 0.0
        for x, y in data:
            outputs = torch.func.vmap(fnet, in_dims=(0, None))(matrix, x)
            out = out + torch.func.vmap(lambda o: metrics(o, y)[name])(outputs) * (int(y.shape[0]) / total)
        return out

    problem = Problem("min", fitness, solution_length=pop.matrix.shape[1], initial_bounds=(-1.0, 1.0),
                      vectorized=True, device=device, dtype=torch.float32)
    batch = problem.generate_batch(len(pop))
    batch.set_values(pop.matrix)

    def run() -> None:
        _evaluate_in_slices(problem, batch, len(pop))

    def row(i: int) -> Dict[str, Optional[float]]:
        return {name: float(torch.as_tensor(batch.evals[i, 0]))}
    return (run, row), ""


def _evaluate_in_slices(problem, batch, k: int) -> None:
    """The whole population in one call, as EvoTorch users run it; in halves while that runs out of memory."""
    size = k
    while True:
        try:
            for start in range(0, k, size):
                problem.evaluate(batch[start:start + size])
            return
        except Exception as e:  # noqa: BLE001 - only running out of memory is retried
            if not is_out_of_memory(e) or size == 1:
                raise
            size = max(1, size // 2)


def measure_forms(result: "Result", spec: "BenchModel", module, data, a, d, alphas: torch.Tensor,
                  dev: torch.device, log: Callable[[str], None], k_loop: int) -> None:
    """Fill `result.forms` (and its notes and checks): every candidate form on one population, side by side."""
    kind = "cuda" if dev.type == "cuda" else "cpu"
    width = sum(p.numel() for p in module.parameters())
    k = max(2, min(len(alphas), FORM_BYTES[kind] // max(4 * width, 1)))
    result.form_candidates = k
    pop = population(module, a, d, alphas[:k])
    runs: Dict[str, Tuple[Callable[[], Any], Callable[[int], Dict[str, Optional[float]]]]] = {}

    def engine(candidates_of: Callable[[], Any]):
        tables: List[pa.Table] = []

        def run() -> None:
            tables[:] = [evaluate(module, candidates_of(), data, spec.metrics, device=dev)]
        return run, lambda i: table_row(tables[0])(i)

    dicts = pop.dicts()
    runs["dicts"] = engine(lambda: dicts)
    import sweep

    stacked_class = getattr(sweep, "Stacked", None)
    if stacked_class is None:
        result.notes["stacked"] = result.notes["stacked_flat"] = STACKED_MISSING
    else:
        per_key = pop.stacked()
        runs["stacked"] = engine(lambda: stacked_class(per_key))
        runs["stacked_flat"] = engine(lambda: stacked_class(pop.matrix))
    seeds = np.arange(k, dtype=np.int64)
    noise = Noise(a, NOISE_SIGMA, seeds)
    runs["noise"] = engine(lambda: noise)
    problem, note = evotorch_problem(module, data, spec.metrics, pop, dev)
    if problem is None:
        result.notes["evotorch"] = note
    else:
        runs["evotorch"] = problem

    noise_candidate = recipe_candidate(module, noise, data, spec.metrics, dev)
    forms = []
    for form in FORMS:
        if form not in runs:
            continue
        log(f"bench: {spec.name}: {FORMS[form]}")
        run, row = runs[form]
        try:
            run()  # warm-up: the chunk size is chosen (measured or read) for this count
            spot_check(FORMS[form], row, noise_candidate if form == "noise" else pop.row, k, module, data,
                       spec.metrics)
        except Exception as e:  # noqa: BLE001 - the engine's own forms stop the bench; the comparison is noted
            if form not in COMPARED:
                raise
            result.notes[form] = f"not shown: {first_line(e)}"
            continue
        forms.append(form)
        result.checked.append(form)
    # Round after round, each form once in turn: a slow moment of the machine falls on all forms alike,
    # and each form keeps its best round.
    # The naive loop takes its turn in every round too: the ratios compare what ran side by side.
    loop_alphas = alphas[:k_loop].tolist()
    best: Dict[str, float] = {}
    for _ in range(FORM_ROUNDS):
        best["loop"] = min(best.get("loop", math.inf),
                           _seconds(lambda: naive_loop(module, a, d, loop_alphas, data, spec.metrics), dev))
        for form in forms:
            best[form] = min(best.get(form, math.inf), _seconds(runs[form][0], dev))
    result.form_loop = len(loop_alphas) / best["loop"]
    for form in forms:
        result.forms[form] = k / best[form]
        result.form_ratio[form] = result.forms[form] / result.form_loop


# -- the first call, in fresh processes -------------------------------------------------
def first_call_child() -> None:
    """In a fresh process (`first_call` starts it): time one Affine `sweep.evaluate`, then a second; print JSON
    with the seconds of each and how many chunk choices the cache held before the first. With `loop`, the
    naive loop over k candidates instead, its first call and its second."""
    spec_name, device, k, threads, mode = json.loads(sys.argv[1])
    torch.set_num_threads(threads)
    spec = next(s for s in MODELS if s.name == spec_name)
    dev = torch.device(device)
    torch.manual_seed(0)
    module = spec.make().to(dev).eval()
    data = [(x.to(dev), y.to(dev)) for x, y in spec.data()]
    a, d = _anchors(module, dev)
    alphas = torch.linspace(0, 1, k, device=dev)
    if mode == "loop":
        run = lambda: naive_loop(module, a, d, alphas.tolist(), data, spec.metrics)  # noqa: E731
        kept = 0
    else:
        recipe = Affine(a, [d], alphas[:, None])
        run = lambda: evaluate(module, recipe, data, spec.metrics, device=dev)  # noqa: E731
        folder = chunking.cache_dir()
        kept = len(list((folder / chunking.CHUNK_FOLDER).glob("*.json"))) if folder is not None else 0
    first = _seconds(run, dev)
    steady = _seconds(run, dev)
    print(json.dumps({"first": first, "steady": steady, "kept": kept}))


def first_call(spec: "BenchModel", device: str, k: int, cache: Optional[Path] = None,
               k_loop: int = 0) -> Tuple[Dict[str, float], str]:
    """Seconds of a fresh process's first Affine `sweep.evaluate` of k rows with an empty chunk cache ("cold")
    and with the choice that process kept ("warm"), and of the second call ("steady", the faster of the two
    processes'); with `k_loop`, the naive loop's first call over k_loop candidates in a fresh process of its
    own ("loop", scaled to k rows); and a note when the first process kept no choice. The cache is `cache`
    (an empty folder) or a temporary one: the user's own is neither read nor written."""
    with tempfile.TemporaryDirectory(prefix="sweep-bench-cache-") as temporary:
        folder = str(cache or temporary)
        runs = [_fresh_process(spec, device, k, folder) for _ in ("cold", "warm")]
        loop = _fresh_process(spec, device, k_loop, folder, "loop") if k_loop else None
    note = "" if runs[1]["kept"] else "the cold process kept no chunk choice, so the warm one measured again"
    seconds = {"cold": runs[0]["first"], "warm": runs[1]["first"], "steady": min(r["steady"] for r in runs)}
    if loop is not None:
        seconds["loop"] = loop["first"] * k / k_loop
    return seconds, note


def _fresh_process(spec: "BenchModel", device: str, k: int, cache: str, mode: str = "engine") -> Dict[str, float]:
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, chunking.CACHE_ENV: cache,
           "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}
    code = "from sweep.bench import first_call_child; first_call_child()"
    args = json.dumps([spec.name, device, k, torch.get_num_threads(), mode])
    done = subprocess.run([sys.executable, "-c", code, args], env=env, capture_output=True, text=True,
                          timeout=FIRST_CALL_TIMEOUT)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the fresh process exited with {done.returncode}: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bandwidth_and_flops(device: torch.device) -> Dict[str, float]:
    """Measured device copy bandwidth (bytes/s) and bf16 matmul rate (FLOP/s)."""
    x = torch.empty(256 * 1024**2 // 2, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    _sync(device)
    start = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    _sync(device)
    bandwidth = 2 * x.numel() * 2 * 10 / (time.perf_counter() - start)
    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    _sync(device)
    flops = 2 * n**3 * 10 / (time.perf_counter() - start)
    return {"bandwidth": bandwidth, "matmul_flops": flops}


def roofline_rate(module, data, metrics, ceilings: Dict[str, float]) -> float:
    """Candidates/s if each candidate cost only its bf16 weight traffic or its FLOPs, whichever is more."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        for x, _ in data:
            module(x)
    flops = counter.get_total_flops()
    weight_bytes = 2 * 2 * sum(p.numel() for p in module.parameters())  # bf16, written once and read once
    return 1.0 / max(flops / ceilings["matmul_flops"], weight_bytes / ceilings["bandwidth"])


def run_bench(device: str = "cpu", models: Optional[List[str]] = None, *, compile: bool = True,
              scale: float = 1.0, log: Callable[[str], None] = lambda s: None, forms: bool = True,
              first: bool = True) -> List[Result]:
    """Measure every model of MODELS whose name contains one of `models` (all when None). `forms` adds the
    candidate forms' rows (see FORMS), `first` the first call in fresh processes. Chunk sizes are measured in
    this run, in a temporary chunk cache: the user's own is neither read nor written."""
    with tempfile.TemporaryDirectory(prefix="sweep-bench-cache-") as folder:
        previous = os.environ.get(chunking.CACHE_ENV)
        os.environ[chunking.CACHE_ENV] = folder
        try:
            return _run_bench(device, models, compile=compile, scale=scale, log=log, forms=forms, first=first)
        finally:
            if previous is None:
                os.environ.pop(chunking.CACHE_ENV, None)
            else:
                os.environ[chunking.CACHE_ENV] = previous


def _run_bench(device: str, models: Optional[List[str]], *, compile: bool, scale: float,
               log: Callable[[str], None], forms: bool, first: bool) -> List[Result]:
    dev = torch.device(device)
    kind = "cuda" if dev.type == "cuda" else "cpu"
    ceilings = bandwidth_and_flops(dev) if kind == "cuda" else None
    results = []
    for spec in MODELS:
        if models and not any(m in spec.name for m in models):
            continue
        missing = missing_requirement(spec)
        if missing is not None:
            log(f"bench: {spec.name}: {missing}")
            results.append(Result(spec.name, 0, 0, 0.0, notes={"skipped": missing}))
            continue
        log(f"bench: {spec.name}")
        torch.manual_seed(0)
        module = spec.make().to(dev).eval()
        data = [(x.to(dev), y.to(dev)) for x, y in spec.data()]
        a, d = _anchors(module, dev)
        k = max(4, int(spec.candidates[kind] * scale))
        k_loop = max(2, int(spec.loop_candidates[kind] * scale))
        alphas = torch.linspace(0, 1, k, device=dev)
        result = Result(spec.name, sum(p.numel() for p in module.parameters()), k, 0.0)

        naive_loop(module, a, d, alphas[:2].tolist(), data, spec.metrics)  # warm-up
        result.loop = max(_rate(k_loop, lambda: naive_loop(module, a, d, alphas[:k_loop].tolist(), data, spec.metrics),
                                dev) for _ in range(LOOP_ROUNDS))  # its best: the ratios err on the loop's side

        def affine_row(i: int) -> Dict[str, torch.Tensor]:
            return {n: a[n] + alphas[i] * d[n] for n in a}

        for precision in ("fp32", "bf16"):
            recipe = Affine(a, [d], alphas[:, None])
            # Warm-up with the same count: the chunk size is measured once per process and count.
            evaluate(module, recipe, data, spec.metrics, device=dev, precision=precision)
            seconds, table = _timed_call(
                lambda: evaluate(module, recipe, data, spec.metrics, device=dev, precision=precision), dev)
            result.engine[precision] = k / seconds
            spot_check(f"Affine {precision}", table_row(table), affine_row, k, module, data, spec.metrics, precision)
            result.checked.append(precision)
        probe = Evaluator(module, data, spec.metrics, device=dev)
        probe.run(Affine(a, [d], alphas[:, None]))
        result.strategy, result.chunk_size = probe.strategy or "", probe.chunk_size or 0
        probe.restore()
        main_only = spec.cpu_main_only and kind == "cpu"
        if main_only and (compile or forms or first):
            result.notes["measured"] = CPU_MAIN_ONLY

        if compile and not main_only:
            precision = "bf16" if kind == "cuda" else "fp32"
            ev = Evaluator(module, data, spec.metrics, device=dev, precision=precision, compile=True)
            start = time.perf_counter()
            ev.run(Affine(a, [d], alphas[: ev._chunk_hint(), None]))
            _sync(dev)
            result.compile_seconds = time.perf_counter() - start
            seconds, table = _timed_call(lambda: ev.run(Affine(a, [d], alphas[:, None])), dev)
            result.engine["compiled"] = k / seconds
            ev.restore()
            spot_check("Affine compiled", table_row(table), affine_row, k, module, data, spec.metrics, precision)
            result.checked.append("compiled")
        del table
        result.ratio = {key: rate / result.loop for key, rate in result.engine.items()}
        if forms and not main_only:
            measure_forms(result, spec, module, data, a, d, alphas, dev, log, k_loop)
        if ceilings is not None:
            result.roofline = roofline_rate(module, data, spec.metrics, ceilings)
            result.roofline_fraction = {key: rate / result.roofline
                                        for key, rate in {**result.engine, **result.forms}.items()}
        if first and not main_only:
            log(f"bench: {spec.name}: the first call, in fresh processes")
            try:
                result.first_call, note = first_call(spec, device, k, k_loop=k_loop)
                if note:
                    result.notes["first_call"] = note
            except (OSError, RuntimeError, ValueError, subprocess.TimeoutExpired) as e:
                result.notes["first_call"] = f"not measured: {first_line(e)}"
            result.first_call_rate = {key: k / max(s, 1e-9) for key, s in result.first_call.items()}
            result.first_call_ratio = {key: rate / result.loop for key, rate in result.first_call_rate.items()}
        results.append(result)
    return results


def environment(device: str) -> Dict[str, Any]:
    info = {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine(), "processor": chunking.device_name(torch.device("cpu"))}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def figure(rate: float) -> str:
    """Candidates per second as the tables show them: whole numbers, with two decimals below 10 (a model of
    GPT-2's size runs a few candidates per second on a CPU)."""
    return f"{rate:,.0f}" if rate >= 10 else f"{rate:.2f}"


def format_table(results: List[Result], env: Dict[str, Any]) -> str:
    head = f"sweep bench on {env.get('gpu', env['processor'])} ({env['device']}, torch {env['torch']}, {env['threads']} threads)"
    lines = [head, "candidates/s (× the naive loop of this run)"]
    header = f"{'model':<36}{'params':>10}{'K':>8}{'loop':>10}{'fp32':>20}{'bf16':>20}{'compiled':>20}  strategy"
    lines.append(header)
    lines.append("-" * len(header))
    for r in results:
        if not r.engine:  # not measured here: its note says why
            continue
        cells = []
        for key in ("fp32", "bf16", "compiled"):
            if key in r.engine:
                cells.append(f"{figure(r.engine[key]):>11} ({r.ratio[key]:>5.1f}×)")
            else:
                cells.append(f"{'–':>20}")
        lines.append(f"{r.model:<36}{r.params:>10,}{r.candidates:>8,}{figure(r.loop):>10}" + "".join(f"{c:>20}" for c in cells)
                     + f"  {r.strategy} {r.chunk_size}")
    compiled = [r for r in results if r.compile_seconds is not None]
    if compiled:
        lines.append("compile time (first chunk, apart from the figures above): "
                     + ", ".join(f"{r.model.split(' ')[0]} {r.compile_seconds:.1f} s" for r in compiled))
    formed = [r for r in results if r.form_candidates]
    if formed:
        lines.append("")
        lines.append(f"candidate forms on one population of K candidates, fp32, timed in {FORM_ROUNDS} rounds with the "
                     f"naive loop (each its best): candidates/s (× that loop)")
        header = f"{'model':<36}{'K':>8}{'loop':>10}" + "".join(f"{title:>20}" for title in FORMS.values())
        lines.append(header)
        lines.append("-" * len(header))
        for r in formed:
            cells = [f"{figure(r.forms[f]):>11} ({r.form_ratio[f]:>5.1f}×)" if f in r.forms else "–" for f in FORMS]
            lines.append(f"{r.model:<36}{r.form_candidates:>8,}{figure(r.form_loop):>10}" + "".join(f"{c:>20}" for c in cells))
    firsts = [r for r in results if r.first_call]
    if firsts:
        lines.append("")
        lines.append("the first sweep.evaluate in a fresh process (Affine, fp32, K rows), and the naive loop's first "
                     "call in one of its own: candidates/s (× the naive loop above), seconds for K rows")
        titles = {"cold": "cold chunk cache", "warm": "warm chunk cache", "steady": "second call",
                  "loop": "naive loop, fresh"}
        header = f"{'model':<36}{'K':>8}" + "".join(f"{t:>24}" for t in titles.values())
        lines.append(header)
        lines.append("-" * len(header))
        for r in firsts:
            cells = [f"{figure(r.first_call_rate[key]):>9} ({r.first_call_ratio[key]:>5.1f}×) {r.first_call[key]:.2f}s"
                     if key in r.first_call else "–" for key in titles]
            lines.append(f"{r.model:<36}{r.candidates:>8,}" + "".join(f"{c:>24}" for c in cells))
    checked = [r for r in results if r.checked]
    if checked:
        lines.append(f"checked equal to the functional_call loop on the first, middle and last rows (relative "
                     f"{SPOT_RTOL['fp32']:g} in fp32, {SPOT_RTOL['bf16']:g} with bf16 weights): "
                     + "; ".join(f"{r.model.split(' ')[0]} {', '.join(r.checked)}" for r in checked))
    noted = sorted({(r.model.split(' ')[0], key, note) for r in results for key, note in r.notes.items()})
    for model, key, note in noted:
        lines.append(f"{model} {FORMS.get(key, key.replace('_', ' '))}: {note}")
    roof = [r for r in results if r.roofline]
    if roof:
        lines.append("bf16 roofline floor (max of weight traffic and FLOPs at the measured ceilings):")
        for r in roof:
            fractions = ", ".join(f"{k} {v:.0%}" for k, v in r.roofline_fraction.items())
            lines.append(f"  {r.model:<36} {r.roofline:>12,.0f}/s  ({fractions})")
    return "\n".join(lines)


def main(device: str, as_json: bool, models: Optional[List[str]], compile: bool, scale: float, *,
         forms: bool = True, first: bool = True) -> int:
    env = environment(device)
    results = run_bench(device, models, compile=compile, scale=scale,
                        log=lambda s: print(s, file=sys.stderr, flush=True), forms=forms, first=first)
    if as_json:
        print(json.dumps({"environment": env, "results": [asdict(r) for r in results]}, indent=2))
    else:
        print(format_table(results, env))
    return 0
