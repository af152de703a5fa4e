"""GGUF models in the optimisation job: re-quantise them with llama.cpp's own quantiser, and
measure any GGUF file the same way, whatever its type.

- `requantize`: a GGUF file to another llama.cpp type (`QUANT_TYPES`), written atomically.
- `perplexity`: the method of llama.cpp's `llama-perplexity` tool over a text.
- `generation_speed`: prompt and greedy-decode throughput of one sequence.
- `DEFAULT_EVAL_TEXT`: held-out English prose for perplexity when the user gives none.

No database, no HTTP. Everything runs on the calling thread, on the CPU build of llama.cpp, and
frees every model, context and batch it creates before returning.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np

from aiaas.engines.llm.model import LlamaModel
from aiaas.engines.llm.sampler import logits_view
from aiaas.errors import InvalidRequest, ServerError

__all__ = [
    "DEFAULT_EVAL_TEXT",
    "QUANT_TYPES",
    "PerplexityResult",
    "SpeedResult",
    "generation_speed",
    "perplexity",
    "requantize",
]

# llama.cpp's type names -> its file types, roughly from the largest file to the smallest.
_FTYPES: dict[str, int] = {
    "F16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16,
    "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "Q6_K": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K,
    "Q5_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
    "Q5_K_S": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_S,
    "Q5_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_1,
    "Q5_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_0,
    "Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "Q4_K_S": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_S,
    "Q4_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1,
    "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
    "Q3_K_L": llama_cpp.LLAMA_FTYPE_MOSTLY_Q3_K_L,
    "Q3_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q3_K_M,
    "Q3_K_S": llama_cpp.LLAMA_FTYPE_MOSTLY_Q3_K_S,
    "Q2_K": llama_cpp.LLAMA_FTYPE_MOSTLY_Q2_K,
}
QUANT_TYPES: tuple[str, ...] = tuple(_FTYPES)

GGUF_MAGIC = b"GGUF"
MIN_PERPLEXITY_CTX = 16
# ggml.h's `ggml_log_level` as built: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5.
_GGML_LOG_ERROR = 4

_llama_log = logging.getLogger("aiaas.llama_cpp")


@dataclass(frozen=True, slots=True)
class PerplexityResult:
    perplexity: float
    tokens_scored: int
    n_ctx: int


@dataclass(frozen=True, slots=True)
class SpeedResult:
    prompt_tokens_per_s: float
    generated_tokens_per_s: float
    first_token_ms: float


# -- re-quantisation ---------------------------------------------------------------------------


def requantize(source: Path, target: Path, quant_type: str, *, threads: int) -> None:
    """Re-quantise `source` to `quant_type` at `target`, with llama.cpp's own quantiser.

    The sources are already quantised, so their tensors are dequantised first
    (`allow_requantize`): a Q4 source re-quantised to Q8_0 is larger but no more accurate than
    its source. Tensors whose rows do not fit a K-quant's 256-wide blocks get llama.cpp's
    fallback type. The file appears at `target` whole or not at all.
    """
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _ftype(quant_type)
    params.nthread = threads
    params.allow_requantize = True
    _require_gguf(source)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    os.close(fd)
    partial = Path(name)
    try:
        with _llama_errors() as errors:
            status = llama_cpp.llama_model_quantize(
                str(source).encode(), str(partial).encode(), ctypes.byref(params)
            )
        if status != 0:
            reason = errors[-1] if errors else f"status {status}"
            reason = reason.replace(str(source), source.name).replace(str(partial), target.name)
            raise ServerError(
                f"llama.cpp could not re-quantise the model to {quant_type.upper()}: {reason}"
            )
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def _ftype(quant_type: str) -> int:
    ftype = _FTYPES.get(quant_type.upper())
    if ftype is None:
        raise InvalidRequest(
            f"Unknown quantisation type {quant_type!r}; supported: {', '.join(QUANT_TYPES)}.",
            param="quant_type",
        )
    return ftype


def _require_gguf(path: Path) -> None:
    with path.open("rb") as file:
        magic = file.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise InvalidRequest(f"The model file {path.name} is not a GGUF file.", param="model")


_capture = threading.local()  # .errors: the list an active `_llama_errors` block collects into


@llama_cpp.llama_log_callback
def _log_and_capture(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    message = text.decode("utf-8", errors="replace").rstrip()
    if not message:
        return
    # The quantiser warns once per tensor that falls back to another type: debug level.
    _llama_log.log(logging.ERROR if level == _GGML_LOG_ERROR else logging.DEBUG, "%s", message)
    errors: list[str] | None = getattr(_capture, "errors", None)
    if errors is not None and level == _GGML_LOG_ERROR:
        errors.append(message)


@contextmanager
def _llama_errors() -> Iterator[list[str]]:
    """llama.cpp's error lines from this thread while the block runs, to explain a failure.

    llama.cpp's log callback is global: the one set before is put back afterwards.
    """
    previous, user_data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(previous), ctypes.byref(user_data))
    _capture.errors = errors = []
    llama_cpp.llama_log_set(_log_and_capture, ctypes.c_void_p(0))
    try:
        yield errors
    finally:
        llama_cpp.llama_log_set(previous, user_data)
        del _capture.errors


# -- perplexity --------------------------------------------------------------------------------


def perplexity(path: Path, text: str, *, n_ctx: int = 512, threads: int) -> PerplexityResult:
    """Perplexity of the model at `path` on `text`, computed as llama.cpp's `llama-perplexity`.

    The text is tokenised with the model's own special-token rule (a BOS only where the model
    asks for one), cut into non-overlapping windows of `n_ctx` tokens (a shorter tail is left
    out) and each window is evaluated from an empty cache. Only the second half of each window
    is scored, so every scored token has at least `n_ctx / 2` tokens of context; where the model
    uses a BOS, each window starts with one in place of its first token, as llama.cpp does.
    The result is exp(mean negative log-likelihood), computed in float64.
    """
    with _loaded(path) as model:
        windows = _windows(model, text, n_ctx)
        total, count = 0.0, 0
        with (
            _context(model, n_ctx=n_ctx, n_batch=n_ctx, threads=threads) as ctx,
            _batch(n_ctx) as batch,
        ):
            for window in windows:
                nll = _window_nll(ctx, batch, window, model.n_vocab)
                total += float(nll.sum())
                count += nll.size
    return PerplexityResult(perplexity=math.exp(total / count), tokens_scored=count, n_ctx=n_ctx)


def _windows(model: LlamaModel, text: str, n_ctx: int) -> list[list[int]]:
    if not MIN_PERPLEXITY_CTX <= n_ctx <= model.info.n_ctx_train:
        raise InvalidRequest(
            f"n_ctx must be between {MIN_PERPLEXITY_CTX} and the model's training context "
            f"{model.info.n_ctx_train}; got {n_ctx}.",
            param="n_ctx",
        )
    tokens = model.tokenize(text, add_special=True, parse_special=False)
    if len(tokens) < n_ctx:
        raise InvalidRequest(
            f"Perplexity needs at least one window of {n_ctx} tokens; the text has {len(tokens)}.",
            param="text",
        )
    windows = [tokens[start : start + n_ctx] for start in range(0, len(tokens) - n_ctx + 1, n_ctx)]
    if model.info.add_bos:
        bos = llama_cpp.llama_vocab_bos(model.vocab)
        for window in windows:
            window[0] = bos
    return windows


def _window_nll(
    ctx: llama_cpp.llama_context_p, batch: llama_cpp.llama_batch, window: list[int], n_vocab: int
) -> np.ndarray:
    """The negative log-likelihood of each token in the window's second half."""
    first = len(window) // 2  # logits at positions first .. n-2 predict tokens first+1 .. n-1
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    _decode(ctx, batch, window, start=0, outputs_from=first, outputs_to=len(window) - 1)
    logits = logits_view(ctx, len(window) - 1 - first, n_vocab).astype(np.float64)
    targets = np.asarray(window[first + 1 :])
    peak = logits.max(axis=1)
    log_sum = peak + np.log(np.exp(logits - peak[:, None]).sum(axis=1))
    return log_sum - logits[np.arange(targets.size), targets]


