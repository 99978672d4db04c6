"""The socket discovery rule that every skykit-agent client follows."""

from __future__ import annotations

import errno
import os
import socket as _socket
from typing import List, Mapping, Optional, Union

from ._errors import Attempt, Candidate

ENV_SOCKET = "SKYKIT_AGENT_SOCKET"
ENV_XDG_RUNTIME_DIR = "XDG_RUNTIME_DIR"
SYSTEM_SOCKET = "/run/skykit-agent/agent.sock"

NAMED_BY_ARGUMENT = "socket argument"
NAMED_BY_ENV = "$" + ENV_SOCKET
NAMED_BY_XDG = "$" + ENV_XDG_RUNTIME_DIR
NAMED_BY_SYSTEM = "system default"

PathLike = Union[str, "os.PathLike[str]"]


def candidates(argument: Optional[PathLike], env: Mapping[str, str]) -> List[Candidate]:
    """The ordered socket paths to consider (pure: touches no file).

    The explicit argument, else ``$SKYKIT_AGENT_SOCKET``, else
    ``$XDG_RUNTIME_DIR/skykit-agent/agent.sock`` (when that variable is set)
    followed by ``/run/skykit-agent/agent.sock``. An empty variable (or an
    empty argument) counts as unset. The client uses the first discovered
    candidate that exists; an argument or ``$SKYKIT_AGENT_SOCKET`` is used
    whether or not it exists.
    """
    if argument is not None and os.fspath(argument) != "":
        return [Candidate(os.fspath(argument), NAMED_BY_ARGUMENT)]
    named = env.get(ENV_SOCKET) or ""
    if named:
        return [Candidate(named, NAMED_BY_ENV)]
    found = []
    xdg = env.get(ENV_XDG_RUNTIME_DIR) or ""
    if xdg:
        found.append(Candidate(os.path.join(xdg, "skykit-agent", "agent.sock"), NAMED_BY_XDG))
    found.append(Candidate(SYSTEM_SOCKET, NAMED_BY_SYSTEM))
    return found


def locate(argument: Optional[PathLike], env: Mapping[str, str]):
    """Applies the rule: returns ``(path, attempts)``.

    ``path`` is the socket an agent answered a connect on (``None`` if none
    did) and ``attempts`` the paths tried that did not work, with why.
    """
    found = candidates(argument, env)
    named = len(found) == 1 and found[0].named_by != NAMED_BY_SYSTEM
    attempts: List[Attempt] = []
    for candidate in found:
        # Discovered paths are skipped when absent; a named one is tried.
        if not named and not os.path.lexists(candidate.path):
            attempts.append(Attempt(candidate.path, candidate.named_by, "does not exist"))
            continue
        reason = probe(candidate.path)
        if reason is None:
            return candidate.path, attempts
        attempts.append(Attempt(candidate.path, candidate.named_by, reason))
        break
    return None, attempts


def probe(path: str) -> Optional[str]:
    """Connects to the socket at path once; ``None`` if that worked, else why not."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(5)
        sock.connect(path)
    except OSError as error:
        return describe(error)
    finally:
        sock.close()
    return None


def describe(error: OSError) -> str:
    """The reason of a failed connect, worded as the Rust CLI words it."""
    if error.errno == errno.ENOENT:
        return "does not exist"
    if error.errno == errno.ECONNREFUSED:
        return "nothing is listening (a socket file left by an agent that stopped)"
    if error.errno in (errno.EACCES, errno.EPERM):
        return (
            f"permission denied for uid {os.getuid()}: "
            "ask the agent's operator for access to the socket"
        )
    if error.errno == errno.ENOTSOCK:
        return "not a socket"
    return error.strerror or str(error)


def is_permission_denied(attempt: Attempt) -> bool:
    return attempt.reason.startswith("permission denied")
