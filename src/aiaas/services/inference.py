"""LLM inference use cases: turn a chat or completion request into engine requests.

A request's sampling parameters (and the grammar a `response_format` asks for) are built here
from the wire request. Preparation (template rendering, tokenising, limit checks, sampler
construction) is CPU work and runs in a worker thread; the event loop only awaits the events the
engine thread hands over. `services/serving.py` turns those events into responses.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from aiaas.domain import Grant, Principal
from aiaas.engines.llm.engine import GenerationRequest, LlmEngine
from aiaas.engines.llm.grammar import grammar_for_json_schema, json_object_grammar
from aiaas.engines.llm.params import Delta, Event, Failed, Final, SamplingParams
from aiaas.engines.llm.residency import LlmLease, LoadedLlm
from aiaas.engines.pool import ModelPool
from aiaas.errors import (
    ContextLengthExceeded,
    InvalidRequest,
    ModelNotFound,
    PermissionDenied,
    ServerError,
)
from aiaas.observability.metrics import Metrics
from aiaas.protocol.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    Model,
    ModelResidency,
    ResponseFormat,
    SamplingRequest,
)
from aiaas.services.llm_models import LlmModels, ResolvedLlm
from aiaas.services.metering import MeteredCall, Metering


@dataclass(frozen=True, slots=True)
class PreparedPrompt:
    tokens: list[int]
    text: str  # for echo


@dataclass(eq=False)  # by identity: held in weak sets per grant
class Generations:
    """The n engine requests behind one API request, and their merged event stream."""

    engine: LlmEngine
    model_id: str
    org: str
    prompts: list[PreparedPrompt]
    n: int
    metrics: Metrics
    grant_id: str | None = None  # the `use` grant a shared model is called through
    requests: list[GenerationRequest] = field(default_factory=list)
    queue: asyncio.Queue[tuple[int, Event]] = field(default_factory=asyncio.Queue)
    started: float = field(default_factory=time.perf_counter)
    cached_tokens: int = 0  # prompt tokens the prefix cache supplied, over every choice
    withdrawn: bool = False  # its grant was revoked before it started
    _first_token_seen: bool = False
    _open: int = 0

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p.tokens) for p in self.prompts)

    async def events(self) -> AsyncIterator[tuple[int, Delta | Final]]:
        """(choice index, event) until every choice has finished; a failure raises."""
        self._open = len(self.requests)
        try:
            while self._open:
                index, event = await self.queue.get()
                if isinstance(event, Failed):
                    if self.withdrawn:  # as if the model had never been shared
                        raise ModelNotFound(
                            f"The model '{self.model_id}' does not exist.", param="model"
                        )
                    raise ServerError(f"Generation failed: {event.message}")
                if not self._first_token_seen and (isinstance(event, Final) or event.text):
                    self._first_token_seen = True
                    self.metrics.llm_ttft.labels(model=self.model_id, org=self.org).observe(
                        time.perf_counter() - self.started
                    )
                if isinstance(event, Final):
                    self._open -= 1
                    self.cached_tokens += event.cached_tokens
                    self._record(event)
                yield index, event
        finally:
            self.cancel()

    def _record(self, final: Final) -> None:
        tokens = self.metrics.llm_tokens
        tokens.labels(model=self.model_id, org=self.org, kind="completion").inc(
            final.completion_tokens
        )

    def cancel(self) -> None:
        """Free every unfinished request's slot (client gone, or an error)."""
        for request in self.requests:
            self.engine.cancel(request)

    def withdraw(self) -> None:
        """Its grant was revoked: the requests that have not started fail (404); those that
        run already are left to finish."""
        self.withdrawn = True
        for request in self.requests:
            self.engine.withdraw(request, "The grant this request was made through was revoked.")


