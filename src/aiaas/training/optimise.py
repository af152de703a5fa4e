"""Optimised variants of a trained network, and how to measure any ONNX graph the same way.

- `quantize_dynamic`: int8 weights, activations quantised per batch at run time (ONNX Runtime).
- `quantize_static`: int8 weights and activations in QDQ form, activation ranges calibrated on
  training rows (ONNX Runtime, MinMax).
- `prune`: magnitude pruning to a target sparsity (global L1 over every weight matrix, or L2
  structured over output units per layer), then a short fine-tune with the mask held, baked in.
- `optimise_graph`: ONNX Runtime's extended graph optimisations (constant folding, fusions),
  saved as a graph of their own.

`measure` runs a graph on the test split in ONNX Runtime, like serving does: size on disk,
single-request latency p50/p95, rows per second at batch 32, and the evaluation's headline
metrics. No database, no HTTP: the optimisation job composes these.
"""

from __future__ import annotations

import copy
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from aiaas.training.architectures import Network

METHODS = ("dynamic_int8", "static_int8", "prune", "onnx_optimized")
THROUGHPUT_BATCH = 32


def _with_files(graph: bytes, work: Callable[[Path, Path], None]) -> bytes:
    with tempfile.TemporaryDirectory(prefix="aiaas-optimise-") as tmp:
        source, target = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        source.write_bytes(graph)
        work(source, target)
        return target.read_bytes()


def _preprocessed(source: Path) -> Path:
    """ONNX Runtime's recommended pre-processing (shape inference, folding) before quantising."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    target = source.with_name("pre.onnx")
    quant_pre_process(str(source), str(target), skip_symbolic_shape=True)
    return target


# int8 weights in 7 bits (`reduce_range`), in both int8 variants. On x86 CPUs without VNNI (AVX2
# or AVX-512 alone) ONNX Runtime multiplies u8 activations by s8 weights with VPMADDUBSW, which
# adds each pair of products into an int16 that saturates: 255 * 127 * 2 overflows it, 255 * 64 *
# 2 does not. The saturation is silent and large (on a small MLP, logits off by a quarter of
# their range). A graph is quantised once and served on whatever CPU serving has, so it is made
# safe for all of them; the lost bit costs little (measured: the same MLP's max logit error goes
# from 0.0045 with exact integer arithmetic to 0.0053 dynamic, 0.0073 static).
_REDUCE_RANGE = True


def quantize_dynamic(graph: bytes) -> bytes:
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    def work(source: Path, target: Path) -> None:
        ort_quantize_dynamic(
            str(_preprocessed(source)),
            str(target),
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=_REDUCE_RANGE,
        )

    return _with_files(graph, work)


class _Calibration:
    """ONNX Runtime's CalibrationDataReader over batches of training inputs."""

    def __init__(self, batches: Iterator[dict[str, np.ndarray]]) -> None:
        self._batches = batches

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantize_static(
    graph: bytes, calibration: dict[str, np.ndarray], *, batch_size: int = 64
) -> bytes:
    """int8 QDQ graph; activation ranges from `calibration` (model inputs, a few hundred rows)."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
    )
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    rows = len(next(iter(calibration.values())))

    def batches() -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, rows, batch_size):
            yield {name: array[start : start + batch_size] for name, array in calibration.items()}

    def work(source: Path, target: Path) -> None:
        ort_quantize_static(
            str(_preprocessed(source)),
            str(target),
            _Calibration(batches()),  # type: ignore[arg-type]
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=_REDUCE_RANGE,
            calibrate_method=CalibrationMethod.MinMax,
        )

    return _with_files(graph, work)


def optimise_graph(graph: bytes) -> bytes:
    import onnxruntime as ort

    def work(source: Path, target: Path) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(target)
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])

    return _with_files(graph, work)


# -- pruning --------------------------------------------------------------------------------------


def prunable(model: Network) -> list[tuple[nn.Module, str]]:
    """Every weight matrix or kernel (linear, convolution, recurrent), not embeddings, norms or
    biases; the output layer is left whole."""
    found: list[tuple[nn.Module, str]] = []
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d):
            found.append((module, "weight"))
        elif isinstance(module, nn.LSTM | nn.GRU):
            found.extend(
                (module, name) for name, _ in module.named_parameters() if "weight" in name
            )
    last_linear = [m for m in model.head.modules() if isinstance(m, nn.Linear)][-1:]
    return [(m, name) for m, name in found if m not in last_linear]


def apply_pruning(model: Network, sparsity: float, *, structured: bool) -> None:
    """Mask weights (kept as masks until `bake_pruning`, so a fine-tune keeps them at zero)."""
    targets = prunable(model)
    if not targets:
        raise ValueError("the network has no weights to prune")
    if structured:
        for module, name in targets:
            if isinstance(module, nn.LSTM | nn.GRU):
                torch_prune.l1_unstructured(module, name, amount=sparsity)
            else:
                torch_prune.ln_structured(module, name, amount=sparsity, n=2, dim=0)
    else:
        torch_prune.global_unstructured(
            targets, pruning_method=torch_prune.L1Unstructured, amount=sparsity
        )


def bake_pruning(model: Network) -> None:
    """Make the masks permanent: plain weights with zeros, as export and state dicts expect."""
    for module, name in prunable(model):
        if hasattr(module, f"{name}_orig"):
            torch_prune.remove(module, name)


def sparsity_of(model: Network) -> float:
    """Share of zeros over the prunable weights."""
    zeros = total = 0
    with torch.no_grad():
        for module, name in prunable(model):
            weight = getattr(module, name)
            zeros += int((weight == 0).sum())
            total += weight.numel()
    return zeros / total if total else 0.0


# -- measuring -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    size_bytes: int
    latency_p50_ms: float
    latency_p95_ms: float
    throughput_rows_per_s: float
    metrics: dict[str, Any]  # the evaluation's headline numbers on the test split

    def as_dict(self) -> dict[str, Any]:
        return {
            "size_bytes": self.size_bytes,
            "latency_p50_ms": round(self.latency_p50_ms, 4),
            "latency_p95_ms": round(self.latency_p95_ms, 4),
            "throughput_rows_per_s": round(self.throughput_rows_per_s, 1),
            "metrics": self.metrics,
        }


def session(graph: bytes, *, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def logits_of(runner: Any, inputs: dict[str, np.ndarray], *, batch_size: int = 256) -> np.ndarray:
    rows = len(next(iter(inputs.values())))
    parts = [
        runner.run(None, {k: v[start : start + batch_size] for k, v in inputs.items()})[0]
        for start in range(0, rows, batch_size)
    ]
    return np.concatenate(parts).astype(np.float32, copy=False)


def measure(
    graph: bytes,
    inputs: dict[str, np.ndarray],
    evaluate: Callable[[np.ndarray], dict[str, Any]],
    *,
    threads: int,
    budget_s: float = 1.0,
) -> Measurement:
    """Size, latency, throughput and metrics of an ONNX graph on `inputs` (the test split)."""
    runner = session(graph, threads=threads)

    def run(feed: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(runner.run(None, feed)[0])

    return measure_runner(run, len(graph), inputs, evaluate, budget_s=budget_s)


def measure_runner(
    run: Callable[[dict[str, np.ndarray]], np.ndarray],
    size_bytes: int,
    inputs: dict[str, np.ndarray],
    evaluate: Callable[[np.ndarray], dict[str, Any]],
    *,
    budget_s: float = 1.0,
) -> Measurement:
    """`measure` for any runner (an ONNX Runtime session, a torch module).

    Latency: one row per request, repeated for about `budget_s` (at least 30 runs, the rows
    taken in turn); throughput: batches of 32 rows for as long again.
    """
    rows = len(next(iter(inputs.values())))
    logits = np.concatenate(
        [run({k: v[i : i + 256] for k, v in inputs.items()}) for i in range(0, rows, 256)]
    ).astype(np.float32, copy=False)
    metrics = evaluate(logits)
    feeds = [{k: v[i : i + 1] for k, v in inputs.items()} for i in range(min(rows, 256))]
    run(feeds[0])  # warm-up
    latencies: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(latencies) < 30 or time.perf_counter() < deadline:
        feed = feeds[len(latencies) % len(feeds)]
        started = time.perf_counter()
        run(feed)
        latencies.append((time.perf_counter() - started) * 1000)
        if len(latencies) >= 5000:
            break
    batch = {k: _tile(v, THROUGHPUT_BATCH) for k, v in inputs.items()}
    run(batch)
    done, started = 0, time.perf_counter()
    while done < 30 * THROUGHPUT_BATCH or time.perf_counter() - started < budget_s:
        run(batch)
        done += THROUGHPUT_BATCH
    elapsed = time.perf_counter() - started
    return Measurement(
        size_bytes=size_bytes,
        latency_p50_ms=float(np.percentile(latencies, 50)),
        latency_p95_ms=float(np.percentile(latencies, 95)),
        throughput_rows_per_s=done / elapsed,
        metrics=metrics,
    )


# -- PyTorch's dynamic quantisation ------------------------------------------------------------


def quantize_dynamic_torch(model: Network) -> nn.Module:
    """PyTorch's dynamic int8 of every linear layer (weights int8 per tensor, activations
    quantised per batch). It runs under torch only: serving, which is ONNX Runtime, cannot load
    it, so its version is measured and kept, not deployed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization says it is moving to torchao
        return torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8
        )


