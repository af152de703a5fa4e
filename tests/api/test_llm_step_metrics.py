"""`/metrics` shows how full the LLM engine's decode steps are (issue 29): histograms of the
sequences and the tokens in each llama_decode, per model, like llama.cpp's
`n_busy_slots_per_decode`. Read from the real server after concurrent completions, and checked
against what the clients were told (their usage) and the engine's other counters.
"""

from __future__ import annotations

import re
import secrets
from concurrent.futures import ThreadPoolExecutor

import openai

from tests.conftest import Server, create_org

MODEL = "smollm2-135m-instruct"
NO_END = {"0": -100, "2": -100}  # <|endoftext|>, <|im_end|>: every answer runs to max_tokens
MAX_TOKENS = 12
CONCURRENT = 8


def _scrape(server: Server) -> dict[str, float]:
    """This model's samples of the families the test reads, by name (and `le` for buckets)."""
    with server.client(server.admin_key) as admin:
        text = admin.get("/metrics").text
    samples: dict[str, float] = {}
    for line in text.splitlines():
        match = re.fullmatch(r"(aiaas_llm_\w+)\{(.*)\} (\S+)", line)
        if not match or f'model="{MODEL}"' not in match.group(2):
            continue
        le = re.search(r'le="([^"]+)"', match.group(2))
        name = match.group(1) + (f"[{le.group(1)}]" if le else "")
        samples[name] = float(match.group(3))
    return samples


def test_step_size_histograms_follow_the_completions(llm_server: Server) -> None:
    before = _scrape(llm_server)
    client = openai.OpenAI(
        base_url=f"{llm_server.base_url}/v1", api_key=create_org(llm_server).api_key, max_retries=0
    )

    def complete(i: int) -> tuple[int, int, int]:
        answer = client.chat.completions.create(
            model=MODEL,
            # Prompts of their own (a fresh nonce each): the prefix cache has little to give.
            messages=[{"role": "user", "content": f"{secrets.token_hex(4)}: count to {i + 3}."}],
            max_tokens=MAX_TOKENS,
            temperature=0,
            logit_bias=NO_END,
        )
        usage = answer.usage
        assert usage is not None and usage.completion_tokens == MAX_TOKENS
        cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
        return usage.prompt_tokens, cached or 0, usage.completion_tokens

    with ThreadPoolExecutor(CONCURRENT) as pool:
        usages = list(pool.map(complete, range(CONCURRENT)))
    after = _scrape(llm_server)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    steps = delta("aiaas_llm_decode_steps_total")
    generated = delta("aiaas_llm_generated_tokens_total")
    assert generated == CONCURRENT * MAX_TOKENS == sum(u[2] for u in usages)
    # One observation per decode step, in both histograms.
    assert steps > 0
    assert delta("aiaas_llm_step_sequences_count") == steps
    assert delta("aiaas_llm_step_tokens_count") == steps
    assert delta("aiaas_llm_step_sequences_bucket[+Inf]") == steps
    assert delta("aiaas_llm_step_tokens_bucket[+Inf]") == steps

    # Each answer takes part in its prompt's step (one, when the prompt fits a batch) and in one
    # step per token it generated after its first, less the tokens that accepted guesses gave
    # without a step of their own (speculation).
    accepted = delta("aiaas_llm_accepted_draft_tokens_total")
    decode_steps = generated - CONCURRENT - accepted  # summed over the answers
    sequences = delta("aiaas_llm_step_sequences_sum")
    print(f"steps {steps:.0f}, sequences {sequences:.0f}, accepted guesses {accepted:.0f}")
    # Every prompt fits a batch (llm_batch 512) with room to spare, so takes exactly one step.
    assert sum(prompt for prompt, _, _ in usages) < 400
    assert sequences == CONCURRENT + decode_steps

    # Tokens: every prompt token not read from the prefix cache, one token per answer and decode
    # step (the last sampled token, fed back), and every guess sent with it.
    prompt_decoded = sum(prompt - cached for prompt, cached, _ in usages)
    drafts = delta("aiaas_llm_draft_tokens_total")
    assert delta("aiaas_llm_step_tokens_sum") == prompt_decoded + decode_steps + drafts
    assert sequences <= delta("aiaas_llm_step_tokens_sum")
    # The completions ran together: some steps carried several sequences.
    assert delta("aiaas_llm_step_sequences_bucket[1]") < steps
    assert sequences / steps > 1
