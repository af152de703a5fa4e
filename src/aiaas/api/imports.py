"""`POST /v1/models/import`: an organisation's own model (GGUF, ONNX, ONNX sentence encoder)
registered as a version of one of its models.

Multipart uploads stream in (no spooling to disk, the size limit enforced as the bytes arrive);
a JSON body names files uploaded earlier through the Files API. Validating and registering is
`ImportService`'s, in a worker thread.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any

import anyio
import anyio.to_thread
from fastapi import APIRouter, Depends, Request, status
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from aiaas.api.deps import PlatformDep, TrainingDep
from aiaas.api.multipart import StreamingForm
from aiaas.errors import InvalidRequest, PayloadTooLarge
from aiaas.protocol.imports import (
    IMPORT_BODY,
    MAX_CHAT_TEMPLATE_CHARS,
    ImportedVersionPublic,
    ImportFromFiles,
    ImportOptions,
)
from aiaas.protocol.registry import ModelVersionPublic
from aiaas.services.imports import Imported, ImportService, Spool

router = APIRouter(prefix="/v1/models", tags=["models"])

MAX_JSON_BYTES = 2 * MAX_CHAT_TEMPLATE_CHARS * 4  # a chat template (UTF-8) and a signature
_PARTS = ("file", "tokenizer")


async def get_imports(platform: PlatformDep) -> ImportService:
    return platform.imports


ImportsDep = Annotated[ImportService, Depends(get_imports)]


@router.post(
    "/import",
    status_code=status.HTTP_201_CREATED,
    response_model=ImportedVersionPublic,
    openapi_extra=IMPORT_BODY,
    responses={
        409: {"description": "The model exists with another base or task, or is another's"},
        415: {"description": "The body is neither multipart/form-data nor JSON"},
    },
)
async def import_model(
    request: Request, ctx: TrainingDep, imports: ImportsDep
) -> ImportedVersionPublic:
    """Import a GGUF (llama.cpp), an ONNX model with its signature, or an ONNX sentence encoder
    with its tokenizer.json, as the next version of the model `<name>:<org slug>`. Pickles
    (.pt, .pth, .pkl, .bin, .joblib, .h5, .keras) are refused."""
    assert ctx.project_id is not None
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    spools: dict[str, Spool] = {}
    try:
        if media_type == "application/json":
            options: ImportOptions = await _json_body(request)
            await _spool_files(imports, ctx.org_id, options, spools)
        else:
            options = await _receive_form(request, imports, spools)
        imported = await anyio.to_thread.run_sync(
            functools.partial(
                imports.import_model,
                org_id=ctx.org_id,
                project_id=ctx.project_id,
                actor=ctx.actor,
                options=options,
                model=spools["file"],
                tokenizer=spools.get("tokenizer"),
            )
        )
    except ClientDisconnect as exc:
        raise InvalidRequest("The client went away during the upload.") from exc
    finally:
        for spool in spools.values():
            spool.close()
    return _public(imported)


async def _receive_form(
    request: Request, imports: ImportService, spools: dict[str, Spool]
) -> ImportOptions:
    """The file parts into spools (as they stream in), then the form fields as options."""
    form = StreamingForm(request, max_field_bytes=MAX_CHAT_TEMPLATE_CHARS * 4)
    while (part := await form.next_file()) is not None:
        if part.name not in _PARTS:
            raise InvalidRequest(
                f"Unexpected file part {part.name!r}: an import takes 'file' and, for a "
                "sentence-embedding model, 'tokenizer'.",
                param=part.name,
            )
        if part.name in spools:
            raise InvalidRequest(f"The '{part.name}' part is given twice.", param=part.name)
        # anyio's worker thread: `form.sync_chunks()` pulls the body through anyio.from_thread.
        spools[part.name] = await anyio.to_thread.run_sync(
            functools.partial(
                imports.spool, form.sync_chunks(), filename=part.filename, part=part.name
            )
        )
    if "file" not in spools:
        raise InvalidRequest("Missing the 'file' part of the upload.", param="file")
    # An empty form field is one left out (HTML forms send them).
    fields = {name: value for name, value in form.fields.items() if value != ""}
    return _validated(ImportOptions, fields)


async def _json_body(request: Request) -> ImportFromFiles:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_JSON_BYTES:
            raise PayloadTooLarge(
                f"A JSON import body is at most {MAX_JSON_BYTES} bytes: upload the model as "
                "multipart/form-data or through /v1/files.",
            )
    try:
        return ImportFromFiles.model_validate_json(bytes(body))
    except ValidationError as exc:
        raise _request_error(exc) from None


async def _spool_files(
    imports: ImportService, org_id: str, options: ImportFromFiles, spools: dict[str, Spool]
) -> None:
    named = {"file": options.file_id, "tokenizer": options.tokenizer_file_id}
    for part, file_id in named.items():
        if file_id is not None:
            spools[part] = await anyio.to_thread.run_sync(
                functools.partial(imports.spool_file, org_id=org_id, file_id=file_id, part=part)
            )


def _validated(model: type[ImportOptions], fields: dict[str, Any]) -> ImportOptions:
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise _request_error(exc) from None


def _request_error(exc: ValidationError) -> RequestValidationError:
    """A body that failed validation, as FastAPI reports one: the same 400 as everywhere."""
    errors = [
        {"type": e["type"], "loc": ("body", *e["loc"]), "msg": e["msg"]} for e in exc.errors()
    ]
    return RequestValidationError(errors)


def _public(imported: Imported) -> ImportedVersionPublic:
    version = ModelVersionPublic.from_domain(imported.version)
    return ImportedVersionPublic(
        **version.model_dump(),
        base=imported.model.base,
        task=imported.model.task,
        format=imported.format,
        metadata=imported.metadata,
    )
