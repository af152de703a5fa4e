"""API keys: stored with an HMAC of the secret, never the secret. Only this module writes them."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Connection, Row, and_, func, insert, or_, select, update

from aiaas.domain import ApiKey, Page, RateLimits, Scope
from aiaas.ids import now
from aiaas.storage.repos.paging import fetch_page
from aiaas.storage.tables import api_keys


def _key(row: Row[Any]) -> ApiKey:
    return ApiKey(
        id=row.id,
        org_id=row.org_id,
        project_id=row.project_id,
        name=row.name,
        hint=row.hint,
        scopes=frozenset(Scope(s) for s in row.scopes.split()),
        created_by=row.created_by,
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
        last_used_at=row.last_used_at,
        rate_limits=RateLimits.from_dict(json.loads(row.rate_limits) if row.rate_limits else None),
    )


def insert_key(conn: Connection, *, key: ApiKey, secret_hmac: str) -> None:
    conn.execute(
        insert(api_keys).values(
            id=key.id,
            org_id=key.org_id,
            project_id=key.project_id,
            name=key.name,
            secret_hmac=secret_hmac,
            hint=key.hint,
            scopes=" ".join(sorted(key.scopes)),
            created_by=key.created_by,
            created_at=key.created_at,
            expires_at=key.expires_at,
            rate_limits=None
            if key.rate_limits.empty
            else json.dumps(key.rate_limits.to_dict(), sort_keys=True),
        )
    )


def get_for_auth(conn: Connection, key_id: str) -> tuple[ApiKey, str] | None:
    """The key and its stored HMAC, for the authenticator only."""
    row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).first()
    return (_key(row), row.secret_hmac) if row else None


def get_key(conn: Connection, *, org_id: str, key_id: str) -> ApiKey | None:
    row = conn.execute(
        select(api_keys).where(api_keys.c.id == key_id, api_keys.c.org_id == org_id)
    ).first()
    return _key(row) if row else None


def list_keys(
    conn: Connection,
    *,
    org_id: str,
    project_id: str | None,
    include_revoked: bool,
    after: str | None,
    limit: int,
) -> Page[ApiKey]:
    where = [api_keys.c.org_id == org_id]
    if project_id is not None:
        where.append(api_keys.c.project_id == project_id)
    if not include_revoked:
        where.append(api_keys.c.revoked_at.is_(None))
    rows, more = fetch_page(conn, api_keys, where=where, after=after, limit=limit)
    return Page(items=[_key(r) for r in rows], has_more=more)


def revoke_key(conn: Connection, *, key_id: str) -> float:
    revoked_at = now()
    conn.execute(
        update(api_keys)
        .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
        .values(revoked_at=revoked_at)
    )
    return revoked_at


def revoke_project_keys(conn: Connection, *, project_id: str) -> int:
    result = conn.execute(
        update(api_keys)
        .where(api_keys.c.project_id == project_id, api_keys.c.revoked_at.is_(None))
        .values(revoked_at=now())
    )
    return result.rowcount


def touch_last_used(conn: Connection, *, key_id: str, at: float, older_than: float) -> None:
    """Record use, but write at most once per interval per key to spare the database."""
    conn.execute(
        update(api_keys)
        .where(
            api_keys.c.id == key_id,
            or_(api_keys.c.last_used_at.is_(None), api_keys.c.last_used_at < older_than),
        )
        .values(last_used_at=at)
    )


def count_live_platform_keys(conn: Connection) -> int:
    return conn.execute(
        select(func.count())
        .select_from(api_keys)
        .where(
            and_(
                api_keys.c.org_id.is_(None),
                api_keys.c.revoked_at.is_(None),
                api_keys.c.scopes.contains(Scope.PLATFORM_ADMIN.value),
            )
        )
    ).scalar_one()
