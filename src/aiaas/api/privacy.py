"""Privacy policies (issue 28): an org admin reads and sets its organisation's policy, and
optionally a project's (`?project_id=`), which then replaces the organisation's there.

`GET` shows the policy at that level (`is_set: false` and everything `off` when none),
`POST` replaces it, `DELETE` removes it (back to the organisation's, or to off).
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Query

from aiaas.api.deps import ID_PATTERN, AdminDep, PlatformDep, path_id
from aiaas.domain import Actor
from aiaas.protocol.privacy import PrivacyPolicyBody, PrivacyPolicyObject
from aiaas.services.privacy import PrivacyService, policy_from_body, policy_object

router = APIRouter(prefix="/v1/organizations", tags=["privacy"])

OrgId = Annotated[str, path_id("An organization id.")]
ProjectQuery = Annotated[
    str | None,
    Query(pattern=ID_PATTERN, description="A project of the organisation: its own policy."),
]


async def get_privacy(platform: PlatformDep) -> PrivacyService:
    return platform.privacy


PrivacyDep = Annotated[PrivacyService, Depends(get_privacy)]


@router.get("/{org_id}/privacy_policy", response_model=PrivacyPolicyObject)
async def retrieve_privacy_policy(
    org_id: OrgId, admin: AdminDep, privacy: PrivacyDep, project_id: ProjectQuery = None
) -> PrivacyPolicyObject:
    policy, is_set = await asyncio.to_thread(privacy.get, admin, org_id, project_id)
    return policy_object(org_id, project_id, policy, is_set=is_set)


@router.post("/{org_id}/privacy_policy", response_model=PrivacyPolicyObject)
async def set_privacy_policy(
    org_id: OrgId,
    body: PrivacyPolicyBody,
    admin: AdminDep,
    privacy: PrivacyDep,
    project_id: ProjectQuery = None,
) -> PrivacyPolicyObject:
    policy = policy_from_body(body)
    await asyncio.to_thread(
        privacy.set, admin, org_id, policy, actor=Actor.of(admin), project_id=project_id
    )
    return policy_object(org_id, project_id, policy, is_set=True)


@router.delete("/{org_id}/privacy_policy", response_model=PrivacyPolicyObject)
async def delete_privacy_policy(
    org_id: OrgId, admin: AdminDep, privacy: PrivacyDep, project_id: ProjectQuery = None
) -> PrivacyPolicyObject:
    await asyncio.to_thread(
        privacy.reset, admin, org_id, actor=Actor.of(admin), project_id=project_id
    )
    policy, is_set = await asyncio.to_thread(privacy.get, admin, org_id, project_id)
    return policy_object(org_id, project_id, policy, is_set=is_set)
