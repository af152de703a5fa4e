"""Schemas of OpenAI's Batch API (`/v1/batches`) and of one line of a batch input file.

The official client drives these routes: `client.batches.create(input_file_id=...,
endpoint="/v1/chat/completions", completion_window="24h")`. Our `/v1/predictions` is a fourth
endpoint a batch may name.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StringConstraints

from aiaas.domain import Batch
from aiaas.protocol.platform import IdStr, Request

BatchEndpoint = Literal[
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/predictions"
]
ENDPOINTS: tuple[str, ...] = BatchEndpoint.__args__  # type: ignore[attr-defined]

MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]


class BatchCreate(Request):
    input_file_id: IdStr = Field(description="A file uploaded with purpose `batch`.")
    endpoint: BatchEndpoint
    completion_window: str = Field(
        default="24h",
        pattern=r"^([1-9][0-9]?|1[0-5][0-9]|16[0-8])h$",
        description="How long the batch may run: `24h` as OpenAI, or 1h to 168h. Lines not "
        "done by then end in the error file as `batch_expired`.",
    )
    metadata: dict[MetadataKey, MetadataValue] | None = Field(default=None, max_length=16)


class BatchLine(BaseModel):
    """One line of the input file: `{"custom_id", "method": "POST", "url", "body"}`."""

    custom_id: str = Field(min_length=1, max_length=512)
    method: Literal["POST"]
    url: str = Field(max_length=64)
    body: dict[str, Any]


class BatchError(BaseModel):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class BatchRequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class InputTokensDetails(BaseModel):
    cached_tokens: int


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class BatchUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class BatchObject(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: Literal[
        "validating",
        "failed",
        "in_progress",
        "finalizing",
        "completed",
        "expired",
        "cancelling",
        "cancelled",
    ]
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: BatchRequestCounts
    usage: BatchUsage
    metadata: dict[str, str] | None = None

    @classmethod
    def from_domain(cls, batch: Batch) -> BatchObject:
        def when(at: float | None) -> int | None:
            return int(at) if at is not None else None

        return cls(
            id=batch.id,
            endpoint=batch.endpoint,
            errors=BatchErrors(data=[BatchError(**e) for e in batch.errors])
            if batch.errors
            else None,
            input_file_id=batch.input_file_id,
            completion_window=batch.completion_window,
            status=batch.status.value,
            output_file_id=batch.output_file_id,
            error_file_id=batch.error_file_id,
            created_at=int(batch.created_at),
            in_progress_at=when(batch.in_progress_at),
            expires_at=when(batch.expires_at),
            finalizing_at=when(batch.finalizing_at),
            completed_at=when(batch.completed_at),
            failed_at=when(batch.failed_at),
            expired_at=when(batch.expired_at),
            cancelling_at=when(batch.cancelling_at),
            cancelled_at=when(batch.cancelled_at),
            request_counts=BatchRequestCounts(
                total=batch.total, completed=batch.completed, failed=batch.failed
            ),
            usage=BatchUsage(
                input_tokens=batch.input_tokens,
                input_tokens_details=InputTokensDetails(cached_tokens=batch.cached_tokens),
                output_tokens=batch.output_tokens,
                output_tokens_details=OutputTokensDetails(),
                total_tokens=batch.input_tokens + batch.output_tokens,
            ),
            metadata=batch.metadata,
        )
