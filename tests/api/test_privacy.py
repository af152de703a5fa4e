"""Privacy policies (issue 28): set and read them, and each mode on each entry point."""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Org, Server, assert_error, create_org

CHAT_MODEL = "smollm2-135m-instruct"
BASE_MODEL = "gemma-3-270m"
EMBED_MODEL = "all-minilm-l6-v2"

EMAIL = "jane.doe@example.org"
PHONE = "+44 20 7946 0958"
CARD = "4111 1111 1111 1111"
SEEDED = (EMAIL, PHONE, CARD)
PROMPT = f"Write a short reply to {EMAIL} (phone {PHONE}); her card is {CARD}."
REDACTED = "Write a short reply to <EMAIL> (phone <PHONE>); her card is <CREDIT_CARD>."


def _set_policy(server: Server, org: Org, **body: Any) -> httpx.Response:
    with server.client(org.api_key) as client:
        return client.post(f"/v1/organizations/{org.id}/privacy_policy", json=body)


def _openai(server: Server, org: Org) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=org.api_key, max_retries=0)


# --- the policy API ----------------------------------------------------------------------------


def test_default_is_off_and_set_get_delete(server: Server, org: Org) -> None:
    with server.client(org.api_key) as client:
        got = client.get(f"/v1/organizations/{org.id}/privacy_policy")
        assert got.status_code == 200, got.text
        assert got.json()["is_set"] is False
        assert got.json()["chat"] == "off" and got.json()["files"] == {}
        response = client.post(
            f"/v1/organizations/{org.id}/privacy_policy",
            json={"chat": "redact", "embeddings": "block", "files": {"fine-tune": "redact"},
                  "entities": ["email", "phone"], "pseudonymise": True},
        )  # fmt: skip
        assert response.status_code == 200, response.text
        got = client.get(f"/v1/organizations/{org.id}/privacy_policy").json()
        assert got["is_set"] and got["chat"] == "redact" and got["embeddings"] == "block"
        assert got["completions"] == "off" and got["files"] == {"fine-tune": "redact"}
        assert got["entities"] == ["email", "phone"] and got["pseudonymise"] is True
        # A project's own policy.
        project = client.get(
            f"/v1/organizations/{org.id}/privacy_policy", params={"project_id": org.project_id}
        ).json()
        assert project["is_set"] is False and project["project_id"] == org.project_id
        deleted = client.delete(f"/v1/organizations/{org.id}/privacy_policy")
        assert deleted.status_code == 200 and deleted.json()["is_set"] is False
        audit = client.get("/v1/audit").json()["data"]
        assert "privacy_policy.updated" in {e["type"] for e in audit}


def test_policy_validation_and_access(server: Server, org: Org, other_org: Org) -> None:
    assert_error(_set_policy(server, org, chat="scramble"), 400)
    assert_error(_set_policy(server, org, entities=["shoe_size"]), 400)
    assert_error(_set_policy(server, org, files={"selfies": "redact"}), 400)
    assert_error(_set_policy(server, org, bogus=1), 400)
    with server.client(org.api_key) as client:
        # Another organisation's policy: not found, whether read or written.
        assert_error(client.get(f"/v1/organizations/{other_org.id}/privacy_policy"), 404)
        response = client.post(
            f"/v1/organizations/{other_org.id}/privacy_policy", json={"chat": "block"}
        )
        assert_error(response, 404)
        response = client.get(
            f"/v1/organizations/{org.id}/privacy_policy", params={"project_id": "proj_nope"}
        )
        assert_error(response, 404)


# --- the entry points (the bundled LLMs and MiniLM) ----------------------------------------------


@pytest.fixture(scope="module")
def llm_org(llm_server: Server) -> Org:
    return create_org(llm_server)


def _tokens_metric(server: Server, org: Org) -> float:
    with server.client(server.admin_key) as admin:
        text = admin.get("/metrics").text
    values = re.findall(
        rf'^aiaas_(?:llm|embedding)_tokens_total\{{[^}}]*org="{org.id}"[^}}]*\}} ([0-9.e+-]+)$',
        text,
        re.M,
    )
    return sum(float(v) for v in values)


