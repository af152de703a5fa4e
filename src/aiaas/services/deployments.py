"""Deployments: a registered model served under a name, with an optional canary.

A deployment's target is a version or an alias; an alias is resolved on every request, so
moving `production` to a new version moves the traffic at once, with no redeploy. A canary takes
`canary_percent` of the requests (drawn per request). A name is unique within an organisation
and is what clients send as `model`; another organisation's deployment is a 404 like anything
else of theirs.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from sqlalchemy import Connection

from aiaas.domain import (
    Actor,
    Deployment,
    DeploymentSpec,
    Grant,
    GrantPermission,
    ModelVersion,
    Page,
    SharedKind,
    Target,
)
from aiaas.errors import InvalidRequest, ModelNotFound, NotFound
from aiaas.ids import new_id
from aiaas.services.audit import AuditService
from aiaas.services.grants import GrantService
from aiaas.services.registry import RegistryService
from aiaas.storage.db import Database
from aiaas.storage.repos import deployments as repo
from aiaas.storage.repos import registry as registry_repo


@dataclass(frozen=True, slots=True)
class _Resolved:
    deployment: Deployment
    target: ModelVersion
    canary: ModelVersion | None
    valid_until: float  # time.monotonic()

    @property
    def model_org_id(self) -> str:
        """Whose registry the served versions are in (another org's for a shared model)."""
        return self.target.org_id


_ROUTE_LIMIT = 10_000


@dataclass(frozen=True, slots=True)
class Routed:
    """Which version answers one request, and whether it was the canary."""

    deployment: Deployment
    version: ModelVersion
    canary: bool
    # The grant the call goes through: another organisation's deployment (the caller's `use`
    # grant), or the caller's deployment of another organisation's model (its model grant).
    grant: Grant | None = None


class DeploymentService:
    def __init__(
        self,
        db: Database,
        registry: RegistryService,
        audit: AuditService,
        grants: GrantService,
        *,
        rng: random.Random | None = None,
        cache_s: float = 0.0,
    ) -> None:
        self._db = db
        self._registry = registry
        self._audit = audit
        self._grants = grants
        self._rng = rng or random.Random()  # noqa: S311 - traffic split, not a secret
        # (org, name) -> what a request to it resolves to, for `cache_s` seconds: resolving took
        # four queries per request. Any change made through this process clears it at once.
        self._cache_s = cache_s
        self._routes: dict[tuple[str, str], _Resolved] = {}
        registry.on_change(self.forget_routes)

    def create(
        self, *, org_id: str, project_id: str, actor: Actor, name: str | None, spec: DeploymentSpec
    ) -> Deployment:
        self._check(org_id, spec)
        deployment_id = new_id("dep")
        with self._db.write() as conn:
            deployment = repo.create(
                conn,
                deployment_id=deployment_id,
                org_id=org_id,
                project_id=project_id,
                name=name or spec.model_id,
                model_id=spec.model_id,
                target=spec.target,
                canary=spec.canary,
                canary_percent=spec.canary_percent,
                created_by=actor.id,
            )
            self._record(conn, actor, deployment, "deployment.created")
        self.forget_routes()
        return deployment

    def update(
        self, *, org_id: str, deployment_id: str, actor: Actor, spec: DeploymentSpec
    ) -> Deployment:
        current = self.get(org_id=org_id, deployment_id=deployment_id)
        if spec.model_id != current.model_id:
            raise InvalidRequest(
                f"Deployment {current.name!r} serves '{current.model_id}'; make a new "
                "deployment to serve another model.",
                param="model",
            )
        self._check(org_id, spec)
        with self._db.write() as conn:
            repo.update_targets(
                conn,
                deployment_id=deployment_id,
                target=spec.target,
                canary=spec.canary,
                canary_percent=spec.canary_percent,
            )
            updated = repo.get(conn, org_id=org_id, deployment_id=deployment_id)
            assert updated is not None
            self._record(conn, actor, updated, "deployment.updated")
        self.forget_routes()
        return updated

    def _check(self, org_id: str, spec: DeploymentSpec) -> None:
        """Every target must name something that exists now (a later alias move is fine) and
        that the organisation may serve: its own model, or one it holds a `use` grant on."""
        targets = [spec.target, *([spec.canary] if spec.canary is not None else [])]
        for target in targets:
            self._resolve_model(org_id, spec.model_id, target)
        if spec.canary is None and spec.canary_percent:
            raise InvalidRequest("canary_percent needs a canary target.", param="canary")

    def get(self, *, org_id: str, deployment_id: str) -> Deployment:
        with self._db.read() as conn:
            found = repo.get(conn, org_id=org_id, deployment_id=deployment_id)
        if found is None:
            raise NotFound(f"No deployment with id {deployment_id!r}.", param="deployment_id")
        return found

    def list(self, *, org_id: str, after: str | None = None, limit: int = 1000) -> Page[Deployment]:
        with self._db.read() as conn:
            return repo.list_deployments(conn, org_id=org_id, after=after, limit=limit)

    def delete(self, *, org_id: str, deployment_id: str, actor: Actor) -> Deployment:
        with self._db.write() as conn:
            found = repo.get(conn, org_id=org_id, deployment_id=deployment_id)
            if found is None:
                raise NotFound(f"No deployment with id {deployment_id!r}.", param="deployment_id")
            repo.remove(conn, deployment_id=deployment_id)
            self._record(conn, actor, found, "deployment.deleted")
            self._grants.revoke_all_on(  # its grants end with it
                conn,
                org_id=org_id,
                kind=SharedKind.DEPLOYMENT,
                object_id=deployment_id,
                actor=actor,
            )
        self.forget_routes()
        return found

    # -- serving ---------------------------------------------------------------------------------

    def find(self, *, org_id: str, name: str) -> Deployment | None:
        with self._db.read() as conn:
            return repo.by_name(conn, org_id=org_id, name=name)

    def route(
        self, *, org_id: str, name: str, version: int | None = None, split: bool = True
    ) -> Routed:
        """The version that answers a request to `name` (a deployment name); with `version`,
        that version of the deployed model (Open Inference Protocol's `/versions/{v}`). Without
        `split` the canary never answers: metadata describes the deployment's own target."""
        if version is None:
            return self._pick(*self._resolved(org_id, name), split=split)
        deployment, grant = self._named(org_id, name)
        pinned, model_grant = self._resolve_model(
            deployment.org_id, deployment.model_id, Target(version=version)
        )
        return Routed(deployment, pinned, canary=False, grant=grant or model_grant)

    def _pick(self, resolved: _Resolved, grant: Grant | None, *, split: bool) -> Routed:
        canary = resolved.canary
        if (
            split
            and canary is not None
            and self._rng.random() * 100.0 < resolved.deployment.canary_percent
        ):
            return Routed(resolved.deployment, canary, canary=True, grant=grant)
        return Routed(resolved.deployment, resolved.target, canary=False, grant=grant)

    def _named(self, org_id: str, name: str) -> tuple[Deployment, Grant | None]:
        """The caller's own deployment `name`, or `<owner org name>/<name>`, another
        organisation's deployment it holds a `use` grant on (and that grant)."""
        deployment = self.find(org_id=org_id, name=name)
        if deployment is not None:
            return deployment, None
        shared = self._shared(org_id, name)
        if shared is None:
            raise NotFound(
                f"No deployed model named '{name}'. Deploy one with POST /v1/deployments.",
                param="model",
                code="model_not_found",
            )
        return shared

    def _shared(self, org_id: str, name: str) -> tuple[Deployment, Grant] | None:
        owner_name, _, own_name = name.rpartition("/")
        if not owner_name:
            return None
        owner = self._grants.org_named(owner_name)
        if owner is None or owner.id == org_id:
            return None
        deployment = self.find(org_id=owner.id, name=own_name)
        if deployment is None:
            return None
        grant = self._grant(org_id, deployment)
        return (deployment, grant) if grant is not None else None

    def _grant(self, org_id: str, deployment: Deployment) -> Grant | None:
        return self._grants.access(
            org_id=org_id,
            kind=SharedKind.DEPLOYMENT,
            object_id=deployment.id,
            needed=GrantPermission.USE,
        )

    def _granted(self, org_id: str, resolved: _Resolved) -> tuple[bool, Grant | None]:
        """Whether a cached route still answers `org_id`, and the grant it answers through
        now: checked on every request (the grant service's own cache bounds how long a revoke
        takes), so a revoked grant stops a loaded, routed deployment too. Both grants count:
        the caller's on another org's deployment, and the deployment's org's on another org's
        model."""
        deployment = resolved.deployment
        grant = None
        if deployment.org_id != org_id:
            grant = self._grant(org_id, deployment)
            if grant is None:
                return False, None
        if resolved.model_org_id != deployment.org_id:
            versions = [resolved.target, *([resolved.canary] if resolved.canary else [])]
            model_grants = [
                self._grants.access(
                    org_id=deployment.org_id,
                    kind=SharedKind.MODEL,
                    object_id=deployment.model_id,
                    needed=GrantPermission.USE,
                    version=v.version,
                )
                for v in versions
            ]
            if any(g is None for g in model_grants):
                return False, None
            grant = grant or model_grants[0]
        return True, grant

    def shared_with(self, org_id: str) -> list[tuple[Deployment, str, Grant]]:
        """Other organisations' deployments `org_id` may use: (deployment, owner name, grant)."""
        found: list[tuple[Deployment, str, Grant]] = []
        for grant in self._grants.reaching(
            org_id=org_id, kind=SharedKind.DEPLOYMENT, needed=GrantPermission.USE
        ):
            with self._db.read() as conn:
                deployment = repo.get(conn, org_id=grant.org_id, deployment_id=grant.object_id)
            owner = self._grants.owner(grant.org_id)
            if deployment is not None and owner is not None:
                found.append((deployment, owner.name, grant))
        return found

    def _model_org(self, org_id: str, model_id: str) -> str:
        """Whose registry holds `model_id`: the organisation's own, or another's (any grant is
        checked per version by `_resolve_model`)."""
        with self._db.read() as conn:
            owner = registry_repo.owner_of_model(conn, model_id)
        return owner if owner is not None and owner != org_id else org_id

    def _resolve_model(
        self, org_id: str, model_id: str, target: Target
    ) -> tuple[ModelVersion, Grant | None]:
        """The version `target` names, for a deployment of `org_id`: its own model's, or a
        shared model's through a `use` grant that covers that version (else a 404, as if the
        model did not exist)."""
        owner = self._model_org(org_id, model_id)
        if owner == org_id:
            return self._registry.resolve(org_id=org_id, model_id=model_id, target=target), None
        version = self._registry.resolve(org_id=owner, model_id=model_id, target=target)
        grant = self._grants.access(
            org_id=org_id,
            kind=SharedKind.MODEL,
            object_id=model_id,
            needed=GrantPermission.USE,
            version=version.version,
        )
        if grant is None:
            raise ModelNotFound(f"The model '{model_id}' does not exist.", param="model")
        return version, grant

    def _resolved(self, org_id: str, name: str) -> tuple[_Resolved, Grant | None]:
        key = (org_id, name)
        cached = self._routes.get(key)
        if cached is not None and time.monotonic() < cached.valid_until:
            allowed, grant = self._granted(org_id, cached)
            if allowed:
                return cached, grant
        deployment, grant = self._named(org_id, name)
        org, model_id = deployment.org_id, deployment.model_id
        target, model_grant = self._resolve_model(org, model_id, deployment.target)
        canary = None
        if deployment.canary is not None:
            canary, _ = self._resolve_model(org, model_id, deployment.canary)
        resolved = _Resolved(
            deployment=deployment,
            target=target,
            canary=canary,
            valid_until=time.monotonic() + self._cache_s,
        )
        if self._cache_s > 0:
            if len(self._routes) >= _ROUTE_LIMIT:
                self._routes.clear()
            self._routes[key] = resolved
        return resolved, grant or model_grant

    def cached_route(self, *, org_id: str, name: str) -> Routed | None:
        """`route` from memory only, when the deployment was resolved recently (else None)."""
        resolved = self._routes.get((org_id, name))
        if resolved is None or time.monotonic() >= resolved.valid_until:
            return None
        allowed, grant = self._granted(org_id, resolved)
        if not allowed:
            return None
        return self._pick(resolved, grant, split=True)

    def forget_routes(self) -> None:
        self._routes.clear()

    def serving(self, *, org_id: str, name: str, version: int | None = None) -> list[ModelVersion]:
        """Every version that may answer requests to `name`: its target and its canary."""
        routed = self.route(org_id=org_id, name=name, version=version, split=False)
        versions = [routed.version]
        canary = routed.deployment.canary
        if version is None and canary is not None:
            versions.append(
                self._resolve_model(routed.deployment.org_id, routed.deployment.model_id, canary)[0]
            )
        return versions

    def versions(self, *, deployment: Deployment) -> list[int]:
        """The versions of the model a deployment serves (its owner's, whoever asks)."""
        with self._db.read() as conn:
            owner = registry_repo.owner_of_model(conn, deployment.model_id) or deployment.org_id
            page = registry_repo.list_versions(
                conn, org_id=owner, model_id=deployment.model_id, after=None, limit=1000
            )
        return [v.version for v in page.items]

    def _record(self, conn: Connection, actor: Actor, deployment: Deployment, action: str) -> None:
        self._audit.record(
            conn,
            actor=actor,
            action=action,
            target_type="deployment",
            target_id=deployment.id,
            org_id=deployment.org_id,
            project_id=deployment.project_id,
            data={
                "name": deployment.name,
                "model": deployment.model_id,
                "version": deployment.target.version,
                "alias": deployment.target.alias,
                "canary_percent": deployment.canary_percent,
            },
        )
