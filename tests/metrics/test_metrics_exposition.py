"""The agent's Prometheus endpoint, read by Prometheus' own parsers.

A real agent serves `[metrics] listen = "unix:PATH"`; after known traffic
(two GetToken calls, one signed and one cached; an unknown identity and a
lifetime of 3601 s, both refused; a good SIGHUP reload and one with a
broken key; a WatchToken stream left open) the scrape of GET /metrics must
parse with the OpenMetrics parser of the Python `prometheus_client` and,
without its `# EOF` line, with its plain Prometheus text parser; both must
read the same samples, and those must show exactly that traffic. (The Rust
end-to-end tests in tests/integration/metrics.rs check the same counters
without an outside parser.)

prometheus_client comes from clients/python/requirements-test.txt; the
agent from $SKYKIT_AGENT_BIN. Either missing: the tests fail.

    export SKYKIT_AGENT_BIN=$PWD/target/debug/skykit-agent
    .venv/bin/python -m pytest tests/metrics
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, FrozenSet, Tuple, TypeVar

import grpc
import pytest
from google.protobuf import duration_pb2

try:
    from prometheus_client.openmetrics.parser import (
        text_string_to_metric_families as parse_openmetrics,
    )
    from prometheus_client.parser import text_string_to_metric_families as parse_prometheus
except ImportError as error:  # fail, never skip
    raise ImportError(
        "prometheus_client is not installed: "
        ".venv/bin/pip install -r clients/python/requirements-test.txt"
    ) from error

from skykit_agent._proto.skykit.agent.v1 import agent_pb2, agent_pb2_grpc

ISSUER = "test@example.com"
DEADLINE = 20.0
CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"
PREFIX = "skykit_agent_"

T = TypeVar("T")
Key = Tuple[str, FrozenSet[Tuple[str, str]]]


def agent_bin() -> str:
    path = os.environ.get("SKYKIT_AGENT_BIN", "")
    if not path:
        pytest.fail("SKYKIT_AGENT_BIN is not set: build the agent and export its path", pytrace=False)
    if not os.access(path, os.X_OK):
        pytest.fail(f"SKYKIT_AGENT_BIN={path} is not an executable file", pytrace=False)
    return path


def connects(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


class Agent:
    """`skykit-agent serve --config` with a fresh key and a metrics socket."""

    def __init__(self):
        self.bin = agent_bin()
        self.dir = Path(tempfile.mkdtemp(prefix="skykit-metrics-"))
        self.socket = self.dir / "agent.sock"
        self.metrics = self.dir / "metrics.sock"
        self.key = self.dir / "private.pem"
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.dir)}
        subprocess.run([self.bin, "keygen", "--out", str(self.dir)], check=True, stdout=subprocess.DEVNULL, env=env)
        config = self.dir / "config.toml"
        config.write_text(
            f'[[identity]]\nissuer = "{ISSUER}"\nkey = "{self.key}"\n\n[metrics]\nlisten = "unix:{self.metrics}"\n'
        )
        self.stderr_path = self.dir / "agent.stderr"
        with open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(
                [self.bin, "serve", "--socket", str(self.socket), "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env=env,
            )
        for path in (self.socket, self.metrics):
            self.eventually(f"{path} accepts connections", lambda path=path: True if connects(path) else None)
        self.channel = grpc.insecure_channel(
            f"unix:{self.socket}", options=[("grpc.default_authority", "localhost")]
        )
        self.tokens = agent_pb2_grpc.TokenServiceStub(self.channel)
        self.agent = agent_pb2_grpc.AgentServiceStub(self.channel)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def eventually(self, what: str, check: Callable[[], T]) -> T:
        """Polls `check` until it returns something other than None."""
        deadline = time.monotonic() + DEADLINE
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"skykit-agent exited with {self.process.returncode}:\n{self.stderr()}", pytrace=False)
            found = check()
            if found is not None:
                return found
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {DEADLINE} s waiting for {what}:\n{self.stderr()}", pytrace=False)
            time.sleep(0.01)

    def reload(self, ok: bool) -> agent_pb2.GetStatusResponse:
        """SIGHUP, then waits until the last reload's outcome is `ok`."""
        self.process.send_signal(signal.SIGHUP)

        def done():
            status = self.agent.GetStatus(agent_pb2.GetStatusRequest(), timeout=10)
            if status.HasField("last_reload") and status.last_reload.ok == ok:
                return status
            return None

        return self.eventually(f"a reload with ok = {ok}", done)

    def scrape(self, method: str = "GET", path: str = "/metrics") -> Tuple[int, Dict[str, str], str]:
        """One HTTP/1.1 request over the metrics socket: status, headers, body."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(DEADLINE)
            conn.connect(str(self.metrics))
            conn.sendall(
                f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 0\r\n\r\n".encode()
            )
            raw = b""
            while chunk := conn.recv(65536):
                raw += chunk
        head, _, body = raw.decode().partition("\r\n\r\n")
        status_line, *header_lines = head.split("\r\n")
        headers = {name.strip().lower(): value.strip() for name, value in (h.split(":", 1) for h in header_lines)}
        assert int(headers["content-length"]) == len(body.encode()), "the body is as long as Content-Length says"
        return int(status_line.split()[1]), headers, body

    def stop(self):
        self.channel.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def agent():
    running = Agent()
    yield running
    running.stop()


def samples(families) -> Tuple[Dict[str, str], Dict[Key, float]]:
    """The declared types by family name, and every sample's value."""
    types: Dict[str, str] = {}
    values: Dict[Key, float] = {}
    for family in families:
        types[family.name] = family.type
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in values, f"duplicate sample {key}"
            values[key] = sample.value
    return types, values


