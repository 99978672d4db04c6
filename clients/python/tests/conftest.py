"""Starts real skykit-agent processes for the tests.

The agent binary comes from $SKYKIT_AGENT_BIN (build it with `cargo build`,
then export SKYKIT_AGENT_BIN=$PWD/target/debug/skykit-agent); the tests fail,
never skip, when it is missing.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from skykit_agent._proto.skykit.agent.v1 import agent_pb2, agent_pb2_grpc

ISSUER = "test@example.com"
START_DEADLINE = 20.0


def agent_bin() -> str:
    path = os.environ.get("SKYKIT_AGENT_BIN", "")
    if not path:
        pytest.fail(
            "SKYKIT_AGENT_BIN is not set: build the agent (cargo build) and export "
            "SKYKIT_AGENT_BIN=/path/to/target/debug/skykit-agent",
            pytrace=False,
        )
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        pytest.fail(f"SKYKIT_AGENT_BIN={path} is not an executable file", pytrace=False)
    return path


def make_dir() -> Path:
    """A temp dir (under /tmp, short enough for a socket path), mode 0711 so
    that another uid can traverse it but not list it."""
    path = Path(tempfile.mkdtemp(prefix="skykit-py-"))
    path.chmod(0o711)
    return path


class Agent:
    """A running `skykit-agent serve` with a fresh key in its own dir."""

    def __init__(self, directory: Path, socket_path: Optional[Path] = None):
        self.bin = agent_bin()
        self.dir = directory
        self.socket = socket_path or directory / "agent.sock"
        subprocess.run(
            [self.bin, "keygen", "--out", str(directory)],
            check=True,
            stdout=subprocess.DEVNULL,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(directory)},
        )
        self.private_pem = (directory / "private.pem").read_bytes()
        self.public_pem = (directory / "public.pem").read_bytes()
        self.stderr_path = directory / "agent.stderr"
        self.process: Optional[subprocess.Popen] = None
        self.rotations = 0

    def start(self) -> "Agent":
        with open(self.stderr_path, "ab") as stderr:
            self.process = subprocess.Popen(
                [
                    self.bin,
                    "serve",
                    "--socket",
                    str(self.socket),
                    "--key",
                    str(self.dir / "private.pem"),
                    "--issuer",
                    ISSUER,
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.dir)},
            )
        deadline = time.monotonic() + START_DEADLINE
        while True:
            if self.process.poll() is not None:
                pytest.fail(
                    f"skykit-agent exited with {self.process.returncode} before listening:\n"
                    + self.stderr(),
                    pytrace=False,
                )
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(self.socket))
                return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(
                        f"skykit-agent did not listen on {self.socket} within {START_DEADLINE}s:\n"
                        + self.stderr(),
                        pytrace=False,
                    )
                time.sleep(0.02)
            finally:
                probe.close()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail("skykit-agent did not stop within 10 s of SIGTERM:\n" + self.stderr())

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def rotate(self, reload: bool = True) -> bytes:
        """Replaces the key file with a new key (atomically, mode 0600) and,
        with ``reload``, sends SIGHUP so that the agent signs with it.
        Returns the new public key (also in ``public_pem`` from now on)."""
        self.rotations += 1
        new = self.dir / f"key-{self.rotations}"
        new.mkdir()
        subprocess.run(
            [self.bin, "keygen", "--out", str(new)],
            check=True,
            stdout=subprocess.DEVNULL,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.dir)},
        )
        os.replace(new / "private.pem", self.dir / "private.pem")
        self.private_pem = (self.dir / "private.pem").read_bytes()
        self.public_pem = (new / "public.pem").read_bytes()
        if reload:
            assert self.process is not None and self.process.poll() is None
            self.process.send_signal(signal.SIGHUP)
        return self.public_pem

    def status(self):
        """The agent's GetStatus answer (AgentService; root or the agent's uid)."""
        channel = grpc.insecure_channel(
            "unix:" + str(self.socket), options=[("grpc.default_authority", "localhost")]
        )
        try:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            return stub.GetStatus(agent_pb2.GetStatusRequest(), timeout=10)
        finally:
            channel.close()

    def wait_for_watchers(self, count: int, deadline: float = 10.0) -> None:
        """Polls GetStatus until the agent counts ``count`` watchers."""
        end = time.monotonic() + deadline
        while True:
            watchers = self.status().watchers
            if watchers == count:
                return
            if time.monotonic() > end:
                pytest.fail(f"the agent counts {watchers} watchers, not {count}, after {deadline} s")
            time.sleep(0.02)


@pytest.fixture
def make_agent():
    """Starts agents on demand: make_agent() or make_agent(socket_path=...).
    Stops them and removes their dirs at the end of the test."""
    started = []

    def make(directory: Optional[Path] = None, socket_path: Optional[Path] = None) -> Agent:
        agent_bin()
        directory = directory or make_dir()
        started.append(directory)
        agent = Agent(directory, socket_path)
        started.append(agent)
        return agent.start()

    yield make
    for item in reversed(started):
        if isinstance(item, Agent):
            item.stop()
        else:
            shutil.rmtree(item, ignore_errors=True)


@pytest.fixture(scope="module")
def agent():
    """One agent for a test module (tests that stop or need a private agent
    use make_agent)."""
    agent_bin()  # fails first if missing, before a dir is made
    directory = make_dir()
    try:
        running = Agent(directory).start()
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    yield running
    running.stop()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def tmp_dir():
    """A temp dir under /tmp (mode 0711), removed after the test."""
    directory = make_dir()
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def b64decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def verify_token(token: str, public_pem: bytes, lifetime: int = 3600) -> dict:
    """Checks an RS256 token as Skykit API would: the signature over
    header.payload with the public key, the header is exactly
    {"alg":"RS256","typ":"JWT"}, the payload has exactly iss, iat and exp with
    exp - iat = lifetime. Returns the claims."""
    header, payload, signature = token.split(".")
    public_key = serialization.load_pem_public_key(public_pem)
    public_key.verify(  # raises InvalidSignature
        b64decode(signature),
        f"{header}.{payload}".encode("ascii"),
        padding.PKCS1v15(),
        hashes.SHA256(),
    )
    assert json.loads(b64decode(header)) == {"alg": "RS256", "typ": "JWT"}
    claims = json.loads(b64decode(payload))
    assert sorted(claims) == ["exp", "iat", "iss"]
    assert claims["iss"] == ISSUER
    assert isinstance(claims["iat"], int) and isinstance(claims["exp"], int)
    assert claims["exp"] - claims["iat"] == lifetime
    assert abs(claims["iat"] - time.time()) < 120
    return claims


def next_second(after: float) -> None:
    """Waits (polling the clock, no fixed sleep) until the wall clock is in a
    later whole second than `after`."""
    target = int(after) + 1
    while time.time() < target:
        time.sleep(max(0.0, min(0.05, target - time.time())))
