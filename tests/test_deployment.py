"""A real deployment on 127.0.0.1: SuperLink + 3 SuperNodes over gRPC with TLS, SuperNode authentication and
SuperExec secrets, every app served by fedlora's persistent runners.

One module federation (the command lines ``docker-compose.yml`` and the docs are rendered
from; site 1 started with ``fedlora site``, sites 2 and 3 as SuperNode + runner) serves the
tests in file order: the job that must equal its simulation, a foreign app refused by the
ServerApp runner and then by every site's runner, runners without the secret refused, a
malicious site bounded, a locked run directory refused, a site runner SIGKILLed mid-round
that rejoins with its privacy budget, and a whole SuperNode killed mid-run. Runs are judged
by ``flwr ls`` and their run directories, never by ``flwr run``'s exit code.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from opacus.accountants import RDPAccountant
from safetensors.numpy import load_file

from fedlora.deployment.commands import FLWR_VERSION, LOOPBACK, health_check, node_key_name
from fedlora.deployment.compose import rendered_files
from fedlora.deployment.loopback import LoopbackFederation
from fedlora.runtime.app_identity import installed_app
from fedlora.runtime.launch import PROJECT_DIR, LaunchResult, free_port, run_simulation
from fedlora.runtime.runner import RuntimeLink

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
        """Site 1 is one ``fedlora site`` process; the others' runners have logs of their own."""
        return self.federation.log("supernode-1" if site == 1 else f"supernode-{site}-runner")


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
            node_config = {"partition-id": site - 1, "num-partitions": len(SITES), "state-dir": str(work / f"state-{site}")}
            if site == 1:
                federation.start_site("supernode-1", node_config, key_index=1)
            else:
                federation.start_supernode(f"supernode-{site}", node_config, key_index=site)
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
    assert ["fedlora", "serverapp-runner"] in runners and ["fedlora", "site"] in runners
    assert runners.count(["fedlora", "clientapp-runner"]) == len(SITES) - 1
    assert all("--superexec-auth-secret-file" in cmd for cmd in outcome.argv
               if cmd[0] in ("flower-superlink", "fedlora") or (cmd[0] == "flower-supernode" and "--insecure" not in cmd))


REFUSAL = "refused app 'foreign-app' 9.9.9 (publisher 'mallory'"


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


def test_the_runtime_apis_refuse_a_runner_without_the_secret(outcome, deployment):
    """AcquireTask — how a runner gets a task's token — is refused without the secret, at the SuperLink and at a site."""
    federation = deployment.federation
    superlink = f"{LOOPBACK}:{federation.http_port}"
    site = f"{LOOPBACK}:{federation.node_ports['supernode-2']}"
    ca = Path(federation.credentials.ca_cert).read_bytes()
    for address, root, secret_file in ((superlink, ca, federation.credentials.superlink_secret),
                                       (site, None, federation.node_credentials["supernode-2"].secret)):
        for secret in (None, b"0" * 64):
            client = RuntimeLink(address, root, secret).client("attacker")
            with pytest.raises(Exception):
                client.AcquireTask(AcquireTaskRequest(supported_task_types=["flwr-serverapp", "flwr-clientapp"],
                                                      agentapp_fab_hashes=[]))
            client.close()
        honest = RuntimeLink(address, root, Path(secret_file).read_bytes()).client("honest")
        answer = honest.AcquireTask(AcquireTaskRequest(supported_task_types=["flwr-clientapp"], agentapp_fab_hashes=[]))
        assert not answer.token, "with the secret the call is accepted (no task is pending)"
        honest.close()


def test_a_runner_without_the_secret_cannot_take_the_serverapp(outcome, deployment):
    """With only Flower's SuperExec and no secret beside the SuperLink, a submitted run stays pending; the
    legitimate runner then serves it."""
    federation, out = deployment.federation, deployment.work / "rogue"
    assert federation.stop("serverapp-runner") == 0
    federation.start_server_runner("flower", with_secret=False, name="rogue-runner")
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            running = pool.submit(federation.run, {**JOB, "num-server-rounds": 1, "output-dir": str(out)}, 300)
            _wait_for(lambda: any(r["status"] == "pending" for r in federation.runs()), 60, "the run pending")
            time.sleep(15)
            assert [r["status"] for r in federation.runs()][-1] == "pending", "nobody took the ServerApp"
            assert not out.exists(), "no ServerApp ran"
            federation.start_server_runner("fedlora")
            result = running.result(timeout=360)
    finally:
        federation.stop("rogue-runner")
    assert result.ok, result.status + result.output[-2000:]


