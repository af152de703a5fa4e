"""The Files API through HTTP, with the official `openai` client where it has a method."""

from __future__ import annotations

import io
import json
import os
import secrets
import signal
import socket
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import openai
import pytest

from tests.conftest import Org, Server, assert_error, create_org

CHAT_EXAMPLE = {
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
}


def openai_client(server: Server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key, max_retries=0)


def blob_files(server: Server, org_id: str) -> list[Path]:
    root = server.data_dir / "blobs" / "files" / org_id
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def temp_files(server: Server) -> list[Path]:
    return sorted((server.data_dir / "blobs" / ".tmp").glob("*"))


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_bytes_round_trip_and_rest_encrypted(server: Server, org: Org) -> None:
    client = openai_client(server, org.api_key)
    marker = b"plaintext-marker-" + secrets.token_hex(8).encode()
    payload = marker + os.urandom(3 * 1024 * 1024 + 17) + marker
    created = client.files.create(file=("blob.bin", payload), purpose="user_data")
    assert created.bytes == len(payload)
    assert created.filename == "blob.bin" and created.purpose == "user_data"
    assert created.status == "processed" and created.id.startswith("file-")
    assert client.files.retrieve(created.id).bytes == len(payload)
    assert client.files.content(created.id).content == payload
    [stored] = blob_files(server, org.id)
    assert marker not in stored.read_bytes()  # only ciphertext at rest
    client.files.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(created.id)
    assert blob_files(server, org.id) == []


def test_list_filters_by_purpose_and_pages(server: Server, org: Org) -> None:
    client = openai_client(server, org.api_key)
    chat = json.dumps(CHAT_EXAMPLE).encode() + b"\n"
    tuned = [client.files.create(file=(f"t{i}.jsonl", chat), purpose="fine-tune") for i in range(3)]
    other = client.files.create(file=("notes.txt", b"hello"), purpose="user_data")
    newest_first = [f.id for f in client.files.list()]
    assert newest_first == [other.id, *reversed([f.id for f in tuned])]
    assert [f.id for f in client.files.list(purpose="fine-tune")] == [f.id for f in reversed(tuned)]
    with server.client(org.api_key) as http:
        page = http.get("/v1/files", params={"limit": 2, "order": "asc"}).json()
        assert [f["id"] for f in page["data"]] == [tuned[0].id, tuned[1].id]
        assert page["has_more"] is True
        rest = http.get(
            "/v1/files", params={"limit": 2, "order": "asc", "after": page["last_id"]}
        ).json()
        assert [f["id"] for f in rest["data"]] == [tuned[2].id, other.id]
        assert rest["has_more"] is False


def test_another_org_gets_404_on_every_file_route(server: Server, org: Org) -> None:
    other = create_org(server)
    created = openai_client(server, org.api_key).files.create(
        file=("secret.txt", b"org A's data"), purpose="user_data"
    )
    with server.client(other.api_key) as http:
        for response in (
            http.get(f"/v1/files/{created.id}"),
            http.get(f"/v1/files/{created.id}/content"),
            http.delete(f"/v1/files/{created.id}"),
        ):
            assert_error(response, 404, "not_found")
        assert http.get("/v1/files").json()["data"] == []
    with server.client(server.admin_key, **{"OpenAI-Organization": org.id}) as http:
        assert http.get(f"/v1/files/{created.id}").status_code == 200


def test_fine_tune_files_are_validated_naming_the_line(sqlite_server: Server) -> None:
    org = create_org(sqlite_server)
    client = openai_client(sqlite_server, org.api_key)
    good = (json.dumps(CHAT_EXAMPLE) + "\n") * 3
    assert client.files.create(file=("ok.jsonl", good.encode()), purpose="fine-tune").bytes
    no_assistant = {"messages": [{"role": "user", "content": "hi"}]}
    cases = {
        "line 3 is not valid JSON": good.splitlines()[0] + "\n\n{oops\n",
        "line 2 has no assistant message": good.splitlines()[0] + "\n" + json.dumps(no_assistant),
        "line 1 must be a JSON object": "[1, 2]\n",
        "message 0 has role 'robot'": json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
    }
    for expected, text in cases.items():
        with pytest.raises(openai.BadRequestError) as info:
            client.files.create(file=("bad.jsonl", text.encode()), purpose="fine-tune")
        assert expected in info.value.message, info.value.message
        assert info.value.code == "invalid_file_format"
    assert len(client.files.list().data) == 1
    assert blob_files(sqlite_server, org.id) and len(blob_files(sqlite_server, org.id)) == 1


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "b0undary") -> bytes:
    out = io.BytesIO()
    for name, filename, data in parts:
        out.write(f"--{boundary}\r\n".encode())
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out.write(f"Content-Disposition: {disposition}\r\n\r\n".encode())
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue()


