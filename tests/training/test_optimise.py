"""The optimisation building blocks on small networks: outputs stay close, sizes shrink, pruning
hits its sparsity, measurements are complete."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from safetensors.numpy import load as load_safetensors

from aiaas.specs.shapes import ArchitectureOptions, InputShape
from aiaas.training import optimise
from aiaas.training.architectures import Network, build_model
from aiaas.training.export import export_onnx

SHAPE = InputShape(
    tabular_dim=32,
    text_column=None,
    text_vocab_size=None,
    text_length=None,
    text_tokenizer=None,
    image_shape=None,
    n_outputs=4,
)


@pytest.fixture
def mlp() -> Network:
    torch.manual_seed(0)
    return build_model("mlp", SHAPE, ArchitectureOptions(hidden_sizes=[128, 128])).eval()


@pytest.fixture
def rows() -> dict[str, np.ndarray]:
    return {"tabular": np.random.default_rng(0).normal(size=(200, 32)).astype(np.float32)}


def _logits(graph: bytes, feed: dict[str, np.ndarray]) -> np.ndarray:
    return np.asarray(optimise.session(graph, threads=1).run(None, feed)[0])


def test_int8_graphs_are_smaller_and_close(mlp: Network, rows: dict[str, np.ndarray]) -> None:
    graph = export_onnx(mlp, SHAPE)
    reference = _logits(graph, rows)
    for quantized in (
        optimise.quantize_dynamic(graph),
        optimise.quantize_static(graph, rows),
    ):
        assert len(quantized) < 0.45 * len(graph)
        out = _logits(quantized, rows)
        assert np.abs(out - reference).max() < 0.05 * np.abs(reference).max() + 0.02
        assert (out.argmax(1) == reference.argmax(1)).mean() >= 0.9


def test_graph_optimisation_keeps_the_outputs(mlp: Network, rows: dict[str, np.ndarray]) -> None:
    graph = export_onnx(mlp, SHAPE)
    optimised = optimise.optimise_graph(graph)
    onnx.checker.check_model(onnx.load_from_string(optimised))
    np.testing.assert_allclose(_logits(optimised, rows), _logits(graph, rows), atol=1e-5)


@pytest.mark.parametrize(("structured", "sparsity"), [(False, 0.7), (True, 0.5)])
def test_pruning_reaches_its_sparsity(mlp: Network, structured: bool, sparsity: float) -> None:
    output_before = mlp.head[-1].weight.detach().clone()
    optimise.apply_pruning(mlp, sparsity, structured=structured)
    optimise.bake_pruning(mlp)
    assert optimise.sparsity_of(mlp) == pytest.approx(sparsity, abs=0.01)
    assert not any(name.endswith("_orig") for name in mlp.state_dict())  # masks baked in
    assert torch.equal(mlp.head[-1].weight, output_before)  # the output layer is left whole
    if structured:
        first = mlp.head[0].weight.detach()
        assert (first.abs().sum(dim=1) == 0).float().mean() == pytest.approx(sparsity, abs=0.01)


def test_pytorch_int8_state_is_int8_safetensors(mlp: Network, rows: dict[str, np.ndarray]) -> None:
    quantized = optimise.quantize_dynamic_torch(mlp)
    tensors = load_safetensors(optimise.int8_state(quantized))
    assert {t.dtype for name, t in tensors.items() if name.endswith(".int8")} == {np.dtype(np.int8)}
    run = optimise.torch_runner(quantized)
    reference = optimise.torch_runner(mlp)(rows)
    assert (run(rows).argmax(1) == reference.argmax(1)).mean() >= 0.9


def test_measurements_are_complete(mlp: Network, rows: dict[str, np.ndarray]) -> None:
    graph = export_onnx(mlp, SHAPE)

    def evaluate(logits: np.ndarray) -> dict[str, object]:
        assert logits.shape == (200, 4)
        return {"summary": {"rows": len(logits)}, "evaluation": {}}

    measured = optimise.measure(graph, rows, evaluate, threads=1, budget_s=0.05)
    assert measured.size_bytes == len(graph)
    assert 0 < measured.latency_p50_ms <= measured.latency_p95_ms
    assert measured.throughput_rows_per_s > 0
    assert measured.metrics["summary"] == {"rows": 200}
