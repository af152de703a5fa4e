"""Schemas of the OpenAI-compatible API, field for field as OpenAI documents them.

Only the wire schema and the checks that need no engine live here; the inference service turns a
request into engine input (sampling parameters, a compiled grammar). Requests forbid unknown
fields: a typo in a parameter is a 400 naming it, never a silent no-op.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    StringConstraints,
    field_validator,
)

from aiaas.errors import InvalidRequest
from aiaas.ids import unique_hex

MAX_STOP_SEQUENCES = 4
MAX_MESSAGES = 2048
MAX_PROMPT_CHARS = 1_000_000

# No control characters: a model id may be looked up in the database (deployed encoders).
ModelId = Annotated[str, StringConstraints(pattern=r"^[^\x00-\x1f\x7f]{1,256}$")]
StopText = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    # Serialised as what each item is: a trained model says its base, task and latest version.
    data: list[SerializeAsAny[Model]]


# -- shared sampling fields ------------------------------------------------------------------


class ModelResidency(BaseModel):
    """Whether a language model is loaded, and what it holds (`/v1/models/{id}/load`)."""

    id: str
    object: Literal["model.residency"] = "model.residency"
    loaded: bool
    pinned: bool = False
    resident_bytes: int | None = Field(
        default=None, description="Memory it holds: its GGUF plus what its load added."
    )
    load_seconds: float | None = None


class StreamOptions(Request):
    include_usage: bool = False


class JsonSchemaFormat(Request):
    name: str = Field(default="response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ResponseFormat(Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def enforced_schema(self) -> dict[str, Any]:
        """The JSON schema a `json_schema` format asks the output to follow."""
        spec = self.json_schema
        if spec is None or spec.schema_ is None:
            raise InvalidRequest(
                "response_format json_schema needs json_schema.schema.",
                param="response_format.json_schema",
            )
        return spec.schema_


class SamplingRequest(Request):
    """The sampling knobs chat and completions share, with OpenAI's bounds."""

    model: ModelId
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=8)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopText | list[StopText] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    user: str | None = Field(default=None, max_length=256)
    # Extensions that llama.cpp-based servers accept; OpenAI clients send them via extra_body.
    top_k: int | None = Field(default=None, ge=0, le=1000)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is not None:
            if len(value) > 1024:
                raise ValueError("at most 1024 biased tokens")
            for key in value:
                if not key.isdigit() or len(key) > 9:
                    raise ValueError(f"keys must be token ids, got {key!r}")
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


# -- chat ------------------------------------------------------------------------------------


class TextPart(Request):
    type: Literal["text"]
    text: str


class ChatMessage(Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(default=None, max_length=64)
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    # Accepted for compatibility with clients that always send them; they change nothing here.
    metadata: dict[str, str] | None = None
    store: bool | None = None
    parallel_tool_calls: bool | None = None

    def completion_limit(self) -> int | None:
        """The most tokens to generate: `max_completion_tokens`, or the older `max_tokens`."""
        return self.max_completion_tokens or self.max_tokens

    def top_logprobs_count(self) -> int | None:
        """How many alternatives each token's logprobs lists; None: no logprobs."""
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs requires logprobs=true.", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def chat_messages(self) -> list[dict[str, str]]:
        """Messages as chat templates expect them: role and plain-text content."""
        out = []
        for message in self.messages:
            role = "system" if message.role == "developer" else message.role
            out.append({"role": role, "content": message.text()})
        if sum(len(m["content"]) for m in out) > MAX_PROMPT_CHARS:
            raise InvalidRequest(
                f"messages hold more than {MAX_PROMPT_CHARS} characters.", param="messages"
            )
        return out


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] = Field(description="Text, or one prompt's token ids.")
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5)
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1, le=1)
    response_format: ResponseFormat | None = None

    @field_validator("prompt")
    @classmethod
    def _bounded_prompt(cls, value: str | list[str] | list[int]) -> str | list[str] | list[int]:
        if isinstance(value, list):
            if not value:
                raise ValueError("prompt must not be empty")
            if len(value) > 64 and isinstance(value[0], str):
                raise ValueError("at most 64 prompts per request")
        total = len(value) if isinstance(value, str) else sum(len(str(p)) for p in value)
        if total > MAX_PROMPT_CHARS:
            raise ValueError(f"prompt holds more than {MAX_PROMPT_CHARS} characters")
        return value

    def prompts(self) -> list[str | list[int]]:
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(p, int) for p in self.prompt):
            return [[int(p) for p in self.prompt]]
        return [str(p) for p in self.prompt]

    def check_supported(self) -> None:
        if self.suffix:
            raise InvalidRequest("suffix (fill-in-the-middle) is not supported.", param="suffix")


# -- responses -------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # read from the prefix cache rather than computed


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None


FinishReason = Literal["stop", "length", "content_filter"]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


# -- embeddings ------------------------------------------------------------------------------

MAX_EMBEDDING_ITEMS = 2048


class EmbeddingRequest(Request):
    model: ModelId
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="Text, texts, or token ids (one list per input)."
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = Field(default=None, max_length=256)

    @field_validator("input")
    @classmethod
    def _bounded_input(
        cls, value: str | list[str] | list[int] | list[list[int]]
    ) -> str | list[str] | list[int] | list[list[int]]:
        items = [value] if isinstance(value, str) else value
        if not items:
            raise ValueError("input must not be empty")
        if len(items) > MAX_EMBEDDING_ITEMS:
            raise ValueError(f"at most {MAX_EMBEDDING_ITEMS} inputs per request")
        for item in items:
            if isinstance(item, str | list) and len(item) == 0:
                raise ValueError("an input must not be empty")
        return value

    def items(self) -> list[str] | list[list[int]]:
        """Each input as text or as token ids."""
        if isinstance(self.input, str):
            return [self.input]
        if all(isinstance(i, int) for i in self.input):
            return [[int(i) for i in self.input]]  # type: ignore[union-attr]
        return list(self.input)  # type: ignore[arg-type]


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


def new_completion_id(prefix: str) -> str:
    return f"{prefix}-{unique_hex()}"


def now_s() -> int:
    return int(time.time())


__all__ = [
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "Completion",
    "CompletionRequest",
    "EmbeddingList",
    "EmbeddingRequest",
    "Model",
    "ModelList",
    "Usage",
]
