"""FedSA-LoRA: averages and the global model's error in float64, the byte contract, the client's own B, a real run."""

import json

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, MessageType, RecordDict
from safetensors.numpy import load_file

from fedlora.adapters.lora import LORA_A, LORA_B, adapter_state, load_adapter_state
from fedlora.adapters.transport import from_record, to_record
from fedlora.client.node_store import NodeStore
from fedlora.client.role import Incoming
from fedlora.protocol import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES, PARTITION_ID, RUN_KEY, SERVER_ROUND
from fedlora.run_config import load_config
from fedlora.runtime.inprocess import InProcessGrid, run_inprocess
from fedlora.server.influence import capped_shares
from fedlora.server.round import ClientUpdate, Round
from fedlora.strategies.common import client_weights, weighted_sum
from fedlora.strategies.fedsa.client import OwnB, PersonalB
from fedlora.strategies.fedavg.math import average_with_error, fedavg_states
from fedlora.strategies.fedsa.math import own_part, shared_part, traffic
from fedlora.strategies.fedsa.server import FedSAServer
from fedlora.task import adapted_model

D, K, R = 12, 10, 4
MODULES = ["base_model.model.enc.0.query", "base_model.model.enc.0.value"]
HEAD = "base_model.model.classifier.weight"
SCALE = 2.0


def _states(clients: int, seed: int = 0, same_b: bool = False) -> list[dict[str, np.ndarray]]:
    """Client uploads in float64: A (R×K), B (D×R) for MODULES and a head (one B for all when ``same_b``)."""
    rng = np.random.default_rng(seed)
    common_b = {m: rng.standard_normal((D, R)) for m in MODULES}
    states = []
    for _ in range(clients):
        state = {HEAD: rng.standard_normal((3, D))}
        for m in MODULES:
            state[m + LORA_A] = rng.standard_normal((R, K))
            state[m + LORA_B] = common_b[m].copy() if same_b else rng.standard_normal((D, R))
        states.append(state)
    return states


def _weights(n: int) -> np.ndarray:
    return client_weights(np.random.default_rng(3).integers(5, 50, size=n).tolist(), "num-examples")


def _dense_error(states: list[dict], p: np.ndarray, average: dict) -> float:
    """‖s·B̄Ā − Σ_k p_k s·B_k A_k‖_F / ‖Σ_k p_k s·B_k A_k‖_F with dense d×k matrices, in float64."""
    num = den = 0.0
    for m in MODULES:
        ideal = sum(pk * SCALE * s[m + LORA_B] @ s[m + LORA_A] for pk, s in zip(p, states))
        applied = SCALE * average[m + LORA_B].astype(np.float64) @ average[m + LORA_A].astype(np.float64)
        num += np.linalg.norm(applied - ideal) ** 2
        den += np.linalg.norm(ideal) ** 2
    return float(np.sqrt(num / den))


# ----- the math ---------------------------------------------------------------------------------
def test_a_b_and_the_head_are_averaged_and_only_a_and_the_head_go_down():
    states, p = _states(3), _weights(3)
    average = fedavg_states(states, p)
    assert set(average) == set(states[0])
    for key in average:
        np.testing.assert_allclose(average[key], weighted_sum([s[key] for s in states], p), rtol=1e-6, atol=1e-6)
    assert set(shared_part(average)) == {HEAD, *(m + LORA_A for m in MODULES)}
    assert set(own_part(average)) == {m + LORA_B for m in MODULES}


def test_the_global_model_is_inexact_by_fedits_cross_term():
    """s·B̄Ā − Σ p_k s·B_kA_k = −s·Σ p_k (B_k − B̄)(A_k − Ā): agg_error is the dense one, and > 0."""
    states, p = _states(4), _weights(4)
    average = fedavg_states(states, p)
    error = average_with_error(states, p, SCALE)[1]["agg_error"]
    assert error == pytest.approx(_dense_error(states, p, average), rel=1e-6)
    num = den = 0.0
    for m in MODULES:
        B_bar = weighted_sum([s[m + LORA_B] for s in states], p)
        A_bar = weighted_sum([s[m + LORA_A] for s in states], p)
        cross = sum(pk * (s[m + LORA_B] - B_bar) @ (s[m + LORA_A] - A_bar) for pk, s in zip(p, states))
        num += np.linalg.norm(SCALE * cross) ** 2
        den += np.linalg.norm(sum(pk * SCALE * s[m + LORA_B] @ s[m + LORA_A] for pk, s in zip(p, states))) ** 2
    assert error == pytest.approx(np.sqrt(num / den), rel=1e-5)
    assert error > 1e-2


