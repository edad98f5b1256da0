import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from memfed.mip.v1 import cube_pb2 as _cube_pb2
from memfed.mip.v1 import node_service_pb2 as _node_service_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NodeIdentity(_message.Message):
    __slots__ = ("node_id", "certificate_pem", "signing_public_key", "kem_public_key", "kem_suite", "fingerprint", "address")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    SIGNING_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    KEM_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    KEM_SUITE_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    certificate_pem: bytes
    signing_public_key: bytes
    kem_public_key: bytes
    kem_suite: str
    fingerprint: str
    address: str
    def __init__(self, node_id: _Optional[str] = ..., certificate_pem: _Optional[bytes] = ..., signing_public_key: _Optional[bytes] = ..., kem_public_key: _Optional[bytes] = ..., kem_suite: _Optional[str] = ..., fingerprint: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class RegisterNodeResponse(_message.Message):
    __slots__ = ("created",)
    CREATED_FIELD_NUMBER: _ClassVar[int]
    created: bool
    def __init__(self, created: _Optional[bool] = ...) -> None: ...

class PublishRequest(_message.Message):
    __slots__ = ("manifest", "holder_node_id")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    HOLDER_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    manifest: _cube_pb2.SignedManifest
    holder_node_id: str
    def __init__(self, manifest: _Optional[_Union[_cube_pb2.SignedManifest, _Mapping]] = ..., holder_node_id: _Optional[str] = ...) -> None: ...

class PublishResponse(_message.Message):
    __slots__ = ("catalog_sequence",)
    CATALOG_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    catalog_sequence: int
    def __init__(self, catalog_sequence: _Optional[int] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("cube_id",)
    CUBE_ID_FIELD_NUMBER: _ClassVar[int]
    cube_id: str
    def __init__(self, cube_id: _Optional[str] = ...) -> None: ...

class CatalogEntry(_message.Message):
    __slots__ = ("manifest", "holders")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    HOLDERS_FIELD_NUMBER: _ClassVar[int]
    manifest: _cube_pb2.SignedManifest
    holders: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, manifest: _Optional[_Union[_cube_pb2.SignedManifest, _Mapping]] = ..., holders: _Optional[_Iterable[str]] = ...) -> None: ...

class CatalogAnswer(_message.Message):
    __slots__ = ("cube_id", "versions", "sequence", "issued_at", "expires_at")
    CUBE_ID_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    cube_id: str
    versions: _containers.RepeatedCompositeFieldContainer[CatalogEntry]
    sequence: int
    issued_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, cube_id: _Optional[str] = ..., versions: _Optional[_Iterable[_Union[CatalogEntry, _Mapping]]] = ..., sequence: _Optional[int] = ..., issued_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class SignedCatalogAnswer(_message.Message):
    __slots__ = ("answer", "key_id", "signature")
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    answer: bytes
    key_id: str
    signature: bytes
    def __init__(self, answer: _Optional[bytes] = ..., key_id: _Optional[str] = ..., signature: _Optional[bytes] = ...) -> None: ...

class WhoHoldsRequest(_message.Message):
    __slots__ = ("digest",)
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    digest: str
    def __init__(self, digest: _Optional[str] = ...) -> None: ...

class WhoHoldsResponse(_message.Message):
    __slots__ = ("holders",)
    HOLDERS_FIELD_NUMBER: _ClassVar[int]
    holders: _containers.RepeatedCompositeFieldContainer[NodeIdentity]
    def __init__(self, holders: _Optional[_Iterable[_Union[NodeIdentity, _Mapping]]] = ...) -> None: ...

class SubscribeRequest(_message.Message):
    __slots__ = ("cube_ids", "node_id")
    CUBE_IDS_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    cube_ids: _containers.RepeatedScalarFieldContainer[str]
    node_id: str
    def __init__(self, cube_ids: _Optional[_Iterable[str]] = ..., node_id: _Optional[str] = ...) -> None: ...

class CatalogEvent(_message.Message):
    __slots__ = ("answer",)
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    answer: SignedCatalogAnswer
    def __init__(self, answer: _Optional[_Union[SignedCatalogAnswer, _Mapping]] = ...) -> None: ...

class GrantRequest(_message.Message):
    __slots__ = ("cube_id", "grant")
    CUBE_ID_FIELD_NUMBER: _ClassVar[int]
    GRANT_FIELD_NUMBER: _ClassVar[int]
    cube_id: str
    grant: _cube_pb2.Grant
    def __init__(self, cube_id: _Optional[str] = ..., grant: _Optional[_Union[_cube_pb2.Grant, _Mapping]] = ...) -> None: ...

class GrantResponse(_message.Message):
    __slots__ = ("audit_sequence",)
    AUDIT_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    audit_sequence: int
    def __init__(self, audit_sequence: _Optional[int] = ...) -> None: ...

class RevokeRequest(_message.Message):
    __slots__ = ("cube_id", "principal", "actions")
    CUBE_ID_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    cube_id: str
    principal: str
    actions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, cube_id: _Optional[str] = ..., principal: _Optional[str] = ..., actions: _Optional[_Iterable[str]] = ...) -> None: ...

