"""The exceptions of skykit_agent."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import grpc


@dataclass(frozen=True)
class Candidate:
    """A socket path to consider, and what named it."""

    path: str
    named_by: str


@dataclass(frozen=True)
class Attempt:
    """A socket path that was tried, and why no agent could be reached there."""

    path: str
    named_by: str
    reason: str


class SkykitAgentError(Exception):
    """Base of every error of skykit_agent.

    ``code`` is the gRPC status code when the agent answered with an error
    (``None`` otherwise) and ``details`` the agent's message.
    """

    def __init__(self, message: str, code: Optional[grpc.StatusCode] = None):
        super().__init__(message)
        self.code = code
        self.details = message


class AgentUnreachable(SkykitAgentError):
    """No agent could be reached; ``attempts`` lists each path tried and why."""

    def __init__(self, attempts: Sequence[Attempt]):
        self.attempts = list(attempts)
        lines = ["cannot reach skykit-agent; tried:"]
        lines += [f"  {a.path} ({a.named_by}): {a.reason}" for a in self.attempts]
        if not self.attempts:
            lines.append("  (no socket path)")
        lines.append(
            "start the agent (`skykit-agent serve`, or `systemctl start skykit-agent`), "
            "or name its socket with Client(socket=...) or $SKYKIT_AGENT_SOCKET"
        )
        super().__init__("\n".join(lines))


class InvalidArgument(SkykitAgentError):
    """The agent refused the request's arguments (INVALID_ARGUMENT), e.g. a
    lifetime outside 60s..3600s; the message names the limit and the value."""


class NotFound(SkykitAgentError):
    """The agent has no such identity (NOT_FOUND)."""


class PermissionDenied(SkykitAgentError):
    """The caller may not get the token: the agent said PERMISSION_DENIED, or
    (as :class:`SocketPermissionDenied`) the socket may not be opened."""


class AgentShuttingDown(SkykitAgentError):
    """A token watch ended because the agent went away: it is shutting down
    (the stream ended with UNAVAILABLE, "reconnect and watch again") or the
    connection to it was lost. ``code`` is ``UNAVAILABLE``. Watch again once
    the agent is back (``watch_token(reconnect=True)`` does this itself)."""


class SocketPermissionDenied(AgentUnreachable, PermissionDenied):
    """The agent's socket exists but this uid may not connect to it.

    Both an :class:`AgentUnreachable` (with ``attempts``) and a
    :class:`PermissionDenied`.
    """
