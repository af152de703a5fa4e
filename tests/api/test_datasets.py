"""Datasets through HTTP: made from uploaded files, profiled, split, redacted, versioned."""

from __future__ import annotations

import io
import random
import zipfile
from collections.abc import Callable

import numpy as np
import openai
import pandas as pd
import pytest
from PIL import Image

from tests.conftest import Org, Server, assert_error, create_org


def upload(server: Server, org: Org, filename: str, data: bytes) -> str:
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=org.api_key, max_retries=0)
    return client.files.create(file=(filename, data), purpose="dataset").id


def mixed_csv(rows: int = 300, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "age": rng.integers(18, 90, rows),
            "height": rng.normal(170, 10, rows).round(2),
            "member": rng.choice([True, False], rows),
            "color": rng.choice(["red", "green", "blue"], rows),
            "review": [
                f"the product number {i} was {rng.choice(['great', 'fine', 'poor'])} overall"
                for i in range(rows)
            ],
            "joined": pd.date_range("2020-01-01", periods=rows, freq="D").strftime("%Y-%m-%d"),
            "label": rng.choice(["cat", "dog", "bird"], rows, p=[0.5, 0.3, 0.2]),
        }
    )
    frame["age"] = frame["age"].astype("Int64")
    frame.loc[frame.index % 10 == 3, "age"] = pd.NA
    frame.loc[frame.index % 25 == 0, "color"] = None
    return frame.to_csv(index=False).encode()


def test_a_csv_with_mixed_types_yields_its_schema(server: Server, org: Org) -> None:
    file_id = upload(server, org, "people.csv", mixed_csv())
    with server.client(org.api_key) as http:
        created = http.post("/v1/datasets", json={"name": "people", "file_ids": [file_id]})
        assert created.status_code == 201, created.text
        dataset = created.json()
        version = dataset["version"]
    assert dataset["latest_version"] == 1 and version["version"] == 1
    columns = {c["name"]: c for c in version["columns"]}
    assert {name: c["type"] for name, c in columns.items()} == {
        "age": "integer",
        "height": "float",
        "member": "boolean",
        "color": "categorical",
        "review": "text",
        "joined": "datetime",
        "label": "categorical",
    }
    assert columns["age"]["missing"] == 30 and columns["color"]["missing"] == 12
    assert columns["height"]["missing"] == 0
    assert version["label_column"] == "label" and version["task"] == "classification"
    assert sum(version["class_balance"].values()) == 300
    assert version["rows"] == 300 and sum(version["splits"].values()) == 300
    assert version["splits"] == {"train": 240, "validation": 30, "test": 30}
    assert len(version["preview"]) == 20
    assert version["content_hash"].startswith("sha256:") and version["format"] == "csv"
    spec = version["preprocessing"]
    assert spec["fitted"] is True and spec["label"]["classes"] == ["bird", "cat", "dog"]
    kinds = {step["column"]: step["kind"] for step in spec["features"]}
    assert kinds == {
        "age": "numeric",
        "height": "numeric",
        "member": "categorical",
        "color": "categorical",
        "review": "text",
    }


def test_versions_are_immutable_and_hashed(sqlite_server: Server) -> None:
    org = create_org(sqlite_server)
    first = upload(sqlite_server, org, "a.csv", mixed_csv(seed=1))
    second = upload(sqlite_server, org, "b.csv", mixed_csv(seed=2))
    with sqlite_server.client(org.api_key) as http:
        dataset = http.post("/v1/datasets", json={"name": "d", "file_ids": [first]}).json()
        url = f"/v1/datasets/{dataset['id']}"
        v2 = http.post(f"{url}/versions", json={"file_ids": [second]}).json()
        v3 = http.post(f"{url}/versions", json={"file_ids": [first]}).json()
        assert [v2["version"], v3["version"]] == [2, 3]
        assert v3["content_hash"] == dataset["version"]["content_hash"] != v2["content_hash"]
        assert http.get(url).json()["latest_version"] == 3
        assert http.get(f"{url}/versions/1").json() == dataset["version"]
        listed = http.get(f"{url}/versions").json()["data"]
        assert [v["version"] for v in listed] == [1, 2, 3]
        parquet = http.get(f"{url}/versions/2/content").content
        stored = pd.read_parquet(io.BytesIO(parquet))
        assert len(stored) == 300 and "__split__" in stored.columns
        assert http.delete(f"{url}/versions/2").json()["deleted"] is True
        assert_error(http.get(f"{url}/versions/2"), 404)
        assert [v["version"] for v in http.get(f"{url}/versions").json()["data"]] == [1, 3]
        assert_error(http.post("/v1/datasets", json={"name": "d", "file_ids": [first]}), 409)


