"""Chat completions and completions served: the engine's events as typed responses or chunks.

A serving object takes the generations an `InferenceService` started and either collects them
into one response (`full`) or yields them as stream chunks (`stream`), counting the usage on the
metered call. The API layer only renders: JSON for a response, server-sent events for a stream.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable

from pydantic import BaseModel

from aiaas.engines.llm.params import Delta, Final, FinishReason, TokenLogprob
from aiaas.errors import ClientGone
from aiaas.protocol.openai import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    PromptTokensDetails,
    TopLogprob,
    Usage,
    new_completion_id,
    now_s,
)
from aiaas.protocol.openai import TokenLogprob as WireTokenLogprob
from aiaas.services.inference import Generations
from aiaas.services.metering import MeteredCall


def _finish(reason: FinishReason) -> str:
    return "stop" if reason is FinishReason.CANCELLED else reason.value


def _usage(gens: Generations, completion_tokens: int, call: MeteredCall) -> Usage:
    call.count(
        model=gens.model_id, prompt_tokens=gens.prompt_tokens, completion_tokens=completion_tokens
    )
    return Usage(
        prompt_tokens=gens.prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=gens.prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=gens.cached_tokens),
    )


def _wire_logprobs(items: tuple[TokenLogprob, ...]) -> list[WireTokenLogprob]:
    return [
        WireTokenLogprob(
            token=lp.token,
            logprob=lp.logprob,
            bytes=list(lp.token_bytes),
            top_logprobs=[TopLogprob(token=t, logprob=v, bytes=list(b)) for t, b, v in lp.top],
        )
        for lp in items
    ]


async def _collect(
    gens: Generations, client_gone: Awaitable[object]
) -> dict[int, tuple[str, list[TokenLogprob], Final]]:
    """Run a non-streamed generation to the end; `client_gone` finishing first cancels it."""

    async def gather() -> dict[int, tuple[str, list[TokenLogprob], Final]]:
        texts: dict[int, list[str]] = {}
        logprobs: dict[int, list[TokenLogprob]] = {}
        done: dict[int, tuple[str, list[TokenLogprob], Final]] = {}
        async for index, event in gens.events():
            texts.setdefault(index, []).append(event.text)
            logprobs.setdefault(index, []).extend(event.logprobs)
            if isinstance(event, Final):
                done[index] = ("".join(texts[index]), logprobs[index], event)
        return done

    work = asyncio.ensure_future(gather())
    gone = asyncio.ensure_future(client_gone)
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            gens.cancel()
    if not work.done() or work.cancelled():
        raise ClientGone("The client disconnected before the completion was ready.")
    return work.result()


class DeltaTemplate:
    """The JSON of a plain text delta chunk, rendered without pydantic.

    It is the one chunk sent per token per stream, so it is on the hot path; its shape is the
    pydantic model's exactly (the tests compare streamed and full replies through the openai
    client), with only the index and the text filled in.
    """

    def __init__(self, head: BaseModel, choice: str) -> None:
        skeleton = head.model_dump_json()  # {"id":…,"choices":[],…}
        before, _, after = skeleton.partition('"choices":[]')
        self._head = f'{before}"choices":[{{"index":'
        self._choice = choice
        self._tail = f"}}]{after}"

    def render(self, index: int, text: str) -> bytes:
        content = json.dumps(text, ensure_ascii=False)
        return f"{self._head}{index},{self._choice.format(content)}{self._tail}".encode()


# -- chat ------------------------------------------------------------------------------------


class ChatServing:
    def __init__(self, body: ChatCompletionRequest, gens: Generations, call: MeteredCall) -> None:
        self.body = body
        self.gens = gens
        self.call = call
        self.id = new_completion_id("chatcmpl")
        self.created = now_s()
        self.delta = DeltaTemplate(
            self._chunk([]),
            '"delta":{{"role":null,"content":{}}},"logprobs":null,"finish_reason":null',
        )

    async def full(self, client_gone: Awaitable[object]) -> ChatCompletion:
        done = await _collect(self.gens, client_gone)
        choices = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content=text),
                logprobs=ChoiceLogprobs(content=_wire_logprobs(tuple(lps)))
                if self.body.logprobs
                else None,
                finish_reason=_finish(final.finish_reason),
            )
            for i, (text, lps, final) in sorted(done.items())
        ]
        completion = sum(final.completion_tokens for _, _, final in done.values())
        return ChatCompletion(
            id=self.id,
            created=self.created,
            model=self.gens.model_id,
            choices=choices,
            usage=_usage(self.gens, completion, self.call),
        )

    def _chunk(
        self, choices: list[ChatChunkChoice], usage: Usage | None = None
    ) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.gens.model_id, choices=choices, usage=usage
        )

    async def stream(self) -> AsyncIterator[ChatCompletionChunk | bytes]:
        n_choices = len(self.gens.requests)
        yield self._chunk(
            [
                ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))
                for i in range(n_choices)
            ]
        )
        completion = 0
        async for index, event in self.gens.events():
            logprobs = (
                ChoiceLogprobs(content=_wire_logprobs(event.logprobs))
                if self.body.logprobs
                else None
            )
            if isinstance(event, Delta):
                if logprobs is None:
                    yield self.delta.render(index, event.text)
                    continue
                yield self._chunk(
                    [
                        ChatChunkChoice(
                            index=index, delta=ChatDelta(content=event.text), logprobs=logprobs
                        )
                    ]
                )
                continue
            completion += event.completion_tokens
            if event.text or event.logprobs:
                yield self._chunk(
                    [
                        ChatChunkChoice(
                            index=index, delta=ChatDelta(content=event.text), logprobs=logprobs
                        )
                    ]
                )
            yield self._chunk(
                [
                    ChatChunkChoice(
                        index=index, delta=ChatDelta(), finish_reason=_finish(event.finish_reason)
                    )
                ]
            )
        usage = _usage(self.gens, completion, self.call)
        if self.body.stream_options and self.body.stream_options.include_usage:
            yield self._chunk([], usage=usage)


# -- completions -----------------------------------------------------------------------------


class CompletionServing:
    def __init__(self, body: CompletionRequest, gens: Generations, call: MeteredCall) -> None:
        self.body = body
        self.gens = gens
        self.call = call
        self.id = new_completion_id("cmpl")
        self.created = now_s()
        self.delta = DeltaTemplate(
            self._chunk([]), '"text":{},"logprobs":null,"finish_reason":null'
        )

    def _prefix(self, index: int) -> str:
        return self.gens.prompts[index // self.gens.n].text if self.body.echo else ""

    def _logprobs(self, items: list[TokenLogprob], offset: int) -> CompletionLogprobs | None:
        if self.body.logprobs is None:
            return None
        offsets, position = [], offset
        for lp in items:
            offsets.append(position)
            position += len(lp.token)
        return CompletionLogprobs(
            tokens=[lp.token for lp in items],
            token_logprobs=[lp.logprob for lp in items],
            top_logprobs=[{t: v for t, _, v in lp.top} for lp in items],
            text_offset=offsets,
        )

    async def full(self, client_gone: Awaitable[object]) -> Completion:
        done = await _collect(self.gens, client_gone)
        choices = []
        for i, (text, lps, final) in sorted(done.items()):
            prefix = self._prefix(i)
            choices.append(
                CompletionChoice(
                    index=i,
                    text=prefix + text,
                    logprobs=self._logprobs(lps, len(prefix)),
                    finish_reason=_finish(final.finish_reason),
                )
            )
        completion = sum(final.completion_tokens for _, _, final in done.values())
        return Completion(
            id=self.id,
            created=self.created,
            model=self.gens.model_id,
            choices=choices,
            usage=_usage(self.gens, completion, self.call),
        )

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> Completion:
        return Completion(
            id=self.id, created=self.created, model=self.gens.model_id, choices=choices, usage=usage
        )

    async def stream(self) -> AsyncIterator[Completion | bytes]:
        if self.body.echo:
            for i in range(len(self.gens.requests)):
                yield self._chunk(
                    [CompletionChoice(index=i, text=self._prefix(i), finish_reason=None)]
                )
        completion = 0
        async for index, event in self.gens.events():
            logprobs = self._logprobs(list(event.logprobs), 0)
            if isinstance(event, Delta):
                if logprobs is None:
                    yield self.delta.render(index, event.text)
                    continue
                yield self._chunk(
                    [
                        CompletionChoice(
                            index=index, text=event.text, logprobs=logprobs, finish_reason=None
                        )
                    ]
                )
                continue
            completion += event.completion_tokens
            yield self._chunk(
                [
                    CompletionChoice(
                        index=index,
                        text=event.text,
                        logprobs=logprobs,
                        finish_reason=_finish(event.finish_reason),
                    )
                ]
            )
        usage = _usage(self.gens, completion, self.call)
        if self.body.stream_options and self.body.stream_options.include_usage:
            yield self._chunk([], usage=usage)
