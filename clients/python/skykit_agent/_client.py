"""The client: a gRPC channel to the agent's Unix socket and a token cache."""

from __future__ import annotations

import datetime as _dt
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, Mapping, Optional, Tuple, Union

import grpc
from google.protobuf import duration_pb2

from . import _discovery
from ._errors import (
    AgentUnreachable,
    Attempt,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    SkykitAgentError,
    SocketPermissionDenied,
)
from ._proto.skykit.agent.v1 import agent_pb2, agent_pb2_grpc

if TYPE_CHECKING:  # pragma: no cover
    from ._watch import TokenWatch, _Feed

Seconds = Union[int, _dt.timedelta]

#: The HTTP/2 authority of every call: servers reject a socket path there.
AUTHORITY = "localhost"


@dataclass(frozen=True)
class Token:
    """A token from the agent and its times (timezone-aware, UTC).

    ``repr()`` leaves the token string out, so logging a Token leaks nothing.
    """

    token: str = field(repr=False)
    issued_at: _dt.datetime
    expires_at: _dt.datetime
    refresh_after: _dt.datetime
    issuer: str
    identity: str
    key_id: str

    def __str__(self) -> str:  # never the secret by accident
        return repr(self)

    @property
    def authorization(self) -> str:
        """The value of the ``Authorization`` header: ``Bearer <token>``."""
        return f"Bearer {self.token}"


def _duration(value: Optional[Seconds], name: str) -> Optional[duration_pb2.Duration]:
    if value is None:
        return None
    if isinstance(value, _dt.timedelta):
        result = duration_pb2.Duration()
        result.FromTimedelta(value)
        return result
    if isinstance(value, int) and not isinstance(value, bool):
        return duration_pb2.Duration(seconds=value)
    raise TypeError(f"{name} must be an int (seconds) or a datetime.timedelta, not {type(value).__name__}")


def _key(value: Optional[duration_pb2.Duration]) -> Optional[Tuple[int, int]]:
    return None if value is None else (value.seconds, value.nanos)


def _seconds(value: Optional[duration_pb2.Duration]) -> float:
    return 0.0 if value is None else value.seconds + value.nanos / 1e9


def _time(timestamp) -> _dt.datetime:
    return _dt.datetime.fromtimestamp(timestamp.seconds, tz=_dt.timezone.utc) + _dt.timedelta(
        microseconds=timestamp.nanos // 1000
    )


def _epoch(timestamp) -> float:
    return timestamp.seconds + timestamp.nanos / 1e9


def _token(response: agent_pb2.GetTokenResponse) -> Token:
    return Token(
        token=response.token,
        issued_at=_time(response.issued_at),
        expires_at=_time(response.expires_at),
        refresh_after=_time(response.refresh_after),
        issuer=response.issuer,
        identity=response.identity,
        key_id=response.key_id,
    )


@dataclass
class _Cached:
    token: Token
    expires_at: float
    refresh_after: float
    # Pushed by a background watch (Client(watch=True)), not a GetToken answer.
    pushed: bool = False

    @classmethod
    def of(cls, token: Token, pushed: bool = False) -> "_Cached":
        return cls(token, token.expires_at.timestamp(), token.refresh_after.timestamp(), pushed)


#: With a background watch up (Client(watch=True)), how long past a cached
#: token's refresh_after it is still served while the agent's replacement is
#: on its way, before get_token asks the agent itself.
PUSH_GRACE = 5.0


_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
}


