"""A real deployment on 127.0.0.1: SuperLink + SuperNodes over gRPC with TLS and SuperNode authentication.

One module fixture generates credentials with ``deploy/make_certs.sh``, starts a simulation of
the same job in the background, and meanwhile brings up the loopback federation of
:mod:`fedlora.deployment.loopback` (the command lines ``docker-compose.yml`` is rendered from):
two registered SuperNodes (partitions 0 and 1 of 2), one SuperNode with an unregistered
key and one that tries ``--insecure`` against the TLS SuperLink. The deployed run is judged
by ``flwr ls`` and its run directory, never by ``flwr run``'s exit code. A second
federation of three SuperNodes loses one (SIGKILL) mid-run and must finish with the others.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from fedlora.deployment.commands import FLWR_VERSION, node_key_name
from fedlora.deployment.compose import rendered_files
from fedlora.deployment.loopback import LOOPBACK, LoopbackFederation
from fedlora.runtime.launch import PROJECT_DIR, LaunchResult, run_simulation

MAKE_CERTS = PROJECT_DIR / "deploy" / "make_certs.sh"
JOB = {"model.name": "tiny-bert", "num-server-rounds": 2, "local-steps": 3, "batch-size": 8, "dataset.max-length": 32}
ADAPTER = Path("final_adapter") / "adapter_model.safetensors"


@dataclass
class Refused:
    exit_code: int | None
    log: str


@dataclass
class Outcome:
    deployed: LaunchResult
    simulated: LaunchResult
    output_dir: Path
    unregistered: Refused
    insecure: Refused
    superlink_log: str
    argv: list[list[str]]


@pytest.fixture(scope="module")
def credentials(tmp_path_factory) -> Path:
    """CA, server certificate and three SuperNode key pairs from ``deploy/make_certs.sh``."""
    certs = tmp_path_factory.mktemp("credentials") / "certs"
    subprocess.run([str(MAKE_CERTS), "--out", str(certs), "--nodes", "3"], check=True, timeout=120, capture_output=True)
    return certs


@pytest.fixture(scope="module")
def outcome(tmp_path_factory, credentials) -> Outcome:
    work = tmp_path_factory.mktemp("deployment")
    certs = credentials
    partitions = [{"partition-id": p, "num-partitions": 2} for p in (0, 1)]
    with ThreadPoolExecutor(max_workers=1) as pool:
        simulation = pool.submit(run_simulation, {**JOB, "output-dir": str(work / "simulated")}, num_supernodes=2,
                                 echo=False, timeout=480)
        with LoopbackFederation(work / "loopback", certs) as federation:
            node_ids = {federation.register(1), federation.register(2)}
            for index, node_config in zip((1, 2), partitions):
                federation.start_supernode(f"supernode-{index}", node_config, key_index=index)
            unregistered = federation.start_supernode("supernode-unregistered", partitions[0], key_index=3,
                                                      max_retries=1, with_superexec=False)
            insecure = federation.start_supernode("supernode-insecure", partitions[0], key_index=None, secure=False,
                                                  max_retries=2, with_superexec=False)
            federation.wait_online(node_ids)
            deployed = federation.run({**JOB, "output-dir": str(work / "deployed")}, timeout=420)
            refused = {name: Refused(p.exit_code(60), p.output()) for name, p in
                       (("unregistered", unregistered), ("insecure", insecure))}
            superlink_log = federation.processes[0].output()
            argv = [list(p.popen.args) for p in federation.processes]
        simulated = simulation.result(timeout=600)
    return Outcome(deployed, simulated, work / "deployed", refused["unregistered"], refused["insecure"],
                   superlink_log, argv)


def test_deployed_run_completes_with_both_nodes(outcome):
    assert outcome.deployed.ok, outcome.deployed.status + "\n" + outcome.deployed.output[-3000:]
    assert outcome.deployed.run_dir == outcome.output_dir
    records = [json.loads(line) for line in (outcome.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    assert all(r["num_clients"] == 2 for r in records[1:])
    assert json.loads((outcome.output_dir / "summary.json").read_text())["rounds"] == 2


def test_deployed_adapter_matches_simulation(outcome):
    assert outcome.simulated.ok, outcome.simulated.output[-3000:]
    deployed = load_file(str(outcome.output_dir / ADAPTER))
    simulated = load_file(str(outcome.simulated.run_dir / ADAPTER))
    assert sorted(deployed) == sorted(simulated)
    assert any("lora_B" in k and np.abs(v).sum() > 0 for k, v in deployed.items()), "the global adapter never trained"
    worst = max(float(np.abs(deployed[k] - simulated[k]).max()) for k in deployed)
    assert worst <= 1e-5, f"deployed and simulated final adapters differ by up to {worst:.3g}"


def test_unregistered_key_is_refused(outcome):
    assert outcome.unregistered.exit_code not in (None, 0), outcome.unregistered.log[-2000:]
    assert "Exit Code: 305" in outcome.unregistered.log
    assert "Failed to activate SuperNode" in outcome.unregistered.log
    assert "No SuperNode found with the given public key" in outcome.superlink_log


def test_insecure_supernode_is_refused(outcome):
    assert outcome.insecure.exit_code not in (None, 0), outcome.insecure.log[-2000:]
    assert "Option `--insecure` was set" in outcome.insecure.log
    assert "Exit Code: 305" in outcome.insecure.log


def test_everything_listens_on_loopback_with_tls_and_node_auth(outcome):
    addresses = [cmd[i + 1] for cmd in outcome.argv for i, arg in enumerate(cmd)
                 if arg in ("--host", "--fleet-api-address", "--superlink", "--runtime-api-address")]
    assert addresses and all(a == LOOPBACK or a.startswith(f"{LOOPBACK}:") for a in addresses), addresses
    superlink = outcome.argv[0]
    assert superlink[0] == "flower-superlink"
    assert {"--ssl-certfile", "--enable-supernode-auth", "--disable-runtime-dependency-installation"} <= set(superlink)
    assert "--insecure" not in superlink


def test_compose_files_are_rendered_from_the_tested_commands():
    for name, text in rendered_files(2).items():
        on_disk = (PROJECT_DIR / name).read_text()
        assert on_disk == text, f"{name} is stale: run `python -m fedlora.deployment.compose`"
        assert yaml.safe_load(on_disk)["services"]
    services = yaml.safe_load(rendered_files(2)["docker-compose.yml"])["services"]
    assert set(services) == {"superlink", "superexec-serverapp", "supernode-1", "superexec-clientapp-1",
                             "supernode-2", "superexec-clientapp-2"}
    assert services["superlink"]["image"] == f"flwr/superlink:{FLWR_VERSION}"
    assert services["supernode-1"]["image"] == f"flwr/supernode:{FLWR_VERSION}"
    assert f'flwr[simulation]=={FLWR_VERSION}"' in (PROJECT_DIR / "pyproject.toml").read_text()
    assert f"FLWR_VERSION={FLWR_VERSION}" in (PROJECT_DIR / "deploy" / "Dockerfile").read_text()


def test_make_certs_writes_ca_signed_server_cert_with_sans_and_ecdsa_node_keys(tmp_path):
    out = tmp_path / "certs"
    subprocess.run([str(MAKE_CERTS), "--out", str(out), "--nodes", "1", "--san", "superlink", "--san", "10.1.2.3"],
                   check=True, timeout=120, capture_output=True)
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(out / "ca.crt"), str(out / "server.pem")],
                            capture_output=True, text=True, timeout=30)
    assert verify.returncode == 0, verify.stderr
    sans = subprocess.run(["openssl", "x509", "-in", str(out / "server.pem"), "-noout", "-ext", "subjectAltName"],
                          capture_output=True, text=True, timeout=30, check=True).stdout
    assert set(re.findall(r"(?:DNS|IP Address):([^,\s]+)", sans)) == {"localhost", "127.0.0.1", "superlink", "10.1.2.3"}
    fingerprint = subprocess.run(["ssh-keygen", "-l", "-f", str(out / f"{node_key_name(1)}.pub")],
                                 capture_output=True, text=True, timeout=30, check=True).stdout
    assert fingerprint.startswith("384 ") and "(ECDSA)" in fingerprint
    refused = subprocess.run([str(MAKE_CERTS), "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "--force" in refused.stderr


def _wait_for_round(metrics: Path, server_round: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.is_file() and any(json.loads(line)["round"] == server_round
                                     for line in metrics.read_text().splitlines() if line.endswith("}")):
            return
        time.sleep(1.0)
    raise TimeoutError(f"round {server_round} not recorded in {metrics} after {timeout:.0f} s")


def test_run_survives_a_supernode_killed_mid_run(credentials, tmp_path):
    """Three SuperNodes; after round 1 one is SIGKILLed; rounds 2 and 3 aggregate the other two (min-clients = 1).

    The dead node's round-2 message is answered by nobody: the round ends when the SuperLink
    marks it offline (~46-49 s) or at round-timeout = 60 s, whichever is first; from then on
    it is no longer sampled.
    """
    out = tmp_path / "run"
    job = {**JOB, "num-server-rounds": 3, "round-timeout": 60.0, "min-clients": 1, "output-dir": str(out)}
    with LoopbackFederation(tmp_path / "loopback", credentials) as federation:
        ids = {index: federation.register(index) for index in (1, 2, 3)}
        node_ids = set(ids.values())
        for index in (1, 2, 3):
            federation.start_supernode(f"supernode-{index}", {"partition-id": index - 1, "num-partitions": 3},
                                       key_index=index)
        federation.wait_online(node_ids)
        with ThreadPoolExecutor(max_workers=1) as pool:
            running = pool.submit(federation.run, job, timeout=480)
            _wait_for_round(out / "metrics.jsonl", 1, timeout=360)
            federation.kill_supernode("supernode-3")
            result = running.result(timeout=540)
    assert result.ok, result.status + "\n" + result.output[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    assert [r["num_clients"] for r in records[1:]] == [3, 2, 2]
    assert all(np.isfinite(r["eval_loss"]) for r in records)
    round_2 = records[2]
    assert round_2["num_sampled"] == 3 and len(round_2["rejected"]) == 1, round_2
    assert round_2["rejected"][0].startswith(f"node {ids[3]}:"), round_2["rejected"]
