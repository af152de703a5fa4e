"""Importing an organisation's own model: refuse unsafe formats, validate, register a version.

Three formats are accepted, each checked by the engine that will serve it:

    gguf                 opened by llama.cpp in a child process (a malformed file can abort the
                         C library; the server must not go with it), metadata read back as JSON;
                         artifacts model.gguf + gguf.json (metadata and the chat template)
    onnx                 opened by ONNX Runtime, its graph checked against the declared
                         signature, one test batch run; artifacts model.onnx + signature.json
    sentence-embedding   an ONNX encoder and its tokenizer.json: both load, one tiny encode and
                         one of max_seq_length tokens run through pooling; artifacts
                         encoder.onnx + tokenizer.json + encoder.json

Pickles (and what carries them: PyTorch checkpoints, joblib, Keras' HDF5) are refused from
their name and their first bytes, never opened. An upload is held in an anonymous in-memory
file (`Spool`, Linux `memfd_create`): llama.cpp's child and ONNX Runtime open it by
`/proc/self/fd/N`, the registry streams it into the encrypted blob store from there, and it is
gone when closed, so no plaintext copy is ever written to disk and a GGUF of gigabytes is held
in memory once. The model id is `<name>:<organisation slug>`; importing a name again adds a
version (the registry checks base and task agree). A failure leaves nothing behind: the registry
removes what it reserved, and the spool is only memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np
from jinja2 import TemplateError
from tokenizers import Tokenizer

from aiaas.domain import Actor, ModelVersion, ProjectStatus, RegisteredModel
from aiaas.engines.classic.imported import (
    ORT_ERRORS,
    ImportedModel,
    SignatureMismatch,
    check_self_contained,
    open_session,
)
from aiaas.engines.embeddings.encoder import InMemoryEncoder, SentenceEncoder
from aiaas.engines.embeddings.export import PoolingConfig
from aiaas.engines.llm.chat_template import ChatTemplate
from aiaas.engines.llm.inspect import GGUF_MAGIC, InvalidGguf, inspect_gguf
from aiaas.engines.llm.model_file import anonymous_fd, fd_path
from aiaas.errors import ApiError, Conflict, InvalidRequest, NotFound, PayloadTooLarge
from aiaas.protocol.imports import ImportFormatName, ImportOptions
from aiaas.services.audit import AuditService
from aiaas.services.files import FileService, clean_filename
from aiaas.services.jobs import org_slug
from aiaas.services.registry import NewVersion, RegistryService
from aiaas.storage.db import Database
from aiaas.storage.repos import registry as registry_repo
from aiaas.storage.repos import tenancy as tenancy_repo

__all__ = ["ACCEPTED_FORMATS", "ImportService", "Imported", "Spool"]

log = logging.getLogger("aiaas.imports")

GGUF: ImportFormatName = "gguf"
ONNX: ImportFormatName = "onnx"
SENTENCE_EMBEDDING: ImportFormatName = "sentence-embedding"
TEXT_GENERATION = "text-generation"
EMBEDDINGS_TASK = "sentence-embedding"
ONNX_BASE = "onnx"
HEAD_BYTES = 64 * 1024
MAX_TOKENIZER_BYTES = 64 * 1024 * 1024
DEFAULT_SEQ_LENGTH = 512
_CHUNK = 1 << 20
ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

ACCEPTED_FORMATS = (
    "Accepted formats: GGUF (format 'gguf', for llama.cpp: convert a Hugging Face model with "
    "llama.cpp's convert_hf_to_gguf.py, then quantise with llama-quantize), ONNX (format "
    "'onnx', with a signature: export with torch.onnx.export, tf2onnx for TensorFlow/Keras, "
    "skl2onnx for scikit-learn) and an ONNX encoder with its tokenizer.json (format "
    "'sentence-embedding': export the transformer with torch.onnx.export or "
    "`optimum-cli export onnx`)."
)
# File name suffixes that are (or usually carry) pickles, with what they are.
REFUSED_SUFFIXES = {
    ".pt": "a PyTorch checkpoint (a pickle)",
    ".pth": "a PyTorch checkpoint (a pickle)",
    ".pkl": "a Python pickle",
    ".pickle": "a Python pickle",
    ".joblib": "a joblib file (a pickle)",
    ".bin": "a PyTorch .bin checkpoint (a pickle)",
    ".h5": "a Keras/HDF5 file",
    ".hdf5": "a Keras/HDF5 file",
    ".keras": "a Keras archive",
    ".ckpt": "a checkpoint (usually a pickle)",
    ".npy": "a NumPy array file",
    ".npz": "a NumPy archive",
    ".safetensors": "safetensors weights without a graph",
    ".zip": "a zip archive",
}
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_ZIP_MAGIC = b"PK\x03\x04"
_NUMPY_MAGIC = b"\x93NUMPY"


# -- the upload, held in memory ------------------------------------------------------------------


class Spool:
    """An uploaded file in an anonymous in-memory file: measured, hashed and its first bytes
    kept while it arrives; readable by path (`/proc/self/fd/N`, in this process or a child
    given the fd) or as chunks. Closing it frees it; nothing of it is ever on disk (where memfd
    is missing, an unlinked temporary file stands in)."""

    def __init__(self, filename: str | None) -> None:
        self.filename = clean_filename(filename)
        self.size = 0
        self.head = b""
        self._digest = hashlib.sha256()
        self._fd: int | None = anonymous_fd(f"import-{self.filename}")

    @property
    def fd(self) -> int:
        if self._fd is None:
            raise ValueError("the spool is closed")
        return self._fd

    @property
    def path(self) -> str:
        return str(fd_path(self.fd))

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    @property
    def suffix(self) -> str:
        return Path(self.filename).suffix.lower()

    def fill(self, chunks: Iterable[bytes], *, limit: int, what: str) -> None:
        """Take in the upload; `PayloadTooLarge` (param `what`) beyond `limit` bytes."""
        for chunk in chunks:
            self.size += len(chunk)
            if self.size > limit:
                raise PayloadTooLarge(
                    f"The {what} is larger than the limit of {limit} bytes.", param=what
                )
            if len(self.head) < HEAD_BYTES:
                self.head += chunk[: HEAD_BYTES - len(self.head)]
            self._digest.update(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(self.fd, view) :]

    def chunks(self) -> Iterator[bytes]:
        """The bytes, from the start, in chunks (each call reads afresh)."""
        offset = 0
        while chunk := os.pread(self.fd, _CHUNK, offset):
            offset += len(chunk)
            yield chunk

    def read(self) -> bytes:
        return b"".join(self.chunks())

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


# -- the use case --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Imported:
    model: RegisteredModel
    version: ModelVersion
    format: ImportFormatName
    metadata: dict[str, Any]


@dataclass(frozen=True, slots=True)
class _Prepared:
    """A validated upload, ready to register."""

    base: str
    task: str
    artifacts: list[tuple[str, Any]]
    metadata: dict[str, Any]


class ImportService:
    def __init__(
        self,
        db: Database,
        registry: RegistryService,
        files: FileService,
        audit: AuditService,
        *,
        max_bytes: int,
        threads: int = 1,
        inspect_timeout_s: float = 300.0,
    ) -> None:
        self._db = db
        self._registry = registry
        self._files = files
        self._audit = audit
        self.max_bytes = max_bytes
        self.max_tokenizer_bytes = min(MAX_TOKENIZER_BYTES, max_bytes)
        self._threads = threads
        self._inspect_timeout_s = inspect_timeout_s

    # -- receiving -------------------------------------------------------------------------------

    def limit(self, part: str) -> int:
        return self.max_tokenizer_bytes if part == "tokenizer" else self.max_bytes

    def spool(self, chunks: Iterable[bytes], *, filename: str | None, part: str) -> Spool:
        """Take an upload in (blocking: run it in a worker thread)."""
        spool = Spool(filename)
        try:
            spool.fill(chunks, limit=self.limit(part), what=part)
        except BaseException:
            spool.close()
            raise
        return spool

    def spool_file(self, *, org_id: str, file_id: str, part: str) -> Spool:
        """A file uploaded earlier through the Files API (NotFound: not this org's)."""
        stored, chunks = self._files.open(org_id=org_id, file_id=file_id)
        param = "tokenizer_file_id" if part == "tokenizer" else "file_id"
        if stored.bytes > self.limit(part):
            raise PayloadTooLarge(
                f"File {file_id} has {stored.bytes} bytes; a model import takes at most "
                f"{self.limit(part)}.",
                param=param,
            )
        return self.spool(chunks, filename=stored.filename, part=part)

    # -- importing -------------------------------------------------------------------------------

    def import_model(
        self,
        *,
        org_id: str,
        project_id: str,
        actor: Actor,
        options: ImportOptions,
        model: Spool,
        tokenizer: Spool | None = None,
    ) -> Imported:
        """Validate the upload and register it as the next version of `<name>:<org slug>`
        (blocking: run it in a worker thread)."""
        refuse_unsafe(model)
        project = self._project(org_id, options.project_id or project_id)
        model_id = self._model_id(org_id, options.name)
        kind = detect_format(options, model, tokenizer)
        _check_options(kind, options, tokenizer)
        if kind == GGUF:
            prepared = self._gguf(model, options)
        elif kind == ONNX:
            prepared = self._onnx(model, options)
        else:
            assert tokenizer is not None  # _check_options
            prepared = self._sentence_encoder(model, tokenizer, options)
        lineage = {
            "source": "import",
            "format": kind,
            "filename": model.filename,
            "bytes": model.size,
            "sha256": model.sha256,
        }
        version = self._registry.register(
            NewVersion(
                org_id=org_id,
                project_id=project,
                model_id=model_id,
                base=prepared.base,
                task=prepared.task,
                artifacts=prepared.artifacts,
                metrics={},
                lineage=lineage,
                dataset_version_id=None,
                job_id=None,
            ),
            actor=actor,
        )
        with self._db.write() as conn:
            self._audit.record(
                conn,
                actor=actor,
                action="model.imported",
                target_type="model_version",
                target_id=version.id,
                org_id=org_id,
                project_id=project,
                data={
                    "model": model_id,
                    "version": version.version,
                    "format": kind,
                    "bytes": model.size,
                    "sha256": model.sha256,
                },
            )
        registered = self._registry.get_model(org_id=org_id, model_id=model_id)
        log.info(
            "imported %s version %d (%s, %d bytes)",
            model_id,
            version.version,
            kind,
            model.size,
            extra={"org": org_id, "model": model_id},
        )
        return Imported(registered, version, kind, prepared.metadata)

    def _project(self, org_id: str, project_id: str) -> str:
        with self._db.read() as conn:
            project = tenancy_repo.get_project(conn, org_id=org_id, project_id=project_id)
        if project is None:
            raise NotFound(f"No project with id {project_id!r}.", param="project_id")
        if project.status is ProjectStatus.ARCHIVED:
            raise InvalidRequest(f"Project {project_id} is archived.", param="project_id")
        return project.id

    def _model_id(self, org_id: str, name: str) -> str:
        with self._db.read() as conn:
            org = tenancy_repo.get_org(conn, org_id)
            if org is None:
                raise NotFound(f"No organization with id {org_id!r}.")
            model_id = f"{name}:{org_slug(org.name)}"
            owner = registry_repo.owner_of_model(conn, model_id)
        if owner is not None and owner != org_id:
            raise Conflict(
                f"The model id {model_id!r} is taken; import under another name.",
                param="name",
                code="model_exists",
            )
        return model_id

    # -- GGUF ------------------------------------------------------------------------------------

    def _gguf(self, model: Spool, options: ImportOptions) -> _Prepared:
        if not model.head.startswith(GGUF_MAGIC):
            raise _invalid_file(f"{model.filename} is not a GGUF file (no GGUF magic bytes).")
        try:
            found = inspect_gguf(model.path, timeout_s=self._inspect_timeout_s, pass_fds=[model.fd])
        except InvalidGguf as exc:
            reason = exc.reason.replace(model.path, model.filename)
            raise _invalid_file(f"llama.cpp cannot load {model.filename}: {reason}") from exc
        if not found.get("has_decoder", True):
            raise _invalid_file(
                f"{model.filename} is a {found.get('architecture')} model without a decoder: it "
                "cannot generate text. Import embedding models as ONNX (format "
                "'sentence-embedding')."
            )
        embedded = found.pop("embedded_chat_template", None)
        template, source = embedded, "embedded" if embedded else None
        if options.chat_template:
            _check_template(options.chat_template, found)
            template, source = options.chat_template, "request"
        metadata = {
            **found,
            "size_bytes": model.size,
            "has_embedded_chat_template": embedded is not None,
            "chat_template": template,
            "chat_template_source": source,
        }
        about = {**metadata, "embedded_chat_template": embedded}
        architecture = str(found.get("architecture") or "gguf")[:64]
        return _Prepared(
            base=architecture,
            task=TEXT_GENERATION,
            artifacts=[
                ("model.gguf", model.chunks),
                ("gguf.json", json.dumps(about, indent=2).encode()),
            ],
            metadata=metadata,
        )

    # -- ONNX ------------------------------------------------------------------------------------

    def _onnx(self, model: Spool, options: ImportOptions) -> _Prepared:
        signature = options.signature
        if signature is None:
            raise InvalidRequest(
                "An ONNX import needs a signature: its inputs and output (name, datatype, "
                'shape), e.g. {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}], '
                '"outputs": [{"name": "probs", "datatype": "FP32", "shape": [-1, 3]}], '
                '"labels": ["a", "b", "c"]}.',
                param="signature",
                code="missing_required_parameter",
            )
        _self_contained(model)
        try:
            loaded = ImportedModel.load(
                onnx=model.path, signature=signature, threads=self._threads, size=model.size
            )
            output = loaded.smoke_test()
        except SignatureMismatch as exc:
            raise InvalidRequest(str(exc), param="signature", code="signature_mismatch") from exc
        except ValueError as exc:
            raise _invalid_file(f"{model.filename}: {exc}") from exc
        if signature.labels is not None and signature.scores == "auto":
            signature = signature.model_copy(update={"scores": _scores_kind(output)})
        metadata = {
            **loaded.metadata(),
            "task": signature.task,
            "labels": signature.labels,
            "scores": signature.scores if signature.labels is not None else None,
            "size_bytes": model.size,
        }
        return _Prepared(
            base=ONNX_BASE,
            task=signature.task,
            artifacts=[
                ("model.onnx", model.chunks),
                ("signature.json", signature.model_dump_json(indent=2).encode()),
            ],
            metadata=metadata,
        )

    # -- sentence encoders -----------------------------------------------------------------------

    def _sentence_encoder(
        self, model: Spool, tokenizer_file: Spool, options: ImportOptions
    ) -> _Prepared:
        tokenizer_json = tokenizer_file.read()
        try:
            tokenizer = Tokenizer.from_buffer(tokenizer_json)
        except Exception as exc:
            raise InvalidRequest(
                f"{tokenizer_file.filename} is not a tokenizer.json the `tokenizers` library "
                f"loads: {str(exc)[:500]}",
                param="tokenizer",
                code="invalid_tokenizer",
            ) from exc
        _self_contained(model)
        try:
            session = open_session(model.path, 1)
        except ValueError as exc:
            raise _invalid_file(f"{model.filename}: {exc}") from exc
        inputs = _encoder_inputs(session)
        truncation = tokenizer.truncation or {}
        length = options.max_seq_length or int(truncation.get("max_length") or DEFAULT_SEQ_LENGTH)
        pooling = PoolingConfig(
            mode=options.pooling or "mean",
            normalize=True if options.normalize is None else options.normalize,
            max_seq_length=length,
            dimension=0,  # measured below
            lowercase=False,
        )
        del session
        vocab = tokenizer.get_vocab_size(with_added_tokens=True)
        try:
            encoder = SentenceEncoder(
                InMemoryEncoder(graph=Path(model.path), tokenizer=tokenizer_json, pooling=pooling),
                intra_op_threads=self._threads,
            )
            vectors = encoder.encode(["Hello, world!"])
            longest = encoder.tokenize(["hello " * length])
            encoder.encode_ids([*longest, [vocab - 1]])
        except (*ORT_ERRORS, ValueError, IndexError, ApiError) as exc:
            message = exc.message if isinstance(exc, ApiError) else str(exc)
            raise _invalid_file(
                f"{model.filename} failed a test encode (one short text, one of "
                f"{length} tokens, the tokenizer's last id {vocab - 1}): {message[:1000]}. Is "
                "the tokenizer the model's own, and max_seq_length within its positions?"
            ) from exc
        if vectors.ndim != 2 or vectors.shape[1] < 1:
            raise _invalid_file(f"{model.filename} gave vectors of shape {list(vectors.shape)}")
        pooling = dataclasses.replace(pooling, dimension=int(vectors.shape[1]))
        about = {
            "pooling": dataclasses.asdict(pooling),
            "inputs": list(inputs),
            "vocab_size": vocab,
            "source": "import",
        }
        metadata = {**about, "dimension": pooling.dimension, "size_bytes": model.size}
        return _Prepared(
            base=ONNX_BASE,
            task=EMBEDDINGS_TASK,
            artifacts=[
                ("encoder.onnx", model.chunks),
                ("tokenizer.json", tokenizer_json),
                ("encoder.json", json.dumps(about, indent=2).encode()),
            ],
            metadata=metadata,
        )


# -- checks --------------------------------------------------------------------------------------


def refuse_unsafe(spool: Spool) -> None:
    """`unsupported_model_format` for pickles and what carries them, by name or first bytes
    (nothing is ever unpickled); a file that starts as a GGUF is judged by its content."""
    head = spool.head
    if head.startswith(GGUF_MAGIC):
        return
    what = REFUSED_SUFFIXES.get(spool.suffix)
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        what = "a Python pickle"
    elif head.startswith(_ZIP_MAGIC):
        what = _zip_kind(spool)
    elif head.startswith(_HDF5_MAGIC):
        what = "a Keras/HDF5 file"
    elif head.startswith(_NUMPY_MAGIC):
        what = "a NumPy array file"
    elif _looks_like_safetensors(head, spool.size):
        what = "safetensors weights without a graph"
    if what is None:
        return
    raise InvalidRequest(
        f"{spool.filename} is {what}: not accepted. Pickle-based formats (.pt, .pth, .pkl, "
        ".bin, .joblib, .h5, .keras) can run code when loaded, and weights alone are not a "
        f"model. {ACCEPTED_FORMATS}",
        param="file",
        code="unsupported_model_format",
    )


def _zip_kind(spool: Spool) -> str:
    """What a zip holds, by its member names only (a PyTorch checkpoint has data.pkl)."""
    try:
        with os.fdopen(os.dup(spool.fd), "rb") as file, zipfile.ZipFile(file) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return "a zip archive"
    if any(name.endswith(("data.pkl", ".pkl", ".pickle")) for name in names):
        return "a zip archive holding a pickle (a PyTorch checkpoint)"
    if any(name.endswith(("keras_metadata.pb", "config.json")) for name in names):
        return "a zip archive (a Keras or Hugging Face model folder)"
    return "a zip archive"


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 10:
        return False
    header = int.from_bytes(head[:8], "little")
    return head[8:10] == b'{"' and 0 < header < size


def detect_format(
    options: ImportOptions, model: Spool, tokenizer: Spool | None
) -> ImportFormatName:
    if options.format is not None:
        return options.format
    if model.head.startswith(GGUF_MAGIC):
        return GGUF
    if tokenizer is not None:
        return SENTENCE_EMBEDDING
    # A serialised ModelProto starts with field 1 (ir_version, a varint): tag byte 0x08.
    if model.suffix == ".onnx" or model.head[:1] == b"\x08":
        return ONNX
    raise InvalidRequest(
        f"Cannot tell what {model.filename} is: it is neither a GGUF file nor ONNX. Name its "
        f"format with `format` if it is one of them. {ACCEPTED_FORMATS}",
        param="file",
        code="unsupported_model_format",
    )


_ONLY_FOR: dict[str, ImportFormatName] = {
    "chat_template": GGUF,
    "signature": ONNX,
    "pooling": SENTENCE_EMBEDDING,
    "normalize": SENTENCE_EMBEDDING,
    "max_seq_length": SENTENCE_EMBEDDING,
}


def _check_options(kind: ImportFormatName, options: ImportOptions, tokenizer: Spool | None) -> None:
    for field, only in _ONLY_FOR.items():
        if getattr(options, field) is not None and kind != only:
            raise InvalidRequest(
                f"'{field}' applies to format '{only}' only; this import is '{kind}'.",
                param=field,
            )
    if kind == SENTENCE_EMBEDDING and tokenizer is None:
        raise InvalidRequest(
            "A sentence-embedding import needs the model's tokenizer.json (the `tokenizer` "
            "part of the upload, or tokenizer_file_id).",
            param="tokenizer",
            code="missing_required_parameter",
        )
    if kind != SENTENCE_EMBEDDING and tokenizer is not None:
        raise InvalidRequest(
            f"A tokenizer applies to format '{SENTENCE_EMBEDDING}' only; this import is '{kind}'.",
            param="tokenizer",
        )


def _check_template(source: str, found: dict[str, Any]) -> None:
    """The template compiles and renders a one-message conversation."""
    try:
        template = ChatTemplate(
            source, bos_token=found.get("bos_token") or "", eos_token=found.get("eos_token") or ""
        )
    except TemplateError as exc:
        raise InvalidRequest(
            f"The chat template is not valid Jinja: {exc}",
            param="chat_template",
            code="invalid_chat_template",
        ) from exc
    try:
        template.render([{"role": "user", "content": "Hello!"}])
    except Exception as exc:
        reason = exc.message if isinstance(exc, ApiError) else f"{type(exc).__name__}: {exc}"
        raise InvalidRequest(
            f"The chat template cannot render a one-message conversation: {reason}",
            param="chat_template",
            code="invalid_chat_template",
        ) from exc


def _self_contained(model: Spool) -> None:
    try:
        check_self_contained(model.path)
    except ValueError as exc:
        raise _invalid_file(f"{model.filename}: {exc}") from exc


def _encoder_inputs(session: Any) -> tuple[str, ...]:
    """The graph's inputs, which must be token ids and masks (INT64, [batch, sequence])."""
    nodes = session.get_inputs()
    names = tuple(node.name for node in nodes)
    wrong = [
        f"{node.name} ({node.type})"
        for node in nodes
        if node.name not in ENCODER_INPUTS or node.type != "tensor(int64)"
    ]
    if wrong or "input_ids" not in names:
        raise _invalid_file(
            f"A sentence encoder takes INT64 input_ids [batch, sequence] (and optionally "
            f"attention_mask, token_type_ids); this graph takes {list(names)}"
            + (f", of which {wrong} are not such inputs" if wrong else "")
            + ". Export the transformer's last_hidden_state for these inputs."
        )
    outputs = session.get_outputs()
    shape = outputs[0].shape if outputs else None
    if not outputs or (isinstance(shape, list) and len(shape) != 3):
        raise _invalid_file(
            "A sentence encoder's first output is the token vectors [batch, sequence, hidden] "
            f"(last_hidden_state); this graph gives {[(o.name, o.shape) for o in outputs]}."
        )
    return names


def _scores_kind(output: np.ndarray) -> str:
    """Whether a classifier's output already holds probabilities (rows of non-negative
    numbers summing to 1), judged on the import's test batch."""
    scores = np.asarray(output, dtype=np.float64)
    if scores.ndim == 2 and (scores >= 0).all() and np.allclose(scores.sum(axis=1), 1, atol=1e-3):
        return "probabilities"
    return "logits"


def _invalid_file(message: str) -> InvalidRequest:
    return InvalidRequest(message, param="file", code="invalid_model_file")
