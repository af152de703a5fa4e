"""The output projection widened to BF16, so llama.cpp runs it on its AVX512-BF16 GEMM.

A GGUF whose output matrix (`output.weight`, or the token embeddings when the two are tied) is
quantized makes llama.cpp multiply every logit row against the quantized blocks. On CPUs with
AVX512-BF16 that kernel is slow for batches: Gemma 3 270M's head (262,144 x 640 Q8_0, 63 % of
the model's weights) costs ~29 ms of a 16-row, ~54 ms decode step (2 threads). The same matrix
in BF16 goes through llamafile's `vdpbf16ps` tinyBLAS kernel instead: a 16-row step costs 41 ms
(-23 %), 8 rows 31 against 40 ms, 4 rows 21 against 34 ms; one row 10.9 against 10.5 ms, since
BF16 is 1.9x the bytes to stream (`bench/llm_steps.py`, bench/RESULTS.md "Session 8").

It is also closer to the model's own arithmetic than the quantized kernel, which rounds the hidden
state to 8-bit blocks first: against the exact product of the hidden state and the dequantized
matrix (float64), over 768 greedy Gemma positions, llama.cpp's Q8_0 head was off by up to 0.31 in
a logit and picked another token once; the BF16 head by up to 0.11 and never.

The widened copy is a derived GGUF in the data dir's cache: every tensor and metadata key of the
original, plus `output.weight` in BF16 (the dequantized values rounded to nearest-even). llama.cpp
keeps reading token embeddings from the original quantized rows. It is written once per source
file (by path, size and mtime), to a temporary name renamed into place whole.

`auto` widens where it measured a gain: the CPU has AVX512-BF16 and the output matrix is quantized
and holds at least a third of the model's weights (Gemma 3 270M: 63 %; SmolLM2-135M: 21 %, where
it measured -5 % for one row and +2..7 % for batches, not worth 56 MB).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

log = logging.getLogger(__name__)

WideHead = Literal["auto", "on", "off"]

# The output matrix holds at least this share of the model's weights for `auto` to widen it.
MIN_HEAD_SHARE = 1 / 3
# Rows converted at a time (bounds the float32 temporaries to a few tens of MB).
CHUNK_ROWS = 8192
_OUTPUT = "output.weight"
_EMBEDDINGS = "token_embd.weight"
_PLAIN = {0, 1, 28, 30}  # F32, F16, F64, BF16: nothing to widen


def _llama_lib(stem: str) -> ctypes.CDLL | None:
    """One of the ggml libraries llama-cpp-python ships (already loaded by llama_cpp)."""
    import llama_cpp

    folder = Path(llama_cpp.__file__).parent / "lib"
    for name in (f"lib{stem}.so", f"lib{stem}.dylib", f"{stem}.dll"):
        try:
            return ctypes.CDLL(str(folder / name))
        except OSError:
            continue
    return None


def bf16_gemm_available() -> bool:
    """Whether llama.cpp's CPU backend has AVX512-BF16 to multiply BF16 matrices with."""
    lib = _llama_lib("ggml-cpu")
    probe = getattr(lib, "ggml_cpu_has_avx512_bf16", None)
    if probe is None:
        return False
    probe.restype = ctypes.c_int
    return bool(probe())


@dataclass(frozen=True, slots=True)
class _Tensor:
    kind: int  # enum ggml_type (the same numbers as gguf.GGMLQuantizationType)
    elements: int


class _InitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


