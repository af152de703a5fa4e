"""Schemas of the datasets API (`/v1/datasets`), a platform API."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StringConstraints

from aiaas.data.build import BuildOptions
from aiaas.data.profile import ColumnProfile
from aiaas.data.readers import DataFormat
from aiaas.domain import Dataset, DatasetVersion
from aiaas.protocol.platform import IdStr, Name, Request
from aiaas.specs.preprocessing import FeatureStep, PreprocessingSpec, SplitSpec
from aiaas.specs.types import Task

ColumnName = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class DatasetVersionCreate(Request):
    file_ids: list[IdStr] = Field(
        min_length=1, max_length=20, description="Uploaded files; all of one format."
    )
    format: Literal["csv", "jsonl", "parquet", "image_zip"] | None = Field(
        default=None, description="Default: recognised from each file's name and first bytes."
    )
    label_column: ColumnName | None = Field(
        default=None, description="Default: a column named label, target, class or y."
    )
    task: Literal["classification", "regression"] | None = Field(
        default=None, description="Default: inferred from the label column."
    )
    redact_pii: bool | None = Field(
        default=None,
        description="Detect and redact personal data. An organisation that redacts always does.",
    )
    split: SplitSpec | None = Field(
        default=None, description="Train/validation/test fractions, seed and stratification."
    )
    features: list[FeatureStep] | None = Field(
        default=None,
        max_length=2000,
        description="Preprocessing steps; default: one per column, chosen by its type.",
    )

    def build_options(self) -> BuildOptions:
        """What the builder needs; `redact_pii` is decided with the organisation's policy."""
        return BuildOptions(
            format=DataFormat(self.format) if self.format else None,
            label=self.label_column,
            task=Task(self.task) if self.task else None,
            split=self.split,
            features=self.features,
        )


class DatasetCreate(DatasetVersionCreate):
    name: Name
    description: str = Field(default="", max_length=4096)
    residency: Literal["none", "strict"] = Field(
        default="none",
        description="strict: the rows never leave this node's region (no `read` grant to "
        "another region, no job on a node of another region).",
    )


class PiiColumnReport(BaseModel):
    column: str
    counts: dict[str, int]
    rows_affected: int


class PiiReport(BaseModel):
    redacted: bool
    columns: list[PiiColumnReport]


class DatasetVersionPublic(BaseModel):
    object: Literal["dataset.version"] = "dataset.version"
    id: str
    dataset_id: str
    version: int
    created_at: int
    format: str
    source_file_ids: list[str]
    rows: int
    bytes: int
    content_hash: str
    label_column: str | None
    task: str | None
    columns: list[ColumnProfile]
    class_balance: dict[str, int] | None
    splits: dict[str, int]
    preview: list[dict[str, Any]]
    preprocessing: PreprocessingSpec
    pii: PiiReport | None

    @classmethod
    def from_domain(cls, version: DatasetVersion) -> DatasetVersionPublic:
        profile = version.profile
        return cls(
            id=version.id,
            dataset_id=version.dataset_id,
            version=version.version,
            created_at=int(version.created_at),
            format=version.format,
            source_file_ids=version.source_file_ids,
            rows=version.rows,
            bytes=version.bytes,
            content_hash=version.content_hash,
            label_column=version.label_column,
            task=version.task,
            columns=profile["columns"],
            class_balance=profile.get("class_balance"),
            splits=profile["splits"],
            preview=profile["preview"],
            preprocessing=PreprocessingSpec.model_validate(version.preprocessing),
            pii=PiiReport.model_validate(version.pii) if version.pii is not None else None,
        )


class DatasetPublic(BaseModel):
    object: Literal["dataset"] = "dataset"
    id: str
    name: str
    description: str
    project_id: str
    created_at: int
    latest_version: int | None
    region: str = Field(default="local", description="The region that holds its rows.")
    residency: Literal["none", "strict"] = "none"
    owned_by: str | None = Field(
        default=None,
        description="Another organisation's dataset shared with the caller for reading: the "
        "owner organisation's name. None for the caller's own.",
    )
    version: DatasetVersionPublic | None = Field(
        default=None, description="On create: the first version."
    )

    @classmethod
    def from_domain(
        cls,
        dataset: Dataset,
        version: DatasetVersion | None = None,
        *,
        owned_by: str | None = None,
    ) -> DatasetPublic:
        return cls(
            id=dataset.id,
            name=dataset.name,
            description=dataset.description,
            project_id=dataset.project_id,
            created_at=int(dataset.created_at),
            latest_version=dataset.latest_version,
            region=dataset.region,
            residency="strict" if dataset.strict else "none",
            owned_by=owned_by,
            version=DatasetVersionPublic.from_domain(version) if version is not None else None,
        )


class DatasetDeleted(BaseModel):
    object: Literal["dataset.deleted"] = "dataset.deleted"
    id: str
    deleted: bool = True


class DatasetVersionDeleted(BaseModel):
    object: Literal["dataset.version.deleted"] = "dataset.version.deleted"
    id: str
    version: int
    deleted: bool = True


class DatasetRows(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    offset: int
    total: int
    has_more: bool


__all__ = [
    "DatasetCreate",
    "DatasetDeleted",
    "DatasetPublic",
    "DatasetRows",
    "DatasetVersionCreate",
    "DatasetVersionDeleted",
    "DatasetVersionPublic",
    "IdStr",
]
