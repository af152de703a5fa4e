"""The trainer's state between steps, and the tensors it steps over.

`RunState` is where a run stands (position, history, the epoch's running sums, early stopping);
the step loop mutates it and checkpoints capture it. The helpers turn numpy splits into tensors
once and derive each epoch's order and seed from (seed, epoch) alone, so nothing depends on where
a run was resumed.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from aiaas.training.checkpoints import EarlyStopping, EpochMetrics, TrainerState

__all__ = [
    "RunState",
    "Tensors",
    "batched_logits",
    "device_of",
    "epoch_order",
    "epoch_seed",
    "from_numpy",
    "input_tensors",
    "load_weights",
    "model_dtype",
]


@dataclass(frozen=True)
class Tensors:
    inputs: tuple[torch.Tensor, ...]  # in the model's input_names order
    targets: torch.Tensor
    n: int
    n_batches: int


@dataclass(slots=True)
class RunState:
    """Where a run stands; mutated by the step loop, captured by checkpoints."""

    data: Tensors
    valid: Tensors | None
    optimizer: torch.optim.Optimizer
    names: list[str]  # the optimiser's parameters, in order
    epochs_done: int = 0
    batch: int = 0  # batches done in epoch epochs_done + 1
    step: int = 0
    history: list[EpochMetrics] = field(default_factory=list)
    early_stopping: EarlyStopping = field(default_factory=EarlyStopping)
    best_model: dict[str, torch.Tensor] | None = None
    # The epoch in progress: its sample order, each batch's mean loss, the predictions of the
    # batches from `predicted_from` on, and the correct count of those before.
    order: torch.Tensor | None = None
    batch_losses: list[torch.Tensor] = field(default_factory=list)
    predictions: list[torch.Tensor] = field(default_factory=list)
    predicted_from: int = 0
    correct: int = 0
    seconds: float = 0.0

    def start_epoch(self, order: torch.Tensor | None) -> None:
        self.order = order
        self.batch_losses, self.predictions = [], []
        self.predicted_from = self.correct = 0
        self.seconds = 0.0

    def finish_epoch(self, metrics: EpochMetrics) -> None:
        self.history.append(metrics)
        self.epochs_done, self.batch = metrics.epoch, 0
        self.start_epoch(None)

    def correct_so_far(self, batch_size: int) -> int:
        """Fold the predictions kept so far into the correct count."""
        if self.predictions and self.order is not None:
            done = self.order[self.predicted_from * batch_size : self.batch * batch_size]
            predicted = torch.cat(self.predictions)
            self.correct += int((predicted == self.data.targets[done]).sum().item())
            self.predictions, self.predicted_from = [], self.batch
        return self.correct

    def epoch_loss(self, batch_size: int) -> float:
        losses = torch.stack(self.batch_losses).double()
        sizes = torch.full_like(losses, batch_size)
        sizes[-1] = self.data.n - batch_size * (len(self.batch_losses) - 1)
        return (losses * sizes).sum().item() / self.data.n

    def restore(self, state: TrainerState, device: torch.device) -> None:
        position = state.position
        self.epochs_done, self.batch = position.epochs_done, position.batch
        self.step = position.step
        self.history = list(state.history)
        self.early_stopping = state.early_stopping
        self.best_model = state.best_model
        self.batch_losses = [loss.to(device) for loss in state.epoch.batch_losses.unbind()]
        self.predicted_from, self.correct = position.batch, state.epoch.correct
        self.seconds = state.epoch.seconds


def epoch_order(seed: int, epoch: int, n: int, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(n)).to(device)


def epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0])


def batched_logits(
    model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], batch_size: int
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Logits batch by batch without autograd; the caller sets the model's mode."""
    n = inputs[0].shape[0]
    with torch.no_grad():
        # No rows still get one (empty) batch, so predict returns [0, n_outputs].
        for start in range(0, max(n, 1), batch_size):
            rows = slice(start, start + batch_size)
            yield rows, model(*[x[rows] for x in inputs])


def input_tensors(
    inputs: Mapping[str, np.ndarray], names: tuple[str, ...], device: torch.device
) -> tuple[torch.Tensor, ...]:
    missing = [name for name in names if name not in inputs]
    if missing or not names:
        raise ValueError(f"the model takes inputs {list(names)}; missing {missing}")
    arrays = [np.asarray(inputs[name]) for name in names]
    lengths = {name: len(array) for name, array in zip(names, arrays, strict=True)}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"inputs differ in their number of rows: {lengths}")
    # Whole splits move to the model's device once; a batch is then an index_select there.
    return tuple(from_numpy(model_dtype(array)).to(device) for array in arrays)


def model_dtype(array: np.ndarray) -> np.ndarray:
    if np.issubdtype(array.dtype, np.floating):
        return np.asarray(array, dtype=np.float32)
    return np.asarray(array, dtype=np.int64)


def from_numpy(array: np.ndarray) -> torch.Tensor:
    # Shares the array's memory without a copy. Read-only arrays (memory maps, Arrow buffers)
    # make torch warn that writes would be undefined; the trainer never writes to its inputs.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(array))


def device_of(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    expected = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    found = {name: tuple(value.shape) for name, value in weights.items()}
    if found != expected:
        missing = sorted(expected.keys() - found.keys())
        unexpected = sorted(found.keys() - expected.keys())
        reshaped = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
        raise ValueError(
            f"checkpoint weights do not fit this model: missing {missing}, "
            f"unexpected {unexpected}, different shapes {reshaped}"
        )
    model.load_state_dict(weights)