def test_the_malicious_site_is_bounded_across_the_deployment(outcome, deployment):
    """Site 3 reports 10**12 examples and uploads 9.5 everywhere: its weight is capped, its update scaled, both
    recorded in ``clipped``; the global change stays within a few honest updates (without bounds: hundreds)."""
    federation = deployment.federation
    job = {**JOB, "num-server-rounds": 1}
    honest = federation.run({**job, "output-dir": str(deployment.work / "honest-round")}, timeout=300)
    assert federation.stop("supernode-3-runner") == 0
    secret = federation.node_credentials["supernode-3"].secret
    federation.spawn("supernode-3-runner", [sys.executable, str(Path(__file__).parent / "malicious_site.py"),
                                            "--runtime-api-address", f"{LOOPBACK}:{federation.node_ports['supernode-3']}",
                                            "--superexec-auth-secret-file", secret])
    try:
        attacked = federation.run({**job, "output-dir": str(deployment.work / "attacked-round")}, timeout=300)
    finally:
        federation.stop("supernode-3-runner")
        federation.start_site_runner("supernode-3")
    assert honest.ok and attacked.ok, attacked.status + attacked.output[-2000:]
    record = records_of(attacked.run_dir)[1]
    assert record["num_clients"] == len(SITES) and "rejected" not in record
    node = deployment.node_ids[3]
    assert any(n.startswith(f"node {node} ") and "capped at 0.5 (validation.max-share = 0.5)" in n for n in record["clipped"])
    assert any(n.startswith(f"node {node} ") and "scaled down to validation.max-norm-ratio = 5×" in n
               for n in record["clipped"]), record["clipped"]

    initial = initial_adapter()

    def change(run_dir: Path) -> float:
        final = load_file(str(run_dir / ADAPTER))
        assert final.keys() == initial.keys()
        return float(np.sqrt(sum(np.sum((final[k].astype(np.float64) - initial[k]) ** 2) for k in final)))

    assert change(attacked.run_dir) <= 5 * change(honest.run_dir), (change(attacked.run_dir), change(honest.run_dir))


def initial_adapter() -> dict[str, np.ndarray]:
    """The global adapter every run of JOB starts from (the server model as injected), as its final_adapter names it."""
    from fedlora.adapters.lora import adapter_state
    from fedlora.run_config import full_defaults, load_config
    from fedlora.task import server_model

    return adapter_state(server_model(load_config({**full_defaults(), **JOB}), "cpu"))


def test_a_second_serverapp_for_a_locked_run_directory_is_refused(outcome, deployment):
    """While an old ServerApp still holds the run directory (here: a process holding its lock), a resume there
    fails naming the owner; once that owner is gone, the resume continues the run."""
    federation, run_dir = deployment.federation, outcome.output_dir
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
                               "from fedlora.server.lock import run_directory_lock\n"
                               f"with run_directory_lock(Path({str(run_dir)!r}), 4242):\n"
                               "    print('locked', flush=True); time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        resume = {**JOB, "num-server-rounds": 4, "resume-from": str(run_dir)}
        refused = federation.run(resume, timeout=300)
        assert refused.status == "finished:failed"
        assert f"in use by the ServerApp of run 4242 (pid {holder.pid} on {socket.gethostname()}" in refused.details
    finally:
        holder.kill()
        holder.wait()
    resumed = federation.run(resume, timeout=300)
    assert resumed.ok, resumed.status + resumed.details
    assert [r["round"] for r in records_of(run_dir)] == [0, 1, 2, 3, 4]


