"""One line of a batch, run through the same services as the HTTP route it names.

A line is what a client would have sent to `/v1/chat/completions`, `/v1/completions`,
`/v1/embeddings` or `/v1/predictions`: it is validated by the same wire schema, screened by the
organisation's privacy policy, served by the same engines (its `MeteredCall` is marked
`background`, so its engine work waits behind every interactive request) and metered with the
batch flag. What the route would have answered becomes the line's result: its status and body.

A refusal that says "try again soon" (a full engine queue, a model still loading) is not the
line's answer: `Retry` tells the runner to send the line again later.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from aiaas.domain import Principal
from aiaas.errors import (
    ApiError,
    InsufficientQuota,
    InvalidRequest,
    RateLimited,
    ServerError,
    ServiceUnavailable,
)
from aiaas.ids import new_id
from aiaas.protocol.openai import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    EmbeddingRequest,
)
from aiaas.protocol.predictions import PredictionRequest
from aiaas.protocol.validation import invalid_request
from aiaas.services.embeddings import EmbeddingService
from aiaas.services.inference import InferenceService
from aiaas.services.metering import MeteredCall, Metering
from aiaas.services.predictions import PredictionService
from aiaas.services.privacy import PrivacyService
from aiaas.services.serving import ChatServing, CompletionServing

log = logging.getLogger("aiaas.batches")

M = TypeVar("M", bound=BaseModel)

# The endpoint names usage records use, per batch endpoint (as the routes' `metered(...)`).
METERED_AS = {
    "/v1/chat/completions": "chat.completions",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/v1/predictions": "predictions",
}


class Retry(Exception):
    """The line was refused for now (429 or 503 that is not a spent quota): send it again."""

    def __init__(self, after: float) -> None:
        super().__init__(f"retry after {after:.1f} s")
        self.after = after


@dataclass(frozen=True, slots=True)
class LineResult:
    """What the route would have answered: a status and a JSON body, and the tokens used."""

    line: int
    custom_id: str
    status: int
    body: dict[str, Any]
    request_id: str
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.status < 400

    def record(self, batch_request_id: str) -> dict[str, Any]:
        """The line as OpenAI writes it to a batch's output or error file."""
        return {
            "id": batch_request_id,
            "custom_id": self.custom_id,
            "response": {
                "status_code": self.status,
                "request_id": self.request_id,
                "body": self.body,
            },
            "error": None,
        }


@dataclass(frozen=True, slots=True)
class _Answer:
    body: BaseModel
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class BatchLines:
    """Runs lines; one per process, shared by every batch the runner holds."""

    inference: InferenceService
    embeddings: EmbeddingService
    predictions: PredictionService
    privacy: PrivacyService
    metering: Metering
    _handlers: dict[str, Callable[[MeteredCall, str, dict[str, Any]], Awaitable[_Answer]]] = field(
        init=False
    )

    def __post_init__(self) -> None:
        self._handlers = {
            "/v1/chat/completions": self._chat,
            "/v1/completions": self._completion,
            "/v1/embeddings": self._embeddings,
            "/v1/predictions": self._predictions,
        }

    async def run(
        self,
        principal: Principal,
        org_id: str,
        endpoint: str,
        *,
        line: int,
        custom_id: str,
        body: dict[str, Any],
    ) -> LineResult:
        """The line's answer; raises `Retry` when it should be sent again later."""
        request_id = new_id("req")
        call = MeteredCall(
            principal=principal, endpoint=METERED_AS[endpoint], admission=None, background=True
        )
        call.model = str(body.get("model", "-"))[:256]
        try:
            self.metering.meter.check_quota(principal)
            answer = await self._handlers[endpoint](call, org_id, body)
        except InsufficientQuota as refused:
            result = _refused(line, custom_id, request_id, refused)
        except (RateLimited, ServiceUnavailable) as busy:
            raise Retry(busy.retry_after or 1.0) from busy
        except ApiError as refused:
            result = _refused(line, custom_id, request_id, refused)
        except Exception:  # a bug must not stop the batch: this line fails as the route would
            log.exception("batch line %d (%s) failed", line, endpoint)
            result = _refused(
                line,
                custom_id,
                request_id,
                ServerError("The server had an error while processing your request."),
            )
        else:
            result = LineResult(
                line=line,
                custom_id=custom_id,
                status=200,
                body=answer.body.model_dump(mode="json", exclude_none=False),
                request_id=request_id,
                input_tokens=answer.input_tokens,
                output_tokens=answer.output_tokens,
                cached_tokens=answer.cached_tokens,
            )
        await self.metering.end(call, status=result.status, request_id=request_id)
        return result

    # -- one handler per endpoint, each as its route does it --------------------------------------

    async def _chat(self, call: MeteredCall, _org_id: str, raw: dict[str, Any]) -> _Answer:
        body = _parse(ChatCompletionRequest, raw)
        _no_stream(body.stream)
        body, _ = await self.privacy.screen_chat(call.principal, body)
        gens = await self.inference.chat(call, body)
        return _generated(await ChatServing(body, gens, call).full(_never()))

    async def _completion(self, call: MeteredCall, _org_id: str, raw: dict[str, Any]) -> _Answer:
        body = _parse(CompletionRequest, raw)
        _no_stream(body.stream)
        body, _ = await self.privacy.screen_completion(call.principal, body)
        gens = await self.inference.complete(call, body)
        return _generated(await CompletionServing(body, gens, call).full(_never()))

    async def _embeddings(self, call: MeteredCall, _org_id: str, raw: dict[str, Any]) -> _Answer:
        body = _parse(EmbeddingRequest, raw)
        body, _ = await self.privacy.screen_embeddings(call.principal, body)
        result = await self.embeddings.embed(call, body)
        call.count(
            model=body.model, prompt_tokens=result.usage.prompt_tokens, items=len(result.data)
        )
        return _Answer(result, result.usage.prompt_tokens)

    async def _predictions(self, call: MeteredCall, org_id: str, raw: dict[str, Any]) -> _Answer:
        body = _parse(PredictionRequest, raw)
        texts, records, _ = await self.privacy.screen_prediction_inputs(
            call.principal, body.texts, body.records
        )
        answer = await self.predictions.respond(
            org_id=org_id,
            model=body.model,
            records=records,
            texts=texts,
            images=body.images,
            weight=call.principal.weight,
            call=call,
        )
        return _Answer(answer)


def _generated(done: ChatCompletion | Completion) -> _Answer:
    usage = done.usage
    assert usage is not None  # a full (not streamed) answer always counts its tokens
    details = usage.prompt_tokens_details
    return _Answer(
        done, usage.prompt_tokens, usage.completion_tokens, details.cached_tokens if details else 0
    )


def _parse(schema: type[M], raw: dict[str, Any]) -> M:
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e.get("loc", ()))} for e in exc.errors()]
        raise invalid_request(errors) from None


def _no_stream(stream: bool | None) -> None:
    if stream:
        raise InvalidRequest("A batch line cannot stream; leave out 'stream'.", param="stream")


def _never() -> asyncio.Future[None]:
    """A client that never leaves: a batch line runs to its end."""
    return asyncio.get_running_loop().create_future()


def _refused(line: int, custom_id: str, request_id: str, error: ApiError) -> LineResult:
    return LineResult(
        line=line,
        custom_id=custom_id,
        status=error.status,
        body=error.body(),
        request_id=request_id,
    )
