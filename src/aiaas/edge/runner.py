"""Run an aiaas edge bundle: JSON records in, the platform's predictions out, without aiaas.

This file is copied into every bundle as `run.py`. It needs only numpy and onnxruntime (and
Pillow, for a model that reads images), so it imports nothing else outside the standard library.
It reads the bundle's own `preprocessing.json` and applies it exactly as the platform's
`/v1/predictions` does: numbers imputed and standardised, categories one-hot or ordinal, text cut
into the model's word vocabulary or into BERT wordpieces (from `tokenizer.json`), images decoded,
resized and normalised. A record is a JSON object mapping column names to values; columns the
model does not read are ignored.

    python run.py input.jsonl [--output predictions.jsonl]     (one JSON record per line; - reads
                                                                stdin; one prediction per line out)
    python run.py --verify                                     (check every file's sha256)

    from run import predict
    predict([{"a": 1.5, "color": "red"}])
    # [{"index": 0, "label": "yes", "probabilities": {"no": 0.1, "yes": 0.9}, "value": None}]
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import io
import json
import math
import re
import sys
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

__all__ = ["BundleError", "BundleModel", "Preprocessor", "WordPiece", "main", "predict", "verify"]

HERE = Path(__file__).resolve().parent
BATCH_SIZE = 256
PAD_TOKEN = "<pad>"  # noqa: S105 (a token, not a password)
UNK_TOKEN = "<unk>"  # noqa: S105
OUTPUT_NAME = "logits"
_WORD = re.compile(r"\w+|[^\w\s]")
_IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")
# Rust's char::is_whitespace (Unicode White_Space), which the `tokenizers` library uses.
_WHITESPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
    "\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
_CJK = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B920, 0x2CEAF),  # sic: as `tokenizers` has it (BERT says 0x2B820)
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)


class BundleError(ValueError):
    """A record the model cannot read, or a bundle this runner cannot run."""


# -- values as the platform reads them -----------------------------------------------------------


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _category_text(value: object) -> str | None:
    """One spelling per value, so 1 and 1.0 are the same category (and True is "true")."""
    if _missing(value):
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _number(value: object, column: str) -> float:
    """float, NaN where missing. A value that is not a number is an error, not a gap."""
    if _missing(value):
        return math.nan
    if isinstance(value, str):
        if not value.strip():
            return math.nan  # an empty CSV cell
        try:
            number = float(value)
        except ValueError:
            raise BundleError(f"column {column!r}: {value!r} is not a number") from None
    elif isinstance(value, bool | int | float):
        number = float(value)
    else:
        raise BundleError(f"column {column!r}: {value!r} is not a number")
    if math.isinf(number):
        raise BundleError(f"column {column!r} holds an infinite value")
    return number


def _text(value: object) -> str:
    if isinstance(value, str):
        return value
    return _category_text(value) or ""


# -- feature steps -------------------------------------------------------------------------------


def _numeric(step: Mapping[str, Any], values: Sequence[object]) -> np.ndarray:
    raw = np.array([_number(v, step["column"]) for v in values], dtype=np.float64)
    filled = np.where(np.isnan(raw), step["fill"], raw)
    if step["standardize"]:
        filled = (filled - step["mean"]) / step["std"]
    return filled.astype(np.float32)[:, None]


def _categorical(step: Mapping[str, Any], values: Sequence[object]) -> np.ndarray:
    categories: list[str] = step["categories"] or []
    index = {category: i for i, category in enumerate(categories)}
    unknown = len(categories) if step["other"] else -1
    texts = [_category_text(v) for v in values]
    texts = [step["fill"] if t is None else t for t in texts]
    codes = np.array([index.get(t, unknown) if t is not None else -1 for t in texts], np.int64)
    if step["encoding"] == "ordinal":
        return codes.astype(np.float32)[:, None]
    onehot = np.zeros((len(codes), len(categories) + int(step["other"])), dtype=np.float32)
    known = codes >= 0
    onehot[np.flatnonzero(known), codes[known]] = 1.0
    return onehot


def _pad(rows: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(rows), length), pad_id, dtype=np.int64)
    attention = np.zeros((len(rows), length), dtype=np.int64)
    for row, tokens in enumerate(rows):
        tokens = tokens[:length]
        ids[row, : len(tokens)] = tokens
        attention[row, : len(tokens)] = 1
    return ids, attention


def _word_ids(step: Mapping[str, Any], texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    vocabulary: list[str] = step["vocabulary"]
    index = {word: i for i, word in enumerate(vocabulary)}
    unk = index[UNK_TOKEN]
    lowercase = step["lowercase"]
    rows = [
        [index.get(word, unk) for word in _WORD.findall(text.lower() if lowercase else text)]
        for text in texts
    ]
    return _pad(rows, step["max_length"], index[PAD_TOKEN])


def _image(value: object, step: Mapping[str, Any]) -> np.ndarray:
    """Encoded image bytes (base64 in JSON) as float32 [channels, height, width] in [0, 1]."""
    column, channels = step["column"], step["channels"]
    height, width = step["size"]
    try:
        from PIL import Image, ImageOps
    except ImportError as exc:
        raise BundleError("this model reads images: pip install pillow") from exc
    if _missing(value):
        raise BundleError(f"column {column!r}: an image is missing")
    if isinstance(value, str):
        try:
            value = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise BundleError(f"column {column!r}: an image must be base64 text") from exc
    if not isinstance(value, bytes | bytearray | memoryview):
        raise BundleError(f"column {column!r}: expected image bytes, got {type(value).__name__}")
    try:
        with Image.open(io.BytesIO(bytes(value)), formats=_IMAGE_FORMATS) as opened:
            image = ImageOps.exif_transpose(opened)
            if "transparency" in image.info:
                image = image.convert("RGBA")
            image = image.convert("L" if channels == 1 else "RGB")
            image = image.resize((width, height), Image.Resampling.BILINEAR)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise BundleError(f"column {column!r}: cannot decode image: {exc}") from exc
    pixels = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    pixels = pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
    return np.ascontiguousarray(pixels)


def _images(step: Mapping[str, Any], values: Sequence[object]) -> np.ndarray:
    height, width = step["size"]
    batch = np.empty((len(values), step["channels"], height, width), dtype=np.float32)
    for row, value in enumerate(values):
        batch[row] = _image(value, step)
    mean = np.asarray(step["mean"], dtype=np.float32)[:, None, None]
    std = np.asarray(step["std"], dtype=np.float32)[:, None, None]
    return (batch - mean) / std


# -- BERT wordpiece, as the `tokenizers` library does it -----------------------------------------


class WordPiece:
    """A BERT tokenizer read from a Hugging Face `tokenizer.json`: BertNormalizer (clean text,
    CJK spacing, accent stripping, lowercasing), BertPreTokenizer (whitespace and punctuation),
    greedy longest-match WordPiece, then [CLS] ... [SEP] and the file's truncation.

    Character classes come from this Python's `unicodedata`; `tokenizers` has its own, older
    tables, so a character added to Unicode since (a rare mark or punctuation sign) may split
    differently. Text in the scripts people write matches id for id."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        model = config.get("model") or {}
        normalizer = config.get("normalizer") or {}
        pre = config.get("pre_tokenizer") or {}
        post = config.get("post_processor") or {}
        if model.get("type") != "WordPiece" or normalizer.get("type") != "BertNormalizer":
            raise BundleError("only BERT WordPiece tokenizers (BertNormalizer) are supported")
        if pre.get("type") != "BertPreTokenizer":
            raise BundleError("only the BertPreTokenizer is supported")
        self.vocab: dict[str, int] = dict(model["vocab"])
        self.unk_id = self.vocab[model["unk_token"]]
        self.prefix: str = model.get("continuing_subword_prefix", "##")
        self.max_chars: int = model.get("max_input_chars_per_word", 100)
        self.clean_text = bool(normalizer.get("clean_text", True))
        self.chinese = bool(normalizer.get("handle_chinese_chars", True))
        self.lowercase = bool(normalizer.get("lowercase", True))
        strip = normalizer.get("strip_accents")
        self.strip_accents = self.lowercase if strip is None else bool(strip)
        self.cls_id, self.sep_id = self._template(post)
        truncation = config.get("truncation") or {}
        if truncation.get("direction", "Right") != "Right":
            raise BundleError("only right truncation is supported")
        self.max_length: int | None = truncation.get("max_length")
        self.pad_id = int((config.get("padding") or {}).get("pad_id", 0))
        added = config.get("added_tokens") or []
        for token in added:
            if token.get("normalized") or token.get("lstrip") or token.get("rstrip"):
                raise BundleError(f"added token {token['content']!r}: unsupported options")
            if token.get("single_word"):
                raise BundleError(f"added token {token['content']!r}: unsupported options")
        self.added = {token["content"]: int(token["id"]) for token in added}
        contents = sorted(self.added, key=len, reverse=True)  # longest first: leftmost-longest
        self._added = re.compile("|".join(re.escape(c) for c in contents)) if contents else None

    @staticmethod
    def _template(post: Mapping[str, Any]) -> tuple[int, int]:
        kind = post.get("type")
        if kind == "BertProcessing":
            return int(post["cls"][1]), int(post["sep"][1])
        if kind == "TemplateProcessing":
            single = post["single"]
            names = [
                item["SpecialToken"]["id"] if "SpecialToken" in item else "$A" for item in single
            ]
            if len(names) == 3 and names[1] == "$A" and "$A" not in (names[0], names[2]):
                specials = post["special_tokens"]
                [cls_id] = specials[names[0]]["ids"]
                [sep_id] = specials[names[2]]["ids"]
                return int(cls_id), int(sep_id)
        raise BundleError("only a [CLS] text [SEP] post-processor is supported")

    def encode(self, text: str) -> list[int]:
        """Ids with [CLS] and [SEP], truncated as the tokenizer file says (no padding)."""
        ids: list[int] = []
        start = 0
        matches = self._added.finditer(text) if self._added else iter(())
        for match in matches:
            ids.extend(self._plain(text[start : match.start()]))
            ids.append(self.added[match.group()])
            start = match.end()
        ids.extend(self._plain(text[start:]))
        if self.max_length is not None:
            ids = ids[: max(self.max_length - 2, 0)]
        return [self.cls_id, *ids, self.sep_id]

    def _plain(self, text: str) -> list[int]:
        ids: list[int] = []
        for word in self._words(self._normalize(text)):
            ids.extend(self._pieces(word))
        return ids

    def _normalize(self, text: str) -> str:
        if self.clean_text:
            text = "".join(
                " " if c in _WHITESPACE else c
                for c in text
                if c not in "\x00\ufffd" and not _is_control(c)
            )
        if self.chinese:
            text = "".join(f" {c} " if _is_cjk(c) else c for c in text)
        if self.strip_accents:
            text = "".join(
                c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn"
            )
        if self.lowercase:
            text = "".join(c.lower() for c in text)  # per character, as Rust does
        return text

    @staticmethod
    def _words(text: str) -> Iterator[str]:
        word: list[str] = []
        for c in text:
            if c in _WHITESPACE or _is_punctuation(c):
                if word:
                    yield "".join(word)
                    word = []
                if c not in _WHITESPACE:
                    yield c
            else:
                word.append(c)
        if word:
            yield "".join(word)

    def _pieces(self, word: str) -> list[int]:
        if len(word) > self.max_chars:
            return [self.unk_id]
        pieces: list[int] = []
        start = 0
        while start < len(word):
            end = len(word)
            found = None
            while start < end:
                piece = word[start:end] if start == 0 else self.prefix + word[start:end]
                found = self.vocab.get(piece)
                if found is not None:
                    break
                end -= 1
            if found is None:
                return [self.unk_id]
            pieces.append(found)
            start = end
        return pieces


