"""Organisations and projects: the tenants of the platform and their workspaces."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection

from aiaas.domain import (
    ORG_SCOPES,
    Actor,
    IssuedKey,
    Organization,
    Page,
    Principal,
    Project,
    Quotas,
    RateLimits,
)
from aiaas.errors import InvalidRequest, NotFound, PermissionDenied
from aiaas.services.audit import AuditService
from aiaas.services.keys import KeyService, KeySpec
from aiaas.storage.db import Database
from aiaas.storage.repos import tenancy as tenancy_repo

DEFAULT_PROJECT_NAME = "Default project"


@dataclass(frozen=True, slots=True)
class NewOrganization:
    org: Organization
    project: Project
    admin_key: IssuedKey


@dataclass(frozen=True, slots=True)
class OrgChanges:
    """What an update sets; None leaves a field as it is."""

    redact_pii: bool | None = None
    weight: float | None = None
    rate_limits: RateLimits | None = None
    quotas: Quotas | None = None

    @property
    def operator_only(self) -> bool:
        return self.weight is not None or self.rate_limits is not None or self.quotas is not None

    def audit_data(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        if self.redact_pii is not None:
            data["redact_pii"] = self.redact_pii
        if self.weight is not None:
            data["weight"] = self.weight
        if self.rate_limits is not None:
            data["rate_limits"] = self.rate_limits.to_dict()
        if self.quotas is not None:
            data["quotas"] = self.quotas.to_dict()
        return data


class TenancyService:
    def __init__(
        self, db: Database, *, keys: KeyService, audit: AuditService, region: str = "local"
    ) -> None:
        self._db = db
        self._keys = keys
        self._audit = audit
        self._region = region  # this node's: where new organisations are, unless told

    # -- organisations -------------------------------------------------------------------------

    def create_org(self, *, name: str, actor: Actor, region: str | None = None) -> NewOrganization:
        """An organisation, its default project and an org-admin key, all or nothing."""
        with self._db.write() as conn:
            org = tenancy_repo.create_org(conn, name=name, region=region or self._region)
            self._audit.record(
                conn,
                actor=actor,
                action="organization.created",
                target_type="organization",
                target_id=org.id,
                org_id=org.id,
                data={"name": name, "region": org.region},
            )
            project = self._create_project(
                conn, org_id=org.id, name=DEFAULT_PROJECT_NAME, is_default=True, actor=actor
            )
            key = self._keys.issue(
                conn,
                org_id=org.id,
                project_id=project.id,
                spec=KeySpec(name="org-admin", scopes=ORG_SCOPES),
                actor=actor,
            )
        return NewOrganization(org=org, project=project, admin_key=key)

    def list_orgs(
        self, principal: Principal, *, after: str | None, limit: int
    ) -> Page[Organization]:
        only = None if principal.is_platform_admin else principal.org_id
        with self._db.read() as conn:
            return tenancy_repo.list_orgs(conn, only_id=only, after=after, limit=limit)

    def get_org(self, principal: Principal, org_id: str) -> Organization:
        """The org, if the caller may see it; otherwise a 404 just like a missing one."""
        visible = principal.is_platform_admin or principal.org_id == org_id
        with self._db.read() as conn:
            org = tenancy_repo.get_org(conn, org_id) if visible else None
        if org is None:
            raise NotFound(f"No organization with id {org_id!r}.", param="org_id")
        return org

    def update_org(
        self, principal: Principal, org_id: str, changes: OrgChanges, *, actor: Actor
    ) -> Organization:
        """Change an organisation's settings. Its admin may set `redact_pii`; the operator
        alone sets its weight, rate limits and quotas (an org must not raise its own)."""
        self.get_org(principal, org_id)  # 404 unless the caller may see it
        if changes.operator_only and not principal.is_platform_admin:
            raise PermissionDenied(
                "Only the platform operator sets an organization's weight, rate limits and quotas."
            )
        with self._db.write() as conn:
            if changes.redact_pii is not None:
                tenancy_repo.set_org_redact_pii(conn, org_id=org_id, redact_pii=changes.redact_pii)
            tenancy_repo.set_org_controls(
                conn,
                org_id=org_id,
                weight=changes.weight,
                rate_limits=changes.rate_limits,
                quotas=changes.quotas,
            )
            self._audit.record(
                conn,
                actor=actor,
                action="organization.updated",
                target_type="organization",
                target_id=org_id,
                org_id=org_id,
                data=changes.audit_data(),
            )
            org = tenancy_repo.get_org(conn, org_id)
        # Cached principals carry the weight and limits: drop them so the change holds at once
        # here (other replicas: within their auth cache's lifetime).
        self._keys.forget()
        assert org is not None
        return org

    def default_project_id(self, org_id: str) -> str:
        with self._db.read() as conn:
            project = tenancy_repo.default_project(conn, org_id=org_id)
        if project is None:  # every organisation is created with one
            raise NotFound(f"No default project in organization {org_id!r}.")
        return project.id

    # -- projects ------------------------------------------------------------------------------

    def _create_project(
        self, conn: Connection, *, org_id: str, name: str, is_default: bool, actor: Actor
    ) -> Project:
        project = tenancy_repo.create_project(conn, org_id=org_id, name=name, is_default=is_default)
        self._audit.record(
            conn,
            actor=actor,
            action="project.created",
            target_type="project",
            target_id=project.id,
            org_id=org_id,
            project_id=project.id,
            data={"name": name},
        )
        return project

    def create_project(self, *, org_id: str, name: str, actor: Actor) -> Project:
        with self._db.write() as conn:
            return self._create_project(
                conn, org_id=org_id, name=name, is_default=False, actor=actor
            )

    def list_projects(
        self, *, org_id: str, include_archived: bool, after: str | None, limit: int
    ) -> Page[Project]:
        with self._db.read() as conn:
            return tenancy_repo.list_projects(
                conn, org_id=org_id, include_archived=include_archived, after=after, limit=limit
            )

    def get_project(self, *, org_id: str, project_id: str) -> Project:
        with self._db.read() as conn:
            project = tenancy_repo.get_project(conn, org_id=org_id, project_id=project_id)
        if project is None:
            raise NotFound(f"No project with id {project_id!r}.", param="project_id")
        return project

    def update_project(
        self,
        *,
        org_id: str,
        project_id: str,
        name: str | None,
        rate_limits: RateLimits | None,
        actor: Actor,
    ) -> Project:
        with self._db.write() as conn:
            project = tenancy_repo.get_project(conn, org_id=org_id, project_id=project_id)
            if project is None:
                raise NotFound(f"No project with id {project_id!r}.", param="project_id")
            data: dict[str, Any] = {}
            if name is not None and name != project.name:
                tenancy_repo.rename_project(conn, org_id=org_id, project_id=project_id, name=name)
                data.update(name=name, previous_name=project.name)
            if rate_limits is not None:
                tenancy_repo.set_project_rate_limits(
                    conn, org_id=org_id, project_id=project_id, rate_limits=rate_limits
                )
                data["rate_limits"] = rate_limits.to_dict()
            if data:
                self._audit.record(
                    conn,
                    actor=actor,
                    action="project.updated",
                    target_type="project",
                    target_id=project_id,
                    org_id=org_id,
                    project_id=project_id,
                    data=data,
                )
            updated = tenancy_repo.get_project(conn, org_id=org_id, project_id=project_id)
        if rate_limits is not None:
            self._keys.forget()
        assert updated is not None
        return updated

    def archive_project(self, *, org_id: str, project_id: str, actor: Actor) -> Project:
        """Archive a project; its keys stop working at once. The default project stays."""
        with self._db.write() as conn:
            project = tenancy_repo.get_project(conn, org_id=org_id, project_id=project_id)
            if project is None:
                raise NotFound(f"No project with id {project_id!r}.", param="project_id")
            if project.is_default:
                raise InvalidRequest("The default project cannot be archived.", param="project_id")
            if project.archived_at is None:
                tenancy_repo.archive_project(conn, org_id=org_id, project_id=project_id)
                self._audit.record(
                    conn,
                    actor=actor,
                    action="project.archived",
                    target_type="project",
                    target_id=project_id,
                    org_id=org_id,
                    project_id=project_id,
                )
            archived = tenancy_repo.get_project(conn, org_id=org_id, project_id=project_id)
        self._keys.forget()
        assert archived is not None
        return archived
