"""Deployments. Only this module writes `deployments`."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Row, delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from aiaas.domain import Deployment, Page, Target
from aiaas.errors import Conflict
from aiaas.ids import now
from aiaas.storage.repos.paging import fetch_page
from aiaas.storage.tables import deployments


def _deployment(row: Row[Any]) -> Deployment:
    canary = None
    if row.canary_version is not None or row.canary_alias is not None:
        canary = Target(version=row.canary_version, alias=row.canary_alias)
    return Deployment(
        id=row.id,
        org_id=row.org_id,
        project_id=row.project_id,
        name=row.name,
        model_id=row.model_id,
        target=Target(version=row.version, alias=row.alias),
        canary=canary,
        canary_percent=row.canary_percent,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def create(
    conn: Connection,
    *,
    deployment_id: str,
    org_id: str,
    project_id: str,
    name: str,
    model_id: str,
    target: Target,
    canary: Target | None,
    canary_percent: float,
    created_by: str | None,
) -> Deployment:
    stamp = now()
    try:
        with conn.begin_nested():
            conn.execute(
                insert(deployments).values(
                    id=deployment_id,
                    org_id=org_id,
                    project_id=project_id,
                    name=name,
                    model_id=model_id,
                    version=target.version,
                    alias=target.alias,
                    canary_version=canary.version if canary else None,
                    canary_alias=canary.alias if canary else None,
                    canary_percent=canary_percent,
                    created_by=created_by,
                    created_at=stamp,
                    updated_at=stamp,
                )
            )
    except IntegrityError as exc:
        raise Conflict(f"A deployment named {name!r} already exists.", param="name") from exc
    found = get(conn, org_id=org_id, deployment_id=deployment_id)
    assert found is not None
    return found


def update_targets(
    conn: Connection,
    *,
    deployment_id: str,
    target: Target,
    canary: Target | None,
    canary_percent: float,
) -> None:
    conn.execute(
        update(deployments)
        .where(deployments.c.id == deployment_id)
        .values(
            version=target.version,
            alias=target.alias,
            canary_version=canary.version if canary else None,
            canary_alias=canary.alias if canary else None,
            canary_percent=canary_percent,
            updated_at=now(),
        )
    )


def get(conn: Connection, *, org_id: str, deployment_id: str) -> Deployment | None:
    row = conn.execute(
        select(deployments).where(deployments.c.id == deployment_id, deployments.c.org_id == org_id)
    ).first()
    return _deployment(row) if row else None


def by_name(conn: Connection, *, org_id: str, name: str) -> Deployment | None:
    row = conn.execute(
        select(deployments).where(deployments.c.name == name, deployments.c.org_id == org_id)
    ).first()
    return _deployment(row) if row else None


def list_deployments(
    conn: Connection, *, org_id: str, after: str | None = None, limit: int = 1000
) -> Page[Deployment]:
    rows, more = fetch_page(
        conn, deployments, where=[deployments.c.org_id == org_id], after=after, limit=limit
    )
    return Page(items=[_deployment(r) for r in rows], has_more=more)


def remove(conn: Connection, *, deployment_id: str) -> None:
    conn.execute(delete(deployments).where(deployments.c.id == deployment_id))


def count_serving(conn: Connection, *, model_id: str, alias: str | None = None) -> int:
    """Deployments of a model (that use `alias`, when given)."""
    where = [deployments.c.model_id == model_id]
    if alias is not None:
        where.append(or_(deployments.c.alias == alias, deployments.c.canary_alias == alias))
    return conn.execute(select(func.count()).select_from(deployments).where(*where)).scalar_one()