def test_the_healthcheck_command_probes_the_superlink(outcome, deployment):
    env = deployment.federation.env  # the project's python first on PATH, as in the containers
    probe = subprocess.run(health_check(deployment.federation.superlink_health), env=env, timeout=60,
                           capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr[-2000:]
    closed = subprocess.run(health_check(f"{LOOPBACK}:{free_port()}"), env=env, timeout=60, capture_output=True, text=True)
    assert closed.returncode != 0 and "grpc" in closed.stderr.lower(), closed.stderr[-500:]


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


def test_a_site_runner_killed_mid_round_rejoins_with_its_privacy_budget(outcome, deployment):
    """Site 3's runner is SIGKILLed while it trains round 2 and restarted at once: round 2 completes with the
    other sites when its task's heartbeat expires; round 3 has all three, and site 3's ε continues from its disk."""
    federation, out = deployment.federation, deployment.work / "runner-killed"
    job = {**JOB, "local-steps": 80, "round-timeout": 180.0, "dp.mode": "sample", "dp.noise-multiplier": 1.0,
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


def test_a_site_stops_cleanly_on_sigterm(deployment):
    """``fedlora site``: SIGTERM stops its runner (exit 0) and, with it, its SuperNode."""
    federation = deployment.federation
    assert federation.stop("supernode-1") == 0
    assert "runner stopped (SIGTERM)" in deployment.runner_log(1)
    _wait_for(lambda: deployment.node_ids[1] not in federation.online_nodes(), 120, "site 1's SuperNode offline")


def test_compose_files_are_rendered_from_the_tested_commands():
    for name, text in rendered_files(2).items():
        on_disk = (PROJECT_DIR / name).read_text()
        assert on_disk == text, f"{name} is stale: run `python -m fedlora.deployment.compose`"
        assert yaml.safe_load(on_disk)["services"]
    assert f'flwr[simulation]=={FLWR_VERSION}"' in (PROJECT_DIR / "pyproject.toml").read_text()
    assert f"FLWR_VERSION={FLWR_VERSION}" in (PROJECT_DIR / "deploy" / "Dockerfile").read_text()


def test_documented_commands_are_the_tested_ones_and_keep_the_control_api_on_loopback():
    from fedlora.deployment import docs

    assert docs.main(["--check"]) == 0, "run: python -m fedlora.deployment.docs"
    commands = []
    for name in docs.FILES:
        for block in re.findall(r"```bash\n(.*?)```", (PROJECT_DIR / name).read_text(), re.DOTALL):
            commands += [c for c in block.replace("\\\n", " ").splitlines() if "flower-superlink" in c]
    assert commands, "the docs show how to start a SuperLink"
    for command in commands:
        assert "--host 127.0.0.1" in command and "--host 0.0.0.0" not in command, command


def _mounts(service: dict) -> dict[str, str]:
    """Container path -> source of every volume of a service."""
    return {spec.split(":")[1]: spec.split(":")[0] for spec in service.get("volumes", [])}


def test_compose_keeps_its_promises():
    """Parsed like docker compose would: exposure, secrets, state volumes, healthchecks, start order, one build."""
    document = yaml.safe_load((PROJECT_DIR / "docker-compose.yml").read_text())
    services, volumes = document["services"], document["volumes"]
    sites = sorted(int(n.rsplit("-", 1)[1]) for n in services if n.startswith("supernode-"))
    assert sites == [1, 2]
    published = [port for service in services.values() for port in service.get("ports", [])]
    assert published == ["127.0.0.1:8000:8000", "9092:9092"], "only the Fleet API faces the sites"
    assert [n for n, s in services.items() if "build" in s] == ["serverapp-runner"], "the app image is built once"
    assert all(s.get("pull_policy") == "never" for s in services.values() if s["image"].startswith("fedlora-app") and "build" not in s)
    secret = "/app/certificates/superlink.secret"
    holders = {n for n, s in services.items() if secret in _mounts(s)}
    assert holders == {"superlink", "serverapp-runner"}
    assert all(spec.endswith(":ro") for s in services.values() for spec in s.get("volumes", []) if "/certificates/" in spec)
    for flag_holder in ("superlink", "serverapp-runner"):
        assert secret in services[flag_holder]["command"]
    assert _mounts(services["superlink"])["/app/state"] in volumes, "the SuperLink database lives on a named volume"
    for i in sites:
        node, runner = services[f"supernode-{i}"], services[f"clientapp-runner-{i}"]
        site_secret = f"/app/certificates/supernode-{i}.secret"
        assert {n for n, s in services.items() if site_secret in _mounts(s)} == {f"supernode-{i}", f"clientapp-runner-{i}"}
        assert site_secret in node["command"] and site_secret in runner["command"]
        config = node["command"][node["command"].index("--node-config") + 1]
        state_dir = re.search(r'state-dir="([^"]+)"', config).group(1)
        assert _mounts(runner)[state_dir] in volumes, f"site {i}'s state-dir is a named volume of its runner"
        assert node["depends_on"] == {"register-sites": {"condition": "service_completed_successfully"}}
        assert runner["depends_on"] == {f"supernode-{i}": {"condition": "service_healthy"}}
        assert runner["network_mode"] == f"service:supernode-{i}"
    registration = services["register-sites"]
    assert registration["command"][0] == "register-sites" and registration["restart"] == "no"
    assert registration["depends_on"] == {"superlink": {"condition": "service_healthy"}}
    assert all(f"/app/certificates/supernode-{i}.pub" in registration["command"] for i in sites)
    long_running = [n for n in services if n != "register-sites"]
    assert all(services[n]["healthcheck"]["test"][0] == "CMD" for n in long_running)


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
