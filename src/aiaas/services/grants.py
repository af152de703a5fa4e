"""Grants: one organisation shares a model, dataset or deployment with another, or with all.

A grant names an object of the owner's (a registered model or a dataset, all versions or one;
or a deployment), a grantee (an organisation, or `*`: the public catalogue) and a permission
(`use` < `train-on` < `read`, each implying the ones before it). It may expire and can be
revoked; a revoked grant keeps its row, so the audit log and the owner's usage still name it.

Every other service asks `access(...)` before it lets a caller reach an object of another
organisation; nothing else knows that grants exist. Answers are cached per process for
`cache_s` seconds (the auth cache's lifetime): a revoke made through this process takes effect
at once, one made through another replica within `cache_s`, like a revoked key.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Connection

from aiaas.domain import (
    PUBLIC,
    Actor,
    Dataset,
    Grant,
    GrantPermission,
    Organization,
    Page,
    Principal,
    SharedKind,
)
from aiaas.errors import InvalidRequest, NotFound, ResidencyViolation
from aiaas.ids import new_id, now
from aiaas.services.audit import AuditService
from aiaas.storage.db import Database
from aiaas.storage.repos import datasets as datasets_repo
from aiaas.storage.repos import deployments as deployments_repo
from aiaas.storage.repos import grants as repo
from aiaas.storage.repos import registry as registry_repo
from aiaas.storage.repos import tenancy as tenancy_repo

# What each kind of object can be granted for.
PERMISSIONS: dict[SharedKind, frozenset[GrantPermission]] = {
    SharedKind.MODEL: frozenset(GrantPermission),
    SharedKind.DATASET: frozenset(GrantPermission),
    SharedKind.DEPLOYMENT: frozenset({GrantPermission.USE}),
}
_PUBLIC_KINDS = frozenset({SharedKind.MODEL, SharedKind.DATASET})
_CACHE_LIMIT = 10_000


@dataclass(frozen=True, slots=True)
class NewGrant:
    grantee: str  # an organisation id or name, or "*"
    kind: SharedKind
    object_id: str
    permission: GrantPermission
    version: int | None = None
    max_requests_per_minute: int | None = None
    monthly_tokens: int | None = None
    expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class CatalogItem:
    grant: Grant
    owner_name: str
    region: str  # a dataset's own region; a model's owner's


@dataclass(frozen=True, slots=True)
class _Cached:
    grants: list[Grant]
    valid_until: float  # time.monotonic()


class GrantService:
    def __init__(self, db: Database, audit: AuditService, *, cache_s: float = 0.0) -> None:
        self._db = db
        self._audit = audit
        self._cache_s = cache_s
        self._cache: dict[tuple[str, SharedKind, str], _Cached] = {}
        self._revoke_listeners: list[Callable[[Grant], None]] = []

    # -- the owner's side -------------------------------------------------------------------

    def create(self, *, org_id: str, new: NewGrant, actor: Actor) -> Grant:
        if new.permission not in PERMISSIONS[new.kind]:
            allowed = ", ".join(sorted(p.value for p in PERMISSIONS[new.kind]))
            raise InvalidRequest(
                f"A {new.kind.value} can be granted for: {allowed}.", param="permission"
            )
        if new.expires_at is not None and new.expires_at <= now():
            raise InvalidRequest("expires_at is in the past.", param="expires_at")
        self._check_residency(org_id, new, actor)
        with self._db.write() as conn:
            grantee = self._grantee(conn, org_id, new)
            self._check_object(conn, org_id, new)
            grant = repo.create(
                conn,
                Grant(
                    id=new_id("grant"),
                    org_id=org_id,
                    grantee_org_id=grantee,
                    kind=new.kind,
                    object_id=new.object_id,
                    version=new.version,
                    permission=new.permission,
                    max_requests_per_minute=new.max_requests_per_minute,
                    monthly_tokens=new.monthly_tokens,
                    created_by=actor.id,
                    created_at=now(),
                    expires_at=new.expires_at,
                    revoked_at=None,
                ),
            )
            self._record(conn, actor, grant, "grant.created")
        self.forget()
        return grant

    def _grantee(self, conn: Connection, org_id: str, new: NewGrant) -> str:
        if new.grantee == PUBLIC:
            if new.kind not in _PUBLIC_KINDS:
                raise InvalidRequest(
                    "Only models and datasets can be granted to everyone ('*').",
                    param="grantee",
                )
            return PUBLIC
        org = tenancy_repo.get_org(conn, new.grantee) or tenancy_repo.org_by_name(conn, new.grantee)
        if org is None:
            raise InvalidRequest(f"No organization {new.grantee!r}.", param="grantee")
        if org.id == org_id:
            raise InvalidRequest("An organization cannot grant to itself.", param="grantee")
        return org.id

    def _check_object(self, conn: Connection, org_id: str, new: NewGrant) -> None:
        """The object (and version) must be the owner's; anything else is a 404."""
        missing = NotFound(f"No {new.kind.value} with id {new.object_id!r}.", param="object_id")
        if new.kind is SharedKind.DEPLOYMENT:
            if new.version is not None:
                raise InvalidRequest("A deployment grant has no version.", param="version")
            if deployments_repo.get(conn, org_id=org_id, deployment_id=new.object_id) is None:
                raise missing
            return
        if new.kind is SharedKind.MODEL:
            if registry_repo.get_model(conn, org_id=org_id, model_id=new.object_id) is None:
                raise missing
            found = new.version is None or registry_repo.get_version(
                conn, org_id=org_id, model_id=new.object_id, version=new.version
            )
        else:
            if datasets_repo.get_dataset(conn, org_id=org_id, dataset_id=new.object_id) is None:
                raise missing
            found = new.version is None or datasets_repo.get_version(
                conn, org_id=org_id, dataset_id=new.object_id, version=new.version
            )
        if not found:
            raise NotFound(
                f"{new.kind.value.capitalize()} {new.object_id!r} has no version {new.version}.",
                param="version",
            )

    def _check_residency(self, org_id: str, new: NewGrant, actor: Actor) -> None:
        """A strict dataset is never readable from another region (nor by everyone)."""
        if new.kind is not SharedKind.DATASET or new.permission is not GrantPermission.READ:
            return
        with self._db.read() as conn:
            dataset = datasets_repo.get_dataset(conn, org_id=org_id, dataset_id=new.object_id)
            grantee = None
            if new.grantee != PUBLIC:
                grantee = tenancy_repo.get_org(conn, new.grantee) or tenancy_repo.org_by_name(
                    conn, new.grantee
                )
        if dataset is None or not dataset.strict:
            return  # a missing object or grantee is the create's own 404 / 400
        if new.grantee == PUBLIC:
            raise self.residency_refused(
                dataset,
                actor=actor,
                by_org_id=org_id,
                elsewhere="every region",
                what="granted read to everyone",
            )
        if grantee is not None and grantee.region != dataset.region:
            raise self.residency_refused(
                dataset,
                actor=actor,
                by_org_id=org_id,
                elsewhere=f"region '{grantee.region}' (organization {grantee.id})",
                what="granted read",
                grantee_org_id=grantee.id,
            )

    def residency_refused(
        self,
        dataset: Dataset,
        *,
        actor: Actor,
        by_org_id: str,
        elsewhere: str,
        what: str,
        grantee_org_id: str | None = None,
    ) -> ResidencyViolation:
        """Record a residency refusal in the audit log (its own transaction: the refused
        change never happens) and return the 403 to raise."""
        with self._db.write() as conn:
            self._audit.record(
                conn,
                actor=actor,
                action="residency.refused",
                target_type="dataset",
                target_id=dataset.id,
                org_id=dataset.org_id,
                data={
                    "by_org_id": by_org_id,
                    "grantee_org_id": grantee_org_id,
                    "dataset_region": dataset.region,
                    "elsewhere": elsewhere,
                    "what": what,
                },
            )
        return ResidencyViolation(
            f"Dataset {dataset.id} is held in region '{dataset.region}' with strict residency: "
            f"it cannot be {what} in {elsewhere}.",
            param="object_id" if what.startswith("granted") else "training_file",
        )

    def revoke(self, principal: Principal, *, grant_id: str, actor: Actor) -> Grant:
        """The grantor (an admin of the owner) or a platform admin revokes; others get 404."""
        with self._db.write() as conn:
            grant = repo.get(conn, grant_id)
            if grant is None or not (
                principal.is_platform_admin or principal.org_id == grant.org_id
            ):
                raise _no_grant(grant_id)
            if grant.revoked_at is None:
                repo.revoke(conn, grant_id)
                grant = repo.get(conn, grant_id)
                assert grant is not None
                self._record(conn, actor, grant, "grant.revoked")
        self.forget()
        self._revoked([grant])
        return grant

    def on_revoke(self, listener: Callable[[Grant], None]) -> None:
        """Call `listener` with each grant this process revokes, once its revoke is committed
        (work queued through it, not yet started, is withdrawn)."""
        self._revoke_listeners.append(listener)

    def _revoked(self, grants: list[Grant]) -> None:
        for grant in grants:
            for listener in self._revoke_listeners:
                listener(grant)

    def revoke_all_on(
        self, conn: Connection, *, org_id: str, kind: SharedKind, object_id: str, actor: Actor
    ) -> None:
        """An object is deleted: its grants end with it (in the caller's transaction)."""
        ended = repo.on_object(conn, org_id=org_id, kind=kind, object_id=object_id)
        for grant in ended:
            repo.revoke(conn, grant.id)
            self._record(conn, actor, grant, "grant.revoked", reason="object deleted")
        self.forget()
        self._revoked(ended)

    # -- reading ----------------------------------------------------------------------------

    def get(self, principal: Principal, grant_id: str) -> Grant:
        """The grantor, the grantee and the platform admin see a grant; others get 404."""
        with self._db.read() as conn:
            grant = repo.get(conn, grant_id)
        if grant is None or not (
            principal.is_platform_admin or principal.org_id in (grant.org_id, grant.grantee_org_id)
        ):
            raise _no_grant(grant_id)
        self._audit_expiry([grant])
        return grant

    def list(
        self, principal: Principal, *, org_id: str, direction: str, after: str | None, limit: int
    ) -> Page[Grant]:
        with self._db.read() as conn:
            if direction == "received":
                page = repo.list_received(conn, org_id=org_id, after=after, limit=limit)
            else:
                page = repo.list_given(conn, org_id=org_id, after=after, limit=limit)
        self._audit_expiry(page.items)
        return page

    def catalog(self, *, after: str | None, limit: int) -> Page[CatalogItem]:
        """Public grants that are still active: what every organisation may browse and use."""
        at = now()
        items: list[CatalogItem] = []
        with self._db.read() as conn:
            page = repo.public(conn, after=after, limit=limit)
            owners: dict[str, Organization | None] = {}
            for grant in page.items:
                if not grant.active(at):
                    continue
                if grant.org_id not in owners:
                    owners[grant.org_id] = tenancy_repo.get_org(conn, grant.org_id)
                owner = owners[grant.org_id]
                region = owner.region if owner else "local"
                if grant.kind is SharedKind.DATASET:
                    dataset = datasets_repo.get_dataset(
                        conn, org_id=grant.org_id, dataset_id=grant.object_id
                    )
                    region = dataset.region if dataset else region
                items.append(CatalogItem(grant, owner.name if owner else grant.org_id, region))
        return Page(items=items, has_more=page.has_more)

    def owner(self, org_id: str) -> Organization | None:
        with self._db.read() as conn:
            return tenancy_repo.get_org(conn, org_id)

    def org_named(self, name: str) -> Organization | None:
        with self._db.read() as conn:
            return tenancy_repo.org_by_name(conn, name)

    # -- the grantee's side: what other services ask ------------------------------------------

    def access(
        self,
        *,
        org_id: str,
        kind: SharedKind,
        object_id: str,
        needed: GrantPermission,
        version: int | None = None,
    ) -> Grant | None:
        """The active grant that lets `org_id` do `needed` with the object (and version), the
        most permissive first; None when there is none (the caller answers 404)."""
        at = now()
        usable = [
            g
            for g in self._grants(org_id, kind, object_id)
            if g.active(at) and g.covers(version) and g.permission.allows(needed)
        ]
        if not usable:
            return None
        # A grant to the org itself wins over a public one (its caps and usage are the org's),
        # then the most permissive, then the newest.
        usable.sort(key=lambda g: (g.public, -g.permission.rank, -g.created_at))
        return usable[0]

    def reading(
        self, *, org_id: str, kind: SharedKind, object_id: str, version: int | None
    ) -> tuple[str, list[Grant]] | None:
        """The owner of another organisation's object `org_id` may read, and the `read` grants
        that let it: the one for `version`, or (`version` None: the object as a whole) every
        grant on any of its versions; None when none does."""
        grant = self.access(
            org_id=org_id,
            kind=kind,
            object_id=object_id,
            needed=GrantPermission.READ,
            version=version,
        )
        if grant is not None:
            grants = [grant]
        elif version is None:
            grants = [
                g
                for g in self.reaching(org_id=org_id, kind=kind, needed=GrantPermission.READ)
                if g.object_id == object_id
            ]
        else:
            grants = []
        if not grants or grants[0].org_id == org_id:
            return None
        return grants[0].org_id, grants

    def reaching(self, *, org_id: str, kind: SharedKind, needed: GrantPermission) -> list[Grant]:
        """Every active grant of `kind` that lets `org_id` do `needed`: for listings."""
        at = now()
        with self._db.read() as conn:
            found = repo.reaching(conn, grantee_org_id=org_id, kind=kind)
        return [g for g in found if g.active(at) and g.permission.allows(needed)]

    def _grants(self, org_id: str, kind: SharedKind, object_id: str) -> list[Grant]:
        key = (org_id, kind, object_id)
        cached = self._cache.get(key)
        if cached is not None and time.monotonic() < cached.valid_until:
            return cached.grants
        with self._db.read() as conn:
            found = repo.for_object(conn, grantee_org_id=org_id, kind=kind, object_id=object_id)
        self._audit_expiry(found)
        if self._cache_s > 0:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = _Cached(found, time.monotonic() + self._cache_s)
        return found

    def forget(self) -> None:
        self._cache.clear()

    # -- audit ------------------------------------------------------------------------------

    def _audit_expiry(self, grants: list[Grant]) -> None:
        """The first time a grant is seen expired, the audit log says so (once)."""
        at = now()
        expired = [g for g in grants if g.status(at) == "expired"]
        if not expired:
            return
        with self._db.write() as conn:
            for grant in expired:
                if repo.mark_expiry_audited(conn, grant.id):
                    self._record(conn, Actor(type="system"), grant, "grant.expired")

    def sweep_expired(self) -> int:
        """Record every expiry not yet in the audit log (run at start and by the job runner)."""
        with self._db.read() as conn:
            expired = repo.expired_unaudited(conn, at=now())
        self._audit_expiry(expired)
        return len(expired)

    def _record(
        self,
        conn: Connection,
        actor: Actor,
        grant: Grant,
        action: str,
        *,
        reason: str | None = None,
    ) -> None:
        data: dict[str, object] = {
            "grantee_org_id": grant.grantee_org_id,
            "kind": grant.kind.value,
            "object_id": grant.object_id,
            "version": grant.version,
            "permission": grant.permission.value,
        }
        if reason:
            data["reason"] = reason
        self._audit.record(
            conn,
            actor=actor,
            action=action,
            target_type="grant",
            target_id=grant.id,
            org_id=grant.org_id,
            data=data,
        )


def covers_every_version(grants: list[Grant]) -> bool:
    """Own (no grants), or a grant on the object as a whole rather than on some versions."""
    return not grants or any(g.version is None for g in grants)


def granted_versions(grants: list[Grant]) -> list[int]:
    """The version numbers that one-version grants name, oldest first."""
    return sorted({g.version for g in grants if g.version is not None})


def _no_grant(grant_id: str) -> NotFound:
    return NotFound(f"No grant with id {grant_id!r}.", param="grant_id")