def test_block_never_reaches_the_engine(llm_server: Server) -> None:
    org = create_org(llm_server)
    response = _set_policy(
        llm_server, org, chat="block", completions="block", embeddings="block",
    )  # fmt: skip
    assert response.status_code == 200, response.text
    client = _openai(llm_server, org)
    calls = [
        lambda: client.chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=4
        ),
        lambda: client.completions.create(model=BASE_MODEL, prompt=PROMPT, max_tokens=4),
        lambda: client.embeddings.create(model=EMBED_MODEL, input=["fine", PROMPT]),
    ]
    for call in calls:
        with pytest.raises(openai.BadRequestError) as caught:
            call()
        error = caught.value.body
        assert isinstance(error, dict) and error["code"] == "pii_detected", error
        message = error["message"]
        assert "email" in message and "phone" in message and "credit_card" in message
        assert re.search(r"email at \d+-\d+", message)
        for value in (*SEEDED, "jane", "7946", "4111"):
            assert value not in message
    assert _tokens_metric(llm_server, org) == 0
    # Clean text passes a block policy.
    reply = client.chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "Say hi."}], max_tokens=2
    )
    assert reply.choices[0].message is not None


def test_redact_chat_and_completion(llm_server: Server, llm_org: Org) -> None:
    assert _set_policy(llm_server, llm_org, chat="redact", completions="redact").status_code == 200
    client = _openai(llm_server, llm_org)
    raw = client.completions.with_raw_response.create(
        model=BASE_MODEL, prompt=PROMPT, max_tokens=1, temperature=0, echo=True
    )
    assert raw.headers["x-aiaas-pii-redacted"] == "CREDIT_CARD=1,EMAIL=1,PHONE=1"
    text = raw.parse().choices[0].text
    assert text.startswith(REDACTED)  # the model saw only the redacted prompt
    assert not any(v in text for v in SEEDED)
    # Chat: the prompt the model saw has as many tokens as the redacted text itself.
    chat = client.chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=1
    )
    assert chat.headers["x-aiaas-pii-redacted"] == "CREDIT_CARD=1,EMAIL=1,PHONE=1"
    plain = create_org(llm_server)  # policy off
    expected = _openai(llm_server, plain).chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": REDACTED}], max_tokens=1
    )
    assert chat.parse().usage.prompt_tokens == expected.usage.prompt_tokens
    # Streaming is unchanged, and carries the header too.
    with client.chat.completions.with_streaming_response.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=2, stream=True
    ) as stream:
        assert stream.headers["x-aiaas-pii-redacted"] == "CREDIT_CARD=1,EMAIL=1,PHONE=1"
        chunks = list(stream.parse())
    assert chunks
    # Text without PII: the header says none were replaced.
    clean = client.chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "Say hi."}], max_tokens=1
    )
    assert clean.headers["x-aiaas-pii-redacted"] == "none"


def test_pseudonyms_consistent_within_and_different_between_requests(
    llm_server: Server,
) -> None:
    org = create_org(llm_server)
    assert _set_policy(llm_server, org, completions="redact", pseudonymise=True).status_code == 200
    client = _openai(llm_server, org)
    prompt = f"Mail {EMAIL} today, then mail {EMAIL} again and call {PHONE}."
    seen = []
    for _ in range(2):
        text = (
            client.completions.create(
                model=BASE_MODEL, prompt=prompt, max_tokens=1, temperature=0, echo=True
            )
            .choices[0]
            .text
        )
        assert EMAIL not in text and PHONE not in text
        emails = re.findall(r"[\w.-]+@example\.com", text)
        assert len(emails) == 2 and emails[0] == emails[1]  # consistent within a request
        seen.append(emails[0])
    assert seen[0] != seen[1]  # different between requests


def test_detect_passes_text_and_reports(llm_server: Server) -> None:
    org = create_org(llm_server)
    response = _set_policy(llm_server, org, completions="detect", embeddings="detect")
    assert response.status_code == 200, response.text
    client = _openai(llm_server, org)
    raw = client.completions.with_raw_response.create(
        model=BASE_MODEL, prompt=PROMPT, max_tokens=1, temperature=0, echo=True
    )
    assert raw.headers["x-aiaas-pii-detected"] == "CREDIT_CARD=1,EMAIL=1,PHONE=1"
    assert "x-aiaas-pii-redacted" not in raw.headers
    assert raw.parse().choices[0].text.startswith(PROMPT)
    emb = client.embeddings.with_raw_response.create(model=EMBED_MODEL, input=[PROMPT, "hi"])
    assert emb.headers["x-aiaas-pii-detected"] == "CREDIT_CARD=1,EMAIL=1,PHONE=1"


