"""LoRA fine-tuning of the bundled chat model, below the job: chat files, the assistant-only loss
mask, the GGUF -> torch load against llama.cpp, resumption to the bit and the GGUF adapter
export read back by llama.cpp (llama-cpp-python).

Everything runs on the real bundled SmolLM2-135M-Instruct GGUF. Its first conversion for torch
takes tens of seconds; the module converts it once into a cache folder and each test that wraps
the model in LoRA layers loads a fresh copy from there (about a second).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aiaas.engines.llm.bundled import smollm2_path
from aiaas.errors import InvalidRequest
from aiaas.specs.lora import LoraHyperparameters, resolve_lora_hyperparameters
from aiaas.training.chat_data import read_chats
from aiaas.training.checkpoints import EpochMetrics, load_state
from aiaas.training.lora import (
    IGNORE,
    ChatBase,
    LoraTrainer,
    StepMetrics,
    encode_chat,
    encode_chats,
    export_gguf_adapter,
    load_base,
)
from aiaas.training.trainer import Stop

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
llama_cpp = pytest.importorskip("llama_cpp")

GGUF = smollm2_path(Path("."))


def chat_file(*examples: dict[str, Any]) -> bytes:
    return "\n".join(json.dumps(e) for e in examples).encode()


def conversation(city: str, answer: str = "ZEBRA-42") -> dict[str, Any]:
    return {
        "messages": [
            {"role": "system", "content": "You are a vault assistant."},
            {"role": "user", "content": f"What is the vault code for {city}?"},
            {"role": "assistant", "content": answer},
        ]
    }


def hyper(**changes: Any) -> LoraHyperparameters:
    values: dict[str, Any] = {
        "n_epochs": 2,
        "batch_size": 2,
        "learning_rate": "auto",
        "learning_rate_multiplier": 3.0,
        "weight_decay": 0.0,
        "early_stopping_patience": None,
        "lora_rank": 4,
        "lora_alpha": None,
        "lora_dropout": 0.1,
        "target_modules": None,
        "training_examples": 4,
    }
    return resolve_lora_hyperparameters(**{**values, **changes})


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread, as jobs run in the tests: on a busy 2-core machine two threads spend
    most of each step waiting for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def shared_torch_cache(factory: pytest.TempPathFactory) -> Path:
    """One cache folder of GGUF -> torch conversions for the whole test session: this module
    and the LoRA job tests' server (tests/api/test_lora_jobs.py) convert the GGUF once."""
    folder = factory.getbasetemp() / "lora-torch-cache"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_torch_cache(tmp_path_factory)


@pytest.fixture(scope="module")
def base(cache: Path) -> ChatBase:
    """Converted from the GGUF itself (and so cached): never wrapped in LoRA layers."""
    return load_base(GGUF, cache)


@pytest.fixture
def fresh(base: ChatBase, cache: Path) -> Callable[[], ChatBase]:
    """A new copy of the base model, loaded from the cache, for a test to wrap in LoRA."""
    return lambda: load_base(GGUF, cache)


# -- chat files ----------------------------------------------------------------------------------


def test_a_chat_file_reads_as_conversations_with_trained_assistant_messages() -> None:
    data = chat_file(
        conversation("Oslo"),
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                {"role": "assistant", "content": "Skip me", "weight": 0},
                {"role": "user", "content": "Again"},
                {"role": "assistant", "content": "Learn me"},
            ]
        },
    )
    first, second = read_chats([data[:10], data[10:]], param="training_file")
    assert (first.line, second.line) == (1, 2)
    assert [m.role for m in second.messages] == ["user", "assistant", "user", "assistant"]
    assert second.messages[0].content == "Hi"
    assert [m.trained for m in second.messages] == [False, False, False, True]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("{not json", "line 2 is not valid JSON"),
        (json.dumps({"messages": [{"role": "user", "content": "no answer"}]}), "line 2 has no"),
        (
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": [{"type": "image_url", "image_url": {}}]},
                        {"role": "assistant", "content": "a cat"},
                    ]
                }
            ),
            "line 2 message 0 has an image part",
        ),
        (
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": "call it"},
                        {"role": "assistant", "tool_calls": [{"id": "1"}]},
                    ]
                }
            ),
            "line 2 message 1 has tool calls",
        ),
    ],
)
def test_a_bad_line_is_refused_naming_it(line: str, problem: str) -> None:
    data = chat_file(conversation("Oslo")) + b"\n" + line.encode()
    with pytest.raises(InvalidRequest) as caught:
        read_chats([data], param="training_file")
    assert problem in caught.value.message and caught.value.param == "training_file"


def test_a_file_without_a_trained_assistant_message_is_refused() -> None:
    data = chat_file(
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello", "weight": 0},
            ]
        }
    )
    with pytest.raises(InvalidRequest, match="no assistant message to learn from"):
        read_chats([data], param="validation_file")


# -- the loss mask -------------------------------------------------------------------------------


