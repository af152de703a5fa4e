"""What a `redact` privacy policy costs in time-to-first-token, at one client.

One server (`gemma-3-270m`), three organisations, streamed `/v1/completions` with a ~200-token
prompt holding an email, a phone number and a card number, one request at a time, the three
arms interleaved so drift hits all alike:

- `off`: policy off, the original prompt;
- `redact`: completions under `redact`, the original prompt (the model sees the redacted one);
- `off-redacted`: policy off, the already-redacted prompt: the same tokens the model sees under
  `redact`, so `redact` minus this is the policy's own cost end to end.

Each prompt starts with a fresh number so no request is served from the prefix cache. Also
reported: the de-identifier alone on the same prompt, in this process (p50 over 500 calls).

    .venv/bin/python bench/pii_cost.py [--requests 60]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from aiaas.privacy.policy import deidentifier

from server import ServerProcess, free_port

MODEL = "gemma-3-270m"
BODY = (
    "Please summarise the following support ticket for the account team in two sentences. "
    "The customer reports that the monthly invoice was charged twice and asks for a refund "
    "of the second charge. They have been a customer for four years, use the premium plan "
    "with twelve seats, and mention that the billing portal showed an error when they tried "
    "to download the receipt. They would like a call back this week, preferably in the "
    "morning, and ask that the refund goes to the same card. They also ask whether the "
    "annual plan would be cheaper for their team and whether the seats can be moved to a "
    "new department next quarter. The ticket was opened on the web form and escalated by "
    "the first-line agent after the customer wrote again. Contact: jane.doe@example.org, "
    "phone +44 20 7946 0958, card 4111 1111 1111 1111. Summary:"
)


def _ttft(client: httpx.Client, key: str, prompt: str) -> float:
    started = time.perf_counter()
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {key}"}
    with client.stream("POST", "/v1/completions", json=body, headers=headers) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: ") and '"text":"' in line.replace(" ", ""):
                return time.perf_counter() - started
    raise RuntimeError("no token")


def _org(client: httpx.Client, admin: str, name: str, policy: dict[str, object] | None) -> str:
    auth = {"Authorization": f"Bearer {admin}"}
    made = client.post("/v1/organizations", json={"name": name}, headers=auth)
    made.raise_for_status()
    org = made.json()
    if policy is not None:
        path = f"/v1/organizations/{org['id']}/privacy_policy"
        set_ = client.post(path, json=policy, headers={"Authorization": f"Bearer {org['api_key']}"})
        set_.raise_for_status()
    return str(org["api_key"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=60)
    args = parser.parse_args()
    finder = deidentifier()
    redacted, _ = finder.apply(BODY)
    alone = []
    for _ in range(500):
        t = time.perf_counter()
        finder.apply(BODY)
        alone.append(time.perf_counter() - t)
    print(f"de-identifier alone: p50 {statistics.median(alone) * 1e3:.2f} ms", flush=True)
    port = free_port()
    with tempfile.TemporaryDirectory() as data_dir:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIAAS_")}
        env |= {"AIAAS_DATA_DIR": data_dir, "AIAAS_MODELS": MODEL, "AIAAS_LOG_LEVEL": "warning"}
        argv = [sys.executable, "-m", "aiaas", "serve", "--host", "127.0.0.1", "--port", str(port)]
        base = f"http://127.0.0.1:{port}"
        with ServerProcess("ours", argv, env=env, log_path=Path(data_dir) / "server.log") as srv:
            srv.wait_healthy(f"{base}/health", timeout_s=300)
            admin = (Path(data_dir) / "admin-key").read_text().strip()
            with httpx.Client(base_url=base, timeout=120, trust_env=False) as client:
                keys = {
                    "off": _org(client, admin, "off", None),
                    "redact": _org(client, admin, "redact", {"completions": "redact"}),
                    "off-redacted": _org(client, admin, "off2", None),
                }
                prompts = {"off": BODY, "redact": BODY, "off-redacted": redacted}
                tokens = client.post(
                    "/v1/completions",
                    json={"model": MODEL, "prompt": BODY, "max_tokens": 1},
                    headers={"Authorization": f"Bearer {keys['off']}"},
                ).json()["usage"]["prompt_tokens"]
                print(f"prompt: {tokens} tokens", flush=True)
                times: dict[str, list[float]] = {arm: [] for arm in keys}
                for i in range(args.requests + 5):
                    for arm, key in keys.items():
                        t = _ttft(client, key, f"{i}{os.urandom(2).hex()}. {prompts[arm]}")
                        if i >= 5:  # warm-up
                            times[arm].append(t)
                    print(
                        f"round {i}: "
                        + ", ".join(f"{a} {v[-1] * 1e3:.0f} ms" for a, v in times.items() if v),
                        flush=True,
                    )
    print(f"prompt: {tokens} tokens; {args.requests} requests per arm, one client, streamed")
    print("| arm | TTFT p50 ms | TTFT p90 ms |")
    print("|---|---:|---:|")
    for arm, values in times.items():
        values.sort()
        p50 = statistics.median(values) * 1e3
        print(f"| {arm} | {p50:.1f} | {values[int(0.9 * len(values))] * 1e3:.1f} |")
    delta = statistics.median(times["redact"]) - statistics.median(times["off-redacted"])
    print(f"redact - off-redacted (p50): {delta * 1e3:+.2f} ms")
    delta = statistics.median(times["redact"]) - statistics.median(times["off"])
    print(f"redact - off (p50): {delta * 1e3:+.2f} ms")


if __name__ == "__main__":
    main()
