"""A trainer's resumable state and its encoding as one safetensors file.

A worker that is killed or paused resumes from the last checkpoint into a fresh model, and must
reach the same weights as a run that never stopped. So a checkpoint holds everything the next
step depends on: weights, AdamW's moments and step counts, torch's RNG state (dropout), where in
which epoch we are, the epoch's running sums, the history so far and the early-stopping state.

Layout (tensor names; JSON under metadata keys):

    model/<name>               the model's state_dict
    best/<name>                best-validation weights (early stopping only)
    optimizer/<param>/<key>    AdamW state per named parameter: exp_avg, exp_avg_sq, step
    rng/cpu, rng/cuda          torch.get_rng_state() (uint8); cuda only for a model on a GPU
    epoch/losses               float32 loss of each batch done in the epoch in progress

    format, version            "aiaas-trainer-state", "1"
    run                        seed, batch_size, n_train, task: resuming into another run fails
    position                   epochs_done, batch (done in epoch epochs_done + 1), step (global)
    epoch                      running sums of the epoch in progress: correct, seconds
    early_stopping             best_loss, best_epoch, bad_epochs, stopped
    history                    one EpochMetrics.as_dict() per finished epoch
    param_groups               AdamW's param_groups, parameters by name

`load_state` checks the format, the version, that every key is there and that the shapes agree
with each other, and raises ValueError naming what is wrong; the trainer then checks that the
weights fit its model.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import safetensors
import safetensors.torch
import torch

__all__ = [
    "FORMAT",
    "VERSION",
    "EarlyStopping",
    "EpochMetrics",
    "EpochSums",
    "OptimizerState",
    "Position",
    "RunIdentity",
    "TrainerState",
    "capture_optimizer",
    "load_state",
    "restore_optimizer",
    "save_state",
]

FORMAT = "aiaas-trainer-state"
VERSION = 1

_MODEL = "model/"
_BEST = "best/"
_OPTIMIZER = "optimizer/"
_RNG = "rng/"
_EPOCH_LOSSES = "epoch/losses"
_METADATA_KEYS = ("run", "position", "epoch", "early_stopping", "history", "param_groups")
# A safetensors file starts with the header's length (u64 little-endian), then the header JSON.
_HEADER_LENGTH = struct.Struct("<Q")


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int  # 1-based
    step: int  # optimiser steps done so far (global)
    train_loss: float  # mean over the epoch's samples
    train_accuracy: float | None  # None for regression
    valid_loss: float | None  # None without a validation split
    valid_accuracy: float | None
    samples_per_second: float  # training samples / seconds of the epoch's steps, no validation
    seconds: float  # the whole epoch, validation included

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


@dataclass(frozen=True)
class RunIdentity:
    """What must not change between a run and its resumption, or the result would differ."""

    seed: int
    batch_size: int
    n_train: int
    task: str


@dataclass(frozen=True)
class Position:
    epochs_done: int
    batch: int  # batches done in epoch epochs_done + 1
    step: int  # optimiser steps done, all epochs


@dataclass(frozen=True)
class EpochSums:
    """Running sums of the epoch in progress; empty at an epoch boundary."""

    batch_losses: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # float32
    correct: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class EarlyStopping:
    best_loss: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0  # epochs since the best one
    stopped: bool = False


@dataclass(frozen=True)
class OptimizerState:
    """torch's optimiser state_dict with parameters named rather than numbered."""

    param_groups: list[dict[str, Any]]  # JSON values; "params" lists names
    state: dict[str, dict[str, torch.Tensor]]  # parameter name -> exp_avg, exp_avg_sq, step


@dataclass(frozen=True)
class TrainerState:
    run: RunIdentity
    position: Position
    epoch: EpochSums
    early_stopping: EarlyStopping
    history: tuple[EpochMetrics, ...]
    model: dict[str, torch.Tensor]
    best_model: dict[str, torch.Tensor] | None
    optimizer: OptimizerState
    rng: dict[str, torch.Tensor]  # "cpu", and "cuda" for a model on a GPU


