"""The continuous-batching LLM engine: one llama.cpp context, N sequence slots, one thread.

Each step builds one batch: first the next token of every decoding slot, then prompt chunks of
prefilling slots fill the rest of `n_batch`. One `llama_decode`, then every slot with an output
samples, detokenises and hands its events to the request's sink. A finished, cancelled or
failed request frees its slot and its KV cells before the next step, and waiting requests are
admitted, in the admission policy's order, as soon as a slot and enough KV cells are free.

Prefix cache (`prefix_cache.py`): a finished request's KV cells stay, under a sequence id of the
cache's own, for later prompts that start the same way; they decode only the rest. Entries give
way whenever running requests need their cells.

Speculation (`speculate.py`): a decoding slot may send, after its next token, guesses at the
tokens that follow, taken from its own earlier text; sampling checks them position by position
and keeps the accepted ones, so a step can give a slot several tokens. The engine sends a guess
only while its fitted step costs and the guesses' odds say it raises tokens per second.

Output layer (`head.py`): steps with several rows with logits may have theirs computed by ONNX
Runtime, where the model's head allows it and both heads agree at start.

Only the engine thread touches the context, the batch, the slots, the samplers, the prefix
cache and the speculation's statistics. Other threads talk to it through `submit` and
`cancel`, which take the lock and wake it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

import llama_cpp
import numpy as np

from aiaas.engines.llm.detokenize import TextStream
from aiaas.engines.llm.head import OutputHead, start_head
from aiaas.engines.llm.interrupt import ABORTED, StepInterrupt
from aiaas.engines.llm.model import LlamaModel
from aiaas.engines.llm.params import (
    STEP_SEQUENCE_BUCKETS,
    STEP_TOKEN_BUCKETS,
    Delta,
    EngineStats,
    Event,
    Failed,
    Final,
    FinishReason,
    SamplingParams,
    SizeTally,
    TokenLogprob,
)
from aiaas.engines.llm.prefix_cache import PrefixCache
from aiaas.engines.llm.sampler import SamplerChain, log_softmax, logits_view
from aiaas.engines.llm.speculate import GuessPlanner, SequenceGuesses
from aiaas.errors import ConfigurationError, RateLimited
from aiaas.scheduling.fair import AdmissionPolicy, FifoPolicy, Ticket

log = logging.getLogger("aiaas.engines.llm")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    n_slots: int = 16
    n_ctx: int = 16384  # KV cells shared by all slots (unified cache)
    context_length: int = 4096  # most tokens (prompt + completion) one request may use
    n_batch: int = 512  # tokens per decode step
    n_threads: int = 2
    max_waiting: int = 256  # queued requests before new ones get 429
    # Slots kept free for a tenant with nothing running while several tenants are active (seen
    # in the last `tenant_window_s`): its request starts at once instead of waiting for a busy
    # tenant's request to end. One tenant alone uses every slot.
    headroom_slots: int = 1
    tenant_window_s: float = 30.0
    # A request that takes the headroom may cut the running step short (it is sent again after
    # the newcomer's prompt), so its first token does not wait for a step of the others. At
    # most this share of the engine's time goes to steps cut short; 0 never cuts.
    preempt_budget: float = 0.05
    # Finished sequences kept in the KV cache for later prompts that start the same way (each
    # takes a sequence id; llama.cpp has 256 with the slots'); 0 keeps none. Prefixes shorter
    # than `prefix_cache_min_tokens` are not worth an entry.
    prefix_cache_entries: int = 32
    prefix_cache_min_tokens: int = 16
    # Most guesses one sequence sends with its next token (speculation); 0 sends none.
    draft_tokens: int = 4
    # "auto": the guesses that the measured step costs say pay; "always": every guess found
    # (where rows are cheap whatever their number, and to measure speculation itself).
    draft_policy: Literal["auto", "always"] = "auto"
    # Guesses bring a step's rows with logits to a multiple of this: llama.cpp's Q8_0 output
    # layer kernel (tinyBLAS) works on tiles of 4 columns and is far slower on the rest (2 cores,
    # Gemma 3: 7 rows 53 ms, 8 rows 38 ms). With the ONNX head (below) any count will do.
    row_tile: int = 4
    # Steps with at least `onnx_head_rows` rows with logits have their output layer computed by
    # ONNX Runtime where the model's is Q8_0 (engines/llm/head.py); one row stays with llama.cpp,
    # and so does every step with a row of a request that gave a `seed`.
    onnx_head: bool = True
    onnx_head_rows: int = 2


@dataclass(eq=False)
class GenerationRequest:
    """One sequence to generate; `sink` receives its events on the engine thread."""

    prompt: list[int]
    params: SamplingParams
    max_new_tokens: int
    sink: Callable[[Event], None]
    tenant: str = "-"
    weight: float = 1.0
    # A batch line: admitted only when no interactive request waits, and never into the
    # headroom slots (they stay free for interactive requests).
    background: bool = False
    cancelled: bool = False
    chain: SamplerChain | None = None  # built by `LlmEngine.request`, owned by the slot

    @property
    def reserved_cells(self) -> int:
        return len(self.prompt) + self.max_new_tokens

    def release(self) -> None:
        if self.chain is not None:
            self.chain.close()
            self.chain = None


class SlotState(StrEnum):
    IDLE = "idle"
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(eq=False)
class Slot:
    seq_id: int
    state: SlotState = SlotState.IDLE
    request: GenerationRequest | None = None
    n_past: int = 0  # tokens of this sequence in the KV cache
    last_token: int = -1  # sampled, not yet decoded
    tokens: list[int] = field(default_factory=list)  # sampled so far, in order
    cached: int = 0  # prompt tokens taken from the prefix cache
    text: TextStream | None = None
    chain: SamplerChain | None = None
    # Admitted into headroom: its prompt is decoded in a step of its own, ahead of the batch,
    # so its first token does not wait for everyone else's next token.
    urgent: bool = False
    guesses: SequenceGuesses | None = None  # its drafter and record; None: no speculation


@dataclass(frozen=True, slots=True)
class _Output:
    """A slot's rows with logits in a step: its next token's, then its guesses'."""

    slot: Slot
    row: int  # of the step's logits
    index: int  # in the batch
    pos: int  # the position of the token whose logits are in `row`
    guesses: tuple[int, ...] = ()
    ngram: int = 0  # the length of the n-gram that found the guesses