class InferenceService:
    def __init__(
        self, pool: ModelPool, models: LlmModels, metering: Metering, metrics: Metrics
    ) -> None:
        self._pool = pool
        self._models = models
        self._metering = metering
        self._metrics = metrics
        self._mailboxes: dict[asyncio.AbstractEventLoop, Mailbox] = {}
        # grant id -> generations running or queued through it (weak: finished ones go)
        self._through: dict[str, weakref.WeakSet[Generations]] = {}
        self._through_lock = threading.Lock()

    def _mailbox(self, loop: asyncio.AbstractEventLoop) -> Mailbox:
        mailbox = self._mailboxes.get(loop)
        if mailbox is None:
            mailbox = self._mailboxes[loop] = Mailbox(loop)
        return mailbox

    def models(self) -> list[Model]:
        """The models served to everyone: configured LLMs (loaded or not) and embedders."""
        loaded = {m.key: m.created for m in self._pool.llms()}
        llms = [
            Model(
                id=spec.id, created=loaded.get(spec.id, spec.created or 0), owned_by=spec.owned_by
            )
            for spec in self._pool.configured_llms()
        ]
        embedders = [
            Model(id=m.id, created=m.created, owned_by=m.owned_by) for m in self._pool.embedders()
        ]
        return [*llms, *embedders]

    def model(self, model_id: str) -> Model:
        for known in self.models():
            if known.id == model_id:
                return known
        raise ModelNotFound(f"The model '{model_id}' does not exist.", param="model")

    async def _acquire(self, call: MeteredCall, model: str) -> LlmLease:
        """A lease on the model `model` names for the caller, loaded (the wait for a load is
        the request's); a shared model's grant caps are checked first."""
        resolved: ResolvedLlm | None = self._models.configured(model)
        if resolved is None:
            resolved = await asyncio.to_thread(self._models.resolve, call.principal, model)
        if resolved.grant is not None:
            await self._metering.through(call, resolved.grant)
        return await self._pool.acquire_llm(resolved.spec)

    async def load(self, principal: Principal, model: str) -> ModelResidency:
        """Load a language model the caller may use, ahead of its traffic."""
        resolved = await asyncio.to_thread(self._models.resolve, principal, model)
        lease = await self._pool.acquire_llm(resolved.spec)
        lease.release()
        return _residency(lease.llm)

    async def unload(self, principal: Principal, model: str) -> ModelResidency:
        """Unload a language model now (409 while it serves requests). A configured model is
        everyone's: only a platform admin unloads it; a registered one, its owner's admins."""
        resolved = await asyncio.to_thread(self._models.resolve, principal, model)
        spec = resolved.spec
        configured = self._models.configured(model) is not None
        if (configured or resolved.grant is not None) and not principal.is_platform_admin:
            whose = "every organisation's" if configured else "another organisation's"
            raise PermissionDenied(
                f"The model '{model}' is {whose}: only "
                f"{'a platform admin' if configured else 'its owner'} may unload it."
            )
        await asyncio.to_thread(self._pool.residency.unload, spec.id)
        return ModelResidency(id=spec.served_as, loaded=False, pinned=spec.pinned)

    async def chat(self, call: MeteredCall, request: ChatCompletionRequest) -> Generations:
        started = time.perf_counter()  # the first token's time includes a model's load
        lease = await self._acquire(call, request.model)
        try:
            loaded = lease.llm
            if loaded.template is None:
                raise InvalidRequest(
                    f"The model '{loaded.id}' is a base model with no chat template: use "
                    "/v1/completions, or register the model with a chat template.",
                    param="model",
                    code="model_not_chat",
                )
            template = loaded.template

            def prepare() -> tuple[SamplingParams, PreparedPrompt]:
                params = chat_sampling(request)  # a JSON schema's grammar is CPU work too
                text = template.render(request.chat_messages(), add_generation_prompt=True)
                info = loaded.model.info
                add_bos = info.add_bos and not (info.bos_text and text.startswith(info.bos_text))
                return params, PreparedPrompt(
                    loaded.model.tokenize(text, add_special=add_bos), text
                )

            params, prompt = await asyncio.to_thread(prepare)
            return await self._start(call, loaded, [prompt], params, request.n, "messages", started)
        finally:
            lease.release()  # submitted: the engine's queue keeps the model busy from here

    async def complete(self, call: MeteredCall, request: CompletionRequest) -> Generations:
        started = time.perf_counter()
        lease = await self._acquire(call, request.model)
        try:
            loaded = lease.llm

            def prepare() -> tuple[SamplingParams, list[PreparedPrompt]]:
                params = completion_sampling(request)
                return params, [self._completion_prompt(loaded, p) for p in request.prompts()]

            params, prompts = await asyncio.to_thread(prepare)
            return await self._start(call, loaded, prompts, params, request.n, "prompt", started)
        finally:
            lease.release()

    @staticmethod
    def _completion_prompt(loaded: LoadedLlm, prompt: str | list[int]) -> PreparedPrompt:
        model = loaded.model
        if isinstance(prompt, str):
            tokens = model.tokenize(prompt, add_special=model.info.add_bos)
            return PreparedPrompt(tokens, prompt)
        bad = [t for t in prompt if not model.valid_token(t)]
        if bad:
            raise InvalidRequest(
                f"Token id {bad[0]} is outside the vocabulary (0..{model.n_vocab - 1}).",
                param="prompt",
            )
        text = b"".join(model.piece(t) for t in prompt).decode("utf-8", errors="replace")
        return PreparedPrompt(list(prompt), text)

    async def _start(
        self,
        call: MeteredCall,
        loaded: LoadedLlm,
        prompts: list[PreparedPrompt],
        params: SamplingParams,
        n: int,
        prompt_param: str,
        started: float,
    ) -> Generations:
        engine = loaded.engine
        limit = engine.context_length
        for token in params.logit_bias:
            if not loaded.model.valid_token(token):
                raise InvalidRequest(
                    f"logit_bias names token {token}, outside the vocabulary "
                    f"(0..{loaded.model.n_vocab - 1}).",
                    param="logit_bias",
                )
        plans = []
        for prompt in prompts:
            if not prompt.tokens:
                raise InvalidRequest("The prompt is empty.", param=prompt_param)
            max_new = (
                params.max_tokens if params.max_tokens is not None else limit - len(prompt.tokens)
            )
            if len(prompt.tokens) + max(max_new, 1) > limit:
                raise ContextLengthExceeded(
                    f"This model's maximum context length is {limit} tokens. However, you "
                    f"requested {len(prompt.tokens) + max(max_new, 0)} tokens "
                    f"({len(prompt.tokens)} in the {prompt_param}, {max(max_new, 0)} in the "
                    "completion). Please reduce the length of the prompt or the completion.",
                    param=prompt_param,
                )
            plans.append((prompt, max_new))
        principal = call.principal
        org = principal.org_id or "platform"
        gens = Generations(
            engine=engine,
            model_id=loaded.id,
            org=org,
            prompts=prompts,
            n=n,
            metrics=self._metrics,
            started=started,
            grant_id=call.grant.id if call.grant is not None else None,
        )
        mailbox = self._mailbox(asyncio.get_running_loop())

        def prepare() -> list[GenerationRequest]:
            built = []
            for p_index, (prompt, max_new) in enumerate(plans):
                for j in range(n):
                    index = p_index * n + j
                    seeded = params
                    if params.seed is not None and j:
                        # n choices with one seed must still differ from each other.
                        seeded = dataclasses.replace(params, seed=params.seed + j)
                    built.append(
                        engine.request(
                            prompt.tokens,
                            seeded,
                            max_new_tokens=max_new,
                            sink=mailbox.sink(gens.queue, index),
                            # A batch's lines are a tenant of their own: the org's interactive
                            # requests are then "quiet" and find the headroom kept for them.
                            tenant=f"{org}#batch" if call.background else org,
                            weight=principal.weight,
                            background=call.background,
                        )
                    )
            return built

        gens.requests = await asyncio.to_thread(prepare)
        self._metrics.llm_tokens.labels(model=loaded.id, org=org, kind="prompt").inc(
            gens.prompt_tokens
        )
        try:
            for request in gens.requests:
                engine.submit(request)
        except BaseException:
            gens.cancel()
            for request in gens.requests:
                request.release()
            raise
        if gens.grant_id is not None:
            with self._through_lock:
                self._through.setdefault(gens.grant_id, weakref.WeakSet()).add(gens)
        return gens

    def withdraw_grant(self, grant: Grant) -> None:
        """A grant was revoked: generations queued through it that have not started fail with
        404, as the next request would (GrantService.on_revoke; any thread)."""
        with self._through_lock:
            found = list(self._through.pop(grant.id, ()))
        for gens in found:
            gens.withdraw()


