"""Provision the peer servers once and reuse them on later runs.

- `llama_cpp.server`: llama-cpp-python's own server, in its own venv (`bench/.venv-peers`), so
  the bench never installs anything into the project's `.venv`.
- `llama-server`: llama.cpp's C++ server, built from the llama.cpp sources vendored in the
  llama-cpp-python sdist of the same version, so all three systems run the same ggml code.
- BentoML (`bench/predict.py`): in a venv of its own (`bench/.cache/venv-bentoml`, ignored by git
  like the rest of the cache), with the onnxruntime, numpy, uvloop and httptools versions the
  project's venv has.
- infinity-emb (`bench/embeddings.py`): in `bench/.cache/venv-infinity`, with the project venv's
  torch (a CPU wheel; any other torch spec pulls gigabytes of CUDA wheels) and onnxruntime.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

__all__ = [
    "BENCH_DIR",
    "BENTOML_VERSION",
    "INFINITY_VERSION",
    "LLAMA_CPP_PYTHON_VERSION",
    "ProvisionError",
    "ensure_bentoml_python",
    "ensure_infinity_python",
    "ensure_llama_server",
    "ensure_peers_python",
    "tool_output",
    "tool_version",
]

log = logging.getLogger("bench")

BENCH_DIR = Path(__file__).resolve().parent
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
BENTOML_VERSION = "1.4.40"
INFINITY_VERSION = "0.0.78"
PEERS_VENV = BENCH_DIR / ".venv-peers"
CACHE_DIR = BENCH_DIR / ".cache"
BENTOML_VENV = CACHE_DIR / "venv-bentoml"
INFINITY_VENV = CACHE_DIR / "venv-infinity"
# infinity-emb 0.0.78 imports `optimum.bettertransformer` at start-up, which exists only in
# optimum 1.x and only with transformers < 4.49 (optimum 2.x also breaks its ONNX file lookup,
# and 1.25+ imports a torch.onnx private that torch 2.13 no longer has).
# optimum 1.x pulls `datasets` and so pyarrow, whose newest wheels need numpy 2 (infinity: < 2).
_INFINITY_PINS = {"optimum": "1.24.0", "transformers": "4.48.3"}
_INFINITY_EXTRAS = {"infinity-emb": "[server,torch]", "optimum": "[onnxruntime]"}
_INFINITY_RANGES = ("pyarrow<20",)
LLAMA_BUILD_DIR = BENCH_DIR / ".build" / "llama.cpp"

# Without these the build fetches web assets and links libcurl/OpenSSL, none of which we need.
_LLAMA_CMAKE_FLAGS = (
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DCMAKE_BUILD_TYPE=Release",
)
_LOG_TAIL_LINES = 30


class ProvisionError(Exception):
    """A peer could not be installed or built."""


def ensure_peers_python(venv: Path = PEERS_VENV) -> Path:
    """The python of a venv holding `llama-cpp-python[server]` at our pinned version."""
    python = venv / "bin" / "python"
    install_log = CACHE_DIR / "logs" / f"{venv.name.lstrip('.')}.log"
    if not python.exists():
        log.info("creating %s", venv)
        base = shutil.which("python3") or sys.executable
        _run([base, "-m", "venv", str(venv)], log_path=install_log)
    installed = _llama_cpp_python_version(python)
    if installed != LLAMA_CPP_PYTHON_VERSION:
        requirement = f"llama-cpp-python[server]=={LLAMA_CPP_PYTHON_VERSION}"
        log.info(
            "installing %s into %s (found %s; a cold pip cache compiles llama.cpp for minutes)",
            requirement,
            venv,
            installed or "nothing",
        )
        pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", requirement]
        _run(pip, log_path=install_log)
    return python


def ensure_bentoml_python(*, same_as_ours: Mapping[str, str], venv: Path = BENTOML_VENV) -> Path:
    """The python of a venv holding BentoML at our pinned version, plus the packages the peer
    should run at the versions ours runs (distribution name -> version: onnxruntime, numpy, and
    the uvloop/httptools that uvicorn picks up when present).

    Its own venv, not `.venv-peers`: BentoML brings starlette, uvicorn and pydantic ranges of its
    own, which must not move the llama-cpp-python server's.
    """
    python = venv / "bin" / "python"
    install_log = CACHE_DIR / "logs" / f"{venv.name.lstrip('.')}.log"
    if not python.exists():
        log.info("creating %s", venv)
        base = shutil.which("python3") or sys.executable
        _run([base, "-m", "venv", str(venv)], log_path=install_log)
    wanted = {"bentoml": BENTOML_VERSION, **same_as_ours}
    installed = _installed_versions(python, wanted)
    if installed != wanted:
        requirements = [f"{name}=={version}" for name, version in wanted.items()]
        log.info("installing %s into %s (found %s)", " ".join(requirements), venv, installed)
        pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
        _run([*pip, *requirements], log_path=install_log)
    return python


def ensure_infinity_python(*, same_as_ours: Mapping[str, str], venv: Path = INFINITY_VENV) -> Path:
    """The python of a venv holding infinity-emb (torch and optimum engines) at our pinned
    version, plus the packages it should run at the versions ours runs (distribution name ->
    version: torch, onnxruntime). Its own venv: it needs numpy < 2 and transformers < 4.49.
    """
    python = venv / "bin" / "python"
    install_log = CACHE_DIR / "logs" / f"{venv.name.lstrip('.')}.log"
    if not python.exists():
        log.info("creating %s", venv)
        base = shutil.which("python3") or sys.executable
        _run([base, "-m", "venv", str(venv)], log_path=install_log)
    wanted = {"infinity-emb": INFINITY_VERSION, **_INFINITY_PINS, **same_as_ours}
    installed = _installed_versions(python, wanted)
    if installed != wanted:
        requirements = [
            f"{name}{_INFINITY_EXTRAS.get(name, '')}=={version}" for name, version in wanted.items()
        ]
        requirements += _INFINITY_RANGES
        log.info("installing %s into %s (found %s)", " ".join(requirements), venv, installed)
        pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
        _run([*pip, *requirements], log_path=install_log)
    return python


def ensure_llama_server(*, sdist: Path | None = None, build_dir: Path = LLAMA_BUILD_DIR) -> Path:
    """Path to a built `llama-server`; builds it (minutes) only when the binary is missing."""
    binary = build_dir / "bin" / "llama-server"
    if binary.exists():
        return binary
    source = _llama_cpp_source(sdist or _download_sdist(CACHE_DIR))
    build_log = build_dir.parent / "llama-server-build.log"
    jobs = str(os.cpu_count() or 1)
    log.info("building llama-server from %s (log: %s); 4 to 8 min on 2 cores", source, build_log)
    build_dir.parent.mkdir(parents=True, exist_ok=True)
    build_log.unlink(missing_ok=True)
    configure = ["cmake", "-S", str(source), "-B", str(build_dir), *_LLAMA_CMAKE_FLAGS]
    _run(configure, log_path=build_log)
    build = ["cmake", "--build", str(build_dir), "--target", "llama-server", "-j", jobs]
    _run(build, log_path=build_log)
    if not binary.exists():
        raise ProvisionError(f"the build finished but {binary} is missing; see {build_log}")
    return binary


def tool_output(argv: Sequence[str]) -> str:
    """Everything a tool prints (stdout then stderr) for a quick query like `--help`."""
    result = subprocess.run(  # noqa: S603 - argv is built by the bench
        list(argv), capture_output=True, text=True, timeout=60, check=False
    )
    return result.stdout + result.stderr


def tool_version(argv: Sequence[str]) -> str:
    """The line a tool prints for its version flag (e.g. `llama-server --version`)."""
    lines = [line.strip() for line in tool_output(argv).splitlines() if line.strip()]
    return next((line for line in lines if "version" in line.lower()), lines[0] if lines else "?")


def _llama_cpp_python_version(python: Path) -> str | None:
    probe = (
        "import importlib.metadata, llama_cpp.server; "
        "print(importlib.metadata.version('llama-cpp-python'))"
    )
    result = subprocess.run(  # noqa: S603 - fixed argv
        [str(python), "-c", probe], capture_output=True, text=True, check=False
    )
    return result.stdout.strip() if result.returncode == 0 else None


def _installed_versions(python: Path, names: Iterable[str]) -> dict[str, str]:
    """Distribution name -> installed version, for those of `names` the venv has."""
    probe = (
        "import importlib.metadata as m, sys\n"
        "for name in sys.argv[1:]:\n"
        "    try: print(name, m.version(name))\n"
        "    except m.PackageNotFoundError: pass\n"
    )
    result = subprocess.run(  # noqa: S603 - fixed argv
        [str(python), "-c", probe, *names], capture_output=True, text=True, check=False
    )
    pairs = (line.split() for line in result.stdout.splitlines())
    return {pair[0]: pair[1] for pair in pairs if len(pair) == 2}


def _download_sdist(dest: Path) -> Path:
    name = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if (dest / name).exists():
        return dest / name
    log.info("downloading the llama-cpp-python %s sdist into %s", LLAMA_CPP_PYTHON_VERSION, dest)
    dest.mkdir(parents=True, exist_ok=True)
    _run(
        [
            *(sys.executable, "-m", "pip", "download", "--disable-pip-version-check"),
            f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}",
            *("--no-binary", ":all:", "--no-deps", "-d", str(dest)),
        ],
        log_path=dest / "pip-download.log",
    )
    if not (dest / name).exists():
        raise ProvisionError(f"pip download did not produce {dest / name}")
    return dest / name


def _llama_cpp_source(sdist: Path) -> Path:
    """The `vendor/llama.cpp` directory of the sdist, extracted next to it once."""
    with tarfile.open(sdist) as archive:
        first = archive.next()
        if first is None:
            raise ProvisionError(f"{sdist} is empty")
        top = first.name.split("/", 1)[0]
        source = sdist.parent / top / "vendor" / "llama.cpp"
        if not (source / "CMakeLists.txt").exists():
            log.info("extracting %s", sdist)
            archive.extractall(sdist.parent, filter="data")
    if not (source / "CMakeLists.txt").exists():
        raise ProvisionError(f"{sdist} has no vendor/llama.cpp/CMakeLists.txt")
    return source


def _run(argv: Sequence[str], *, log_path: Path) -> None:
    """Run a provisioning step, appending its output to `log_path`; fail with the log's tail."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out:
        out.write(f"$ {' '.join(argv)}\n".encode())
        out.flush()
        code = subprocess.run(  # noqa: S603 - argv is built here
            list(argv), stdout=out, stderr=subprocess.STDOUT, check=False
        ).returncode
    if code != 0:
        lines = log_path.read_text(errors="replace").splitlines()[-_LOG_TAIL_LINES:]
        tail = "\n".join(f"    {line}" for line in lines)
        raise ProvisionError(f"`{' '.join(argv)}` failed with {code}; from {log_path}:\n{tail}")
