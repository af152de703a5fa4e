"""A loaded GGUF model: weights, vocabulary and metadata, through llama.cpp's C API.

Only the engine thread that owns the model's context decodes with it; tokenising and reading
pieces are read-only uses of the vocabulary and are safe from any thread.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import llama_cpp

from aiaas.errors import ConfigurationError, InvalidRequest

_llama_log = logging.getLogger("aiaas.llama_cpp")
# ggml.h: GGML_LOG_LEVEL_DEBUG 1, INFO 2, WARN 3, ERROR 4 (CONT 5 continues a line).
_LLAMA_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
# Warnings that our own use causes on purpose: a step cut short (engine.interrupt) has llama.cpp
# drop that step's KV positions.
_EXPECTED_WARNINGS = ("decode: removing memory module entries",)


@llama_cpp.llama_log_callback
def _route_llama_log(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    """llama.cpp's own log lines, into our JSON logs (its chatter at debug level)."""
    message = text.decode("utf-8", errors="replace").rstrip()
    if message:
        severity = _LLAMA_LEVELS.get(level, logging.DEBUG)
        if message.startswith(_EXPECTED_WARNINGS):
            severity = logging.DEBUG
        _llama_log.log(logging.DEBUG if severity == logging.INFO else severity, "%s", message)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    path: Path
    n_vocab: int
    n_ctx_train: int
    size_bytes: int
    chat_template: str | None
    bos_text: str
    eos_text: str
    add_bos: bool
    description: str


class LlamaModel:
    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise ConfigurationError(f"model file {path} does not exist")
        # Both are idempotent in llama.cpp, so each model may call them.
        llama_cpp.llama_log_set(_route_llama_log, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.use_mmap = True
        self._model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self._model:
            raise ConfigurationError(f"llama.cpp could not load {path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self._pieces: dict[int, bytes] = {}
        self._eog: dict[int, bool] = {}  # a per-token cache: one ctypes call per token id, ever
        self._pieces_lock = threading.Lock()
        bos = llama_cpp.llama_vocab_bos(self.vocab)
        eos = llama_cpp.llama_vocab_eos(self.vocab)
        self.info = ModelInfo(
            path=path,
            n_vocab=self.n_vocab,
            n_ctx_train=llama_cpp.llama_model_n_ctx_train(self._model),
            size_bytes=llama_cpp.llama_model_size(self._model),
            chat_template=self._meta("tokenizer.chat_template"),
            bos_text=self._special_text(bos),
            eos_text=self._special_text(eos),
            add_bos=bool(llama_cpp.llama_vocab_get_add_bos(self.vocab)),
            description=self._description(),
        )

    @property
    def handle(self) -> llama_cpp.llama_model_p:
        return self._model

    def _meta(self, key: str) -> str | None:
        size = 1 << 16
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.value.decode("utf-8", errors="replace")
            size = n + 1

    def _description(self) -> str:
        buf = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(self._model, buf, 256)
        return buf.value.decode("utf-8", errors="replace")

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self._to_piece(token, special=True).decode("utf-8", errors="replace")

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        tokens = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(
            self.vocab, data, len(data), tokens, capacity, add_special, parse_special
        )
        if n < 0:  # our bound was too small: -n is the size needed
            capacity = -n
            tokens = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(
                self.vocab, data, len(data), tokens, capacity, add_special, parse_special
            )
        if n < 0:
            raise InvalidRequest("The prompt could not be tokenised.", param="prompt")
        return list(tokens[:n])

    def _to_piece(self, token: int, *, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
        return buf.raw[:n]

    def piece(self, token: int) -> bytes:
        """The bytes a generated token contributes to the text (control tokens: none)."""
        cached = self._pieces.get(token)
        if cached is None:
            cached = self._to_piece(token, special=False)
            with self._pieces_lock:
                self._pieces[token] = cached
        return cached

    def is_eog(self, token: int) -> bool:
        known = self._eog.get(token)
        if known is None:
            known = self._eog[token] = bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))
        return known

    def valid_token(self, token: int) -> bool:
        return 0 <= token < self.n_vocab

    def close(self) -> None:
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None
