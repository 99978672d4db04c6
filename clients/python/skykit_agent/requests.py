"""``requests`` authentication with tokens from skykit-agent.

    import requests
    from skykit_agent.requests import SkykitAuth

    response = requests.get(url, auth=SkykitAuth())

Needs the ``requests`` package (``pip install 'skykit-agent-client[requests]'``).
"""

from __future__ import annotations

import threading
from typing import Any, Optional

import requests as _requests

from ._client import Client

__all__ = ["SkykitAuth"]

_default_client: Optional[Client] = None
_watching_client: Optional[Client] = None
_default_lock = threading.Lock()


def _shared_client(watch: bool = False) -> Client:
    global _default_client, _watching_client
    with _default_lock:
        if watch:
            if _watching_client is None:
                _watching_client = Client(watch=True)
            return _watching_client
        if _default_client is None:
            _default_client = Client()
        return _default_client


class SkykitAuth(_requests.auth.AuthBase):
    """Adds ``Authorization: Bearer <token>`` to each request.

    ``client``: the Client to ask (default: one Client shared by every
    SkykitAuth without one, using socket discovery, so its token cache is
    shared too). Further keyword arguments go to ``Client.get_token``
    (``identity``, ``lifetime``, ``min_valid_for``).

    ``watch=True`` (without ``client``): use the shared ``Client(watch=True)``
    instead, whose background watch keeps the token current (a rotated key
    is used at once; no call to the agent at refresh points). For a
    long-running process. With your own client, pass ``Client(watch=True)``.
    """

    def __init__(self, client: Optional[Client] = None, *, watch: bool = False, **get_token_kwargs: Any):
        unknown = set(get_token_kwargs) - {"identity", "lifetime", "min_valid_for"}
        if unknown:
            raise TypeError(f"SkykitAuth got unexpected keyword arguments: {sorted(unknown)}")
        if watch and client is not None:
            raise TypeError("SkykitAuth(watch=True) uses the shared client: pass Client(..., watch=True) as client instead")
        self.client = client
        self.watch = bool(watch)
        self.get_token_kwargs = get_token_kwargs

    def __call__(self, request: _requests.PreparedRequest) -> _requests.PreparedRequest:
        client = self.client if self.client is not None else _shared_client(self.watch)
        token = client.get_token(**self.get_token_kwargs)
        request.headers["Authorization"] = f"Bearer {token.token}"
        return request

    def __repr__(self) -> str:
        if self.watch:
            return f"SkykitAuth(client={self.client!r}, watch=True, **{self.get_token_kwargs!r})"
        return f"SkykitAuth(client={self.client!r}, **{self.get_token_kwargs!r})"
