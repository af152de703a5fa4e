"""The model registry: models, their immutable versions, artifacts, metrics and lineage.

A version is registered in three steps, like a dataset version: reserve (an invisible row with
its number), write the artifacts (encrypted blobs under `models/<org>/<version id>/`), publish
(the row becomes `ready` with its audit event). A failure removes what was reserved; a crash
leaves rows and blobs that `sweep()` removes at the next start. Artifacts are safetensors, ONNX
and JSON only: nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection

from aiaas.domain import (
    Actor,
    Artifact,
    Grant,
    ModelAlias,
    ModelVersion,
    Page,
    RegisteredModel,
    SharedKind,
    Target,
)
from aiaas.errors import Conflict, NotFound
from aiaas.ids import new_id, now
from aiaas.services.audit import AuditService
from aiaas.services.grants import GrantService, covers_every_version, granted_versions
from aiaas.storage.blobs import EncryptedBlobStore
from aiaas.storage.db import Database
from aiaas.storage.repos import deployments as deployments_repo
from aiaas.storage.repos import registry as repo
from aiaas.storage.repos.paging import page_in_memory

log = logging.getLogger("aiaas.registry")

# An alias every model has unless one is set by that name: its newest version.
LATEST = "latest"


# An artifact's content: its bytes, or (for a large upload, e.g. an imported GGUF) a function
# that streams them, so a file is never held in memory twice; its size and SHA-256 are measured
# while it is stored.
ArtifactContent = bytes | Callable[[], Iterable[bytes]]


@dataclass(frozen=True, slots=True)
class NewVersion:
    """What a training job (or an import) registers."""

    org_id: str
    project_id: str
    model_id: str
    base: str
    task: str
    artifacts: Sequence[tuple[str, ArtifactContent]]  # (file name, content)
    metrics: dict[str, Any]
    lineage: dict[str, Any]
    dataset_version_id: str | None
    job_id: str | None


class RegistryService:
    def __init__(
        self,
        db: Database,
        blobs: EncryptedBlobStore,
        audit: AuditService,
        *,
        grants: GrantService | None = None,
        abandon_after_s: float = 3600.0,
    ) -> None:
        self._db = db
        self._blobs = blobs
        self._audit = audit
        self._grants = grants  # None: no model is ever shared for reading (the workers)
        self._abandon_after_s = abandon_after_s
        self._listeners: list[Callable[[], None]] = []

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call `listener` after an alias or a model changes (caches of resolved versions)."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    # -- register --------------------------------------------------------------------------------

    def register(self, new: NewVersion, *, actor: Actor) -> ModelVersion:
        version_id = new_id("mv")
        with self._db.write() as conn:
            existing = repo.get_model(conn, org_id=new.org_id, model_id=new.model_id)
            if existing is None and repo.owner_of_model(conn, new.model_id) is not None:
                # Model ids are global: another organisation's model keeps its id.
                raise Conflict(
                    f"The model id {new.model_id!r} is taken; choose another name.",
                    param="register_to",
                    code="model_exists",
                )
            if existing is not None and (existing.base, existing.task) != (new.base, new.task):
                raise Conflict(
                    f"Model {new.model_id!r} is a {existing.task} {existing.base}; a "
                    f"{new.task} {new.base} cannot be a version of it.",
                    param="register_to",
                )
            repo.reserve_version(
                conn,
                version_id=version_id,
                model_id=new.model_id,
                org_id=new.org_id,
                project_id=new.project_id,
                base=new.base,
                task=new.task,
                created_by=actor.id,
            )
        try:
            artifacts = [
                self._store(new.org_id, version_id, name, content)
                for name, content in new.artifacts
            ]
            with self._db.write() as conn:
                version = repo.publish_version(
                    conn,
                    version_id=version_id,
                    artifacts=artifacts,
                    metrics=new.metrics,
                    lineage=new.lineage,
                    dataset_version_id=new.dataset_version_id,
                    job_id=new.job_id,
                )
                self._audit.record(
                    conn,
                    actor=actor,
                    action="model.version.registered",
                    target_type="model_version",
                    target_id=version_id,
                    org_id=new.org_id,
                    project_id=new.project_id,
                    data={"model": new.model_id, "version": version.version, "job_id": new.job_id},
                )
        except BaseException:
            self._drop_version(new.org_id, version_id)
            self._remove_if_empty(new.model_id)
            raise
        self._changed()  # "latest" may now name this version
        return version

    def _store(self, org_id: str, version_id: str, name: str, content: ArtifactContent) -> Artifact:
        key = f"{_prefix(org_id, version_id)}{name}"
        if not isinstance(content, bytes):  # streamed: measured as it goes in
            info = self._blobs.put(org_id, key, content())
            return Artifact(name=name, blob_key=key, bytes=info.size, sha256=info.sha256)
        info = self._blobs.put(org_id, key, [content])
        return Artifact(
            name=name, blob_key=key, bytes=info.size, sha256=hashlib.sha256(content).hexdigest()
        )

    # -- read ------------------------------------------------------------------------------------

    def owner_of(self, model_id: str) -> str | None:
        """The organisation whose registry holds `model_id`, whoever asks (a grant check is
        the caller's); None when there is no such model."""
        with self._db.read() as conn:
            return repo.owner_of_model(conn, model_id)

    def get_model(self, *, org_id: str, model_id: str) -> RegisteredModel:
        with self._db.read() as conn:
            return self._model_in(conn, org_id, model_id)

    def find_model(self, *, org_id: str, model_id: str) -> RegisteredModel | None:
        with self._db.read() as conn:
            return repo.get_model(conn, org_id=org_id, model_id=model_id)

    def list_models(self, *, org_id: str) -> list[RegisteredModel]:
        with self._db.read() as conn:
            return repo.list_models(conn, org_id=org_id).items

    def get_version(self, *, org_id: str, model_id: str, version: int) -> ModelVersion:
        """One of `org_id`'s own versions (`read_version` also answers a grantee)."""
        with self._db.read() as conn:
            found = repo.get_version(conn, org_id=org_id, model_id=model_id, version=version)
        if found is None:
            raise _no_version(model_id, version)
        return found

    # `read_version` and `list_versions` answer the owner, and an organisation that an active
    # `read` grant reaches (on the model, or on the version asked for): it lists, retrieves,
    # downloads and bundles, reading under the owner. `use` and `train-on` show none of that,
    # and anyone else gets the same 404 as for a model that does not exist.

    def read_version(self, *, org_id: str, model_id: str, version: int) -> ModelVersion:
        """A version `org_id` owns or may read."""
        reach = self._readable(org_id, model_id, version)
        if reach is None:
            raise _no_version(model_id, version)
        owner, _ = reach
        return self.get_version(org_id=owner, model_id=model_id, version=version)

    def list_versions(
        self, *, org_id: str, model_id: str, after: str | None, limit: int
    ) -> Page[ModelVersion]:
        """The versions `org_id` may read: all of its own, those a grant reaches of another's."""
        reach = self._readable(org_id, model_id)
        if reach is None:
            raise _no_model(model_id)
        owner, grants = reach
        with self._db.read() as conn:
            self._model_in(conn, owner, model_id)
            if covers_every_version(grants):
                return repo.list_versions(
                    conn, org_id=owner, model_id=model_id, after=after, limit=limit
                )
            found = [
                repo.get_version(conn, org_id=owner, model_id=model_id, version=n)
                for n in granted_versions(grants)
            ]
        versions = [v for v in found if v is not None]
        return page_in_memory(versions, after=after, limit=limit, id_of=lambda v: v.id)

    def _readable(
        self, org_id: str, model_id: str, version: int | None = None
    ) -> tuple[str, list[Grant]] | None:
        """Whose model `org_id` reads and through which grants: `(org_id, [])` for its own;
        `(owner, grants)` where active `read` grants reach it (the version, or any version when
        `version` is None); None for anyone else."""
        with self._db.read() as conn:
            if repo.get_model(conn, org_id=org_id, model_id=model_id) is not None:
                return org_id, []
        if self._grants is None:
            return None
        return self._grants.reading(
            org_id=org_id, kind=SharedKind.MODEL, object_id=model_id, version=version
        )

    def open_artifact(self, version: ModelVersion, name: str) -> tuple[Artifact, Iterator[bytes]]:
        artifact = version.artifacts.get(name)
        if artifact is None:
            raise NotFound(
                f"Version {version.version} of '{version.model_id}' has no artifact {name!r} "
                f"(it has {', '.join(sorted(version.artifacts))}).",
                param="artifact",
            )
        return artifact, self._blobs.open(artifact.blob_key)

    def read_artifact(self, version: ModelVersion, name: str) -> bytes:
        _, chunks = self.open_artifact(version, name)
        return b"".join(chunks)

    # -- aliases ---------------------------------------------------------------------------------

    def set_alias(
        self, *, org_id: str, model_id: str, alias: str, version: int, actor: Actor
    ) -> ModelAlias:
        """Point `alias` at an existing version: every deployment serving it moves at once."""
        with self._db.write() as conn:
            model = self._model_in(conn, org_id, model_id)
            if repo.get_version(conn, org_id=org_id, model_id=model_id, version=version) is None:
                raise NotFound(f"Model '{model_id}' has no version {version}.", param="version")
            found = repo.set_alias(
                conn,
                model_id=model_id,
                org_id=org_id,
                alias=alias,
                version=version,
                updated_by=actor.id,
            )
            self._audit.record(
                conn,
                actor=actor,
                action="model.alias.set",
                target_type="model",
                target_id=model_id,
                org_id=org_id,
                project_id=model.project_id,
                data={"alias": alias, "version": version},
            )
        self._changed()
        return found

    def list_aliases(self, *, org_id: str, model_id: str) -> list[ModelAlias]:
        with self._db.read() as conn:
            self._model_in(conn, org_id, model_id)
            return repo.list_aliases(conn, model_id=model_id)

    def delete_alias(self, *, org_id: str, model_id: str, alias: str, actor: Actor) -> None:
        with self._db.write() as conn:
            model = self._model_in(conn, org_id, model_id)
            serving = deployments_repo.count_serving(conn, model_id=model_id, alias=alias)
            if serving:
                raise Conflict(
                    f"{serving} deployment(s) serve alias {alias!r}: point them elsewhere first.",
                    param="alias",
                    code="alias_in_use",
                )
            if not repo.delete_alias(conn, model_id=model_id, alias=alias):
                raise NotFound(f"Model '{model_id}' has no alias {alias!r}.", param="alias")
            self._audit.record(
                conn,
                actor=actor,
                action="model.alias.deleted",
                target_type="model",
                target_id=model_id,
                org_id=org_id,
                project_id=model.project_id,
                data={"alias": alias},
            )
        self._changed()

    def resolve(self, *, org_id: str, model_id: str, target: Target) -> ModelVersion:
        """The version a target names now (an alias is read at this moment)."""
        with self._db.read() as conn:
            version = target.version
            if target.alias is not None:
                alias = repo.get_alias(conn, model_id=model_id, alias=target.alias)
                if alias is None and target.alias == LATEST:
                    model = self._model_in(conn, org_id, model_id)
                    alias = ModelAlias(model_id, LATEST, model.latest_version or 0, 0.0)
                if alias is None:
                    raise NotFound(
                        f"Model '{model_id}' has no alias {target.alias!r}.", param="alias"
                    )
                version = alias.version
            assert version is not None
            found = repo.get_version(conn, org_id=org_id, model_id=model_id, version=version)
        if found is None:
            raise NotFound(f"Model '{model_id}' has no version {version}.", param="version")
        return found

    def _model_in(self, conn: Connection, org_id: str, model_id: str) -> RegisteredModel:
        model = repo.get_model(conn, org_id=org_id, model_id=model_id)
        if model is None:
            raise _no_model(model_id)
        return model

    # -- delete ----------------------------------------------------------------------------------

    def delete_model(self, *, org_id: str, model_id: str, actor: Actor) -> None:
        with self._db.write() as conn:
            model = self._model_in(conn, org_id, model_id)
            serving = deployments_repo.count_serving(conn, model_id=model_id)
            if serving:
                raise Conflict(
                    f"Model '{model_id}' has {serving} deployment(s): delete them first.",
                    param="model",
                    code="model_in_use",
                )
            repo.delete_aliases_of(conn, model_id=model_id)
            versions = repo.versions_of(conn, model_id=model_id)
            repo.mark_model(conn, model_id=model_id, state=repo.State.DELETING)
            for version_id, _ in versions:
                repo.mark_version(conn, version_id=version_id, state=repo.State.DELETING)
            self._audit.record(
                conn,
                actor=actor,
                action="model.deleted",
                target_type="model",
                target_id=model_id,
                org_id=org_id,
                project_id=model.project_id,
                data={"versions": len(versions)},
            )
            if self._grants is not None:  # its grants end with it
                self._grants.revoke_all_on(
                    conn, org_id=org_id, kind=SharedKind.MODEL, object_id=model_id, actor=actor
                )
        for version_id, _ in versions:
            self._drop_version(org_id, version_id)
        with self._db.write() as conn:
            repo.remove_model(conn, model_id=model_id)
        self._changed()

    def sweep(self) -> int:
        """Remove versions whose registration or deletion a crash cut short; return how many."""
        before = now() - self._abandon_after_s
        with self._db.read() as conn:
            versions, _ = repo.abandoned(conn, creating_before=before)
        for row in versions:
            self._drop_version(row.org_id, row.id)
        with self._db.write() as conn:
            _, empty = repo.abandoned(conn, creating_before=before)
            for model_id in empty:
                repo.remove_model(conn, model_id=model_id)
        if versions:
            log.info("removed %d unfinished model versions", len(versions))
        return len(versions)

    def _drop_version(self, org_id: str, version_id: str) -> None:
        # Blobs first: a crash in between leaves a row the next sweep finds, never an orphan blob.
        for key in list(self._blobs.keys(_prefix(org_id, version_id))):
            self._blobs.delete(key)
        with self._db.write() as conn:
            repo.remove_version(conn, version_id=version_id)

    def _remove_if_empty(self, model_id: str) -> None:
        with self._db.write() as conn:
            _, empty = repo.abandoned(conn, creating_before=0.0)
            if model_id in empty:
                repo.remove_model(conn, model_id=model_id)


def _no_model(model_id: str) -> NotFound:
    return NotFound(f"The model '{model_id}' does not exist.", param="model")


def _no_version(model_id: str, version: int) -> NotFound:
    return NotFound(f"Model '{model_id}' has no version {version}.", param="version")


def _prefix(org_id: str, version_id: str) -> str:
    return f"models/{org_id}/{version_id}/"
