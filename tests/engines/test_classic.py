"""The classic engine, on real small models: fitted specs, torch networks exported to ONNX as a
training job registers them, then served from records or tensors and through the pool."""

from __future__ import annotations

import asyncio
import io
import math
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer

from aiaas.engines.classic import ClassicModel, ClassicPool, Prediction, TensorSpec
from aiaas.engines.embeddings.export import minilm_l6_v2_dir
from aiaas.errors import InvalidRequest, ServiceUnavailable
from aiaas.scheduling.batcher import BatcherConfig
from aiaas.specs.preprocessing import (
    LabelSpec,
    PreprocessingSpec,
    TextStep,
    fit,
    propose_spec,
    transform,
)
from aiaas.specs.shapes import (
    MINILM,
    TOKENIZER_REF,
    ArchitectureOptions,
    input_shape,
    model_inputs,
)
from aiaas.specs.types import ColumnType, Task
from aiaas.training.architectures import Network, build_model
from aiaas.training.export import example_inputs, export_onnx

DEADLINE_S = 30.0
SMALL = ArchitectureOptions(hidden_sizes=[16], embedding_dim=16, hidden_size=8, channels=[4, 8])
COLUMNS = [
    ("age", ColumnType.INTEGER),
    ("income", ColumnType.FLOAT),
    ("color", ColumnType.CATEGORICAL),
    ("member", ColumnType.BOOLEAN),
    ("review", ColumnType.TEXT),
    ("photo", ColumnType.IMAGE),
    ("species", ColumnType.CATEGORICAL),
    ("price", ColumnType.FLOAT),
]
TABULAR = ["age", "income", "color", "member"]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def png(color: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def training_frame(n: int = 24) -> pd.DataFrame:
    """As a dataset version reads back: typed columns, NaN where a value is missing."""
    rng = np.random.default_rng(3)
    words = ["good", "bad", "slow", "fast", "cheap", "broken", "great"]
    return pd.DataFrame(
        {
            "age": pd.array([None if i % 5 == 0 else 20 + 3 * i for i in range(n)], "Int64"),
            "income": rng.normal(50.0, 12.0, n),
            "color": [["red", "green", "blue", None][i % 4] for i in range(n)],
            "member": [i % 3 == 0 for i in range(n)],
            "review": [" ".join(rng.choice(words, 1 + i % 6)) for i in range(n)],
            "photo": [png((10 * i, 255 - 9 * i, (40 * i) % 256), (5 + i % 4, 6)) for i in range(n)],
            "species": [["cat", "dog", "eel"][i % 3] for i in range(n)],
            "price": rng.normal(300.0, 80.0, n),
        }
    )


def json_records(frame: pd.DataFrame, columns: list[str]) -> list[dict[str, Any]]:
    """The same rows as a JSON body would bring them: plain Python values, None where missing."""

    def plain(value: Any) -> Any:
        if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
            return None
        return value.item() if isinstance(value, np.generic) else value

    return [{c: plain(row[c]) for c in columns} for row in frame.to_dict("records")]


@dataclass
class Registered:
    """A model version as `_register` in the training job stores it."""

    spec: PreprocessingSpec
    network: Network
    onnx: bytes
    description: dict[str, Any]
    columns: list[str]
    tokenizers: dict[str, Tokenizer] = field(default_factory=dict)

    def load(self) -> ClassicModel:
        return ClassicModel.load(
            onnx=self.onnx, description=self.description, preprocessing=self.spec, threads=1
        )

    def torch_logits(self, frame: pd.DataFrame) -> np.ndarray:
        shape = input_shape(self.spec)
        features = transform(self.spec, frame, tokenizers=self.tokenizers)
        arrays = model_inputs(features, shape, self.network.input_names)
        self.network.eval()
        with torch.no_grad():
            tensors = (torch.from_numpy(arrays[name]) for name in self.network.input_names)
            return self.network(*tensors).numpy()


def register(architecture: str, features: list[str], label: str, task: Task) -> Registered:
    frame = training_frame()
    columns = [(name, kind) for name, kind in COLUMNS if name in (*features, label)]
    spec = propose_spec(columns, label=label, task=task)
    steps = [
        step.model_copy(update={"max_length": 8}) if isinstance(step, TextStep) else step
        for step in spec.features
    ]
    assert spec.label is not None
    spec = spec.model_copy(
        update={
            "features": steps,
            "label": spec.label.model_copy(update={"standardize": task is Task.REGRESSION}),
        }
    )
    return registered(architecture, fit(spec, frame), features)


def registered(
    architecture: str,
    spec: PreprocessingSpec,
    features: list[str],
    options: ArchitectureOptions = SMALL,
    pretrained_dir: Path | None = None,
) -> Registered:
    assert spec.label is not None
    shape = input_shape(spec)
    torch.manual_seed(0)
    network = build_model(architecture, shape, options, pretrained_dir=pretrained_dir)
    description = {
        "format": 1,
        "architecture": architecture,
        "options": options.model_dump(mode="json"),
        "task": spec.label.task.value,
        "target_column": spec.label.column,
        "input_names": list(network.input_names),
        "output_name": "logits",
        "classes": spec.label.classes,
        "input_shape": {
            "tabular_dim": shape.tabular_dim,
            "text_column": shape.text_column,
            "text_vocab_size": shape.text_vocab_size,
            "text_length": shape.text_length,
            "text_tokenizer": shape.text_tokenizer,
            "image_shape": list(shape.image_shape) if shape.image_shape else None,
            "n_outputs": shape.n_outputs,
        },
    }
    return Registered(spec, network, export_onnx(network, shape), description, features)


@pytest.fixture(scope="module")
def mlp_classifier() -> Registered:
    return register("mlp", TABULAR, "species", Task.CLASSIFICATION)


@pytest.fixture(scope="module")
def mlp_regressor() -> Registered:
    return register("mlp", TABULAR, "price", Task.REGRESSION)


@pytest.fixture(scope="module")
def lstm_classifier() -> Registered:
    return register("lstm", ["income", "review"], "species", Task.CLASSIFICATION)


@pytest.fixture(scope="module")
def cnn_classifier() -> Registered:
    return register("cnn", ["photo"], "species", Task.CLASSIFICATION)


def softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


# -- records to predictions --------------------------------------------------------------------


@pytest.mark.parametrize(
    "fixture", ["mlp_classifier", "mlp_regressor", "lstm_classifier", "cnn_classifier"]
)
def test_json_records_give_the_logits_torch_gives_on_the_training_frame(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    registered: Registered = request.getfixturevalue(fixture)
    model = registered.load()
    frame = training_frame()
    inputs = model.encode_records(json_records(frame, registered.columns))
    model.check_inputs(inputs)
    logits = model.run(inputs)
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, registered.torch_logits(frame), atol=1e-4)


@pytest.mark.parametrize("fixture", ["mlp_classifier", "lstm_classifier", "cnn_classifier"])
def test_classification_gives_softmax_probabilities_by_class_and_their_argmax(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    registered: Registered = request.getfixturevalue(fixture)
    model = registered.load()
    frame = training_frame()
    predictions = model.interpret(
        model.run(model.encode_records(json_records(frame, registered.columns)))
    )
    want = softmax(registered.torch_logits(frame).astype(np.float64))
    assert model.classes == ["cat", "dog", "eel"]
    assert len(predictions) == len(frame)
    for prediction, row in zip(predictions, want, strict=True):
        assert prediction.value is None and prediction.probabilities is not None
        assert list(prediction.probabilities) == model.classes
        assert math.isclose(sum(prediction.probabilities.values()), 1.0, abs_tol=1e-9)
        assert prediction.label == max(prediction.probabilities, key=prediction.probabilities.get)
        np.testing.assert_allclose(list(prediction.probabilities.values()), row, atol=1e-5)


def test_regression_values_are_in_the_label_units(mlp_regressor: Registered) -> None:
    model = mlp_regressor.load()
    label = mlp_regressor.spec.label
    assert label is not None and label.std is not None and label.mean is not None
    assert label.standardize and label.std > 10  # so forgetting to unscale would show
    frame = training_frame()
    predictions = model.interpret(model.run(model.encode_records(json_records(frame, TABULAR))))
    want = mlp_regressor.torch_logits(frame)[:, 0] * label.std + label.mean
    assert all(p.label is None and p.probabilities is None for p in predictions)
    np.testing.assert_allclose([p.value for p in predictions], want, rtol=1e-5, atol=1e-3)


@pytest.mark.slow
def test_minilm_reads_text_with_its_wordpiece_tokenizer() -> None:
    frame = training_frame(8)
    text = TextStep(
        column="review", tokenizer="wordpiece", tokenizer_ref=TOKENIZER_REF, max_length=8
    )
    spec = PreprocessingSpec(
        features=[text], label=LabelSpec(column="species", task=Task.CLASSIFICATION)
    )
    minilm = registered(
        MINILM,
        fit(spec, frame),
        ["review"],
        options=ArchitectureOptions(hidden_sizes=[16]),
        pretrained_dir=minilm_l6_v2_dir(),
    )
    minilm.tokenizers = {
        TOKENIZER_REF: Tokenizer.from_file(str(minilm_l6_v2_dir() / "tokenizer.json"))
    }
    model = minilm.load()
    inputs = model.encode_records(json_records(frame, ["review"]))
    np.testing.assert_allclose(model.run(inputs), minilm.torch_logits(frame), atol=1e-4)
    assert model.memory_bytes > 2 * len(minilm.onnx) + (8 << 20)  # the tokenizer counts too
    inputs["tokens"][0, 1] = 30522  # BERT's vocabulary ends at 30521
    with pytest.raises(InvalidRequest, match=r"\[0, 30522\)") as caught:
        model.check_inputs(inputs)
    assert caught.value.param == "tokens"


def test_tensor_specs_come_from_the_graph(lstm_classifier: Registered) -> None:
    model = lstm_classifier.load()
    shape = input_shape(lstm_classifier.spec)
    assert model.input_names == ("tabular", "tokens", "attention")
    assert model.inputs == [
        TensorSpec("tabular", "FP32", [-1, shape.tabular_dim]),
        TensorSpec("tokens", "INT64", [-1, 8]),
        TensorSpec("attention", "INT64", [-1, 8]),
    ]
    assert model.outputs == [TensorSpec("logits", "FP32", [-1, 3])]
    assert model.task is Task.CLASSIFICATION
    assert model.memory_bytes > 2 * len(lstm_classifier.onnx)


def test_a_description_that_disagrees_with_the_graph_or_spec_does_not_load(
    lstm_classifier: Registered, mlp_classifier: Registered
) -> None:
    def load(onnx: bytes, **changes: Any) -> None:
        description = {**lstm_classifier.description, **changes}
        ClassicModel.load(onnx=onnx, description=description, preprocessing=lstm_classifier.spec)

    with pytest.raises(ValueError, match="the graph takes"):
        load(lstm_classifier.onnx, input_names=["tabular", "tokens"])
    with pytest.raises(ValueError, match="classes"):
        load(lstm_classifier.onnx, classes=["cat", "dog"])
    with pytest.raises(ValueError, match="cannot load the graph"):
        load(b"not an onnx graph")
    with pytest.raises(ValueError):
        load(mlp_classifier.onnx)  # another model's graph


# -- bad requests --------------------------------------------------------------------------------


def valid_inputs(registered: Registered, batch: int = 3) -> dict[str, np.ndarray]:
    shape = input_shape(registered.spec)
    return example_inputs(shape, registered.network.input_names, batch=batch)


def replaced(name: str, make: Callable[[np.ndarray], np.ndarray]) -> Callable[[dict], None]:
    def change(inputs: dict[str, np.ndarray]) -> None:
        inputs[name] = make(inputs[name])

    return change


def poke_token(value: int) -> Callable[[dict], None]:
    def change(inputs: dict[str, np.ndarray]) -> None:
        inputs["tokens"][1, 0] = value

    return change


@pytest.mark.parametrize(
    ("param", "change", "message"),
    [
        ("attention", lambda inputs: inputs.pop("attention"), "missing"),
        (
            "images",
            lambda inputs: inputs.update(images=np.zeros((3, 3, 8, 8), np.float32)),
            "unknown",
        ),
        ("tabular", replaced("tabular", lambda a: a.astype(np.float64)), "FP32"),
        ("tokens", replaced("tokens", lambda a: a.astype(np.float32)), "INT64"),
        ("attention", replaced("attention", lambda a: a.astype(np.int32)), "INT64"),
        (
            "tabular",
            replaced("tabular", lambda a: np.zeros((3, a.shape[1] + 1), np.float32)),
            "shape",
        ),
        ("tokens", replaced("tokens", lambda a: a[:, :5]), "shape"),
        ("tabular", replaced("tabular", lambda a: a[:, :, None]), "dimensions"),
        ("attention", replaced("attention", lambda a: a[0]), "dimensions"),
        ("tokens", replaced("tokens", lambda a: a[:2]), "2 rows"),
        ("tabular", replaced("tabular", lambda a: a[:0]), "no rows"),
        ("tokens", poke_token(10_000), "10000"),
        ("tokens", poke_token(-1), "-1"),
        ("tabular", replaced("tabular", lambda a: np.full_like(a, np.nan)), "NaN"),
        ("attention", replaced("attention", lambda a: a * 2), "0 and 1"),
        ("tabular", replaced("tabular", lambda a: a.tolist()), "array"),
    ],
)
def test_bad_tensors_are_invalid_requests_naming_the_input(
    lstm_classifier: Registered,
    param: str,
    change: Callable[[dict[str, np.ndarray]], None],
    message: str,
) -> None:
    model = lstm_classifier.load()
    inputs = valid_inputs(lstm_classifier)
    model.check_inputs(inputs)  # the unchanged inputs pass
    change(inputs)
    with pytest.raises(InvalidRequest, match=message) as caught:
        model.check_inputs(inputs)
    assert caught.value.param == param


def test_the_highest_token_id_of_the_vocabulary_is_valid(lstm_classifier: Registered) -> None:
    model = lstm_classifier.load()
    inputs = valid_inputs(lstm_classifier)
    vocab_size = input_shape(lstm_classifier.spec).text_vocab_size
    assert vocab_size is not None
    inputs["tokens"][0, 0] = vocab_size - 1
    model.check_inputs(inputs)
    assert np.isfinite(model.run(inputs)).all()


def test_records_with_a_missing_column_or_bad_value_name_the_record(
    mlp_classifier: Registered, cnn_classifier: Registered
) -> None:
    model = mlp_classifier.load()
    records = json_records(training_frame(6), TABULAR)
    del records[1]["age"]
    with pytest.raises(InvalidRequest, match="record 1: column 'age' is missing") as caught:
        model.encode_records(records)
    assert caught.value.param == "age"

    records = json_records(training_frame(6), TABULAR)
    records[4]["income"] = "plenty"
    with pytest.raises(InvalidRequest, match=r"record 4: .*'plenty' is not a number") as caught:
        model.encode_records(records)
    assert caught.value.param == "income"

    images = cnn_classifier.load()
    records = json_records(training_frame(6), ["photo"])
    records[3]["photo"] = b"not a png"
    with pytest.raises(InvalidRequest, match=r"record 3: .*cannot decode image") as caught:
        images.encode_records(records)
    assert caught.value.param == "photo"


def test_records_need_one_to_ten_thousand_rows_and_may_carry_other_columns(
    mlp_classifier: Registered,
) -> None:
    model = mlp_classifier.load()
    for records in ([], [{"age": 1}] * 10_001):
        with pytest.raises(InvalidRequest) as caught:
            model.encode_records(records)
        assert caught.value.param == "records"
    extra = [
        {**record, "species": "cat", "id": 7} for record in json_records(training_frame(2), TABULAR)
    ]
    assert model.encode_records(extra)["tabular"].shape[0] == 2


# -- the pool ------------------------------------------------------------------------------------


async def eventually(condition: Callable[[], bool]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


class Loader:
    """Load functions that count their calls; optionally held at a gate or failing."""

    def __init__(self, registered: Registered) -> None:
        self.registered = registered
        self.calls: Counter[str] = Counter()
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, key: str, *, fail: bool = False) -> Callable[[], ClassicModel]:
        def load() -> ClassicModel:
            self.calls[key] += 1
            if not self.gate.wait(DEADLINE_S):
                raise TimeoutError("the test never opened the gate")
            if fail:
                raise RuntimeError(f"blob for {key} is gone")
            return self.registered.load()

        return load


def run_with_pool(
    scenario: Callable[[ClassicPool], Any],
    *,
    budget: int = 1 << 30,
    gates: tuple[threading.Event, ...] = (),
    **batch: Any,
) -> Any:
    """Run `scenario` on a fresh pool; `gates` are opened at the end, so a failing scenario
    does not leave a load or a batch held until its deadline."""
    pool = ClassicPool(memory_budget_bytes=budget, batch=BatcherConfig(**batch), threads=1)
    try:

        async def guarded() -> Any:
            try:
                return await scenario(pool)
            finally:
                for gate in gates:
                    gate.set()

        return asyncio.run(guarded())
    finally:
        pool.close()


def test_concurrent_requests_share_batches_and_each_gets_its_own_rows_in_order(
    mlp_classifier: Registered,
) -> None:
    slices = [slice(start, start + 1 + start % 4) for start in range(16)]

    async def scenario(pool: ClassicPool) -> None:
        loaded = await pool.get("v1", Loader(mlp_classifier)("v1"))
        table = (await loaded.encode_records(json_records(training_frame(), TABULAR)))["tabular"]
        assert loaded.in_flight() == 0
        results = await asyncio.gather(
            *(
                loaded.infer({"tabular": table[rows]}, tenant=f"org-{i % 3}", weight=1.0)
                for i, rows in enumerate(slices)
            )
        )
        for rows, logits in zip(slices, results, strict=True):
            want = loaded.model.run({"tabular": table[rows]})
            assert logits.shape == want.shape
            np.testing.assert_allclose(logits, want, atol=1e-5)
        stats = loaded.batcher.stats()
        assert stats.items == sum(s.stop - s.start for s in slices)
        assert stats.batches < len(slices)

    run_with_pool(scenario, max_wait_ms=50, max_batch_items=256)


def test_bad_tensors_fail_before_they_reach_the_batcher(lstm_classifier: Registered) -> None:
    async def scenario(pool: ClassicPool) -> None:
        loaded = await pool.get("v1", Loader(lstm_classifier)("v1"))
        inputs = valid_inputs(lstm_classifier)
        inputs["tokens"][0, 0] = 1 << 40
        with pytest.raises(InvalidRequest):
            await loaded.infer(inputs, tenant="org", weight=1.0)
        assert loaded.batcher.stats().batches == 0
        assert loaded.in_flight() == 0

    run_with_pool(scenario)


def test_a_model_loads_on_first_use_and_once_for_concurrent_callers(
    mlp_classifier: Registered,
) -> None:
    loader = Loader(mlp_classifier)
    loader.gate.clear()

    async def scenario(pool: ClassicPool) -> None:
        assert not pool.loaded("v1")
        callers = [asyncio.create_task(pool.get("v1", loader("v1"))) for _ in range(8)]
        await eventually(lambda: loader.calls["v1"] == 1)
        assert [e.state for e in pool.entries()] == ["loading"]
        loader.gate.set()
        loaded = await asyncio.gather(*callers)
        assert all(each is loaded[0] for each in loaded)
        assert await pool.get("v1", loader("v1")) is loaded[0]
        assert loader.calls["v1"] == 1
        (entry,) = pool.entries()
        assert (entry.key, entry.state) == ("v1", "ready")
        assert entry.memory_bytes == loaded[0].model.memory_bytes

    run_with_pool(scenario, gates=(loader.gate,))


def test_least_recently_used_models_are_evicted_to_fit_and_reload_on_demand(
    mlp_classifier: Registered,
) -> None:
    loader = Loader(mlp_classifier)
    size = mlp_classifier.load().memory_bytes

    async def scenario(pool: ClassicPool) -> None:
        await pool.get("a", loader("a"))
        await pool.get("b", loader("b"))
        await pool.get("a", loader("a"))  # now b is the least recently used
        await pool.get("c", loader("c"))
        assert (pool.loaded("a"), pool.loaded("b"), pool.loaded("c")) == (True, False, True)
        assert pool.evictions() == 1
        again = await pool.get("b", loader("b"))
        assert (pool.loaded("a"), pool.loaded("b"), pool.loaded("c")) == (False, True, True)
        assert pool.evictions() == 2
        assert loader.calls == Counter(a=1, b=2, c=1)
        logits = await again.infer(valid_inputs(mlp_classifier), tenant="org", weight=1.0)
        assert logits.shape == (3, 3)

    run_with_pool(scenario, budget=2 * size + size // 2)


def test_a_model_bigger_than_the_budget_loads_alone(mlp_classifier: Registered) -> None:
    loader = Loader(mlp_classifier)

    async def scenario(pool: ClassicPool) -> None:
        first = await pool.get("a", loader("a"))
        await pool.get("b", loader("b"))
        assert [e.key for e in pool.entries()] == ["b"]
        assert pool.evictions() == 1
        with pytest.raises(ServiceUnavailable):
            await first.infer(valid_inputs(mlp_classifier), tenant="org", weight=1.0)

    run_with_pool(scenario, budget=1)


def test_a_model_with_a_request_in_flight_is_never_evicted(mlp_classifier: Registered) -> None:
    loader = Loader(mlp_classifier)
    started, release = threading.Event(), threading.Event()

    def held(key: str) -> Callable[[], ClassicModel]:
        def load() -> ClassicModel:
            model = loader(key)()
            run = model.run

            def run_when_released(inputs: dict[str, np.ndarray]) -> np.ndarray:
                started.set()
                if not release.wait(DEADLINE_S):
                    raise TimeoutError("the test never released the batch")
                return run(inputs)

            model.run = run_when_released  # type: ignore[method-assign]
            return model

        return load

    async def scenario(pool: ClassicPool) -> None:
        busy = await pool.get("a", held("a"))
        request = asyncio.create_task(
            busy.infer(valid_inputs(mlp_classifier), tenant="org", weight=1.0)
        )
        await eventually(started.is_set)
        await pool.get("b", loader("b"))
        assert pool.loaded("a") and pool.loaded("b")
        assert pool.evictions() == 0
        assert not pool.evict("a")  # not even on request
        release.set()
        assert (await request).shape == (3, 3)
        assert busy.in_flight() == 0
        await pool.get("c", loader("c"))  # now both idle ones go
        assert [e.key for e in pool.entries()] == ["c"]
        assert pool.evictions() == 2
        assert pool.evict("c") and not pool.loaded("c")

    run_with_pool(scenario, budget=1, gates=(release,))


def test_a_failed_load_reaches_every_waiter_and_is_not_cached(
    mlp_classifier: Registered,
) -> None:
    loader = Loader(mlp_classifier)
    loader.gate.clear()

    async def scenario(pool: ClassicPool) -> None:
        waiters = [asyncio.create_task(pool.get("v1", loader("v1", fail=True))) for _ in range(3)]
        await eventually(lambda: loader.calls["v1"] == 1)
        loader.gate.set()
        outcomes = await asyncio.gather(*waiters, return_exceptions=True)
        assert all(isinstance(o, RuntimeError) and "gone" in str(o) for o in outcomes)
        assert loader.calls["v1"] == 1
        assert not pool.loaded("v1") and pool.entries() == []
        loaded = await pool.get("v1", loader("v1"))
        assert loader.calls["v1"] == 2
        predictions = loaded.model.interpret(
            await loaded.infer(valid_inputs(mlp_classifier), tenant="org", weight=1.0)
        )
        assert all(
            isinstance(p, Prediction) and p.label in {"cat", "dog", "eel"} for p in predictions
        )

    run_with_pool(scenario, gates=(loader.gate,))
