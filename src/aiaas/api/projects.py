"""Org-admin routes for projects."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, status

from aiaas.api.deps import After, Limit, OrgContextDep, TenancyDep, path_id
from aiaas.protocol.platform import ListResponse, ProjectCreate, ProjectPublic, ProjectUpdate

router = APIRouter(prefix="/v1/projects", tags=["projects"])

ProjectId = Annotated[str, path_id("A project id.")]


@router.post("", response_model=ProjectPublic, status_code=status.HTTP_201_CREATED)
def create_project(body: ProjectCreate, ctx: OrgContextDep, tenancy: TenancyDep) -> ProjectPublic:
    project = tenancy.create_project(org_id=ctx.org_id, name=body.name, actor=ctx.actor)
    return ProjectPublic.from_domain(project)


@router.get("", response_model=ListResponse[ProjectPublic])
def list_projects(
    ctx: OrgContextDep,
    tenancy: TenancyDep,
    after: After = None,
    limit: Limit = 20,
    include_archived: Annotated[bool, Query()] = False,
) -> ListResponse[ProjectPublic]:
    page = tenancy.list_projects(
        org_id=ctx.org_id, include_archived=include_archived, after=after, limit=limit
    )
    data = [ProjectPublic.from_domain(p) for p in page.items]
    return ListResponse[ProjectPublic].of(data, has_more=page.has_more)


@router.get("/{project_id}", response_model=ProjectPublic)
def retrieve_project(
    project_id: ProjectId, ctx: OrgContextDep, tenancy: TenancyDep
) -> ProjectPublic:
    return ProjectPublic.from_domain(tenancy.get_project(org_id=ctx.org_id, project_id=project_id))


@router.post("/{project_id}", response_model=ProjectPublic)
def modify_project(
    project_id: ProjectId, body: ProjectUpdate, ctx: OrgContextDep, tenancy: TenancyDep
) -> ProjectPublic:
    project = tenancy.update_project(
        org_id=ctx.org_id,
        project_id=project_id,
        name=body.name,
        rate_limits=body.rate_limits.to_domain() if body.rate_limits else None,
        actor=ctx.actor,
    )
    return ProjectPublic.from_domain(project)


@router.post("/{project_id}/archive", response_model=ProjectPublic)
def archive_project(
    project_id: ProjectId, ctx: OrgContextDep, tenancy: TenancyDep
) -> ProjectPublic:
    project = tenancy.archive_project(org_id=ctx.org_id, project_id=project_id, actor=ctx.actor)
    return ProjectPublic.from_domain(project)
