from memfed.mip.v1 import cube_pb2 as _cube_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KemSuite(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KEM_SUITE_UNSPECIFIED: _ClassVar[KemSuite]
    KEM_SUITE_X25519_HKDF_SHA256_AES256GCM: _ClassVar[KemSuite]
    KEM_SUITE_MLKEM768_X25519_HKDF_SHA256_AES256GCM: _ClassVar[KemSuite]
KEM_SUITE_UNSPECIFIED: KemSuite
KEM_SUITE_X25519_HKDF_SHA256_AES256GCM: KemSuite
KEM_SUITE_MLKEM768_X25519_HKDF_SHA256_AES256GCM: KemSuite

class WrappedKey(_message.Message):
    __slots__ = ("recipient_id", "suite", "wrapped")
    RECIPIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SUITE_FIELD_NUMBER: _ClassVar[int]
    WRAPPED_FIELD_NUMBER: _ClassVar[int]
    recipient_id: str
    suite: KemSuite
    wrapped: bytes
    def __init__(self, recipient_id: _Optional[str] = ..., suite: _Optional[_Union[KemSuite, str]] = ..., wrapped: _Optional[bytes] = ...) -> None: ...

class PayloadEncryption(_message.Message):
    __slots__ = ("cipher", "stream_id", "chunk_size", "plaintext_size", "chunk_count")
    CIPHER_FIELD_NUMBER: _ClassVar[int]
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    PLAINTEXT_SIZE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    cipher: str
    stream_id: bytes
    chunk_size: int
    plaintext_size: int
    chunk_count: int
    def __init__(self, cipher: _Optional[str] = ..., stream_id: _Optional[bytes] = ..., chunk_size: _Optional[int] = ..., plaintext_size: _Optional[int] = ..., chunk_count: _Optional[int] = ...) -> None: ...

class WatermarkInfo(_message.Message):
    __slots__ = ("scheme", "recipient_id", "pattern_nonce")
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_ID_FIELD_NUMBER: _ClassVar[int]
    PATTERN_NONCE_FIELD_NUMBER: _ClassVar[int]
    scheme: str
    recipient_id: str
    pattern_nonce: bytes
    def __init__(self, scheme: _Optional[str] = ..., recipient_id: _Optional[str] = ..., pattern_nonce: _Optional[bytes] = ...) -> None: ...

class SealedCubeHeader(_message.Message):
    __slots__ = ("format_version", "signed_manifest", "recipients", "encryption", "watermark", "sender_id")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    SIGNED_MANIFEST_FIELD_NUMBER: _ClassVar[int]
    RECIPIENTS_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTION_FIELD_NUMBER: _ClassVar[int]
    WATERMARK_FIELD_NUMBER: _ClassVar[int]
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    signed_manifest: _cube_pb2.SignedManifest
    recipients: _containers.RepeatedCompositeFieldContainer[WrappedKey]
    encryption: PayloadEncryption
    watermark: WatermarkInfo
    sender_id: str
    def __init__(self, format_version: _Optional[int] = ..., signed_manifest: _Optional[_Union[_cube_pb2.SignedManifest, _Mapping]] = ..., recipients: _Optional[_Iterable[_Union[WrappedKey, _Mapping]]] = ..., encryption: _Optional[_Union[PayloadEncryption, _Mapping]] = ..., watermark: _Optional[_Union[WatermarkInfo, _Mapping]] = ..., sender_id: _Optional[str] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("index", "data", "last")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    index: int
    data: bytes
    last: bool
    def __init__(self, index: _Optional[int] = ..., data: _Optional[bytes] = ..., last: _Optional[bool] = ...) -> None: ...
