"""The socket discovery rule: the shared table, and the real thing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import skykit_agent
from skykit_agent import AgentUnreachable, Attempt, Candidate, Client, _discovery

from conftest import verify_token

TABLE = Path(__file__).resolve().parents[2] / "testdata" / "socket-discovery.json"


def load_cases():
    """The cases of the shared table, read from the file (a missing file is a
    collection error, so the run fails)."""
    if not TABLE.is_file():
        raise FileNotFoundError(f"the shared discovery table {TABLE} is missing")
    return json.loads(TABLE.read_text())["cases"]


def test_the_table_has_cases():
    assert len(load_cases()) >= 7


@pytest.mark.parametrize("case", load_cases(), ids=lambda case: case["name"])
def test_candidates_follow_the_shared_table(case):
    got = skykit_agent.candidates(case["argument"], case["env"])
    assert [c.path for c in got] == case["candidates"]


def test_candidates_name_what_named_them():
    env = {"SKYKIT_AGENT_SOCKET": "/env.sock", "XDG_RUNTIME_DIR": "/xdg"}
    assert skykit_agent.candidates("/arg.sock", env) == [Candidate("/arg.sock", "socket argument")]
    assert skykit_agent.candidates(Path("/arg.sock"), {}) == [Candidate("/arg.sock", "socket argument")]
    assert skykit_agent.candidates(None, env) == [Candidate("/env.sock", "$SKYKIT_AGENT_SOCKET")]
    assert skykit_agent.candidates(None, {"XDG_RUNTIME_DIR": "/xdg"}) == [
        Candidate("/xdg/skykit-agent/agent.sock", "$XDG_RUNTIME_DIR"),
        Candidate("/run/skykit-agent/agent.sock", "system default"),
    ]


def test_candidates_is_pure(tmp_dir):
    # Nothing exists at these paths; the list does not depend on the files.
    env = {"XDG_RUNTIME_DIR": str(tmp_dir / "missing")}
    assert [c.path for c in skykit_agent.candidates(None, env)] == [
        str(tmp_dir / "missing" / "skykit-agent" / "agent.sock"),
        "/run/skykit-agent/agent.sock",
    ]


def test_client_without_argument_finds_the_agent_under_xdg_runtime_dir(make_agent, tmp_dir, monkeypatch):
    (tmp_dir / "skykit-agent").mkdir()
    agent = make_agent(socket_path=tmp_dir / "skykit-agent" / "agent.sock")
    monkeypatch.delenv("SKYKIT_AGENT_SOCKET", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_dir))
    token = Client().get_token()
    verify_token(token.token, agent.public_pem)


def test_client_without_argument_uses_skykit_agent_socket(agent, tmp_dir, monkeypatch):
    monkeypatch.setenv("SKYKIT_AGENT_SOCKET", str(agent.socket))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_dir))  # would be missing
    verify_token(Client().get_token().token, agent.public_pem)


def test_argument_wins_over_the_environment(agent, tmp_dir, monkeypatch):
    monkeypatch.setenv("SKYKIT_AGENT_SOCKET", str(tmp_dir / "missing.sock"))
    verify_token(Client(socket=agent.socket).get_token().token, agent.public_pem)


def test_empty_env_counts_as_unset(make_agent, tmp_dir, monkeypatch):
    (tmp_dir / "skykit-agent").mkdir()
    agent = make_agent(socket_path=tmp_dir / "skykit-agent" / "agent.sock")
    monkeypatch.setenv("SKYKIT_AGENT_SOCKET", "")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_dir))
    verify_token(Client().get_token().token, agent.public_pem)


def test_no_agent_anywhere_lists_every_discovered_path(tmp_dir, monkeypatch):
    # The system path is pointed into the temp dir so the test does not
    # depend on whether this machine runs a system agent.
    system = str(tmp_dir / "run" / "agent.sock")
    monkeypatch.setattr(_discovery, "SYSTEM_SOCKET", system)
    monkeypatch.delenv("SKYKIT_AGENT_SOCKET", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_dir))
    with pytest.raises(AgentUnreachable) as caught:
        Client().get_token()
    xdg = str(tmp_dir / "skykit-agent" / "agent.sock")
    assert caught.value.attempts == [
        Attempt(xdg, "$XDG_RUNTIME_DIR", "does not exist"),
        Attempt(system, "system default", "does not exist"),
    ]
    assert str(caught.value).startswith(
        "cannot reach skykit-agent; tried:\n"
        f"  {xdg} ($XDG_RUNTIME_DIR): does not exist\n"
        f"  {system} (system default): does not exist\n"
    )


def test_the_first_existing_discovered_path_is_used(make_agent, tmp_dir, monkeypatch):
    # XDG path absent: the (redirected) system path is used.
    run = tmp_dir / "run"
    run.mkdir()
    agent = make_agent(socket_path=run / "agent.sock")
    monkeypatch.setattr(_discovery, "SYSTEM_SOCKET", str(run / "agent.sock"))
    monkeypatch.delenv("SKYKIT_AGENT_SOCKET", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_dir / "xdg"))
    verify_token(Client().get_token().token, agent.public_pem)