def parse_both(text: str) -> Tuple[Dict[str, str], Dict[Key, float]]:
    """Parses with both parsers, checks they agree, returns the OpenMetrics reading."""
    assert text.endswith("\n# EOF\n"), f"OpenMetrics text ends with `# EOF`:\n{text}"
    open_types, open_values = samples(parse_openmetrics(text))
    plain_types, plain_values = samples(parse_prometheus(text[: -len("# EOF\n")]))
    assert plain_values == open_values, "the two parsers read different samples"
    for name, kind in open_types.items():
        assert plain_types.get(name) == kind, f"the plain parser reads {name} as {plain_types.get(name)}"
        if kind == "counter":
            # Text format 0.0.4 knows no `_total` suffix: the plain parser
            # files a counter's NAME_total samples under an untyped family
            # of that name (Prometheus itself negotiates OpenMetrics).
            assert plain_types.get(name + "_total") == "unknown", name
    return open_types, open_values


def series(name: str, **labels: str) -> Key:
    return (PREFIX + name, frozenset(labels.items()))


def test_scrape_parses_and_counts_the_traffic_exactly(agent):
    fresh = agent.tokens.GetToken(agent_pb2.GetTokenRequest(), timeout=10)
    cached = agent.tokens.GetToken(agent_pb2.GetTokenRequest(), timeout=10)
    assert cached.token == fresh.token, "the second call is served from the cache"
    refused = [
        (agent_pb2.GetTokenRequest(identity="nope"), grpc.StatusCode.NOT_FOUND),
        (
            agent_pb2.GetTokenRequest(lifetime=duration_pb2.Duration(seconds=3601)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ]
    for request, code in refused:
        with pytest.raises(grpc.RpcError) as caught:
            agent.tokens.GetToken(request, timeout=10)
        assert caught.value.code() == code, caught.value.details()
    agent.reload(ok=True)
    agent.key.write_text("not a key\n")
    agent.key.chmod(0o600)
    status = agent.reload(ok=False)
    watch = agent.tokens.WatchToken(agent_pb2.WatchTokenRequest(), timeout=60)
    assert next(watch).token == fresh.token, "the watch starts with the cached token"

    def settled():
        # The probe connections of the start-up wait close on their own.
        code, headers, body = agent.scrape()
        assert code == 200, body
        assert headers["content-type"] == CONTENT_TYPE
        types, values = parse_both(body)
        return (types, values, body) if values.get(series("open_connections")) == 1 else None

    types, values, body = agent.eventually("open_connections 1", settled)

    assert {name: types.get(PREFIX + name) for name in [
        "tokens_issued", "signing_seconds", "get_token_seconds", "refusals", "reloads",
        "token_expiry_seconds", "key_protection", "open_connections", "watchers",
    ]} == {
        "tokens_issued": "counter",
        "signing_seconds": "histogram",
        "get_token_seconds": "histogram",
        "refusals": "counter",
        "reloads": "counter",
        "token_expiry_seconds": "gauge",
        "key_protection": "gauge",
        "open_connections": "gauge",
        "watchers": "gauge",
    }, body
    protection = status.key_protection
    expected = {
        series("tokens_issued_total", identity="default", source="fresh"): 1,
        series("tokens_issued_total", identity="default", source="cached"): 1,
        series("refusals_total", reason="not_found"): 1,
        series("refusals_total", reason="invalid_argument"): 1,
        series("reloads_total", result="ok"): 1,
        series("reloads_total", result="failed"): 1,
        # One signature: the cached call, the reload of the same key and
        # the watch used it.
        series("signing_seconds_count"): 1,
        # Only calls that got a token are timed.
        series("get_token_seconds_count"): 2,
        series("get_token_seconds_bucket", le="+Inf"): 2,
        series("watchers"): 1,
        series("open_connections"): 1,
        series("key_protection", measure="non_dumpable"): 1,
        series("key_protection", measure="core_limit_zero"): int(protection.core_limit_zero),
        series("key_protection", measure="locked_bytes"): protection.locked_bytes,
        series("key_protection", measure="lock_failures"): protection.lock_failures,
    }
    assert {key: values.get(key) for key in expected} == expected, body
    assert len([key for key in values if key[0] == PREFIX + "refusals_total"]) == 2, body
    assert not [key for key in values if key[0] == PREFIX + "refresh_failures_total"], body
    assert not [key for key in values if key[0] == PREFIX + "sink_write_failures_total"], body
    assert 0 < values[series("signing_seconds_sum")] < 10, body
    expiry = values[series("token_expiry_seconds", identity="default")]
    left = fresh.expires_at.seconds - time.time()
    assert left - 30 <= expiry <= min(left + 1, 3600), body
    assert math.isfinite(expiry)

    watch.cancel()

    def no_watchers():
        _, _, body = agent.scrape()
        return True if parse_both(body)[1].get(series("watchers")) == 0 else None

    agent.eventually("watchers 0", no_watchers)


def test_only_get_metrics_is_answered(agent):
    assert agent.scrape("GET", "/other")[0] == 404
    assert agent.scrape("POST", "/metrics")[0] == 405
    code, _, body = agent.scrape()
    assert code == 200
    parse_both(body)