def capture_optimizer(optimizer: torch.optim.Optimizer, names: list[str]) -> OptimizerState:
    """`names[i]` names the i-th parameter in the optimiser's param_groups, in order."""
    torch_state = optimizer.state_dict()
    groups = []
    for group in torch_state["param_groups"]:
        groups.append({**group, "params": [names[i] for i in group["params"]]})
    state = {
        names[i]: {key: value for key, value in entries.items() if torch.is_tensor(value)}
        for i, entries in torch_state["state"].items()
    }
    return OptimizerState(param_groups=groups, state=state)


def restore_optimizer(
    optimizer: torch.optim.Optimizer, names: list[str], saved: OptimizerState
) -> None:
    index = {name: i for i, name in enumerate(names)}
    unknown = {p for group in saved.param_groups for p in group["params"]} - index.keys()
    if unknown or len(saved.param_groups) != len(optimizer.param_groups):
        raise ValueError(
            f"checkpoint optimiser does not fit this model: {len(saved.param_groups)} param "
            f"groups (model: {len(optimizer.param_groups)}), unknown parameters {sorted(unknown)}"
        )
    groups = [{**g, "params": [index[p] for p in g["params"]]} for g in saved.param_groups]
    state = {index[name]: dict(entries) for name, entries in saved.state.items()}
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ValueError(f"checkpoint optimiser does not fit this model: {exc}") from exc


def save_state(state: TrainerState) -> bytes:
    tensors: dict[str, torch.Tensor] = {}
    # Cloned so tied weights (one storage under two names) serialise, and made contiguous
    # and CPU-resident as safetensors requires.
    for name, value in state.model.items():
        tensors[_MODEL + name] = _portable(value)
    for name, value in (state.best_model or {}).items():
        tensors[_BEST + name] = _portable(value)
    for param, entries in state.optimizer.state.items():
        for key, value in entries.items():
            tensors[f"{_OPTIMIZER}{param}/{key}"] = _portable(value)
    for device, value in state.rng.items():
        tensors[_RNG + device] = _portable(value)
    if state.position.batch > 0:
        tensors[_EPOCH_LOSSES] = _portable(state.epoch.batch_losses)
    metadata = {
        "format": FORMAT,
        "version": str(VERSION),
        "run": json.dumps(asdict(state.run)),
        "position": json.dumps(asdict(state.position)),
        "epoch": json.dumps({"correct": state.epoch.correct, "seconds": state.epoch.seconds}),
        "early_stopping": json.dumps(asdict(state.early_stopping)),
        "history": json.dumps([m.as_dict() for m in state.history]),
        "param_groups": json.dumps(state.optimizer.param_groups),
    }
    return safetensors.torch.save(tensors, metadata=metadata)


def load_state(data: bytes) -> TrainerState:
    """Decode and check a checkpoint; ValueError says what is wrong with a bad or foreign one."""
    metadata = _read_metadata(data)
    try:
        tensors = safetensors.torch.load(data)
    except safetensors.SafetensorError as exc:
        raise ValueError(f"not a readable safetensors file: {exc}") from exc
    try:
        parsed = {key: json.loads(metadata[key]) for key in _METADATA_KEYS}
        state = TrainerState(
            run=RunIdentity(**parsed["run"]),
            position=Position(**parsed["position"]),
            epoch=EpochSums(
                batch_losses=tensors.get(_EPOCH_LOSSES, torch.zeros(0)),
                correct=int(parsed["epoch"]["correct"]),
                seconds=float(parsed["epoch"]["seconds"]),
            ),
            early_stopping=EarlyStopping(**parsed["early_stopping"]),
            history=tuple(EpochMetrics(**m) for m in parsed["history"]),
            model=_prefixed(tensors, _MODEL),
            best_model=_prefixed(tensors, _BEST) or None,
            optimizer=OptimizerState(
                param_groups=list(parsed["param_groups"]), state=_optimizer_tensors(tensors)
            ),
            rng=_prefixed(tensors, _RNG),
        )
    except KeyError as exc:
        raise ValueError(f"checkpoint lacks {exc}") from exc
    except (TypeError, AttributeError, json.JSONDecodeError) as exc:
        raise ValueError(f"checkpoint metadata is malformed: {exc}") from exc
    _check(state)
    return state