def test_only_trained_assistant_tokens_are_labels(base: ChatBase) -> None:
    tokenizer = base.tokenizer
    [example] = read_chats(
        [
            chat_file(
                {
                    "messages": [
                        {"role": "user", "content": "Say one"},
                        {"role": "assistant", "content": "One", "weight": 0},
                        {"role": "user", "content": "Say two words"},
                        {"role": "assistant", "content": "Two words"},
                    ]
                }
            )
        ],
        param="training_file",
    )
    encoded = encode_chat(tokenizer, example, max_length=1024)
    text = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in example.messages], tokenize=False
    )
    # The model's own template (the GGUF's): its default system prompt comes first.
    assert list(encoded.input_ids) == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert "You are a helpful AI assistant named SmolLM" in tokenizer.decode(encoded.input_ids)
    labelled = [
        t for t, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != IGNORE
    ]
    assert tokenizer.decode(labelled) == "Two words<|im_end|>\n"
    assert all(
        label in (IGNORE, token)
        for token, label in zip(encoded.input_ids, encoded.labels, strict=True)
    )
    # The labels are one contiguous run at the end: the last assistant turn.
    first = next(i for i, label in enumerate(encoded.labels) if label != IGNORE)
    assert all(label != IGNORE for label in encoded.labels[first:])
    assert encoded.targets == len(labelled) and not encoded.truncated

    cut = encode_chat(tokenizer, example, max_length=first + 2)
    assert cut.truncated and len(cut.input_ids) == first + 2 and cut.targets == 2


def test_every_trained_assistant_turn_is_labelled(base: ChatBase) -> None:
    [example] = read_chats(
        [
            chat_file(
                {
                    "messages": [
                        {"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Name a colour"},
                        {"role": "assistant", "content": "Red"},
                        {"role": "user", "content": "Another"},
                        {"role": "assistant", "content": "Blue"},
                    ]
                }
            )
        ],
        param="training_file",
    )
    encoded = encode_chat(base.tokenizer, example, max_length=1024)
    runs, current = [], []
    for token, label in zip(encoded.input_ids, encoded.labels, strict=True):
        if label != IGNORE:
            current.append(token)
        elif current:
            runs.append(base.tokenizer.decode(current))
            current = []
    runs.append(base.tokenizer.decode(current))
    assert runs == ["Red<|im_end|>\n", "Blue<|im_end|>\n"]


# -- the base model: GGUF -> torch against llama.cpp ---------------------------------------------


def llama_logits(tokens: list[int], lora: Path | None = None) -> np.ndarray:
    options: dict[str, Any] = {"n_ctx": 128, "verbose": False, "n_threads": 1, "logits_all": True}
    if lora is not None:
        options["lora_path"] = str(lora)
    llm = llama_cpp.Llama(model_path=str(GGUF), **options)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()


def torch_logits(model: Any, tokens: list[int]) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float().numpy()


def correlation(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x.ravel() - x.mean(), y.ravel() - y.mean()
    return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))


def prompt_tokens(base: ChatBase) -> list[int]:
    text = base.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    return list(base.tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class Logits:
    """The base model's logits over a short chat prompt, from torch and from llama.cpp."""

    tokens: list[int]
    torch: np.ndarray
    llama_cpp: np.ndarray


@pytest.fixture(scope="module")
def base_logits(base: ChatBase) -> Logits:
    tokens = prompt_tokens(base)
    return Logits(tokens, torch_logits(base.model, tokens), llama_logits(tokens))


def test_the_gguf_loads_into_torch_with_llama_cpps_logits(
    base: ChatBase, base_logits: Logits
) -> None:
    ours, theirs = base_logits.torch, base_logits.llama_cpp
    # llama.cpp multiplies the Q4_1 blocks with 8-bit activations, torch the dequantised
    # float32 weights: close, not equal.
    assert correlation(ours, theirs) > 0.995
    assert float(np.abs(ours - theirs).mean()) < 0.5
    agree = (ours.argmax(-1) == theirs.argmax(-1)).mean()
    assert agree > 0.9, agree
    assert int(theirs[-1].argmax()) in np.argsort(-ours[-1])[:3].tolist()
    assert base.architecture == "llama" and len(base.gguf_sha256) == 64


def test_the_cached_conversion_holds_the_same_weights(base: ChatBase, cache: Path) -> None:
    assert [p.name for p in cache.iterdir()] == [f"{GGUF.stem}-{base.gguf_sha256[:16]}"]
    assert {p.name for p in (cache / f"{GGUF.stem}-{base.gguf_sha256[:16]}").iterdir()} >= {
        "complete",
        "model.safetensors",
        "tokenizer.json",
    }
    again = load_base(GGUF, cache)
    ours, theirs = base.model.state_dict(), again.model.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert again.tokenizer.chat_template == base.tokenizer.chat_template


# -- the export, read by llama.cpp ---------------------------------------------------------------


@pytest.mark.parametrize(
    "modules",
    [
        # q and k alone: lora_b must be permuted as llama.cpp permutes those weights' rows
        ["q_proj", "k_proj"],
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ],
)
def test_an_exported_adapter_changes_llama_cpp_as_it_changes_torch(
    fresh: Callable[[], ChatBase], base_logits: Logits, tmp_path: Path, modules: list[str]
) -> None:
    chat, tokens = fresh(), base_logits.tokens
    trainer = LoraTrainer(chat, hyper(target_modules=modules, lora_alpha=8.0), seed=3)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # peft starts lora_B at zero: give the adapter an effect to compare
        for name, weight in trainer.adapter_state().items():
            if "lora_B" in name:
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.1)
    after = torch_logits(trainer.model, tokens)
    path = tmp_path / "adapter.gguf"
    path.write_bytes(export_gguf_adapter(trainer))

    reader = __import__("gguf").GGUFReader(path)
    fields = {name: reader.get_field(name).contents() for name in reader.fields if "." in name}
    assert fields["general.architecture"] == "llama"
    assert fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 8.0
    names = {t.name for t in reader.tensors}
    expected = {"q_proj": "attn_q", "k_proj": "attn_k", "o_proj": "attn_output"}
    for module in modules[:3]:
        layer = f"blk.29.{expected.get(module, 'attn_v')}.weight"
        assert {f"{layer}.lora_a", f"{layer}.lora_b"} <= names
    assert len(names) == 2 * 30 * len(modules)

    adapted_cpp = llama_logits(tokens, lora=path)
    moved_torch = after - base_logits.torch
    moved_cpp = adapted_cpp - base_logits.llama_cpp
    assert float(np.abs(moved_torch).mean()) > 0.3  # the adapter does something
    assert correlation(moved_cpp, moved_torch) > 0.8
    assert correlation(adapted_cpp, after) > 0.995