def _tensors(path: Path) -> dict[str, _Tensor]:
    """The file's tensor table, read by llama.cpp's own GGUF parser (milliseconds, where the
    gguf package takes seconds over a large vocabulary)."""
    lib = _llama_lib("ggml-base")
    if lib is None:
        raise OSError("llama.cpp's ggml-base library was not found")
    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, _InitParams]
    lib.gguf_get_n_tensors.restype = ctypes.c_int64
    lib.gguf_get_n_tensors.argtypes = [ctypes.c_void_p]
    lib.gguf_get_tensor_name.restype = ctypes.c_char_p
    lib.gguf_get_tensor_name.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_tensor_type.restype = ctypes.c_int
    lib.gguf_get_tensor_type.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_tensor_size.restype = ctypes.c_size_t
    lib.gguf_get_tensor_size.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_free.argtypes = [ctypes.c_void_p]
    lib.ggml_type_size.restype = ctypes.c_size_t
    lib.ggml_type_size.argtypes = [ctypes.c_int]
    lib.ggml_blck_size.restype = ctypes.c_int64
    lib.ggml_blck_size.argtypes = [ctypes.c_int]
    ctx = lib.gguf_init_from_file(str(path).encode(), _InitParams(True, None))
    if not ctx:
        raise ValueError(f"{path.name} is not a GGUF file llama.cpp can read")
    try:
        table = {}
        for i in range(lib.gguf_get_n_tensors(ctx)):
            kind = lib.gguf_get_tensor_type(ctx, i)
            size = lib.gguf_get_tensor_size(ctx, i)
            elements = size // lib.ggml_type_size(kind) * lib.ggml_blck_size(kind)
            table[lib.gguf_get_tensor_name(ctx, i).decode()] = _Tensor(kind, elements)
        return table
    finally:
        lib.gguf_free(ctx)


def weights_for(source: Path, cache: Path | None, mode: WideHead) -> Path:
    """The file llama.cpp should load for `source`: a widened copy where `mode` says so and one
    can be made, else `source` itself."""
    if mode == "off" or cache is None:
        return source
    if mode == "auto" and not bf16_gemm_available():
        return source
    try:
        target = cache / f"{source.stem}.bf16-head-{_identity(source)}.gguf"
        if target.exists():
            return target  # only ever renamed into place whole
        tensors = _tensors(source)
        head = tensors.get(_OUTPUT) or tensors.get(_EMBEDDINGS)
        if head is None or head.kind in _PLAIN:
            return source
        total = sum(t.elements for t in tensors.values())
        if mode == "auto" and head.elements < MIN_HEAD_SHARE * total:
            return source
        cache.mkdir(parents=True, exist_ok=True)
        partial = cache / f".{target.name}.{os.getpid()}.partial"
        try:
            _write(source, partial)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    except (OSError, ValueError, NotImplementedError) as exc:
        log.warning("kept %s's own output layer: %s", source.name, exc)
        return source
    log.info("widened %s's output layer to BF16 in %s", source.name, target)
    return target


def _identity(source: Path) -> str:
    stat = source.stat()
    key = f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _write(source: Path, path: Path) -> None:
    """Every tensor and key of `source`, with `output.weight` (new or replaced) in BF16."""
    import gguf  # only where a file is written

    reader = gguf.GGUFReader(source)
    if reader.endianess != gguf.GGUFEndian.LITTLE:
        raise ValueError("big-endian GGUF files are served as they are")
    by_name = {t.name: t for t in reader.tensors}
    head = by_name.get(_OUTPUT) or by_name[_EMBEDDINGS]
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(path, arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        if field.name == gguf.Keys.General.ALIGNMENT:
            writer.add_custom_alignment(int(field.contents()))
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    kept = [t for t in reader.tensors if t.name != _OUTPUT]
    rows, width = int(head.shape[1]), int(head.shape[0])  # GGUF shapes are innermost-first
    for tensor in kept:
        writer.add_tensor_info(
            tensor.name,
            tensor.data.shape,
            tensor.data.dtype,
            tensor.data.nbytes,
            tensor.tensor_type,
        )
    wide = _to_bf16(head.data, head.tensor_type, rows, width)
    writer.add_tensor_info(
        _OUTPUT, wide.shape, wide.dtype, wide.nbytes, gguf.GGMLQuantizationType.BF16
    )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in kept:
        writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    writer.write_tensor_data(wide)
    writer.close()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # on disk before it is renamed into place
    finally:
        os.close(fd)


def _to_bf16(blocks: np.ndarray, kind, rows: int, width: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Dequantize `rows` rows of quantized blocks and round them to BF16 (as GGUF's raw bytes)."""
    import gguf

    out = np.empty((rows, 2 * width), dtype=np.uint8)
    for start in range(0, rows, CHUNK_ROWS):
        values = gguf.quants.dequantize(blocks[start : start + CHUNK_ROWS], kind)
        out[start : start + CHUNK_ROWS] = gguf.quants.quantize(
            values.reshape(-1, width), gguf.GGMLQuantizationType.BF16
        )
    return out
