"""LoRA fine-tuning of a GGUF chat model with peft, resumable to the bit, exported as a llama.cpp
GGUF LoRA adapter.

- The base weights come from the GGUF file itself: transformers' GGUF loader dequantises them
  (and undoes llama.cpp's rotary permutation of q/k) into a float32 `LlamaForCausalLM`; the
  tokenizer and chat template come from the GGUF's metadata. That conversion takes tens of
  seconds, so its result is kept in a cache folder keyed by the file's SHA-256 (float32
  safetensors plus the tokenizer files: the same tensors, loaded in a second).
- A conversation is rendered with the model's own chat template and tokenized once; the loss
  counts the tokens of trained assistant messages only (their content and end-of-turn marker).
- The loop is a plain torch loop over peft's LoRA layers. As in `trainer.py`, nothing depends on
  where a run resumed: epoch e visits the examples in `epoch_order(seed, e)`, torch's RNG
  (dropout) is seeded from (seed, e) at each epoch's start and saved in mid-epoch checkpoints,
  and the adapter weights, AdamW's state and the epoch's running sums travel in the checkpoint
  (`checkpoints.py`'s format, with the adapter as the model).
- `export_gguf_adapter` writes what llama.cpp's `convert_lora_to_gguf.py` writes: general.type
  "adapter", adapter.type "lora", adapter.lora.alpha, and `<gguf tensor>.lora_a` / `.lora_b`
  pairs (float32), with lora_b of q and k permuted as llama.cpp permutes those weights.

torch, transformers, peft and gguf are imported inside the functions that use them.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from aiaas.specs.lora import LoraHyperparameters
from aiaas.training.chat_data import ChatExample

if TYPE_CHECKING:
    import torch

    from aiaas.training.checkpoints import EpochMetrics
    from aiaas.training.trainer import Stop

__all__ = [
    "ChatBase",
    "EncodedChat",
    "LoraResult",
    "LoraTrainer",
    "StepMetrics",
    "encode_chat",
    "encode_chats",
    "export_gguf_adapter",
    "file_sha256",
    "load_base",
]

IGNORE = -100  # label of a token the loss does not count
_CACHE_FORMAT = "1"  # bump when the cached conversion changes


# -- the base model ------------------------------------------------------------------------------


@dataclass
class ChatBase:
    """A GGUF chat model as torch modules: the float32 model, its tokenizer, where it came from."""

    model: Any  # transformers' LlamaForCausalLM
    tokenizer: Any  # a fast tokenizer with the GGUF's chat template
    gguf_path: Path
    gguf_sha256: str
    architecture: str  # the GGUF's general.architecture ("llama")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def load_base(gguf_path: Path, cache_dir: Path | None = None) -> ChatBase:
    """Load the GGUF's weights and tokenizer for torch (float32, eval mode, frozen), through the
    cache folder when one is given (filled on first use)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    # Its progress bars would interleave plain text with a worker's JSON log lines.
    transformers_logging.disable_progress_bar()
    sha256 = file_sha256(gguf_path)
    architecture = _gguf_architecture(gguf_path)
    cached = cache_dir / f"{gguf_path.stem}-{sha256[:16]}" if cache_dir is not None else None
    if cached is not None and _complete(cached):
        tokenizer = AutoTokenizer.from_pretrained(cached, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            cached, dtype=torch.float32, local_files_only=True
        )
    else:
        folder, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32, local_files_only=True
        )
        # The weights are dequantised now: what remains is a plain float32 model.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        if cached is not None:
            _save_cache(model, tokenizer, cached)
    if not tokenizer.chat_template:
        raise ValueError(f"{gguf_path.name} has no chat template (tokenizer.chat_template)")
    model.eval()
    model.requires_grad_(False)
    return ChatBase(model, tokenizer, gguf_path, sha256, architecture)


def _complete(folder: Path) -> bool:
    marker = folder / "complete"
    return marker.exists() and marker.read_text().strip() == _CACHE_FORMAT


