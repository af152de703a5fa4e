"""Schemas of `/v1/optimisations`: make measured variants of a registered model version."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from aiaas.domain import Job, OptimisationRequest
from aiaas.protocol.platform import ModelRef, Request


class DynamicInt8(Request):
    """int8 weights; activations quantised per batch at run time."""

    method: Literal["dynamic_int8"]
    engine: Literal["onnxruntime", "torch"] = Field(
        default="onnxruntime",
        description="Whose quantiser: ONNX Runtime's (deployable) or PyTorch's (its linear "
        "layers; kept as int8 safetensors and measured under torch, not deployable).",
    )


class StaticInt8(Request):
    """int8 weights and activations (QDQ), activation ranges calibrated on training rows."""

    method: Literal["static_int8"]


class OnnxOptimized(Request):
    """ONNX Runtime's extended graph optimisations (folding, fusions), saved as a graph."""

    method: Literal["onnx_optimized"]


class Prune(Request):
    """Magnitude pruning to `sparsity`, then a short fine-tune with the zeros held."""

    method: Literal["prune"]
    sparsity: float = Field(gt=0, lt=1, description="Share of weights set to zero.")
    structured: bool = Field(
        default=False,
        description="Remove whole output units (L2 norm, per layer) instead of single weights.",
    )
    fine_tune_epochs: int = Field(default=1, ge=0, le=20)


class Gguf(Request):
    """A GGUF LLM re-quantised by llama.cpp's quantiser to another type."""

    method: Literal["gguf"]
    quant_type: Literal[
        "F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S",
        "Q4_1", "Q4_0", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K",
    ]  # fmt: skip


Variant = Annotated[
    DynamicInt8 | StaticInt8 | OnnxOptimized | Prune | Gguf, Field(discriminator="method")
]


class OptimisationCreate(Request):
    model: ModelRef = Field(
        description="A registered (trained) model, or a served GGUF LLM for `gguf` variants."
    )
    version: int | None = Field(default=None, ge=1, le=10**9, description="Default: latest.")
    variants: list[Variant] = Field(min_length=1, max_length=8)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    eval_text: str | None = Field(
        default=None,
        min_length=1,
        max_length=200_000,
        description="GGUF only: held-out text for perplexity (default: a built-in English text).",
    )

    def request(self) -> OptimisationRequest:
        return OptimisationRequest(
            model=self.model,
            version=self.version,
            variants=[v.model_dump() for v in self.variants],
            seed=self.seed,
            eval_text=self.eval_text,
        )


class OptimisationJob(BaseModel):
    object: Literal["optimisation"] = "optimisation"
    id: str
    model: str
    version: int | None = Field(description="The version optimised; null for a GGUF LLM.")
    status: str
    variants: list[dict[str, Any]]
    created_at: int
    finished_at: int | None
    error: dict[str, Any] | None
    result: dict[str, Any] | None = Field(
        default=None,
        description="The comparison table: the parent's measurement and, per variant, its new "
        "version, size, latency p50/p95, throughput at batch 32, metrics and the change from "
        "the parent. Grows while the job runs.",
    )

    @classmethod
    def from_domain(cls, job: Job) -> OptimisationJob:
        return cls(
            id=job.id,
            model=job.spec["model_id"],
            version=job.spec.get("version"),
            status=job.status.value,
            variants=job.spec["variants"],
            created_at=int(job.created_at),
            finished_at=int(job.finished_at) if job.finished_at is not None else None,
            error=job.error,
            result=job.result,
        )
