"""Edge bundles of registered versions: the zip that predicts without aiaas installed.

The zip is written to an anonymous temporary file (gone once closed) and handed back open, so a
large graph never sits in memory and nothing is left on disk when a download is cut short.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from aiaas.edge.bundle import BundleSource, bundle_stem, write_bundle
from aiaas.engines.embeddings.export import minilm_l6_v2_dir
from aiaas.errors import InvalidRequest
from aiaas.services.registry import RegistryService
from aiaas.specs.preprocessing import PreprocessingSpec, TextStep
from aiaas.specs.shapes import TOKENIZER_REF

__all__ = ["Bundle", "BundleService"]


@dataclass(frozen=True, slots=True)
class Bundle:
    file: IO[bytes]  # positioned at the start; the caller closes it
    filename: str
    bytes: int


class BundleService:
    def __init__(self, registry: RegistryService, *, temp_dir: Path | None = None) -> None:
        self._registry = registry
        self._temp_dir = temp_dir

    def build(self, *, org_id: str, model_id: str, version: int) -> Bundle:
        """The bundle of a version `org_id` owns or holds a `read` grant on (NotFound for any
        other)."""
        found = self._registry.read_version(org_id=org_id, model_id=model_id, version=version)
        if "preprocessing.json" not in found.artifacts and (
            {"signature.json", "model.gguf", "encoder.onnx"} & set(found.artifacts)
        ):
            raise InvalidRequest(
                f"Version {version} of '{model_id}' is an imported model: edge bundles are not "
                "supported for imported models (download its artifacts instead).",
                param="model",
                code="not_supported_for_imported_models",
            )
        if "model.onnx" not in found.artifacts:
            raise InvalidRequest(
                f"Version {version} of '{model_id}' has no ONNX graph to bundle.", param="model"
            )
        spec_json = self._registry.read_artifact(found, "preprocessing.json")
        spec = PreprocessingSpec.model_validate_json(spec_json)
        description_json = self._registry.read_artifact(found, "model.json")
        description = json.loads(description_json)
        tokenizer = _tokenizer(spec)
        _, onnx = self._registry.open_artifact(found, "model.onnx")
        source = BundleSource(
            model_id=found.model_id,
            version=found.version,
            version_id=found.id,
            created_at=found.created_at,
            spec=spec,
            spec_json=spec_json,
            description=description,
            description_json=description_json,
            metrics=found.metrics,
            lineage=found.lineage,
            onnx=onnx,
            tokenizer=tokenizer,
        )
        # Handed to the caller open (it streams and closes it), so no `with` here.
        file = tempfile.TemporaryFile(prefix="bundle-", suffix=".zip", dir=self._temp_dir)  # noqa: SIM115
        try:
            write_bundle(file, source)
            size = file.tell()
            file.seek(0)
        except BaseException:
            file.close()
            raise
        return Bundle(file=file, filename=f"{bundle_stem(found.model_id, version)}.zip", bytes=size)


def _tokenizer(spec: PreprocessingSpec) -> bytes | None:
    """The pretrained tokenizer a wordpiece text step reads with (the one serving loads)."""
    refs = {
        step.tokenizer_ref
        for step in spec.features
        if isinstance(step, TextStep) and step.tokenizer == "wordpiece"
    }
    if not refs:
        return None
    unknown = sorted(str(ref) for ref in refs if ref != TOKENIZER_REF)
    if unknown:
        raise InvalidRequest(f"Unknown tokenizers {unknown}: this version cannot be bundled.")
    return (minilm_l6_v2_dir() / "tokenizer.json").read_bytes()