def _gguf_architecture(path: Path) -> str:
    """general.architecture. It is the first key llama.cpp's writers put in the header, so it is
    read from there; parsing the whole metadata (the vocabulary) takes seconds."""
    import gguf

    with path.open("rb") as handle:
        head = handle.read(1 << 16)
    marker = b"general.architecture"
    at = head.find(marker)
    if head.startswith(b"GGUF") and at >= 0:
        # the key, then its value's type (u32: STRING), the string's length (u64) and bytes
        at += len(marker)
        kind = int.from_bytes(head[at : at + 4], "little")
        length = int.from_bytes(head[at + 4 : at + 12], "little")
        if kind == gguf.GGUFValueType.STRING and 0 < length < 64:
            return head[at + 12 : at + 12 + length].decode()
    field = gguf.GGUFReader(path).get_field("general.architecture")
    if field is None:
        raise ValueError(f"{path.name} is not a GGUF file with a general.architecture")
    return str(field.contents())


def _save_cache(model: Any, tokenizer: Any, target: Path) -> None:
    """Write the conversion beside its final place, then rename it there (first one wins)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        (partial / "complete").write_text(_CACHE_FORMAT)
        with contextlib.suppress(OSError):  # another worker got there first
            os.replace(partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


# -- conversations as tokens ---------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedChat:
    line: int
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]  # the token where the loss counts it, else IGNORE
    truncated: bool

    @property
    def targets(self) -> int:
        return sum(label != IGNORE for label in self.labels[1:])


def encode_chat(tokenizer: Any, example: ChatExample, max_length: int) -> EncodedChat:
    """Render the conversation with the model's chat template and tokenize it; only the tokens
    of trained assistant messages (content and end-of-turn) are labels."""
    messages = [{"role": m.role, "content": m.content} for m in example.messages]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans: list[tuple[int, int]] = []
    for index, message in enumerate(example.messages):
        if not message.trained:
            continue
        upto = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if not text.startswith(upto):
            raise ValueError(
                f"line {example.line}: the chat template renders message {index} differently "
                "at the end of a conversation than within it"
            )
        content = message.content.strip()
        start = upto.rfind(content) if content else len(upto.rstrip())
        if start < 0:
            raise ValueError(
                f"line {example.line}: the chat template does not render message {index} verbatim"
            )
        spans.append((start, len(upto)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(encoded["input_ids"])
    labels = [
        token if any(lo <= begin < hi for lo, hi in spans) else IGNORE
        for token, (begin, _end) in zip(ids, encoded["offset_mapping"], strict=True)
    ]
    truncated = len(ids) > max_length
    return EncodedChat(
        line=example.line,
        input_ids=tuple(ids[:max_length]),
        labels=tuple(labels[:max_length]),
        truncated=truncated,
    )


def encode_chats(
    tokenizer: Any, examples: Sequence[ChatExample], max_length: int
) -> list[EncodedChat]:
    return [encode_chat(tokenizer, example, max_length) for example in examples]


# -- the loop ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepMetrics:
    epoch: int
    step: int  # global, 1-based
    train_loss: float  # mean over the batch's target tokens
    train_mean_token_accuracy: float
    tokens: int  # tokens in the batch (prompt and answer, no padding)
    seconds: float  # the step's time


class LoraControl(Protocol):
    """`trainer.TrainingControl`, plus a report after every optimiser step."""

    def poll(self) -> Stop | None: ...

    def checkpoint_due(self) -> bool: ...

    def on_checkpoint(
        self, data: bytes, *, epoch: int, step: int, metrics: EpochMetrics | None
    ) -> None: ...

    def on_epoch(self, metrics: EpochMetrics) -> None: ...

    def on_step(self, metrics: StepMetrics) -> None: ...


@dataclass(frozen=True)
class LoraResult:
    outcome: Literal["completed", "cancelled", "paused"]
    history: list[EpochMetrics]  # every epoch, those before a resume included
    steps: int
    trained_tokens: int  # tokens of the training file times the epochs done


@dataclass
class _Run:
    """Where a run stands (mutated by the loop, captured by checkpoints)."""

    optimizer: Any
    names: list[str]
    epochs_done: int = 0
    batch: int = 0  # batches done in epoch epochs_done + 1
    step: int = 0
    history: list[EpochMetrics] | None = None
    batch_losses: list[float] | None = None  # mean target-token loss of each batch this epoch
    correct: int = 0  # target tokens predicted right this epoch
    seconds: float = 0.0


class LoraTrainer:
    """peft LoRA layers on `base.model`; `run` trains them in place."""

    def __init__(self, base: ChatBase, hyper: LoraHyperparameters, seed: int) -> None:
        import torch
        from peft import LoraConfig, get_peft_model

        self.base = base
        self.hyper = hyper
        self.seed = seed
        torch.manual_seed(seed)  # the adapters' initial weights
        config = LoraConfig(
            r=hyper.lora_rank,
            lora_alpha=hyper.lora_alpha,
            lora_dropout=hyper.lora_dropout,
            target_modules=list(hyper.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        self.model = get_peft_model(base.model, config)
        self._causal = self.model.get_base_model()
        self._pad = int(base.tokenizer.pad_token_id or 0)

    # -- what the run trained

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The trainable (LoRA) weights by peft's parameter names."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    # -- the run

    def run(
        self,
        train: Sequence[EncodedChat],
        valid: Sequence[EncodedChat] | None,
        control: LoraControl,
        *,
        resume: bytes | None = None,
    ) -> LoraResult:
        """Train to the end, or until `control` cancels (no checkpoint) or pauses (a checkpoint
        at the current step). The model is left in eval mode."""
        import torch

        from aiaas.training.checkpoints import load_state
        from aiaas.training.trainer import Stop

        params = self.adapter_state()
        optimizer = torch.optim.AdamW(
            params.values(), lr=self.hyper.learning_rate, weight_decay=self.hyper.weight_decay
        )
        run = _Run(optimizer=optimizer, names=list(params), history=[], batch_losses=[])
        if resume is not None:
            self._restore(run, load_state(resume), len(train))
        tokens_per_epoch = sum(len(e.input_ids) for e in train)
        try:
            for epoch in range(run.epochs_done + 1, self.hyper.n_epochs + 1):
                stop = self._train_epoch(run, epoch, train, control)
                if stop is Stop.CANCEL:
                    return self._result(run, "cancelled", tokens_per_epoch)
                if stop is Stop.PAUSE:
                    control.on_checkpoint(
                        self._checkpoint(run, len(train)), epoch=epoch, step=run.step, metrics=None
                    )
                    return self._result(run, "paused", tokens_per_epoch)
                self._end_epoch(run, epoch, train, valid, control)
            return self._result(run, "completed", tokens_per_epoch)
        finally:
            self.model.eval()

    def _train_epoch(
        self, run: _Run, epoch: int, train: Sequence[EncodedChat], control: LoraControl
    ) -> Stop | None:
        import torch

        from aiaas.training.loop_state import epoch_seed

        size = self.hyper.batch_size
        order = self._order(epoch, len(train))
        if run.batch == 0:
            run.batch_losses, run.correct, run.seconds = [], 0, 0.0
            torch.manual_seed(epoch_seed(self.seed, epoch))
        # else: resumed mid-epoch, the RNG state came with the checkpoint
        n_batches = math.ceil(len(train) / size)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.model.train()
        for batch in range(run.batch, n_batches):
            stop = control.poll()
            if stop is not None:
                return stop
            started = time.perf_counter()
            chats = [train[i] for i in order[batch * size : (batch + 1) * size]]
            loss, correct, _count = self._loss(chats)
            run.optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            run.optimizer.step()
            value = float(loss.detach())
            assert run.batch_losses is not None
            run.batch_losses.append(value)
            run.correct += correct
            run.batch, run.step = batch + 1, run.step + 1
            seconds = time.perf_counter() - started
            run.seconds += seconds
            targets = sum(c.targets for c in chats)
            control.on_step(
                StepMetrics(
                    epoch=epoch,
                    step=run.step,
                    train_loss=value,
                    train_mean_token_accuracy=correct / targets if targets else 0.0,
                    tokens=sum(len(c.input_ids) for c in chats),
                    seconds=seconds,
                )
            )
            if run.batch < n_batches and control.checkpoint_due():
                control.on_checkpoint(
                    self._checkpoint(run, len(train)), epoch=epoch, step=run.step, metrics=None
                )
        return None

    def _loss(self, chats: Sequence[EncodedChat]) -> tuple[torch.Tensor, int, int]:
        """Mean cross-entropy over the batch's target tokens, the correct and total targets."""
        import torch
        import torch.nn.functional as F

        width = max(len(c.input_ids) for c in chats)
        ids = torch.full((len(chats), width), self._pad, dtype=torch.long)
        labels = torch.full((len(chats), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(chats), width), dtype=torch.long)
        for row, chat in enumerate(chats):
            n = len(chat.input_ids)
            ids[row, :n] = torch.tensor(chat.input_ids)
            labels[row, :n] = torch.tensor(chat.labels)
            mask[row, :n] = 1
        hidden = self._causal.model(input_ids=ids, attention_mask=mask, use_cache=False)
        states = hidden.last_hidden_state[:, :-1]
        targets = labels[:, 1:]
        where = targets != IGNORE
        count = int(where.sum())
        if count == 0:  # nothing to learn in this batch: a zero loss that still has a graph
            return states.sum() * 0.0, 0, 0
        # The output layer only where a target is predicted: most positions are the prompt's.
        logits = self._causal.lm_head(states[where])
        chosen = targets[where]
        loss = F.cross_entropy(logits.float(), chosen)
        correct = int((logits.detach().argmax(-1) == chosen).sum())
        return loss, correct, count

    def _end_epoch(
        self,
        run: _Run,
        epoch: int,
        train: Sequence[EncodedChat],
        valid: Sequence[EncodedChat] | None,
        control: LoraControl,
    ) -> None:
        from aiaas.training.checkpoints import EpochMetrics

        started = time.perf_counter()
        size = self.hyper.batch_size
        order = self._order(epoch, len(train))
        assert run.batch_losses is not None and run.history is not None
        weights = [
            sum(train[i].targets for i in order[b * size : (b + 1) * size])
            for b in range(len(run.batch_losses))
        ]
        total = sum(weights)
        train_loss = sum(w * loss for w, loss in zip(weights, run.batch_losses, strict=True))
        valid_loss = valid_accuracy = None
        if valid:
            valid_loss, valid_accuracy = self.evaluate(valid)
        tokens = sum(len(e.input_ids) for e in train)
        metrics = EpochMetrics(
            epoch=epoch,
            step=run.step,
            train_loss=train_loss / total if total else 0.0,
            train_accuracy=run.correct / total if total else 0.0,
            valid_loss=valid_loss,
            valid_accuracy=valid_accuracy,
            # tokens (prompt and answer) per second of training steps: a LoRA job's throughput
            samples_per_second=tokens / run.seconds if run.seconds > 0 else 0.0,
            seconds=run.seconds + time.perf_counter() - started,
        )
        run.history.append(metrics)
        run.epochs_done, run.batch = epoch, 0
        run.batch_losses, run.correct, run.seconds = [], 0, 0.0
        control.on_epoch(metrics)
        control.on_checkpoint(
            self._checkpoint(run, len(train)), epoch=epoch, step=run.step, metrics=metrics
        )

    def evaluate(self, chats: Sequence[EncodedChat]) -> tuple[float, float]:
        """Mean loss and token accuracy over the target tokens of `chats`, in eval mode."""
        import torch

        self.model.eval()
        loss_sum, correct, count = 0.0, 0, 0
        with torch.no_grad():
            for start in range(0, len(chats), self.hyper.batch_size):
                loss, right, n = self._loss(chats[start : start + self.hyper.batch_size])
                loss_sum += float(loss) * n
                correct += right
                count += n
        self.model.train()
        return (loss_sum / count, correct / count) if count else (0.0, 0.0)

    def _order(self, epoch: int, n: int) -> list[int]:
        import torch

        from aiaas.training.loop_state import epoch_order

        return epoch_order(self.seed, epoch, n, torch.device("cpu")).tolist()

    # -- checkpoints

    def _identity(self, n_train: int) -> Any:
        from aiaas.training.checkpoints import RunIdentity

        return RunIdentity(
            seed=self.seed, batch_size=self.hyper.batch_size, n_train=n_train, task="lora"
        )

    def _checkpoint(self, run: _Run, n_train: int) -> bytes:
        import torch

        from aiaas.training.checkpoints import (
            EarlyStopping,
            EpochSums,
            Position,
            TrainerState,
            capture_optimizer,
            save_state,
        )

        assert run.history is not None and run.batch_losses is not None
        state = TrainerState(
            run=self._identity(n_train),
            position=Position(epochs_done=run.epochs_done, batch=run.batch, step=run.step),
            epoch=EpochSums(
                batch_losses=torch.tensor(run.batch_losses, dtype=torch.float64),
                correct=run.correct,
                seconds=run.seconds,
            ),
            early_stopping=EarlyStopping(),
            history=tuple(run.history),
            model={name: p.detach() for name, p in self.adapter_state().items()},
            best_model=None,
            optimizer=capture_optimizer(run.optimizer, run.names),
            rng={"cpu": torch.get_rng_state()},
        )
        return save_state(state)

    def _restore(self, run: _Run, state: Any, n_train: int) -> None:
        import torch

        from aiaas.training.checkpoints import TrainerState, restore_optimizer

        assert isinstance(state, TrainerState)
        expected = self._identity(n_train)
        if state.run != expected:
            raise ValueError(f"checkpoint is from another run: {state.run}, this one {expected}")
        params = self.adapter_state()
        found = {name: tuple(t.shape) for name, t in state.model.items()}
        if found != {name: tuple(p.shape) for name, p in params.items()}:
            raise ValueError("checkpoint adapter weights do not fit this model's LoRA layers")
        with torch.no_grad():
            for name, value in state.model.items():
                params[name].copy_(value)
        restore_optimizer(run.optimizer, run.names, state.optimizer)
        torch.set_rng_state(state.rng["cpu"])
        position = state.position
        run.epochs_done, run.batch, run.step = position.epochs_done, position.batch, position.step
        run.history = list(state.history)
        run.batch_losses = [float(x) for x in state.epoch.batch_losses.tolist()]
        run.correct, run.seconds = state.epoch.correct, state.epoch.seconds

    def _result(
        self, run: _Run, outcome: Literal["completed", "cancelled", "paused"], per_epoch: int
    ) -> LoraResult:
        assert run.history is not None
        return LoraResult(outcome, list(run.history), run.step, per_epoch * run.epochs_done)


