"""Tokens from a real agent: verified, byte-identical to python-jose, cached."""

from __future__ import annotations

import datetime as dt
import threading

import pytest
from jose import jwt

from skykit_agent import AgentUnreachable, Client, InvalidArgument, Token

from conftest import ISSUER, next_second, verify_token


class Counting:
    """Counts the client's calls to the agent."""

    def __init__(self, client: Client):
        self.calls = 0
        inner = client._call

        def call(request):
            self.calls += 1
            return inner(request)

        client._call = call


def test_get_token_returns_a_verified_token_and_its_times(agent):
    token = Client(agent.socket).get_token()
    claims = verify_token(token.token, agent.public_pem, 3600)
    assert isinstance(token, Token)
    assert token.issuer == ISSUER
    assert token.identity == "default"
    assert token.key_id and "=" not in token.key_id
    for moment in (token.issued_at, token.expires_at, token.refresh_after):
        assert moment.tzinfo is not None and moment.utcoffset() == dt.timedelta(0)
    assert token.issued_at == dt.datetime.fromtimestamp(claims["iat"], dt.timezone.utc)
    assert token.expires_at == dt.datetime.fromtimestamp(claims["exp"], dt.timezone.utc)
    assert token.issued_at < token.refresh_after < token.expires_at
    assert token.authorization == f"Bearer {token.token}"


def test_repr_and_str_do_not_show_the_token(agent):
    token = Client(agent.socket).get_token()
    for text in (repr(token), str(token), f"{token}", repr([token])):
        assert token.token not in text
        assert token.token.split(".")[2] not in text
        assert "key_id=" in text


def test_key_id_matches_pubkey(agent):
    import subprocess

    out = subprocess.run(
        [agent.bin, "pubkey", "--key", str(agent.dir / "private.pem")],
        capture_output=True,
        text=True,
    )
    token = Client(agent.socket).get_token()
    assert token.key_id in out.stdout + out.stderr


@pytest.mark.parametrize("lifetime", [600, dt.timedelta(minutes=10)], ids=["int", "timedelta"])
def test_lifetime_as_seconds_or_timedelta(agent, lifetime):
    token = Client(agent.socket).get_token(lifetime=lifetime)
    verify_token(token.token, agent.public_pem, 600)
    assert token.expires_at - token.issued_at == dt.timedelta(seconds=600)


@pytest.mark.parametrize("lifetime", [60, 3600])
def test_lifetime_limits_are_accepted(agent, lifetime):
    token = Client(agent.socket).get_token(lifetime=lifetime)
    verify_token(token.token, agent.public_pem, lifetime)


def test_identity_default_by_name(agent):
    token = Client(agent.socket).get_token(identity="default", lifetime=900)
    verify_token(token.token, agent.public_pem, 900)
    assert token.identity == "default"


def test_token_is_byte_identical_to_python_jose(agent):
    """The vendor's example signs with python-jose; the agent's token for the
    same claims and key is the same string, byte for byte."""
    for lifetime in (None, 600):
        token = Client(agent.socket).get_token(lifetime=lifetime)
        claims = verify_token(token.token, agent.public_pem, lifetime or 3600)
        vendor = jwt.encode(
            {"iss": ISSUER, "iat": claims["iat"], "exp": claims["exp"]},
            agent.private_pem.decode(),
            algorithm="RS256",
        )
        assert token.token.encode() == vendor.encode()


def test_wrong_types_are_refused_before_calling():
    client = Client("/nonexistent/agent.sock")
    with pytest.raises(TypeError):
        client.get_token(lifetime=600.5)
    with pytest.raises(TypeError):
        client.get_token(min_valid_for="60s")
    with pytest.raises(TypeError):
        client.get_token(lifetime=True)


def test_fractional_seconds_go_to_the_agent_and_are_refused(agent):
    with pytest.raises(InvalidArgument, match="whole seconds"):
        Client(agent.socket).get_token(lifetime=dt.timedelta(seconds=600, milliseconds=500))


# -- caching ----------------------------------------------------------------


