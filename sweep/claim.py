"""One sweep at a time per run folder: the claim a run or resume holds for its whole life.

Two sweeps writing one results location would write every candidate twice.
So `sweep run` and `sweep resume` claim their run folder before they write
anything, and give it up when they end (also on errors):

- on a local disk (the run folder always, and a local `sinks.parquet.path`
  outside it), the claim is an `flock` on `.sweep-claim` in the folder, held
  open for the run; the kernel releases it when the process ends, however it
  ends, so a claim is never stale. The file records who holds it, for the
  message a second sweep gets, and is removed when the claim is given up.
- on an object store (`sinks.parquet.path` a `pyarrow.fs` URI such as
  `s3://`), the claim is a marker object under `_sweep_claims/` in the
  results location, recording host, pid, start time and command. `pyarrow.fs`
  cannot create an object only if it is absent, so a sweep writes its own
  marker and looks again: a marker of another sweep there means it backs off.
  Of two sweeps that claim at the same instant, at least one sees the other
  (listings are consistent after a write on S3 and GCS); both may back off,
  never both go on. A marker left by a driver that died on this host (its pid
  is gone) is stale: it is removed with a warning. One of another host cannot
  be checked from here: the message names the object to delete once its
  owner is known to be gone.

Readers skip both names (they start with '.' and '_'); `clear(…, keep=CLAIM_NAMES)` leaves them.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pyarrow.fs as pafs

from .errors import SweepError
from .sinks.parquet import resolve

log = logging.getLogger("sweep")

#: The file a local claim locks, in the run folder (and in a local results folder outside it).
CLAIM_FILE = ".sweep-claim"
#: The folder of an object-store claim's markers, in the results location.
CLAIMS_FOLDER = "_sweep_claims"
#: Names a results location keeps when it is cleared for --overwrite.
CLAIM_NAMES = (CLAIM_FILE, CLAIMS_FOLDER)
#: Longest holder record read back (a claim file is a few hundred bytes).
MAX_RECORD_BYTES = 64 * 1024
#: Times a local claim is tried while other sweeps remove the file it locked (each had just ended).
MAX_LOCK_TRIES = 20
#: How long a refused sweep waits for the holder's record to appear (it is written right after locking).
HOLDER_WAIT_S = 2.0


def holder_record() -> Dict[str, Any]:
    """Who claims: this host and process, since now, running this command."""
    argv = [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv and sys.argv[0] else []
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join(argv) if argv else None}


def describe_holder(record: Optional[Dict[str, Any]]) -> str:
    """'pid 4121 on host h1 since 2026-… (`sweep run …`)', or what is known of it."""
    if not isinstance(record, dict) or "pid" not in record:
        return "another sweep (it has not said who it is yet)"
    text = f"pid {record.get('pid')} on host {record.get('host', '?')}"
    if record.get("since"):
        text += f" since {record['since']}"
    if record.get("command"):
        text += f" (`{record['command']}`)"
    return text


class Claim:
    """The claims one sweep holds; `release` gives them all up (closing the files, deleting its markers)."""

    def __init__(self) -> None:
        self._held: List[Any] = []

    def release(self) -> None:
        while self._held:
            self._held.pop().release()

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def claim(run_dir: Path, results: str) -> Claim:
    """Claim `run_dir` and, when they live outside it, the `results`; SweepError naming the holder when
    another sweep holds either. Creates `run_dir` (and a local results folder) if need be."""
    held = Claim()
    try:
        held._held.append(_LocalClaim(Path(run_dir)))
        fs, root = resolve(str(results))
        if isinstance(fs, pafs.LocalFileSystem):
            if not _inside(Path(root), Path(run_dir)):
                held._held.append(_LocalClaim(Path(root)))
        else:
            held._held.append(_StoreClaim(fs, root, str(results)))
    except BaseException:
        held.release()
        raise
    return held


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


class _LocalClaim:
    """An exclusive `flock` on <folder>/.sweep-claim, held until `release` or until the process ends.

    `release` removes the file (and the folders the claim made, when nothing else went in them). A
    sweep that locked a file just removed holds nothing: it sees that the path no longer leads to its
    file and tries again.
    """

    def __init__(self, folder: Path):
        self.path = folder / CLAIM_FILE
        self.fd = -1
        self.made = _missing_folders(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SweepError(f"cannot claim {folder} for this sweep: cannot make the folder: "
                             f"{e.strerror or e}; give an --out that can be written") from None
        for _ in range(MAX_LOCK_TRIES):
            fd = self._lock(folder)
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                record = json.dumps(holder_record()).encode()
                os.pwrite(fd, record, 0)  # then cut: the file is never empty once a holder has written
                os.ftruncate(fd, len(record))
                return
            os.close(fd)  # locked a file its holder removed on the way out: again, with the new one
        self.release()
        raise SweepError(f"cannot claim {folder}: {self.path} was replaced {MAX_LOCK_TRIES} times while "
                         f"this sweep locked it; run again")

    def _lock(self, folder: Path) -> int:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes
        except OSError as e:
            self.release()
            raise SweepError(f"cannot claim {folder} for this sweep: {e.strerror or e} ({self.path}); "
                             f"check that the folder can be written") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            self.release()
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise SweepError(f"cannot lock {self.path}: {e.strerror or e}; this file system may not "
                                 f"support locks: give --out on a local disk") from None
            raise SweepError(_refusal(folder, describe_holder(_read_holder(self.path)),
                                      "wait for it to finish, or stop it")) from None
        return fd

    def release(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            try:
                os.unlink(self.path)  # while still locked: whoever waits sees it gone and starts afresh
            except OSError:
                pass
            os.close(fd)  # the lock goes with it
        for folder in self.made:  # deepest first
            try:
                folder.rmdir()
            except OSError:  # not empty (the run wrote into it), or gone
                break
        self.made = []


def _missing_folders(folder: Path) -> List[Path]:
    """`folder` and those of its parents that do not exist yet, deepest first."""
    missing = []
    for path in [folder, *folder.parents]:
        if path.exists():
            break
        missing.append(path)
    return missing


def _read_holder(path: Path) -> Optional[Dict[str, Any]]:
    """The record of the sweep that holds the lock on `path`. A holder writes it right after locking, so
    a sweep refused in between waits a moment (at most HOLDER_WAIT_S) for it rather than name nobody."""
    deadline = time.monotonic() + HOLDER_WAIT_S
    while True:
        record = _read_record(path)
        if isinstance(record, dict) and "pid" in record or time.monotonic() >= deadline:
            return record
        time.sleep(0.01)


def _read_record(path: Path) -> Optional[Dict[str, Any]]:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read(MAX_RECORD_BYTES))
    except (OSError, ValueError):
        return None


class _StoreClaim:
    """A marker object per claimant under <results>/_sweep_claims/; see the module's docstring."""

    def __init__(self, fs: pafs.FileSystem, root: str, location: str):
        self.fs = fs
        self.folder = f"{root.rstrip('/')}/{CLAIMS_FOLDER}"
        self.shown = location.split("?", 1)[0].rstrip("/") + f"/{CLAIMS_FOLDER}"
        self.mine: Optional[str] = None
        others = self._live()
        if others:
            raise SweepError(self._refusal(others[0]))
        mine = f"{self.folder}/{uuid.uuid4().hex}.json"
        try:
            with fs.open_output_stream(mine) as stream:
                stream.write(json.dumps(holder_record()).encode())
        except OSError as e:
            raise SweepError(f"cannot claim {location.split('?', 1)[0]} for this sweep: cannot write "
                             f"{mine}: {_reason(e)}; check the credentials and that the location can be written") from None
        self.mine = mine
        others = [entry for entry in self._live() if entry[0] != mine]
        if others:
            self.release()
            raise SweepError(self._refusal(others[0], same_moment=True))

    def _live(self) -> List[Tuple[str, Optional[Dict[str, Any]]]]:
        """(path, record) of every marker of a sweep that may still run; stale ones are removed."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.folder, allow_not_found=True))
        except OSError as e:
            raise SweepError(f"cannot look for other sweeps' claims in {self.shown}: {_reason(e)}") from None
        live = []
        for info in sorted(infos, key=lambda i: i.path):
            if info.type != pafs.FileType.File:
                continue
            record = self._read(info.path)
            if _dead_here(record):
                log.warning("sweep: %s ended without giving up its claim on %s; taking it over",
                            describe_holder(record), self.shown)
                try:
                    self.fs.delete_file(info.path)
                except OSError:
                    pass
                continue
            live.append((info.path, record))
        return live

    def _read(self, path: str) -> Optional[Dict[str, Any]]:
        try:
            with self.fs.open_input_stream(path) as stream:
                return json.loads(stream.read(MAX_RECORD_BYTES))
        except (OSError, ValueError):
            return None

    def _refusal(self, entry: Tuple[str, Optional[Dict[str, Any]]], same_moment: bool = False) -> str:
        path, record = entry
        holder = describe_holder(record)
        if same_moment:
            holder += ", which claimed it at the same moment"
        here = isinstance(record, dict) and record.get("host") == socket.gethostname()
        how = "wait for it to finish, or stop it" if here else (
            f"wait for it to finish; if you know it is no longer running, delete the object {path} "
            f"(its claim) and run again")
        return _refusal(self.shown.rsplit("/", 1)[0], holder, how)

    def release(self) -> None:
        if self.mine is None:
            return
        mine, self.mine = self.mine, None
        try:
            self.fs.delete_file(mine)
        except OSError as e:
            log.warning("sweep: could not give up the claim %s (%s); the next sweep here sees it as "
                        "stale and takes it over", mine, _reason(e))


def _dead_here(record: Optional[Dict[str, Any]]) -> bool:
    """Whether `record` is of a process on this host that no longer runs."""
    if not isinstance(record, dict) or record.get("host") != socket.gethostname():
        return False
    pid = record.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    if pid == os.getpid():
        return False  # this process: an earlier claim of this driver, still live
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # another user's process: it runs
        return False
    return False


def _reason(error: OSError) -> str:
    return os.strerror(error.errno) if error.errno else str(error).splitlines()[0]


def _refusal(where: Any, holder: str, how: str) -> str:
    return (f"{where} is in use by another sweep: {holder}; {how} (two sweeps there would write every "
            f"candidate twice)")