def test_purpose_may_follow_the_file(sqlite_server: Server) -> None:
    org = create_org(sqlite_server)
    headers = {"Content-Type": "multipart/form-data; boundary=b0undary"}
    with sqlite_server.client(org.api_key) as http:
        good = multipart(
            [
                ("file", "a.jsonl", json.dumps(CHAT_EXAMPLE).encode()),
                ("purpose", None, b"fine-tune"),
            ]
        )
        created = http.post("/v1/files", content=good, headers=headers)
        assert created.status_code == 200, created.text
        assert created.json()["purpose"] == "fine-tune"
        bad = multipart([("file", "a.jsonl", b"not json"), ("purpose", None, b"fine-tune")])
        assert (
            "line 1"
            in assert_error(http.post("/v1/files", content=bad, headers=headers), 400)["message"]
        )
        assert [f["id"] for f in http.get("/v1/files").json()["data"]] == [created.json()["id"]]


def test_bad_uploads_are_4xx(sqlite_server: Server) -> None:
    org = create_org(sqlite_server)
    headers = {"Content-Type": "multipart/form-data; boundary=b0undary"}
    with sqlite_server.client(org.api_key) as http:
        bad_purpose = http.post(
            "/v1/files", files={"file": ("a.txt", b"x")}, data={"purpose": "weights"}
        )
        assert assert_error(bad_purpose, 400)["param"] == "purpose"
        no_purpose = http.post("/v1/files", files={"file": ("a.txt", b"x")})
        assert assert_error(no_purpose, 400)["param"] == "purpose"
        no_file = http.post(
            "/v1/files", files={"other": ("a.txt", b"x")}, data={"purpose": "batch"}
        )
        assert assert_error(no_file, 400)["param"] == "file"
        two_files = multipart(
            [("purpose", None, b"user_data"), ("file", "a", b"1"), ("file", "b", b"2")]
        )
        assert_error(http.post("/v1/files", content=two_files, headers=headers), 400)
        truncated = multipart([("purpose", None, b"user_data"), ("file", "a", b"123")])[:-30]
        assert_error(http.post("/v1/files", content=truncated, headers=headers), 400)
        as_json = http.post("/v1/files", json={"file": "x", "purpose": "batch"})
        assert_error(as_json, 415, "unsupported_media_type")
        assert http.get("/v1/files").json()["data"] == []
    assert blob_files(sqlite_server, org.id) == []


def test_hostile_multipart_bodies_are_400(sqlite_server: Server) -> None:
    org = create_org(sqlite_server)
    b = "b0undary"
    file_part = 'Content-Disposition: form-data; name="file"; filename="a"\r\n\r\nxx\r\n'
    bodies = {
        "many part headers": f"--{b}\r\n"
        + "".join(f"X-H{i}: v\r\n" for i in range(50))
        + file_part
        + f"--{b}--\r\n",
        "huge part header": f'--{b}\r\nContent-Disposition: form-data; name="file"; '
        f'filename="{"a" * 10000}"\r\n\r\nxx\r\n--{b}--\r\n',
        "not multipart at all": "\x00\x01garbage" * 100,
        "a part without a name": f'--{b}\r\nContent-Disposition: form-data; filename="a"'
        f"\r\n\r\nxx\r\n--{b}--\r\n",
        "too many fields": "".join(
            f'--{b}\r\nContent-Disposition: form-data; name="f{i}"\r\n\r\nv\r\n' for i in range(40)
        )
        + f"--{b}--\r\n",
        "an empty body": "",
    }
    with sqlite_server.client(org.api_key) as http:
        for what, body in bodies.items():
            response = http.post(
                "/v1/files",
                content=body.encode(),
                headers={"Content-Type": f"multipart/form-data; boundary={b}"},
            )
            assert response.status_code == 400, (what, response.text)
            assert_error(response, 400)
        no_boundary = http.post(
            "/v1/files", content=b"x", headers={"Content-Type": "multipart/form-data"}
        )
        assert assert_error(no_boundary, 400)["param"] == "Content-Type"
        assert http.get("/v1/files").json()["data"] == []


def test_reader_keys_cannot_upload(sqlite_server: Server) -> None:
    org = create_org(sqlite_server)
    with sqlite_server.client(org.api_key) as http:
        reader = http.post("/v1/api_keys", json={"name": "r", "role": "reader"}).json()["value"]
    with sqlite_server.client(reader) as http:
        denied = http.post("/v1/files", files={"file": ("a", b"x")}, data={"purpose": "batch"})
        assert_error(denied, 403)
        assert http.get("/v1/files").status_code == 200


@pytest.fixture(scope="module")
def small_limit_server(make_server: Callable[..., Server]) -> Server:
    server = make_server("sqlite", max_file_bytes="65536")
    server.start()
    return server