def _residency(llm: LoadedLlm) -> ModelResidency:
    return ModelResidency(
        id=llm.id,
        loaded=True,
        pinned=llm.pinned,
        resident_bytes=llm.resident_bytes,
        load_seconds=round(llm.load_seconds, 3),
    )


def chat_sampling(request: ChatCompletionRequest) -> SamplingParams:
    logprobs = request.top_logprobs_count()
    return _sampling(
        request,
        max_tokens=request.completion_limit(),
        logprobs=logprobs,
        grammar=_grammar(request.response_format),
    )


def completion_sampling(request: CompletionRequest) -> SamplingParams:
    request.check_supported()
    return _sampling(
        request,
        max_tokens=request.max_tokens,
        logprobs=request.logprobs,
        grammar=_grammar(request.response_format),
    )


def _sampling(
    request: SamplingRequest, *, max_tokens: int | None, logprobs: int | None, grammar: str | None
) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=request.top_k or 0,
        min_p=request.min_p or 0.0,
        seed=request.seed,
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        repetition_penalty=request.repetition_penalty or 1.0,
        logit_bias={int(k): v for k, v in (request.logit_bias or {}).items()},
        stop=tuple(request.stop_list()),
        logprobs=logprobs,
        grammar=grammar,
    )


def _grammar(response_format: ResponseFormat | None) -> str | None:
    """The GBNF grammar that constrains the output to what `response_format` asks for."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return json_object_grammar()
    return grammar_for_json_schema(response_format.enforced_schema())


class Mailbox:
    """Hands engine events to the event loop, one wake-up per burst rather than per event.

    An engine step emits one event per running request at once; waking the loop for each cost
    a syscall and a loop turn apiece. Queues are still only touched on the loop's thread.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue[tuple[int, Event]], tuple[int, Event]]] = []
        self._scheduled = False

    def sink(self, queue: asyncio.Queue[tuple[int, Event]], index: int) -> Callable[[Event], None]:
        def deliver(event: Event) -> None:
            with self._lock:
                self._items.append((queue, (index, event)))
                if self._scheduled:
                    return
                self._scheduled = True
            try:
                self._loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop closed at shutdown: nobody is listening any more
                return

        return deliver

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, []
            self._scheduled = False
        for queue, item in items:
            queue.put_nowait(item)
