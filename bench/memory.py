"""Resident memory of a process and all its descendants, read from /proc (Linux only).

The tree's RSS is the sum of each process's `VmRSS`, so pages shared between a parent and a
forked child count twice; for servers that run in one process (all of ours today) it is exact.
"""

from __future__ import annotations

import threading
from pathlib import Path
from types import TracebackType

__all__ = ["PeakRssSampler", "process_tree", "rss_bytes", "tree_rss_bytes"]

_PROC = Path("/proc")


def process_tree(root: int) -> list[int]:
    """`root` and every live descendant, found by the parent pid in `/proc/<pid>/stat`."""
    children: dict[int, list[int]] = {}
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited while we looked
            continue
        # The command name is in parentheses and may itself hold spaces or ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, frontier = [root], [root]
    while frontier:
        frontier = [child for pid in frontier for child in children.get(pid, [])]
        tree.extend(frontier)
    return tree


def rss_bytes(pid: int) -> int:
    """`VmRSS` of one process; 0 once it is gone (or for a zombie, which has none)."""
    try:
        status = (_PROC / str(pid) / "status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024  # the kernel reports kB
    return 0


def tree_rss_bytes(root: int) -> int:
    return sum(rss_bytes(pid) for pid in process_tree(root))


class PeakRssSampler:
    """Samples a process tree's RSS on a thread every `interval_s`; `peak_bytes` is the max.

    Use as a context manager around the load whose peak matters; one sample is taken on entry
    and one on exit, so even a load shorter than the interval is seen.
    """

    def __init__(self, root_pid: int, *, interval_s: float = 0.1) -> None:
        self._root = root_pid
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.peak_bytes = 0
        self.samples = 0

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("sampler already started")
        self._sample()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._sample()

    def __enter__(self) -> PeakRssSampler:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._sample()

    def _sample(self) -> None:
        self.peak_bytes = max(self.peak_bytes, tree_rss_bytes(self._root))
        self.samples += 1
