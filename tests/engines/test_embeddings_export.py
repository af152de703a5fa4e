"""The ONNX export: made once per source, found again by content hash, never half-written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from aiaas.engines.embeddings import export
from aiaas.engines.embeddings.export import (
    ExportedModel,
    PoolingConfig,
    export_sentence_encoder,
    read_pooling,
    source_hash,
)
from aiaas.errors import ConfigurationError

from .conftest import MODEL_ID

SMALL_FILES = (
    "config.json",
    "modules.json",
    "sentence_bert_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def copy_small_files(source: Path, target: Path) -> Path:
    """The model folder without its weights: enough for hashing and layout checks."""
    target.mkdir()
    for name in SMALL_FILES:
        shutil.copy2(source / name, target / name)
    shutil.copytree(source / "1_Pooling", target / "1_Pooling")
    return target


def test_pooling_config_is_read_from_the_sentence_transformers_files(minilm_dir: Path) -> None:
    assert read_pooling(minilm_dir) == PoolingConfig(
        mode="mean", normalize=True, max_seq_length=256, dimension=384, lowercase=False
    )


def test_export_writes_both_variants_the_tokenizer_and_the_pooling(
    minilm_export: ExportedModel, minilm_dir: Path
) -> None:
    for path in (minilm_export.fp32, minilm_export.int8, minilm_export.tokenizer):
        assert path.is_file() and path.stat().st_size > 0
    assert minilm_export.int8.stat().st_size < minilm_export.fp32.stat().st_size
    assert minilm_export.source_hash == source_hash(minilm_dir)
    assert minilm_export.inputs == ("input_ids", "attention_mask", "token_type_ids")
    assert minilm_export.pooling == read_pooling(minilm_dir)


def test_second_export_reuses_the_cached_files(
    minilm_export: ExportedModel, minilm_dir: Path, export_cache: Path, monkeypatch
) -> None:
    before = {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in minilm_export.directory.iterdir()}

    def no_rebuild(*_args: object) -> None:
        raise AssertionError("the export ran again")

    monkeypatch.setattr(export, "_build", no_rebuild)
    again = export_sentence_encoder(minilm_dir, export_cache, name=MODEL_ID)

    assert again == minilm_export
    after = {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in again.directory.iterdir()}
    assert after == before


def test_source_hash_follows_content_not_timestamps(minilm_dir: Path, tmp_path: Path) -> None:
    copy = copy_small_files(minilm_dir, tmp_path / "model")
    shutil.copy2(minilm_dir / "model.safetensors", copy / "model.safetensors")
    assert source_hash(copy) == source_hash(minilm_dir)

    (copy / "1_Pooling" / "config.json").touch()
    assert source_hash(copy) == source_hash(minilm_dir)

    pooling = json.loads((copy / "1_Pooling" / "config.json").read_text())
    pooling["pooling_mode_mean_tokens"], pooling["pooling_mode_cls_token"] = False, True
    (copy / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    assert source_hash(copy) != source_hash(minilm_dir)
    assert read_pooling(copy).mode == "cls"


@pytest.mark.slow
def test_changed_source_gets_a_new_export(
    minilm_export: ExportedModel, minilm_dir: Path, export_cache: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "model"
    shutil.copytree(minilm_dir, copy)
    sbert = json.loads((copy / "sentence_bert_config.json").read_text())
    sbert["max_seq_length"] = 128
    (copy / "sentence_bert_config.json").write_text(json.dumps(sbert))

    changed = export_sentence_encoder(copy, export_cache, name=MODEL_ID)

    assert changed.directory != minilm_export.directory
    assert changed.source_hash != minilm_export.source_hash
    assert changed.pooling.max_seq_length == 128
    assert changed.fp32.is_file() and changed.int8.is_file()
    assert minilm_export.fp32.is_file()  # the old export is left alone


def test_a_failed_export_leaves_nothing_behind(
    minilm_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    def crash_halfway(_source: Path, target: Path) -> tuple[str, ...]:
        target.write_bytes(b"half an onnx file")
        raise OSError("disk full")

    monkeypatch.setattr(export, "_export_fp32", crash_halfway)
    cache = tmp_path / "cache"

    with pytest.raises(OSError, match="disk full"):
        export_sentence_encoder(minilm_dir, cache, name=MODEL_ID)

    assert list(cache.iterdir()) == []


def test_pickled_weights_are_refused(minilm_dir: Path, tmp_path: Path) -> None:
    copy = copy_small_files(minilm_dir, tmp_path / "model")
    (copy / "pytorch_model.bin").write_bytes(b"not opened, ever")

    with pytest.raises(ConfigurationError, match="safetensors"):
        export_sentence_encoder(copy, tmp_path / "cache", name=MODEL_ID)