def _read_metadata(data: bytes) -> dict[str, str]:
    if len(data) < _HEADER_LENGTH.size:
        raise ValueError(f"not a safetensors file: {len(data)} bytes")
    (length,) = _HEADER_LENGTH.unpack_from(data)
    if length > len(data) - _HEADER_LENGTH.size:
        raise ValueError(f"not a safetensors file: header of {length} bytes in {len(data)}")
    try:
        header = json.loads(data[_HEADER_LENGTH.size : _HEADER_LENGTH.size + length])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not a safetensors file: {exc}") from exc
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ValueError(f"not an {FORMAT} checkpoint (no format={FORMAT!r} in its metadata)")
    if metadata.get("version") != str(VERSION):
        raise ValueError(
            f"checkpoint format version {metadata.get('version')!r} is not supported "
            f"(this build reads version {VERSION})"
        )
    return metadata


def _check(state: TrainerState) -> None:
    """Consistency within the file; whether it fits a given model is the trainer's check."""
    if not state.model:
        raise ValueError("checkpoint holds no model weights")
    shapes = {name: value.shape for name, value in state.model.items()}
    if state.best_model is not None:
        best = {name: value.shape for name, value in state.best_model.items()}
        if best != shapes:
            raise ValueError("checkpoint's best weights do not match its model weights")
    for param, entries in state.optimizer.state.items():
        if param not in shapes:
            raise ValueError(f"checkpoint has optimiser state for unknown parameter {param!r}")
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in entries:
                raise ValueError(f"checkpoint lacks optimiser {key} for {param!r}")
            if entries[key].shape != shapes[param]:
                raise ValueError(
                    f"checkpoint optimiser {key} for {param!r} has shape "
                    f"{tuple(entries[key].shape)}, the parameter {tuple(shapes[param])}"
                )
    cpu_rng = state.rng.get("cpu")
    if cpu_rng is None or cpu_rng.dtype != torch.uint8 or cpu_rng.dim() != 1:
        raise ValueError("checkpoint lacks a uint8 CPU RNG state (rng/cpu)")
    position, stopping = state.position, state.early_stopping
    counts = (position.epochs_done, position.batch, position.step, stopping.bad_epochs)
    if not all(type(count) is int and count >= 0 for count in counts):
        raise ValueError(f"checkpoint position is malformed: {position}, {stopping}")
    if not isinstance(stopping.best_loss, float | int | None):
        raise ValueError(f"checkpoint early-stopping state is malformed: {stopping}")
    losses = state.epoch.batch_losses
    if losses.dim() != 1 or losses.shape[0] != position.batch:
        raise ValueError(
            f"checkpoint has {tuple(losses.shape)} batch losses for {position.batch} batches done"
        )
    if len(state.history) != position.epochs_done:
        raise ValueError(
            f"checkpoint has {len(state.history)} epochs of history for "
            f"{position.epochs_done} epochs done"
        )


def _portable(value: torch.Tensor) -> torch.Tensor:
    return value.detach().to("cpu", copy=True).contiguous()


def _prefixed(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {name[len(prefix) :]: t for name, t in tensors.items() if name.startswith(prefix)}


def _optimizer_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in _prefixed(tensors, _OPTIMIZER).items():
        param, _, key = name.rpartition("/")
        state.setdefault(param, {})[key] = value
    return state