class TokenRequest(_message.Message):
    __slots__ = ("principal", "cube_id", "action", "ttl_seconds")
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    CUBE_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    principal: str
    cube_id: str
    action: str
    ttl_seconds: int
    def __init__(self, principal: _Optional[str] = ..., cube_id: _Optional[str] = ..., action: _Optional[str] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class TokenClaims(_message.Message):
    __slots__ = ("token_id", "principal", "cube_id", "action", "issued_at", "expires_at", "issuer_key_id")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    CUBE_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    ISSUER_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    token_id: str
    principal: str
    cube_id: str
    action: str
    issued_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    issuer_key_id: str
    def __init__(self, token_id: _Optional[str] = ..., principal: _Optional[str] = ..., cube_id: _Optional[str] = ..., action: _Optional[str] = ..., issued_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., issuer_key_id: _Optional[str] = ...) -> None: ...

class AuditQuery(_message.Message):
    __slots__ = ("from_sequence", "limit")
    FROM_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    from_sequence: int
    limit: int
    def __init__(self, from_sequence: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class AuditEntry(_message.Message):
    __slots__ = ("sequence", "at", "principal", "action", "cube_id", "allowed", "reason", "prev_hash", "entry_hash")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    CUBE_ID_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PREV_HASH_FIELD_NUMBER: _ClassVar[int]
    ENTRY_HASH_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    at: _timestamp_pb2.Timestamp
    principal: str
    action: str
    cube_id: str
    allowed: bool
    reason: str
    prev_hash: bytes
    entry_hash: bytes
    def __init__(self, sequence: _Optional[int] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., principal: _Optional[str] = ..., action: _Optional[str] = ..., cube_id: _Optional[str] = ..., allowed: _Optional[bool] = ..., reason: _Optional[str] = ..., prev_hash: _Optional[bytes] = ..., entry_hash: _Optional[bytes] = ...) -> None: ...

class GetNodeRequest(_message.Message):
    __slots__ = ("node_id",)
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    def __init__(self, node_id: _Optional[str] = ...) -> None: ...

class DecisionReport(_message.Message):
    __slots__ = ("principal", "action", "cube_id", "reason")
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    CUBE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    principal: str
    action: str
    cube_id: str
    reason: str
    def __init__(self, principal: _Optional[str] = ..., action: _Optional[str] = ..., cube_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class RevocationQuery(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RevocationList(_message.Message):
    __slots__ = ("token_ids", "issued_at")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[str]
    issued_at: _timestamp_pb2.Timestamp
    def __init__(self, token_ids: _Optional[_Iterable[str]] = ..., issued_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
