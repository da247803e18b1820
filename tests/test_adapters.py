import io

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from peft import PeftModel

from fedlora.adapters.lora import adapter_state, inject_lora, load_adapter_state, lora_modules
from fedlora.adapters.transport import from_record, record_bytes, to_record
from fedlora.config import LoraConfig
from fedlora.models.loading import load_base_model


def _model(task="classification", seed=0):
    return inject_lora(load_base_model("tiny-bert" if task == "classification" else "tiny-llama", task, 3), LoraConfig(rank=4), task, seed)


def test_state_has_lora_pairs_and_head():
    state = adapter_state(_model())
    modules = lora_modules(state)
    assert len(modules) == 4  # 2 layers x (query, value)
    for m in modules:
        assert state[m + ".lora_A.weight"].shape == (4, 32) and state[m + ".lora_B.weight"].shape == (32, 4)
        assert not state[m + ".lora_B.weight"].any(), "B starts at zero"
    assert any("classifier" in k for k in state)
    assert all(v.dtype == np.float32 for v in state.values())


def test_extract_load_round_trip_through_array_record():
    source, target = _model(seed=1), _model(seed=2)
    rng = np.random.default_rng(0)
    state = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in adapter_state(source).items()}
    load_adapter_state(source, state)
    record = to_record(adapter_state(source))
    load_adapter_state(target, from_record(record))
    for k, v in adapter_state(target).items():
        np.testing.assert_array_equal(v, state[k])
    ids = torch.tensor([[101, 2054, 2003, 102]])
    torch.testing.assert_close(source(input_ids=ids).logits, target(input_ids=ids).logits)
    assert record_bytes(record) >= sum(v.nbytes for v in state.values())


def test_load_rejects_wrong_keys_and_shapes():
    model = _model()
    state = adapter_state(model)
    key = next(iter(state))
    with pytest.raises(ValueError, match="missing"):
        load_adapter_state(model, {k: v for k, v in state.items() if k != key})
    with pytest.raises(ValueError, match="shape"):
        load_adapter_state(model, {**state, key: np.zeros((1, 1), np.float32)})


def test_saved_adapter_loads_with_peft(tmp_path):
    model = _model("instruction")
    rng = np.random.default_rng(3)
    load_adapter_state(model, {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in adapter_state(model).items()})
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(load_base_model("tiny-llama", "instruction", 0), tmp_path / "adapter")
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_unpacked_arrays_are_read_only_views_of_the_record_bytes():
    record = to_record({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float32)})
    state = from_record(record)
    np.testing.assert_array_equal(state["a"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert not state["a"].flags.writeable
    with pytest.raises(ValueError):
        state["a"][0, 0] = 1.0
    assert np.shares_memory(state["b"], np.frombuffer(record["b"].data, np.uint8)), "no copy of the payload"


@pytest.mark.parametrize("payload, reason", [
    (lambda: np.asfortranarray(np.ones((2, 3), np.float32)), "Fortran order"),
    (lambda: np.array([object()], dtype=object), "object dtype"),
])
def test_unpacking_refuses_arrays_that_are_not_plain(payload, reason):
    buffer = io.BytesIO()
    np.save(buffer, payload(), allow_pickle=True)
    record = ArrayRecord({"x": Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=buffer.getvalue())})
    with pytest.raises(ValueError, match=reason):
        from_record(record)


def test_unpacking_refuses_truncated_and_foreign_payloads():
    good = to_record({"x": np.ones((2, 3), np.float32)})["x"].data
    for data, reason in [(good[:-4], "payload of 20 bytes"), (b"PK\x03\x04" + good[4:], "not in npy format"),
                         (good[:6] + b"\x03\x00" + good[8:], "version 3.0")]:
        record = ArrayRecord({"x": Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=data)})
        with pytest.raises(ValueError, match=reason):
            from_record(record)
    record = ArrayRecord({"x": Array(dtype="float32", shape=(2, 3), stype="torch.Tensor", data=good)})
    with pytest.raises(ValueError, match="serialization type 'torch.Tensor'"):
        from_record(record)


def test_packing_writes_exactly_what_flower_writes():
    rng = np.random.default_rng(2)
    for value in [rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal(7),
                  np.asfortranarray(rng.standard_normal((5, 2))), np.zeros((0, 4), np.float32)]:
        packed, flower = to_record({"x": value})["x"], Array(np.ascontiguousarray(value, dtype=np.float32))
        assert (packed.data, packed.shape, packed.dtype, packed.stype) == (flower.data, flower.shape, flower.dtype,
                                                                             flower.stype)
    state = {"b": rng.standard_normal((4, 3)).astype(np.float32), "a": rng.standard_normal(5).astype(np.float32)}
    record = to_record(state)
    assert list(record) == ["b", "a"]
    assert record.object_id == ArrayRecord({k: Array(v) for k, v in state.items()}).object_id
