"""Peak memory of the driver and of each worker in a `checkpoints` sweep of large checkpoint folders.

    python benchmarks/checkpoint_rss.py                  # 8 GPT-2-small folders (~500 MB each), 2 workers
    python benchmarks/checkpoint_rss.py --count 4 --layers 2   # a quicker look (smaller folders)
    python benchmarks/checkpoint_rss.py --json           # the figures as one JSON object
    python benchmarks/checkpoint_rss.py --files          # the same, the study naming each folder's
                                                         # model.safetensors (for a sweep that reads files only)

Writes `--count` checkpoint folders of `transformers.GPT2LMHeadModel(GPT2Config())` (GPT-2 small: 124M
parameters, random weights, about 500 MB each in float32) with `save_pretrained` into a temporary folder,
then runs `sweep run` on a `checkpoints` study of those folders with 2 local workers, as a user would
(`--no-progress --no-report`, MLflow off, the evaluation on 2 sequences of 32 tokens). While it runs, the
script samples every process's `/proc/<pid>/status` every 50 ms: the driver (the `sweep run` process) and
each worker (the processes titled `ray::SweepWorker…`); a process's VmHWM is its peak resident set, kept by
the kernel, so a sample shortly before the process ends gives its peak. A fresh process that imports what a
worker imports (torch, ray, transformers and its GPT-2 code, sweep) gives the baseline every process starts
from, so the peak above it can be counted in checkpoints (a worker's own module is one). The temporary folder is removed at
the end.

The model is built by `sweep.zoo:transformers_model` from the first folder's config.json (the class
GPT2LMHeadModel); where that factory is not there (an older sweep), by `gpt2_small` below. The data and the
metric are this script's own (`tokens`, `lm_loss`): the workers import them from this folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
#: Seconds between samples of /proc.
SAMPLE_SECONDS = 0.05


# --------------------------------------------------------------------------- what the workers import

def gpt2_small(path: str = "", layers: int = 12) -> torch.nn.Module:
    """GPT-2 small (transformers' GPT2Config defaults, `layers` blocks), random weights: the fallback factory."""
    import transformers

    config = transformers.GPT2Config(n_layer=layers, use_cache=False)
    return transformers.GPT2LMHeadModel(config).eval()


def tokens(batch: int = 2, length: int = 32, vocab: int = 50257, seed: int = 0) -> List[Any]:
    """One batch of random token ids and the same ids one step on (next-token targets)."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, vocab, (batch, length + 1), generator=g)
    return [(seq[:, :-1], seq[:, 1:])]


def lm_loss(output: Any, y: torch.Tensor) -> Dict[str, torch.Tensor]:
    logits = getattr(output, "logits", output)
    return {"loss": torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))}


# --------------------------------------------------------------------------- measuring

def status(pid: int) -> Dict[str, int]:
    """VmRSS and VmHWM of `pid` in bytes ({} once it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value, _unit = line.split()
                    out[key[:-1]] = int(value) * 1024
    except (OSError, ValueError):
        return {}
    return out


def parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def descends(pid: int, ancestor: int) -> bool:
    """Whether `pid` is `ancestor` or below it (Ray's workers: children of the raylet the driver started)."""
    for _ in range(64):
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
        pid = parent(pid)
    return False


def title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


class Sampler(threading.Thread):
    """Samples the driver and every `ray::SweepWorker` process below it until stopped; keeps each one's highest
    VmHWM (other sweeps on the machine are left out)."""

    def __init__(self, driver: int):
        super().__init__(daemon=True)
        self.driver = driver
        self.peaks: Dict[int, int] = {}
        self.kinds: Dict[int, str] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            pids = [self.driver] + [int(p) for p in os.listdir("/proc") if p.isdigit()
                                    and title(int(p)).startswith(("ray::SweepWorker", "ray::sweep:"))
                                    and descends(int(p), self.driver)]
            for pid in pids:
                hwm = status(pid).get("VmHWM")
                if hwm is not None:
                    self.peaks[pid] = max(self.peaks.get(pid, 0), hwm)
                    self.kinds.setdefault(pid, "driver" if pid == self.driver else "worker")
            time.sleep(SAMPLE_SECONDS)


def baseline(env: Dict[str, str]) -> int:
    """The resident set of a fresh process that has imported what a worker imports (GPT-2's code included)."""
    code = ("import torch, ray, transformers, pyarrow, workers.actor, sweep.workload\n"
            "import transformers.models.gpt2.modeling_gpt2\n"
            "print(open('/proc/self/status').read())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def write_folders(root: Path, count: int, layers: int) -> List[Path]:
    """`count` GPT-2 folders, each with its own random weights (GPT-2's own initialisation, reseeded)."""
    import transformers

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=layers))
    folders = []
    for i in range(count):
        torch.manual_seed(i)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.02)
        folder = root / f"gpt2-{i:02d}"
        model.save_pretrained(folder)
        folders.append(folder)
    return folders


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.name.endswith(".safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=8, help="checkpoint folders (default 8)")
    parser.add_argument("--layers", type=int, default=12, help="GPT-2 blocks (default 12: GPT-2 small)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    parser.add_argument("--files", action="store_true",
                        help="name each folder's model.safetensors in the study rather than the folder")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="sweep-checkpoint-rss-"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "SWEEP_CACHE_DIR": "off"}
    env.pop("RAY_ADDRESS", None)
    try:
        started = time.monotonic()
        folders = write_folders(tmp / "ckpts", args.count, args.layers)
        wrote = time.monotonic() - started
        size = folder_bytes(folders[0])
        try:
            import sweep.zoo as zoo

            factory = "sweep.zoo:transformers_model" if hasattr(zoo, "transformers_model") else None
        except ImportError:
            factory = None
        kwargs = {"path": str(folders[0] / "config.json"), "auto_class": "GPT2LMHeadModel"}
        if factory is None:
            factory, kwargs = "checkpoint_rss:gpt2_small", {"layers": args.layers}
        config = {
            "name": "checkpoint-rss",
            "model": {"factory": factory, "kwargs": kwargs},
            "data": {"loader": "checkpoint_rss:tokens"},
            "metrics": {"function": "checkpoint_rss:lm_loss"},
            "study": {"kind": "checkpoints", "paths": [str(tmp / "ckpts" / "gpt2-*" / "model.safetensors")
                                                       if args.files else str(tmp / "ckpts" / "gpt2-*")]},
            "evaluation": {"chunk_size": 1},
            "workers": {"count": 2, "cpus": 1},
            "sinks": {"mlflow": {"enabled": False}},
        }
        config_path = tmp / "checkpoint-rss.yaml"
        config_path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        base = baseline(env)

        sweep = shutil.which("sweep", path=str(Path(sys.executable).parent)) or "sweep"
        run_started = time.monotonic()
        proc = subprocess.Popen([sweep, "run", str(config_path), "--out", str(tmp / "out"), "--no-progress",
                                 "--no-report"], env=env, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        sampler = Sampler(proc.pid)
        sampler.start()
        stdout, stderr = proc.communicate()  # collects the pipes; the kernel's peak is read below
        sampler.stop.set()
        sampler.join()
        seconds = time.monotonic() - run_started
        if proc.returncode != 0:
            sys.exit(f"sweep run failed ({proc.returncode}):\n{stdout}\n{stderr}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    mb = 2**20
    workers = sorted((peak for pid, peak in sampler.peaks.items() if sampler.kinds[pid] == "worker"), reverse=True)
    driver = sampler.peaks.get(proc.pid, 0)
    figures = {
        "checkpoints": args.count,
        "checkpoint_mb": round(size / mb, 1),
        "baseline_mb": round(base / mb, 1),
        "driver_peak_mb": round(driver / mb, 1),
        "worker_peaks_mb": [round(w / mb, 1) for w in workers],
        "driver_checkpoints_held": round((driver - base) / size, 2),
        "worker_checkpoints_held": [round((w - base) / size, 2) for w in workers],
        "write_seconds": round(wrote, 1),
        "run_seconds": round(seconds, 1),
        "factory": factory,
        "summary": stdout.strip().splitlines()[0] if stdout.strip() else "",
    }
    if args.json:
        print(json.dumps(figures))
        return
    print(f"{args.count} checkpoint folders of {figures['checkpoint_mb']:,} MB (GPT-2, {args.layers} blocks, "
          f"float32), written in {figures['write_seconds']} s; `sweep run` with 2 workers took {seconds:.1f} s")
    print(f"  {figures['summary']}")
    print(f"  baseline (a fresh process importing torch, ray, transformers' GPT-2, sweep): "
          f"{figures['baseline_mb']:,} MB")
    print(f"  driver peak RSS: {figures['driver_peak_mb']:,} MB "
          f"({figures['driver_checkpoints_held']} checkpoints above the baseline)")
    for i, (peak, held) in enumerate(zip(figures["worker_peaks_mb"], figures["worker_checkpoints_held"])):
        print(f"  worker {i} peak RSS: {peak:,} MB ({held} checkpoints above the baseline, its own module included)")


if __name__ == "__main__":
    main()
