"""A GGUF file's tensor table, read with llama.cpp's own parser through its C API.

Milliseconds where the `gguf` package's reader takes seconds: that one builds Python objects for
every metadata array, and a 262,144-token vocabulary is a million of them. Here only the tensor
table is read: names, types, element counts and where each tensor's bytes lie in the file.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

Q8_0 = 8  # enum ggml_type (ggml.h)


@dataclass(frozen=True, slots=True)
class TensorEntry:
    kind: int  # enum ggml_type
    elements: int
    offset: int  # of its first byte in the file
    nbytes: int


def ggml_library(stem: str) -> ctypes.CDLL | None:
    """One of the ggml libraries llama-cpp-python ships (already loaded by llama_cpp)."""
    import llama_cpp

    folder = Path(llama_cpp.__file__).parent / "lib"
    for name in (f"lib{stem}.so", f"lib{stem}.dylib", f"{stem}.dll"):
        try:
            return ctypes.CDLL(str(folder / name))
        except OSError:
            continue
    return None


class _InitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


def _declare(lib: ctypes.CDLL) -> None:
    signatures: dict[str, tuple[object, list[object]]] = {
        "gguf_init_from_file": (ctypes.c_void_p, [ctypes.c_char_p, _InitParams]),
        "gguf_free": (None, [ctypes.c_void_p]),
        "gguf_get_n_tensors": (ctypes.c_int64, [ctypes.c_void_p]),
        "gguf_get_data_offset": (ctypes.c_size_t, [ctypes.c_void_p]),
        "gguf_get_tensor_name": (ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64]),
        "gguf_get_tensor_type": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64]),
        "gguf_get_tensor_size": (ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int64]),
        "gguf_get_tensor_offset": (ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int64]),
        "ggml_type_size": (ctypes.c_size_t, [ctypes.c_int]),
        "ggml_blck_size": (ctypes.c_int64, [ctypes.c_int]),
    }
    for name, (restype, argtypes) in signatures.items():
        function = getattr(lib, name)
        function.restype = restype
        function.argtypes = argtypes


def read_tensor_table(path: Path) -> dict[str, TensorEntry]:
    """name -> entry for every tensor of the GGUF file at `path`."""
    lib = ggml_library("ggml-base")
    if lib is None:
        raise OSError("llama.cpp's ggml-base library was not found")
    _declare(lib)
    ctx = lib.gguf_init_from_file(str(path).encode(), _InitParams(True, None))
    if not ctx:
        raise ValueError(f"{path.name} is not a GGUF file llama.cpp can read")
    try:
        base = lib.gguf_get_data_offset(ctx)
        table = {}
        for i in range(lib.gguf_get_n_tensors(ctx)):
            kind = lib.gguf_get_tensor_type(ctx, i)
            nbytes = lib.gguf_get_tensor_size(ctx, i)
            table[lib.gguf_get_tensor_name(ctx, i).decode()] = TensorEntry(
                kind=kind,
                elements=nbytes // lib.ggml_type_size(kind) * lib.ggml_blck_size(kind),
                offset=base + lib.gguf_get_tensor_offset(ctx, i),
                nbytes=nbytes,
            )
        return table
    finally:
        lib.gguf_free(ctx)


def output_matrix(table: dict[str, TensorEntry]) -> TensorEntry | None:
    """The model's output projection: `output.weight`, or the token embeddings it is tied to."""
    return table.get("output.weight") or table.get("token_embd.weight")
