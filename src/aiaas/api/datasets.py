"""Platform routes for datasets and their immutable versions."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, status
from fastapi.responses import StreamingResponse

from aiaas.api.deps import (
    After,
    FilesReadDep,
    FilesWriteDep,
    Limit,
    OrgContext,
    PlatformDep,
    path_id,
)
from aiaas.protocol.datasets import (
    DatasetCreate,
    DatasetDeleted,
    DatasetPublic,
    DatasetRows,
    DatasetVersionCreate,
    DatasetVersionDeleted,
    DatasetVersionPublic,
)
from aiaas.protocol.platform import ListResponse
from aiaas.services.datasets import DatasetService, Workspace

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

DatasetId = Annotated[str, path_id("A dataset id.")]
VersionNumber = Annotated[int, Path(ge=1, le=2**31 - 1, description="A version number.")]


async def get_datasets(platform: PlatformDep) -> DatasetService:
    return platform.datasets


DatasetsDep = Annotated[DatasetService, Depends(get_datasets)]


def _workspace(ctx: OrgContext) -> Workspace:
    assert ctx.project_id is not None
    return Workspace(org_id=ctx.org_id, project_id=ctx.project_id, actor=ctx.actor)


@router.post("", response_model=DatasetPublic, status_code=status.HTTP_201_CREATED)
def create_dataset(body: DatasetCreate, ctx: FilesWriteDep, datasets: DatasetsDep) -> DatasetPublic:
    """Make a dataset and its version 1 from uploaded files (purpose `dataset` or any other)."""
    dataset, version = datasets.create(
        _workspace(ctx),
        name=body.name,
        description=body.description,
        file_ids=body.file_ids,
        options=body.build_options(),
        redact_pii=body.redact_pii,
        residency=body.residency,
    )
    return DatasetPublic.from_domain(dataset, version)


@router.get("", response_model=ListResponse[DatasetPublic])
def list_datasets(
    ctx: FilesReadDep, datasets: DatasetsDep, after: After = None, limit: Limit = 20
) -> ListResponse[DatasetPublic]:
    """The caller's datasets, then other organisations' that it may read (with `owned_by`)."""
    page = datasets.list(org_id=ctx.org_id, after=after, limit=limit)
    data = [DatasetPublic.from_domain(s.dataset, owned_by=s.owned_by) for s in page.items]
    return ListResponse[DatasetPublic].of(data, has_more=page.has_more)


@router.get("/{dataset_id}", response_model=DatasetPublic)
def retrieve_dataset(
    dataset_id: DatasetId, ctx: FilesReadDep, datasets: DatasetsDep
) -> DatasetPublic:
    shown = datasets.show(org_id=ctx.org_id, dataset_id=dataset_id)
    return DatasetPublic.from_domain(shown.dataset, owned_by=shown.owned_by)


@router.delete("/{dataset_id}", response_model=DatasetDeleted)
def delete_dataset(
    dataset_id: DatasetId, ctx: FilesWriteDep, datasets: DatasetsDep
) -> DatasetDeleted:
    datasets.delete(org_id=ctx.org_id, dataset_id=dataset_id, actor=ctx.actor)
    return DatasetDeleted(id=dataset_id)


@router.post(
    "/{dataset_id}/versions",
    response_model=DatasetVersionPublic,
    status_code=status.HTTP_201_CREATED,
)
def create_version(
    dataset_id: DatasetId, body: DatasetVersionCreate, ctx: FilesWriteDep, datasets: DatasetsDep
) -> DatasetVersionPublic:
    version = datasets.add_version(
        _workspace(ctx),
        dataset_id=dataset_id,
        file_ids=body.file_ids,
        options=body.build_options(),
        redact_pii=body.redact_pii,
    )
    return DatasetVersionPublic.from_domain(version)


@router.get("/{dataset_id}/versions", response_model=ListResponse[DatasetVersionPublic])
def list_versions(
    dataset_id: DatasetId,
    ctx: FilesReadDep,
    datasets: DatasetsDep,
    after: After = None,
    limit: Limit = 20,
) -> ListResponse[DatasetVersionPublic]:
    page = datasets.list_versions(
        org_id=ctx.org_id, dataset_id=dataset_id, after=after, limit=limit
    )
    data = [DatasetVersionPublic.from_domain(v) for v in page.items]
    return ListResponse[DatasetVersionPublic].of(data, has_more=page.has_more)


@router.get("/{dataset_id}/versions/{version}", response_model=DatasetVersionPublic)
def retrieve_version(
    dataset_id: DatasetId, version: VersionNumber, ctx: FilesReadDep, datasets: DatasetsDep
) -> DatasetVersionPublic:
    found = datasets.get_version(org_id=ctx.org_id, dataset_id=dataset_id, version=version)
    return DatasetVersionPublic.from_domain(found)


@router.delete("/{dataset_id}/versions/{version}", response_model=DatasetVersionDeleted)
def delete_version(
    dataset_id: DatasetId, version: VersionNumber, ctx: FilesWriteDep, datasets: DatasetsDep
) -> DatasetVersionDeleted:
    deleted = datasets.delete_version(
        org_id=ctx.org_id, dataset_id=dataset_id, version=version, actor=ctx.actor
    )
    return DatasetVersionDeleted(id=deleted.id, version=version)


@router.get(
    "/{dataset_id}/versions/{version}/content",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/vnd.apache.parquet": {}}}},
)
def download_version(
    dataset_id: DatasetId, version: VersionNumber, ctx: FilesReadDep, datasets: DatasetsDep
) -> StreamingResponse:
    """The stored table as Parquet, with its `__split__` column."""
    found = datasets.get_version(org_id=ctx.org_id, dataset_id=dataset_id, version=version)
    return StreamingResponse(
        datasets.content(found),
        media_type="application/vnd.apache.parquet",
        headers={
            "Content-Length": str(found.bytes),
            "Content-Disposition": f'attachment; filename="{dataset_id}-v{version}.parquet"',
        },
    )


@router.get("/{dataset_id}/versions/{version}/rows", response_model=DatasetRows)
def list_rows(
    dataset_id: DatasetId,
    version: VersionNumber,
    ctx: FilesReadDep,
    datasets: DatasetsDep,
    split: Annotated[str | None, Query(pattern="^(train|validation|test)$")] = None,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> DatasetRows:
    """Rows of a version (optionally of one split); bytes come as base64 strings."""
    found = datasets.get_version(org_id=ctx.org_id, dataset_id=dataset_id, version=version)
    rows, total = datasets.rows(found, split=split, offset=offset, limit=limit)
    return DatasetRows(data=rows, offset=offset, total=total, has_more=offset + limit < total)
