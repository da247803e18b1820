"""RoLoRA: its alternation, its average and its exactness in float64, its byte contract, and one real run."""

import json

import numpy as np
import pytest
from flwr.app import MessageType

from fedlora.adapters.lora import LORA_A, LORA_B
from fedlora.adapters.transport import from_record
from fedlora.protocol import ARRAYS
from fedlora.run_config import load_config
from fedlora.runtime.inprocess import run_inprocess
from fedlora.server.round import ClientUpdate, Round
from fedlora.server.rounds import RoundLoop
from fedlora.strategies.common import client_weights, weighted_sum
from fedlora.strategies.rolora.math import average_with_error, trained_factor, traffic, upload_part
from fedlora.strategies.rolora.server import RoLoRAServer

D, K, R = 12, 10, 4
MODULES = ["base_model.model.enc.0.query", "base_model.model.enc.0.value"]
HEAD = "base_model.model.classifier.weight"
SCALE = 2.0


def _global(seed: int = 0) -> dict[str, np.ndarray]:
    """A global adapter in float64: A (R×K), B (D×R) for MODULES, and a head."""
    rng = np.random.default_rng(seed)
    state = {HEAD: rng.standard_normal((3, D))}
    for m in MODULES:
        state[m + LORA_A] = rng.standard_normal((R, K))
        state[m + LORA_B] = rng.standard_normal((D, R))
    return state


