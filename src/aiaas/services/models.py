"""The model ids a caller can send: served LLMs and embedders, and its organisation's trained
models and deployments, merged into one catalogue (OpenAI's `/v1/models`)."""

from __future__ import annotations

from aiaas.domain import Deployment, GrantPermission, Principal, RegisteredModel, SharedKind
from aiaas.errors import ModelNotFound
from aiaas.protocol.openai import Model
from aiaas.protocol.registry import RegisteredModelPublic
from aiaas.services.deployments import DeploymentService
from aiaas.services.grants import GrantService
from aiaas.services.inference import InferenceService
from aiaas.services.registry import RegistryService


class ModelCatalog:
    def __init__(
        self,
        inference: InferenceService,
        registry: RegistryService,
        deployments: DeploymentService,
        grants: GrantService,
    ) -> None:
        self._inference = inference
        self._registry = registry
        self._deployments = deployments
        self._grants = grants

    def list(self, principal: Principal) -> list[Model]:
        """The served models, then the organisation's trained models and deployments."""
        served = self._inference.models()
        trained: list[Model] = []
        if principal.org_id is not None:
            registered = self._registry.list_models(org_id=principal.org_id)
            trained = [RegisteredModelPublic.from_domain(m) for m in registered]
            # A deployment under its own name is a model id clients can send, too.
            names = {m.id for m in registered}
            trained += [
                _deployed(d)
                for d in self._deployments.list(org_id=principal.org_id).items
                if d.name not in names
            ]
            # Other organisations' trained models shared with this one (`use` or more).
            trained += [_shared(m, owner) for m, owner in self._shared_models(principal.org_id)]
            # Other organisations' deployments shared with this one, as `<owner>/<name>`.
            trained += [
                _deployed(d, owner_name=owner)
                for d, owner, _grant in self._deployments.shared_with(principal.org_id)
            ]
        return [*served, *trained]

    def _shared_models(self, org_id: str) -> list[tuple[RegisteredModel, str]]:
        """Registered models of other organisations that `org_id` may use, with the owner's
        name (one entry per model, whatever grants reach it)."""
        found: dict[str, tuple[RegisteredModel, str]] = {}
        for grant in self._grants.reaching(
            org_id=org_id, kind=SharedKind.MODEL, needed=GrantPermission.USE
        ):
            if grant.object_id in found:
                continue
            model = self._registry.find_model(org_id=grant.org_id, model_id=grant.object_id)
            owner = self._grants.owner(grant.org_id)
            if model is not None and owner is not None:
                found[model.id] = (model, owner.name)
        return list(found.values())

    def get(self, principal: Principal, model_id: str) -> Model:
        """One model by id: served first, then trained, then deployed; else a 404."""
        try:
            return self._inference.model(model_id)
        except ModelNotFound:
            if principal.org_id is None:
                raise
            found = self._registry.find_model(org_id=principal.org_id, model_id=model_id)
            if found is not None:
                return RegisteredModelPublic.from_domain(found)
            for shared, owner in self._shared_models(principal.org_id):
                if shared.id == model_id:
                    return _shared(shared, owner)
            deployment = self._deployments.find(org_id=principal.org_id, name=model_id)
            if deployment is not None:
                return _deployed(deployment)
            for shared, owner, _grant in self._deployments.shared_with(principal.org_id):
                if f"{owner}/{shared.name}" == model_id:
                    return _deployed(shared, owner_name=owner)
            raise


def _shared(model: RegisteredModel, owner_name: str) -> Model:
    return RegisteredModelPublic.from_domain(model).model_copy(update={"owned_by": owner_name})


def _deployed(deployment: Deployment, *, owner_name: str | None = None) -> Model:
    """A deployment as a model id: its own name, or `<owner>/<name>` for a shared one, which
    the owner's organisation name also `owned_by`."""
    if owner_name is None:
        return Model(
            id=deployment.name, created=int(deployment.created_at), owned_by=deployment.org_id
        )
    return Model(
        id=f"{owner_name}/{deployment.name}",
        created=int(deployment.created_at),
        owned_by=owner_name,
    )
