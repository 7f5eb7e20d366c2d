"""Kills what is left of the local Ray cluster a driver started, once that driver is gone.

The driver runs `python -m workers.reaper NAME=VALUE SECONDS` with a pipe of
its own as stdin, then starts Ray with NAME=VALUE in its environment. Until
the pipe reaches EOF (the driver exited, or was SIGKILLed), the reaper notes
the cluster's processes once a second: the driver's children started with
NAME=VALUE (GCS, raylet, monitors) and all their descendants (agents,
workers; those rename themselves, which can blank their environment, so they
are found by their parents). Then it gives Ray SECONDS to stop by itself and
SIGKILLs those still running. Linux only (it reads /proc); it imports nothing
of Ray or torch, so it starts fast and stays small.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from typing import Dict, Optional, Tuple

#: Seconds between two looks at the cluster's processes.
POLL_SECONDS = 1.0


def _stat(pid: int) -> Optional[Tuple[int, int]]:
    """(parent pid, start time in clock ticks) of a live process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] == b"Z":
        return None  # exited; only its parent's wait is left
    return int(fields[1]), int(fields[19])


def _marked(pid: int, mark: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return mark in f.read().split(b"\0")
    except OSError:
        return False


def cluster(driver: int, mark: bytes, known: Dict[int, int]) -> Dict[int, int]:
    """The cluster's processes now, pid → start time: `known` ones, the driver's marked children, their descendants."""
    table = {pid: s for pid, s in ((int(n), _stat(int(n))) for n in os.listdir("/proc") if n.isdigit()) if s}
    found = {pid: start for pid, start in known.items() if table.get(pid, (0, None))[1] == start}
    found.update({pid: s[1] for pid, s in table.items()
                  if pid not in found and s[0] == driver and _marked(pid, mark)})
    grew = True
    while grew:
        more = {pid: s[1] for pid, s in table.items() if pid not in found and s[0] in found}
        found.update(more)
        grew = bool(more)
    return found


def main(argv) -> int:
    mark, grace = argv[0].encode(), float(argv[1])
    driver, me = os.getppid(), os.getpid()
    known: Dict[int, int] = {}
    while True:
        ready, _, _ = select.select([sys.stdin.fileno()], [], [], POLL_SECONDS)
        if ready and not os.read(sys.stdin.fileno(), 4096):
            break  # EOF: the driver is gone
        known = cluster(driver, mark, known)
    known.pop(me, None)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        known = {pid: start for pid, start in known.items() if (_stat(pid) or (0, None))[1] == start}
        if not known:
            return 0
        time.sleep(0.1)
    for pid, start in known.items():
        if (_stat(pid) or (0, None))[1] == start:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