# -- export --------------------------------------------------------------------------------------


def export_gguf_adapter(trainer: LoraTrainer) -> bytes:
    """The trained adapter in llama.cpp's GGUF LoRA format (float32 tensors)."""
    import gguf
    import numpy as np

    config = trainer.base.model.config
    arch = trainer.base.architecture
    arch_enum = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), None)
    if arch_enum is None:
        raise ValueError(f"gguf does not know the architecture {arch!r}")
    names = gguf.get_tensor_name_map(arch_enum, config.num_hidden_layers)
    pairs: dict[str, dict[str, Any]] = {}
    for name, value in trainer.adapter_state().items():
        # base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight
        module, _, rest = name.removeprefix("base_model.model.").partition(".lora_")
        side = rest.split(".", 1)[0]  # "A" or "B"
        pairs.setdefault(module, {})[side] = value.detach().float().cpu().numpy()
    writer_path = Path(tempfile.mkstemp(suffix=".gguf")[1])
    try:
        writer = gguf.GGUFWriter(writer_path, arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(trainer.hyper.lora_alpha))
        for module in sorted(pairs, key=_layer_order):
            a, b = pairs[module]["A"], pairs[module]["B"]
            target = names.get_name(module)
            if target is None:
                raise ValueError(f"no GGUF tensor name for {module}")
            if module.endswith("self_attn.q_proj"):
                b = _permute(b, config.num_attention_heads, config.num_attention_heads)
            elif module.endswith("self_attn.k_proj"):
                b = _permute(b, config.num_attention_heads, config.num_key_value_heads)
            writer.add_tensor(f"{target}.weight.lora_a", np.ascontiguousarray(a, np.float32))
            writer.add_tensor(f"{target}.weight.lora_b", np.ascontiguousarray(b, np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return writer_path.read_bytes()
    finally:
        writer_path.unlink(missing_ok=True)


def _layer_order(module: str) -> tuple[int, str]:
    parts = module.split(".")
    layer = next((int(p) for p in parts if p.isdigit()), -1)
    return layer, module


def _permute(weights: Any, n_head: int, n_head_kv: int) -> Any:
    """llama.cpp's permutation of q/k rows (rotary halves interleaved), applied to lora_b's rows:
    the transpose of what transformers' GGUF loader undid for the base weights."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    rows = weights.shape[0]
    return (
        weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )
