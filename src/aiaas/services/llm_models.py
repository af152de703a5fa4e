"""Which GGUF model a chat or completion request names, for the organisation that sends it.

A model id is, in order:
1. a configured LLM (bundled, or named in `AIAAS_GGUF_MODELS`), served to everyone;
2. a registered model of the caller's organisation whose newest version holds a `model.gguf`
   (imported, re-quantised by an optimisation job, fine-tuned);
3. another organisation's such model, through a `use` grant that covers that version (the
   grant is re-checked on every request, so a revoke stops a loaded model too).

Anything else is a 404, exactly as if the model did not exist. The pool loads a registered
version under its version id, so every organisation that may call one version shares one loaded
copy; its GGUF is decrypted into memory only (`ModelFile.in_memory_from`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from aiaas.domain import Grant, GrantPermission, ModelVersion, Principal, SharedKind, Target
from aiaas.engines.llm.model_file import ModelFile
from aiaas.engines.llm.residency import LlmSource, LlmSpec
from aiaas.engines.pool import ModelPool
from aiaas.errors import InvalidRequest, ModelNotFound, NotFound
from aiaas.services.grants import GrantService
from aiaas.services.registry import LATEST, RegistryService

GGUF_ARTIFACT = "model.gguf"
GGUF_METADATA = "gguf.json"  # written by imports: the chat template to serve it with
_CACHE_LIMIT = 4096


@dataclass(frozen=True, slots=True)
class ResolvedLlm:
    spec: LlmSpec
    grant: Grant | None = None  # the `use` grant a shared model is called through


@dataclass(frozen=True, slots=True)
class _Cached:
    version: ModelVersion
    valid_until: float


class LlmModels:
    def __init__(
        self,
        pool: ModelPool,
        registry: RegistryService,
        grants: GrantService,
        *,
        cache_s: float = 0.0,
    ) -> None:
        self._pool = pool
        self._registry = registry
        self._grants = grants
        self._cache_s = cache_s
        self._versions: dict[tuple[str, str], _Cached] = {}
        registry.on_change(self._versions.clear)

    def configured(self, model: str) -> ResolvedLlm | None:
        """A configured LLM, from memory (no database read): the hot path's first look."""
        spec = self._pool.configured_llm(model)
        return ResolvedLlm(spec) if spec is not None else None

    def resolve(self, principal: Principal, model: str) -> ResolvedLlm:
        """The model `model` names for `principal` (blocking: it may read the database)."""
        configured = self.configured(model)
        if configured is not None:
            return configured
        if principal.org_id is None:
            raise _unknown(model)
        version = self._version(principal.org_id, model)
        grant = None
        if version.org_id != principal.org_id:
            grant = self._grants.access(
                org_id=principal.org_id,
                kind=SharedKind.MODEL,
                object_id=model,
                needed=GrantPermission.USE,
                version=version.version,
            )
            if grant is None:
                raise _unknown(model)
        if GGUF_ARTIFACT not in version.artifacts:
            raise InvalidRequest(
                f"The model '{model}' is not a language model: call a trained model through "
                "its deployment (/v1/predictions), an embedding model through /v1/embeddings.",
                param="model",
                code="model_not_generative",
            )
        return ResolvedLlm(self._spec(version), grant)

    def _version(self, org_id: str, model: str) -> ModelVersion:
        """The newest version of `model` in whichever registry holds it (a grant is checked by
        the caller), cached for `cache_s`."""
        key = (org_id, model)
        cached = self._versions.get(key)
        if cached is not None and time.monotonic() < cached.valid_until:
            return cached.version
        owner = self._registry.owner_of(model)
        if owner is None:
            raise _unknown(model)
        try:
            version = self._registry.resolve(
                org_id=owner, model_id=model, target=Target(alias=LATEST)
            )
        except NotFound as exc:
            raise _unknown(model) from exc
        if self._cache_s > 0:
            if len(self._versions) >= _CACHE_LIMIT:
                self._versions.clear()
            self._versions[key] = _Cached(version, time.monotonic() + self._cache_s)
        return version

    def _spec(self, version: ModelVersion) -> LlmSpec:
        registry = self._registry

        def locate() -> LlmSource:
            _, chunks = registry.open_artifact(version, GGUF_ARTIFACT)
            file = ModelFile.in_memory_from(f"aiaas-{version.id}", chunks)
            template = None
            if GGUF_METADATA in version.artifacts:
                about = json.loads(registry.read_artifact(version, GGUF_METADATA))
                template = about.get("chat_template") or None
            return LlmSource(file, template)

        return LlmSpec(
            id=version.id,
            locate=locate,
            name=version.model_id,
            owned_by=version.org_id,
            created=int(version.created_at),
        )


def _unknown(model: str) -> ModelNotFound:
    return ModelNotFound(f"The model '{model}' does not exist.", param="model")
