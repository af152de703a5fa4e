"""Chat fine-tuning files as conversations a LoRA job trains on (no torch here).

The file is OpenAI's chat JSONL, checked line by line by `data/chat_format.ChatJsonlValidator`
(the same check as at upload). What a text-only chat model cannot learn from is refused here,
naming the line: image parts, tool or function calls, tool definitions. A job checks its files
with `read_chats` when it is created, so a bad file is a 400 then, and the worker reads them the
same way.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NoReturn

from aiaas.data.chat_format import ChatJsonlValidator
from aiaas.errors import InvalidRequest

__all__ = ["ChatExample", "Message", "read_chats"]


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str
    trained: bool  # an assistant message whose tokens the loss counts (weight 1, the default)


@dataclass(frozen=True, slots=True)
class ChatExample:
    line: int  # 1-based line of the file
    messages: tuple[Message, ...]


def read_chats(chunks: Iterable[bytes], *, param: str) -> list[ChatExample]:
    """Validate a chat JSONL file and return its conversations; InvalidRequest names the line."""
    validator = ChatJsonlValidator(param=param)
    data = bytearray()
    for chunk in chunks:
        validator.feed(chunk)
        data += chunk
    validator.close()
    examples = []
    for number, raw in enumerate(bytes(data).split(b"\n"), start=1):
        if raw.strip():
            examples.append(_example(number, json.loads(raw), param))
    if not any(m.trained for example in examples for m in example.messages):
        raise InvalidRequest(
            "The file has no assistant message to learn from (every one has weight 0).",
            param=param,
            code="invalid_file_format",
        )
    return examples


def _example(line: int, example: dict[str, Any], param: str) -> ChatExample:
    for key in ("tools", "functions"):
        if example.get(key):
            _fail(line, param, f'has "{key}": LoRA fine-tuning takes text conversations only')
    messages = []
    for index, message in enumerate(example["messages"]):
        where = f"message {index}"
        if message.get("tool_calls") or message.get("function_call"):
            _fail(line, param, f"{where} has tool calls: LoRA fine-tuning takes text only")
        content = message.get("content")
        if isinstance(content, list):
            if any(part.get("type") != "text" for part in content):
                _fail(line, param, f"{where} has an image part: the model reads text only")
            if not all(isinstance(part.get("text"), str) for part in content):
                _fail(line, param, f'{where} has a text part without a "text" string')
            content = "".join(part["text"] for part in content)
        if not isinstance(content, str):
            _fail(line, param, f"{where} has no text content")
        role = message["role"]
        trained = role == "assistant" and message.get("weight", 1) == 1
        messages.append(Message(role=role, content=content, trained=trained))
    return ChatExample(line=line, messages=tuple(messages))


def _fail(line: int, param: str, problem: str) -> NoReturn:
    raise InvalidRequest(
        f"Invalid fine-tune file: line {line} {problem}.", param=param, code="invalid_file_format"
    )