def test_redact_embeddings(llm_server: Server) -> None:
    org = create_org(llm_server)
    assert _set_policy(llm_server, org, embeddings="redact").status_code == 200
    client = _openai(llm_server, org)
    raw = client.embeddings.with_raw_response.create(model=EMBED_MODEL, input=PROMPT)
    assert raw.headers["x-aiaas-pii-redacted"] == "CREDIT_CARD=1,EMAIL=1,PHONE=1"
    redacted = raw.parse().data[0].embedding
    plain = _openai(llm_server, create_org(llm_server))
    expected = plain.embeddings.create(model=EMBED_MODEL, input=REDACTED).data[0].embedding
    assert redacted == pytest.approx(expected, abs=1e-5)
    # Token ids cannot be screened: refused under a policy.
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=EMBED_MODEL, input=[[101, 102]])
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["code"] == "pii_unscreenable"


def test_another_orgs_policy_never_applies(llm_server: Server, llm_org: Org) -> None:
    strict = create_org(llm_server)
    assert _set_policy(llm_server, strict, completions="block").status_code == 200
    other = create_org(llm_server)  # no policy
    raw = _openai(llm_server, other).completions.with_raw_response.create(
        model=BASE_MODEL, prompt=PROMPT, max_tokens=1, temperature=0, echo=True
    )
    assert "x-aiaas-pii-redacted" not in raw.headers
    assert raw.parse().choices[0].text.startswith(PROMPT)


