"""How much CPU other programs took while a measurement ran (Linux only).

A benchmark on a shared machine is only as good as the machine was quiet. `ForeignCpu` reads
the kernel's busy time (`/proc/stat`) and subtracts what the server tree and this process used
(`/proc/<pid>/stat`), so a table can say "2% of the CPU went elsewhere" next to its numbers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

from memory import process_tree

__all__ = ["ForeignCpu"]

_PROC = Path("/proc")


class ForeignCpu:
    """Context manager; afterwards `percent` is foreign busy time / (wall time x cores)."""

    def __init__(self, server_pid: int) -> None:
        self._server_pid = server_pid
        self._start: tuple[float, int, int] | None = None
        self.percent: float | None = None

    def __enter__(self) -> ForeignCpu:
        self._start = self._snapshot()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._start is None:
            return
        wall0, busy0, ours0 = self._start
        wall1, busy1, ours1 = self._snapshot()
        capacity = (wall1 - wall0) * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1)
        if capacity > 0:
            foreign = max(0, (busy1 - busy0) - (ours1 - ours0))
            self.percent = 100.0 * foreign / capacity

    def _snapshot(self) -> tuple[float, int, int]:
        """(monotonic seconds, machine busy ticks, ticks of the server tree and this process)."""
        pids = {os.getpid(), *process_tree(self._server_pid)}
        return time.monotonic(), _machine_busy_ticks(), _process_ticks(pids)


def _machine_busy_ticks() -> int:
    # cpu  user nice system idle iowait irq softirq steal guest guest_nice
    fields = [int(v) for v in (_PROC / "stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return user + nice + system + irq + softirq + steal


def _process_ticks(pids: Iterable[int]) -> int:
    total = 0
    for pid in pids:
        try:
            stat = (_PROC / str(pid) / "stat").read_text()
        except OSError:  # exited
            continue
        # After the ')' that closes the command name: state is field 3, utime 14, stime 15.
        fields = stat[stat.rfind(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])
    return total
