"""Platform routes for organisations: the operator creates them; members see their own."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, status

from aiaas.api.deps import (
    AdminDep,
    After,
    Limit,
    PlatformAdminDep,
    PrincipalDep,
    TenancyDep,
    path_id,
)
from aiaas.domain import Actor
from aiaas.protocol.platform import (
    ListResponse,
    OrganizationCreate,
    OrganizationCreated,
    OrganizationPublic,
    OrganizationUpdate,
)
from aiaas.services.tenancy import OrgChanges

router = APIRouter(prefix="/v1/organizations", tags=["organizations"])

OrgId = Annotated[str, path_id("An organization id.")]


@router.post("", response_model=OrganizationCreated, status_code=status.HTTP_201_CREATED)
def create_organization(
    body: OrganizationCreate, admin: PlatformAdminDep, tenancy: TenancyDep
) -> OrganizationCreated:
    created = tenancy.create_org(name=body.name, actor=Actor.of(admin), region=body.region)
    return OrganizationCreated(
        **OrganizationPublic.from_domain(created.org).model_dump(),
        project_id=created.project.id,
        api_key=created.admin_key.secret,
    )


@router.get("", response_model=ListResponse[OrganizationPublic])
def list_organizations(
    principal: PrincipalDep, tenancy: TenancyDep, after: After = None, limit: Limit = 20
) -> ListResponse[OrganizationPublic]:
    page = tenancy.list_orgs(principal, after=after, limit=limit)
    data = [OrganizationPublic.from_domain(o) for o in page.items]
    return ListResponse[OrganizationPublic].of(data, has_more=page.has_more)


@router.get("/{org_id}", response_model=OrganizationPublic)
def retrieve_organization(
    org_id: OrgId, principal: PrincipalDep, tenancy: TenancyDep
) -> OrganizationPublic:
    return OrganizationPublic.from_domain(tenancy.get_org(principal, org_id))


@router.post("/{org_id}", response_model=OrganizationPublic)
def modify_organization(
    org_id: OrgId, body: OrganizationUpdate, admin: AdminDep, tenancy: TenancyDep
) -> OrganizationPublic:
    """An org admin changes its own organisation's settings; the operator, any organisation's."""
    org = tenancy.update_org(
        admin,
        org_id,
        OrgChanges(
            redact_pii=body.redact_pii,
            weight=body.weight,
            rate_limits=body.rate_limits.to_domain() if body.rate_limits else None,
            quotas=body.quotas.to_domain() if body.quotas else None,
        ),
        actor=Actor.of(admin),
    )
    return OrganizationPublic.from_domain(org)