def test_splits_are_deterministic_and_stratified(sqlite_server: Server) -> None:
    org = create_org(sqlite_server)
    file_id = upload(sqlite_server, org, "a.csv", mixed_csv(rows=500, seed=3))
    split = {"seed": 7, "train": 0.6, "validation": 0.2, "test": 0.2}

    def assignments(name: str, **extra: object) -> list[str]:
        with sqlite_server.client(org.api_key) as http:
            body = {"name": name, "file_ids": [file_id], "split": {**split, **extra}}
            dataset = http.post("/v1/datasets", json=body).json()
            rows = http.get(
                f"/v1/datasets/{dataset['id']}/versions/1/rows", params={"limit": 1000}
            ).json()
        assert rows["total"] == 500
        return [r["__split__"] for r in rows["data"]], [r["label"] for r in rows["data"]]

    one, labels = assignments("s1")
    two, _ = assignments("s2")
    other_seed, _ = assignments("s3", seed=8)
    assert one == two and one != other_seed
    for label in set(labels):
        mine = [s for s, lab in zip(one, labels, strict=True) if lab == label]
        assert abs(mine.count("train") / len(mine) - 0.6) < 0.02


def test_another_org_gets_404_on_every_dataset_route(server: Server, org: Org) -> None:
    other = create_org(server)
    file_id = upload(server, org, "a.csv", mixed_csv(rows=50))
    with server.client(org.api_key) as http:
        dataset = http.post("/v1/datasets", json={"name": "mine", "file_ids": [file_id]}).json()
    url = f"/v1/datasets/{dataset['id']}"
    with server.client(other.api_key) as http:
        for response in (
            http.get(url),
            http.get(f"{url}/versions"),
            http.get(f"{url}/versions/1"),
            http.get(f"{url}/versions/1/content"),
            http.get(f"{url}/versions/1/rows"),
            http.post(f"{url}/versions", json={"file_ids": [file_id]}),
            http.delete(f"{url}/versions/1"),
            http.delete(url),
            http.post("/v1/datasets", json={"name": "theirs", "file_ids": [file_id]}),
        ):
            assert_error(response, 404)
        assert http.get("/v1/datasets").json()["data"] == []
    with server.client(org.api_key) as http:
        assert http.get(f"{url}/versions/1").status_code == 200


def pii_frame(seed: int) -> tuple[pd.DataFrame, dict[str, str]]:
    """Rows of ordinary text with one seeded PII value each, and the values seeded."""
    seeded = {
        "email": "jane.roe@example.org",
        "phone": "+44 20 7946 0958",
        "credit_card": "4111 1111 1111 1111",
        "iban": "DE89 3704 0044 0532 0130 00",
        "ip_address": "192.168.17.42",
        "national_id": "SSN 123-45-6789",
        "person": "Maria Garcia",
    }
    rng = random.Random(seed)
    notes, kinds = [], []
    for i in range(70):
        kind = list(seeded)[i % len(seeded)]
        notes.append(f"ticket {i}: please reach {seeded[kind]} about the order")
        kinds.append(kind)
    frame = pd.DataFrame(
        {
            "note": notes,
            "kind": kinds,
            "amount": [round(rng.uniform(1, 100), 2) for _ in notes],
            "label": [i % 2 for i in range(len(notes))],
        }
    )
    return frame, seeded


