"""Schemas of `POST /v1/models/import`: an organisation's own model (GGUF, ONNX, or an ONNX
sentence encoder with its tokenizer.json) registered as a version of one of its models.

The route takes either a multipart upload (`file`, for embeddings also `tokenizer`, and the
options below as form fields, `signature` as JSON text) or a JSON body naming files uploaded
earlier through the Files API (`file_id`, `tokenizer_file_id`).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints, field_validator

from aiaas.protocol.platform import IdStr, Request
from aiaas.protocol.registry import ModelVersionPublic
from aiaas.specs.signature import ModelSignature

__all__ = [
    "IMPORT_BODY",
    "ImportFormatName",
    "ImportFromFiles",
    "ImportOptions",
    "ImportedVersionPublic",
]

ImportFormatName = Literal["gguf", "onnx", "sentence-embedding"]
FORMATS: tuple[ImportFormatName, ...] = ("gguf", "onnx", "sentence-embedding")
# The model's own name; its id is `<name>:<organisation slug>`.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MAX_CHAT_TEMPLATE_CHARS = 256 * 1024
MAX_SEQ_LENGTH = 8192

ModelName = Annotated[str, StringConstraints(pattern=MODEL_NAME_PATTERN)]


class ImportOptions(Request):
    """What an import says besides its files (multipart form fields, or JSON)."""

    name: ModelName = Field(
        description="The model's name; its id is `<name>:<organisation slug>`. Importing a "
        "name again adds a version to that model."
    )
    format: ImportFormatName | None = Field(
        default=None,
        description="gguf, onnx or sentence-embedding; default: GGUF when the file starts with "
        "GGUF, sentence-embedding when a tokenizer is given, else onnx.",
    )
    chat_template: Annotated[str, StringConstraints(max_length=MAX_CHAT_TEMPLATE_CHARS)] | None = (
        Field(
            default=None,
            description="GGUF: a Jinja chat template to serve it with (default: the file's own).",
        )
    )
    signature: ModelSignature | None = Field(
        default=None,
        description="ONNX: the inputs and output to serve, and class labels for a classifier "
        "(JSON text in a multipart form).",
    )
    pooling: Literal["mean", "cls", "max"] | None = Field(
        default=None, description="Sentence embedding: how token vectors are pooled (mean)."
    )
    normalize: bool | None = Field(
        default=None, description="Sentence embedding: L2-normalise the vectors (true)."
    )
    max_seq_length: int | None = Field(
        default=None,
        ge=1,
        le=MAX_SEQ_LENGTH,
        description="Sentence embedding: longer inputs are truncated (default: the tokenizer's "
        "truncation length, else 512).",
    )
    project_id: IdStr | None = Field(
        default=None, description="The project the model belongs to (default: the key's)."
    )

    @field_validator("signature", mode="before")
    @classmethod
    def _signature_text(cls, value: Any) -> Any:
        """A form field carries the signature as JSON text."""
        if isinstance(value, str):
            try:
                return json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"signature is not valid JSON: {exc}") from exc
        return value


class ImportFromFiles(ImportOptions):
    """The JSON body: files uploaded earlier through the Files API, by id."""

    file_id: IdStr = Field(description="The model file (any purpose, e.g. user_data).")
    tokenizer_file_id: IdStr | None = Field(
        default=None, description="Sentence embedding: its tokenizer.json."
    )


class ImportedVersionPublic(ModelVersionPublic):
    """The registered version, and what the import found out about the file."""

    base: str
    task: str
    format: ImportFormatName
    metadata: dict[str, Any]


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its `$defs` resolved in place (they would dangle inside
    an OpenAPI request body)."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return walk(defs[ref.removeprefix("#/$defs/")])
            return {key: walk(value) for key, value in node.items()}
        if isinstance(node, list):
            return [walk(item) for item in node]
        return node

    resolved: dict[str, Any] = walk(schema)
    return resolved


def _form_schema() -> dict[str, Any]:
    options = _inline(ImportOptions.model_json_schema())
    # Form fields are text: an optional one is left out, never null.
    properties = {name: _not_null(field) for name, field in options["properties"].items()}
    properties["signature"] = {
        "type": "string",
        "description": "ONNX: the signature as JSON text: "
        '{"inputs": [{"name", "datatype", "shape"}], "outputs": [...], "labels": [...]}.',
    }
    return {
        "type": "object",
        "required": ["file", "name"],
        "properties": {
            "file": {"type": "string", "format": "binary"},
            "tokenizer": {"type": "string", "format": "binary"},
            **properties,
        },
    }


def _not_null(field: dict[str, Any]) -> dict[str, Any]:
    choices = [c for c in field.get("anyOf", []) if c.get("type") != "null"]
    if len(choices) != 1:
        return field
    rest = {k: v for k, v in field.items() if k not in ("anyOf", "default")}
    return {**choices[0], **rest}


# The request body, documented by hand: the route reads multipart bodies as a stream.
IMPORT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": _form_schema()},
            "application/json": {"schema": _inline(ImportFromFiles.model_json_schema())},
        },
    }
}
