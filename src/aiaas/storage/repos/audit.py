"""The append-only, hash-chained audit log. Only this module writes its tables.

Each event's hash is SHA-256 over the previous event's hash and the event's canonical JSON, so
changing, removing or reordering any stored event breaks every hash after it. Appends first
lock the single `audit_head` row (an UPDATE, which takes the row lock on PostgreSQL and the write
lock on SQLite), so concurrent writers get gapless sequence numbers and one linear chain.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Connection, Row, insert, select, update

from aiaas.domain import Actor, AuditEvent, Page
from aiaas.ids import new_id
from aiaas.storage.repos.paging import fetch_page
from aiaas.storage.tables import audit_events, audit_head

GENESIS_HASH = "0" * 64


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def event_hash(event: AuditEvent) -> str:
    body = canonical_json(
        {
            "seq": event.seq,
            "id": event.id,
            "org_id": event.org_id,
            "project_id": event.project_id,
            "actor_type": event.actor.type,
            "actor_id": event.actor.id,
            "action": event.action,
            "target_type": event.target_type,
            "target_id": event.target_id,
            "data": canonical_json(event.data),
            "created_at_us": event.created_at_us,
        }
    )
    return hashlib.sha256(f"{event.prev_hash}\n{body}".encode()).hexdigest()


def _event(row: Row[Any]) -> AuditEvent:
    return AuditEvent(
        seq=row.seq,
        id=row.id,
        org_id=row.org_id,
        project_id=row.project_id,
        actor=Actor(type=row.actor_type, id=row.actor_id),
        action=row.action,
        target_type=row.target_type,
        target_id=row.target_id,
        data=json.loads(row.data),
        created_at_us=row.created_at_us,
        prev_hash=row.prev_hash,
        hash=row.hash,
    )


def append(
    conn: Connection,
    *,
    org_id: str | None,
    project_id: str | None,
    actor: Actor,
    action: str,
    target_type: str,
    target_id: str | None,
    data: dict[str, Any],
) -> AuditEvent:
    conn.execute(update(audit_head).where(audit_head.c.id == 1).values(seq=audit_head.c.seq + 1))
    head = conn.execute(
        select(audit_head.c.seq, audit_head.c.hash).where(audit_head.c.id == 1)
    ).one()
    unhashed = AuditEvent(
        seq=head.seq,
        id=new_id("audit"),
        org_id=org_id,
        project_id=project_id,
        actor=actor,
        action=action,
        target_type=target_type,
        target_id=target_id,
        data=json.loads(canonical_json(data)),
        created_at_us=time.time_ns() // 1000,
        prev_hash=head.hash,
    )
    digest = event_hash(unhashed)
    conn.execute(
        insert(audit_events).values(
            seq=unhashed.seq,
            id=unhashed.id,
            org_id=org_id,
            project_id=project_id,
            actor_type=actor.type,
            actor_id=actor.id,
            action=action,
            target_type=target_type,
            target_id=target_id,
            data=canonical_json(unhashed.data),
            created_at_us=unhashed.created_at_us,
            prev_hash=unhashed.prev_hash,
            hash=digest,
        )
    )
    conn.execute(update(audit_head).where(audit_head.c.id == 1).values(hash=digest))
    return dataclasses.replace(unhashed, hash=digest)


def list_events(
    conn: Connection, *, org_id: str | None, after: str | None, limit: int
) -> Page[AuditEvent]:
    """Newest first; `org_id=None` lists every organisation's events (platform admin)."""
    where = [audit_events.c.org_id == org_id] if org_id is not None else []
    rows, more = fetch_page(
        conn, audit_events, where=where, after=after, limit=limit, newest_first=True
    )
    return Page(items=[_event(r) for r in rows], has_more=more)


def iter_chain(conn: Connection, *, batch: int = 1000) -> Iterator[AuditEvent]:
    """Every event in chain order, read in batches so a long log is never held whole."""
    last = 0
    while True:
        rows = list(
            conn.execute(
                select(audit_events)
                .where(audit_events.c.seq > last)
                .order_by(audit_events.c.seq)
                .limit(batch)
            )
        )
        if not rows:
            return
        for row in rows:
            yield _event(row)
        last = rows[-1].seq


def head(conn: Connection) -> tuple[int, str]:
    row = conn.execute(
        select(audit_head.c.seq, audit_head.c.hash).where(audit_head.c.id == 1)
    ).one()
    return row.seq, row.hash
