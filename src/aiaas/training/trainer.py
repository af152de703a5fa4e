"""The training loop: AdamW over shuffled mini-batches, resumable to the bit from a checkpoint.

A job worker builds the model, hands the trainer its splits and a `TrainingControl`, and persists
every checkpoint the trainer gives it. After a kill or a pause it builds a fresh model with the
same seed and resumes from the last checkpoint's bytes; the run then ends with the same weights
and history as one that never stopped. That holds because nothing depends on where a run
resumed: epoch e visits the samples in `default_rng([seed, e]).permutation(n)`, torch's RNG
(dropout) is seeded from (seed, e) at the start of each epoch and saved in mid-epoch
checkpoints, and the optimiser state, the epoch's running sums and the early-stopping state all
travel in the checkpoint (see checkpoints.py).

The step loop does what a plain PyTorch loop does and little more: the splits become tensors
once, a batch is an index_select on the epoch's permutation, and the metrics cost one argmax
per step; losses and predictions are kept as tensors and summed once per epoch, so no step
waits on `.item()`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from aiaas.specs.types import Task
from aiaas.training.checkpoints import (
    EarlyStopping,
    EpochMetrics,
    EpochSums,
    Position,
    RunIdentity,
    TrainerState,
    capture_optimizer,
    load_state,
    restore_optimizer,
    save_state,
)
from aiaas.training.loop_state import (
    RunState,
    Tensors,
    batched_logits,
    device_of,
    epoch_order,
    epoch_seed,
    from_numpy,
    input_tensors,
    load_weights,
)

__all__ = [
    "EpochMetrics",
    "Hyperparameters",
    "Outcome",
    "Split",
    "Stop",
    "TrainResult",
    "Trainer",
    "TrainingControl",
    "predict",
]


@dataclass(frozen=True)
class Hyperparameters:
    n_epochs: int
    batch_size: int
    learning_rate: float
    seed: int
    weight_decay: float = 0.0
    # Stop after this many epochs without a lower validation loss, and keep the best weights.
    early_stopping_patience: int | None = None
    max_grad_norm: float | None = 1.0

    def __post_init__(self) -> None:
        if self.n_epochs < 1 or self.batch_size < 1:
            raise ValueError(f"n_epochs {self.n_epochs}, batch_size {self.batch_size}: need >= 1")
        if not self.learning_rate > 0 or self.weight_decay < 0:
            raise ValueError(
                f"learning_rate {self.learning_rate} must be > 0, "
                f"weight_decay {self.weight_decay} >= 0"
            )
        if self.seed < 0:
            raise ValueError(f"seed {self.seed} must be >= 0")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise ValueError(f"early_stopping_patience {self.early_stopping_patience} is not >= 1")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm {self.max_grad_norm} must be > 0")


@dataclass(frozen=True)
class Split:
    inputs: dict[str, np.ndarray]  # by input name; all of the same first dimension n
    targets: np.ndarray  # int64 class indices [n] (classification) or float32 [n] (regression)


Outcome = Literal["completed", "cancelled", "paused"]


class Stop(StrEnum):
    CANCEL = "cancel"
    PAUSE = "pause"


class TrainingControl(Protocol):
    def poll(self) -> Stop | None:
        """Called before every optimiser step, so it must be cheap (read a flag)."""
        ...

    def checkpoint_due(self) -> bool:
        """Whether to write a mid-epoch checkpoint now; asked after every step but an epoch's
        last, which is followed by a checkpoint anyway."""
        ...

    def on_checkpoint(
        self, data: bytes, *, epoch: int, step: int, metrics: EpochMetrics | None
    ) -> None:
        """Persist a checkpoint. At an epoch's end `epoch` is the one finished and `metrics`
        its metrics; mid-epoch (or on pause) `epoch` is the one in progress and metrics None."""
        ...

    def on_epoch(self, metrics: EpochMetrics) -> None: ...


@dataclass(frozen=True)
class TrainResult:
    outcome: Outcome
    history: list[EpochMetrics]  # every epoch, those before a resume included
    steps: int
    best_epoch: int | None  # completed with a validation split: the epoch the weights are from
    stopped_early: bool


class Trainer:
    """Trains `model` (which has `input_names` and returns logits [n, n_outputs]) in place."""

    def __init__(self, model: torch.nn.Module, task: Task, hyper: Hyperparameters) -> None:
        self.model = model
        self.task = task
        self.hyper = hyper
        self._input_names: tuple[str, ...] = tuple(model.input_names)
        self._loss = _classification_loss if task is Task.CLASSIFICATION else _regression_loss
        self._device = device_of(model)

    def run(
        self,
        train: Split,
        valid: Split | None,
        control: TrainingControl,
        *,
        resume: bytes | None = None,
    ) -> TrainResult:
        """Train to the end, or until `control` cancels (no checkpoint) or pauses (a checkpoint
        at the current step). A completed run leaves the best-validation weights in the model
        when early stopping is on, otherwise the last epoch's; the model is left in eval mode.
        Early stopping needs a validation split and is off without one."""
        data = self._tensors(train)
        valid_data = self._tensors(valid) if valid is not None else None
        params = dict(self.model.named_parameters())
        optimizer = torch.optim.AdamW(
            params.values(), lr=self.hyper.learning_rate, weight_decay=self.hyper.weight_decay
        )
        run = RunState(data=data, valid=valid_data, optimizer=optimizer, names=list(params))
        if resume is not None:
            self._restore(run, load_state(resume))
        try:
            for epoch in range(run.epochs_done + 1, self.hyper.n_epochs + 1):
                if run.early_stopping.stopped:
                    break
                stop = self._train_epoch(run, epoch, control)
                if stop is Stop.CANCEL:
                    return self._result(run, "cancelled")
                if stop is Stop.PAUSE:
                    control.on_checkpoint(
                        self._checkpoint(run), epoch=epoch, step=run.step, metrics=None
                    )
                    return self._result(run, "paused")
                self._end_epoch(run, epoch, control)
            if self._keeps_best(run) and run.best_model is not None:
                self.model.load_state_dict(run.best_model)
            return self._result(run, "completed")
        finally:
            self.model.eval()

    def _train_epoch(self, run: RunState, epoch: int, control: TrainingControl) -> Stop | None:
        """Steps from the run's position to the epoch's end; the Stop that interrupted it."""
        hyper, data, model, optimizer = self.hyper, run.data, self.model, run.optimizer
        if run.batch == 0:
            run.start_epoch(epoch_order(hyper.seed, epoch, data.n, self._device))
            torch.manual_seed(epoch_seed(hyper.seed, epoch))
        elif run.order is None:  # resumed mid-epoch: the RNG state came with the checkpoint
            run.order = epoch_order(hyper.seed, epoch, data.n, self._device)
        order, inputs, targets, size = run.order, data.inputs, data.targets, hyper.batch_size
        loss_fn, clip, params = self._loss, hyper.max_grad_norm, list(model.parameters())
        classify = self.task is Task.CLASSIFICATION
        model.train()
        started = time.perf_counter()
        for batch in range(run.batch, data.n_batches):
            stop = control.poll()
            if stop is not None:
                run.seconds += time.perf_counter() - started
                return stop
            index = order[batch * size : (batch + 1) * size]
            logits = model(*[x.index_select(0, index) for x in inputs])
            loss = loss_fn(logits, targets.index_select(0, index))
            optimizer.zero_grad()
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            run.batch_losses.append(loss.detach())
            if classify:
                run.predictions.append(logits.detach().argmax(1))
            run.batch, run.step = batch + 1, run.step + 1
            if run.batch < data.n_batches and control.checkpoint_due():
                run.seconds += time.perf_counter() - started
                checkpoint = self._checkpoint(run)
                control.on_checkpoint(checkpoint, epoch=epoch, step=run.step, metrics=None)
                started = time.perf_counter()
        run.seconds += time.perf_counter() - started
        return None

    def _end_epoch(self, run: RunState, epoch: int, control: TrainingControl) -> None:
        """Validate, record the epoch, update early stopping, then checkpoint."""
        validation_started = time.perf_counter()
        train_loss = run.epoch_loss(self.hyper.batch_size)
        train_accuracy = (
            run.correct_so_far(self.hyper.batch_size) / run.data.n
            if self.task is Task.CLASSIFICATION
            else None
        )
        valid_loss = valid_accuracy = None
        if run.valid is not None:
            valid_loss, valid_accuracy = self._evaluate(run.valid)
        metrics = EpochMetrics(
            epoch=epoch,
            step=run.step,
            train_loss=train_loss,
            train_accuracy=train_accuracy,
            valid_loss=valid_loss,
            valid_accuracy=valid_accuracy,
            samples_per_second=run.data.n / run.seconds if run.seconds > 0 else 0.0,
            seconds=run.seconds + time.perf_counter() - validation_started,
        )
        run.finish_epoch(metrics)
        if valid_loss is not None:
            self._track_best(run, epoch, valid_loss)
        control.on_epoch(metrics)
        control.on_checkpoint(self._checkpoint(run), epoch=epoch, step=run.step, metrics=metrics)

    def _track_best(self, run: RunState, epoch: int, valid_loss: float) -> None:
        best = run.early_stopping
        if not math.isnan(valid_loss) and (best.best_loss is None or valid_loss < best.best_loss):
            best = EarlyStopping(best_loss=valid_loss, best_epoch=epoch)
            if self._keeps_best(run):
                run.best_model = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        else:
            best = replace(best, bad_epochs=best.bad_epochs + 1)
        patience = self.hyper.early_stopping_patience
        if patience is not None and best.bad_epochs >= patience:
            best = replace(best, stopped=True)
        run.early_stopping = best

    def _evaluate(self, data: Tensors) -> tuple[float, float | None]:
        """Mean loss and accuracy (None for regression) over a split, in eval mode."""
        total = torch.zeros((), dtype=torch.float64, device=self._device)
        correct = torch.zeros((), dtype=torch.int64, device=self._device)
        classify = self.task is Task.CLASSIFICATION
        self.model.eval()
        for rows, logits in batched_logits(self.model, data.inputs, self.hyper.batch_size):
            target = data.targets[rows]
            total += self._loss(logits, target, reduction="sum").double()
            if classify:
                correct += (logits.argmax(1) == target).sum()
        accuracy = correct.item() / data.n if classify else None
        return total.item() / data.n, accuracy

    def _checkpoint(self, run: RunState) -> bytes:
        batch_size = self.hyper.batch_size
        rng = {"cpu": torch.get_rng_state()}
        if self._device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self._device)
        losses = torch.stack(run.batch_losses).cpu() if run.batch_losses else torch.zeros(0)
        state = TrainerState(
            run=self._identity(run.data.n),
            position=Position(epochs_done=run.epochs_done, batch=run.batch, step=run.step),
            epoch=EpochSums(
                batch_losses=losses, correct=run.correct_so_far(batch_size), seconds=run.seconds
            ),
            early_stopping=run.early_stopping,
            history=tuple(run.history),
            model=self.model.state_dict(),
            best_model=run.best_model,
            optimizer=capture_optimizer(run.optimizer, run.names),
            rng=rng,
        )
        return save_state(state)

    def _restore(self, run: RunState, state: TrainerState) -> None:
        expected = self._identity(run.data.n)
        if state.run != expected:
            raise ValueError(f"checkpoint is from another run: {state.run}, this one {expected}")
        if state.position.batch >= run.data.n_batches:
            raise ValueError(
                f"checkpoint is at batch {state.position.batch} of {run.data.n_batches}"
            )
        load_weights(self.model, state.model)
        restore_optimizer(run.optimizer, run.names, state.optimizer)
        torch.set_rng_state(state.rng["cpu"])
        if self._device.type == "cuda" and "cuda" in state.rng:
            torch.cuda.set_rng_state(state.rng["cuda"], self._device)
        run.restore(state, self._device)

    def _identity(self, n_train: int) -> RunIdentity:
        hyper = self.hyper
        return RunIdentity(
            seed=hyper.seed, batch_size=hyper.batch_size, n_train=n_train, task=str(self.task)
        )

    def _keeps_best(self, run: RunState) -> bool:
        return run.valid is not None and self.hyper.early_stopping_patience is not None

    def _result(self, run: RunState, outcome: Outcome) -> TrainResult:
        best_epoch = None
        if outcome == "completed" and run.valid is not None:
            restored = self._keeps_best(run) and run.best_model is not None
            best_epoch = run.early_stopping.best_epoch if restored else run.epochs_done
        return TrainResult(
            outcome=outcome,
            history=list(run.history),
            steps=run.step,
            best_epoch=best_epoch,
            stopped_early=run.early_stopping.stopped,
        )

    def _tensors(self, split: Split) -> Tensors:
        inputs = input_tensors(split.inputs, self._input_names, self._device)
        n = inputs[0].shape[0]
        dtype = np.int64 if self.task is Task.CLASSIFICATION else np.float32
        targets = np.asarray(split.targets, dtype=dtype)
        if targets.shape != (n,):
            raise ValueError(f"targets have shape {targets.shape}, expected ({n},)")
        if n == 0:
            raise ValueError("a split has no samples")
        n_batches = -(-n // self.hyper.batch_size)
        return Tensors(inputs, from_numpy(targets).to(self._device), n, n_batches)


def predict(
    model: torch.nn.Module, inputs: dict[str, np.ndarray], *, batch_size: int = 256
) -> np.ndarray:
    """Logits as float32 [n, n_outputs], in eval mode; the model's mode is restored after."""
    tensors = input_tensors(inputs, tuple(model.input_names), device_of(model))
    was_training = model.training
    model.eval()
    try:
        outputs = [logits for _, logits in batched_logits(model, tensors, batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(outputs).float().cpu().numpy()


def _classification_loss(
    logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    return F.cross_entropy(logits, target, reduction=reduction)


def _regression_loss(
    logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    return F.mse_loss(logits.squeeze(-1), target, reduction=reduction)
