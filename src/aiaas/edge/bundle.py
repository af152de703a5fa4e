"""An edge bundle: one registered version as a zip that predicts without aiaas installed.

Everything sits under one folder named like the zip (`<model>-v<n>/`):

    model.onnx           the version's graph           } the registered artifacts, byte for byte:
    preprocessing.json   its fitted preprocessing spec } their sha256 sums are the registry's
    model.json           its description (input names, classes)
    tokenizer.json       wordpiece text models only: the pretrained tokenizer they read with
    labels.json          the task and its classes (or the regression target)
    run.py               the runner (`aiaas.edge.runner`): needs only numpy and onnxruntime
    README.md            what it is, inputs, outputs, how to run, metrics and lineage
    manifest.json        sha256 and size of every other file

Entries carry the version's creation time, so one version always gives the same file names,
times and (for one aiaas release) the same bytes. The graph is copied in chunks: a large model
never has to fit in memory twice.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from aiaas.edge import readme
from aiaas.edge.runner import BundleError, WordPiece
from aiaas.errors import InvalidRequest
from aiaas.specs.preprocessing import PreprocessingSpec, TextStep
from aiaas.specs.types import Task

__all__ = ["RUNNER_PATH", "BundleSource", "bundle_stem", "write_bundle"]

RUNNER_PATH = Path(__file__).with_name("runner.py")
MANIFEST = "manifest.json"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True, slots=True)
class BundleSource:
    """What a bundle is made of: one version's artifacts and what the registry knows of it."""

    model_id: str
    version: int
    version_id: str
    created_at: float
    spec: PreprocessingSpec
    spec_json: bytes  # preprocessing.json as registered (the bundle ships these exact bytes)
    description: dict[str, Any]
    description_json: bytes  # model.json as registered
    metrics: dict[str, Any]
    lineage: dict[str, Any]
    onnx: Iterable[bytes]  # the graph in chunks, read once
    tokenizer: bytes | None  # tokenizer.json, for a wordpiece text step


def bundle_stem(model_id: str, version: int) -> str:
    """A file name for any model id: `ft:mlp:acme:churn:abc` -> `ft-mlp-acme-churn-abc-v3`."""
    safe = _UNSAFE.sub("-", model_id).strip("-.") or "model"
    return f"{safe[:120]}-v{version}"


def write_bundle(target: IO[bytes], source: BundleSource) -> dict[str, Any]:
    """Write the bundle's zip to `target`; the manifest it holds."""
    spec = source.spec
    if not spec.fitted or spec.label is None:
        raise InvalidRequest("This version's preprocessing is not fitted; it cannot be bundled.")
    if _needs_tokenizer(spec):
        _check_tokenizer(source.tokenizer)
    stem = bundle_stem(source.model_id, source.version)
    stamp = time.gmtime(max(source.created_at, 315532800.0))[:6]  # zip dates start in 1980
    files: dict[str, dict[str, Any]] = {}
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:

        def add(name: str, chunks: Iterable[bytes], *, mode: int = 0o644) -> None:
            info = zipfile.ZipInfo(f"{stem}/{name}", date_time=stamp)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (0o100000 | mode) << 16
            digest, size = hashlib.sha256(), 0
            with archive.open(info, "w", force_zip64=True) as entry:
                for chunk in chunks:
                    entry.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
            if name != MANIFEST:
                files[name] = {"sha256": digest.hexdigest(), "bytes": size}

        add("model.onnx", source.onnx)
        add("preprocessing.json", [source.spec_json])
        add("model.json", [source.description_json])
        if source.tokenizer is not None and _needs_tokenizer(spec):
            add("tokenizer.json", [source.tokenizer])
        add("labels.json", [_json(_labels(spec))])
        add("run.py", [RUNNER_PATH.read_bytes()], mode=0o755)
        add("README.md", [readme.render(source, stem).encode()])
        manifest = {
            "format": 1,
            "model": source.model_id,
            "version": source.version,
            "version_id": source.version_id,
            "created_at": int(source.created_at),
            "runner": "run.py",
            "requires": readme.requirements(spec),
            "files": files,
        }
        add(MANIFEST, [_json(manifest)])
    return manifest


def _json(value: object) -> bytes:
    return (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode()


def _labels(spec: PreprocessingSpec) -> dict[str, Any]:
    label = spec.label
    assert label is not None
    if label.task is Task.CLASSIFICATION:
        return {"task": label.task.value, "column": label.column, "classes": label.classes}
    return {"task": label.task.value, "column": label.column, "classes": None}


def _needs_tokenizer(spec: PreprocessingSpec) -> bool:
    return any(isinstance(s, TextStep) and s.tokenizer == "wordpiece" for s in spec.features)


def _check_tokenizer(tokenizer: bytes | None) -> None:
    """The runner must be able to read this tokenizer; say so now rather than on the device."""
    if tokenizer is None:
        raise InvalidRequest("This model's tokenizer is not available to bundle.")
    try:
        WordPiece(json.loads(tokenizer))
    except (BundleError, KeyError, TypeError, ValueError) as exc:
        raise InvalidRequest(
            f"This model's tokenizer cannot run outside the platform: {exc}", param="model"
        ) from exc
