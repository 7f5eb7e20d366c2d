"""`sweep bench`: the naive loop and the engine, measured side by side in one run.

The naive loop is what people write by hand: build each candidate's dict
(`A + α·(B − A)`), call `functional_call(..., strict=True)`, read each metric
with `.item()`. The engine is `sweep.evaluate` with an Affine recipe (fp32,
bf16) and the compiled vmapped call. Every figure is candidates per second on
this machine, from this run; ratios are against the loop of the same run.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
from torch.func import functional_call

from .evaluator import Evaluator, evaluate
from .examples import models as M
from .recipes import Affine


@dataclass(frozen=True)
class BenchModel:
    name: str
    make: Callable[[], torch.nn.Module]
    data: Callable[[], List[Any]]
    metrics: Callable[..., Dict[str, torch.Tensor]]
    #: candidates for the engine and for the loop, on (cpu, cuda)
    candidates: Dict[str, int]
    loop_candidates: Dict[str, int]


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
)


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
    roofline_fraction: Dict[str, float] = field(default_factory=dict)


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
              scale: float = 1.0, log: Callable[[str], None] = lambda s: None) -> List[Result]:
    dev = torch.device(device)
    kind = "cuda" if dev.type == "cuda" else "cpu"
    ceilings = bandwidth_and_flops(dev) if kind == "cuda" else None
    results = []
    for spec in MODELS:
        if models and not any(m in spec.name for m in models):
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
        result.loop = _rate(k_loop, lambda: naive_loop(module, a, d, alphas[:k_loop].tolist(), data, spec.metrics), dev)

        for precision in ("fp32", "bf16"):
            recipe = Affine(a, [d], alphas[:, None])
            # Warm-up with the same count: the chunk size is measured once per process and count.
            evaluate(module, recipe, data, spec.metrics, device=dev, precision=precision)
            result.engine[precision] = _rate(
                k, lambda: evaluate(module, recipe, data, spec.metrics, device=dev, precision=precision), dev)
        probe = Evaluator(module, data, spec.metrics, device=dev)
        probe.run(Affine(a, [d], alphas[:, None]))
        result.strategy, result.chunk_size = probe.strategy or "", probe.chunk_size or 0
        probe.restore()

        if compile:
            ev = Evaluator(module, data, spec.metrics, device=dev, precision="bf16" if kind == "cuda" else "fp32",
                           compile=True)
            start = time.perf_counter()
            ev.run(Affine(a, [d], alphas[: ev._chunk_hint(), None]))
            _sync(dev)
            result.compile_seconds = time.perf_counter() - start
            result.engine["compiled"] = _rate(k, lambda: ev.run(Affine(a, [d], alphas[:, None])), dev)
            ev.restore()
        result.ratio = {key: rate / result.loop for key, rate in result.engine.items()}
        if ceilings is not None:
            result.roofline = roofline_rate(module, data, spec.metrics, ceilings)
            result.roofline_fraction = {key: rate / result.roofline for key, rate in result.engine.items()}
        results.append(result)
    return results


def environment(device: str) -> Dict[str, Any]:
    info = {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine(), "processor": platform.processor() or platform.machine()}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def format_table(results: List[Result], env: Dict[str, Any]) -> str:
    head = f"sweep bench on {env.get('gpu', env['processor'])} ({env['device']}, torch {env['torch']}, {env['threads']} threads)"
    lines = [head, "candidates/s (× the naive loop of this run)"]
    header = f"{'model':<36}{'params':>10}{'K':>8}{'loop':>10}{'fp32':>20}{'bf16':>20}{'compiled':>20}  strategy"
    lines.append(header)
    lines.append("-" * len(header))
    for r in results:
        cells = []
        for key in ("fp32", "bf16", "compiled"):
            if key in r.engine:
                cells.append(f"{r.engine[key]:>11,.0f} ({r.ratio[key]:>5.1f}×)")
            else:
                cells.append(f"{'–':>20}")
        lines.append(f"{r.model:<36}{r.params:>10,}{r.candidates:>8,}{r.loop:>10,.0f}" + "".join(f"{c:>20}" for c in cells)
                     + f"  {r.strategy} {r.chunk_size}")
    compiled = [r for r in results if r.compile_seconds is not None]
    if compiled:
        lines.append("compile time (first chunk, apart from the figures above): "
                     + ", ".join(f"{r.model.split(' ')[0]} {r.compile_seconds:.1f} s" for r in compiled))
    roof = [r for r in results if r.roofline]
    if roof:
        lines.append("bf16 roofline floor (max of weight traffic and FLOPs at the measured ceilings):")
        for r in roof:
            fractions = ", ".join(f"{k} {v:.0%}" for k, v in r.roofline_fraction.items())
            lines.append(f"  {r.model:<36} {r.roofline:>12,.0f}/s  ({fractions})")
    return "\n".join(lines)


def main(device: str, as_json: bool, models: Optional[List[str]], compile: bool, scale: float) -> int:
    env = environment(device)
    results = run_bench(device, models, compile=compile, scale=scale,
                        log=lambda s: print(s, file=sys.stderr, flush=True))
    if as_json:
        print(json.dumps({"environment": env, "results": [asdict(r) for r in results]}, indent=2))
    else:
        print(format_table(results, env))
    return 0
