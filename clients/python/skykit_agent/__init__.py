"""Python client of skykit-agent: Skykit API access tokens from the local agent.

    from skykit_agent import Client

    token = Client().get_token()          # cached until the agent's refresh_after
    headers = {"Authorization": f"Bearer {token.token}"}

With requests: ``requests.get(url, auth=skykit_agent.requests.SkykitAuth())``.
"""

from ._client import AUTHORITY, Client, Token
from ._discovery import SYSTEM_SOCKET, candidates
from ._errors import (
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
    "candidates",
]