def _uploads(server_round: int, clients: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    """Random client uploads of ``server_round``: the trained factor of every module and the head."""
    rng = np.random.default_rng(seed)
    return [{k: rng.standard_normal(v.shape) for k, v in upload_part(_global(), server_round).items()}
            for _ in range(clients)]


def _weights(n: int) -> np.ndarray:
    return client_weights(np.random.default_rng(3).integers(5, 50, size=n).tolist(), "num-examples")


def _dense(B: np.ndarray, A: np.ndarray) -> np.ndarray:
    return SCALE * np.asarray(B, np.float64) @ np.asarray(A, np.float64)


def _client_factors(shared: dict, upload: dict, m: str) -> tuple[np.ndarray, np.ndarray]:
    """Client k's (B_k, A_k): its trained factor, and the global one it kept fixed."""
    full = {**shared, **upload}
    return full[m + LORA_B], full[m + LORA_A]


def test_rounds_alternate_b_first():
    assert [trained_factor(t) for t in range(1, 6)] == [LORA_B, LORA_A, LORA_B, LORA_A, LORA_B]
    state = _global()
    assert set(upload_part(state, 1)) == {HEAD, *(m + LORA_B for m in MODULES)}
    assert set(upload_part(state, 2)) == {HEAD, *(m + LORA_A for m in MODULES)}


@pytest.mark.parametrize("server_round", [1, 2])
def test_the_trained_factor_and_the_head_are_averaged(server_round):
    uploads, p = _uploads(server_round, 3), _weights(3)
    average, _ = average_with_error(uploads, p, _global(), SCALE, server_round, measure=False)
    assert set(average) == set(uploads[0])
    for key in average:
        expected = sum(pk * u[key] for pk, u in zip(p, uploads))
        np.testing.assert_allclose(average[key], expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="must not contain the shared factor"):
        average_with_error([{**u, **_global()} for u in uploads], p, _global(), SCALE, server_round)


@pytest.mark.parametrize("server_round", [1, 2, 3, 4])
def test_every_round_is_exact_against_the_dense_ideal_update(server_round):
    """s·B̄Ā = Σ_k p_k s·B_k A_k with the shared factor: dense float64 reference and agg_error both ≈ 0."""
    shared, uploads, p = _global(), _uploads(server_round, 4, seed=server_round), _weights(4)
    average, metrics = average_with_error(uploads, p, shared, SCALE, server_round)
    new = {**shared, **average}
    for m in MODULES:
        ideal = sum(pk * _dense(*_client_factors(shared, u, m)) for pk, u in zip(p, uploads))
        trained = m + trained_factor(server_round)
        exact = {**shared, trained: weighted_sum([u[trained] for u in uploads], p)}
        np.testing.assert_allclose(_dense(exact[m + LORA_B], exact[m + LORA_A]), ideal, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(_dense(new[m + LORA_B], new[m + LORA_A]), ideal, rtol=1e-5, atol=1e-5)
    pairs = [(_dense(new[m + LORA_B], new[m + LORA_A]),
              sum(pk * _dense(*_client_factors(shared, u, m)) for pk, u in zip(p, uploads))) for m in MODULES]
    dense = np.sqrt(sum(np.linalg.norm(a - i) ** 2 for a, i in pairs) / sum(np.linalg.norm(i) ** 2 for _, i in pairs))
    error = metrics["agg_error"]
    assert error < 1e-6 and error == pytest.approx(dense, rel=1e-3, abs=1e-12), "the float32 rounding of the average"


def test_a_factor_average_of_both_factors_would_be_inexact():
    """The contrast RoLoRA avoids: averaging B_k and A_k that both differ leaves FedIT's cross term."""
    p, Bs, As = _weights(3), _uploads(1, 3, seed=5), _uploads(2, 3, seed=6)
    for m in MODULES:
        ideal = sum(pk * _dense(b[m + LORA_B], a[m + LORA_A]) for pk, b, a in zip(p, Bs, As))
        fedit = _dense(weighted_sum([b[m + LORA_B] for b in Bs], p), weighted_sum([a[m + LORA_A] for a in As], p))
        assert np.linalg.norm(fedit - ideal) > 1e-3 * np.linalg.norm(ideal)


def test_the_server_keeps_the_shared_factor_and_validates_the_trained_one():
    cfg = load_config({"strategy": "rolora", "lora.rank": R})
    initial = {k: v.astype(np.float32) for k, v in _global().items()}
    server = RoLoRAServer(cfg, initial)
    for server_round in (1, 2):
        uploads = [{k: v.astype(np.float32) for k, v in u.items()}
                   for u in _uploads(server_round, 2, seed=server_round)]
        updates = [ClientUpdate(node_id=i + 1, partition_id=i, state=u, num_examples=10 * (i + 1))
                   for i, u in enumerate(uploads)]
        expected = server.expected_upload(server_round, updates[0])
        assert expected == {k: v.shape for k, v in uploads[0].items()}
        p = client_weights([u.num_examples for u in updates], "num-examples")
        before = dict(server.state)
        server.state, metrics = server.aggregate(Round(server_round, [1, 2], 2, 0, 0.0, updates=updates), p)
        shared = [k for k in before if k.endswith(LORA_A if server_round == 1 else LORA_B)]
        assert all(np.array_equal(server.state[k], before[k]) for k in shared)
        assert metrics["agg_error"] < 1e-6
        assert set(server.state) == set(initial)


def test_the_byte_contract_sends_the_adapter_down_and_the_trained_factor_up():
    adapter = {k: tuple(v.shape) for k, v in _global().items()}
    assert traffic("up", 0, adapter, 2) == {} and traffic("down", 0, adapter, 2) == {}
    for server_round in (1, 2, 3):
        assert traffic("down", server_round, adapter, 2) == adapter
    assert traffic("up", 1, adapter, 2) == {HEAD: (3, D), **{m + LORA_B: (D, R) for m in MODULES}}
    assert traffic("up", 2, adapter, 2) == {HEAD: (3, D), **{m + LORA_A: (R, K) for m in MODULES}}


# ----- end to end ------------------------------------------------------------------------------
RUN = {"strategy": "rolora", "model.name": "tiny-bert", "dataset.name": "chatterbot-topics", "num-server-rounds": 4,
       "local-steps": 5, "batch-size": 8, "lr": 5e-3, "dataset.max-length": 32, "dataset.eval-max-examples": 64,
       "lora.rank": 4}


def test_a_run_uploads_b_then_a_exactly_and_improves(tmp_path, monkeypatch):
    """Round 1 uploads only B + head, round 2 only A + head; every round exact; eval_loss below round 0's."""
    uploaded: dict[int, list[set[str]]] = {}
    original_send = RoundLoop.send

    def send(self, grid, number, nodes, message_type, extra_config=None):
        sent, replies = original_send(self, grid, number, nodes, message_type, extra_config)
        if message_type == MessageType.TRAIN:
            uploaded[number] = [set(from_record(r.content[ARRAYS])) for r in replies if not r.has_error()]
        return sent, replies

    monkeypatch.setattr(RoundLoop, "send", send)
    out = tmp_path / "run"
    run_inprocess({**RUN, "output-dir": str(out)}, num_nodes=2)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2, 3, 4]
    for number in (1, 2, 3, 4):
        trained, frozen = trained_factor(number), (LORA_A if trained_factor(number) == LORA_B else LORA_B)
        assert len(uploaded[number]) == 2
        for keys in uploaded[number]:
            assert any(k.endswith(trained) for k in keys) and not any(k.endswith(frozen) for k in keys), number
            assert any(not k.endswith((LORA_A, LORA_B)) for k in keys), "the head travels every round"
    assert all(r["num_clients"] == 2 and r["agg_error"] < 1e-5 for r in records[1:])
    assert records[-1]["eval_loss"] < records[0]["eval_loss"]
