"""A run's ``output_dir``: owned by one run at a time, never silently overwritten.

``claim_output_dir(path, resume=..., overwrite=...)`` is what :func:`kdlab.engine.train` does
before anything else:

1. **Lock.** ``output_dir/.kdlab.lock`` is held with ``fcntl.flock`` for the whole run and holds
   the owner's pid, host, start time and command. A second run into the same folder stops with
   a message naming that owner. The kernel drops the lock when its process dies (even by
   ``kill -9``), so a lock file left behind by a dead run is taken over, with a note.
2. **Stale temporary files.** A save interrupted by a kill leaves ``.NAME.PID.tmp`` beside the
   file it was writing (see :mod:`kdlab.engine.checkpoint`); those of dead processes are removed.
3. **Existing run.** A folder that already holds a run's files (``last.pt``, ``student.pt``,
   ``metrics.jsonl``, ``eval_*.json``, ...) is continued only with ``resume=True`` and replaced
   only with ``overwrite=True`` (which deletes those files and nothing else); otherwise
   :class:`OutputDirNotEmpty` says which run is there and what to do.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
import socket
import sys
from pathlib import Path
from typing import Iterator

from kdlab.engine.checkpoint import CheckpointError
from kdlab.utils.notice import notice

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, the folder checks still apply
    fcntl = None

LOCK_NAME = ".kdlab.lock"
# what a run writes into its folder (removed by overwrite=True)
RUN_FILES = ("last.pt", "student.pt", "metrics.jsonl", "config.yaml")
RUN_PATTERNS = ("eval_*.json",)
RUN_FOLDERS = ("tensorboard",)
TEMP_NAME = re.compile(r"^\..+\.(\d+)\.tmp$")  # .last.pt.1234.tmp, written by checkpoint._atomic_write


class OutputDirError(RuntimeError):
    """An ``output_dir`` that this run may not use (busy, or holding another run)."""


class OutputDirInUse(OutputDirError):
    """Another live process holds the folder's lock."""


class OutputDirNotEmpty(OutputDirError):
    """The folder holds a finished or partial run and neither resume nor overwrite was asked."""


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def _holder_text(holder: dict) -> str:
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}, "
            f"command: {holder.get('command', '?')}")


class RunLock:
    """The advisory lock of one ``output_dir`` (see the module docstring)."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> dict | None:
        """Take the lock; returns the record of a dead previous holder, if its lock file was left.

        Raises:
            OutputDirInUse: a live process holds it (the message names it).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fcntl is None:  # pragma: no cover
            return None
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read(fd)
                os.close(fd)
                raise OutputDirInUse(
                    f"output_dir {self.path.parent} is in use by another kdlab run ({_holder_text(holder)}; "
                    f"lock file {self.path}); wait for it to finish, stop it, or choose another --output-dir") from None
            try:  # the file may have been unlinked by its previous holder between our open and flock
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:
                break
            os.close(fd)
        previous = self._read(fd) or None
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().isoformat(timespec="seconds"),
                  "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "python"}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(record) + "\n").encode())
        os.fsync(fd)
        self.fd = fd
        return previous

    def release(self) -> None:
        """Remove the lock file and drop the lock."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # while still holding the lock: a waiting opener re-checks the inode
        os.close(self.fd)
        self.fd = None

    @staticmethod
    def _read(fd: int) -> dict:
        try:
            text = os.pread(fd, 4096, 0).decode(errors="replace")
            return json.loads(text) if text.strip() else {}
        except (OSError, ValueError):
            return {}


def remove_stale_temps(output_dir: Path) -> list[Path]:
    """Delete ``.NAME.PID.tmp`` files of processes that no longer run; returns what was removed."""
    removed = []
    for path in sorted(output_dir.glob(".*.tmp")):
        match = TEMP_NAME.match(path.name)
        if match and int(match.group(1)) != os.getpid() and pid_alive(int(match.group(1))):
            continue  # another live process is writing it
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


def run_files(output_dir: Path) -> list[Path]:
    """The files and folders of a run present in ``output_dir``."""
    found = [output_dir / name for name in RUN_FILES + RUN_FOLDERS if (output_dir / name).exists()]
    for pattern in RUN_PATTERNS:
        found += sorted(output_dir.glob(pattern))
    return found


def describe_run(output_dir: Path) -> str:
    """"a finished run (...)" / "an unfinished run (...)" for the messages about an existing run."""
    names = ", ".join(p.name for p in run_files(output_dir))
    if (output_dir / "student.pt").is_file() and (output_dir / "eval_final.json").is_file():
        return f"a finished run ({names})"
    if (output_dir / "last.pt").is_file():
        return f"an unfinished run ({names}); continue it with --resume"
    return f"the files of a run that stopped before its first checkpoint ({names})"


def check_existing_run(output_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to start over a run unless asked (see the module docstring); with ``overwrite`` delete it."""
    if resume and overwrite:
        raise OutputDirError("--resume and --overwrite contradict each other: resume continues the run in "
                             f"{output_dir}, overwrite deletes it")
    if resume:
        if not (output_dir / "last.pt").is_file():
            raise CheckpointError(f"cannot resume: {output_dir / 'last.pt'} does not exist (train without --resume first)")
        return
    existing = run_files(output_dir)
    if not existing:
        return
    if not overwrite:
        raise OutputDirNotEmpty(
            f"output_dir {output_dir} already holds {describe_run(output_dir)}; nothing was changed. "
            f"Start over with --overwrite (deletes that run's files) or choose another --output-dir")
    for path in existing:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    notice(f"--overwrite: removed the previous run's {', '.join(p.name for p in existing)} from {output_dir}")


@contextlib.contextmanager
def claim_output_dir(output_dir: str | Path, *, resume: bool, overwrite: bool = False) -> Iterator[Path]:
    """Own ``output_dir`` for the duration of the ``with`` block: lock, clean, check (module docstring).

    Raises:
        OutputDirInUse, OutputDirNotEmpty, OutputDirError: see :func:`RunLock.acquire` and
            :func:`check_existing_run`; nothing in the folder was changed.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputDirError(f"output_dir {output_dir} exists and is not a folder")
    lock = RunLock(output_dir)
    previous = lock.acquire()
    try:
        if previous and previous.get("pid") != os.getpid():
            notice(f"took over the lock of {output_dir} from a run that ended without releasing it "
                   f"({_holder_text(previous)})")
        removed = remove_stale_temps(output_dir)
        if removed:
            notice(f"removed {len(removed)} temporary file(s) left by an interrupted save: "
                   f"{', '.join(p.name for p in removed)}")
        check_existing_run(output_dir, resume=resume, overwrite=overwrite)
        yield output_dir
    finally:
        lock.release()