def test_a_hot_loop_calls_the_agent_once(agent):
    client = Client(agent.socket)
    counting = Counting(client)
    first = client.get_token(lifetime=1200)
    for _ in range(200):
        assert client.get_token(lifetime=1200) is first
        assert client.get_token(lifetime=dt.timedelta(seconds=1200)) is first
    assert counting.calls == 1
    # Another (identity, lifetime) is another cache entry.
    client.get_token(lifetime=1300)
    client.get_token(identity="default", lifetime=1200)
    assert counting.calls == 3


def test_threads_share_the_cache(agent):
    client = Client(agent.socket)
    counting = Counting(client)
    tokens = []

    def work():
        for _ in range(20):
            tokens.append(client.get_token(lifetime=1400).token)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(tokens)) == 1 and len(tokens) == 160
    assert counting.calls == 1


def test_the_cache_serves_tokens_while_the_agent_is_stopped(make_agent):
    agent = make_agent()
    client = Client(agent.socket)
    first = client.get_token()
    verify_token(first.token, agent.public_pem)
    agent.stop()
    # Cached: no call to the (stopped) agent.
    assert client.get_token() is first
    assert client.get_token(min_valid_for=1800) is first
    # Not in the cache, or the cached token cannot meet min_valid_for: the
    # client asks the agent, which is gone.
    with pytest.raises(AgentUnreachable):
        client.get_token(lifetime=600)
    with pytest.raises(AgentUnreachable):
        client.get_token(min_valid_for=3600)
    # An agent back on the same socket is reached again.
    agent.start()
    fresh = client.get_token(min_valid_for=3600)
    verify_token(fresh.token, agent.public_pem)


def test_the_cache_asks_the_agent_again_after_refresh_after(agent):
    client = Client(agent.socket)
    counting = Counting(client)
    first = client.get_token(lifetime=1500)
    refresh = first.refresh_after.timestamp()
    client._clock = lambda: refresh - 0.01
    assert client.get_token(lifetime=1500) is first
    assert counting.calls == 1
    # (refresh_after has nanoseconds; the datetime keeps microseconds.)
    client._clock = lambda: refresh + 0.001
    again = client.get_token(lifetime=1500)
    assert counting.calls == 2
    # The agent's own clock has not reached refresh_after: the same token.
    assert again.token == first.token
    verify_token(again.token, agent.public_pem, 1500)


def test_min_valid_for(agent):
    client = Client(agent.socket)
    counting = Counting(client)
    first = client.get_token(lifetime=300)
    verify_token(first.token, agent.public_pem, 300)

    # The cached token meets it: no call.
    assert client.get_token(lifetime=300, min_valid_for=60) is first
    assert counting.calls == 1

    # Another client (empty cache) asks the agent, which does not re-sign
    # while its cached token meets min_valid_for.
    other = Client(agent.socket).get_token(lifetime=300, min_valid_for=dt.timedelta(seconds=60))
    assert other.token == first.token

    # In a later second, no token issued before can stay valid for its whole
    # lifetime: the client asks, and the agent signs a new one.
    next_second(first.issued_at.timestamp())
    fresh = client.get_token(lifetime=300, min_valid_for=300)
    assert counting.calls == 2
    assert fresh.token != first.token
    assert fresh.issued_at > first.issued_at
    verify_token(fresh.token, agent.public_pem, 300)
    # And the new token replaced the cached one.
    assert client.get_token(lifetime=300) is fresh
    assert counting.calls == 2


def test_min_valid_for_is_checked_against_expires_at(agent):
    client = Client(agent.socket)
    counting = Counting(client)
    first = client.get_token(lifetime=700)
    expires = first.expires_at.timestamp()
    # A moment before refresh_after (per a fake clock):
    client._clock = lambda: min(expires - 100, first.refresh_after.timestamp() - 1)
    left = expires - client._clock()
    assert client.get_token(lifetime=700, min_valid_for=int(left)) is first
    assert counting.calls == 1
    client.get_token(lifetime=700, min_valid_for=int(left) + 1)
    assert counting.calls == 2