# -- generation speed --------------------------------------------------------------------------


def generation_speed(
    path: Path, *, prompt_tokens: int = 64, new_tokens: int = 32, threads: int
) -> SpeedResult:
    """Prompt and decode throughput of one sequence, decoding greedily.

    The prompt is the first `prompt_tokens` tokens of `DEFAULT_EVAL_TEXT`, evaluated in one
    batch; its last logits give the first token (`first_token_ms`). Then `new_tokens`
    single-token decode steps each give one more token (`generated_tokens_per_s`); end-of-text
    tokens do not stop it. One warm-up decode comes before the clock starts.
    """
    with _loaded(path) as model:
        prompt = _speed_prompt(model, prompt_tokens, new_tokens)
        n_ctx = prompt_tokens + new_tokens
        with (
            _context(model, n_ctx=n_ctx, n_batch=prompt_tokens, threads=threads) as ctx,
            _batch(prompt_tokens) as batch,
        ):
            _decode(ctx, batch, prompt[:1], start=0, outputs_from=0, outputs_to=1)  # warm-up
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
            started = time.perf_counter()
            _decode(ctx, batch, prompt, start=0, outputs_from=prompt_tokens - 1)
            token = _greedy(ctx, model.n_vocab)
            first_token = time.perf_counter()
            for step in range(new_tokens):
                _decode(ctx, batch, [token], start=prompt_tokens + step, outputs_from=0)
                token = _greedy(ctx, model.n_vocab)
            finished = time.perf_counter()
    return SpeedResult(
        prompt_tokens_per_s=prompt_tokens / (first_token - started),
        generated_tokens_per_s=new_tokens / (finished - first_token),
        first_token_ms=(first_token - started) * 1000.0,
    )


