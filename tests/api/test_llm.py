"""Chat completions and completions with the official openai client, on the bundled models."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import openai
import pytest

from tests.conftest import Org, Server, assert_error, create_org

CHAT_MODEL = "smollm2-135m-instruct"
BASE_MODEL = "gemma-3-270m"
GEMMA_EOS = 1
QUESTION = [{"role": "user", "content": "Name three colours of the rainbow."}]


@pytest.fixture(scope="module")
def llm_org(llm_server: Server) -> Org:
    return create_org(llm_server)


@pytest.fixture(scope="module")
def client(llm_server: Server, llm_org: Org) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{llm_server.base_url}/v1", api_key=llm_org.api_key, max_retries=0
    )


def _metric(server: Server, name: str, model: str) -> float:
    with server.client(server.admin_key) as admin:
        text = admin.get("/metrics").text
    match = re.search(rf'^{name}{{model="{re.escape(model)}"}} ([0-9.e+-]+)$', text, re.M)
    assert match, f"{name} for {model} not in /metrics"
    return float(match.group(1))


def test_models_are_listed(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {CHAT_MODEL, BASE_MODEL} <= ids
    assert client.models.retrieve(BASE_MODEL).id == BASE_MODEL


def test_chat_completion(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=CHAT_MODEL, messages=QUESTION, max_tokens=24, temperature=0
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    usage = reply.usage
    assert usage.prompt_tokens > 5
    assert 1 <= usage.completion_tokens <= 24
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert reply.id.startswith("chatcmpl-") and reply.model == CHAT_MODEL


def test_streamed_chat_matches_the_full_reply(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(
        model=CHAT_MODEL, messages=QUESTION, max_tokens=24, temperature=0
    )
    stream = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=QUESTION,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert text == full.choices[0].message.content
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == []
    assert chunks[-1].usage == full.usage
    assert len({c.id for c in chunks}) == 1


def test_completion_and_echo(client: openai.OpenAI) -> None:
    prompt = "The capital of France is"
    reply = client.completions.create(model=BASE_MODEL, prompt=prompt, max_tokens=8, temperature=0)
    assert reply.choices[0].text
    assert reply.usage.completion_tokens <= 8
    echoed = client.completions.create(
        model=BASE_MODEL, prompt=prompt, max_tokens=8, temperature=0, echo=True
    )
    assert echoed.choices[0].text == prompt + reply.choices[0].text


def test_streamed_completion_matches_the_full_one(client: openai.OpenAI) -> None:
    args = {"model": BASE_MODEL, "prompt": "Once upon a time", "max_tokens": 20, "temperature": 0}
    full = client.completions.create(**args)
    chunks = list(
        client.completions.create(**args, stream=True, stream_options={"include_usage": True})
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens == 20


def test_a_repeated_prompt_is_served_from_the_prefix_cache(
    client: openai.OpenAI, llm_server: Server
) -> None:
    prompt = "A prefix cache keeps the KV cells of prompts it has seen. " * 3 + "In short,"
    args = {"model": BASE_MODEL, "prompt": prompt, "max_tokens": 6, "temperature": 0}
    first = client.completions.create(**args)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    second = client.completions.create(**args)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached == second.usage.prompt_tokens - 1  # all but the token that gives the logits
    assert second.choices[0].text == first.choices[0].text
    assert _metric(llm_server, "aiaas_llm_cached_prompt_tokens_total", BASE_MODEL) >= cached
    assert _metric(llm_server, "aiaas_llm_prefix_cache_entries", BASE_MODEL) >= 1


def test_a_repetitive_completion_streams_the_same_text_as_it_completes(
    client: openai.OpenAI, llm_server: Server
) -> None:
    """Whatever the engine guesses (speculative decoding), streamed and whole answers agree and
    the guess counters are exposed."""
    prompt = "one two three four, " * 5 + "one two"
    args = {"model": BASE_MODEL, "prompt": prompt, "max_tokens": 32, "temperature": 0}
    whole = client.completions.create(**args)
    streamed = client.completions.create(**args, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
    assert whole.usage.completion_tokens == 32
    drafted = _metric(llm_server, "aiaas_llm_draft_tokens_total", BASE_MODEL)
    assert 0 <= _metric(llm_server, "aiaas_llm_accepted_draft_tokens_total", BASE_MODEL) <= drafted


def test_token_array_prompt(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=BASE_MODEL, prompt=[2, 818, 5279], max_tokens=4)
    assert reply.usage.prompt_tokens == 3


def test_stop_strings_cut_the_output(client: openai.OpenAI) -> None:
    args = {"model": BASE_MODEL, "prompt": "Once upon a time", "max_tokens": 40, "temperature": 0}
    text = client.completions.create(**args).choices[0].text
    words = [w for w in re.findall(r"[A-Za-z]{3,}", text) if text.index(w) > 0]
    assert words, text
    stop = words[len(words) // 2]
    cut = client.completions.create(**args, stop=[stop, "@@never@@"])
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(**args, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text[: text.index(stop)]


def test_seed_reproduces_a_sampled_completion(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        reply = client.chat.completions.create(
            model=CHAT_MODEL, messages=QUESTION, max_tokens=24, temperature=0.8, seed=seed
        )
        return reply.choices[0].message.content

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(seed) != first for seed in (1, 2, 3))


def test_json_schema_output_validates(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "colours": {
                "type": "array",
                "items": {"enum": ["red", "green", "blue"]},
                "maxItems": 3,
            },
        },
        "required": ["name", "age", "colours"],
        "additionalProperties": False,
    }
    reply = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "Describe a person as JSON."}],
        max_tokens=120,
        temperature=0.7,
        seed=7,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": schema},
        },
    )
    data = json.loads(reply.choices[0].message.content)
    assert set(data) == {"name", "age", "colours"}
    assert isinstance(data["name"], str) and len(data["name"]) <= 12
    assert isinstance(data["age"], int) and 0 <= data["age"] <= 120
    assert all(c in ("red", "green", "blue") for c in data["colours"]) and len(data["colours"]) <= 3


def test_json_object_output_parses(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model=BASE_MODEL,
        prompt="A JSON object describing a cat:",
        max_tokens=200,
        temperature=0,
        extra_body={"response_format": {"type": "json_object"}},
    )
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].text), dict)
    else:  # cut by max_tokens: still a JSON prefix that opens an object
        assert reply.choices[0].text.lstrip().startswith("{")


def test_logprobs(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=QUESTION,
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens or reply.choices[0].finish_reason == "stop"
    for item in content:
        assert item.logprob <= 0
        assert len(item.top_logprobs) == 3
        assert item.logprob == pytest.approx(max(t.logprob for t in item.top_logprobs), abs=1e-5)
    legacy = client.completions.create(
        model=BASE_MODEL, prompt="Hello", max_tokens=4, temperature=0, logprobs=2
    )
    assert len(legacy.choices[0].logprobs.tokens) == 4
    assert all(len(top) == 2 for top in legacy.choices[0].logprobs.top_logprobs)


def test_n_choices(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model=BASE_MODEL, prompt="Hello", max_tokens=6, n=3, temperature=0.9, seed=3
    )
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert reply.usage.completion_tokens == sum(6 for _ in range(3))


def test_choices_decoded_together_go_through_the_onnx_head(
    client: openai.OpenAI, llm_server: Server
) -> None:
    """n choices decode in the same steps, so gemma-3-270m's output layer (Q8_0) is computed
    by ONNX Runtime; the answer is whole all the same."""
    reply = client.completions.create(
        model=BASE_MODEL, prompt="The weather today", max_tokens=8, n=3, temperature=0.9, seed=5
    )
    assert reply.usage.completion_tokens == 24
    assert all(choice.text for choice in reply.choices)
    assert _metric(llm_server, "aiaas_llm_onnx_head_steps_total", BASE_MODEL) > 0


def test_concurrent_streams_complete_with_correct_usage(llm_server: Server, llm_org: Org) -> None:
    prompts = [f"Story number {i}: once upon a time" for i in range(8)]

    async def run() -> list[tuple[str, int, int, int]]:
        async with openai.AsyncOpenAI(
            base_url=f"{llm_server.base_url}/v1", api_key=llm_org.api_key, max_retries=0
        ) as aclient:

            async def one(prompt: str) -> tuple[str, int, int, int]:
                stream = await aclient.completions.create(
                    model=BASE_MODEL,
                    prompt=prompt,
                    max_tokens=16,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_body={"logit_bias": {str(GEMMA_EOS): -100}},
                )
                text, usage = "", None
                async for chunk in stream:
                    text += "".join(c.text for c in chunk.choices)
                    usage = chunk.usage or usage
                assert usage is not None
                return text, usage.prompt_tokens, usage.completion_tokens, usage.total_tokens

            results = await asyncio.gather(*(one(p) for p in prompts))
            singles = [
                await aclient.completions.create(model=BASE_MODEL, prompt=p, max_tokens=1)
                for p in prompts
            ]
        return [(*r, s.usage.prompt_tokens) for r, s in zip(results, singles, strict=True)]

    for text, prompt_tokens, completion_tokens, total, single_prompt in asyncio.run(run()):
        assert text
        assert completion_tokens == 16
        assert prompt_tokens == single_prompt
        assert total == prompt_tokens + completion_tokens


def test_cancelled_stream_frees_its_slot(llm_server: Server, llm_org: Org) -> None:
    generated_before = _metric(llm_server, "aiaas_llm_generated_tokens_total", BASE_MODEL)
    body = {
        "model": BASE_MODEL,
        "prompt": "Write a very long story.",
        "max_tokens": 1500,
        "stream": True,
        "logit_bias": {str(GEMMA_EOS): -100},
    }
    with (
        llm_server.client(llm_org.api_key) as http,
        http.stream("POST", "/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert _metric(llm_server, "aiaas_llm_slots_busy", BASE_MODEL) >= 1
    # leaving the block closed the connection mid-stream
    deadline = time.monotonic() + 30
    while _metric(llm_server, "aiaas_llm_slots_busy", BASE_MODEL) > 0:
        assert time.monotonic() < deadline, "the slot was never freed"
        time.sleep(0.05)
    generated = (
        _metric(llm_server, "aiaas_llm_generated_tokens_total", BASE_MODEL) - generated_before
    )
    assert generated < 1500  # it stopped early: the slot was freed by the cancel, not by max_tokens


def test_metrics_show_engine_state(llm_server: Server) -> None:
    assert _metric(llm_server, "aiaas_llm_slots", BASE_MODEL) == 8
    assert _metric(llm_server, "aiaas_llm_queue_depth", BASE_MODEL) >= 0
    # Exposed (`_metric` fails when absent); how many depends on which tenants shared the model.
    assert _metric(llm_server, "aiaas_llm_preempted_steps_total", BASE_MODEL) >= 0
    with llm_server.client(llm_server.admin_key) as admin:
        text = admin.get("/metrics").text
    assert re.search(
        r'aiaas_llm_time_to_first_token_seconds_count\{model="gemma-3-270m",org="org_', text
    )
    assert re.search(
        r'aiaas_llm_tokens_total\{kind="completion",model="gemma-3-270m",org="org_', text
    )


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        (
            "/v1/chat/completions",
            {"model": CHAT_MODEL, "messages": QUESTION, "temperature": 3},
            400,
            "temperature",
        ),
        (
            "/v1/chat/completions",
            {"model": CHAT_MODEL, "messages": QUESTION, "top_p": 0},
            400,
            "top_p",
        ),
        ("/v1/chat/completions", {"model": CHAT_MODEL, "messages": QUESTION, "n": 9}, 400, "n"),
        (
            "/v1/chat/completions",
            {"model": CHAT_MODEL, "messages": QUESTION, "max_tokens": 0},
            400,
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            {"model": CHAT_MODEL, "messages": QUESTION, "stop": ["a", "b", "c", "d", "e"]},
            400,
            "stop",
        ),
        (
            "/v1/chat/completions",
            {"model": CHAT_MODEL, "messages": QUESTION, "logit_bias": {"abc": 1}},
            400,
            "logit_bias",
        ),
        (
            "/v1/chat/completions",
            {"model": CHAT_MODEL, "messages": QUESTION, "logit_bias": {"5": 500}},
            400,
            "logit_bias[5]",
        ),
        (
            "/v1/chat/completions",
            {"model": CHAT_MODEL, "messages": QUESTION, "logit_bias": {"999999999": 1}},
            400,
            "logit_bias",
        ),
        (
            "/v1/chat/completions",
            {"model": CHAT_MODEL, "messages": QUESTION, "top_logprobs": 2},
            400,
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            {"model": CHAT_MODEL, "messages": QUESTION, "presence_penalty": 5},
            400,
            "presence_penalty",
        ),
        (
            "/v1/chat/completions",
            {"model": CHAT_MODEL, "messages": QUESTION, "seed": "x"},
            400,
            "seed",
        ),
        (
            "/v1/chat/completions",
            {"model": CHAT_MODEL, "messages": QUESTION, "tools": []},
            400,
            "tools",
        ),
        ("/v1/chat/completions", {"model": CHAT_MODEL, "messages": []}, 400, "messages"),
        (
            "/v1/chat/completions",
            {"model": CHAT_MODEL, "messages": [{"role": "wizard", "content": "x"}]},
            400,
            "messages[0].role",
        ),
        ("/v1/chat/completions", {"messages": QUESTION}, 400, "model"),
        (
            "/v1/chat/completions",
            {"model": CHAT_MODEL, "messages": QUESTION, "response_format": {"type": "json_schema"}},
            400,
            "response_format.json_schema",
        ),
        ("/v1/chat/completions", {"model": BASE_MODEL, "messages": QUESTION}, 400, "model"),
        (
            "/v1/completions",
            {"model": BASE_MODEL, "prompt": "x", "max_tokens": 5000},
            400,
            "prompt",
        ),
        ("/v1/completions", {"model": BASE_MODEL, "prompt": [1, 99999999]}, 400, "prompt"),
        ("/v1/completions", {"model": BASE_MODEL, "prompt": "x", "suffix": "y"}, 400, "suffix"),
        ("/v1/completions", {"model": BASE_MODEL}, 400, "prompt"),
    ],
)
def test_bad_parameters_are_4xx(
    llm_server: Server, llm_org: Org, path: str, body: dict, status: int, param: str
) -> None:
    with llm_server.client(llm_org.api_key) as http:
        error = assert_error(http.post(path, json=body), status)
    assert error["param"] == param, error


def test_context_overflow_is_context_length_exceeded(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=BASE_MODEL, prompt="word " * 3000, max_tokens=10)
    assert info.value.code == "context_length_exceeded"
    assert "2048" in info.value.message


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-17", messages=QUESTION)
    assert info.value.code == "model_not_found"


def test_inference_needs_the_inference_scope(llm_server: Server, llm_org: Org) -> None:
    with llm_server.client(llm_org.api_key) as admin:
        key = admin.post("/v1/api_keys", json={"name": "ro", "scopes": ["models:read"]}).json()
    with llm_server.client(key["value"]) as http:
        response = http.post("/v1/completions", json={"model": BASE_MODEL, "prompt": "x"})
    assert_error(response, 403)


def test_full_queue_answers_429(make_server) -> None:
    server = make_server("sqlite", models=BASE_MODEL, llm_slots="1", llm_max_waiting="1")
    server.start()
    org = create_org(server)
    long = {
        "model": BASE_MODEL,
        "prompt": "Tell a story.",
        "max_tokens": 1000,
        "stream": True,
        "logit_bias": {str(GEMMA_EOS): -100},
    }
    headers = {"Authorization": f"Bearer {org.api_key}"}
    with (
        httpx.Client(base_url=server.base_url, headers=headers, timeout=60) as http,
        http.stream("POST", "/v1/completions", json=long) as running,
    ):
        # Keep the line iterator referenced: dropping it would close the running stream.
        running_lines = running.iter_lines()
        assert next(line for line in running_lines if line.startswith("data:"))
        with http.stream("POST", "/v1/completions", json=long) as waiting:
            assert waiting.status_code == 200  # queued behind the running one
            refused = http.post("/v1/completions", json={**long, "stream": False})
    error = assert_error(refused, 429, "rate_limit_exceeded")
    assert refused.headers["retry-after"]
    assert "waiting" in error["message"]
    server.stop()


def test_a_registered_template_makes_a_base_model_chat(make_server, tmp_path) -> None:
    template = tmp_path / "plain.jinja"
    template.write_text(
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    server = make_server("sqlite", models=BASE_MODEL, chat_templates=f"{BASE_MODEL}={template}")
    server.start()
    org = create_org(server)
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=org.api_key, max_retries=0)
    reply = client.chat.completions.create(
        model=BASE_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0
    )
    # The same text as a completion prompt (which adds BOS itself) gives the same tokens and
    # reply: the template rendered as written, and its BOS was not added twice.
    same = client.completions.create(
        model=BASE_MODEL, prompt="user: Hi\nassistant:", max_tokens=5, temperature=0
    )
    assert reply.usage.prompt_tokens == same.usage.prompt_tokens
    assert reply.choices[0].message.content == same.choices[0].text
    server.stop()


def test_a_model_that_fails_to_load_does_not_block_the_others(make_server, tmp_path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)  # a header and nothing else
    server = make_server("sqlite", models=BASE_MODEL, gguf_models=f"broken={broken}")
    server.start()  # waits for /health 200: every model finished loading or failing
    org = create_org(server)
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=org.api_key, max_retries=0)
    assert {m.id for m in client.models.list()} == {BASE_MODEL}
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="broken", prompt="x")
    server.stop()
