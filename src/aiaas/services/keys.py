"""API keys: issue, authenticate, list and revoke.

A key is `sk-aiaas-<id>-<secret>`. The id part finds the row; the secret is checked as an
HMAC-SHA256 under a server-side pepper and compared in constant time. The secret itself is never
stored or logged. An unknown id still costs one HMAC and one comparison, so response time does
not reveal which ids exist.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string
import time
from dataclasses import dataclass, field

from sqlalchemy import Connection

from aiaas.domain import (
    Actor,
    ApiKey,
    IssuedKey,
    LimitLevel,
    Organization,
    Page,
    Principal,
    Project,
    ProjectStatus,
    Quotas,
    RateLimits,
    Scope,
)
from aiaas.errors import AuthenticationFailed, InvalidRequest, NotFound
from aiaas.ids import now
from aiaas.services.audit import AuditService
from aiaas.storage.db import Database
from aiaas.storage.repos import keys as keys_repo
from aiaas.storage.repos import tenancy as tenancy_repo

KEY_PREFIX = "sk-aiaas-"
_ID_HEX = 16
_SECRET_ALPHABET = string.ascii_letters + string.digits
_SECRET_LEN = 43  # ~256 bits of base62
_LAST_USED_RESOLUTION = 60.0  # seconds; last_used_at is written at most this often
_CACHE_LIMIT = 100_000  # verified keys remembered at once; past it the cache starts over


@dataclass(frozen=True, slots=True)
class _Verified:
    secret_hmac: str
    principal: Principal
    key_expires_at: float | None
    valid_until: float  # time.monotonic()

    def still_valid(self, digest: str) -> bool:
        return (
            time.monotonic() < self.valid_until
            and hmac.compare_digest(digest, self.secret_hmac)
            and (self.key_expires_at is None or self.key_expires_at > now())
        )


_DUMMY_HMAC = "0" * 64


@dataclass(frozen=True, slots=True)
class KeySpec:
    """What a new key may do and for how long."""

    name: str
    scopes: frozenset[Scope]
    expires_at: float | None = None
    rate_limits: RateLimits = field(default_factory=RateLimits)


def _parse(token: str) -> tuple[str, str] | None:
    if not token.startswith(KEY_PREFIX):
        return None
    id_part, sep, secret = token.removeprefix(KEY_PREFIX).partition("-")
    valid_id = len(id_part) == _ID_HEX and all(c in string.hexdigits for c in id_part)
    if not sep or not valid_id or len(secret) != _SECRET_LEN:
        return None
    return f"key_{id_part.lower()}", secret


class KeyService:
    def __init__(
        self,
        db: Database,
        *,
        pepper: bytes,
        audit: AuditService,
        max_lifetime_s: float,
        cache_s: float = 0.0,
    ) -> None:
        self._db = db
        self._pepper = pepper
        self._audit = audit
        self._max_lifetime_s = max_lifetime_s
        # Keys verified in the last `cache_s` seconds skip the database: the read per request
        # was most of an authenticated request's cost. A revocation or archive made through
        # this process forgets them at once; another replica's, within `cache_s`.
        self._cache_s = cache_s
        self._verified: dict[str, _Verified] = {}

    def _hmac(self, secret: str) -> str:
        return hmac.new(self._pepper, secret.encode(), hashlib.sha256).hexdigest()

    # -- issuing -------------------------------------------------------------------------------

    def issue(
        self,
        conn: Connection,
        *,
        org_id: str | None,
        project_id: str | None,
        spec: KeySpec,
        actor: Actor,
    ) -> IssuedKey:
        """Create a key inside the caller's transaction and audit it there."""
        id_hex = secrets.token_hex(_ID_HEX // 2)
        secret = "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(_SECRET_LEN))
        key = ApiKey(
            id=f"key_{id_hex}",
            org_id=org_id,
            project_id=project_id,
            name=spec.name,
            hint=secret[-4:],
            scopes=spec.scopes,
            created_by=actor.id,
            created_at=now(),
            expires_at=spec.expires_at,
            revoked_at=None,
            last_used_at=None,
            rate_limits=spec.rate_limits,
        )
        keys_repo.insert_key(conn, key=key, secret_hmac=self._hmac(secret))
        self._audit.record(
            conn,
            actor=actor,
            action="api_key.created",
            target_type="api_key",
            target_id=key.id,
            org_id=org_id,
            project_id=project_id,
            data={
                "name": spec.name,
                "scopes": sorted(spec.scopes),
                "expires_at": spec.expires_at,
                "rate_limits": spec.rate_limits.to_dict(),
            },
        )
        return IssuedKey(key=key, secret=f"{KEY_PREFIX}{id_hex}-{secret}")

    def ensure_platform_admin_key(self) -> IssuedKey | None:
        """Create the operator's key on first start; None when a live one already exists."""
        with self._db.write() as conn:
            if keys_repo.count_live_platform_keys(conn):
                return None
            return self.issue(
                conn,
                org_id=None,
                project_id=None,
                spec=KeySpec(name="platform-admin", scopes=frozenset({Scope.PLATFORM_ADMIN})),
                actor=Actor(type="system"),
            )

    # -- authentication ------------------------------------------------------------------------

    def authenticate(self, token: str | None) -> Principal:
        if not token:
            raise AuthenticationFailed(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'."
            )
        parsed = _parse(token)
        if parsed is None:
            raise AuthenticationFailed("Incorrect API key provided: it is not an aiaas key.")
        key_id, secret = parsed
        digest = self._hmac(secret)
        cached = self._verified.get(key_id)
        if cached is not None and cached.still_valid(digest):
            return cached.principal
        with self._db.read() as conn:
            found = keys_repo.get_for_auth(conn, key_id)
            stored = found[1] if found else _DUMMY_HMAC
            matches = hmac.compare_digest(digest, stored)
            if found is None or not matches:
                raise AuthenticationFailed("Incorrect API key provided.")
            key = found[0]
            org, project = self._check_live(conn, key)
        self._touch(key)
        principal = _principal(key, org, project)
        if self._cache_s > 0:
            if len(self._verified) >= _CACHE_LIMIT:
                self._verified.clear()
            self._verified[key_id] = _Verified(
                secret_hmac=digest,
                principal=principal,
                key_expires_at=key.expires_at,
                valid_until=time.monotonic() + self._cache_s,
            )
        return principal

    def principal_of(self, key_id: str) -> Principal:
        """The principal of a live key, by id (work a key started on its owner's behalf, e.g. a
        batch, runs as it): 401 AuthenticationFailed once it is revoked, expired or archived."""
        with self._db.read() as conn:
            found = keys_repo.get_for_auth(conn, key_id)
            if found is None:
                raise AuthenticationFailed("This API key no longer exists.")
            key = found[0]
            org, project = self._check_live(conn, key)
        return _principal(key, org, project)

    def cached(self, token: str | None) -> Principal | None:
        """The principal of a recently verified key, from memory only (None: ask `authenticate`).
        Cheap enough for the event loop."""
        parsed = _parse(token) if token else None
        if parsed is None:
            return None
        key_id, secret = parsed
        found = self._verified.get(key_id)
        if found is not None and found.still_valid(self._hmac(secret)):
            return found.principal
        return None

    def forget(self, key_id: str | None = None) -> None:
        """Drop verified keys from the cache (one, or all: e.g. after archiving a project)."""
        if key_id is None:
            self._verified.clear()
        else:
            self._verified.pop(key_id, None)

    def _check_live(
        self, conn: Connection, key: ApiKey
    ) -> tuple[Organization | None, Project | None]:
        at = now()
        if key.revoked_at is not None:
            raise AuthenticationFailed("This API key has been revoked.")
        if key.expires_at is not None and key.expires_at <= at:
            raise AuthenticationFailed("This API key has expired.")
        if key.org_id is None:
            return None, None
        project = None
        if key.project_id is not None:
            project = tenancy_repo.get_project(conn, org_id=key.org_id, project_id=key.project_id)
            if project is None or project.status is not ProjectStatus.ACTIVE:
                raise AuthenticationFailed("This API key's project has been archived.")
        return tenancy_repo.get_org(conn, key.org_id), project

    def _touch(self, key: ApiKey) -> None:
        at = now()
        if key.last_used_at is not None and at - key.last_used_at < _LAST_USED_RESOLUTION:
            return
        with self._db.write() as conn:
            keys_repo.touch_last_used(
                conn, key_id=key.id, at=at, older_than=at - _LAST_USED_RESOLUTION
            )

    # -- org admin use cases -------------------------------------------------------------------

    def create(
        self, *, org_id: str, project_id: str | None, spec: KeySpec, actor: Actor
    ) -> IssuedKey:
        if spec.expires_at is not None and spec.expires_at - now() > self._max_lifetime_s:
            days = self._max_lifetime_s / 86400
            raise InvalidRequest(
                f"A key may live at most {days:g} days on this platform.", param="expires_in"
            )
        with self._db.write() as conn:
            if project_id is None:
                project = tenancy_repo.default_project(conn, org_id=org_id)
            else:
                project = tenancy_repo.get_project(conn, org_id=org_id, project_id=project_id)
            if project is None:
                raise NotFound(f"No project with id {project_id!r}.", param="project_id")
            if project.status is not ProjectStatus.ACTIVE:
                raise InvalidRequest(
                    f"Project {project.id!r} is archived; it takes no new keys.",
                    param="project_id",
                )
            return self.issue(conn, org_id=org_id, project_id=project.id, spec=spec, actor=actor)

    def list(
        self,
        *,
        org_id: str,
        project_id: str | None,
        include_revoked: bool,
        after: str | None,
        limit: int,
    ) -> Page[ApiKey]:
        with self._db.read() as conn:
            return keys_repo.list_keys(
                conn,
                org_id=org_id,
                project_id=project_id,
                include_revoked=include_revoked,
                after=after,
                limit=limit,
            )

    def get(self, *, org_id: str, key_id: str) -> ApiKey:
        with self._db.read() as conn:
            key = keys_repo.get_key(conn, org_id=org_id, key_id=key_id)
        if key is None:
            raise NotFound(f"No API key with id {key_id!r}.", param="key_id")
        return key

    def revoke(self, *, org_id: str, key_id: str, actor: Actor) -> ApiKey:
        with self._db.write() as conn:
            key = keys_repo.get_key(conn, org_id=org_id, key_id=key_id)
            if key is None:
                raise NotFound(f"No API key with id {key_id!r}.", param="key_id")
            if key.revoked_at is None:
                keys_repo.revoke_key(conn, key_id=key_id)
                self._audit.record(
                    conn,
                    actor=actor,
                    action="api_key.revoked",
                    target_type="api_key",
                    target_id=key_id,
                    org_id=org_id,
                    project_id=key.project_id,
                    data={"name": key.name},
                )
            revoked = keys_repo.get_key(conn, org_id=org_id, key_id=key_id)
        self.forget(key_id)
        assert revoked is not None
        return revoked


def _principal(key: ApiKey, org: Organization | None, project: Project | None) -> Principal:
    levels = [
        LimitLevel(level, owner.id, owner.rate_limits)
        for level, owner in (("org", org), ("project", project), ("key", key))
        if owner is not None and not owner.rate_limits.empty
    ]
    return Principal(
        key_id=key.id,
        org_id=key.org_id,
        project_id=key.project_id,
        scopes=key.scopes,
        weight=org.weight if org is not None else 1.0,
        limits=tuple(levels),
        quotas=org.quotas if org is not None else Quotas(),
    )
