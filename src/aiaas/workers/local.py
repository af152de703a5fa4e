"""Local executor: each job runs in its own process on this machine.

Processes are started with "spawn" (a fresh interpreter: no copy of the server's threads, locks
or loaded models) and get the server's `Settings`. A worker ignores Ctrl-C, which a terminal
sends to the whole process group: the server's shutdown asks it to checkpoint with SIGTERM.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
from multiprocessing.process import BaseProcess

from aiaas.domain import Job
from aiaas.settings import Settings


class ProcessHandle:
    def __init__(self, process: BaseProcess) -> None:
        self._process = process

    def exitcode(self) -> int | None:
        return self._process.exitcode

    def stop(self) -> None:
        if self._process.pid is not None and self._process.exitcode is None:
            os.kill(self._process.pid, signal.SIGTERM)

    def kill(self) -> None:
        self._process.kill()

    def join(self, timeout: float) -> None:
        self._process.join(timeout)


class LocalExecutor:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._context = multiprocessing.get_context("spawn")

    def start(self, job: Job, token: str) -> ProcessHandle:
        process = self._context.Process(
            target=worker_main,
            args=(self._settings, job.id, token, job.kind),
            name=f"aiaas-{job.id}",
            daemon=False,
        )
        process.start()
        return ProcessHandle(process)


def worker_main(settings: Settings, job_id: str, token: str, kind: str = "training") -> None:
    """The worker process: run one job, then exit."""
    from aiaas.observability.logs import configure_logging
    from aiaas.workers.explain_job import run_explanation_job
    from aiaas.workers.lora_job import run_lora_job
    from aiaas.workers.optimisation_job import run_optimisation_job
    from aiaas.workers.training_job import run_training_job

    # Libraries' progress bars would interleave plain text with the JSON log lines on stderr.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")
    # Models load from local files only (a bundled GGUF, a cache folder): never from a hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    configure_logging(settings.log_level)
    shutdown = threading.Event()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda _signum, _frame: shutdown.set())
    logging.getLogger("aiaas.worker").info("worker %d runs job %s", os.getpid(), job_id)
    run = {
        "optimisation": run_optimisation_job,
        "explanation": run_explanation_job,
        "lora": run_lora_job,
    }.get(kind, run_training_job)
    run(settings, job_id, token, shutdown=shutdown)
