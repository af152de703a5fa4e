"""Our job runner against a plain PyTorch loop: samples/s of the same model on the same data.

`bench/training.py` compares the training loop in-process. This one measures the whole runner as
a user gets it: `aiaas serve` on a free loopback port, the data uploaded and made a dataset, an
`mlp` job created through `/v1/fine_tuning/jobs`, trained in a worker process with checkpoints
after every epoch and heartbeats, then evaluated, exported and registered. Its samples/s per
epoch are the ones the job reports in its metrics events (training steps only, as below).

The plain loops then train the identical network (`build_model("mlp", ...)` from the same seed)
on the identical arrays (the job's own train split, encoded with the registered
`preprocessing.json`), in this process, with the same thread count, batch size, AdamW and
clipping: `plain` keeps loss and accuracy with `.item()` per step, as most hand-written loops
do; `bare` keeps no metrics. The server is idle by then. Epoch 1 of each is a
warm-up and not counted; the ratio is median(ours) / median(plain) over the other epochs.

    .venv/bin/python bench/training_runner.py
    .venv/bin/python bench/training_runner.py --samples 40000 --epochs 8 --threads 2
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from aiaas.specs.preprocessing import PreprocessingSpec, encode_labels, transform
from aiaas.specs.shapes import ArchitectureOptions, input_shape, model_inputs
from aiaas.specs.types import SPLIT_COLUMN
from aiaas.training.architectures import build_model

from server import ServerProcess, free_port

GOAL = 0.95
REPO = Path(__file__).resolve().parent.parent


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    frame = _problem(args)
    print(
        f"MLP {args.features}-{args.hidden}-{args.hidden}-{args.classes}, {args.samples} rows "
        f"(80% train), {args.epochs} epochs, batch {args.batch_size}, {args.threads} torch "
        f"threads, torch {torch.__version__}"
    )
    with tempfile.TemporaryDirectory(prefix="aiaas-bench-train-") as tmp:
        ours, version, spec_json, started = _run_job(args, frame, Path(tmp))
    ours_sps = [e["samples_per_second"] for e in ours[1:]]
    print(f"ours (runner): job took {started:.1f} s end to end (create → registered)")
    for e in ours:
        print(f"  epoch {e['epoch']}: {e['samples_per_second']:,.0f} samples/s")
    print(f"ours: median {statistics.median(ours_sps):,.0f} samples/s (epochs 2..{args.epochs})")
    for name, metrics in (("plain", True), ("bare", False)):
        rates = _plain_loop(args, version, spec_json, metrics=metrics)
        print(f"{name}: " + ", ".join(f"{value:,.0f}" for value in rates) + " samples/s")
        ratio = statistics.median(ours_sps) / statistics.median(rates[1:])
        verdict = "meets" if ratio >= GOAL else "misses"
        print(
            f"ours/{name}: {ratio:.3f} (median {statistics.median(rates[1:]):,.0f} samples/s; "
            f"{verdict} the goal >= {GOAL})"
        )
    return 0


def _problem(args: argparse.Namespace) -> pd.DataFrame:
    """Gaussian features labelled by a random linear teacher (as in bench/training.py)."""
    rng = np.random.default_rng(args.seed)
    x = rng.normal(size=(args.samples, args.features)).astype(np.float32)
    teacher = rng.normal(size=(args.features, args.classes))
    y = (x @ teacher + rng.normal(scale=2.0, size=(args.samples, args.classes))).argmax(1)
    frame = pd.DataFrame(x, columns=[f"x{i}" for i in range(args.features)])
    frame["label"] = [f"c{v}" for v in y]
    return frame


def _run_job(
    args: argparse.Namespace, frame: pd.DataFrame, tmp: Path
) -> tuple[list[dict[str, float]], bytes, str, float]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIAAS_")}
    env |= {
        "AIAAS_DATA_DIR": str(tmp / "data"),
        "AIAAS_MODELS": "",
        "AIAAS_TRAINING_THREADS": str(args.threads),
        "AIAAS_LOG_LEVEL": "warning",
    }
    argv = [sys.executable, "-m", "aiaas", "serve", "--port", str(port)]
    base = f"http://127.0.0.1:{port}"
    with ServerProcess("ours", argv, env=env, log_path=tmp / "server.log", cwd=REPO):
        _wait(base)
        admin = (tmp / "data" / "admin-key").read_text().strip()
        with httpx.Client(base_url=base, timeout=300) as http:
            org = http.post(
                "/v1/organizations",
                json={"name": "bench"},
                headers={"Authorization": f"Bearer {admin}"},
            ).json()
            http.headers["Authorization"] = f"Bearer {org['api_key']}"
            buffer = io.BytesIO()
            frame.to_parquet(buffer, index=False)
            upload = http.post(
                "/v1/files",
                data={"purpose": "dataset"},
                files={"file": ("bench.parquet", buffer.getvalue())},
            ).json()
            dataset = http.post(
                "/v1/datasets", json={"name": "bench", "file_ids": [upload["id"]]}
            ).json()
            started = time.perf_counter()
            job = http.post(
                "/v1/fine_tuning/jobs",
                json={
                    "model": "mlp",
                    "training_file": dataset["version"]["id"],
                    "seed": args.seed,
                    "hyperparameters": {
                        "n_epochs": args.epochs,
                        "batch_size": args.batch_size,
                        "learning_rate": 1e-3,
                    },
                    "architecture": {"hidden_sizes": [args.hidden, args.hidden]},
                },
            ).json()
            while job["status"] not in ("succeeded", "failed", "cancelled"):
                time.sleep(0.2)
                job = http.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
            elapsed = time.perf_counter() - started
            if job["status"] != "succeeded":
                raise SystemExit(f"the job ended {job['status']}: {job.get('error')}")
            events = http.get(f"/v1/fine_tuning/jobs/{job['id']}/events?limit=100").json()
            epochs = sorted(
                (
                    e["data"]
                    for e in events["data"]
                    if e["type"] == "metrics" and "epoch" in e["data"]
                ),
                key=lambda d: d["epoch"],
            )
            model = job["fine_tuned_model"]
            content = http.get(f"/v1/datasets/{dataset['id']}/versions/1/content").content
            spec_json = http.get(f"/v1/models/{model}/versions/1/artifacts/preprocessing.json").text
    return epochs, content, spec_json, elapsed


def _wait(base: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not become healthy")


def _plain_loop(
    args: argparse.Namespace, content: bytes, spec_json: str, *, metrics: bool
) -> list[float]:
    """`plain` tracks loss and accuracy with `.item()` as most hand-written loops do; `bare`
    tracks nothing, the least a loop can do."""
    torch.set_num_threads(args.threads)
    spec = PreprocessingSpec.model_validate_json(spec_json)
    frame = pd.read_parquet(io.BytesIO(content))
    train = frame[frame[SPLIT_COLUMN] == "train"]
    shape = input_shape(spec)
    torch.manual_seed(args.seed)
    model = build_model("mlp", shape, ArchitectureOptions(hidden_sizes=[args.hidden, args.hidden]))
    inputs = model_inputs(transform(spec, train), shape, model.input_names)
    x = [torch.from_numpy(inputs[name]) for name in model.input_names]
    y = torch.from_numpy(encode_labels(spec, train["label"]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    n, size = len(y), args.batch_size
    rates = []
    model.train()
    for epoch in range(1, args.epochs + 1):
        order = torch.from_numpy(np.random.default_rng([args.seed, epoch]).permutation(n))
        started = time.perf_counter()
        total, correct = 0.0, 0
        for start in range(0, n, size):
            index = order[start : start + size]
            logits = model(*[t.index_select(0, index) for t in x])
            target = y.index_select(0, index)
            loss = F.cross_entropy(logits, target)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if metrics:
                total += loss.item() * len(index)
                correct += int((logits.argmax(1) == target).sum())
        rates.append(n / (time.perf_counter() - started))
    return rates


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The job runner vs a plain PyTorch loop.")
    add = parser.add_argument
    add("--samples", type=int, default=25_000, help="rows (default 25000; 80%% train)")
    add("--features", type=int, default=64, help="default 64")
    add("--classes", type=int, default=10, help="default 10")
    add("--hidden", type=int, default=256, help="MLP width (default 256)")
    add("--batch-size", type=int, default=128, help="default 128")
    add("--epochs", type=int, default=6, help="default 6 (epoch 1 is a warm-up)")
    add("--threads", type=int, default=2, help="torch threads, both sides (default 2)")
    add("--seed", type=int, default=0, help="default 0")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
