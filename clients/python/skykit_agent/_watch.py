"""Token watches: the agent's WatchToken stream as an iterator of Tokens, and
the background watches that keep a ``Client(watch=True)`` cache current."""

from __future__ import annotations

import logging
import random
import threading
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import grpc

from ._client import _ERRORS, Token, _token
from ._errors import AgentShuttingDown, AgentUnreachable, SkykitAgentError
from ._proto.skykit.agent.v1 import agent_pb2

if TYPE_CHECKING:  # pragma: no cover
    from ._client import Client

_log = logging.getLogger("skykit_agent")

#: reconnect=True: the first pause before watching again, and the longest.
FIRST_BACKOFF = 0.1
MAX_BACKOFF = 5.0


class TokenWatch(Iterator[Token]):
    """An iterator of the tokens the agent pushes for one (identity,
    lifetime); made by :meth:`Client.watch_token`.

    Iterate it from one thread; ``close()`` may be called from any thread
    (a blocked ``next()`` then stops the iteration). A closed watch's
    stream is cancelled, so the agent forgets the watcher at once.
    """

    def __init__(
        self,
        client: "Client",
        request: agent_pb2.WatchTokenRequest,
        *,
        reconnect: bool = False,
        on_state: Optional[Callable[[bool], None]] = None,
    ):
        self._client = client
        self._request = request
        self._reconnect = bool(reconnect)
        # Told True when a stream delivers its first token, False when it ends.
        self._on_state = on_state
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._call = None  # the stream in progress
        self._channel: Optional[grpc.Channel] = None  # the channel it is on
        self._streaming = False  # the stream in progress delivered a token
        self._established = False  # some stream delivered a token
        self._timed_out = None  # the call cancelled for missing its first token
        self._last: Optional[str] = None  # the token returned last
        self._backoff = FIRST_BACKOFF

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return (
            f"<TokenWatch identity={self._request.identity or None!r} "
            f"reconnect={self._reconnect} {state}>"
        )

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called (or the watch ended with an error)."""
        return self._closed.is_set()

    def __iter__(self) -> "TokenWatch":
        return self

    def __enter__(self) -> "TokenWatch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - at interpreter exit anything may be gone
            pass

    def close(self) -> None:
        """Ends the watch: cancels the stream; the iterator stops."""
        self._closed.set()
        with self._lock:
            call, self._call = self._call, None
        if call is not None:
            call.cancel()

    def __next__(self) -> Token:
        retried = False  # one more try after an UNAVAILABLE before a first token
        while True:
            if self._closed.is_set():
                raise StopIteration
            call = self._call
            if call is None:
                try:
                    call = self._open()
                except AgentUnreachable as error:
                    self._retry_or_raise(error)
                    continue
                if call is None:
                    raise StopIteration  # closed meanwhile
            timer = None
            if not self._streaming:
                timer = threading.Timer(self._client._timeout, self._first_token_late, args=(call,))
                timer.daemon = True
                timer.start()
            try:
                response = next(call)
            except StopIteration:
                # The agent ended the stream without an error (it does so
                # only if the watched entry goes away).
                self._ended()
                if self._reconnect and not self._closed.is_set():
                    self._pause()
                    continue
                self.close()
                raise
            except grpc.RpcError as error:
                failure = self._failure(call, error, retried)
                if failure is None:
                    if self._closed.is_set():
                        raise StopIteration from None
                    retried = True
                    continue
                self._retry_or_raise(failure)
                continue
            finally:
                if timer is not None:
                    timer.cancel()
            if not self._streaming:
                self._streaming = self._established = True
                self._state(True)
            self._backoff = FIRST_BACKOFF
            token = _token(response)
            if token.token == self._last:
                continue  # the same token again, from a new stream
            self._last = token.token
            return token

    # -- internals -------------------------------------------------------

    def _open(self):
        stub, channel = self._client._watch_stub()
        # No deadline: the stream is meant to stay open. The first token's
        # wait is bounded by a timer instead (_first_token_late).
        call = stub.WatchToken(self._request)
        with self._lock:
            if self._closed.is_set():
                call.cancel()
                return None
            self._call, self._channel = call, channel
        return call

    def _first_token_late(self, call) -> None:
        with self._lock:
            if self._call is not call or self._streaming:
                return
            self._timed_out = call
        call.cancel()

    def _ended(self) -> None:
        with self._lock:
            self._call = None
        if self._streaming:
            self._streaming = False
            self._state(False)

    def _state(self, up: bool) -> None:
        if self._on_state is not None:
            self._on_state(up)

    def _failure(self, call, error: grpc.RpcError, retried: bool) -> Optional[SkykitAgentError]:
        """The error a failed stream stands for; None if closed by us, or
        worth one more try at once."""
        code, details = error.code(), error.details() or ""
        channel, streaming, timed_out = self._channel, self._streaming, self._timed_out is call
        self._ended()
        if self._closed.is_set():
            return None
        if code in _ERRORS:
            return _ERRORS[code](details, code)
        if timed_out:
            return SkykitAgentError(
                f"skykit-agent: DEADLINE_EXCEEDED: no token within {self._client._timeout} s",
                grpc.StatusCode.DEADLINE_EXCEEDED,
            )
        # CANCELLED without close(): the channel was closed under the stream
        # (another call found the agent gone). Like a lost connection.
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            if streaming:
                self._client._lost(channel)
                if "shutting down" in details:
                    message = f"skykit-agent: {details}"
                else:
                    message = (
                        "skykit-agent: the watch ended: the connection to the agent was lost "
                        f"({code.name}: {details}); watch again once it is back"
                    )
                return AgentShuttingDown(message, grpc.StatusCode.UNAVAILABLE)
            unreachable = self._client._unavailable(channel)
            if unreachable is not None:
                return unreachable
            if not retried:
                return None
            return SkykitAgentError(f"skykit-agent: UNAVAILABLE: {details}", grpc.StatusCode.UNAVAILABLE)
        return SkykitAgentError(f"skykit-agent: {code.name}: {details}", code)

    def _retry_or_raise(self, failure: SkykitAgentError) -> None:
        """reconnect=True after a first token: pauses (the caller then tries
        again). Otherwise (and always for a refusal: NotFound,
        InvalidArgument, PermissionDenied) ends the watch and raises
        ``failure``."""
        refused = isinstance(failure, tuple(_ERRORS.values()))
        if self._reconnect and self._established and not refused and not self._closed.is_set():
            _log.debug("skykit-agent watch: %s; watching again in %.1f s", failure, self._backoff)
            self._pause()
            return
        self.close()
        raise failure from None

    def _pause(self) -> None:
        delay = self._backoff * random.uniform(0.8, 1.2)
        self._backoff = min(self._backoff * 2, MAX_BACKOFF)
        self._closed.wait(delay)


class _Feed:
    """The background watch of one cache key of a ``Client(watch=True)``:
    a daemon thread iterating a reconnecting TokenWatch into the cache."""

    def __init__(self, client: "Client", key, request: agent_pb2.WatchTokenRequest):
        self.client = client
        self.key = key
        #: Whether a stream is up (the cache holds its latest token).
        self.live = False
        self.watch = TokenWatch(client, request, reconnect=True, on_state=self._state)
        identity = request.identity or "default"
        self.thread = threading.Thread(
            target=self._run, name=f"skykit-agent-watch[{identity}]", daemon=True
        )

    @property
    def running(self) -> bool:
        return self.thread.is_alive() and not self.watch.closed

    def start(self) -> None:
        self.thread.start()

    def _state(self, up: bool) -> None:
        self.live = up

    def _run(self) -> None:
        try:
            for token in self.watch:
                self.client._pushed(self.key, self, token)
        except SkykitAgentError as error:
            # E.g. the identity is gone after a reload, or the first watch
            # failed: get_token caches without the watch, and starts a new
            # one after its next call to the agent.
            _log.debug("skykit-agent background watch ended: %s", error)
        finally:
            self.live = False
            self.watch.close()
            self.client._feed_ended(self.key, self)