def test_an_oversize_file_is_413_and_leaves_nothing(small_limit_server: Server) -> None:
    org = create_org(small_limit_server)
    with small_limit_server.client(org.api_key) as http:
        response = http.post(
            "/v1/files", files={"file": ("big.bin", os.urandom(70_000))}, data={"purpose": "batch"}
        )
        assert_error(response, 413)
        streamed = http.post(
            "/v1/files",
            content=_chunked(
                multipart([("purpose", None, b"batch"), ("file", "f", b"x" * 200_000)])
            ),
            headers={"Content-Type": "multipart/form-data; boundary=b0undary"},
        )
        assert_error(streamed, 413)
        assert http.get("/v1/files").json()["data"] == []
    assert blob_files(small_limit_server, org.id) == []


def _chunked(body: bytes, size: int = 8192):  # no Content-Length: the limit applies while reading
    for start in range(0, len(body), size):
        yield body[start : start + size]


def _start_upload(server: Server, key: str, body: bytes, sent: int) -> socket.socket:
    """Send the headers and the first `sent` bytes of an upload, then stop."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    head = (
        "POST /v1/files HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{server.port}\r\n"
        f"Authorization: Bearer {key}\r\n"
        "Content-Type: multipart/form-data; boundary=b0undary\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body[:sent])
    return sock


def _rows(server: Server) -> list[tuple[str, str]]:
    with sqlite3.connect(server.data_dir / "aiaas.db") as db:
        return db.execute("SELECT id, status FROM files").fetchall()


def test_a_client_that_drops_mid_upload_leaves_no_file(sqlite_server: Server) -> None:
    org = create_org(sqlite_server)
    body = multipart([("purpose", None, b"user_data"), ("file", "f.bin", os.urandom(2_000_000))])
    before = _rows(sqlite_server)
    sock = _start_upload(sqlite_server, org.api_key, body, sent=1_000_000)
    wait_for(lambda: len(_rows(sqlite_server)) > len(before), "the upload to begin")
    sock.close()
    wait_for(lambda: _rows(sqlite_server) == before, "the half upload to be removed")
    with sqlite_server.client(org.api_key) as http:
        assert http.get("/v1/files").json()["data"] == []
    assert blob_files(sqlite_server, org.id) == []
    wait_for(lambda: temp_files(sqlite_server) == [], "the temp file to go")


def test_a_server_killed_mid_upload_restarts_clean(make_server: Callable[..., Server]) -> None:
    server = make_server("sqlite")
    server.start()
    org = create_org(server)
    body = multipart([("purpose", None, b"user_data"), ("file", "f.bin", os.urandom(2_000_000))])
    sock = _start_upload(server, org.api_key, body, sent=1_000_000)
    wait_for(lambda: temp_files(server) != [], "the upload to reach the blob store")
    assert server.process is not None
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    sock.close()
    assert [status for _, status in _rows(server)] == ["uploading"]
    server.start()
    with server.client(org.api_key) as http:
        assert http.get("/v1/files").json()["data"] == []
    assert temp_files(server) == []
    assert blob_files(server, org.id) == []
    # Abandoned uploads are removed after a grace period (another replica may still be writing);
    # until then the row is invisible and a later start removes it.
    assert [status for _, status in _rows(server)] in (["uploading"], [])
    server.stop()


def test_download_streams_with_length_and_filename(sqlite_server: Server) -> None:
    org = create_org(sqlite_server)
    client = openai_client(sqlite_server, org.api_key)
    created = client.files.create(file=("résumé data.csv", b"a,b\n1,2\n"), purpose="dataset")
    with sqlite_server.client(org.api_key) as http:
        response = http.get(f"/v1/files/{created.id}/content")
    assert response.headers["content-length"] == "8"
    assert "r%C3%A9sum%C3%A9%20data.csv" in response.headers["content-disposition"]
    assert response.content == b"a,b\n1,2\n"
    assert created.purpose == "dataset"


def test_uploads_are_audited(sqlite_server: Server) -> None:
    org = create_org(sqlite_server)
    created = openai_client(sqlite_server, org.api_key).files.create(
        file=("a.txt", b"x"), purpose="user_data"
    )
    with sqlite_server.client(org.api_key) as http:
        http.delete(f"/v1/files/{created.id}")
        events = http.get("/v1/audit").json()["data"]
    actions = [(e["type"], e["target"]["id"]) for e in events]
    assert ("file.created", created.id) in actions and ("file.deleted", created.id) in actions


def test_filenames_are_cleaned(sqlite_server: Server) -> None:
    org = create_org(sqlite_server)
    with sqlite_server.client(org.api_key) as http:
        created = http.post(
            "/v1/files",
            files={"file": ("../../etc/passwd", b"x")},
            data={"purpose": "user_data"},
        ).json()
    assert created["filename"] == "passwd"
