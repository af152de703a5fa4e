"""`GET /v1/usage`: metered usage per time bucket, grouped like OpenAI's usage API."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from aiaas.domain import UsageBucket, UsagePage

# `grant_id` and `organization_id` (the caller billed) matter most with `shared=true`: the
# owner's view of what its grants are used for, per grant and per grantee.
GroupBy = Literal[
    "model", "project_id", "api_key_id", "endpoint", "grant_id", "organization_id", "batch"
]


class UsageResult(BaseModel):
    object: Literal["organization.usage.result"] = "organization.usage.result"
    input_tokens: int
    output_tokens: int
    input_items: int
    num_model_requests: int
    num_errors: int
    # Set when the summary is grouped by them; null otherwise.
    model: str | None = None
    project_id: str | None = None
    api_key_id: str | None = None
    endpoint: str | None = None
    grant_id: str | None = None
    organization_id: str | None = None
    batch: bool | None = None


class UsageBucketPublic(BaseModel):
    object: Literal["bucket"] = "bucket"
    start_time: int
    end_time: int
    results: list[UsageResult]

    @classmethod
    def from_domain(cls, bucket: UsageBucket) -> UsageBucketPublic:
        return cls(
            start_time=bucket.start,
            end_time=bucket.end,
            results=[
                UsageResult(
                    input_tokens=g.prompt_tokens,
                    output_tokens=g.completion_tokens,
                    input_items=g.items,
                    num_model_requests=g.requests,
                    num_errors=g.errors,
                    **g.keys,
                )
                for g in bucket.groups
            ],
        )


class UsagePagePublic(BaseModel):
    object: Literal["page"] = "page"
    data: list[UsageBucketPublic]
    has_more: bool
    next_page: str | None

    @classmethod
    def from_domain(cls, page: UsagePage) -> UsagePagePublic:
        return cls(
            data=[UsageBucketPublic.from_domain(b) for b in page.buckets],
            has_more=page.next_start is not None,
            next_page=str(page.next_start) if page.next_start is not None else None,
        )
