"""The persistent runners' pieces without a network: the app check, a message served or refused, eviction."""

from __future__ import annotations

import io
import tomllib
import zipfile

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.cli.build import build_fab_from_disk
from flwr.common.constant import ErrorCode, SubStatus
from flwr.supercore.fab import Fab
from flwr.supercore.task_identity import TaskIdentity

import fedlora.runtime.runner as runner_module
from fedlora.adapters.lora import cached_lora_model
from fedlora.adapters.transport import to_record
from fedlora.protocol import ARRAYS, CONFIG, RUN_KEY, SERVER_ROUND
from fedlora.run_config import full_defaults, load_config
from fedlora.runtime.app_identity import COMPONENTS, ForeignApp, check_app, installed_app
from fedlora.runtime.clientapp_runner import ClientAppRunner
from fedlora.runtime.launch import PROJECT_DIR
from fedlora.runtime.runner import Resident, RuntimeLink
from fedlora.task import adapted_model


@pytest.fixture(scope="module")
def own_fab() -> bytes:
    return build_fab_from_disk(PROJECT_DIR)


def rebuilt(fab: bytes, change=None, add: dict[str, bytes] | None = None) -> bytes:
    """``fab`` with ``change(name, data) -> data`` applied to every file and ``add`` files added."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(fab)) as source, zipfile.ZipFile(out, "w") as target:
        for name in source.namelist():
            data = source.read(name)
            target.writestr(name, change(name, data) if change else data)
        for name, data in (add or {}).items():
            target.writestr(name, data)
    return out.getvalue()


def test_the_bundle_flwr_builds_from_this_project_is_the_installed_app(own_fab):
    check_app(own_fab)
    project = tomllib.loads((PROJECT_DIR / "pyproject.toml").read_text())
    assert project["tool"]["flwr"]["app"]["components"] == COMPONENTS
    with zipfile.ZipFile(io.BytesIO(own_fab)) as bundle:
        assert sorted(n for n in bundle.namelist() if n.endswith(".py")) == sorted(installed_app().sources)


@pytest.mark.parametrize("change, add, fragment", [
    (lambda n, d: d + b"\nimport os\n" if n == "fedlora/client/app.py" else d, None,
     "differ from the installed ones: ['fedlora/client/app.py']"),
    (None, {"fedlora/evil.py": b"print('hi')\n"}, "the installed package lacks: ['fedlora/evil.py']"),
    (None, {"elsewhere.py": b"x = 1\n"}, "lacks: ['elsewhere.py']"),
    (lambda n, d: d.replace(b'version = "0.1.0"', b'version = "0.2.0"') if n == "pyproject.toml" else d, None,
     "version '0.2.0' is not '0.1.0'"),
    (lambda n, d: d.replace(b'"fedlora.client.app:app"', b'"evil.client:app"') if n == "pyproject.toml" else d, None,
     "components"),
    (lambda n, d: d.replace(b'name = "fedlora"', b'name = "other-app"') if n == "pyproject.toml" else d, None,
     "name 'other-app' is not 'fedlora'"),
])
def test_any_other_app_is_refused_with_what_differs(own_fab, change, add, fragment):
    with pytest.raises(ForeignApp) as err:
        check_app(rebuilt(own_fab, change, add))
    assert fragment in str(err.value) and f"installed fedlora {installed_app().version}" in str(err.value)


def test_changed_run_config_defaults_are_refused(own_fab):
    def change(name, data):
        return data.replace(b'mode = "none"', b'mode = "user"') if name == "pyproject.toml" else data

    assert b'mode = "none"' in zipfile.ZipFile(io.BytesIO(own_fab)).read("pyproject.toml")
    with pytest.raises(ForeignApp, match=r"run-config defaults differ in \['dp.mode'\]"):
        check_app(rebuilt(own_fab, change))


def test_a_bundle_that_is_not_an_app_is_refused():
    with pytest.raises(ForeignApp, match="unreadable app bundle"):
        check_app(b"not a zip at all")


# ----- one message through the ClientApp runner --------------------------------------------------
def _message(config: dict) -> tuple[Message, Context]:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 5, 1, 5
    flat = {**full_defaults(), **config}
    model = adapted_model(load_config(flat), "cpu")
    content = RecordDict({ARRAYS: to_record(model.initial_state),
                          CONFIG: ConfigRecord({SERVER_ROUND: 1, RUN_KEY: "runner-unit-test"})})
    message = Message(content=content, message_type=MessageType.TRAIN, dst_node_id=1)
    message.metadata.__dict__["_message_id"] = "m1"
    context = Context(run_id=5, node_id=1, state=RecordDict(), run_config=flat,
                      node_config={"partition-id": 0, "num-partitions": 2})
    return message, context


TINY = {"model.name": "tiny-bert", "local-steps": 1, "batch-size": 4, "dataset.max-length": 16, "lora.rank": 2}


def test_the_runner_answers_with_the_installed_clientapp(own_fab):
    runner = ClientAppRunner(RuntimeLink("127.0.0.1:1", None, None))
    message, context = _message(TINY)
    reply, status, details = runner.answer(message, context, Fab("own", own_fab, {}))
    assert status == SubStatus.COMPLETED and details == "" and not reply.has_error()
    assert reply.content["metrics"]["num-examples"] > 0


def test_a_foreign_bundle_gets_an_error_reply_naming_it(own_fab):
    runner = ClientAppRunner(RuntimeLink("127.0.0.1:1", None, None))
    message, context = _message(TINY)
    foreign = rebuilt(own_fab, add={"fedlora/evil.py": b"import os\n"})
    reply, status, details = runner.answer(message, context, Fab("foreign", foreign, {}))
    assert status == SubStatus.FAILED and reply.has_error() and reply.error.code == ErrorCode.INVALID_FAB
    assert "refused app 'fedlora'" in reply.error.reason and reply.error.reason == details


def test_a_message_the_clientapp_raises_on_gets_an_error_reply(own_fab):
    runner = ClientAppRunner(RuntimeLink("127.0.0.1:1", None, None))
    message, context = _message(TINY)
    context.node_config = {"data-path": "/no/such/site.jsonl"}
    reply, status, _ = runner.answer(message, context, Fab("own", own_fab, {}))
    assert status == SubStatus.FAILED and reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "no such file" in reply.error.reason


def test_a_run_with_another_config_evicts_the_resident_models(monkeypatch):
    cleared = []
    monkeypatch.setattr(runner_module, "clear_process_caches", lambda: cleared.append(True))
    resident = Resident("test")
    base = {**full_defaults(), "model.name": "tiny-bert"}
    resident.serve(base)
    resident.serve({**base, "num-server-rounds": 99, "output-dir": "/elsewhere"})
    assert cleared == [], "the same models: nothing evicted"
    resident.serve({**base, "lora.rank": 16})
    assert cleared == [True]


def test_clearing_the_process_caches_drops_the_adapted_models():
    from fedlora.process_cache import clear_process_caches

    adapted_model(load_config({**full_defaults(), **TINY}), "cpu")
    assert cached_lora_model.cache_info().currsize >= 1
    clear_process_caches()
    assert cached_lora_model.cache_info().currsize == 0
