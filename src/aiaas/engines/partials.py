"""Staging folders for what is written once into a cache (an ONNX export), and the removal of
the ones a killed process left behind.

A folder is built as `<parent>/.<name>.<random>.partial` and renamed into place whole. While
its builder lives, it holds an exclusive `flock` on the folder; the kernel drops the lock when
the process ends, however it ends (`kill -9` included), so a lock that can be taken means the
builder is gone. `sweep` removes every partial folder whose lock it can take and that has not
been written for `GRACE_S` (a folder made an instant ago, before its builder locked it, is left
alone). Several processes may start, build and sweep at once: a live builder's lock is never
free, and a sweeper that finds a folder gone already moves on.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("aiaas.engines")

SUFFIX = ".partial"
GRACE_S = 5.0  # far longer than mkdtemp-to-flock, however loaded the machine


@contextlib.contextmanager
def staging_dir(parent: Path, name: str) -> Iterator[Path]:
    """A fresh, locked partial folder under `parent`; removed on the way out unless the caller
    renamed it into place (the lock goes with the folder until then)."""
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=SUFFIX, dir=parent))
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # blocking: a sweeper may hold it for an instant
        yield path
    finally:
        try:
            if path.exists():
                shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)  # releases the lock


def sweep(parent: Path) -> list[Path]:
    """Remove the partial folders under `parent` that no live process is building; returns
    what it removed."""
    removed: list[Path] = []
    try:
        candidates = [
            p for p in parent.iterdir() if p.name.startswith(".") and p.name.endswith(SUFFIX)
        ]
    except FileNotFoundError:
        return removed
    for path in candidates:
        if _remove_if_abandoned(path):
            removed.append(path)
    if removed:
        log.info("removed %d abandoned partial folder(s) under %s", len(removed), parent)
    return removed


def _remove_if_abandoned(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        return False  # gone already (another sweeper), or a partial file: not ours to judge
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # its builder is alive
        if time.time() - os.fstat(fd).st_mtime < GRACE_S:
            return False  # just made: its builder may not have locked it yet
        # Renamed away meanwhile (finished by a builder that then died)? Then it is not here.
        if not path.exists() or not os.path.samestat(os.fstat(fd), os.stat(path)):
            return False
        shutil.rmtree(path, ignore_errors=True)
        return not path.exists()
    finally:
        os.close(fd)
