"""Attributions/s: ours (`POST /v1/explanations`, and `Explainer` in-process) against captum called
directly on the same torch module, per method, on the MLP, CNN and LSTM models.

Ours trains the three models through its own API on generated data (a column, a quadrant or a
word decides the class) and deploys them. The bench downloads each version's weights, rebuilds
the very torch module the server explains with, and runs captum on it the plain way a user
would (defaults: no perturbation batching, one KernelSHAP model per record), with the same
method settings, baselines and feature groups. Each (model, method) is timed in alternating
rounds after a warm-up; the table shows records explained per second (median round) and ours'
ratio to direct captum. Goal: the HTTP path at >= 0.9x direct captum.

    .venv/bin/python bench/explain.py
    .venv/bin/python bench/explain.py --quick --models mlp

The markdown table goes to stdout, progress to stderr; the exit status is 1 if a step failed.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import torch
from aiaas.specs.preprocessing import PreprocessingSpec, transform
from aiaas.specs.shapes import model_inputs
from aiaas.training.explain import Explainer, Options
from PIL import Image

from server import ServerProcess, free_port

log = logging.getLogger("bench")

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
LOGS = BENCH_DIR / ".cache" / "logs"
GOAL = 0.9
METHODS = {
    "mlp": (
        "integrated_gradients",
        "shapley_sampling",
        "kernel_shap",
        "feature_ablation",
        "occlusion",
    ),
    "cnn": (
        "integrated_gradients",
        "occlusion",
        "feature_ablation",
        "shapley_sampling",
        "kernel_shap",
    ),
    "lstm": (
        "integrated_gradients",
        "attention",
        "feature_ablation",
        "occlusion",
        "shapley_sampling",
        "kernel_shap",
    ),
}
RECORDS = {"mlp": 64, "cnn": 16, "lstm": 32}  # per request
SIZE = 16  # image side, pixels
WORDS = ["the", "a", "movie", "was", "it", "my", "book", "today", "quite", "very", "our", "show"]


@dataclass
class Model:
    kind: str
    name: str  # the deployment
    explainer: Explainer
    body: dict[str, Any]  # the request's inputs (records, texts or images)
    inputs: dict[str, np.ndarray]  # the same, encoded


@dataclass
class Row:
    kind: str
    method: str
    records: int
    direct: float  # records/s
    in_process: float
    http: float


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="aiaas-bench-explain-") as tmp:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        data_dir = Path(tmp) / "data"
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIAAS_")}
        env |= {
            "AIAAS_DATA_DIR": str(data_dir),
            "AIAAS_MODELS": "",
            "AIAAS_LOG_LEVEL": "warning",
            "AIAAS_TRAINING_THREADS": str(args.threads),
            "AIAAS_CLASSIC_THREADS": str(args.threads),
            # torch's intra-op threads in the server, as in this process (set_num_threads).
            "OMP_NUM_THREADS": str(args.threads),
        }
        argv_ = [sys.executable, "-m", "aiaas", "serve", "--port", str(port)]
        log_path = LOGS / "explain-ours.log"
        try:
            with ServerProcess("ours", argv_, env=env, log_path=log_path, cwd=REPO) as server:
                server.wait_healthy(f"{base}/health", timeout_s=120)
                with httpx.Client(base_url=base, timeout=600) as http:
                    admin = (data_dir / "admin-key").read_text().strip()
                    org = _ok(
                        http.post(
                            "/v1/organizations",
                            json={"name": "bench"},
                            headers={"Authorization": f"Bearer {admin}"},
                        )
                    )
                    http.headers["Authorization"] = f"Bearer {org['api_key']}"
                    for kind in args.models:
                        model = _model(http, kind)
                        for method in METHODS[kind]:
                            if args.methods and method not in args.methods:
                                continue
                            rows.append(_measure(http, model, method, args.rounds))
                            log.info("%s", _line(rows[-1]))
        except (RuntimeError, OSError, httpx.HTTPError, ValueError) as exc:
            log.error("bench failed: %s", exc)
            _report(rows, args)
            return 1
    _report(rows, args)
    return 0


def _ok(response: httpx.Response) -> Any:
    if not response.is_success:
        raise RuntimeError(
            f"{response.request.method} {response.request.url.path}: "
            f"{response.status_code} {response.text[:300]}"
        )
    return response.json()


# -- models: train, deploy, rebuild ------------------------------------------------------------


def _model(http: httpx.Client, kind: str) -> Model:
    log.info("training and deploying the %s", kind)
    rng = np.random.default_rng(0)
    if kind == "mlp":
        frame = _tabular(600, rng)
        dataset = _dataset(http, "table.csv", frame.to_csv(index=False).encode(), {})
        body = {"records": _rows(_tabular(RECORDS[kind], rng).drop(columns=["label"]))}
        epochs = 10
    elif kind == "cnn":
        image = {"kind": "image", "column": "image", "size": [SIZE, SIZE], "channels": 1}
        dataset = _dataset(http, "images.zip", _image_zip(120, rng), {"features": [image]})
        pngs = [_png(i % 2 == 0, rng) for i in range(RECORDS[kind])]
        body = {"images": [base64.b64encode(p).decode() for p in pngs]}
        epochs = 6
    else:
        text = {"kind": "text", "column": "text", "max_length": 16}
        texts, labels = _texts(400, rng)
        frame = pd.DataFrame({"text": texts, "label": labels})
        dataset = _dataset(
            http, "texts.csv", frame.to_csv(index=False).encode(), {"features": [text]}
        )
        body = {"texts": _texts(RECORDS[kind], rng)[0]}
        epochs = 6
    job = _ok(
        http.post(
            "/v1/fine_tuning/jobs",
            json={
                "model": kind,
                "training_file": dataset["version"]["id"],
                "seed": 1,
                "hyperparameters": {"n_epochs": epochs},
            },
        )
    )
    while job["status"] not in ("succeeded", "failed", "cancelled"):
        time.sleep(0.5)
        job = _ok(http.get(f"/v1/fine_tuning/jobs/{job['id']}"))
    if job["status"] != "succeeded":
        raise RuntimeError(f"training the {kind} ended {job['status']}: {job.get('error')}")
    name = job["fine_tuned_model"]
    _ok(http.post("/v1/deployments", json={"model": name}))
    artifacts = f"/v1/models/{name}/versions/1/artifacts"
    description = json.loads(http.get(f"{artifacts}/model.json").content)
    spec = PreprocessingSpec.model_validate_json(
        http.get(f"{artifacts}/preprocessing.json").content
    )
    weights = http.get(f"{artifacts}/model.safetensors").content
    explainer = Explainer.load(description=description, spec=spec, weights=weights)
    if "records" in body:
        frame = pd.DataFrame(body["records"])
    elif "texts" in body:
        frame = pd.DataFrame({"text": body["texts"]})
    else:
        frame = pd.DataFrame({"image": [base64.b64decode(b) for b in body["images"]]})
    inputs = model_inputs(transform(spec, frame), explainer.shape, explainer.input_names)
    return Model(kind, name, explainer, body, inputs)


def _dataset(http: httpx.Client, filename: str, data: bytes, options: dict[str, Any]) -> Any:
    upload = _ok(
        http.post("/v1/files", data={"purpose": "dataset"}, files={"file": (filename, data)})
    )
    return _ok(
        http.post("/v1/datasets", json={"name": filename, "file_ids": [upload["id"]], **options})
    )


def _tabular(rows: int, rng: np.random.Generator) -> pd.DataFrame:
    key = rng.normal(size=rows)
    key = key + 0.6 * np.sign(key)
    columns = {f"x{i}": rng.normal(size=rows).round(3) for i in range(5)}
    return pd.DataFrame(
        {
            **columns,
            "key": key.round(3),
            "color": rng.choice(["red", "green", "blue"], rows),
            "label": np.where(key > 0, "yes", "no"),
        }
    )


def _rows(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [dict(row) for row in frame.to_dict(orient="records")]


def _png(bright: bool, rng: np.random.Generator) -> bytes:
    pixels = rng.uniform(90, 165, (SIZE, SIZE))
    pixels[: SIZE // 2, : SIZE // 2] = rng.uniform(215, 255) if bright else rng.uniform(0, 40)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def _image_zip(per_class: int, rng: np.random.Generator) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(per_class):
            archive.writestr(f"bright/{i}.png", _png(True, rng))
            archive.writestr(f"dark/{i}.png", _png(False, rng))
    return buffer.getvalue()


def _texts(count: int, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    texts, labels = [], []
    for i in range(count):
        words = list(rng.choice(WORDS, int(rng.integers(4, 10))))
        words.insert(int(rng.integers(0, len(words) + 1)), "excellent" if i % 2 else "awful")
        texts.append(" ".join(words))
        labels.append("good" if i % 2 else "bad")
    return texts, labels


# -- the three ways to explain ------------------------------------------------------------------


def _measure(http: httpx.Client, model: Model, method: str, rounds: int) -> Row:
    options = Options()
    explainer = model.explainer
    logits = explainer.logits(model.inputs)

    def via_http() -> None:
        body = {"model": model.name, "method": method, **model.body}
        answer = _ok(http.post("/v1/explanations", json=body))
        if len(answer["data"]) != len(logits):
            raise RuntimeError(f"{method}: {len(answer['data'])} items")

    def in_process() -> None:
        explainer.explain(model.inputs, method, options, predicted=logits)

    direct = _direct(model, method, logits.argmax(axis=1))
    paths = {"direct": direct, "in_process": in_process, "http": via_http}
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    for name, run in paths.items():
        run()  # warm-up: loads, first-call allocations
        del name
    for _ in range(rounds):
        for name, run in paths.items():
            started = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - started)
    n = len(logits)
    rate = {name: n / statistics.median(times) for name, times in seconds.items()}
    return Row(model.kind, method, n, rate["direct"], rate["in_process"], rate["http"])


def _direct(model: Model, method: str, targets: np.ndarray) -> Callable[[], None]:
    """Captum on the same torch module, as a user would call it, with the same settings."""
    from captum.attr import (
        FeatureAblation,
        IntegratedGradients,
        KernelShap,
        LayerIntegratedGradients,
        Occlusion,
        ShapleyValueSampling,
    )

    explainer = model.explainer
    network = explainer.network
    assert network is not None
    target = torch.from_numpy(targets)
    if model.kind == "mlp":
        x = torch.from_numpy(model.inputs["tabular"])
        vector, _ = explainer.tabular_baseline(None)
        baseline = torch.from_numpy(vector)[None]
        mask = torch.zeros(x.shape[1], dtype=torch.int64)
        for index, (_, start, stop) in enumerate(explainer.groups):
            mask[start:stop] = index
        mask = mask[None]
        forward: Any = network
        inputs: Any = x
        extra: Any = None
        window: tuple[int, ...] = (1,)
        stride: tuple[int, ...] = (1,)
    elif model.kind == "cnn":
        inputs = torch.from_numpy(model.inputs["images"])
        baseline = torch.zeros_like(inputs[:1])
        channels, height, width = explainer.shape.image_shape or (1, 1, 1)
        side = explainer.window(Options())
        step = explainer.stride(Options())
        patches = (torch.arange(height) // side)[:, None] * -(-width // side) + (
            torch.arange(width) // side
        )[None, :]
        mask = patches[None, None]
        forward, extra = network, None
        window, stride = (channels, side, side), (channels, step, step)
    else:
        inputs = torch.from_numpy(model.inputs["tokens"])
        attention = torch.from_numpy(model.inputs["attention"])
        baseline = torch.zeros_like(inputs)
        mask = torch.arange(inputs.shape[1])[None]
        forward, extra = network, (attention,)
        window, stride = (1,), (1,)

    if method in ("integrated_gradients", "attention"):
        if model.kind == "lstm":
            assert network.encoder is not None
            gradients: Any = LayerIntegratedGradients(network, network.encoder.embedding)
        else:
            gradients = IntegratedGradients(forward)

        def run() -> None:
            gradients.attribute(
                inputs,
                baselines=baseline,
                target=target,
                additional_forward_args=extra,
                n_steps=50,
                return_convergence_delta=True,
            )
            if method == "attention":
                with torch.no_grad():
                    network(inputs, *extra)

        return run

    def perturb() -> None:
        with torch.no_grad():
            if method == "occlusion":
                Occlusion(forward).attribute(
                    inputs,
                    sliding_window_shapes=window,
                    strides=stride,
                    baselines=baseline,
                    target=target,
                    additional_forward_args=extra,
                )
            elif method == "feature_ablation":
                FeatureAblation(forward).attribute(
                    inputs,
                    baselines=baseline,
                    target=target,
                    additional_forward_args=extra,
                    feature_mask=mask,
                )
            elif method == "shapley_sampling":
                ShapleyValueSampling(forward).attribute(
                    inputs,
                    baselines=baseline,
                    target=target,
                    additional_forward_args=extra,
                    feature_mask=mask,
                    n_samples=25,
                )
            else:
                kernel = KernelShap(forward)
                for row in range(len(targets)):
                    kernel.attribute(
                        inputs[row : row + 1],
                        baselines=baseline[:1] if baseline.shape[0] > 1 else baseline,
                        target=int(targets[row]),
                        additional_forward_args=None
                        if extra is None
                        else (extra[0][row : row + 1],),
                        feature_mask=mask,
                        n_samples=200,
                    )

    return perturb


# -- report --------------------------------------------------------------------------------------


def _line(row: Row) -> str:
    return (
        f"{row.kind} {row.method}: direct {row.direct:.1f}/s, in-process {row.in_process:.1f}/s, "
        f"HTTP {row.http:.1f}/s ({row.http / row.direct:.2f}x)"
    )


def _report(rows: list[Row], args: argparse.Namespace) -> None:
    print(f"\n`bench/explain.py` ({args.rounds} rounds, {args.threads} torch threads; records/s)\n")
    print(
        "| model | method | records/request | captum direct | ours in-process | ours HTTP "
        "| in-process/direct | HTTP/direct |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        ratio = row.http / row.direct
        mark = "" if ratio >= GOAL else " (below goal)"
        print(
            f"| {row.kind} | {row.method} | {row.records} | {row.direct:.1f} | "
            f"{row.in_process:.1f} | {row.http:.1f} | {row.in_process / row.direct:.2f} | "
            f"{ratio:.2f}{mark} |"
        )


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mlp,cnn,lstm", help="which of mlp, cnn, lstm")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per method")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch and ONNX threads, here and in the server"
    )
    parser.add_argument("--methods", default="", help="only these methods (comma-separated)")
    parser.add_argument("--quick", action="store_true", help="2 rounds")
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in args.models if m not in METHODS]
    if unknown:
        parser.error(f"unknown models {unknown}")
    if args.quick:
        args.rounds = 2
    return args


if __name__ == "__main__":
    sys.exit(main())
