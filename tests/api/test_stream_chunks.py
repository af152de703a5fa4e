"""The hand-rendered delta chunk is the pydantic chunk, byte for byte in meaning."""

from __future__ import annotations

import json

import pytest

from aiaas.protocol.openai import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    Completion,
    CompletionChoice,
)
from aiaas.services.serving import DeltaTemplate

TEXTS = ["", "hello", ' "quoted" \\ back', "line\nbreak\ttab", "é中文🙂", "\x00\x1f"]


@pytest.mark.parametrize("text", TEXTS)
def test_completion_delta_matches_the_model(text: str) -> None:
    head = Completion(id="cmpl-1", created=5, model='m"x', choices=[])
    template = DeltaTemplate(head, '"text":{},"logprobs":null,"finish_reason":null')
    expected = head.model_copy(
        update={"choices": [CompletionChoice(index=3, text=text, finish_reason=None)]}
    )
    assert json.loads(template.render(3, text)) == json.loads(expected.model_dump_json())


@pytest.mark.parametrize("text", TEXTS)
def test_chat_delta_matches_the_model(text: str) -> None:
    head = ChatCompletionChunk(id="chatcmpl-1", created=5, model="m", choices=[])
    template = DeltaTemplate(
        head, '"delta":{{"role":null,"content":{}}},"logprobs":null,"finish_reason":null'
    )
    expected = head.model_copy(
        update={"choices": [ChatChunkChoice(index=0, delta=ChatDelta(content=text))]}
    )
    assert json.loads(template.render(0, text)) == json.loads(expected.model_dump_json())