@dataclass
class _Counters:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    headroom_admissions: int = 0  # requests that started in a slot kept free for them
    preemptions: int = 0  # steps cut short for a request taking the headroom
    cached_prompt_tokens: int = 0  # prompt tokens not decoded thanks to the prefix cache
    draft_tokens: int = 0  # guesses sent with a slot's next token
    accepted_draft_tokens: int = 0  # guesses that sampling confirmed
    onnx_head_steps: int = 0  # steps whose output layer ONNX Runtime computed
    step_sequences: SizeTally = field(default_factory=lambda: SizeTally(STEP_SEQUENCE_BUCKETS))
    step_tokens: SizeTally = field(default_factory=lambda: SizeTally(STEP_TOKEN_BUCKETS))
    admissions: deque[str] = field(default_factory=lambda: deque(maxlen=4096))


class LlmEngine:
    def __init__(
        self,
        model: LlamaModel,
        config: EngineConfig,
        *,
        name: str,
        policy: AdmissionPolicy[GenerationRequest] | None = None,
    ) -> None:
        self.model = model
        self.config = config
        self.name = name
        self.context_length = min(config.context_length, config.n_ctx, model.info.n_ctx_train)
        self._policy: AdmissionPolicy[GenerationRequest] = (
            policy if policy is not None else FifoPolicy()
        )
        self._cond = threading.Condition()
        self._slots = [Slot(seq_id=i) for i in range(config.n_slots)]
        self._reserved = 0
        self._headroom = max(0, min(config.headroom_slots, config.n_slots - 1))
        self._interrupt = StepInterrupt(budget=config.preempt_budget if self._headroom else 0.0)
        self._running: Counter[str] = Counter()  # tenant -> slots it holds
        self._seen: dict[str, float] = {}  # tenant -> when it last submitted (monotonic)
        self._stopping = False
        self._counters = _Counters()
        self._thread: threading.Thread | None = None
        self._ctx: llama_cpp.llama_context_p | None = None
        self._batch: llama_cpp.llama_batch | None = None
        # Sliding-window layers may overwrite a cell once its sequence is a window past it, so
        # an entry holds less than a window; models without such layers keep whole sequences.
        n_swa = llama_cpp.llama_model_n_swa(model.handle)
        self._prefixes = PrefixCache(
            first_seq_id=config.n_slots,
            entries=config.prefix_cache_entries,
            min_tokens=config.prefix_cache_min_tokens,
            max_tokens=n_swa - 1 if n_swa > 0 else self.context_length,
            n_ctx=config.n_ctx,
        )
        # Guesses need their KV positions dropped when wrong: recurrent state cannot go back.
        self._planner = GuessPlanner(
            enabled=not (
                llama_cpp.llama_model_is_recurrent(model.handle)
                or llama_cpp.llama_model_is_hybrid(model.handle)
            ),
            draft_tokens=config.draft_tokens,
            policy=config.draft_policy,
            tile=config.row_tile,
        )
        self._head: OutputHead | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._batch = llama_cpp.llama_batch_init(self.config.n_batch, 0, 1)
        self._head = start_head(
            self.model,
            self._open_context,
            self._batch,
            wanted=self.config.onnx_head,
            n_batch=self.config.n_batch,
            threads=self.config.n_threads,
            name=self.name,
        )
        if self._head is not None:
            self._planner.tile = 1  # the 4-row tiles were the quantized head's
        else:
            self._warm_up()
        self._thread = threading.Thread(target=self._run, name=f"llm-{self.name}", daemon=True)
        self._thread.start()

    def _warm_up(self) -> None:
        """Decode one token and forget it: every weight and compute buffer is touched once, so
        the first request does not pay for it and the memory a model holds can be measured
        right after `start` (the ONNX head's agreement check does this where there is a head)."""
        assert self._ctx is not None and self._batch is not None
        token = llama_cpp.llama_vocab_bos(self.model.vocab)
        self._batch.token[0] = token if self.model.valid_token(token) else 0
        self._batch.pos[0] = 0
        self._batch.n_seq_id[0] = 1
        self._batch.seq_id[0][0] = 0
        self._batch.logits[0] = True
        self._batch.n_tokens = 1
        llama_cpp.llama_decode(self._ctx, self._batch)
        llama_cpp.llama_memory_clear(self._memory, True)

    def _open_context(self, head: OutputHead | None) -> llama_cpp.llama_context_p:
        """(Re)open the context, with `head`'s tap on the graph where there is a head."""
        if self._ctx is not None:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.config.n_ctx
        params.n_batch = self.config.n_batch
        params.n_ubatch = self.config.n_batch  # one ubatch a step: one tap of the hidden state
        params.n_seq_max = self.config.n_slots + self._prefixes.capacity
        params.n_threads = self.config.n_threads
        params.n_threads_batch = self.config.n_threads
        params.kv_unified = True
        params.no_perf = True
        if head is not None:
            params.cb_eval = head.tap.callback
        self._ctx = llama_cpp.llama_init_from_model(self.model.handle, params)
        if not self._ctx:
            raise ConfigurationError(f"llama.cpp could not create a context for {self.name}")
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._prefixes.attach(self._memory)
        self._interrupt.install(self._ctx)
        return self._ctx

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for slot in self._slots:
            if slot.request is not None:
                self._finish(slot, Failed("The engine is shutting down."))
        with self._cond:
            while len(self._policy):
                waiting = self._policy.pop().item
                waiting.release()
                waiting.sink(Failed("The engine is shutting down."))
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None

    # -- the public doors ----------------------------------------------------------------------

    def request(
        self,
        prompt: list[int],
        params: SamplingParams,
        *,
        max_new_tokens: int,
        sink: Callable[[Event], None],
        tenant: str = "-",
        weight: float = 1.0,
        background: bool = False,
    ) -> GenerationRequest:
        """A request ready to submit; its sampler is built here, in the caller's thread, so a
        bad grammar or bias is a 400 before anything streams."""
        chain = (
            SamplerChain(self.model.vocab, self.model.n_vocab, params)
            if params.needs_sampler_chain
            else None
        )
        return GenerationRequest(
            prompt=prompt,
            params=params,
            max_new_tokens=max_new_tokens,
            sink=sink,
            tenant=tenant,
            weight=weight,
            background=background,
            chain=chain,
        )

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request; 429 when the waiting line is full."""
        with self._cond:
            waiting = self._waiting(background=request.background)
            if waiting >= self.config.max_waiting:
                raise RateLimited(
                    f"Model {self.name} has {waiting} requests waiting; try again soon.",
                    retry_after=1,
                )
            if not request.background:  # the headroom is kept for interactive tenants only
                self._seen[request.tenant] = time.monotonic()
            self._policy.push(
                Ticket(
                    item=request,
                    tenant=request.tenant,
                    weight=request.weight,
                    cost=float(request.reserved_cells),
                    background=request.background,
                )
            )
            # A tenant with nothing running, with the headroom free for it: its request need
            # not wait for the step now running to end.
            if (
                self._headroom
                and not request.background
                and not self._running[request.tenant]
                and 0 < self._free_slots() <= self._headroom
            ):
                self._interrupt.request()
            self._cond.notify()

    def _waiting(self, *, background: bool) -> int:
        """Requests waiting in one class (lock held): a batch filling its line never makes an
        interactive request a 429."""
        waiting = getattr(self._policy, "waiting", None)
        return waiting(background=background) if waiting else len(self._policy)

    def cancel(self, request: GenerationRequest) -> None:
        """Stop a request: a waiting one leaves the line, a running one frees its slot next step."""
        request.cancelled = True
        with self._cond:
            if self._policy.remove(request):
                request.release()
            self._cond.notify()

    def stats(self) -> EngineStats:
        with self._cond:
            return EngineStats(
                slots=len(self._slots),
                busy_slots=sum(1 for s in self._slots if s.request is not None),
                waiting=len(self._policy),
                reserved_cells=self._reserved,
                prompt_tokens=self._counters.prompt_tokens,
                generated_tokens=self._counters.generated_tokens,
                steps=self._counters.steps,
                headroom_admissions=self._counters.headroom_admissions,
                preemptions=self._counters.preemptions,
                cached_prompt_tokens=self._counters.cached_prompt_tokens,
                prefix_cache_entries=self._prefixes.entries,
                prefix_cache_cells=self._prefixes.cells,
                draft_tokens=self._counters.draft_tokens,
                accepted_draft_tokens=self._counters.accepted_draft_tokens,
                onnx_head_steps=self._counters.onnx_head_steps,
                step_sequences=self._counters.step_sequences.snapshot(),
                step_tokens=self._counters.step_tokens.snapshot(),
            )

    def withdraw(self, request: GenerationRequest, message: str) -> bool:
        """Take a request that has not started out of the line, failing it with `message`;
        False when it already runs (or ended): a started request is left to finish."""
        with self._cond:
            if not self._policy.remove(request):
                return False
            request.release()
            self._cond.notify()
        request.sink(Failed(message))
        return True

    def idle(self) -> bool:
        """No request running or waiting: the engine may be closed without cutting one."""
        with self._cond:
            return not len(self._policy) and all(s.request is None for s in self._slots)

    def admission_order(self) -> list[str]:
        """Tenants in the order the engine admitted their requests (most recent 4096)."""
        with self._cond:
            return list(self._counters.admissions)

    # -- the engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not len(self._policy) and not self._any_busy():
                    self._cond.wait()
                if self._stopping:
                    return
                self._admit()
            try:
                self._drop_cancelled()
                urgent = next((s for s in self._slots if s.urgent), None)
                if urgent is not None:
                    urgent.urgent = False
                    if urgent.state is SlotState.PREFILL:
                        self._step(only=urgent)
                if self._any_busy():
                    self._interrupt.arm()
                    cut = False
                    try:
                        cut = self._step()
                    finally:
                        self._interrupt.disarm(cut=cut)
                    self._counters.preemptions += cut
            except Exception:  # the thread's top level: a bug must not hang its clients
                log.exception("engine %s: step failed", self.name)
                self._fail_all("internal engine error")

    def _any_busy(self) -> bool:
        return any(slot.request is not None for slot in self._slots)

    def _admit(self) -> None:
        """Fill free slots from the policy while the next request's KV reservation fits.

        The last `headroom` free slots are kept for tenants with nothing running, while one
        such tenant has been active lately: a busy tenant then waits for its own requests to
        end rather than take the slot a newcomer would otherwise wait a whole request for. When
        every recent tenant has a request running, nobody is kept waiting and no slot is held.
        Background requests (batch lines) never take the headroom: the policy hands them out
        only when no interactive request waits, and one arriving then finds its slot free."""
        for slot in [slot for slot in self._slots if slot.request is None]:
            ticket = self._policy.peek()
            if ticket is None:
                return
            headroom = self._headroom > 0 and self._free_slots() <= self._headroom
            if headroom and ticket.background:
                return  # the policy holds no interactive request: keep the headroom for one
            if headroom and self._running[ticket.tenant]:
                if not self._idle_tenant_besides(ticket.tenant):
                    headroom = False  # nobody to keep it for
                else:
                    ticket = self._policy.first(
                        lambda t: not t.background and not self._running[t.tenant]
                    )
                    if ticket is None:
                        return  # keep the headroom for the idle tenant's next request
            if self._reserved + ticket.item.reserved_cells > self.config.n_ctx:
                return  # keep the policy's order: wait for cells rather than skip ahead
            # (cached prefixes never make a request wait: they give way below)
            if ticket is self._policy.peek():
                self._policy.pop()
            else:
                self._policy.remove(ticket.item)
            request = ticket.item
            chain, request.chain = request.chain, None
            llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
            slot.request, slot.state, slot.tokens = request, SlotState.PREFILL, []
            slot.text, slot.chain = TextStream(request.params.stop), chain
            slot.guesses = self._planner.sequence(request.prompt)
            slot.cached = slot.n_past = self._prefixes.reuse(slot.seq_id, request.prompt)
            self._reserved += request.reserved_cells
            self._prefixes.evict_until(self.config.n_ctx - self._reserved)
            self._running[request.tenant] += 1
            slot.urgent = headroom
            self._counters.admissions.append(request.tenant)
            self._counters.headroom_admissions += headroom

    def _free_slots(self) -> int:
        return sum(1 for slot in self._slots if slot.request is None)

    def _idle_tenant_besides(self, tenant: str) -> bool:
        """Whether another tenant, active in the last `tenant_window_s`, has nothing running
        (lock held)."""
        horizon = time.monotonic() - self.config.tenant_window_s
        for seen in [t for t, at in self._seen.items() if at < horizon and not self._running[t]]:
            del self._seen[seen]
        return any(t != tenant and not self._running[t] for t in self._seen)

    def _drop_cancelled(self) -> None:
        for slot in self._slots:
            if slot.request is not None and slot.request.cancelled:
                self._finish(slot, None)

    def _step(self, only: Slot | None = None) -> bool:
        """One llama_decode: every decoding slot's next token and its guesses, then prompt
        chunks; `only`: just that slot's prompt chunk. True when the step was cut short:
        llama.cpp dropped its positions from the KV cache and the slots are as they were, to be
        sent again."""
        batch = self._batch
        assert batch is not None and self._ctx is not None
        before = [(slot, slot.n_past) for slot in self._slots]
        decoding = [s for s in self._slots if s.state is SlotState.DECODE] if only is None else []
        prefilling = (
            [only] if only is not None else [s for s in self._slots if s.state is SlotState.PREFILL]
        )
        guesses = self._guesses(decoding, prefilling)
        outputs: list[_Output] = []
        n = rows = 0
        for owner, slot in enumerate(decoding):
            ngram, guessed = guesses.get(owner, (0, ()))
            outputs.append(_Output(slot, rows, n, slot.n_past, guessed, ngram))
            for depth, token in enumerate((slot.last_token, *guessed)):
                self._put(batch, n, token, slot.n_past + depth, slot.seq_id, True)
                n += 1
                rows += 1
            slot.n_past += 1
        for slot in prefilling:
            if n >= self.config.n_batch:
                break
            request = slot.request
            assert request is not None
            chunk = request.prompt[slot.n_past : slot.n_past + self.config.n_batch - n]
            for token in chunk:
                slot.n_past += 1
                last = slot.n_past == len(request.prompt)
                self._put(batch, n, token, slot.n_past - 1, slot.seq_id, last)
                if last:
                    outputs.append(_Output(slot, rows, n, slot.n_past - 1))
                    rows += 1
                n += 1
        batch.n_tokens = n
        head = self._head if rows >= self.config.onnx_head_rows else None
        if head is not None and any(_seeded(out.slot) for out in outputs):
            # A seeded request's draws should repeat however its steps are batched (guesses
            # included): its logits always come from llama.cpp's head, since the two heads
            # differ by more than llama.cpp's own kernels for one row and for several do.
            head = None
        if self._head is not None:
            self._head.tap.cut = head is not None
            self._head.tap.rows = None  # never a previous step's
        started = time.perf_counter()
        status = llama_cpp.llama_decode(self._ctx, batch)
        if status == ABORTED:
            for slot, n_past in before:
                slot.n_past = n_past
            return True
        self._counters.steps += 1
        self._counters.step_sequences.observe(sum(s.n_past != p for s, p in before))
        self._counters.step_tokens.observe(n)
        if status != 0:
            self._fail_all(f"llama_decode failed with status {status}")
            return False
        if head is not None:
            hidden = head.tap.rows
            if hidden is None or hidden.shape[0] != rows:
                self._fail_all("the output layer's input was not where the engine expected it")
                return False
            # into llama.cpp's own logits buffer: everything downstream reads it as usual
            head.compute(hidden, logits_view(self._ctx, rows, self.model.n_vocab))
            self._counters.onnx_head_steps += 1
        self._planner.observe(rows, n - rows, time.perf_counter() - started)
        self._sample(outputs, rows)
        return False

    def _guesses(
        self, decoding: list[Slot], prefilling: list[Slot]
    ) -> dict[int, tuple[int, tuple[int, ...]]]:
        """Index in `decoding` -> (n-gram length, guesses) for the slots that send some."""
        if not self._planner.enabled or not decoding:
            return {}
        sequences: list[tuple[SequenceGuesses, int]] = []
        for slot in decoding:
            assert slot.request is not None and slot.guesses is not None
            sequences.append((slot.guesses, slot.request.max_new_tokens - len(slot.tokens)))
        prompts_left: list[int] = []
        for slot in prefilling:
            assert slot.request is not None
            prompts_left.append(len(slot.request.prompt) - slot.n_past)
        return self._planner.plan(sequences, prompts_left, n_batch=self.config.n_batch)

    @staticmethod
    def _put(
        batch: llama_cpp.llama_batch, i: int, token: int, pos: int, seq: int, out: bool
    ) -> None:
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = out

    def _sample(self, outputs: list[_Output], rows: int) -> None:
        """Sample each output's rows in order, exactly as if decoded one step at a time: a
        guess is kept while the token sampled before it equals it; the KV positions of the
        guesses after the first miss are dropped."""
        if not outputs:
            return
        logits = logits_view(self._ctx, rows, self.model.n_vocab)
        for out in outputs:
            slot = out.slot
            if slot.state is SlotState.PREFILL:
                self._counters.prompt_tokens += slot.n_past
                self._counters.cached_prompt_tokens += slot.cached
                slot.state = SlotState.DECODE
            accepted = 0
            while True:
                row = out.row + accepted
                if slot.chain is not None:
                    token = slot.chain.sample(self._ctx, out.index + accepted)
                else:
                    token = int(logits[row].argmax())
                slot.n_past = out.pos + accepted + 1  # this row's input token is in the KV cache
                self._accept(slot, token, logits[row])
                if slot.request is None or accepted == len(out.guesses):
                    tried = accepted
                    break
                if token != out.guesses[accepted]:
                    tried = accepted + 1
                    break
                accepted += 1
            if out.guesses:
                self._settle_guesses(out, accepted, tried)

    def _settle_guesses(self, out: _Output, accepted: int, tried: int) -> None:
        """Drop the KV positions of the guesses after the first miss; count them."""
        slot = out.slot
        assert slot.guesses is not None
        if slot.request is not None and accepted < len(out.guesses):
            llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, out.pos + accepted + 1, -1)
        self._planner.settle(slot.guesses, out.ngram, accepted, tried)
        self._counters.draft_tokens += len(out.guesses)
        self._counters.accepted_draft_tokens += accepted

    def _accept(self, slot: Slot, token: int, logits_row: np.ndarray) -> None:
        request, text = slot.request, slot.text
        assert request is not None and text is not None
        slot.tokens.append(token)
        if slot.guesses is not None:
            self._planner.see(slot.guesses, token)
        self._counters.generated_tokens += 1
        logprobs = self._logprobs(token, logits_row, request.params.logprobs)
        if self.model.is_eog(token):
            self._finish(slot, self._final(slot, FinishReason.STOP, text.flush(), logprobs))
            return
        released = text.push(self.model.piece(token))
        if released.stopped:
            self._finish(slot, self._final(slot, FinishReason.STOP, released.text, logprobs))
            return
        if len(slot.tokens) >= request.max_new_tokens:
            tail = released.text + text.flush()
            self._finish(slot, self._final(slot, FinishReason.LENGTH, tail, logprobs))
            return
        if released.text or logprobs:
            request.sink(Delta(released.text, logprobs))
        slot.last_token = token

    def _final(
        self, slot: Slot, reason: FinishReason, text: str, logprobs: tuple[TokenLogprob, ...]
    ) -> Final:
        assert slot.request is not None
        return Final(
            finish_reason=reason,
            prompt_tokens=len(slot.request.prompt),
            cached_tokens=slot.cached,
            completion_tokens=len(slot.tokens),
            text=text,
            logprobs=logprobs,
        )

    def _logprobs(self, token: int, row: np.ndarray, top: int | None) -> tuple[TokenLogprob, ...]:
        if top is None:
            return ()
        scores = log_softmax(row.astype(np.float64))
        best: list[tuple[str, bytes, float]] = []
        if top > 0:
            ids = np.argpartition(-scores, top)[:top]
            for t in sorted(ids.tolist(), key=lambda i: -scores[i]):
                piece = self.model.piece(t)
                best.append((piece.decode("utf-8", errors="replace"), piece, float(scores[t])))
        piece = self.model.piece(token)
        text = piece.decode("utf-8", errors="replace")
        return (TokenLogprob(text, piece, float(scores[token]), tuple(best)),)

    def _finish(self, slot: Slot, event: Event | None) -> None:
        """Free the slot and its KV cells; deliver the last event unless the client is gone."""
        request = slot.request
        if request is None:
            return
        if slot.chain is not None:
            slot.chain.close()
        with self._cond:
            self._reserved -= request.reserved_cells
            if isinstance(event, Final) and slot.state is SlotState.DECODE:
                decoded = request.prompt + slot.tokens[: slot.n_past - len(request.prompt)]
                self._prefixes.remember(slot.seq_id, decoded, reserved=self._reserved)
            llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
            self._running[request.tenant] -= 1
            if not self._running[request.tenant]:
                del self._running[request.tenant]
            slot.request, slot.state, slot.chain, slot.text = None, SlotState.IDLE, None, None
            slot.n_past = slot.cached = 0
            slot.tokens = []
        # Delivered once the slot is free: a client's next request finds it so.
        if event is not None and not request.cancelled:
            request.sink(event)

    def _fail_all(self, message: str) -> None:
        running = sum(1 for slot in self._slots if slot.request is not None)
        log.error("engine %s: %s; failing its %d running requests", self.name, message, running)
        for slot in self._slots:
            self._finish(slot, Failed(message))


def _seeded(slot: Slot) -> bool:
    return slot.request is not None and slot.request.params.seed is not None
