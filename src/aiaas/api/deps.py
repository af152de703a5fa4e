"""Dependencies, named once as `Annotated` aliases so routes read like signatures."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Header, Path, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from aiaas.domain import Actor, Principal, Scope
from aiaas.errors import AuthenticationFailed, InvalidRequest, PermissionDenied
from aiaas.platform import Platform
from aiaas.protocol.platform import MODEL_REF_PATTERN
from aiaas.services.audit import AuditService
from aiaas.services.keys import KeyService
from aiaas.services.metering import MeteredCall
from aiaas.services.predictions import PredictionService
from aiaas.services.registry import RegistryService
from aiaas.services.tenancy import TenancyService

ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"

_bearer = HTTPBearer(auto_error=False, description="An aiaas API key: `sk-aiaas-...`.")


async def get_platform(request: Request) -> Platform:
    platform: Platform = request.app.state.platform
    return platform


PlatformDep = Annotated[Platform, Depends(get_platform)]


async def get_keys(platform: PlatformDep) -> KeyService:
    return platform.keys


async def get_tenancy(platform: PlatformDep) -> TenancyService:
    return platform.tenancy


async def get_audit(platform: PlatformDep) -> AuditService:
    return platform.audit


KeysDep = Annotated[KeyService, Depends(get_keys)]
TenancyDep = Annotated[TenancyService, Depends(get_tenancy)]
AuditDep = Annotated[AuditService, Depends(get_audit)]


async def get_principal(
    request: Request,
    platform: PlatformDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    # Async, so a recently verified key costs no thread hop; a miss reads the database in a
    # worker thread.
    token = credentials.credentials if credentials else None
    principal = platform.keys.cached(token)
    if principal is None:
        try:
            principal = await asyncio.to_thread(platform.keys.authenticate, token)
        except AuthenticationFailed:
            platform.metrics.auth_failures.inc()
            raise
    request.state.org_id = principal.org_id or "platform"
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def require(scope: Scope) -> Callable[[Principal], Awaitable[Principal]]:
    async def check(principal: PrincipalDep) -> Principal:
        if not principal.has(scope):
            raise PermissionDenied(
                f"You have insufficient permissions for this operation. Missing scope: {scope}."
            )
        return principal

    return check


AdminDep = Annotated[Principal, Depends(require(Scope.ADMIN))]
PlatformAdminDep = Annotated[Principal, Depends(require(Scope.PLATFORM_ADMIN))]
ModelsReadDep = Annotated[Principal, Depends(require(Scope.MODELS_READ))]


@dataclass(frozen=True, slots=True)
class OrgContext:
    """The organisation an org-level request acts in, and who acts."""

    principal: Principal
    org_id: str
    project_id: str | None = None

    @property
    def actor(self) -> Actor:
        return Actor.of(self.principal)


def org_context(scope: Scope) -> Callable[..., Awaitable[OrgContext]]:
    """A dependency: the caller has `scope`, and the organisation it acts in.

    An org key acts in its own org (and its own project); the platform admin names an org with
    the `OpenAI-Organization` header and acts in that org's default project.
    """

    # Defaults, not annotations: these annotations would be resolved as strings, without `scope`.
    async def resolve(
        principal: Principal = Depends(require(scope)),
        tenancy: TenancyService = Depends(get_tenancy),
        openai_organization: str | None = Header(
            default=None,
            alias="OpenAI-Organization",
            pattern=ID_PATTERN,
            description="Platform admin only: the organisation to act in.",
        ),
    ) -> OrgContext:
        if principal.org_id is not None:
            if openai_organization and openai_organization != principal.org_id:
                # 404, like another org's object.
                await asyncio.to_thread(tenancy.get_org, principal, openai_organization)
            return OrgContext(
                principal=principal, org_id=principal.org_id, project_id=principal.project_id
            )
        if not openai_organization:
            raise InvalidRequest(
                "A platform admin key must name an organization in the OpenAI-Organization header.",
                param="OpenAI-Organization",
            )
        org = await asyncio.to_thread(tenancy.get_org, principal, openai_organization)
        project_id = await asyncio.to_thread(tenancy.default_project_id, org.id)
        return OrgContext(principal=principal, org_id=org.id, project_id=project_id)

    return resolve


OrgContextDep = Annotated[OrgContext, Depends(org_context(Scope.ADMIN))]
FilesReadDep = Annotated[OrgContext, Depends(org_context(Scope.FILES_READ))]
FilesWriteDep = Annotated[OrgContext, Depends(org_context(Scope.FILES_WRITE))]
TrainingDep = Annotated[OrgContext, Depends(org_context(Scope.TRAINING))]
ModelsReadCtxDep = Annotated[OrgContext, Depends(org_context(Scope.MODELS_READ))]
DeployDep = Annotated[OrgContext, Depends(org_context(Scope.DEPLOY))]
InferenceCtxDep = Annotated[OrgContext, Depends(org_context(Scope.INFERENCE))]


def metered(endpoint: str) -> Callable[..., Awaitable[MeteredCall]]:
    """A dependency for the inference routes: the caller has `inference`, is within its
    quota and rate limits, and its usage is recorded when the response ends."""

    async def begin(
        request: Request,
        principal: Principal = Depends(require(Scope.INFERENCE)),
        platform: Platform = Depends(get_platform),
    ) -> MeteredCall:
        call = await platform.metering.begin(principal, endpoint)
        request.state.metered = call  # the request middleware ends it after the response
        return call

    return begin


async def get_registry(platform: PlatformDep) -> RegistryService:
    return platform.registry


RegistryDep = Annotated[RegistryService, Depends(get_registry)]


async def get_predictions(platform: PlatformDep) -> PredictionService:
    return platform.predictions


PredictionsDep = Annotated[PredictionService, Depends(get_predictions)]

# A model id or deployment name in a path.
ModelPath = Annotated[str, Path(pattern=MODEL_REF_PATTERN, description="A model id.")]


After = Annotated[
    str | None,
    Query(pattern=ID_PATTERN, description="Cursor: the last id of the previous page."),
]
Limit = Annotated[int, Query(ge=1, le=100, description="Page size.")]


def path_id(description: str) -> Any:
    return Path(pattern=ID_PATTERN, description=description)
