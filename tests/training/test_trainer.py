from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from torch import nn

from aiaas.specs.types import Task
from aiaas.training.checkpoints import load_state
from aiaas.training.trainer import (
    EpochMetrics,
    Hyperparameters,
    Split,
    Stop,
    Trainer,
    TrainResult,
    predict,
)

SEED = 7
TIMING = ("samples_per_second", "seconds")


@pytest.fixture(autouse=True)
def one_thread() -> None:
    # Bit-identical comparisons need the same reduction order in every run.
    torch.set_num_threads(1)


class TabularNet(nn.Module):
    input_names = ("tabular",)

    def __init__(self, n_features: int = 4, n_outputs: int = 3, dropout: float = 0.2) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(n_features, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, n_outputs)
        )

    def forward(self, tabular: torch.Tensor) -> torch.Tensor:
        return self.layers(tabular)


class TokenNet(nn.Module):
    input_names = ("tokens", "attention")

    def __init__(self, vocab: int = 20, n_outputs: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 8, padding_idx=0)
        self.dropout = nn.Dropout(0.1)
        self.head = nn.Linear(8, n_outputs)

    def forward(self, tokens: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        mask = attention.unsqueeze(-1).float()
        pooled = (self.dropout(self.embed(tokens)) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.head(pooled)


def tabular_split(n: int, seed: int, *, flip: bool = False) -> Split:
    """Three classes, separable by a fixed linear map; `flip` shifts every label by one."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    weights = np.random.default_rng(0).normal(size=(4, 3))
    y = (x @ weights).argmax(1) + (1 if flip else 0)
    return Split(inputs={"tabular": x}, targets=(y % 3).astype(np.int64))


def token_split(n: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 20, size=(n, 6))
    lengths = rng.integers(1, 7, size=n)
    attention = (np.arange(6)[None, :] < lengths[:, None]).astype(np.int64)
    tokens = tokens * attention
    return Split(
        inputs={"tokens": tokens, "attention": attention},
        targets=(tokens[:, 0] > 10).astype(np.int64),
    )


@dataclass
class Control:
    """Stops at a given poll, asks for mid-epoch checkpoints after given steps, records all."""

    stop_at_poll: int | None = None
    stop: Stop = Stop.PAUSE
    checkpoint_after_polls: frozenset[int] = frozenset()
    polls: int = 0
    checkpoints: list[tuple[bytes, int, int, EpochMetrics | None]] = field(default_factory=list)
    epochs: list[EpochMetrics] = field(default_factory=list)

    def poll(self) -> Stop | None:
        self.polls += 1
        return self.stop if self.polls - 1 == self.stop_at_poll else None

    def checkpoint_due(self) -> bool:
        return self.polls in self.checkpoint_after_polls

    def on_checkpoint(
        self, data: bytes, *, epoch: int, step: int, metrics: EpochMetrics | None
    ) -> None:
        self.checkpoints.append((data, epoch, step, metrics))

    def on_epoch(self, metrics: EpochMetrics) -> None:
        self.epochs.append(metrics)


@dataclass(frozen=True)
class Setup:
    make_model: Callable[[], nn.Module]
    train: Split
    valid: Split | None
    hyper: Hyperparameters

    def fresh(self) -> tuple[nn.Module, Trainer]:
        torch.manual_seed(SEED)
        model = self.make_model()
        task = Task.CLASSIFICATION
        return model, Trainer(model, task, self.hyper)

    def run(
        self, control: Control, resume: bytes | None = None, *, draws: int = 0
    ) -> tuple[nn.Module, TrainResult]:
        """`draws` moves torch's global RNG on after the model is built."""
        model, trainer = self.fresh()
        torch.rand(draws)
        return model, trainer.run(self.train, self.valid, control, resume=resume)


def hyper(**overrides: object) -> Hyperparameters:
    values: dict[str, object] = {
        "n_epochs": 3,
        "batch_size": 16,
        "learning_rate": 0.02,
        "seed": SEED,
        "weight_decay": 0.01,
        "early_stopping_patience": 5,
    }
    values.update(overrides)
    return Hyperparameters(**values)  # type: ignore[arg-type]


SETUPS = {
    # 100 rows in batches of 16: seven batches, the last one short.
    "tabular-dropout": Setup(
        TabularNet, tabular_split(100, 1), tabular_split(40, 2, flip=True), hyper()
    ),
    "tokens": Setup(TokenNet, token_split(100, 3), token_split(30, 4), hyper()),
}


def without_timing(history: list[EpochMetrics]) -> list[dict[str, object]]:
    return [{k: v for k, v in m.as_dict().items() if k not in TIMING} for m in history]


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    a_state, b_state = a.state_dict(), b.state_dict()
    assert a_state.keys() == b_state.keys()
    for name, value in a_state.items():
        assert torch.equal(value, b_state[name]), name


def assert_same_run(
    model: nn.Module, result: TrainResult, ref_model: nn.Module, ref: TrainResult
) -> None:
    assert_same_weights(model, ref_model)
    assert result.outcome == ref.outcome == "completed"
    assert without_timing(result.history) == without_timing(ref.history)
    assert (result.steps, result.best_epoch) == (ref.steps, ref.best_epoch)


@pytest.mark.parametrize(
    ("name", "pause_at"),
    [
        ("tabular-dropout", 10),  # epoch 2, after its third step
        ("tabular-dropout", 7),  # before epoch 2's first step
        ("tabular-dropout", 0),  # before any step
        ("tokens", 10),
    ],
)
def test_paused_run_resumed_into_a_fresh_model_matches_an_uninterrupted_one(
    name: str, pause_at: int
) -> None:
    setup = SETUPS[name]
    ref_model, ref = setup.run(Control())
    assert ref.steps == 21 and len(ref.history) == 3

    paused = Control(stop_at_poll=pause_at)
    _, first = setup.run(paused)
    assert (first.outcome, first.steps, len(first.history)) == ("paused", pause_at, pause_at // 7)
    data, epoch, step, metrics = paused.checkpoints[-1]
    assert (epoch, step, metrics) == (pause_at // 7 + 1, pause_at, None)

    model, result = setup.run(Control(), resume=data, draws=17)
    assert_same_run(model, result, ref_model, ref)


def test_killed_run_resumes_from_its_last_checkpoint_mid_epoch_or_at_an_epoch_end() -> None:
    setup = SETUPS["tabular-dropout"]
    ref_model, ref = setup.run(Control())
    control = Control(checkpoint_after_polls=frozenset({4, 12}))
    model, result = setup.run(control, draws=17)
    # Neither mid-epoch checkpoints nor the global RNG's state before the run change it.
    assert_same_run(model, result, ref_model, ref)
    positions = [(epoch, step, m is not None) for _, epoch, step, m in control.checkpoints]
    assert positions == [(1, 4, False), (1, 7, True), (2, 12, False), (2, 14, True), (3, 21, True)]
    assert control.epochs == [m for *_, m in control.checkpoints if m is not None]

    # A kill loses everything after the checkpoint; the job is queued again and resumes.
    for data, *_ in (control.checkpoints[2], control.checkpoints[1]):
        model, result = setup.run(Control(), resume=data, draws=17)
        assert_same_run(model, result, ref_model, ref)


def test_cancel_stops_before_the_polled_step_without_a_checkpoint() -> None:
    control = Control(stop_at_poll=9, stop=Stop.CANCEL)
    _, result = SETUPS["tabular-dropout"].run(control)
    assert (result.outcome, result.steps, result.best_epoch) == ("cancelled", 9, None)
    assert control.polls == 10
    assert [(epoch, step) for _, epoch, step, _ in control.checkpoints] == [(1, 7)]
    assert len(result.history) == 1


def test_early_stopping_stops_after_patience_and_keeps_the_best_weights() -> None:
    # Validation labels are shifted, so learning the training set makes validation worse.
    setup = Setup(
        lambda: TabularNet(dropout=0.0),
        tabular_split(100, 1),
        tabular_split(40, 2, flip=True),
        hyper(n_epochs=30, early_stopping_patience=2),
    )
    control = Control()
    model, result = setup.run(control)
    assert result.outcome == "completed" and result.stopped_early
    losses = [m.valid_loss for m in result.history]
    best = result.best_epoch
    assert best is not None and losses[best - 1] == min(losses)
    assert len(result.history) == best + 2 < 30
    best_checkpoint = next(data for data, *_, m in control.checkpoints if m and m.epoch == best)
    best_weights = load_state(best_checkpoint).model
    for name, value in model.state_dict().items():
        assert torch.equal(value, best_weights[name]), name

    # Resuming from the last checkpoint trains no further and restores the same weights.
    resumed_model, resumed = setup.run(Control(), resume=control.checkpoints[-1][0])
    assert_same_run(resumed_model, resumed, model, result)


def test_checkpoint_is_safetensors_with_the_optimiser_state(tmp_path: Path) -> None:
    control = Control(stop_at_poll=3)
    SETUPS["tabular-dropout"].run(control)
    path = tmp_path / "checkpoint.safetensors"
    path.write_bytes(control.checkpoints[-1][0])
    with safetensors.safe_open(path, "pt") as f:
        keys = set(f.keys())
        metadata = f.metadata()
        step = f.get_tensor("optimizer/layers.0.weight/step")
    assert {"model/layers.0.weight", "rng/cpu", "epoch/losses"} <= keys
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert f"optimizer/layers.3.bias/{key}" in keys
    assert step.item() == 3
    assert (metadata["format"], metadata["version"]) == ("aiaas-trainer-state", "1")
    assert json.loads(metadata["position"]) == {"epochs_done": 0, "batch": 3, "step": 3}
    assert json.loads(metadata["param_groups"])[0]["params"][0] == "layers.0.weight"


def rewritten(data: bytes, tmp_path: Path, edit: Callable[[dict, dict], None]) -> bytes:
    path = tmp_path / "in.safetensors"
    path.write_bytes(data)
    with safetensors.safe_open(path, "pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
        metadata = dict(f.metadata())
    edit(tensors, metadata)
    return safetensors.torch.save(tensors, metadata=metadata)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t, m: m.update(version="2"), "version '2' is not supported"),
        (lambda t, m: m.pop("format"), "not an aiaas-trainer-state checkpoint"),
        (lambda t, m: m.pop("history"), "lacks 'history'"),
        (lambda t, m: m.update(position="{"), "metadata is malformed"),
        (lambda t, m: m.update(position='{"epochs_done": 0, "batch": "3", "step": 3}'), "position"),
        (lambda t, m: t.pop("optimizer/layers.0.weight/exp_avg"), "lacks optimiser exp_avg"),
        (lambda t, m: t.pop("rng/cpu"), "RNG state"),
        (lambda t, m: t.update({"epoch/losses": torch.zeros(1)}), "batch losses"),
        (
            lambda t, m: t.update({"optimizer/layers.0.weight/exp_avg_sq": torch.zeros(2)}),
            "has shape",
        ),
    ],
)
def test_damaged_checkpoint_raises_value_error(
    tmp_path: Path, edit: Callable[[dict, dict], None], message: str
) -> None:
    control = Control(stop_at_poll=3)
    SETUPS["tabular-dropout"].run(control)
    with pytest.raises(ValueError, match=message):
        load_state(rewritten(control.checkpoints[-1][0], tmp_path, edit))


def test_foreign_or_corrupted_bytes_raise_value_error() -> None:
    control = Control(stop_at_poll=3)
    setup = SETUPS["tabular-dropout"]
    setup.run(control)
    data = control.checkpoints[-1][0]
    foreign = safetensors.torch.save(TabularNet().state_dict())
    for bad in (b"", b"garbage", data[:100], data[: len(data) // 2], foreign):
        with pytest.raises(ValueError, match=r"safetensors|checkpoint"):
            load_state(bad)
    with pytest.raises(ValueError, match="do not fit this model"):
        Trainer(TabularNet(n_outputs=4), Task.CLASSIFICATION, setup.hyper).run(
            setup.train, setup.valid, Control(), resume=data
        )
    other_seed = Trainer(TabularNet(), Task.CLASSIFICATION, hyper(seed=8))
    with pytest.raises(ValueError, match="another run"):
        other_seed.run(setup.train, setup.valid, Control(), resume=data)


def test_separable_problem_reaches_high_train_accuracy() -> None:
    setup = Setup(
        lambda: TabularNet(dropout=0.0),
        tabular_split(300, 5),
        tabular_split(60, 6),
        hyper(n_epochs=15, early_stopping_patience=None),
    )
    model, result = setup.run(Control())
    last = result.history[-1]
    assert last.train_accuracy is not None and last.train_accuracy > 0.9
    assert last.valid_accuracy is not None and last.valid_accuracy > 0.85
    assert result.best_epoch == 15 and not result.stopped_early
    assert last.samples_per_second > 0 and last.seconds > 0
    logits = predict(model, setup.valid.inputs, batch_size=7)
    assert logits.dtype == np.float32 and logits.shape == (60, 3)
    assert (logits.argmax(1) == setup.valid.targets).mean() == last.valid_accuracy
    assert predict(model, {"tabular": np.zeros((0, 4), np.float32)}).shape == (0, 3)


def test_regression_loss_decreases() -> None:
    rng = np.random.default_rng(9)
    x = rng.normal(size=(200, 4)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5, 0.0]) + 0.3).astype(np.float32)
    train = Split(inputs={"tabular": x}, targets=y)
    torch.manual_seed(SEED)
    model = TabularNet(n_outputs=1, dropout=0.0)
    control = Control()
    result = Trainer(model, Task.REGRESSION, hyper(n_epochs=5)).run(train, None, control)
    losses = [m.train_loss for m in result.history]
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.2 * losses[0]
    assert all(m.train_accuracy is None and m.valid_loss is None for m in result.history)
    assert result.best_epoch is None
    model.train()
    assert predict(model, {"tabular": x[:5]}).shape == (5, 1)
    assert model.training  # predict restores the mode it found


def test_epoch_metrics_as_dict_round_trips() -> None:
    metrics = EpochMetrics(1, 7, 0.5, 0.75, None, None, 1000.0, 0.1)
    assert EpochMetrics(**metrics.as_dict()) == metrics
    assert metrics.as_dict() == asdict(metrics)


def test_bad_inputs_and_hyperparameters_raise_value_error() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        hyper(batch_size=0)
    trainer = Trainer(TabularNet(), Task.CLASSIFICATION, hyper())
    with pytest.raises(ValueError, match="missing"):
        trainer.run(Split({"tokens": np.zeros((4, 2))}, np.zeros(4)), None, Control())
    with pytest.raises(ValueError, match="targets have shape"):
        trainer.run(Split({"tabular": np.zeros((4, 4))}, np.zeros(3)), None, Control())
