"""Schemas of OpenAI's Files API (`/v1/files`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from aiaas.domain import FilePurpose, StoredFile

PurposeName = Literal["fine-tune", "batch", "batch_output", "dataset", "user_data"]
# What a client may upload: `batch_output` files are written by batches only.
UPLOAD_PURPOSES = [p for p in FilePurpose if p is not FilePurpose.BATCH_OUTPUT]

# The multipart body, documented by hand: the route reads the body as a stream.
UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "purpose": {"type": "string", "enum": [p.value for p in UPLOAD_PURPOSES]},
                    },
                }
            }
        },
    }
}


class FileObject(BaseModel):
    object: Literal["file"] = "file"
    id: str
    bytes: int
    created_at: int
    expires_at: int | None = None
    filename: str
    purpose: PurposeName
    status: Literal["processed"] = "processed"
    status_details: str | None = None
    sha256: str | None = None

    @classmethod
    def from_domain(cls, stored: StoredFile) -> FileObject:
        return cls(
            id=stored.id,
            bytes=stored.bytes,
            created_at=int(stored.created_at),
            filename=stored.filename,
            purpose=stored.purpose.value,
            sha256=stored.sha256,
        )


class FileDeleted(BaseModel):
    object: Literal["file"] = "file"
    id: str
    deleted: bool = True
