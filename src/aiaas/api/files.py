"""OpenAI's Files API: upload (streamed, encrypted), list, retrieve, download, delete."""

from __future__ import annotations

import functools
from typing import Annotated, Literal
from urllib.parse import quote

import anyio
import anyio.to_thread
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.requests import ClientDisconnect

from aiaas.api.deps import After, FilesReadDep, FilesWriteDep, PlatformDep, path_id
from aiaas.api.multipart import StreamingForm
from aiaas.domain import FilePurpose
from aiaas.errors import InvalidRequest
from aiaas.protocol.files import (
    UPLOAD_BODY,
    UPLOAD_PURPOSES,
    FileDeleted,
    FileObject,
    PurposeName,
)
from aiaas.protocol.platform import ListResponse
from aiaas.services.files import FileService
from aiaas.services.privacy import PrivacyService

router = APIRouter(prefix="/v1/files", tags=["files"])

FileId = Annotated[str, path_id("A file id.")]


async def get_files(platform: PlatformDep) -> FileService:
    return platform.files


FilesDep = Annotated[FileService, Depends(get_files)]


async def get_privacy(platform: PlatformDep) -> PrivacyService:
    return platform.privacy


def _purpose(value: str | None) -> FilePurpose | None:
    if value is None:
        return None
    try:
        purpose = FilePurpose(value)
        if purpose in UPLOAD_PURPOSES:
            return purpose
        raise ValueError(value)
    except ValueError:
        choices = ", ".join(p.value for p in UPLOAD_PURPOSES)
        raise InvalidRequest(
            f"Invalid purpose {value!r}; expected one of {choices}.", param="purpose"
        ) from None


@router.post(
    "",
    response_model=FileObject,
    openapi_extra=UPLOAD_BODY,
    responses={415: {"description": "The body is not multipart/form-data"}},
)
async def create_file(
    request: Request,
    ctx: FilesWriteDep,
    files: FilesDep,
    privacy: Annotated[PrivacyService, Depends(get_privacy)],
    response: Response,
) -> FileObject:
    form = StreamingForm(request)
    part = await form.next_file()
    if part is None or part.name != "file":
        raise InvalidRequest("Missing the 'file' part of the upload.", param="file")
    purpose = _purpose(form.fields.get("purpose"))
    assert ctx.project_id is not None
    # The org's privacy policy for this purpose: under `redact` only redacted bytes are stored.
    screen = await privacy.file_screen(ctx.org_id, ctx.project_id, purpose)
    # anyio's worker threads, not `asyncio.to_thread` as elsewhere: `form.sync_chunks()` pulls
    # the body through `anyio.from_thread`, which needs an anyio worker thread; and a cancelled
    # wait here still waits for its thread to finish, so `abort` never races `receive` or
    # `commit`.
    upload = await anyio.to_thread.run_sync(
        functools.partial(
            files.begin,
            org_id=ctx.org_id,
            project_id=ctx.project_id,
            filename=part.filename,
            actor=ctx.actor,
        )
    )
    try:
        await anyio.to_thread.run_sync(
            lambda: files.receive(
                upload,
                screen.wrap(form.sync_chunks()) if screen else form.sync_chunks(),
                purpose=purpose,
            )
        )
        await form.finish()
        final = _purpose(form.fields.get("purpose"))
        if final is None:
            raise InvalidRequest("Missing the 'purpose' field of the upload.", param="purpose")
        stored = await anyio.to_thread.run_sync(
            lambda: files.commit(upload, purpose=final, actor=ctx.actor)
        )
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(files.abort, upload)
        if isinstance(exc, ClientDisconnect):
            raise InvalidRequest("The client went away during the upload.") from exc
        raise
    if screen is None:
        return FileObject.from_domain(stored)
    response.headers.update(screen.headers)
    return FileObject.from_domain(stored).model_copy(update={"status_details": screen.details})


@router.get("", response_model=ListResponse[FileObject])
def list_files(
    ctx: FilesReadDep,
    files: FilesDep,
    purpose: Annotated[PurposeName | None, Query()] = None,
    after: After = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    order: Annotated[Literal["asc", "desc"], Query()] = "desc",
) -> ListResponse[FileObject]:
    page = files.list(
        org_id=ctx.org_id,
        purpose=FilePurpose(purpose) if purpose else None,
        after=after,
        limit=limit,
        newest_first=order == "desc",
    )
    data = [FileObject.from_domain(f) for f in page.items]
    return ListResponse[FileObject].of(data, has_more=page.has_more)


@router.get("/{file_id}", response_model=FileObject)
def retrieve_file(file_id: FileId, ctx: FilesReadDep, files: FilesDep) -> FileObject:
    return FileObject.from_domain(files.get(org_id=ctx.org_id, file_id=file_id))


@router.get(
    "/{file_id}/content",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def download_file(file_id: FileId, ctx: FilesReadDep, files: FilesDep) -> StreamingResponse:
    stored, chunks = files.open(org_id=ctx.org_id, file_id=file_id)
    return StreamingResponse(
        chunks,
        media_type="application/octet-stream",
        headers={
            "Content-Length": str(stored.bytes),
            "Content-Disposition": _attachment(stored.filename),
        },
    )


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(file_id: FileId, ctx: FilesWriteDep, files: FilesDep) -> FileDeleted:
    files.delete(org_id=ctx.org_id, file_id=file_id, actor=ctx.actor)
    return FileDeleted(id=file_id)


def _attachment(filename: str) -> str:
    return f"attachment; filename*=UTF-8''{quote(filename)}"