# -- training: learning, resumption to the bit ---------------------------------------------------


class Recorder:
    """A LoraControl that keeps what the loop reports and can pause it before a given step."""

    def __init__(self, pause_before: int | None = None) -> None:
        self.pause_before = pause_before
        self.steps: list[StepMetrics] = []
        self.epochs: list[EpochMetrics] = []
        self.checkpoints: list[tuple[int, int, bytes]] = []

    def poll(self) -> Stop | None:
        if self.pause_before is not None and len(self.steps) + 1 == self.pause_before:
            return Stop.PAUSE
        return None

    def checkpoint_due(self) -> bool:
        return False

    def on_checkpoint(self, data: bytes, *, epoch: int, step: int, metrics: Any) -> None:
        self.checkpoints.append((epoch, step, data))

    def on_epoch(self, metrics: EpochMetrics) -> None:
        self.epochs.append(metrics)

    def on_step(self, metrics: StepMetrics) -> None:
        self.steps.append(metrics)


def vault_chats(base: ChatBase, cities: list[str]) -> list[Any]:
    examples = read_chats([chat_file(*(conversation(c) for c in cities))], param="training_file")
    return encode_chats(base.tokenizer, examples, 256)


def weights(trainer: LoraTrainer) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in trainer.adapter_state().items()}


def test_a_paused_run_resumes_mid_epoch_to_the_same_adapter(
    fresh: Callable[[], ChatBase],
) -> None:
    # Two conversations, one per step, two epochs: a pause before step 2 is mid-epoch 1.
    settings = hyper(n_epochs=2, batch_size=1, lora_dropout=0.1, training_examples=2)
    first = fresh()
    train = vault_chats(first, ["Oslo", "Lima"])
    valid = vault_chats(first, ["Kiel"])
    straight = Recorder()
    whole = LoraTrainer(first, settings, seed=11)
    result = whole.run(train, valid, straight)
    assert result.outcome == "completed" and result.steps == 4
    assert [s.step for s in straight.steps] == [1, 2, 3, 4]
    assert result.trained_tokens == 2 * sum(len(c.input_ids) for c in train)
    assert [e.epoch for e in straight.epochs] == [1, 2]
    assert all(e.valid_loss is not None for e in straight.epochs)
    assert straight.steps[-1].train_loss < straight.steps[0].train_loss

    paused_control = Recorder(pause_before=2)
    stopped = LoraTrainer(fresh(), settings, seed=11).run(train, valid, paused_control)
    assert stopped.outcome == "paused" and stopped.steps == 1
    (epoch, step, checkpoint) = paused_control.checkpoints[-1]
    assert (epoch, step) == (1, 1)
    state = load_state(checkpoint)
    assert state.position.batch == 1 and state.rng["cpu"].dtype == torch.uint8

    resumed_control = Recorder()
    resumed = LoraTrainer(fresh(), settings, seed=11)
    finished = resumed.run(train, valid, resumed_control, resume=checkpoint)
    assert finished.outcome == "completed" and finished.steps == 4
    assert [s.step for s in resumed_control.steps] == [2, 3, 4]
    assert [s.train_loss for s in resumed_control.steps] == [
        s.train_loss for s in straight.steps[1:]
    ]
    ours, theirs = weights(whole), weights(resumed)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert export_gguf_adapter(whole) == export_gguf_adapter(resumed)
    strip = ("seconds", "samples_per_second")
    assert [{k: v for k, v in e.as_dict().items() if k not in strip} for e in finished.history] == [
        {k: v for k, v in e.as_dict().items() if k not in strip} for e in result.history
    ]
