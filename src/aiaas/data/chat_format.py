"""OpenAI's chat fine-tuning JSONL format, checked line by line while a file streams in.

One JSON object per line: `{"messages": [{"role": ..., "content": ...}, ...]}` with at least one
assistant message, plus the optional `tools`, `functions` and `parallel_tool_calls`. Errors name
the line, so a user can fix a 50 000-line file without guessing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any, NoReturn

from aiaas.errors import InvalidRequest

__all__ = ["MAX_LINE_BYTES", "ChatJsonlValidator"]

MAX_LINE_BYTES = 8 * 1024 * 1024

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_MESSAGE_KEYS = frozenset(
    {"role", "content", "name", "weight", "tool_calls", "tool_call_id", "function_call", "refusal"}
)
_TOP_LEVEL_KEYS = frozenset({"messages", "tools", "functions", "parallel_tool_calls", "metadata"})
_PART_TYPES = frozenset({"text", "image_url"})


class ChatJsonlValidator:
    """Feed it chunks in order (`wrap` does it for a stream); `close` checks the end."""

    def __init__(self, *, param: str = "file") -> None:
        self._param = param
        self._pending = bytearray()
        self._line = 0
        self.examples = 0

    def wrap(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """Pass the chunks through unchanged, validating as they go and at the end."""
        for chunk in chunks:
            self.feed(chunk)
            yield chunk
        self.close()

    def feed(self, chunk: bytes) -> None:
        self._pending += chunk
        start = 0
        while (end := self._pending.find(b"\n", start)) >= 0:
            self._check_line(bytes(self._pending[start:end]))
            start = end + 1
        del self._pending[:start]
        if len(self._pending) > MAX_LINE_BYTES:
            self._fail(self._line + 1, f"is longer than {MAX_LINE_BYTES} bytes")

    def close(self) -> None:
        if self._pending:
            self._check_line(bytes(self._pending))
            self._pending.clear()
        if self.examples == 0:
            raise InvalidRequest(
                "A fine-tune file needs at least one example: one JSON object per line, "
                'each with a "messages" list.',
                param=self._param,
                code="invalid_file_format",
            )

    def _check_line(self, raw: bytes) -> None:
        self._line += 1
        if not raw.strip():
            return
        try:
            example = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            self._fail(self._line, "is not valid UTF-8")
        except json.JSONDecodeError as exc:
            self._fail(self._line, f"is not valid JSON ({exc.msg} at column {exc.colno})")
        self._check_example(example)
        self.examples += 1

    def _check_example(self, example: Any) -> None:
        line = self._line
        if not isinstance(example, dict):
            self._fail(line, "must be a JSON object")
        unknown = set(example) - _TOP_LEVEL_KEYS
        if unknown:
            self._fail(line, f"has unrecognised keys {sorted(unknown)}")
        messages = example.get("messages")
        if not isinstance(messages, list) or not messages:
            self._fail(line, 'needs a non-empty "messages" list')
        for index, message in enumerate(messages):
            self._check_message(index, message)
        if not any(m["role"] == "assistant" for m in messages):
            self._fail(line, "has no assistant message to learn from")
        for key in ("tools", "functions"):
            if key in example and not isinstance(example[key], list):
                self._fail(line, f'"{key}" must be a list')
        if "parallel_tool_calls" in example and not isinstance(
            example["parallel_tool_calls"], bool
        ):
            self._fail(line, '"parallel_tool_calls" must be true or false')

    def _check_message(self, index: int, message: Any) -> None:
        where = f"message {index}"
        if not isinstance(message, dict):
            self._fail(self._line, f"{where} must be an object")
        unknown = set(message) - _MESSAGE_KEYS
        if unknown:
            self._fail(self._line, f"{where} has unrecognised keys {sorted(unknown)}")
        role = message.get("role")
        if role not in _ROLES:
            self._fail(self._line, f"{where} has role {role!r}; expected one of {sorted(_ROLES)}")
        content = message.get("content")
        calls = message.get("tool_calls") or message.get("function_call")
        if content is None:
            if not (role == "assistant" and calls):
                self._fail(self._line, f"{where} has no content")
        elif isinstance(content, list):
            for part in content:
                if not isinstance(part, dict) or part.get("type") not in _PART_TYPES:
                    self._fail(
                        self._line, f"{where} has a content part that is not text or image_url"
                    )
        elif not isinstance(content, str):
            self._fail(self._line, f"{where} content must be a string or a list of parts")
        if "weight" in message:
            if role != "assistant":
                self._fail(self._line, f"{where}: only assistant messages take a weight")
            if message["weight"] not in (0, 1) or isinstance(message["weight"], bool):
                self._fail(self._line, f"{where} weight must be 0 or 1")

    def _fail(self, line: int, problem: str) -> NoReturn:
        raise InvalidRequest(
            f"Invalid fine-tune file: line {line} {problem}.",
            param=self._param,
            code="invalid_file_format",
        )
