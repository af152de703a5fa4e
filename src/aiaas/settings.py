"""Every knob of the platform, read from `AIAAS_*` environment variables.

The defaults are the embedded mode: SQLite and local files under `AIAAS_DATA_DIR`, everything in
one process. A `Settings` object is built by the caller (CLI or test) and handed to
`create_app(settings)`; nothing here runs at import time.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

BUNDLED_MODELS = ("smollm2-135m-instruct", "gemma-3-270m", "all-minilm-l6-v2")


def decode_key_material(value: str, *, name: str) -> bytes:
    """A 32-byte secret given as 64 hex characters or as (urlsafe) base64."""
    text = value.strip()
    try:
        raw = bytes.fromhex(text) if len(text) == 64 else base64.urlsafe_b64decode(text + "==")
    except (ValueError, binascii.Error) as exc:
        raise ValueError(f"{name} must be 32 bytes as hex or base64") from exc
    if len(raw) != 32:
        raise ValueError(f"{name} must decode to 32 bytes, got {len(raw)}")
    return raw


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AIAAS_", extra="ignore", frozen=True)

    data_dir: Path = Field(
        default=Path(".aiaas"), description="Where the embedded mode keeps state."
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default is SQLite in the data dir."
    )
    blob_url: str | None = Field(
        default=None, description="Blob store URL; default is local files in the data dir."
    )
    redis_url: str | None = None
    executor: str = "local"
    master_key: SecretStr | None = Field(
        default=None, description="32-byte key (hex or base64) that wraps the per-org data keys."
    )
    key_pepper: SecretStr | None = Field(
        default=None, description="32-byte server secret for API-key HMACs (hex or base64)."
    )
    models: str = ",".join(BUNDLED_MODELS)
    gguf_models: str = Field(
        default="", description="Extra GGUF models to serve: 'id=/path/model.gguf,id2=/path2'."
    )
    chat_templates: str = Field(
        default="",
        description="Chat templates for models without one: 'id=/path/template.jinja,...'.",
    )
    llm_slots: int = Field(default=16, ge=1, le=256, description="Sequences decoded together.")
    llm_kv_cells: int = Field(
        default=16384, ge=256, description="KV-cache tokens per LLM, shared by its slots."
    )
    llm_context_length: int = Field(
        default=4096, ge=64, description="Most tokens (prompt + completion) per request."
    )
    llm_batch: int = Field(default=512, ge=16, le=8192, description="Tokens per decode step.")
    llm_threads: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    llm_headroom_slots: int = Field(
        default=1,
        ge=0,
        le=64,
        description="Slots each LLM keeps free for an organisation with nothing running while "
        "several are active (0: none).",
    )
    llm_preempt_budget: float = Field(
        default=0.05,
        ge=0.0,
        le=0.5,
        description="Share of an LLM engine's time that decode steps cut short for a request "
        "taking the headroom may cost (0: never cut a step).",
    )
    llm_prefix_cache_entries: int = Field(
        default=32,
        ge=0,
        le=255,
        description="Finished sequences each LLM keeps in its KV cache so that later prompts "
        "starting the same way skip their prefill (0: no prefix cache).",
    )
    llm_draft_tokens: int = Field(
        default=4,
        ge=0,
        le=16,
        description="Most guesses at its next tokens, taken from its own earlier text, that a "
        "sequence sends with each decode step (speculative decoding; the engine sends them only "
        "where its measured step costs say they pay; 0: never).",
    )
    llm_onnx_head: bool = Field(
        default=True,
        description="Compute the output layer of decode steps with two or more rows with "
        "logits in ONNX Runtime (MatMulNBits over the GGUF's own Q8_0 blocks) instead of "
        "llama.cpp, for models whose output layer is Q8_0.",
    )
    llm_max_waiting: int = Field(
        default=256, ge=1, description="Queued requests per model before 429."
    )
    llm_memory_budget_mb: int | None = Field(
        default=None,
        ge=1,
        description="Memory the loaded LLMs may hold together (weights + KV cache + ONNX head, "
        "measured at load). A request for a model that is not loaded loads it, unloading the "
        "least recently used idle models first. Default: half of this machine's memory.",
    )
    llm_pinned: str = Field(
        default="",
        description="Comma-separated ids from AIAAS_MODELS / AIAAS_GGUF_MODELS that are "
        "loaded at start and never unloaded to make room.",
    )
    # fp32 by default: int8's dynamic activation scales are per batch, so a request's vector
    # would shift with whatever other tenants' inputs share its batch.
    embeddings_variant: Literal["fp32", "int8"] = Field(
        default="fp32", description="Which ONNX variant serves embeddings."
    )
    embeddings_threads: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    embeddings_max_batch: int = Field(default=32, ge=1, le=1024)
    # 0: a batch goes as soon as a worker is free; inputs that arrive while every worker is busy
    # form the next one. Waiting for company only adds latency when a worker sits idle.
    embeddings_max_wait_ms: float = Field(default=0.0, ge=0, le=1000)
    # Two forward passes at once, each on half the threads: one batch's padding, pooling and
    # replies overlap the other's matrix work, and a lone request never waits for a batch.
    embeddings_workers: int = Field(
        default_factory=lambda: min(2, os.cpu_count() or 1),
        ge=1,
        le=64,
        description="Forward passes run at once; each takes embeddings_threads / workers "
        "ONNX Runtime threads.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    max_request_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    max_key_lifetime_days: int = Field(default=3650, ge=1)
    auth_cache_s: float = Field(
        default=2.0,
        ge=0,
        le=60,
        description="Seconds a verified key skips the database (a revocation through another "
        "replica takes effect within this); 0 checks every request.",
    )
    region: str = Field(
        default="local",
        pattern=r"^[a-z0-9][a-z0-9-]{0,31}$",
        description="This node's region: new organisations and datasets are labelled with it, "
        "and a dataset marked residency 'strict' is used only by jobs of this region.",
    )
    route_cache_s: float = Field(
        default=1.0,
        ge=0,
        le=60,
        description="Seconds a deployment's resolved versions are reused (changes through "
        "another replica take effect within this); 0 resolves every request.",
    )
    max_file_bytes: int = Field(
        default=512 * 1024 * 1024, ge=1024, description="Largest file one upload may carry."
    )
    max_import_mb: int = Field(
        default=8192,
        ge=1,
        description="Largest model file one import may carry (POST /v1/models/import); it is "
        "held in memory while it is checked and stored.",
    )
    max_dataset_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=1024,
        description="Largest total of source files one dataset version is made from (in memory).",
    )
    classic_memory_budget_mb: int = Field(
        default=1024, ge=1, description="Memory for loaded trained models; LRU ones are evicted."
    )
    classic_threads: int = Field(
        default_factory=lambda: os.cpu_count() or 1, ge=1, description="ORT threads per model."
    )
    classic_max_batch: int = Field(default=64, ge=1, le=4096, description="Rows per forward pass.")
    # 0, as for embeddings: rows that arrive while the forward pass runs form the next batch.
    classic_max_wait_ms: float = Field(
        default=0.0,
        ge=0,
        le=1000,
        description="Longest a row waits for others to fill a batch while the model is idle.",
    )
    training_workers: int = Field(
        default=1, ge=0, le=64, description="Training jobs run at once (0: this replica runs none)."
    )
    training_threads: int = Field(
        default_factory=lambda: os.cpu_count() or 1, ge=1, description="Torch threads per job."
    )
    training_checkpoint_interval_s: float = Field(
        default=300.0, gt=0, description="Most seconds between checkpoints within an epoch."
    )
    job_heartbeat_timeout_s: float = Field(
        default=60.0, ge=2, description="A running job without a heartbeat this long is requeued."
    )
    usage_flush_interval_s: float = Field(
        default=1.0, gt=0, le=60, description="Most seconds usage records wait to be written."
    )
    batch_discount: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Share of a batch line's tokens NOT counted toward monthly quotas "
        "(0.5: a batch costs half, as OpenAI bills batches).",
    )
    batch_concurrency: int = Field(
        default=32,
        ge=1,
        le=1024,
        description="Lines of one batch in flight at once (they wait behind interactive "
        "requests in the engines' queues).",
    )
    batch_max_lines: int = Field(
        default=50_000, ge=1, description="Most requests one batch input file may hold."
    )
    audit_usage_window_s: int = Field(
        default=60,
        ge=1,
        le=3600,
        description="Seconds per `grant.used` audit event: calls through each grant are "
        "audited aggregated over windows this long (a UTC minute by default).",
    )
    scheduling: Literal["fair", "fifo"] = Field(
        default="fair",
        description="Admission order in the engines and batchers: weighted fair between "
        "organisations, or first come, first served.",
    )
    job_max_attempts: int = Field(
        default=3, ge=1, le=100, description="Workers a job may lose before it fails."
    )

    @field_validator("data_dir")
    @classmethod
    def _absolute_data_dir(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @model_validator(mode="after")
    def _check_secrets(self) -> Settings:
        _ = self.extra_gguf, self.chat_template_files  # a malformed list fails at start
        # Refuse a malformed secret at start rather than on the first request that needs it.
        if self.master_key is not None:
            decode_key_material(self.master_key.get_secret_value(), name="AIAAS_MASTER_KEY")
        if self.key_pepper is not None:
            decode_key_material(self.key_pepper.get_secret_value(), name="AIAAS_KEY_PEPPER")
        return self

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'aiaas.db'}"

    @property
    def resolved_blob_url(self) -> str:
        return self.blob_url or f"file://{self.data_dir / 'blobs'}"

    @property
    def max_import_bytes(self) -> int:
        return self.max_import_mb << 20

    @property
    def model_ids(self) -> list[str]:
        return [m.strip() for m in self.models.split(",") if m.strip()]

    @property
    def pinned_llms(self) -> set[str]:
        return {m.strip() for m in self.llm_pinned.split(",") if m.strip()}

    @property
    def llm_memory_budget_bytes(self) -> int:
        if self.llm_memory_budget_mb is not None:
            return self.llm_memory_budget_mb << 20
        return _physical_memory() // 2

    @property
    def extra_gguf(self) -> dict[str, Path]:
        return _id_paths(self.gguf_models, "AIAAS_GGUF_MODELS")

    @property
    def chat_template_files(self) -> dict[str, Path]:
        return _id_paths(self.chat_templates, "AIAAS_CHAT_TEMPLATES")

    @property
    def admin_key_path(self) -> Path:
        return self.data_dir / "admin-key"


def _id_paths(value: str, name: str) -> dict[str, Path]:
    """Parse 'id=/path,id2=/path2'."""
    out: dict[str, Path] = {}
    for entry in filter(None, (e.strip() for e in value.split(","))):
        model_id, sep, path = entry.partition("=")
        if not sep or not model_id.strip() or not path.strip():
            raise ValueError(f"{name} entry {entry!r} is not 'id=/path'")
        out[model_id.strip()] = Path(path.strip()).expanduser()
    return out


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8 << 30
