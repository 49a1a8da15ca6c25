"""Staging folders inside an output folder, and the removal of those that a killed run left behind.

A command that writes several files into a folder that people use (sample-failures' --out, report's and
analyze's --out) writes them first into a staging folder inside that folder (the same filesystem, so each
file goes into place with a rename) and removes the staging folder when it is done, whether it succeeded or
failed. A run that is killed (kill -9, a power cut, a closed laptop) cannot remove it, so:

- each staging folder holds a lock file, `.clipfail-lock` (the owner's process id, for people), on which
  the process that made it holds an exclusive `flock` for as long as it uses the folder; the kernel drops
  the lock when the process ends, however it ends;
- before a command makes its own staging folder, `remove_stale` removes every staging folder of the output
  folder whose lock no process holds, and one without a lock file (left by a clipfail older than this
  module). A folder whose lock is held belongs to a live run (another command writing into the same
  folder) and is left alone;
- a staging folder is made as `.clipfail-new-*`, gets its lock, and only then is renamed to its staging
  name, so no run ever sees a staging folder without its lock held. A `.clipfail-new-*` folder without a
  lock file is removed once it is an hour old (a run killed in that instant).

Locks need `fcntl.flock` (POSIX). Where it is missing, no staging folder is ever judged stale.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: nothing is ever judged stale
    fcntl = None

LOCK_NAME = ".clipfail-lock"
NEW_PREFIX = ".clipfail-new-"
NEW_GRACE_S = 3600  # a .clipfail-new-* folder without its lock is that old before it is judged stale


@dataclass
class Staging:
    """A staging folder and the open lock file that marks it as in use."""

    path: Path
    fd: int | None

    def remove(self) -> None:
        """Remove the folder (whatever is left in it), then let go of its lock."""
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def make(parent: str | Path, prefix: str) -> Staging:
    """A new, locked staging folder `<prefix>*` inside parent (OSError if it cannot be made)."""
    parent = Path(parent)
    new = Path(tempfile.mkdtemp(prefix=NEW_PREFIX, dir=parent))
    fd = None
    try:
        fd = os.open(new / LOCK_NAME, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh file: nobody else has it
        os.write(fd, f"{os.getpid()}\n".encode())
        final = parent / (prefix + new.name[len(NEW_PREFIX) :])
        os.rename(new, final)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        if fd is not None:
            os.close(fd)
        raise
    return Staging(final, fd)


def _is_stale(folder: Path, lockless_ok_after: float | None) -> tuple[bool, int | None]:
    """(whether no live process holds folder, the fd of its lock, held by us, to close after removing)."""
    if fcntl is None:
        return False, None
    try:
        fd = os.open(folder / LOCK_NAME, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        if lockless_ok_after is None:
            return True, None
        try:
            return time.time() - os.stat(folder).st_mtime > lockless_ok_after, None
        except OSError:
            return False, None
    except OSError:  # cannot tell (a symlink, no permission): leave it
        return False, None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held: a live run's
        os.close(fd)
        return False, None
    return True, fd


def remove_stale(parent: str | Path, prefixes: tuple[str, ...]) -> list[str]:
    """Remove the staging folders (names starting with one of prefixes, or `.clipfail-new-`) in parent that
    no live process holds; return their names. Folders that a live run holds, and anything that is not a
    folder, are left alone."""
    removed = []
    try:
        with os.scandir(parent) as it:
            entries = [e for e in it if e.name.startswith((*prefixes, NEW_PREFIX))]
    except OSError:
        return removed
    for entry in sorted(entries, key=lambda e: e.name):
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
        except OSError:
            continue
        grace = NEW_GRACE_S if entry.name.startswith(NEW_PREFIX) else None
        stale, fd = _is_stale(Path(entry.path), grace)
        if stale:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.name)
        if fd is not None:
            os.close(fd)
    return removed
