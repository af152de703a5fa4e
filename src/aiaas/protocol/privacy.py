"""Wire schemas of privacy policies (issue 28): `/v1/organizations/{org_id}/privacy_policy`.

The names mirror `privacy.policy` (Mode, Entity, ENTRY_POINTS, FILE_PURPOSES); protocol may not
import `privacy`, so they are spelled out here and a test keeps the two in step.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from aiaas.protocol.platform import Request

ModeName = Literal["off", "detect", "redact", "block"]
EntityName = Literal[
    "email",
    "phone",
    "iban",
    "credit_card",
    "ip_address",
    "national_id",
    "person",
    "address",
    "date_of_birth",
]
FilePurposeName = Literal["fine-tune", "dataset", "batch", "user_data"]
ENTRY_POINT_FIELDS = ("chat", "completions", "embeddings", "predictions")


class PrivacyPolicyBody(Request):
    """The whole policy (a set replaces the one before). Every entry point defaults to `off`."""

    chat: ModeName = Field(default="off", description="Chat completion prompts (messages).")
    completions: ModeName = Field(default="off", description="Completion prompts.")
    embeddings: ModeName = Field(default="off", description="Embedding inputs.")
    predictions: ModeName = Field(default="off", description="Text fields of predictions.")
    files: dict[FilePurposeName, ModeName] = Field(
        default_factory=dict, description="Uploaded files, by purpose (e.g. `fine-tune`)."
    )
    entities: list[EntityName] | None = Field(
        default=None, max_length=16, description="Entity types to look for; all when omitted."
    )
    pseudonymise: bool = Field(
        default=False,
        description="Under `redact`: consistent per-request pseudonyms instead of `<TYPE>`.",
    )


class PrivacyPolicyObject(BaseModel):
    object: Literal["privacy_policy"] = "privacy_policy"
    organization_id: str
    project_id: str | None = None
    is_set: bool  # false: no policy at this level (everything off)
    chat: ModeName
    completions: ModeName
    embeddings: ModeName
    predictions: ModeName
    files: dict[str, ModeName]
    entities: list[EntityName]
    pseudonymise: bool
