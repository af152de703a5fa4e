"""Run an exported sentence encoder: tokenise, one ONNX Runtime forward, pool, normalise.

The steps match sentence-transformers (truncate to max_seq_length, pad to the longest input of
the batch, mean-pool over the attention mask, L2-normalise), so our vectors agree with theirs to
float rounding. Tokenising and the forward are separate doors (`tokenize`, `encode_ids`) so a
batcher can count tokens and sort inputs by length before the model runs.

Plain synchronous code: callers own the threads. One `InferenceSession.run` may be called from
several threads at once; the tokenizer is only read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from aiaas.engines.embeddings.export import ExportedModel, PoolingConfig, Variant
from aiaas.engines.onnx_options import session_options
from aiaas.errors import ContextLengthExceeded, InvalidRequest

ONE_BY_ONE = 8  # up to this many texts are tokenised with encode(), which keeps the GIL
# ONNX Runtime graph rewrites we turn off. SkipLayerNormFusion folds "residual add + LayerNorm"
# into its contrib SkipLayerNormalization, whose CPU kernel is a scalar loop: in the int8 MiniLM
# it took 19 % of a forward (0.28 of 1.43 CPU-ms per sentence, one thread, batches of 16), while
# the plain LayerNormalization kernel left after an unfused Add costs 0.06. Without the fusion
# the int8 forward is 18-20 % faster at batches of 8 to 32; fp32 graphs, which it rarely
# matches, run the same.
DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)
NORM_EPS = 1e-12  # torch.nn.functional.normalize's floor, so a zero vector stays zero
MASK_EPS = 1e-9  # sentence-transformers' floor on the token count of mean pooling


@dataclass(frozen=True, slots=True)
class InMemoryEncoder:
    """An encoder graph held in memory: a deployed fine-tuned or imported model, decrypted
    from the blob store, never written to disk in the clear. `graph` may also be a path (an
    import checks its upload from an anonymous in-memory file); `tokenizer` is a tokenizer.json
    file or its bytes (an imported model's own)."""

    graph: bytes | Path
    tokenizer: Path | bytes
    pooling: PoolingConfig

    def onnx(self, variant: Variant) -> bytes | Path:
        return self.graph  # fine-tuned and imported encoders are served as they are (fp32)


class SentenceEncoder:
    def __init__(
        self,
        model: ExportedModel | InMemoryEncoder,
        *,
        variant: Variant = "fp32",
        intra_op_threads: int = 1,
        spin: bool = False,
    ) -> None:
        """Load one variant of an export.

        `spin=False` stops ORT's worker threads from busy-waiting between calls: on a small box
        the batcher's idle gaps would otherwise burn the cores other engines need.
        """
        self.model = model
        self.variant: Variant = variant
        self.pooling: PoolingConfig = model.pooling
        options = session_options(threads=intra_op_threads, spin=spin)
        source = model.onnx(variant)
        self._session = ort.InferenceSession(
            source if isinstance(source, bytes) else str(source),
            options,
            providers=["CPUExecutionProvider"],
            disabled_optimizers=list(DISABLED_OPTIMIZERS),
        )
        self._inputs = tuple(i.name for i in self._session.get_inputs())
        tokenizer = model.tokenizer
        self._tokenizer = (
            Tokenizer.from_buffer(tokenizer)
            if isinstance(tokenizer, bytes)
            else Tokenizer.from_file(str(tokenizer))
        )
        # tokenizer.json ships its own truncation and fixed padding (128 for MiniLM);
        # sentence-transformers overrides both, and so do we.
        self._tokenizer.enable_truncation(max_length=self.pooling.max_seq_length)
        self._tokenizer.no_padding()
        self._vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def dimension(self) -> int:
        return self.pooling.dimension

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def max_seq_length(self) -> int:
        return self.pooling.max_seq_length

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Model-ready token ids (special tokens added, truncated to max_seq_length)."""
        if not texts:
            return []
        if self.pooling.lowercase:
            texts = [text.lower() for text in texts]
        if len(texts) <= ONE_BY_ONE:
            # encode_batch releases the GIL for its thread pool; on the event loop, getting it
            # back costs up to a switch interval (5 ms) while a work thread runs Python, against
            # ~25 us to encode a sentence in place.
            return [self._tokenizer.encode(text).ids for text in texts]
        return [encoding.ids for encoding in self._tokenizer.encode_batch(list(texts))]

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens each text costs the model, special tokens included: what usage bills."""
        return [len(ids) for ids in self.tokenize(texts)]

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors, float32, shape (len(texts), dimension)."""
        return self.encode_ids(self.tokenize(texts))

    def encode_ids(self, token_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Vectors for inputs already tokenised by `tokenize` (special tokens included).

        One forward for the whole list, padded to its longest member: callers that want less
        padding group inputs of similar length (the batcher sorts them).
        """
        if not token_ids:
            return np.zeros((0, self.dimension), dtype=np.float32)
        ids, mask = self._pad(token_ids)
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        (hidden,) = self._session.run(None, {name: feed[name] for name in self._inputs})
        return self._pool(np.asarray(hidden, dtype=np.float32), mask)

    def _pad(self, token_ids: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        lengths = [len(ids) for ids in token_ids]
        longest = max(lengths)
        if longest > self.max_seq_length:
            raise ContextLengthExceeded(
                f"input {lengths.index(longest)} has {longest} tokens; "
                f"this model reads at most {self.max_seq_length}",
                param="input",
            )
        if min(lengths) == 0:
            raise InvalidRequest(f"input {lengths.index(0)} has no tokens", param="input")
        ids = np.zeros((len(token_ids), longest), dtype=np.int64)
        for row, sequence in enumerate(token_ids):
            ids[row, : len(sequence)] = sequence
        mask = (np.arange(longest)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)
        if ids.min() < 0 or ids.max() >= self._vocab_size:
            raise InvalidRequest(
                f"token ids must lie in [0, {self._vocab_size}) for this model", param="input"
            )
        return ids, mask

    def _pool(self, hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """(n, seq, dim) token vectors -> (n, dim) sentence vectors."""
        weights = mask.astype(np.float32)
        if self.pooling.mode == "cls":
            vectors = hidden[:, 0, :]
        elif self.pooling.mode == "max":
            vectors = np.where(weights[:, :, None] > 0, hidden, np.float32(-1e9)).max(axis=1)
        else:
            summed = np.matmul(weights[:, None, :], hidden)[:, 0, :]
            vectors = summed / np.maximum(weights.sum(axis=1, keepdims=True), MASK_EPS)
        if self.pooling.normalize:
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.maximum(norms, NORM_EPS)
        return np.ascontiguousarray(vectors, dtype=np.float32)
