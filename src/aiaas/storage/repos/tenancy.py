"""Organisations and projects. Only this module writes their tables."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Connection, Insert, Row, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from aiaas.domain import Organization, Page, Project, ProjectStatus, Quotas, RateLimits
from aiaas.errors import Conflict
from aiaas.ids import new_id, now
from aiaas.storage.repos.paging import fetch_page
from aiaas.storage.tables import organizations, projects


def _org(row: Row[Any]) -> Organization:
    return Organization(
        id=row.id,
        name=row.name,
        weight=row.weight,
        created_at=row.created_at,
        redact_pii=bool(row.redact_pii),
        rate_limits=RateLimits.from_dict(_json(row.rate_limits)),
        quotas=Quotas.from_dict(_json(row.quotas)),
        region=row.region,
    )


def _json(text: str | None) -> dict[str, Any] | None:
    return json.loads(text) if text else None


def _dumps(value: RateLimits | Quotas) -> str | None:
    return None if value.empty else json.dumps(value.to_dict(), sort_keys=True)


def _project(row: Row[Any]) -> Project:
    return Project(
        id=row.id,
        org_id=row.org_id,
        name=row.name,
        is_default=bool(row.is_default),
        status=ProjectStatus(row.status),
        created_at=row.created_at,
        archived_at=row.archived_at,
        rate_limits=RateLimits.from_dict(_json(row.rate_limits)),
    )


def _insert_named(conn: Connection, statement: Insert, *, what: str, name: str) -> None:
    """Insert a row whose name is unique in its scope; a clash (even a concurrent one) is 409.

    The savepoint keeps the caller's transaction usable after the constraint fires.
    """
    try:
        with conn.begin_nested():
            conn.execute(statement)
    except IntegrityError as exc:
        raise Conflict(f"{what} named {name!r} already exists", param="name") from exc


def create_org(
    conn: Connection, *, name: str, weight: float = 1.0, region: str = "local"
) -> Organization:
    org = Organization(id=new_id("org"), name=name, weight=weight, created_at=now(), region=region)
    _insert_named(
        conn,
        insert(organizations).values(
            id=org.id,
            name=org.name,
            weight=org.weight,
            created_at=org.created_at,
            redact_pii=0,
            region=org.region,
        ),
        what="an organization",
        name=name,
    )
    return org


def get_org(conn: Connection, org_id: str) -> Organization | None:
    row = conn.execute(select(organizations).where(organizations.c.id == org_id)).first()
    return _org(row) if row else None


def org_by_name(conn: Connection, name: str) -> Organization | None:
    row = conn.execute(select(organizations).where(organizations.c.name == name)).first()
    return _org(row) if row else None


def list_orgs(
    conn: Connection, *, only_id: str | None, after: str | None, limit: int
) -> Page[Organization]:
    where = [organizations.c.id == only_id] if only_id is not None else []
    rows, more = fetch_page(conn, organizations, where=where, after=after, limit=limit)
    return Page(items=[_org(r) for r in rows], has_more=more)


def create_project(
    conn: Connection, *, org_id: str, name: str, is_default: bool = False
) -> Project:
    project = Project(
        id=new_id("proj"),
        org_id=org_id,
        name=name,
        is_default=is_default,
        status=ProjectStatus.ACTIVE,
        created_at=now(),
        archived_at=None,
    )
    _insert_named(
        conn,
        insert(projects).values(
            id=project.id,
            org_id=org_id,
            name=name,
            is_default=int(is_default),
            status=project.status.value,
            created_at=project.created_at,
        ),
        what="a project",
        name=name,
    )
    return project


def get_project(conn: Connection, *, org_id: str, project_id: str) -> Project | None:
    row = conn.execute(
        select(projects).where(projects.c.id == project_id, projects.c.org_id == org_id)
    ).first()
    return _project(row) if row else None


def default_project(conn: Connection, *, org_id: str) -> Project | None:
    row = conn.execute(
        select(projects).where(projects.c.org_id == org_id, projects.c.is_default == 1)
    ).first()
    return _project(row) if row else None


def list_projects(
    conn: Connection, *, org_id: str, include_archived: bool, after: str | None, limit: int
) -> Page[Project]:
    where = [projects.c.org_id == org_id]
    if not include_archived:
        where.append(projects.c.status == ProjectStatus.ACTIVE.value)
    rows, more = fetch_page(conn, projects, where=where, after=after, limit=limit)
    return Page(items=[_project(r) for r in rows], has_more=more)


def rename_project(conn: Connection, *, org_id: str, project_id: str, name: str) -> None:
    clash = conn.execute(
        select(func.count())
        .select_from(projects)
        .where(projects.c.org_id == org_id, projects.c.name == name, projects.c.id != project_id)
    ).scalar_one()
    if clash:
        raise Conflict(f"a project named {name!r} already exists", param="name")
    conn.execute(
        update(projects)
        .where(projects.c.id == project_id, projects.c.org_id == org_id)
        .values(name=name)
    )


def archive_project(conn: Connection, *, org_id: str, project_id: str) -> None:
    conn.execute(
        update(projects)
        .where(projects.c.id == project_id, projects.c.org_id == org_id)
        .values(status=ProjectStatus.ARCHIVED.value, archived_at=now())
    )


def set_org_redact_pii(conn: Connection, *, org_id: str, redact_pii: bool) -> None:
    conn.execute(
        update(organizations).where(organizations.c.id == org_id).values(redact_pii=int(redact_pii))
    )


def set_org_controls(
    conn: Connection,
    *,
    org_id: str,
    weight: float | None = None,
    rate_limits: RateLimits | None = None,
    quotas: Quotas | None = None,
) -> None:
    """Set what the operator controls of an organisation; None leaves a field as it is."""
    values: dict[str, Any] = {}
    if weight is not None:
        values["weight"] = weight
    if rate_limits is not None:
        values["rate_limits"] = _dumps(rate_limits)
    if quotas is not None:
        values["quotas"] = _dumps(quotas)
    if values:
        conn.execute(update(organizations).where(organizations.c.id == org_id).values(**values))


def set_project_rate_limits(
    conn: Connection, *, org_id: str, project_id: str, rate_limits: RateLimits
) -> None:
    conn.execute(
        update(projects)
        .where(projects.c.id == project_id, projects.c.org_id == org_id)
        .values(rate_limits=_dumps(rate_limits))
    )