def test_the_global_model_is_exact_when_the_clients_b_agree():
    states, p = _states(3, same_b=True), _weights(3)
    assert average_with_error(states, p, SCALE)[1]["agg_error"] < 1e-6


def test_the_byte_contract_sends_everything_but_b_down_and_the_whole_adapter_up():
    adapter = {k: tuple(v.shape) for k, v in _states(1)[0].items()}
    assert traffic("up", 0, adapter, 2) == {} and traffic("down", 0, adapter, 2) == {}
    for server_round in (1, 2):
        assert traffic("up", server_round, adapter, 2) == adapter
        assert traffic("down", server_round, adapter, 2) == {HEAD: (3, D), **{m + LORA_A: (R, K) for m in MODULES}}


def test_the_server_never_sends_b():
    cfg = load_config({"strategy": "fedsa", "lora.rank": R})
    initial = {k: v.astype(np.float32) for k, v in _states(1)[0].items()}
    server = FedSAServer(cfg, initial)
    assert set(server.downloads(1, 1)[ARRAYS]) == set(shared_part(initial))
    uploads = [{k: v.astype(np.float32) for k, v in s.items()} for s in _states(2, seed=1)]
    updates = [ClientUpdate(node_id=i + 1, partition_id=i, state=u, num_examples=10 * (i + 1))
               for i, u in enumerate(uploads)]
    p = client_weights([u.num_examples for u in updates], "num-examples")
    server.state, metrics = server.aggregate(Round(1, [1, 2], 2, 0, 0.0, updates=updates), p)
    assert metrics["agg_error"] > 0
    key = MODULES[0] + LORA_B
    np.testing.assert_allclose(server.state[key], weighted_sum([u[key] for u in uploads], p), rtol=1e-6, atol=1e-6)
    assert set(server.downloads(2, 1)[ARRAYS]) == set(shared_part(initial)), "B̄ stays on the server"


# ----- the client's own B -------------------------------------------------------------------------
def _context(state_dir, node_id: int = 1) -> Context:
    return Context(run_id=7, node_id=node_id, node_config={"state-dir": str(state_dir)}, state=RecordDict(),
                   run_config={})


def _b(value: float) -> dict[str, np.ndarray]:
    return {m + LORA_B: np.full((D, R), value, np.float32) for m in MODULES}


def _value(own_b) -> float | None:
    return None if own_b is None else float(own_b[MODULES[0] + LORA_B][0, 0])


def test_own_b_keeps_the_versions_a_repeated_round_needs_and_survives_a_restart(tmp_path):
    own = OwnB(NodeStore(_context(tmp_path), 0, "run-x"))
    assert own.load(5) is None
    own.save(1, _b(1.0))
    assert _value(own.load(0)) is None and _value(own.load(1)) == 1.0
    own.save(3, _b(3.0))
    assert (_value(own.load(2)), _value(own.load(3))) == (1.0, 3.0)
    own.save(3, _b(3.5))  # round 3 repeated after a server resume: it started from round 1's B
    assert (_value(own.load(2)), _value(own.load(3))) == (1.0, 3.5)
    restarted = OwnB(NodeStore(_context(tmp_path, node_id=9), 0, "run-x"))  # a new process: empty context.state
    assert (_value(restarted.load(2)), _value(restarted.load(4))) == (1.0, 3.5)
    restarted.save(4, _b(4.0))
    assert (_value(restarted.load(3)), _value(restarted.load(4))) == (3.5, 4.0)
    assert set(restarted.load(4)) == set(_b(0.0)), "the round tag is not part of the loaded B"


def _message(cfg, server_round: int, shared: dict, context: Context, partition_id: int = 0) -> Incoming:
    config = {SERVER_ROUND: server_round, RUN_KEY: "own-b-test"}
    content = RecordDict({ARRAYS: to_record(shared), CONFIG: ConfigRecord(config)})
    return Incoming(cfg, content, context, partition_id, server_round, torch.device("cpu"))


