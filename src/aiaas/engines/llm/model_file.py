"""Where llama.cpp reads a GGUF from: a file on disk, or decrypted bytes that never touch it.

A bundled or configured model is a plain file. A registered version (imported, re-quantised,
fine-tuned) is stored encrypted; llama.cpp only opens paths, so its bytes are decrypted into an
anonymous in-memory file (`memfd_create`) and llama.cpp opens `/proc/self/fd/N`. The plaintext
lives in memory, like the mapped weights of any model, and is gone when the file is closed.
"""

from __future__ import annotations

import ctypes
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from aiaas.errors import ConfigurationError


@dataclass
class ModelFile:
    """A GGUF llama.cpp can open by `path`; `close` frees what holds it (an in-memory file)."""

    path: Path
    size: int
    in_memory: bool = False
    _fd: int | None = field(default=None, repr=False)

    @classmethod
    def on_disk(cls, path: Path) -> ModelFile:
        try:
            return cls(path=path, size=path.stat().st_size)
        except OSError as exc:
            raise ConfigurationError(f"model file {path} cannot be read: {exc}") from exc

    @classmethod
    def in_memory_from(cls, name: str, chunks: Iterable[bytes]) -> ModelFile:
        """An anonymous in-memory file holding `chunks` (Linux: `memfd_create`)."""
        fd = anonymous_fd(name)
        size = 0
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                    size += written
        except BaseException:
            os.close(fd)
            raise
        return cls(path=fd_path(fd), size=size, in_memory=True, _fd=fd)

    @property
    def open(self) -> bool:
        """False once an in-memory file is closed (its bytes freed); a file on disk stays."""
        return not self.in_memory or self._fd is not None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def anonymous_fd(name: str) -> int:
    """A file descriptor of an anonymous in-memory file (`memfd_create`); where that is
    missing, an unlinked temporary file stands in. Closing the fd frees it."""
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None:
        try:
            return int(memfd_create(f"aiaas-{name}"[:240], os.MFD_CLOEXEC))
        except OSError:
            pass
    handle = tempfile.TemporaryFile()  # noqa: SIM115 - unlinked at once; its fd outlives it
    fd = os.dup(handle.fileno())
    handle.close()
    return fd


def fd_path(fd: int) -> Path:
    """The path by which this process (or a child given the fd) opens `fd`."""
    return Path(f"/proc/self/fd/{fd}" if os.path.isdir("/proc/self/fd") else f"/dev/fd/{fd}")


def anonymous_rss_bytes() -> int:
    """This process's resident anonymous memory (heap, KV caches, ONNX sessions), from
    /proc/self/status; 0 where it cannot be read."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def return_freed_memory() -> None:
    """Hand the heap pages freed by an unload back to the system (glibc's `malloc_trim`): else
    glibc keeps them, the process grows with each load and unload, and the next load's
    measured growth depends on what the heap happened to keep."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim this way
        pass