def _is_control(c: str) -> bool:
    return c not in "\t\n\r" and unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co")


def _is_cjk(c: str) -> bool:
    point = ord(c)
    return any(low <= point <= high for low, high in _CJK)


def _is_punctuation(c: str) -> bool:
    point = ord(c)
    ascii_punctuation = 33 <= point <= 47 or 58 <= point <= 64 or 91 <= point <= 96
    return ascii_punctuation or 123 <= point <= 126 or unicodedata.category(c).startswith("P")


def _wordpiece_ids(
    tokenizer: WordPiece, texts: Sequence[str], max_length: int
) -> tuple[np.ndarray, np.ndarray]:
    rows = []
    for text in texts:
        ids = tokenizer.encode(text)
        if len(ids) > max_length >= 2:
            ids = [*ids[: max_length - 1], ids[-1]]  # keep the closing [SEP]
        rows.append(ids)
    return _pad(rows, max_length, tokenizer.pad_id)


# -- the model -----------------------------------------------------------------------------------


class Preprocessor:
    """A fitted `preprocessing.json` applied to records, as the platform's `transform` does.

    A row's result never depends on the other rows, so records may be encoded in any batches.
    """

    def __init__(self, spec: Mapping[str, Any], tokenizer: WordPiece | None = None) -> None:
        if not spec.get("fitted"):
            raise BundleError("preprocessing.json is not fitted")
        self.features: list[dict[str, Any]] = list(spec["features"])
        self.columns = [step["column"] for step in self.features]
        text_steps = [step for step in self.features if step["kind"] == "text"]
        self.text = text_steps[0] if text_steps else None  # the one the network reads
        if self.text is not None and self.text["tokenizer"] == "wordpiece" and tokenizer is None:
            raise BundleError("this model reads wordpieces: tokenizer.json is needed")
        self.tokenizer = tokenizer

    def encode(self, records: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
        """Arrays by input name: tabular, tokens and attention, images (those the spec makes)."""
        for index, record in enumerate(records):
            if not isinstance(record, Mapping):
                kind = type(record).__name__
                raise BundleError(f"record {index} must map column names to values, not {kind}")
            for column in self.columns:
                if column not in record:
                    raise BundleError(f"record {index}: column {column!r} is missing")
        blocks: list[np.ndarray] = []
        arrays: dict[str, np.ndarray] = {}
        for step in self.features:
            values = [record[step["column"]] for record in records]
            kind = step["kind"]
            if kind == "numeric":
                blocks.append(_numeric(step, values))
            elif kind == "categorical":
                blocks.append(_categorical(step, values))
            elif kind == "image":
                arrays["images"] = _images(step, values)
            elif kind == "text" and step is self.text:
                texts = [_text(v) for v in values]
                if step["tokenizer"] == "wordpiece" and self.tokenizer is not None:
                    tokens = _wordpiece_ids(self.tokenizer, texts, step["max_length"])
                else:
                    tokens = _word_ids(step, texts)
                arrays["tokens"], arrays["attention"] = tokens
        if blocks:
            arrays["tabular"] = np.concatenate(blocks, axis=1)
        return arrays


class BundleModel:
    """A bundle's ONNX graph with its preprocessing: `predict(records)` as the platform does."""

    def __init__(self, directory: Path | str = HERE, *, threads: int = 0) -> None:
        folder = Path(directory)
        spec = json.loads((folder / "preprocessing.json").read_text("utf-8"))
        about = json.loads((folder / "model.json").read_text("utf-8"))
        label = spec.get("label") or {}
        if not label:
            raise BundleError("preprocessing.json has no label")
        self.label: dict[str, Any] = label
        self.task: str = label["task"]
        self.classes: list[str] | None = label.get("classes")
        self.input_names: list[str] = list(about["input_names"])
        tokenizer = None
        if (folder / "tokenizer.json").is_file():
            tokenizer = WordPiece(json.loads((folder / "tokenizer.json").read_text("utf-8")))
        self.preprocessor = Preprocessor(spec, tokenizer)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )

    def encode(self, records: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
        """The graph's inputs for `records`."""
        arrays = self.preprocessor.encode(records)
        missing = [name for name in self.input_names if name not in arrays]
        if missing:
            raise BundleError(f"the preprocessing makes no {missing} input for this graph")
        return {name: np.ascontiguousarray(arrays[name]) for name in self.input_names}

    def predict(self, records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = []
        for start in range(0, len(records), BATCH_SIZE):
            batch = records[start : start + BATCH_SIZE]
            (logits,) = self.session.run([OUTPUT_NAME], self.encode(batch))
            results.extend(self.interpret(np.asarray(logits, dtype=np.float32), start))
        return results

    def interpret(self, logits: np.ndarray, first_index: int = 0) -> list[dict[str, Any]]:
        indices = range(first_index, first_index + len(logits))
        if self.task == "regression":
            values = logits[:, 0].astype(np.float64)
            if self.label.get("standardize"):
                values = values * self.label["std"] + self.label["mean"]
            return [
                {"index": i, "label": None, "probabilities": None, "value": float(v)}
                for i, v in zip(indices, values, strict=True)
            ]
        wide = logits.astype(np.float64)
        shifted = np.exp(wide - wide.max(axis=1, keepdims=True))
        probabilities = shifted / shifted.sum(axis=1, keepdims=True)
        classes = self.classes or []
        return [
            {
                "index": i,
                "label": classes[int(row.argmax())],
                "probabilities": {c: float(p) for c, p in zip(classes, row, strict=True)},
                "value": None,
            }
            for i, row in zip(indices, probabilities, strict=True)
        ]


@cache
def _bundled() -> BundleModel:
    # One session per process for `predict`: building it costs far more than a small batch.
    return BundleModel(HERE)


def predict(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Predictions for JSON-like records (column -> value) with the model next to this file."""
    return _bundled().predict(list(records))


def verify(directory: Path | str = HERE) -> list[str]:
    """Files whose sha256 differs from `manifest.json` (or that are missing); [] when intact."""
    folder = Path(directory)
    manifest = json.loads((folder / "manifest.json").read_text("utf-8"))
    bad = []
    for name, entry in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            bad.append(name)
            continue
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        if digest.hexdigest() != entry["sha256"]:
            bad.append(name)
    return bad


def _read_records(lines: Iterable[str]) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise BundleError(f"line {number} is not JSON: {exc}") from exc
    return records


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Predict with this aiaas edge bundle.")
    parser.add_argument("input", nargs="?", help="JSON lines, one record each; - for stdin")
    parser.add_argument("--output", "-o", help="write JSON lines here (default: stdout)")
    parser.add_argument("--verify", action="store_true", help="check files against manifest")
    args = parser.parse_args(argv)
    if args.verify:
        bad = verify()
        for name in bad:
            print(f"sha256 mismatch or missing: {name}", file=sys.stderr)
        if bad or args.input is None:
            return 1 if bad else 0
    if args.input is None:
        parser.error("an input file is needed (or --verify)")
    try:
        if args.input == "-":
            records = _read_records(sys.stdin)
        else:
            with open(args.input, encoding="utf-8") as handle:
                records = _read_records(handle)
        results = predict(records)
    except (BundleError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    lines = "".join(json.dumps(result) + "\n" for result in results)
    if args.output:
        Path(args.output).write_text(lines, encoding="utf-8")
    else:
        sys.stdout.write(lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