def _speed_prompt(model: LlamaModel, prompt_tokens: int, new_tokens: int) -> list[int]:
    if prompt_tokens < 1 or new_tokens < 1:
        raise InvalidRequest(
            f"prompt_tokens and new_tokens must be at least 1; got {prompt_tokens} and "
            f"{new_tokens}.",
            param="prompt_tokens" if prompt_tokens < 1 else "new_tokens",
        )
    if prompt_tokens + new_tokens > model.info.n_ctx_train:
        raise InvalidRequest(
            f"context is {model.info.n_ctx_train} tokens; prompt_tokens {prompt_tokens} + "
            f"new_tokens {new_tokens} do not fit.",
            param="prompt_tokens",
        )
    tokens = model.tokenize(DEFAULT_EVAL_TEXT, add_special=True, parse_special=False)
    while len(tokens) < prompt_tokens:
        tokens += model.tokenize(DEFAULT_EVAL_TEXT, add_special=False, parse_special=False)
    return tokens[:prompt_tokens]


def _greedy(ctx: llama_cpp.llama_context_p, n_vocab: int) -> int:
    return int(logits_view(ctx, 1, n_vocab)[0].argmax())


# -- llama.cpp resources -----------------------------------------------------------------------


@contextmanager
def _loaded(path: Path) -> Iterator[LlamaModel]:
    model = LlamaModel(path)
    try:
        yield model
    finally:
        model.close()


@contextmanager
def _context(
    model: LlamaModel, *, n_ctx: int, n_batch: int, threads: int
) -> Iterator[llama_cpp.llama_context_p]:
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = n_batch
    params.n_ubatch = n_batch
    params.n_seq_max = 1
    params.n_threads = threads
    params.n_threads_batch = threads
    params.no_perf = True
    ctx = llama_cpp.llama_init_from_model(model.handle, params)
    if not ctx:
        raise ServerError(f"llama.cpp could not create a context of {n_ctx} tokens.")
    try:
        yield ctx
    finally:
        llama_cpp.llama_free(ctx)