def test_cli_sets_shows_and_resets(sqlite_server: Server) -> None:
    from tests.cli.test_train_cli import run

    org = create_org(sqlite_server)
    made = run(
        sqlite_server, org.api_key, "privacy", "set", org.id, "--chat", "redact",
        "--file", "fine-tune=redact", "--entities", "email,phone", "--pseudonymise", "--json",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    policy = json.loads(made.stdout)
    assert policy["chat"] == "redact" and policy["files"] == {"fine-tune": "redact"}
    assert policy["entities"] == ["email", "phone"] and policy["pseudonymise"] is True
    shown = run(sqlite_server, org.api_key, "privacy", "show", org.id)
    assert shown.returncode == 0, shown.stderr
    assert "chat         redact" in shown.stdout
    bad = run(sqlite_server, org.api_key, "privacy", "set", org.id, "--chat", "nope")
    assert bad.returncode == 1 and "error (400)" in bad.stderr
    reset = run(sqlite_server, org.api_key, "privacy", "reset", org.id, "--json")
    assert reset.returncode == 0 and json.loads(reset.stdout)["is_set"] is False


# --- uploaded files ------------------------------------------------------------------------------


def _decrypted_blobs(server: Server, org: Org, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every blob of the organisation, read back through the key ring (raw, decrypted)."""
    from aiaas.settings import Settings
    from aiaas.storage.process import Storage

    for name, value in server.env.items():
        if name.startswith("AIAAS_"):
            monkeypatch.setenv(name, value)
    storage = Storage.open(Settings(), migrate=False)
    try:
        return [b"".join(storage.blobs.open(key)) for key in storage.blobs.keys(f"files/{org.id}")]
    finally:
        storage.close()


def _upload(server: Server, org: Org, purpose: str, name: str, data: bytes) -> httpx.Response:
    with server.client(org.api_key) as client:
        # httpx writes the form fields before the file: the purpose comes first.
        return client.post("/v1/files", data={"purpose": purpose}, files={"file": (name, data)})


def test_files_by_purpose(sqlite_server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    org = create_org(sqlite_server)
    response = _set_policy(
        sqlite_server, org, files={"fine-tune": "redact", "dataset": "block", "user_data": "detect"}
    )
    assert response.status_code == 200, response.text
    chat = [
        {"messages": [
            {"role": "user", "content": f"My email is {EMAIL} and my phone {PHONE}."},
            {"role": "assistant", "content": f"Noted, card {CARD} is on file."},
        ]}
        for _ in range(3)
    ]  # fmt: skip
    jsonl = "\n".join(json.dumps(line) for line in chat).encode() + b"\n"
    made = _upload(sqlite_server, org, "fine-tune", "chat.jsonl", jsonl)
    assert made.status_code == 200, made.text
    assert made.headers["x-aiaas-pii-redacted"] == "CREDIT_CARD=3,EMAIL=3,PHONE=3"
    assert made.json()["status_details"] == (
        "personal data redacted: CREDIT_CARD=3,EMAIL=3,PHONE=3"
    )
    with sqlite_server.client(org.api_key) as client:
        content = client.get(f"/v1/files/{made.json()['id']}/content").content
    lines = [json.loads(line) for line in content.decode().splitlines()]
    assert lines[0]["messages"][0]["content"] == "My email is <EMAIL> and my phone <PHONE>."
    # Nowhere in the blob store, decrypted or not.
    blobs = _decrypted_blobs(sqlite_server, org, monkeypatch)
    assert blobs
    raw = [p.read_bytes() for p in (sqlite_server.data_dir / "blobs").rglob("*") if p.is_file()]
    for blob in (*blobs, *raw):
        for value in SEEDED:
            assert value.encode() not in blob
    # block: refused with types and lines, nothing stored.
    csv = f"name,contact\nA,{EMAIL}\n".encode()
    before = len(_decrypted_blobs(sqlite_server, org, monkeypatch))
    error = assert_error(_upload(sqlite_server, org, "dataset", "t.csv", csv), 400, "pii_detected")
    assert "line 2" in error["message"] and EMAIL not in error["message"]
    assert len(_decrypted_blobs(sqlite_server, org, monkeypatch)) == before
    # detect: stored as sent, counted.
    made = _upload(sqlite_server, org, "user_data", "notes.txt", csv)
    assert made.status_code == 200, made.text
    assert made.headers["x-aiaas-pii-detected"] == "EMAIL=1"
    # The purpose after the file: refused (it decides how the bytes are written).
    with sqlite_server.client(org.api_key) as client:
        late = client.post(
            "/v1/files",
            files=[("file", ("t.csv", csv)), ("purpose", (None, b"fine-tune"))],
        )
    assert_error(late, 400)
    # Binary content cannot be screened.
    binary = _upload(sqlite_server, org, "fine-tune", "x.bin", b"\xff\xfe\x00garbage")
    assert_error(binary, 400, "pii_unscreenable")


# --- logs ----------------------------------------------------------------------------------------


def test_logs_hold_no_seeded_values(llm_server: Server) -> None:
    """A run full of seeded PII (policy off, redact and block; successes and errors): the
    server's log holds none of the values."""
    tag = secrets.token_hex(6)
    email, ip = f"pii-{tag}@example.org", f"10.{int(tag[:2], 16)}.{int(tag[2:4], 16)}.77"
    prompt = f"Contact {email} from host {ip} about the account, please."
    off, redact, block = (create_org(llm_server) for _ in range(3))
    assert _set_policy(llm_server, redact, chat="redact", completions="redact").status_code == 200
    assert _set_policy(llm_server, block, chat="block", embeddings="block").status_code == 200
    messages = [{"role": "user", "content": prompt}]
    for org in (off, redact, block):
        client = _openai(llm_server, org)
        for call in (
            lambda c=client: c.chat.completions.create(
                model=CHAT_MODEL, messages=messages, max_tokens=8
            ),
            lambda c=client: c.chat.completions.create(
                model=CHAT_MODEL, messages=messages, max_tokens=4, stream=True
            ),
            lambda c=client: c.completions.create(model=BASE_MODEL, prompt=prompt, max_tokens=4),
            lambda c=client: c.embeddings.create(model=EMBED_MODEL, input=[prompt]),
            lambda c=client: c.chat.completions.create(model="no-such-model", messages=messages),
            lambda c=client: c.chat.completions.create(
                model=CHAT_MODEL, messages=messages, temperature=9
            ),
        ):
            try:
                result = call()
                if isinstance(result, openai.Stream):
                    list(result)
            except openai.APIError as exc:
                assert email not in str(exc.body) and ip not in str(exc.body)
    logs = llm_server.stderr_path.read_bytes() + llm_server.stdout_path.read_bytes()
    assert logs  # the server does log these requests
    for value in (email, ip, tag):
        assert value.encode() not in logs, value
