"""Open a GGUF file with llama.cpp in a child process and report what it is.

    python -m aiaas.engines.llm.inspect PATH     # prints one JSON object on its last stdout line

A malformed GGUF can make llama.cpp abort the whole process (a failed GGML_ASSERT), so a file
nobody has loaded before is opened here, in a process of its own: the server only reads the
child's JSON, its exit status and its stderr (llama.cpp's log, which names what was wrong).
`inspect_gguf(path, pass_fds=...)` is the parent's side; the data may sit in an anonymous
in-memory file the parent hands down (`/proc/self/fd/N` with `pass_fds=(N,)`), so no plaintext
copy is ever written to disk.

The model is loaded with its weights memory-mapped (nothing is copied, no context is made), which
is what serving does too: a file that loads here loads there.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["InvalidGguf", "inspect_gguf", "read_gguf"]

GGUF_MAGIC = b"GGUF"
_REASON_CHARS = 2000
# Lines of llama.cpp's log that explain a failed load (the rest is chatter).
_REASON_MARKERS = ("error", "failed", "invalid", "assert", "abort", "unknown", "unsupported")


class InvalidGguf(Exception):
    """llama.cpp cannot load the file; `reason` is what it said (a tail of its log)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def inspect_gguf(path: str, *, timeout_s: float, pass_fds: Sequence[int] = ()) -> dict[str, Any]:
    """The file's metadata, read by a child process; `InvalidGguf` if llama.cpp cannot load
    it (or the child dies or runs out of time)."""
    # The child needs no secrets: the server's own settings stay out of its environment.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIAAS_")}
    env["PYTHONUNBUFFERED"] = "1"
    try:
        done = subprocess.run(  # noqa: S603 - our own module, a path argument
            [sys.executable, "-m", "aiaas.engines.llm.inspect", path],
            env=env,
            pass_fds=tuple(pass_fds),
            capture_output=True,
            timeout=timeout_s,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise InvalidGguf(
            f"llama.cpp did not finish loading the file within {timeout_s:g} s"
        ) from exc
    stderr = done.stderr.decode("utf-8", errors="replace")
    if done.returncode != 0:
        raise InvalidGguf(_reason(stderr, done.returncode))
    lines = done.stdout.decode("utf-8", errors="replace").strip().splitlines()
    try:
        found = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        found = None
    if not isinstance(found, dict):
        raise InvalidGguf(_reason(stderr, done.returncode) or "the inspector printed no metadata")
    return found


def _reason(stderr: str, returncode: int) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    telling = [line for line in lines if any(m in line.lower() for m in _REASON_MARKERS)]
    text = "\n".join((telling or lines)[-12:])
    if len(text) > _REASON_CHARS:
        text = "..." + text[-_REASON_CHARS:]
    if returncode < 0:
        crash = f"llama.cpp crashed while loading the file (signal {-returncode})"
        return f"{crash}: {text}" if text else crash
    return text or f"llama.cpp could not load the file (exit status {returncode})"


# -- the child's side --------------------------------------------------------------------------


def read_gguf(path: Path) -> dict[str, Any]:
    """Load the model (weights mapped, no context) and read its metadata. Runs in the child."""
    import llama_cpp

    from aiaas.engines.llm.model import LlamaModel

    with path.open("rb") as file:
        if file.read(4) != GGUF_MAGIC:
            raise InvalidGguf("not a GGUF file: it does not start with the GGUF magic bytes")
    model = LlamaModel(path)  # ConfigurationError when llama.cpp cannot load it
    try:
        handle = model.handle
        info = model.info
        file_type = _meta(handle, "general.file_type")
        return {
            "architecture": _meta(handle, "general.architecture"),
            "name": _meta(handle, "general.name"),
            "description": info.description,
            "file_type": _file_type_name(file_type),
            "file_type_id": int(file_type) if file_type and file_type.isdigit() else None,
            "context_length": info.n_ctx_train,
            "vocab_size": info.n_vocab,
            "embedding_length": llama_cpp.llama_model_n_embd(handle),
            "layers": llama_cpp.llama_model_n_layer(handle),
            "parameters": int(llama_cpp.llama_model_n_params(handle)),
            "tensor_bytes": int(info.size_bytes),
            "has_decoder": bool(llama_cpp.llama_model_has_decoder(handle)),
            "has_encoder": bool(llama_cpp.llama_model_has_encoder(handle)),
            "embedded_chat_template": info.chat_template,
            "bos_token": info.bos_text or None,
            "eos_token": info.eos_text or None,
            "add_bos": info.add_bos,
        }
    finally:
        model.close()


def _meta(handle: Any, key: str) -> str | None:
    import llama_cpp

    size = 1 << 16
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_model_meta_val_str(handle, key.encode(), buf, size)
        if n < 0:
            return None
        if n < size:
            return buf.value.decode("utf-8", errors="replace")
        size = n + 1


def _file_type_name(value: str | None) -> str | None:
    """`general.file_type` (enum llama_ftype) by name: 3 -> "Q4_1"."""
    if value is None or not value.isdigit():
        return value
    import llama_cpp

    for name in dir(llama_cpp):
        if name.startswith("LLAMA_FTYPE_") and getattr(llama_cpp, name) == int(value):
            if name in ("LLAMA_FTYPE_GUESSED",):
                continue
            return name.removeprefix("LLAMA_FTYPE_MOSTLY_").removeprefix("LLAMA_FTYPE_")
    return f"unknown ({value})"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m aiaas.engines.llm.inspect PATH", file=sys.stderr)
        return 2
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # an abort leaves no core dump
    except (ImportError, ValueError, OSError):
        pass
    # llama.cpp's log lines reach stderr through our log callback (warnings and errors).
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
    try:
        found = read_gguf(Path(argv[0]))
    except InvalidGguf as exc:
        print(exc.reason, file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - the child reports any failure, then exits
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(json.dumps(found) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
