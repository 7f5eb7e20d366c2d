"""Peak memory and wall time of one `sweep run`, sampled from /proc while it runs.

    python benchmarks/scale.py configs/perturb-million.yaml --set study.count=100000
    python benchmarks/scale.py configs/perturb-million.yaml --set study.count=1000000

Prints the driver's peak RSS, the largest worker's peak RSS, the wall time and
the rows read back from the results, as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List


def children(pid: int) -> List[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                out.append(int(entry))
        except OSError:
            continue
    return out


def tree(pid: int) -> List[int]:
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo.extend(children(p))
    return seen


def rss_and_name(pid: int):
    try:
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        return int(status["VmRSS"].split()[0]) * 1024, cmd
    except (OSError, KeyError):
        return 0, ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="sweep-scale-"))
    sweep = Path(sys.executable).with_name("sweep")
    cmd = [str(sweep), "run", args.config, "--out", str(out), "--no-progress"]
    for item in args.overrides:
        cmd += ["--set", item]
    env = {**os.environ}
    env.pop("RAY_ADDRESS", None)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peak: Dict[str, int] = {"driver": 0, "worker": 0}
    while proc.poll() is None:
        for pid in tree(proc.pid):
            rss, name = rss_and_name(pid)
            if pid == proc.pid:
                peak["driver"] = max(peak["driver"], rss)
            elif "SweepWorker" in name:
                peak["worker"] = max(peak["worker"], rss)
        time.sleep(0.2)
    wall = time.monotonic() - start
    output = proc.stdout.read()
    if proc.returncode != 0:
        print(output, file=sys.stderr)
        sys.exit(proc.returncode)
    import re

    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    rows = unique = None
    results = next(out.glob("runs/*/results"), None)
    if results is not None and any(results.glob("part-*.parquet")):  # absent with sinks.parquet.enabled=false
        dataset = ds.dataset(str(results), format="parquet")
        rows = dataset.count_rows()
        unique = pc.count_distinct(dataset.to_table(columns=["candidate_id"]).column("candidate_id")).as_py()
    summary = [line for line in output.splitlines() if "candidates:" in line]
    seconds = re.search(r"in ([0-9.]+) s", summary[0]) if summary else None
    print(json.dumps({
        "overrides": args.overrides,
        "rows": rows,
        "unique_ids": unique,
        "sweep_seconds": float(seconds.group(1)) if seconds else None,
        "wall_seconds": round(wall, 1),
        "driver_peak_rss_mb": round(peak["driver"] / 2**20, 1),
        "worker_peak_rss_mb": round(peak["worker"] / 2**20, 1),
        "summary": summary[0] if summary else "",
    }))


if __name__ == "__main__":
    main()
