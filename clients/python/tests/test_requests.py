"""SkykitAuth: requests with `Authorization: Bearer <token>` from the agent,
against a local HTTP server that checks the token as Skykit API would."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

import skykit_agent.requests as skykit_requests
from skykit_agent import Client, NotFound
from skykit_agent.requests import SkykitAuth

from conftest import verify_token


@pytest.fixture(autouse=True)
def no_proxies(monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")


@pytest.fixture
def api(agent):
    """A stand-in for Skykit API on 127.0.0.1: 200 with the token's claims
    only for a Bearer token signed by the agent's key with valid claims;
    401 otherwise."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            header = self.headers.get("Authorization", "")
            seen.append(header)
            status, body = 401, {"error": "missing or bad Authorization"}
            if header.startswith("Bearer "):
                token = header[len("Bearer "):]
                try:
                    claims = verify_token(token, agent.public_pem, lifetime=_lifetime(token))
                    status, body = 200, {"claims": claims, "path": self.path}
                except Exception as error:  # noqa: BLE001 - any failure is a 401
                    body = {"error": f"{type(error).__name__}: {error}"}
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address
    yield f"http://{host}:{port}/sk-api/v1/devices", seen
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def _lifetime(token: str) -> int:
    """exp - iat as the token claims it, bounded as Skykit API bounds it."""
    from conftest import b64decode

    claims = json.loads(b64decode(token.split(".")[1]))
    lifetime = claims["exp"] - claims["iat"]
    if not 0 < lifetime <= 3600:
        raise ValueError(f"lifetime {lifetime}s")
    return lifetime


def test_the_server_refuses_requests_without_a_valid_token(api):
    url, _ = api
    assert requests.get(url, timeout=10).status_code == 401
    assert requests.get(url, headers={"Authorization": "Bearer x.y.z"}, timeout=10).status_code == 401


def test_requests_get_with_skykit_auth(agent, api, monkeypatch):
    """The one-line replacement of the vendor's make_headers(): socket found
    by discovery ($SKYKIT_AGENT_SOCKET here), one shared client."""
    monkeypatch.setenv("SKYKIT_AGENT_SOCKET", str(agent.socket))
    monkeypatch.setattr(skykit_requests, "_default_client", None)
    url, seen = api
    response = requests.get(url, auth=SkykitAuth(), timeout=10)
    response.raise_for_status()
    assert response.status_code == 200
    claims = response.json()["claims"]
    assert claims["exp"] - claims["iat"] == 3600
    assert seen[-1].startswith("Bearer ey")
    # A second request reuses the cached token of the shared client.
    assert requests.get(url, auth=SkykitAuth(), timeout=10).status_code == 200
    assert seen[-1] == seen[-2]


def test_skykit_auth_with_a_client_and_get_token_arguments(agent, api):
    url, seen = api
    client = Client(agent.socket)
    auth = SkykitAuth(client, lifetime=600, min_valid_for=60)
    response = requests.get(url, auth=auth, timeout=10)
    assert response.status_code == 200, response.text
    claims = response.json()["claims"]
    assert claims["exp"] - claims["iat"] == 600
    assert seen[-1] == "Bearer " + client.get_token(lifetime=600).token


def test_skykit_auth_in_a_session(agent, api):
    url, _ = api
    with requests.Session() as session:
        session.auth = SkykitAuth(Client(agent.socket))
        for _ in range(3):
            assert session.get(url, timeout=10).status_code == 200


def test_skykit_auth_raises_the_clients_errors(agent, api):
    url, seen = api
    before = len(seen)
    with pytest.raises(NotFound):
        requests.get(url, auth=SkykitAuth(Client(agent.socket), identity="nope"), timeout=10)
    assert len(seen) == before  # nothing was sent


def test_skykit_auth_refuses_unknown_arguments():
    with pytest.raises(TypeError):
        SkykitAuth(lifetme=600)


def test_skykit_auth_with_watch_uses_a_shared_watching_client(agent, api, monkeypatch):
    monkeypatch.setenv("SKYKIT_AGENT_SOCKET", str(agent.socket))
    monkeypatch.setattr(skykit_requests, "_watching_client", None)
    url, seen = api
    auth = SkykitAuth(watch=True, lifetime=1000)
    try:
        for _ in range(3):
            assert requests.get(url, auth=auth, timeout=10).status_code == 200
        assert seen[-1] == seen[-2] == seen[-3]
        shared = skykit_requests._watching_client
        assert shared is not None and shared is not skykit_requests._default_client
        assert "watch=True" in repr(shared) and "watch=True" in repr(auth)
        agent.wait_for_watchers(1)
    finally:
        if skykit_requests._watching_client is not None:
            skykit_requests._watching_client.close()
    agent.wait_for_watchers(0)
    with pytest.raises(TypeError, match="watch=True"):
        SkykitAuth(Client(agent.socket), watch=True)
