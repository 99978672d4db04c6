"""Every error a client can meet, as Python exceptions with the agent's message."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest

import skykit_agent
from skykit_agent import (
    AgentUnreachable,
    Attempt,
    Client,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    SkykitAgentError,
    SocketPermissionDenied,
)
from skykit_agent._proto.skykit.agent.v1 import agent_pb2_grpc

NOBODY = 65534


def test_missing_socket(tmp_dir):
    path = str(tmp_dir / "missing.sock")
    with pytest.raises(AgentUnreachable) as caught:
        Client(path).get_token()
    error = caught.value
    assert isinstance(error, SkykitAgentError)
    assert not isinstance(error, PermissionDenied)
    assert error.attempts == [Attempt(path, "socket argument", "does not exist")]
    assert str(error).startswith(
        f"cannot reach skykit-agent; tried:\n  {path} (socket argument): does not exist\n"
    )


def test_missing_socket_named_by_the_environment(tmp_dir, monkeypatch):
    path = str(tmp_dir / "missing.sock")
    monkeypatch.setenv("SKYKIT_AGENT_SOCKET", path)
    with pytest.raises(AgentUnreachable) as caught:
        Client().get_token()
    assert caught.value.attempts == [Attempt(path, "$SKYKIT_AGENT_SOCKET", "does not exist")]


def test_stale_socket_file(tmp_dir):
    """A socket file left by an agent that stopped: connection refused."""
    path = str(tmp_dir / "stale.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # not unlinked
    assert os.path.exists(path)
    with pytest.raises(AgentUnreachable) as caught:
        Client(path).get_token()
    reason = "nothing is listening (a socket file left by an agent that stopped)"
    assert caught.value.attempts == [Attempt(path, "socket argument", reason)]
    assert f"\n  {path} (socket argument): {reason}\n" in str(caught.value)


def test_stale_socket_found_by_discovery_is_reported(tmp_dir, monkeypatch):
    (tmp_dir / "skykit-agent").mkdir()
    path = str(tmp_dir / "skykit-agent" / "agent.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    monkeypatch.delenv("SKYKIT_AGENT_SOCKET", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_dir))
    with pytest.raises(AgentUnreachable) as caught:
        Client().get_token()
    # The first existing path is the one used; it is not skipped.
    assert [(a.path, a.named_by) for a in caught.value.attempts] == [(path, "$XDG_RUNTIME_DIR")]
    assert caught.value.attempts[0].reason.startswith("nothing is listening")


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"lifetime": 3601}, ["3601s", "3600s"]),
        ({"lifetime": 59}, ["59s", "60s"]),
        ({"lifetime": 600, "min_valid_for": 601}, ["min_valid_for", "601s", "600s"]),
    ],
    ids=["lifetime 3601", "lifetime 59", "min_valid_for > lifetime"],
)
def test_invalid_argument(agent, kwargs, words):
    with pytest.raises(InvalidArgument) as caught:
        Client(agent.socket).get_token(**kwargs)
    error = caught.value
    assert isinstance(error, SkykitAgentError)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    for word in words:
        assert word in str(error)
    assert str(error) == error.details


def test_not_found(agent):
    with pytest.raises(NotFound) as caught:
        Client(agent.socket).get_token(identity="nope")
    error = caught.value
    assert isinstance(error, SkykitAgentError)
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert str(error).startswith('unknown identity "nope"')


def test_errors_are_not_cached(agent):
    client = Client(agent.socket)
    for _ in range(2):
        with pytest.raises(NotFound):
            client.get_token(identity="nope")


# -- a socket this uid may not open --------------------------------------

CLIENT_SCRIPT = r"""
import json, os, sys
import skykit_agent
try:
    token = skykit_agent.Client(sys.argv[1]).get_token()
    print(json.dumps({"ok": True}))
except skykit_agent.SkykitAgentError as error:
    print(json.dumps({
        "uid": os.getuid(),
        "types": [t.__name__ for t in type(error).__mro__],
        "message": str(error),
        "attempts": [[a.path, a.named_by, a.reason] for a in getattr(error, "attempts", [])],
    }))
