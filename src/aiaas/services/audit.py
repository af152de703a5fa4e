"""The audit log use cases: record an event inside the caller's transaction, list, verify."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection

from aiaas.domain import Actor, AuditEvent, Page, Principal
from aiaas.storage.db import Database
from aiaas.storage.repos import audit as audit_repo


@dataclass(frozen=True, slots=True)
class ChainReport:
    ok: bool
    events: int
    broken_at_seq: int | None = None
    reason: str | None = None


class AuditService:
    def __init__(self, db: Database) -> None:
        self._db = db

    def record(
        self,
        conn: Connection,
        *,
        actor: Actor,
        action: str,
        target_type: str,
        target_id: str | None,
        org_id: str | None = None,
        project_id: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> AuditEvent:
        """Append in the caller's transaction: the event exists exactly when the change does."""
        return audit_repo.append(
            conn,
            org_id=org_id,
            project_id=project_id,
            actor=actor,
            action=action,
            target_type=target_type,
            target_id=target_id,
            data=data or {},
        )

    def list(
        self, principal: Principal, *, org_id: str | None, after: str | None, limit: int
    ) -> Page[AuditEvent]:
        """An org admin sees its own org's events; the platform admin may see all or one org's."""
        scope_org = org_id if principal.is_platform_admin else principal.org_id
        with self._db.read() as conn:
            return audit_repo.list_events(conn, org_id=scope_org, after=after, limit=limit)

    def verify(self) -> ChainReport:
        """Recompute every hash and link; report the first event where the chain breaks."""
        expected_prev = audit_repo.GENESIS_HASH
        expected_seq = 1
        count = 0
        with self._db.read() as conn:
            for event in audit_repo.iter_chain(conn):
                problem = _check_event(event, expected_seq=expected_seq, prev=expected_prev)
                if problem is not None:
                    return ChainReport(False, count, broken_at_seq=event.seq, reason=problem)
                expected_prev, expected_seq, count = event.hash, event.seq + 1, count + 1
            head_seq, head_hash = audit_repo.head(conn)
        if head_seq != count or head_hash != expected_prev:
            return ChainReport(
                False,
                count,
                broken_at_seq=count + 1,
                reason=f"chain head says {head_seq} events, the log holds {count}: "
                "events were removed from the end",
            )
        return ChainReport(True, count)


def _check_event(event: AuditEvent, *, expected_seq: int, prev: str) -> str | None:
    if event.seq != expected_seq:
        return f"expected event {expected_seq}, found {event.seq}: events are missing"
    if event.prev_hash != prev:
        return "prev_hash does not match the previous event's hash"
    if audit_repo.event_hash(event) != event.hash:
        return "the event's content does not match its hash: it was modified"
    return None