def int8_state(quantized: nn.Module) -> bytes:
    """The quantised network as safetensors: int8 weights with their scale and zero point, the
    rest as it was (never a pickle)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    tensors: dict[str, torch.Tensor] = {}
    for name, module in quantized.named_modules():
        if isinstance(module, DynamicLinear):
            weight = module.weight()
            tensors[f"{name}.weight.int8"] = weight.int_repr().contiguous()
            tensors[f"{name}.weight.scale"] = torch.tensor([weight.q_scale()])
            tensors[f"{name}.weight.zero_point"] = torch.tensor([weight.q_zero_point()])
            bias = module.bias()
            if bias is not None:
                tensors[f"{name}.bias"] = bias.detach().contiguous()
    for name, tensor in quantized.state_dict().items():
        plain = isinstance(tensor, torch.Tensor) and not tensor.is_quantized
        if plain and name not in tensors and "_packed_params" not in name:
            tensors[name] = tensor.detach().contiguous()
    return safetensors.torch.save(tensors)


def torch_runner(model: nn.Module) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    names = tuple(model.input_names)  # type: ignore[arg-type]

    def run(feed: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            out = model(*(torch.from_numpy(feed[name]) for name in names))
        return out.numpy()

    return run


def _tile(array: np.ndarray, rows: int) -> np.ndarray:
    """The first `rows` rows, repeating the array when it has fewer."""
    reps = -(-rows // len(array))
    return np.concatenate([array] * reps)[:rows] if reps > 1 else array[:rows]
