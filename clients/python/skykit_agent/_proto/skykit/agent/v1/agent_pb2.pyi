import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WatchTokenRequest(_message.Message):
    __slots__ = ("identity", "lifetime")
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    LIFETIME_FIELD_NUMBER: _ClassVar[int]
    identity: str
    lifetime: _duration_pb2.Duration
    def __init__(self, identity: _Optional[str] = ..., lifetime: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class ListIdentitiesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListIdentitiesResponse(_message.Message):
    __slots__ = ("identities",)
    IDENTITIES_FIELD_NUMBER: _ClassVar[int]
    identities: _containers.RepeatedCompositeFieldContainer[IdentityStatus]
    def __init__(self, identities: _Optional[_Iterable[_Union[IdentityStatus, _Mapping]]] = ...) -> None: ...

class GetTokenRequest(_message.Message):
    __slots__ = ("identity", "lifetime", "min_valid_for")
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    LIFETIME_FIELD_NUMBER: _ClassVar[int]
    MIN_VALID_FOR_FIELD_NUMBER: _ClassVar[int]
    identity: str
    lifetime: _duration_pb2.Duration
    min_valid_for: _duration_pb2.Duration
    def __init__(self, identity: _Optional[str] = ..., lifetime: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., min_valid_for: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class GetTokenResponse(_message.Message):
    __slots__ = ("token", "issued_at", "expires_at", "refresh_after", "issuer", "identity", "key_id")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    REFRESH_AFTER_FIELD_NUMBER: _ClassVar[int]
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    token: str
    issued_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    refresh_after: _timestamp_pb2.Timestamp
    issuer: str
    identity: str
    key_id: str
    def __init__(self, token: _Optional[str] = ..., issued_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., refresh_after: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., issuer: _Optional[str] = ..., identity: _Optional[str] = ..., key_id: _Optional[str] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("version", "started_at", "socket", "identities", "cache_entries", "last_reload", "open_connections", "key_protection", "calls_in_progress", "watchers", "refreshers", "sinks")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    SOCKET_FIELD_NUMBER: _ClassVar[int]
    IDENTITIES_FIELD_NUMBER: _ClassVar[int]
    CACHE_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    LAST_RELOAD_FIELD_NUMBER: _ClassVar[int]
    OPEN_CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    KEY_PROTECTION_FIELD_NUMBER: _ClassVar[int]
    CALLS_IN_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    WATCHERS_FIELD_NUMBER: _ClassVar[int]
    REFRESHERS_FIELD_NUMBER: _ClassVar[int]
    SINKS_FIELD_NUMBER: _ClassVar[int]
    version: str
    started_at: _timestamp_pb2.Timestamp
    socket: str
    identities: _containers.RepeatedCompositeFieldContainer[IdentityStatus]
    cache_entries: _containers.RepeatedCompositeFieldContainer[CacheEntryStatus]
    last_reload: ReloadStatus
    open_connections: int
    key_protection: KeyProtection
    calls_in_progress: int
    watchers: int
    refreshers: int
    sinks: _containers.RepeatedCompositeFieldContainer[SinkStatus]
    def __init__(self, version: _Optional[str] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., socket: _Optional[str] = ..., identities: _Optional[_Iterable[_Union[IdentityStatus, _Mapping]]] = ..., cache_entries: _Optional[_Iterable[_Union[CacheEntryStatus, _Mapping]]] = ..., last_reload: _Optional[_Union[ReloadStatus, _Mapping]] = ..., open_connections: _Optional[int] = ..., key_protection: _Optional[_Union[KeyProtection, _Mapping]] = ..., calls_in_progress: _Optional[int] = ..., watchers: _Optional[int] = ..., refreshers: _Optional[int] = ..., sinks: _Optional[_Iterable[_Union[SinkStatus, _Mapping]]] = ...) -> None: ...

class SinkStatus(_message.Message):
    __slots__ = ("path", "identity", "last_written", "error", "failures")
    PATH_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    LAST_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    path: str
    identity: str
    last_written: _timestamp_pb2.Timestamp
    error: str
    failures: int
    def __init__(self, path: _Optional[str] = ..., identity: _Optional[str] = ..., last_written: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., error: _Optional[str] = ..., failures: _Optional[int] = ...) -> None: ...

class IdentityStatus(_message.Message):
    __slots__ = ("name", "issuer", "key_id", "default_lifetime", "default")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_LIFETIME_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FIELD_NUMBER: _ClassVar[int]
    name: str
    issuer: str
    key_id: str
    default_lifetime: _duration_pb2.Duration
    default: bool
    def __init__(self, name: _Optional[str] = ..., issuer: _Optional[str] = ..., key_id: _Optional[str] = ..., default_lifetime: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., default: _Optional[bool] = ...) -> None: ...

class CacheEntryStatus(_message.Message):
    __slots__ = ("identity", "lifetime", "issued_at", "expires_at", "refresh_after")
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    LIFETIME_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    REFRESH_AFTER_FIELD_NUMBER: _ClassVar[int]
    identity: str
    lifetime: _duration_pb2.Duration
    issued_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    refresh_after: _timestamp_pb2.Timestamp
    def __init__(self, identity: _Optional[str] = ..., lifetime: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., issued_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., refresh_after: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ReloadStatus(_message.Message):
    __slots__ = ("finished_at", "ok", "error")
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    finished_at: _timestamp_pb2.Timestamp
    ok: bool
    error: str
    def __init__(self, finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., ok: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class KeyProtection(_message.Message):
    __slots__ = ("state", "non_dumpable", "core_limit_zero", "locked_bytes", "lock_failures")
    STATE_FIELD_NUMBER: _ClassVar[int]
    NON_DUMPABLE_FIELD_NUMBER: _ClassVar[int]
    CORE_LIMIT_ZERO_FIELD_NUMBER: _ClassVar[int]
    LOCKED_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOCK_FAILURES_FIELD_NUMBER: _ClassVar[int]
    state: str
    non_dumpable: bool
    core_limit_zero: bool
    locked_bytes: int
    lock_failures: int
    def __init__(self, state: _Optional[str] = ..., non_dumpable: _Optional[bool] = ..., core_limit_zero: _Optional[bool] = ..., locked_bytes: _Optional[int] = ..., lock_failures: _Optional[int] = ...) -> None: ...