def test_redaction_finds_seeded_pii_and_keeps_the_rest(sqlite_server: Server) -> None:
    org = create_org(sqlite_server)
    frame, seeded = pii_frame(seed=4)
    file_id = upload(sqlite_server, org, "tickets.csv", frame.to_csv(index=False).encode())
    with sqlite_server.client(org.api_key) as http:
        body = {"name": "tickets", "file_ids": [file_id], "redact_pii": True}
        dataset = http.post("/v1/datasets", json=body).json()
        version = dataset["version"]
        rows = http.get(
            f"/v1/datasets/{dataset['id']}/versions/1/rows", params={"limit": 1000}
        ).json()["data"]
    report = {c["column"]: c for c in version["pii"]["columns"]}
    assert report["note"]["rows_affected"] == 70
    assert report["note"]["counts"] == {kind: 10 for kind in seeded}
    by_ticket = {int(r["note"].split(":")[0].split()[1]): r for r in rows}
    for i, original in enumerate(frame["note"]):
        kind = frame["kind"][i]
        redacted = by_ticket[i]["note"]
        assert seeded[kind].split()[-1] not in redacted
        placeholder = f"[{kind.upper()}]"
        prefix = "SSN " if kind == "national_id" else ""
        assert redacted == original.replace(seeded[kind], prefix + placeholder), redacted
        assert by_ticket[i]["amount"] == frame["amount"][i]
    assert all(seeded["email"] not in str(r) for r in version["preview"])


def test_an_org_that_redacts_always_redacts(sqlite_server: Server) -> None:
    org = create_org(sqlite_server)
    with sqlite_server.client(org.api_key) as http:
        updated = http.post(f"/v1/organizations/{org.id}", json={"redact_pii": True})
        assert updated.json()["redact_pii"] is True
    frame, _ = pii_frame(seed=5)
    file_id = upload(sqlite_server, org, "t.csv", frame.to_csv(index=False).encode())
    with sqlite_server.client(org.api_key) as http:
        body = {"name": "t", "file_ids": [file_id], "redact_pii": False}
        version = http.post("/v1/datasets", json=body).json()["version"]
    assert version["pii"]["redacted"] is True
    assert "jane.roe@example.org" not in str(version["preview"])