def test_training_keeps_the_new_b_and_evaluation_loads_it_without_overwriting(tmp_path):
    cfg = load_config({"strategy": "fedsa", "model.name": "tiny-bert", "dataset.name": "chatterbot-topics",
                       "lora.rank": R})
    role, context = PersonalB(), _context(tmp_path)
    shared = shared_part(adapted_model(cfg, "cpu").initial_state)
    round_1 = _message(cfg, 1, shared, context)
    model, params = role.prepare(round_1)
    assert all(np.array_equal(v, model.initial_state[k]) for k, v in own_part(adapter_state(model)).items()), \
        "B = 0 at first"
    lora = {id(q) for n, q in model.named_parameters() if "lora_A" in n or "lora_B" in n}
    assert lora <= {id(q) for q in params}, "A and B both train"
    trained = {k: v + 0.25 for k, v in own_part(adapter_state(model)).items()}  # what local training would leave
    load_adapter_state(model, {**adapter_state(model), **trained})
    upload = role.upload(model, round_1)
    assert set(upload) == set(model.initial_state), "the whole adapter travels up"

    model = role.prepare_evaluation(round_1)  # round 1's evaluation
    assert all(np.array_equal(v, trained[k]) for k, v in own_part(adapter_state(model)).items())
    load_adapter_state(model, {**adapter_state(model), **{k: v - 9.0 for k, v in trained.items()}})  # never uploaded
    model, _ = role.prepare(_message(cfg, 2, shared, context))  # round 2's training
    assert all(np.array_equal(v, trained[k]) for k, v in own_part(adapter_state(model)).items())
    repeated, _ = role.prepare(round_1)  # round 1 again, after a server resume: from the B before round 1
    assert all(np.array_equal(v, model.initial_state[k]) for k, v in own_part(adapter_state(repeated)).items())
    other, _ = role.prepare(_message(cfg, 2, shared, _context(tmp_path, node_id=2), partition_id=1))
    assert all(np.array_equal(v, model.initial_state[k]) for k, v in own_part(adapter_state(other)).items()), \
        "another client starts from its own B"


# ----- end to end ------------------------------------------------------------------------------
RUN = {"strategy": "fedsa", "model.name": "tiny-bert", "dataset.name": "chatterbot-topics", "num-server-rounds": 4,
       "local-steps": 5, "batch-size": 8, "lr": 5e-3, "dataset.max-length": 32, "dataset.eval-max-examples": 64,
       "lora.rank": 4, "fraction-evaluate": 1.0, "dataset.local-eval-fraction": 0.25}


def test_a_run_keeps_b_per_client_evaluates_them_personalised_and_improves(tmp_path, monkeypatch):
    """Downloads carry no B; each client stores its own last B; client_eval_* every round; eval_loss falls."""
    monkeypatch.setenv("FEDLORA_STATE_DIR", str(tmp_path / "node-state"))
    sent: list[tuple[str, set[str]]] = []
    uploads: dict[int, list[tuple[int, dict, int]]] = {}
    original_push = InProcessGrid.push_messages

    def push(self, messages):
        messages = list(messages)
        sent.extend((m.metadata.message_type, set(m.content[ARRAYS])) for m in messages)
        ids = original_push(self, messages)
        for message, i in zip(messages, ids):
            reply = self._replies[i]
            if message.metadata.message_type == MessageType.TRAIN and not reply.has_error():
                metrics = reply.content[METRICS]
                uploads.setdefault(int(message.content[CONFIG][SERVER_ROUND]), []).append(
                    (int(metrics[PARTITION_ID]), from_record(reply.content[ARRAYS]), int(metrics[NUM_EXAMPLES])))
        return ids

    monkeypatch.setattr(InProcessGrid, "push_messages", push)
    out = tmp_path / "run"
    run_inprocess({**RUN, "output-dir": str(out)}, num_nodes=2)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2, 3, 4]

    assert {kind for kind, _ in sent} == {MessageType.TRAIN, MessageType.EVALUATE}
    assert all(keys and not any(k.endswith(LORA_B) for k in keys) for _, keys in sent), "B never travels down"
    last = sorted(uploads[4], key=lambda u: u[0])
    assert [p for p, _, _ in last] == [0, 1]
    stored = {p: load_file(str(next((tmp_path / "node-state").glob(f"run-*-p{p}/fedsa-own-b.safetensors"))))
              for p in (0, 1)}
    for partition, upload, _ in last:
        for key, value in own_part(upload).items():
            np.testing.assert_array_equal(stored[partition][key], value, err_msg="the stored B is the last trained one")
    assert any(not np.allclose(stored[0][k], stored[1][k]) for k in own_part(last[0][1])), "B stays per client"

    final = load_file(str(out / "final_adapter" / "adapter_model.safetensors"))
    p = capped_shares(client_weights([n for _, _, n in last], "num-examples"), RUN.get("validation.max-share", 0.5))
    for key in own_part(last[0][1]):
        np.testing.assert_allclose(final[key], weighted_sum([u[key] for _, u, _ in last], p), rtol=1e-6, atol=1e-7,
                                   err_msg="the final adapter's B is B̄")

    assert all(r["num_clients"] == 2 and r["agg_error"] > 0 for r in records[1:])
    assert all(0 <= r["client_eval_accuracy"] <= 1 and np.isfinite(r["client_eval_loss"]) for r in records[1:])
    assert records[-1]["eval_loss"] < records[0]["eval_loss"]
