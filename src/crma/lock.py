"""One writer per directory: an exclusive lock (the `filelock` package) that names its holder.

`crma train` holds a stack's lock while it trains and commits a domain, `crma run` its run
directory's for the whole run. A second writer is refused within a second with a one-line
error naming the holder (pid, command, since when). The lock is the kernel's (flock): when a
holder dies, even by SIGKILL, it is released, and the next writer takes it over; the holder's
line in the file is only information. `check_free` probes with a shared flock, so probes never
refuse each other (the ranks of a resumed distributed run probe together); a writer waits out
a probe's instant for `PROBE_GRACE_S`. Readers never lock: they read committed files (see
crma.stack).
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from types import TracebackType

import filelock

from crma.errors import UserError

LOCK_FILE = "writer.lock"
PROBE_GRACE_S = 1.0  # a writer retries this long: a probe holds the lock for microseconds


class WriterLock:
    """`with WriterLock(directory):` — the directory's one writer for the block.

    Creates the directory if needed; if it was created for this block and holds nothing but
    the lock file at the end (a call that failed before writing anything), it is removed again,
    so a failed first call leaves nothing behind.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self._lock: filelock.BaseFileLock | None = None
        self._created: Path | None = None
        self._inode: int | None = None  # of the file locked, as opened

    def __enter__(self) -> WriterLock:
        self._created = _first_missing(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a lock file removed by a failed creator between open and flock
            lock = filelock.FileLock(self.path, timeout=PROBE_GRACE_S, on_acquired=self._acquired)
            try:
                lock.acquire()
            except filelock.Timeout:
                raise UserError(f"{self.directory}: {busy_message(self.path)}") from None
            if self._inode == _inode(self.path):
                self._lock = lock
                return self
            lock.release()
        raise UserError(f"{self.directory}: the lock file keeps changing; try again")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._lock is not None
        with open(self.path, "r+b") as fh:  # the next holder writes its own line
            fh.truncate(0)
        if self._created is not None and os.listdir(self.directory) == [LOCK_FILE]:
            self.path.unlink()
            _remove_empty(self.directory, self._created)
        self._lock.release()
        self._lock = None

    def _acquired(self, fd: int) -> None:
        """Note which file is locked, and write who holds it into it."""
        self._inode = os.fstat(fd).st_ino
        line = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": shlex.join(["crma", *sys.argv[1:]])[:300],
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(line) + "\n").encode(), 0)


def check_free(directory: str | Path) -> None:
    """Refuse now if another process writes `directory` (before loading a model for nothing)."""
    path = Path(directory) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # no lock file, or one this account cannot open: nobody it could wait for
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared: other probes pass
    except BlockingIOError:
        raise UserError(f"{directory}: {busy_message(path)}") from None
    finally:
        os.close(fd)  # releases the shared lock


def busy_message(path: Path) -> str:
    try:
        holder = json.loads(path.read_text())
        who = f"pid {holder['pid']} on {holder['host']}, `{holder['command']}`, since {holder['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        who = "another process"
    return f"another crma process is writing here ({who}); wait for it to finish, or stop it"


def _inode(path: Path) -> int | None:
    """The inode at `path` now: another than the one locked if the file was unlinked meanwhile."""
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def _first_missing(directory: Path) -> Path | None:
    """The outermost directory that `mkdir(parents=True)` would create, or None."""
    missing = None
    for candidate in [directory, *directory.parents]:
        if candidate.exists():
            break
        missing = candidate
    return missing


def _remove_empty(directory: Path, up_to: Path) -> None:
    for candidate in [directory, *directory.parents]:
        try:
            candidate.rmdir()
        except OSError:
            return
        if candidate == up_to:
            return