"""


def test_socket_the_client_may_not_open(agent):
    """The agent's socket is mode 0600 and owned by root: a client running as
    another uid (nobody, via setpriv) is told it may not open it."""
    if os.geteuid() != 0:
        pytest.fail("this test runs as root (as CI does) to switch to uid 65534 with setpriv")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.fail("setpriv (util-linux) is required for this test but not installed")
    mode = os.stat(agent.socket).st_mode & 0o777
    assert mode == 0o600, oct(mode)
    # The dirs down to the socket are traversable by nobody.
    for parent in Path(agent.socket).parents:
        assert os.stat(parent).st_mode & 0o001, f"{parent} is not traversable by others"
    result = subprocess.run(
        [
            setpriv,
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            sys.executable,
            "-c",
            CLIENT_SCRIPT,
            str(agent.socket),
        ],
        capture_output=True,
        text=True,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(agent.dir), "PYTHONDONTWRITEBYTECODE": "1"},
        timeout=60,
    )
    assert result.returncode == 0, (
        f"the client script failed as uid {NOBODY} (are the venv and clients/python "
        f"readable by others?):\n{result.stderr}"
    )
    report = json.loads(result.stdout)
    assert report["uid"] == NOBODY
    assert {"SocketPermissionDenied", "AgentUnreachable", "PermissionDenied", "SkykitAgentError"} <= set(
        report["types"]
    )
    reason = f"permission denied for uid {NOBODY}: ask the agent's operator for access to the socket"
    assert report["attempts"] == [[str(agent.socket), "socket argument", reason]]
    assert f"\n  {agent.socket} (socket argument): {reason}\n" in report["message"]


# -- status codes the real agent cannot be made to send here ---------------


class Refusing(agent_pb2_grpc.TokenServiceServicer):
    def __init__(self, code, details):
        self.code, self.details = code, details

    def GetToken(self, request, context):
        context.abort(self.code, self.details)


@pytest.fixture
def refusing_server(tmp_dir):
    servers = []

    def serve(code, details):
        path = tmp_dir / f"fake-{len(servers)}.sock"
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        agent_pb2_grpc.add_TokenServiceServicer_to_server(Refusing(code, details), server)
        server.add_insecure_port(f"unix:{path}")
        server.start()
        servers.append(server)
        return path

    yield serve
    for server in servers:
        server.stop(None)


def test_permission_denied_from_the_agent(refusing_server):
    """PERMISSION_DENIED (sent once the agent has access control) maps to
    PermissionDenied with the agent's message; checked against a stand-in
    server speaking the same proto."""
    message = "uid 1000 may not get tokens of identity \"ci\""
    path = refusing_server(grpc.StatusCode.PERMISSION_DENIED, message)
    with pytest.raises(PermissionDenied) as caught:
        Client(path).get_token(identity="ci")
    assert not isinstance(caught.value, AgentUnreachable)
    assert str(caught.value) == message
    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED


def test_unavailable_from_the_agent_is_not_unreachable(refusing_server):
    """UNAVAILABLE sent by a reachable agent (it could not sign) is a
    SkykitAgentError with its message, not AgentUnreachable."""
    path = refusing_server(grpc.StatusCode.UNAVAILABLE, "signing failed: the key is gone")
    with pytest.raises(SkykitAgentError) as caught:
        Client(path).get_token()
    assert type(caught.value) is SkykitAgentError
    assert "signing failed: the key is gone" in str(caught.value)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


def test_other_codes_are_the_base_error(refusing_server):
    path = refusing_server(grpc.StatusCode.INTERNAL, "boom")
    with pytest.raises(SkykitAgentError) as caught:
        Client(path).get_token()
    assert type(caught.value) is SkykitAgentError
    assert "boom" in str(caught.value)


def test_exception_hierarchy():
    for kind in (AgentUnreachable, InvalidArgument, NotFound, PermissionDenied):
        assert issubclass(kind, SkykitAgentError)
    assert issubclass(SocketPermissionDenied, AgentUnreachable)
    assert issubclass(SocketPermissionDenied, PermissionDenied)
    assert skykit_agent.SkykitAgentError is SkykitAgentError
