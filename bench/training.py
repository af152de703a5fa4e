"""Training-loop overhead: `Trainer.run` against a plain PyTorch loop on the same model.

Both train the same MLP from the same initial weights on one synthetic tabular problem, visit
the batches in the same order (`default_rng([seed, epoch]).permutation(n)`), and do the same
work per step: cross-entropy, AdamW, gradient clipping at norm 1. Two plain loops are timed:

- `plain` keeps the epoch's loss and accuracy with `.item()`, as most hand-written loops do;
- `bare` keeps no metrics at all, the least a loop can do.

Ours additionally polls its control before every step, keeps loss and accuracy, and writes a
safetensors checkpoint (weights and optimiser state) after each epoch. The three runs alternate
for a few rounds; each is timed by the wall clock around the whole call (tensor conversion and
checkpoints included), and the medians are compared. Run it with the project's venv:

    .venv/bin/python bench/training.py
    .venv/bin/python bench/training.py --rounds 7 --threads 1

It also checks that ours and `plain` end with bit-identical weights, i.e. did the same work.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from aiaas.specs.types import Task
from aiaas.training.trainer import EpochMetrics, Hyperparameters, Split, Stop, Trainer
from torch import nn

from cpu import ForeignCpu

# The goal: ours trains at >= 0.95x the samples/s of the plain loop.
GOAL = 0.95
LEARNING_RATE = 1e-3
MAX_GRAD_NORM = 1.0


class Mlp(nn.Module):
    input_names = ("tabular",)

    def __init__(self, n_features: int, hidden: int, n_classes: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(n_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, n_classes),
        )

    def forward(self, tabular: torch.Tensor) -> torch.Tensor:
        return self.layers(tabular)


@dataclass(frozen=True)
class Problem:
    x: np.ndarray  # float32 [n, features]
    y: np.ndarray  # int64 [n]
    hidden: int
    n_classes: int
    batch_size: int
    epochs: int
    seed: int

    def model(self) -> Mlp:
        torch.manual_seed(self.seed)
        return Mlp(self.x.shape[1], self.hidden, self.n_classes)

    @property
    def samples(self) -> int:
        return len(self.x) * self.epochs


@dataclass(frozen=True)
class Timing:
    seconds: float
    foreign_cpu_pct: float | None
    weights: dict[str, torch.Tensor]


class NoopControl:
    def poll(self) -> Stop | None:
        return None

    def checkpoint_due(self) -> bool:
        return False

    def on_checkpoint(
        self, data: bytes, *, epoch: int, step: int, metrics: EpochMetrics | None
    ) -> None:
        pass

    def on_epoch(self, metrics: EpochMetrics) -> None:
        pass


def run_ours(problem: Problem, model: nn.Module) -> None:
    hyper = Hyperparameters(
        n_epochs=problem.epochs,
        batch_size=problem.batch_size,
        learning_rate=LEARNING_RATE,
        seed=problem.seed,
        max_grad_norm=MAX_GRAD_NORM,
    )
    train = Split(inputs={"tabular": problem.x}, targets=problem.y)
    Trainer(model, Task.CLASSIFICATION, hyper).run(train, None, NoopControl())


def run_plain(problem: Problem, model: nn.Module, *, metrics: bool = True) -> None:
    x, y = torch.from_numpy(problem.x), torch.from_numpy(problem.y)
    n, batch_size = len(x), problem.batch_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    history: list[tuple[float, float]] = []  # (loss, accuracy) per epoch
    for epoch in range(1, problem.epochs + 1):
        order = torch.from_numpy(np.random.default_rng([problem.seed, epoch]).permutation(n))
        model.train()
        total_loss, correct = 0.0, 0
        for start in range(0, n, batch_size):
            index = order[start : start + batch_size]
            inputs, targets = x.index_select(0, index), y.index_select(0, index)
            logits = model(inputs)
            loss = F.cross_entropy(logits, targets)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            if metrics:
                total_loss += loss.item() * len(index)
                correct += int((logits.argmax(1) == targets).sum().item())
        if metrics:
            history.append((total_loss / n, correct / n))


def run_bare(problem: Problem, model: nn.Module) -> None:
    run_plain(problem, model, metrics=False)


LOOPS: dict[str, Callable[[Problem, nn.Module], None]] = {
    "ours": run_ours,
    "plain": run_plain,
    "bare": run_bare,
}


def timed(loop: Callable[[Problem, nn.Module], None], problem: Problem) -> Timing:
    model = problem.model()
    with ForeignCpu(os.getpid()) as foreign:
        started = time.perf_counter()
        loop(problem, model)
        seconds = time.perf_counter() - started
    return Timing(seconds, foreign.percent, {k: v.clone() for k, v in model.state_dict().items()})


def make_problem(args: argparse.Namespace) -> Problem:
    """Gaussian features labelled by a random linear teacher: learnable, not trivial."""
    rng = np.random.default_rng(args.seed)
    x = rng.normal(size=(args.samples, args.features)).astype(np.float32)
    teacher = rng.normal(size=(args.features, args.classes))
    y = (x @ teacher + rng.normal(scale=2.0, size=(args.samples, args.classes))).argmax(1)
    return Problem(
        x=x,
        y=y.astype(np.int64),
        hidden=args.hidden,
        n_classes=args.classes,
        batch_size=args.batch_size,
        epochs=args.epochs,
        seed=args.seed,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    torch.set_num_threads(args.threads)
    problem = make_problem(args)
    print(
        f"MLP {args.features}-{args.hidden}-{args.hidden}-{args.classes}, "
        f"{args.samples} samples x {args.epochs} epochs, batch {args.batch_size}, "
        f"{args.threads} torch threads, {args.rounds} rounds, torch {torch.__version__}"
    )
    warm_up = Problem(**{**problem.__dict__, "epochs": 1})
    for loop in LOOPS.values():
        loop(warm_up, warm_up.model())
    samples_per_s: dict[str, list[float]] = {name: [] for name in LOOPS}
    ratios: dict[str, list[float]] = {"plain": [], "bare": []}
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for round_ in range(1, args.rounds + 1):
        # Rotate who goes first, so a slow spell on the machine does not always hit one loop.
        names = list(LOOPS)[round_ % 3 :] + list(LOOPS)[: round_ % 3]
        timings = {name: timed(LOOPS[name], problem) for name in names}
        for name, timing in timings.items():
            samples_per_s[name].append(problem.samples / timing.seconds)
            weights[name] = timing.weights
        for peer in ratios:
            ratios[peer].append(timings[peer].seconds / timings["ours"].seconds)
        print(
            f"round {round_}: "
            + ", ".join(
                f"{name} {problem.samples / t.seconds:,.0f} samples/s"
                + (f" ({t.foreign_cpu_pct:.0f}% CPU elsewhere)" if t.foreign_cpu_pct else "")
                for name, t in timings.items()
            )
        )
    for name, values in samples_per_s.items():
        print(f"{name:>5}: median {statistics.median(values):,.0f} samples/s")
    identical = all(torch.equal(v, weights["plain"][k]) for k, v in weights["ours"].items())
    print(f"ours and plain end with bit-identical weights: {'yes' if identical else 'NO'}")
    for peer, values in ratios.items():
        ratio = statistics.median(values)
        verdict = "meets" if ratio >= GOAL else "misses"
        print(f"ours/{peer}: median {ratio:.3f} (rounds: {', '.join(f'{r:.3f}' for r in values)})")
        print(f"  {verdict} the goal of >= {GOAL}")
    return 0


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Trainer.run vs a plain PyTorch loop.")
    add = parser.add_argument
    add("--samples", type=_positive_int, default=20_000, metavar="N", help="default 20000")
    add("--features", type=_positive_int, default=64, metavar="N", help="default 64")
    add("--classes", type=_positive_int, default=10, metavar="N", help="default 10")
    add("--hidden", type=_positive_int, default=256, metavar="N", help="MLP width (default 256)")
    add("--batch-size", type=_positive_int, default=128, metavar="N", help="default 128")
    add("--epochs", type=_positive_int, default=5, metavar="N", help="per timed run (default 5)")
    add("--rounds", type=_positive_int, default=9, metavar="N", help="alternations (default 9)")
    add("--threads", type=_positive_int, default=2, metavar="N", help="torch threads (default 2)")
    add("--seed", type=int, default=0, metavar="N", help="default 0")
    return parser.parse_args(argv)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


if __name__ == "__main__":
    sys.exit(main())
