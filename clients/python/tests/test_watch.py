"""watch_token() against a real agent, and the watch-backed cache
(Client(watch=True)). Key rotations (a new key file and SIGHUP) make the
agent push a new token at once, so nothing here waits for a refresh point."""

from __future__ import annotations

import datetime as dt
import threading
import time

import grpc
import pytest

from skykit_agent import (
    AgentShuttingDown,
    AgentUnreachable,
    Client,
    InvalidArgument,
    NotFound,
    SkykitAgentError,
    Token,
    TokenWatch,
)
from skykit_agent import _client as client_module
from skykit_agent import _watch as watch_module

from conftest import verify_token
from test_client import Counting

#: How long a token the agent pushes may take to arrive.
PUSH_DEADLINE = 10.0


def take(watch: TokenWatch, timeout: float = PUSH_DEADLINE) -> Token:
    """next(watch), failing (and closing the watch) if nothing comes in time."""
    result = {}

    def run():
        try:
            result["token"] = next(watch)
        except BaseException as error:  # noqa: BLE001 - handed to the test
            result["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        watch.close()
        thread.join(5)
        pytest.fail(f"no token from the watch within {timeout} s")
    if "error" in result:
        raise result["error"]
    return result["token"]


def eventually(check, what: str, deadline: float = PUSH_DEADLINE):
    end = time.monotonic() + deadline
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            pytest.fail(f"{what}: not within {deadline} s")
        time.sleep(0.01)


def test_the_first_token_comes_at_once_and_verifies(agent):
    client = Client(agent.socket)
    cached = client.get_token(lifetime=800)
    started = time.monotonic()
    with client.watch_token(lifetime=800) as watch:
        assert isinstance(watch, TokenWatch)
        token = take(watch)
        assert time.monotonic() - started < 2.0
    assert isinstance(token, Token)
    verify_token(token.token, agent.public_pem, 800)
    assert token.identity == "default" and token.key_id == cached.key_id
    # The agent's cache entry of (default, 800 s): the token get_token got.
    assert token.token == cached.token
    assert token.token not in repr(token)


@pytest.mark.parametrize("lifetime", [900, dt.timedelta(seconds=900)], ids=["int", "timedelta"])
def test_identity_and_lifetime(agent, lifetime):
    with Client(agent.socket).watch_token(identity="default", lifetime=lifetime) as watch:
        token = take(watch)
    verify_token(token.token, agent.public_pem, 900)
    assert token.expires_at - token.issued_at == dt.timedelta(seconds=900)


def test_a_key_rotation_pushes_a_token_from_the_new_key(agent):
    agent.wait_for_watchers(0)
    old_public = agent.public_pem
    with Client(agent.socket).watch_token(lifetime=600) as watch:
        first = take(watch)
        verify_token(first.token, old_public, 600)
        new_public = agent.rotate()
        started = time.monotonic()
        rotated = take(watch)
        assert time.monotonic() - started < 5.0
    verify_token(rotated.token, new_public, 600)
    with pytest.raises(Exception):
        verify_token(rotated.token, old_public, 600)
    assert rotated.key_id != first.key_id
    assert rotated.token != first.token


def test_several_watchers_get_the_same_token(agent):
    agent.wait_for_watchers(0)
    one, other = Client(agent.socket), Client(agent.socket)
    watches = [one.watch_token(lifetime=700) for _ in range(3)] + [other.watch_token(lifetime=700)]
    try:
        firsts = {take(watch).token for watch in watches}
        assert len(firsts) == 1
        agent.wait_for_watchers(4)
        eventually(lambda: agent.status().refreshers == 1, "one refresher for the one entry")
        new_public = agent.rotate()
        rotated = {take(watch).token for watch in watches}
        assert len(rotated) == 1 and rotated != firsts
        verify_token(rotated.pop(), new_public, 700)
    finally:
        for watch in watches:
            watch.close()
    agent.wait_for_watchers(0)


def test_closing_the_iterator_closes_the_stream(agent):
    agent.wait_for_watchers(0)
    client = Client(agent.socket)
    # Nothing is sent before the first next().
    idle = client.watch_token()
    agent.wait_for_watchers(0)

    explicit = client.watch_token()
    take(explicit)
    with client.watch_token(lifetime=600) as scoped:
        take(scoped)
        agent.wait_for_watchers(2)
    agent.wait_for_watchers(1)
    assert scoped.closed and list(scoped) == []
    explicit.close()
    agent.wait_for_watchers(0)
    with pytest.raises(StopIteration):
        next(explicit)

    # Leaving a for loop and closing; and close() before any next().
    watch = client.watch_token()
    for token in watch:
        verify_token(token.token, agent.public_pem)
        agent.wait_for_watchers(1)
        break
    watch.close()
    agent.wait_for_watchers(0)
    idle.close()
    assert list(idle) == []
    agent.wait_for_watchers(0)


def test_close_from_another_thread_ends_a_blocked_iteration(agent):
    agent.wait_for_watchers(0)
    client = Client(agent.socket)
    watch = client.watch_token()
    seen = []
    done = threading.Event()

    def consume():
        for token in watch:
            seen.append(token)
        done.set()

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    eventually(lambda: seen, "the first token")
    agent.wait_for_watchers(1)
    watch.close()
    assert done.wait(5), "the iteration did not stop after close()"
    assert len(seen) == 1
    agent.wait_for_watchers(0)

    # client.close() ends the client's watches too.
    again = client.watch_token()
    seen.clear()
    done.clear()
    watch = again
    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    eventually(lambda: seen, "the first token")
    client.close()
    assert done.wait(5), "the iteration did not stop after client.close()"
    agent.wait_for_watchers(0)


def test_the_agent_shutting_down_ends_the_watch(make_agent):
    agent = make_agent()
    watch = Client(agent.socket).watch_token()
    take(watch)
    agent.stop()  # SIGTERM
    with pytest.raises(AgentShuttingDown) as raised:
        take(watch)
    error = raised.value
    assert isinstance(error, SkykitAgentError)
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in str(error) and "watch again" in str(error)
    assert watch.closed
    with pytest.raises(StopIteration):
        next(watch)


def test_errors(agent, tmp_dir):
    client = Client(agent.socket)
    with pytest.raises(NotFound, match="unknown identity"):
        next(client.watch_token(identity="nope"))
    with pytest.raises(InvalidArgument, match="59s"):
        next(client.watch_token(lifetime=59))
    with pytest.raises(InvalidArgument, match="3601s"):
        next(client.watch_token(lifetime=3601))
    with pytest.raises(TypeError):
        client.watch_token(lifetime=60.5)
    watch = Client(tmp_dir / "none.sock").watch_token()
    with pytest.raises(AgentUnreachable) as raised:
        next(watch)
    assert raised.value.attempts[0].reason == "does not exist"
    assert watch.closed
    # A refused watch leaves nothing behind in the agent.
    agent.wait_for_watchers(0)


@pytest.fixture
def fast_backoff(monkeypatch):
    """Reconnects from 20 ms on (not 100 ms), to keep the tests quick."""
    monkeypatch.setattr(watch_module, "FIRST_BACKOFF", 0.02)


def test_reconnect_watches_the_agent_again_after_a_restart(make_agent, fast_backoff):
    agent = make_agent()
    client = Client(agent.socket)
    with client.watch_token(lifetime=600, reconnect=True) as watch:
        first = take(watch)
        agent.stop()
        # A new key, so the new agent's token surely differs from the last.
        new_public = agent.rotate(reload=False)
        restart = threading.Timer(0.05, agent.start)
        restart.start()
        try:
            again = take(watch)
        finally:
            restart.join()
        verify_token(again.token, new_public, 600)
        assert again.token != first.token
        agent.wait_for_watchers(1)
        # Refusals are not retried.
    with pytest.raises(NotFound):
        next(client.watch_token(identity="nope", reconnect=True))
    agent.wait_for_watchers(0)


# -- the watch-backed cache ----------------------------------------------------


def feed_of(client: Client, lifetime=None, identity=None):
    key = (identity or "", None if lifetime is None else (lifetime, 0))
    return client._feeds.get(key)


def test_a_watching_client_answers_from_pushed_tokens(agent):
    agent.wait_for_watchers(0)
    client = Client(agent.socket, watch=True)
    counting = Counting(client)
    first = client.get_token(lifetime=600)
    verify_token(first.token, agent.public_pem, 600)
    assert counting.calls == 1
    agent.wait_for_watchers(1)
    eventually(lambda: feed_of(client, 600) and feed_of(client, 600).live, "the watch is up")
    for _ in range(200):
        assert client.get_token(lifetime=600).token == first.token
    assert counting.calls == 1

    # A rotation reaches the cache at once, with no call to the agent.
    new_public = agent.rotate()
    rotated = eventually(
        lambda: (lambda t: t if t.token != first.token else None)(client.get_token(lifetime=600)),
        "the rotated token in the cache",
    )
    verify_token(rotated.token, new_public, 600)
    assert rotated.key_id != first.key_id
    assert counting.calls == 1
    assert agent.status().watchers == 1

    # Another (identity, lifetime): one more call, one more watch.
    client.get_token(lifetime=700)
    assert counting.calls == 2
    agent.wait_for_watchers(2)

    client.close()
    agent.wait_for_watchers(0)
    assert client._feeds == {}


def test_a_watching_client_at_refresh_after(agent):
    """Past refresh_after a live watch's token is served a little longer
    (its replacement is on the way); then get_token asks the agent."""
    agent.wait_for_watchers(0)
    client = Client(agent.socket, watch=True)
    counting = Counting(client)
    first = client.get_token(lifetime=900)
    eventually(lambda: feed_of(client, 900) and feed_of(client, 900).live, "the watch is up")
    eventually(lambda: client._cache[("", (900, 0))].pushed, "the pushed token in the cache")
    refresh = first.refresh_after.timestamp()
    client._clock = lambda: refresh + 1
    assert client.get_token(lifetime=900).token == first.token
    assert counting.calls == 1
    client._clock = lambda: refresh + client_module.PUSH_GRACE + 1
    assert client.get_token(lifetime=900).token == first.token  # the agent's clock is behind
    assert counting.calls == 2
    # min_valid_for the cached token cannot meet: asks the agent.
    client._clock = time.time
    client.get_token(lifetime=900, min_valid_for=900)
    assert counting.calls == 3
    client.close()


def test_a_watching_client_falls_back_while_the_agent_is_away(make_agent, fast_backoff):
    agent = make_agent()
    client = Client(agent.socket, watch=True)
    counting = Counting(client)
    first = client.get_token(lifetime=600)
    feed = eventually(lambda: (lambda f: f if f and f.live else None)(feed_of(client, 600)), "the watch is up")
    agent.stop()
    eventually(lambda: not feed.live, "the watch is down")
    # As without watch: the cached token until refresh_after.
    assert client.get_token(lifetime=600).token == first.token
    assert counting.calls == 1
    with pytest.raises(AgentUnreachable):
        client.get_token(lifetime=600, min_valid_for=600)
    # The agent is back (with a new key): the watch reconnects and the
    # cache holds the new agent's token, still without a get_token call.
    new_public = agent.rotate(reload=False)
    agent.start()
    agent.wait_for_watchers(1)
    eventually(lambda: feed.live, "the watch is up again")
    token = eventually(
        lambda: (lambda t: t if t.token != first.token else None)(client.get_token(lifetime=600)),
        "the new agent's token",
    )
    verify_token(token.token, new_public, 600)
    assert counting.calls == 2  # the failed call above
    client.close()
    agent.wait_for_watchers(0)


def test_the_default_client_starts_no_watch(agent):
    client = Client(agent.socket)
    client.get_token(lifetime=1100)
    assert client._feeds == {}
    agent.wait_for_watchers(0)


def test_the_first_token_is_waited_for_at_most_timeout(tmp_dir):
    """A socket that accepts connections but never answers (a hung agent):
    next() gives up after the client's timeout."""
    import socket as socket_module

    path = tmp_dir / "silent.sock"
    server = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM)
    server.bind(str(path))
    server.listen(8)
    accepted = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.05)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        watch = Client(path, timeout=0.3).watch_token()
        started = time.monotonic()
        with pytest.raises(SkykitAgentError) as raised:
            take(watch)
        assert 0.25 < time.monotonic() - started < 5
        assert raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "no token within" in str(raised.value)
        assert watch.closed
    finally:
        stop.set()
        thread.join(5)
        for connection in accepted:
            connection.close()
        server.close()