@contextmanager
def _batch(capacity: int) -> Iterator[llama_cpp.llama_batch]:
    batch = llama_cpp.llama_batch_init(capacity, 0, 1)
    try:
        yield batch
    finally:
        llama_cpp.llama_batch_free(batch)


def _decode(
    ctx: llama_cpp.llama_context_p,
    batch: llama_cpp.llama_batch,
    tokens: Sequence[int],
    *,
    start: int,
    outputs_from: int,
    outputs_to: int | None = None,
) -> None:
    """Decode `tokens` at positions `start`.. of sequence 0, with logits for batch entries
    `outputs_from` to `outputs_to` (exclusive; default: to the end)."""
    end = len(tokens) if outputs_to is None else outputs_to
    for i, token in enumerate(tokens):
        batch.token[i] = token
        batch.pos[i] = start + i
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = outputs_from <= i < end
    batch.n_tokens = len(tokens)
    status = llama_cpp.llama_decode(ctx, batch)
    if status != 0:
        raise ServerError(f"llama_decode failed with status {status} on {len(tokens)} tokens.")


# -- held-out text -----------------------------------------------------------------------------

# Written for this module: plain English prose about everyday things, about 1,600 tokens for
# SmolLM2 and Gemma 3 (three windows of 512). Wrapped here for reading; unwrapped below.
_EVAL_PROSE = """
The harbour wakes before the town does. Long before the first shop lifts its shutters, the boats
are already moving out past the breakwater, their engines low and steady, their lights swinging
gently with the swell. The men and women who work them have done this for years, and they talk very
little at that hour. They check the weather on their phones, glance at the sky anyway, and trust
the sky a little more. By the time the bakery on the corner opens its door, the boats are small
shapes on the grey line where the water meets the clouds, and the gulls have followed them out.

The bakery has its own early routine. Bread is mostly patience. Flour, water, salt and yeast are
cheap and simple, but the way they are combined and the time they are given decide whether a loaf
is dense and pale or light, open and full of flavour. The baker mixes the dough the evening before
and leaves it in a cool room overnight, where the yeast works slowly and the flour has time to
absorb the water. In the morning the dough is divided, shaped by hand and left to rise once more.
Only then does it go into the oven, which has been heating for an hour. Steam is added in the first
few minutes so that the crust stays soft long enough for the loaf to expand, and then the oven is
allowed to dry out so that the crust can brown and crack. A good baker can tell by the sound of a
tapped loaf whether it is done.

On the headland above the harbour stands a lighthouse that no longer needs a keeper. For more than
a century, though, someone lived in the small white house at its base, climbed the spiral stairs
every evening, and trimmed the wick of the lamp. The light itself was never very bright. What made
it visible from far out at sea was the lens, a tall cage of glass rings and prisms that gathered
the light from the flame and bent it into a narrow, horizontal beam. The whole lens turned slowly
on a bed of liquid, so that a ship saw a flash at regular intervals rather than a steady glow. Each
lighthouse along the coast had its own pattern of flashes, and a sailor with a printed list could
tell exactly which one he was looking at, and therefore where he was.

Today the lamp is electric and the lens is turned by a small motor. A technician visits a few times
a year to replace parts and to check the batteries that keep the light running when the power
fails. The keeper's house has become a small museum. Visitors can see the logbooks in which every
keeper recorded the weather, the ships that passed, and any unusual events of the night. Most
entries are short and repetitive: wind from the south west, light rain, visibility good, lamp lit
at sunset and put out at dawn. Read one after another, though, they describe a life of steady
attention, in which nothing much happened because someone made sure that nothing much would.

Inland from the coast, the land rises in gentle hills, and a river winds between them towards the
sea. Rivers shape the ground they cross more than most people realise. Over thousands of years, the
water carries away small pieces of rock and soil, deepening its channel and widening its valley.
Where the river runs fast, on steep ground, it cuts down and the valley is narrow. Where the ground
is flatter, the water slows, drops the sand and mud it was carrying, and begins to wander from side
to side in wide loops. After heavy rain the river may break through the neck of one of these loops
and take a shorter path, leaving behind a curved lake that slowly fills with reeds. Farmers have
always liked the flat land near rivers because the soil is rich, but they have also learned to
respect the floods that made it rich in the first place.

A gardener in one of the villages along the river keeps a notebook of her own, not unlike the
keepers' logbooks. She writes down when she plants each crop, when the first frost arrives, how
much rain falls in each month, and which varieties did well or badly. After twenty years the
notebook has become more useful to her than any book she could buy, because it describes her own
soil, her own weather and her own mistakes. She knows, for example, that beans planted before the
middle of May usually rot in the cold ground, and that the early potatoes need to be covered on
clear nights in April. She shares seeds with her neighbours and swaps advice over the fence, and
every autumn she compares her notes with theirs.

The village also has a small library, open three afternoons a week and run by volunteers. It holds
a few thousand books, arranged on wooden shelves according to a simple system of numbers and
letters that lets anyone find a book quickly once they understand the idea. Books about the natural
world sit together, books about history sit together, and novels are arranged by the name of the
author. The volunteers spend much of their time putting returned books back in the right place,
because a book on the wrong shelf is, for practical purposes, lost. Children come in after school
to do their homework at the long table by the window, and older residents come to read the
newspapers and to talk quietly with whoever happens to be there.

Once a month the library hosts an evening talk. Sometimes a local historian describes how the
village looked two hundred years ago, when most families kept a cow and a few chickens and the main
road was a muddy track. Sometimes a visiting scientist explains how the weather forecast is made:
how measurements of temperature, pressure and wind from thousands of stations are fed into a
computer model of the atmosphere, and how the model steps forward in time to estimate what the air
will do over the next few days. The audience always asks the same question at the end, which is why
the forecast is still sometimes wrong. The honest answer is that small errors in the starting
measurements grow as the model runs, so that a forecast for tomorrow is usually good, a forecast
for next week is a reasonable guess, and a forecast for next month is little better than the
average for the season.

There is a lesson in that answer that reaches beyond the weather. Many of the things we care about
can be measured, but every measurement has limits, and the limits matter as much as the numbers. A
scale in the kitchen is precise enough for baking and useless for weighing a letter. A thermometer
in the shade tells a different story from one in the sun. When we compare two things, we should
compare them in the same way, under the same conditions, and with the same care, or the comparison
will tell us more about our method than about the things themselves. The keepers knew this when
they wrote down the visibility every night in the same words, and the gardener knows it when she
measures the rain in the same old jar at the same corner of the garden.

In the evening the boats come back in. They tie up along the quay one after another, and the catch
is carried in boxes of ice to the market hall, where buyers from the restaurants and shops are
already waiting. Prices are agreed quickly, with a nod or a raised hand, and within an hour the
quay is quiet again. The lighthouse begins to flash on the headland, the last customers leave the
bakery with the loaves that did not sell in the morning, and the lights come on in the windows of
the houses along the river. Somewhere a notebook is opened and a line is added: dry day, light wind
from the west, first swallows seen over the water meadow.

Nobody in the village would call any of this remarkable. Yet the harbour, the bakery, the
lighthouse, the river, the garden and the library all depend on the same quiet habits: doing a
simple thing carefully, writing down what happened, and coming back the next day to do it again.
"""

DEFAULT_EVAL_TEXT = "\n\n".join(
    " ".join(paragraph.split()) for paragraph in _EVAL_PROSE.strip().split("\n\n")
)
