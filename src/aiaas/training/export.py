"""A trained `Network` as an ONNX graph, checked against torch before anyone serves it.

The graph is traced with the TorchScript exporter (`dynamo=False`): it works offline and handles
the transformers models the dynamo exporter trips on. The batch axis is dynamic on every input
and on the output; the sequence axis stays at the text step's `max_length`, which is also what
`transform` pads to at serving time.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
import torch

from aiaas.specs.shapes import InputShape
from aiaas.training.architectures import Network

__all__ = ["ExportError", "example_inputs", "export_onnx", "export_text_encoder", "verify_onnx"]

OUTPUT_NAME = "logits"
# Random token ids stay below this: valid in any learned vocabulary and in every BERT vocabulary.
_WORDPIECE_IDS = 1000


class ExportError(RuntimeError):
    """The network could not be exported, or its ONNX graph disagrees with torch."""


def example_inputs(
    shape: InputShape, input_names: tuple[str, ...], batch: int = 2
) -> dict[str, np.ndarray]:
    """Valid dummy inputs: tokens within the vocabulary, and rows with different padding."""
    rng = np.random.default_rng(0)
    length = shape.text_length or 1
    vocab = shape.text_vocab_size or _WORDPIECE_IDS
    real = np.maximum(length - np.arange(batch) * max(length // 3, 1), 1)  # real tokens per row
    attention = (np.arange(length)[None, :] < real[:, None]).astype(np.int64)
    arrays = {
        "tabular": rng.standard_normal((batch, shape.tabular_dim)).astype(np.float32),
        "tokens": rng.integers(2, max(vocab, 3), (batch, length), dtype=np.int64) * attention,
        "attention": attention,
        "images": rng.standard_normal((batch, *(shape.image_shape or (1, 1, 1)))).astype(
            np.float32
        ),
    }
    return {name: arrays[name] for name in input_names}


def export_onnx(model: Network, shape: InputShape, *, opset: int = 17) -> bytes:
    """The serialised ONNX graph of `model` in eval mode: its `input_names` in, "logits" out."""
    names = model.input_names
    example = example_inputs(shape, names)
    device = _device(model)
    args = tuple(torch.from_numpy(example[name]).to(device) for name in names)
    axes = {name: {0: "batch"} for name in (*names, OUTPUT_NAME)}
    buffer = io.BytesIO()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The legacy exporter announces its deprecation, tracing warns about Python values
            # it freezes, and LSTM export warns about batch sizes although the initial states
            # are zeros sized from the input; `verify_onnx` is what tells whether it is right.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", "Exporting a model to ONNX with a batch_size")
            # BERT's embeddings index with non-negative positions only.
            warnings.filterwarnings("ignore", "Exporting aten::index operator")
            torch.onnx.export(
                model,
                args,
                buffer,
                input_names=list(names),
                output_names=[OUTPUT_NAME],
                dynamic_axes=axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
    except RuntimeError as exc:  # torch.onnx's own errors derive from it
        raise ExportError(f"cannot export model {model.architecture!r} to ONNX: {exc}") from exc
    finally:
        model.train(was_training)
    return buffer.getvalue()


def verify_onnx(
    onnx_bytes: bytes, model: Network, inputs: dict[str, np.ndarray], *, atol: float = 1e-4
) -> float:
    """The largest absolute difference between ONNX Runtime's and torch's logits on `inputs`.

    Raises ExportError when it is above `atol` (or the outputs differ in shape or are not finite).
    """
    session = _session(onnx_bytes)
    feed = {name: inputs[name] for name in model.input_names}
    (from_onnx,) = session.run([OUTPUT_NAME], feed)
    from_torch = _torch_logits(model, feed)
    if from_onnx.shape != from_torch.shape:
        raise ExportError(f"ONNX logits have shape {from_onnx.shape}, torch's {from_torch.shape}")
    if not (np.isfinite(from_onnx).all() and np.isfinite(from_torch).all()):
        raise ExportError("the logits are not finite, so the export cannot be checked")
    difference = float(np.max(np.abs(from_onnx - from_torch), initial=0.0))
    if difference > atol:
        raise ExportError(
            f"ONNX logits differ from torch's by up to {difference:.3g} (allowed {atol:g})"
        )
    return difference


def _torch_logits(model: Network, feed: dict[str, np.ndarray]) -> np.ndarray:
    device = _device(model)
    tensors = [torch.from_numpy(np.ascontiguousarray(feed[name])).to(device) for name in feed]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits: np.ndarray = model(*tensors).float().cpu().numpy()
    finally:
        model.train(was_training)
    return logits


def _device(model: Network) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


class _LastHiddenState(torch.nn.Module):
    """A fine-tuned transformer as the embeddings engine serves one: ids and mask in, token
    vectors out (pooling and normalising happen in the engine, as for the bundled encoder)."""

    def __init__(self, bert: torch.nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden: torch.Tensor = self.bert(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=torch.zeros_like(input_ids),
        ).last_hidden_state
        return hidden


def export_text_encoder(model: Network, *, opset: int = 17) -> bytes:
    """The transformer inside a fine-tuned text network (e.g. MiniLM) as an ONNX graph the
    embeddings engine loads: `input_ids`, `attention_mask` in (batch and sequence dynamic),
    `last_hidden_state` out. Checked against torch before it is returned."""
    bert = getattr(model.encoder, "bert", None)
    if bert is None:
        raise ExportError(f"a {model.architecture!r} network has no transformer encoder")
    wrapper = _LastHiddenState(bert).eval()
    ids = torch.randint(1000, 2000, (2, 12), dtype=torch.int64)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    buffer = io.BytesIO()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", "Exporting aten::index operator")
            torch.onnx.export(
                wrapper,
                (ids, mask),
                buffer,
                input_names=["input_ids", "attention_mask"],
                output_names=["last_hidden_state"],
                dynamic_axes={
                    name: {0: "batch", 1: "sequence"}
                    for name in ("input_ids", "attention_mask", "last_hidden_state")
                },
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
            expected = wrapper(ids, mask).numpy()
    except RuntimeError as exc:
        raise ExportError(f"cannot export the text encoder to ONNX: {exc}") from exc
    finally:
        model.train(was_training)
    graph = buffer.getvalue()
    session = _session(graph)
    (got,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    difference = float(np.max(np.abs(np.asarray(got) - expected)))
    if not difference <= 1e-4:
        raise ExportError(f"the exported text encoder differs from torch by {difference:g}")
    return graph


def _session(graph: bytes) -> Any:
    """A one-thread ONNX Runtime session, to check a graph against torch."""
    import onnxruntime as ort  # serving's runtime; imported only when a graph is checked

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
