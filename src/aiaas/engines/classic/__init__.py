"""The classic engine: models trained here, exported to ONNX at registration, served by ONNX
Runtime.

`model` opens one registered version (graph, preprocessing spec, description), turns records or
tensors into its inputs and logits into predictions; `pool` loads versions on first use, batches
concurrent requests per model (`aiaas.scheduling.batcher.DynamicBatcher`, shared with the
embeddings engine) and unloads the least recently used ones when memory runs out. `imported`
serves an organisation's own ONNX graph by its declared signature, through the same pool.
"""

from aiaas.engines.classic.imported import ImportedModel
from aiaas.engines.classic.model import MAX_RECORDS, ClassicModel, Prediction, TensorSpec
from aiaas.engines.classic.pool import ClassicPool, LoadedClassic, PoolEntry

__all__ = [
    "MAX_RECORDS",
    "ClassicModel",
    "ClassicPool",
    "ImportedModel",
    "LoadedClassic",
    "PoolEntry",
    "Prediction",
    "TensorSpec",
]
