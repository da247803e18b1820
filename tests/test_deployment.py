"""A real deployment on 127.0.0.1: SuperLink + 3 SuperNodes over gRPC with TLS and SuperNode authentication,
every app served by fedlora's persistent runners.

One module federation (the command lines ``docker-compose.yml`` is rendered from) serves the
tests in file order: the job that must equal its simulation, a foreign app refused by the
ServerApp runner and then by every site's runner, a site runner SIGKILLed mid-round that
rejoins with its privacy budget, and a whole SuperNode killed mid-run. Runs are judged by
``flwr ls`` and their run directories, never by ``flwr run``'s exit code.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from opacus.accountants import RDPAccountant
from safetensors.numpy import load_file

from fedlora.deployment.commands import FLWR_VERSION, LOOPBACK, node_key_name
from fedlora.deployment.compose import rendered_files
from fedlora.deployment.loopback import LoopbackFederation
from fedlora.runtime.app_identity import installed_app
from fedlora.runtime.launch import PROJECT_DIR, LaunchResult, run_simulation

MAKE_CERTS = PROJECT_DIR / "deploy" / "make_certs.sh"
FOREIGN_APP = Path(__file__).parent / "foreign_app"
JOB = {"model.name": "tiny-bert", "num-server-rounds": 3, "local-steps": 3, "batch-size": 8, "dataset.max-length": 32}
ADAPTER = Path("final_adapter") / "adapter_model.safetensors"
SITES = (1, 2, 3)


@dataclass
class Deployment:
    federation: LoopbackFederation
    node_ids: dict[int, str]
    work: Path

    def runner_log(self, site: int) -> str:
        return self.federation.log(f"supernode-{site}-runner")


@pytest.fixture(scope="module")
def credentials(tmp_path_factory) -> Path:
    """CA, server certificate and four SuperNode key pairs from ``deploy/make_certs.sh``."""
    certs = tmp_path_factory.mktemp("credentials") / "certs"
    subprocess.run([str(MAKE_CERTS), "--out", str(certs), "--nodes", "4"], check=True, timeout=120, capture_output=True)
    return certs


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, credentials):
    work = tmp_path_factory.mktemp("deployment")
    with LoopbackFederation(work / "loopback", credentials) as federation:
        node_ids = {site: federation.register(site) for site in SITES}
        for site in SITES:
            federation.start_supernode(f"supernode-{site}", {"partition-id": site - 1, "num-partitions": len(SITES),
                                                            "state-dir": str(work / f"state-{site}")}, key_index=site)
        federation.wait_online(set(node_ids.values()))
        yield Deployment(federation, node_ids, work)


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
def outcome(deployment) -> Outcome:
    """The job deployed and simulated side by side; meanwhile an unregistered and an insecure SuperNode try to join."""
    federation, work = deployment.federation, deployment.work
    partition = {"partition-id": 0, "num-partitions": len(SITES)}
    with ThreadPoolExecutor(max_workers=1) as pool:
        simulation = pool.submit(run_simulation, {**JOB, "output-dir": str(work / "simulated")}, num_supernodes=len(SITES),
                                 echo=False, timeout=480)
        unregistered = federation.start_supernode("supernode-unregistered", partition, key_index=4, max_retries=1,
                                                  with_runner=False)
        insecure = federation.start_supernode("supernode-insecure", partition, key_index=None, secure=False,
                                              max_retries=2, with_runner=False)
        deployed = federation.run({**JOB, "output-dir": str(work / "deployed")}, timeout=420)
        refused = {name: Refused(p.exit_code(60), p.output()) for name, p in
                   (("unregistered", unregistered), ("insecure", insecure))}
        simulated = simulation.result(timeout=600)
    return Outcome(deployed, simulated, work / "deployed", refused["unregistered"], refused["insecure"],
                   federation.log("superlink"), [list(p.popen.args) for p in federation.processes])


def records_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_deployed_run_completes_with_every_site(outcome):
    assert outcome.deployed.ok, outcome.deployed.status + "\n" + outcome.deployed.output[-3000:]
    assert outcome.deployed.run_dir == outcome.output_dir
    records = records_of(outcome.output_dir)
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    assert all(r["num_clients"] == len(SITES) for r in records[1:])


def test_deployed_adapter_matches_simulation(outcome):
    assert outcome.simulated.ok, outcome.simulated.output[-3000:]
    deployed = load_file(str(outcome.output_dir / ADAPTER))
    simulated = load_file(str(outcome.simulated.run_dir / ADAPTER))
    assert sorted(deployed) == sorted(simulated)
    assert any("lora_B" in k and np.abs(v).sum() > 0 for k, v in deployed.items()), "the global adapter never trained"
    worst = max(float(np.abs(deployed[k] - simulated[k]).max()) for k in deployed)
    assert worst <= 1e-6, f"deployed and simulated final adapters differ by up to {worst:.3g}"


def test_each_site_loaded_the_base_model_once_for_the_run(outcome, deployment):
    run_id = outcome.deployed.run_id
    for site in SITES:
        log = deployment.runner_log(site)
        tasks = re.findall(rf"task (\d+) of run {run_id}: train message", log)
        loads = [int(n) for task in tasks for n in re.findall(rf"task {task} done \(completed\); base models loaded "
                                                             rf"for it: (\d+)", log)]
        assert len(tasks) == len(loads) == JOB["num-server-rounds"], (site, tasks, loads)
        assert sum(loads) == 1, f"site {site} loaded the base model {sum(loads)} times in one run"


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
    runners = [cmd[:2] for cmd in outcome.argv if cmd[0] == "fedlora"]
    assert ["fedlora", "serverapp-runner"] in runners and runners.count(["fedlora", "clientapp-runner"]) == len(SITES)


REFUSAL = "refused app 'foreign-app' 9.9.9 (publisher 'mallory'"


def test_foreign_app_is_refused_by_the_serverapp_runner(outcome, deployment):
    markers = deployment.work / "markers-server"
    result = deployment.federation.run({"marker-dir": str(markers)}, timeout=240, project_dir=FOREIGN_APP)
    assert result.status == "finished:failed", result.status
    expected = f"this runner serves only the installed fedlora {installed_app().version}"
    assert REFUSAL in result.details and expected in result.details, result.details
    assert REFUSAL in deployment.federation.log("serverapp-runner")
    assert not markers.exists() or not any(markers.iterdir()), "no code of the foreign app ran"


def test_foreign_app_is_refused_by_every_site_runner(outcome, deployment):
    """The SuperLink's side is the attacker's here (Flower's SuperExec runs the foreign ServerApp);
    every site must refuse its ClientApp and answer with the reason."""
    federation, markers = deployment.federation, deployment.work / "markers-sites"
    assert federation.stop("serverapp-runner") == 0, "SIGTERM stops the ServerApp runner cleanly"
    federation.start_server_runner("flower")
    try:
        result = federation.run({"marker-dir": str(markers)}, timeout=300, project_dir=FOREIGN_APP)
    finally:
        federation.stop("serverapp-runner")
        federation.start_server_runner("fedlora")
    assert result.status == "finished:failed", result.status + result.output[-2000:]
    replies = json.loads((markers / "replies.json").read_text())
    assert replies["replies"] == len(SITES) and len(replies["errors"]) == len(SITES), replies
    assert all(REFUSAL in reason for reason in replies["errors"]), replies["errors"]
    assert not list(markers.glob("site-ran-*")), "the foreign ClientApp never ran at a site"
    for site in SITES:
        assert REFUSAL in deployment.runner_log(site), f"site {site}'s operator sees the refusal"


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not seen after {timeout:.0f} s")
        time.sleep(0.1)


def _epsilon(entries: list[list[float]]) -> float:
    accountant = RDPAccountant()
    for sigma, q, steps in entries:
        for _ in range(int(steps)):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
    return accountant.get_epsilon(delta=1e-5)


def test_a_site_runner_killed_mid_round_rejoins_with_its_privacy_budget(outcome, deployment):
    """Site 3's runner is SIGKILLed while it trains round 2 and restarted at once: round 2 completes with the
    other sites when its task's heartbeat expires; round 3 has all three, and site 3's ε continues from its disk."""
    federation, out = deployment.federation, deployment.work / "runner-killed"
    job = {**JOB, "local-steps": 150, "round-timeout": 180.0, "dp.mode": "sample", "dp.noise-multiplier": 1.0,
           "output-dir": str(out)}  # rounds of a few seconds: long enough to die inside one
    seen = len(deployment.runner_log(3))
    with ThreadPoolExecutor(max_workers=1) as pool:
        running = pool.submit(federation.run, job, timeout=600)
        _wait_for(lambda: "message for round 2" in deployment.runner_log(3)[seen:], 300, "site 3 training round 2")
        federation.stop("supernode-3-runner", sig=signal.SIGKILL)
        federation.start_site_runner("supernode-3")
        result = running.result(timeout=660)
    assert result.ok, result.status + "\n" + result.output[-3000:]
    records = records_of(out)
    assert [r["num_clients"] for r in records[1:]] == [3, 2, 3], [r.get("rejected") for r in records]
    assert "done" not in deployment.runner_log(3)[seen:].split("message for round 2")[1].split("\n")[1], "killed mid-task"
    assert records[2]["rejected"][0].startswith(f"node {deployment.node_ids[3]}:"), records[2]["rejected"]
    runs = sorted((deployment.work / "state-3").glob("privacy-run-*-p2.json"), key=lambda p: p.stat().st_mtime)
    history = json.loads(runs[-1].read_text())["entries"]
    assert len(history) in (2, 3), "round 1 and round 3 are accounted (round 2 too if it was killed after accounting)"
    assert _epsilon(history) > _epsilon(history[:1]), "ε continued from the round-1 release on disk"
    assert records[3]["epsilon_max"] >= _epsilon(history) - 1e-9


def test_run_survives_a_supernode_killed_mid_run(outcome, deployment):
    """After round 1 SuperNode 3 and its runner are SIGKILLed; rounds 2 and 3 aggregate the other two.

    The dead node's round-2 message is answered by nobody: the round ends when the SuperLink
    marks it offline (~46-49 s) or at round-timeout = 60 s; from then on it is not sampled.
    """
    federation, out = deployment.federation, deployment.work / "node-killed"
    job = {**JOB, "round-timeout": 60.0, "min-clients": 1, "output-dir": str(out)}
    with ThreadPoolExecutor(max_workers=1) as pool:
        running = pool.submit(federation.run, job, timeout=480)
        _wait_for(lambda: (out / "metrics.jsonl").is_file() and len(records_of(out)) >= 2, 360, "round 1")
        federation.kill_supernode("supernode-3")
        result = running.result(timeout=540)
    assert result.ok, result.status + "\n" + result.output[-3000:]
    records = records_of(out)
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    assert [r["num_clients"] for r in records[1:]] == [3, 2, 2]
    assert all(np.isfinite(r["eval_loss"]) for r in records)
    assert records[2]["num_sampled"] == 3 and len(records[2]["rejected"]) == 1, records[2]
    assert records[2]["rejected"][0].startswith(f"node {deployment.node_ids[3]}:"), records[2]["rejected"]


def test_a_site_runner_stops_cleanly_on_sigterm(deployment):
    assert deployment.federation.stop("supernode-1-runner") == 0
    assert "runner stopped (SIGTERM)" in deployment.runner_log(1)


def test_compose_files_are_rendered_from_the_tested_commands():
    for name, text in rendered_files(2).items():
        on_disk = (PROJECT_DIR / name).read_text()
        assert on_disk == text, f"{name} is stale: run `python -m fedlora.deployment.compose`"
        assert yaml.safe_load(on_disk)["services"]
    services = yaml.safe_load(rendered_files(2)["docker-compose.yml"])["services"]
    assert set(services) == {"superlink", "serverapp-runner", "supernode-1", "clientapp-runner-1",
                             "supernode-2", "clientapp-runner-2"}
    assert services["superlink"]["image"] == f"flwr/superlink:{FLWR_VERSION}"
    assert services["supernode-1"]["image"] == f"flwr/supernode:{FLWR_VERSION}"
    assert services["clientapp-runner-1"]["command"][0] == "clientapp-runner"
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
