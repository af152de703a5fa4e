"""Grants between organisations. Only this module writes `grants`."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Row, insert, or_, select, update

from aiaas.domain import PUBLIC, Grant, GrantPermission, Page, SharedKind
from aiaas.ids import now
from aiaas.storage.repos.paging import fetch_page
from aiaas.storage.tables import grants


def _grant(row: Row[Any]) -> Grant:
    return Grant(
        id=row.id,
        org_id=row.org_id,
        grantee_org_id=row.grantee_org_id,
        kind=SharedKind(row.kind),
        object_id=row.object_id,
        version=row.version,
        permission=GrantPermission(row.permission),
        max_requests_per_minute=row.max_requests_per_minute,
        monthly_tokens=row.monthly_tokens,
        created_by=row.created_by,
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
    )


def create(conn: Connection, grant: Grant) -> Grant:
    conn.execute(
        insert(grants).values(
            id=grant.id,
            org_id=grant.org_id,
            grantee_org_id=grant.grantee_org_id,
            kind=grant.kind.value,
            object_id=grant.object_id,
            version=grant.version,
            permission=grant.permission.value,
            max_requests_per_minute=grant.max_requests_per_minute,
            monthly_tokens=grant.monthly_tokens,
            created_by=grant.created_by,
            created_at=grant.created_at,
            expires_at=grant.expires_at,
            revoked_at=None,
        )
    )
    return grant


def get(conn: Connection, grant_id: str) -> Grant | None:
    row = conn.execute(select(grants).where(grants.c.id == grant_id)).first()
    return _grant(row) if row else None


def revoke(conn: Connection, grant_id: str) -> None:
    conn.execute(
        update(grants)
        .where(grants.c.id == grant_id, grants.c.revoked_at.is_(None))
        .values(revoked_at=now())
    )


def list_given(
    conn: Connection, *, org_id: str | None, after: str | None, limit: int
) -> Page[Grant]:
    """Grants an organisation made (every grant when `org_id` is None: the platform admin)."""
    where = [grants.c.org_id == org_id] if org_id is not None else []
    rows, more = fetch_page(conn, grants, where=where, after=after, limit=limit, newest_first=True)
    return Page(items=[_grant(r) for r in rows], has_more=more)


def list_received(conn: Connection, *, org_id: str, after: str | None, limit: int) -> Page[Grant]:
    """Grants made to an organisation by name (public grants are the catalogue's)."""
    rows, more = fetch_page(
        conn,
        grants,
        where=[grants.c.grantee_org_id == org_id],
        after=after,
        limit=limit,
        newest_first=True,
    )
    return Page(items=[_grant(r) for r in rows], has_more=more)


def for_object(
    conn: Connection, *, grantee_org_id: str, kind: SharedKind, object_id: str
) -> list[Grant]:
    """Unrevoked grants on one object that reach an organisation: its own and public ones."""
    rows = conn.execute(
        select(grants).where(
            grants.c.kind == kind.value,
            grants.c.object_id == object_id,
            or_(grants.c.grantee_org_id == grantee_org_id, grants.c.grantee_org_id == PUBLIC),
            grants.c.revoked_at.is_(None),
        )
    )
    return [_grant(r) for r in rows]


def reaching(conn: Connection, *, grantee_org_id: str, kind: SharedKind) -> list[Grant]:
    """Unrevoked grants of one kind that reach an organisation (its own and public ones)."""
    rows = conn.execute(
        select(grants)
        .where(
            grants.c.kind == kind.value,
            or_(grants.c.grantee_org_id == grantee_org_id, grants.c.grantee_org_id == PUBLIC),
            grants.c.revoked_at.is_(None),
        )
        .order_by(grants.c.seq)
    )
    return [_grant(r) for r in rows]


def public(conn: Connection, *, after: str | None, limit: int) -> Page[Grant]:
    rows, more = fetch_page(
        conn,
        grants,
        where=[grants.c.grantee_org_id == PUBLIC, grants.c.revoked_at.is_(None)],
        after=after,
        limit=limit,
        newest_first=True,
    )
    return Page(items=[_grant(r) for r in rows], has_more=more)


def on_object(conn: Connection, *, org_id: str, kind: SharedKind, object_id: str) -> list[Grant]:
    """Every unrevoked grant an owner made on one of its objects (to revoke with it)."""
    rows = conn.execute(
        select(grants).where(
            grants.c.org_id == org_id,
            grants.c.kind == kind.value,
            grants.c.object_id == object_id,
            grants.c.revoked_at.is_(None),
        )
    )
    return [_grant(r) for r in rows]


def mark_expiry_audited(conn: Connection, grant_id: str) -> bool:
    """Claim the one audit event of a grant's expiry: True for the first caller only."""
    result = conn.execute(
        update(grants)
        .where(grants.c.id == grant_id, grants.c.expiry_audited == 0)
        .values(expiry_audited=1)
    )
    return result.rowcount == 1


def expired_unaudited(conn: Connection, *, at: float) -> list[Grant]:
    rows = conn.execute(
        select(grants).where(
            grants.c.expires_at.is_not(None),
            grants.c.expires_at <= at,
            grants.c.revoked_at.is_(None),
            grants.c.expiry_audited == 0,
        )
    )
    return [_grant(r) for r in rows]
