"""The audit log: org admins read their org's events; the operator verifies the chain."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from aiaas.api.deps import ID_PATTERN, AdminDep, After, AuditDep, Limit, PlatformAdminDep
from aiaas.protocol.platform import AuditEventPublic, AuditVerification, ListResponse

router = APIRouter(prefix="/v1/audit", tags=["audit"])


@router.get("", response_model=ListResponse[AuditEventPublic])
def list_audit_events(
    principal: AdminDep,
    audit: AuditDep,
    after: After = None,
    limit: Limit = 20,
    organization_id: Annotated[
        str | None, Query(pattern=ID_PATTERN, description="Platform admin only: one org's events.")
    ] = None,
) -> ListResponse[AuditEventPublic]:
    page = audit.list(principal, org_id=organization_id, after=after, limit=limit)
    data = [AuditEventPublic.from_domain(e) for e in page.items]
    return ListResponse[AuditEventPublic].of(data, has_more=page.has_more)


@router.get("/verify", response_model=AuditVerification)
def verify_audit_chain(_admin: PlatformAdminDep, audit: AuditDep) -> AuditVerification:
    report = audit.verify()
    return AuditVerification(
        ok=report.ok, events=report.events, broken_at_seq=report.broken_at_seq, reason=report.reason
    )