class Client:
    """A client of the skykit-agent on this host.

    ``socket``: the agent's socket path. Unset: ``$SKYKIT_AGENT_SOCKET``, else
    the first existing of ``$XDG_RUNTIME_DIR/skykit-agent/agent.sock`` and
    ``/run/skykit-agent/agent.sock``. The socket is looked up at the first
    call (and again after the agent was unreachable), not here.

    ``timeout``: seconds one call to the agent may take (for a watch: until
    its first token).

    ``watch``: keep the cache current with background watches: after the
    first ``get_token`` of an (identity, lifetime), a daemon thread keeps a
    ``WatchToken`` stream open for it (reconnecting after the agent
    restarts) and ``get_token`` answers from the latest pushed token, so a
    key rotation reaches the cache at once and the refresh points cost no
    call. While that watch is down, ``get_token`` caches as without
    ``watch``. ``close()`` stops the watches.

    A Client is thread-safe; share one per process.
    """

    def __init__(
        self,
        socket: Optional[Union[str, "os.PathLike[str]"]] = None,
        *,
        timeout: float = 10.0,
        watch: bool = False,
    ):
        self._socket = None if socket is None else os.fspath(socket)
        self._timeout = timeout
        self._watch = bool(watch)
        # Open TokenWatches (so close() ends them) and the background
        # watches of watch=True, per cache key.
        self._watches: "weakref.WeakSet[TokenWatch]" = weakref.WeakSet()
        self._feeds: Dict[Tuple[str, Optional[Tuple[int, int]]], "_Feed"] = {}
        self._lock = threading.Lock()
        self._channel: Optional[grpc.Channel] = None
        self._stub: Optional[agent_pb2_grpc.TokenServiceStub] = None
        self._path: Optional[str] = None
        self._cache: Dict[Tuple[str, Optional[Tuple[int, int]]], _Cached] = {}
        # The wall clock the cache compares with the agent's times.
        self._clock: Callable[[], float] = time.time
        # The environment discovery reads (os.environ at each lookup).
        self._env: Optional[Mapping[str, str]] = None

    def __repr__(self) -> str:
        if self._watch:
            return f"Client(socket={self._socket!r}, watch=True)"
        return f"Client(socket={self._socket!r})"

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel to the agent and ends every watch of this
        client (their iterators stop); a later call opens a new channel."""
        with self._lock:
            watches = list(self._watches)
            self._feeds.clear()
        for watch in watches:
            watch.close()
        with self._lock:
            self._drop_channel()

    def get_token(
        self,
        identity: Optional[str] = None,
        lifetime: Optional[Seconds] = None,
        min_valid_for: Optional[Seconds] = None,
    ) -> Token:
        """Returns a token of ``identity`` (None: the agent's default).

        ``lifetime``: how long the token is valid, 60..3600 seconds (None: the
        identity's configured default). ``min_valid_for``: the least time the
        returned token must still be valid (None: 0).

        The last token per (identity, lifetime) is kept and returned without
        asking the agent until its ``refresh_after`` has passed, unless it
        cannot stay valid for ``min_valid_for``. With ``Client(watch=True)``
        the kept token is the latest the agent pushed (see ``Client``).

        Raises AgentUnreachable, InvalidArgument, NotFound, PermissionDenied,
        or SkykitAgentError for any other failure.
        """
        lifetime_pb = _duration(lifetime, "lifetime")
        min_valid_pb = _duration(min_valid_for, "min_valid_for")
        key = (identity or "", _key(lifetime_pb))
        with self._lock:
            cached = self._cache.get(key)
            now = self._clock()
            feed = self._feeds.get(key)
            live = feed is not None and feed.live
            if cached is not None and cached.expires_at - now >= _seconds(min_valid_pb):
                if now < cached.refresh_after:
                    return cached.token
                # A live watch delivers the replacement at refresh_after.
                if live and cached.pushed and now < cached.refresh_after + PUSH_GRACE:
                    return cached.token
            request = agent_pb2.GetTokenRequest(identity=identity or "")
            if lifetime_pb is not None:
                request.lifetime.CopyFrom(lifetime_pb)
            if min_valid_pb is not None:
                request.min_valid_for.CopyFrom(min_valid_pb)
            response = self._call(request)
            token = _token(response)
            # An answer that crossed a pushed token (e.g. one from a key
            # rotated meanwhile) does not replace a newer or as new one.
            if not (
                live
                and cached is not None
                and cached.pushed
                and cached.token.issued_at >= token.issued_at
            ):
                self._cache[key] = _Cached(
                    token, _epoch(response.expires_at), _epoch(response.refresh_after)
                )
            if self._watch and (feed is None or not feed.running):
                self._start_feed(key, identity, lifetime_pb)
            return token

    def watch_token(
        self,
        identity: Optional[str] = None,
        lifetime: Optional[Seconds] = None,
        *,
        reconnect: bool = False,
    ) -> "TokenWatch":
        """Watches the tokens of ``identity`` (None: the agent's default) and
        ``lifetime`` (as in ``get_token``): an iterator of Tokens, the current
        one at once, then each replacement as soon as the agent signs it (at
        its refresh point, or right after a key rotation).

            with client.watch_token(lifetime=600) as tokens:
                for token in tokens:
                    use(token)

        Nothing is sent before the first ``next()``. ``close()`` (or leaving
        the ``with`` block, or ``client.close()``) ends the stream; the
        iterator then stops.

        Raises, from ``next()``, what ``get_token`` raises, and
        AgentShuttingDown when the stream ends because the agent stops (or
        the connection to it is lost). ``reconnect=True``: after a first
        token, watch again instead (backoff from 0.1 s to 5 s, until
        ``close()``), yielding the new agent's token if it differs from the
        last one; errors before the first token, and NotFound,
        InvalidArgument and PermissionDenied at any time, are still raised.
        """
        from ._watch import TokenWatch

        lifetime_pb = _duration(lifetime, "lifetime")
        watch = TokenWatch(self, self._watch_request(identity, lifetime_pb), reconnect=reconnect)
        with self._lock:
            self._watches.add(watch)
        return watch

    # -- watches -------------------------------------------------------

    @staticmethod
    def _watch_request(
        identity: Optional[str], lifetime_pb: Optional[duration_pb2.Duration]
    ) -> agent_pb2.WatchTokenRequest:
        request = agent_pb2.WatchTokenRequest(identity=identity or "")
        if lifetime_pb is not None:
            request.lifetime.CopyFrom(lifetime_pb)
        return request

    def _start_feed(self, key, identity, lifetime_pb) -> None:
        """Starts the background watch of a cache key; the lock is held."""
        from ._watch import _Feed

        feed = _Feed(self, key, self._watch_request(identity, lifetime_pb))
        self._feeds[key] = feed
        self._watches.add(feed.watch)
        feed.start()

    def _pushed(self, key, feed: "_Feed", token: Token) -> None:
        """A background watch received a token."""
        with self._lock:
            if self._feeds.get(key) is feed:
                self._cache[key] = _Cached.of(token, pushed=True)

    def _feed_ended(self, key, feed: "_Feed") -> None:
        with self._lock:
            if self._feeds.get(key) is feed:
                del self._feeds[key]

    def _watch_stub(self) -> Tuple[agent_pb2_grpc.TokenServiceStub, grpc.Channel]:
        """The stub and channel to open a watch on (discovery if needed)."""
        with self._lock:
            stub = self._connect()
            assert self._channel is not None
            return stub, self._channel

    def _lost(self, channel: grpc.Channel) -> None:
        """A watch on ``channel`` lost the agent: a later call starts over on
        a new channel (unless another call did already)."""
        with self._lock:
            if self._channel is channel:
                self._drop_channel()

    def _unavailable(self, channel: grpc.Channel) -> Optional[AgentUnreachable]:
        """A watch failed with UNAVAILABLE before its first token: looks at
        the socket again, as ``_call`` does. Returns the error if no agent
        can be reached, else None (worth one more try)."""
        with self._lock:
            if self._channel is not None and self._channel is not channel:
                return None  # another call connected anew meanwhile
            path = self._path
            self._drop_channel()
            if path is None or _discovery.probe(path) is not None:
                result = self._locate()
                if isinstance(result, AgentUnreachable):
                    return result
            return None

    # -- the agent -----------------------------------------------------

    def _call(self, request: agent_pb2.GetTokenRequest) -> agent_pb2.GetTokenResponse:
        """One GetToken call; the lock is held."""
        for attempt in (1, 2):
            stub = self._connect()
            try:
                return stub.GetToken(request, timeout=self._timeout)
            except grpc.RpcError as error:
                code, details = error.code(), error.details() or ""
            if code in _ERRORS:
                raise _ERRORS[code](details, code)
            if code != grpc.StatusCode.UNAVAILABLE:
                raise SkykitAgentError(f"skykit-agent: {code.name}: {details}", code)
            # Either the connection failed (the agent went away, or another
            # one replaced it) or the agent itself could not sign. Look again.
            path = self._path
            self._drop_channel()
            reason = _discovery.probe(path)
            if reason is not None:
                # Look the socket up anew, as a fresh client would.
                stub_or_error = self._locate()
                if isinstance(stub_or_error, AgentUnreachable):
                    raise stub_or_error
            if attempt == 2:
                raise SkykitAgentError(f"skykit-agent: UNAVAILABLE: {details}", code)
        raise AssertionError("unreachable")  # pragma: no cover

    def _connect(self) -> agent_pb2_grpc.TokenServiceStub:
        if self._stub is None:
            result = self._locate()
            if isinstance(result, AgentUnreachable):
                raise result
        assert self._stub is not None
        return self._stub

    def _locate(self):
        env = os.environ if self._env is None else self._env
        path, attempts = _discovery.locate(self._socket, env)
        if path is None:
            return _unreachable(attempts)
        self._drop_channel()
        self._path = path
        self._channel = grpc.insecure_channel(
            "unix:" + os.path.abspath(path),
            options=[("grpc.default_authority", AUTHORITY)],
        )
        self._stub = agent_pb2_grpc.TokenServiceStub(self._channel)
        return self._stub

    def _drop_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._channel = None
        self._stub = None


def _unreachable(attempts) -> AgentUnreachable:
    if attempts and _discovery.is_permission_denied(attempts[-1]):
        return SocketPermissionDenied(attempts)
    return AgentUnreachable(attempts)