def png(color: tuple[int, int, int], size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def image_zip(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_an_image_zip_becomes_an_image_dataset(sqlite_server: Server) -> None:
    org = create_org(sqlite_server)
    entries = {f"shapes/red/{i}.png": png((200 + i, 0, 0)) for i in range(6)}
    entries |= {f"shapes/blue/{i}.png": png((0, 0, 200 + i)) for i in range(6)}
    file_id = upload(sqlite_server, org, "shapes.zip", image_zip(entries))
    with sqlite_server.client(org.api_key) as http:
        dataset = http.post("/v1/datasets", json={"name": "shapes", "file_ids": [file_id]}).json()
        version = dataset["version"]
        rows = http.get(f"/v1/datasets/{dataset['id']}/versions/1/rows").json()["data"]
    assert version["format"] == "image_zip" and version["rows"] == 12
    assert version["class_balance"] == {"red": 6, "blue": 6}
    [step] = version["preprocessing"]["features"]
    assert step["kind"] == "image" and step["column"] == "image"
    import base64

    decoded = Image.open(io.BytesIO(base64.b64decode(rows[0]["image"])))
    assert decoded.size == (8, 8)


def test_parquet_and_jsonl_sources(sqlite_server: Server) -> None:
    org = create_org(sqlite_server)
    frame = pd.read_csv(io.BytesIO(mixed_csv(rows=40)))
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    parquet_id = upload(sqlite_server, org, "t.parquet", buffer.getvalue())
    jsonl_id = upload(
        sqlite_server, org, "t.jsonl", frame.to_json(orient="records", lines=True).encode()
    )
    with sqlite_server.client(org.api_key) as http:
        for name, file_id, fmt in (("pq", parquet_id, "parquet"), ("js", jsonl_id, "jsonl")):
            version = http.post("/v1/datasets", json={"name": name, "file_ids": [file_id]}).json()[
                "version"
            ]
            assert version["format"] == fmt and version["rows"] == 40
            assert version["label_column"] == "label"


def zip_bomb() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("a/bomb.png", "w") as entry:
            zeros = bytes(1 << 20)
            for _ in range(200):
                entry.write(zeros)
        archive.writestr("b/ok.png", png((1, 2, 3)))
    return buffer.getvalue()


BAD_SOURCES: dict[str, tuple[str, Callable[[], bytes], int, str]] = {
    "ragged csv": ("r.csv", lambda: b"a,b,label\n1,2,x\n3,4,5,y\n", 400, "line 3"),
    "non-utf8 csv": ("e.csv", lambda: b"a,label\n\xff\xfe,x\n", 400, ""),
    "empty csv": ("e.csv", lambda: b"a,label\n", 400, ""),
    "bad jsonl": ("j.jsonl", lambda: b'{"a": 1, "label": 0}\n{oops\n', 400, "line 2"),
    "not an object": ("j.jsonl", lambda: b'{"a": 1, "label": 0}\n[1]\n', 400, "line 2"),
    "corrupt parquet": ("p.parquet", lambda: b"PAR1" + b"\x00" * 64 + b"PAR1", 400, ""),
    "png named csv": ("x.csv", lambda: png((0, 0, 0)), 400, ""),
    "zip bomb": ("z.zip", zip_bomb, 400, "bomb"),
    "path traversal": (
        "t.zip",
        lambda: image_zip({"../evil/a.png": png((1, 1, 1)), "ok/b.png": png((2, 2, 2))}),
        400,
        "..",
    ),
    "absolute path": (
        "t.zip",
        lambda: image_zip({"/etc/a.png": png((1, 1, 1)), "ok/b.png": png((2, 2, 2))}),
        400,
        "",
    ),
    "one class": ("o.zip", lambda: image_zip({"only/a.png": png((1, 1, 1))}), 400, "class"),
}


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_sources_are_4xx_and_leave_no_dataset(sqlite_server: Server, case: str) -> None:
    org = create_org(sqlite_server)
    filename, make, status, fragment = BAD_SOURCES[case]
    file_id = upload(sqlite_server, org, filename, make())
    with sqlite_server.client(org.api_key) as http:
        response = http.post("/v1/datasets", json={"name": "bad", "file_ids": [file_id]})
        error = assert_error(response, status)
        assert fragment.lower() in error["message"].lower(), error
        assert http.get("/v1/datasets").json()["data"] == []
    assert not list((sqlite_server.data_dir / "blobs" / "datasets" / org.id).glob("*"))


def test_bad_requests_are_4xx(sqlite_server: Server) -> None:
    org = create_org(sqlite_server)
    file_id = upload(sqlite_server, org, "a.csv", mixed_csv(rows=30))
    with sqlite_server.client(org.api_key) as http:
        cases = [
            ({"name": "x", "file_ids": []}, 400),
            ({"name": "x", "file_ids": ["file-nope"]}, 404),
            ({"name": "x", "file_ids": [file_id], "label_column": "nope"}, 400),
            ({"name": "x", "file_ids": [file_id], "task": "regression"}, 400),
            ({"name": "x", "file_ids": [file_id], "split": {"train": 0.9, "test": 0.9}}, 400),
            ({"name": "x", "file_ids": [file_id, file_id]}, 400),
            (
                {
                    "name": "x",
                    "file_ids": [file_id],
                    "features": [{"kind": "numeric", "column": "nope"}],
                },
                400,
            ),
            ({"name": "x", "file_ids": [file_id], "format": "parquet"}, 400),
        ]
        for body, status in cases:
            assert_error(http.post("/v1/datasets", json=body), status)
        assert http.get("/v1/datasets").json()["data"] == []
        made = http.post("/v1/datasets", json={"name": "x", "file_ids": [file_id]})
        assert made.status_code == 201, made.text


def test_deleting_a_dataset_removes_its_blobs(sqlite_server: Server) -> None:
    org = create_org(sqlite_server)
    file_id = upload(sqlite_server, org, "a.csv", mixed_csv(rows=30))
    blobs = sqlite_server.data_dir / "blobs" / "datasets" / org.id
    with sqlite_server.client(org.api_key) as http:
        dataset = http.post("/v1/datasets", json={"name": "x", "file_ids": [file_id]}).json()
        http.post(f"/v1/datasets/{dataset['id']}/versions", json={"file_ids": [file_id]})
        assert len(list(blobs.glob("*"))) == 2
        assert http.delete(f"/v1/datasets/{dataset['id']}").json()["deleted"] is True
        assert_error(http.get(f"/v1/datasets/{dataset['id']}"), 404)
        assert (
            http.post("/v1/datasets", json={"name": "x", "file_ids": [file_id]}).status_code == 201
        )
    assert len(list(blobs.glob("*"))) == 1
