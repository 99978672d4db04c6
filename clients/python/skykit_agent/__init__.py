"""Python client of skykit-agent: Skykit API access tokens from the local agent.

    from skykit_agent import Client

    token = Client().get_token()          # cached until the agent's refresh_after
    headers = {"Authorization": f"Bearer {token.token}"}

    for token in Client().watch_token():  # each new token as the agent signs it
        ...

With requests: ``requests.get(url, auth=skykit_agent.requests.SkykitAuth())``.
"""

from ._client import AUTHORITY, Client, Token
from ._watch import TokenWatch
from ._discovery import SYSTEM_SOCKET, candidates
from ._errors import (
    AgentShuttingDown,
    AgentUnreachable,
    Attempt,
    Candidate,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    SkykitAgentError,
    SocketPermissionDenied,
)

__version__ = "0.1.0"

__all__ = [
    "AUTHORITY",
    "AgentShuttingDown",
    "AgentUnreachable",
    "Attempt",
    "Candidate",
    "Client",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "SYSTEM_SOCKET",
    "SkykitAgentError",
    "SocketPermissionDenied",
    "Token",
    "TokenWatch",
    "candidates",
]
