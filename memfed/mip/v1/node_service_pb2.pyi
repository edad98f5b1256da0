from memfed.mip.v1 import cube_pb2 as _cube_pb2
from memfed.mip.v1 import envelope_pb2 as _envelope_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CubeRef(_message.Message):
    __slots__ = ("cube_id", "version", "digest")
    CUBE_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    cube_id: str
    version: str
    digest: str
    def __init__(self, cube_id: _Optional[str] = ..., version: _Optional[str] = ..., digest: _Optional[str] = ...) -> None: ...

class CapabilityToken(_message.Message):
    __slots__ = ("token", "signature")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    token: bytes
    signature: bytes
    def __init__(self, token: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("node_id", "memfed_version", "base_model", "resident_modules")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    MEMFED_VERSION_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_MODULES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    memfed_version: str
    base_model: _cube_pb2.BaseModelFingerprint
    resident_modules: int
    def __init__(self, node_id: _Optional[str] = ..., memfed_version: _Optional[str] = ..., base_model: _Optional[_Union[_cube_pb2.BaseModelFingerprint, _Mapping]] = ..., resident_modules: _Optional[int] = ...) -> None: ...

class ListCubesRequest(_message.Message):
    __slots__ = ("cube_id_prefix", "states", "page_size", "page_token")
    CUBE_ID_PREFIX_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    cube_id_prefix: str
    states: _containers.RepeatedScalarFieldContainer[_cube_pb2.LifecycleState]
    page_size: int
    page_token: str
    def __init__(self, cube_id_prefix: _Optional[str] = ..., states: _Optional[_Iterable[_Union[_cube_pb2.LifecycleState, str]]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListCubesResponse(_message.Message):
    __slots__ = ("cubes", "next_page_token")
    CUBES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    cubes: _containers.RepeatedCompositeFieldContainer[_cube_pb2.CubeManifest]
    next_page_token: str
    def __init__(self, cubes: _Optional[_Iterable[_Union[_cube_pb2.CubeManifest, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetManifestRequest(_message.Message):
    __slots__ = ("ref", "capability")
    REF_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    ref: CubeRef
    capability: CapabilityToken
    def __init__(self, ref: _Optional[_Union[CubeRef, _Mapping]] = ..., capability: _Optional[_Union[CapabilityToken, _Mapping]] = ...) -> None: ...

class FetchCubeRequest(_message.Message):
    __slots__ = ("ref", "capability", "recipient_id", "chunk_size", "resume_from_chunk")
    REF_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    RECIPIENT_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    RESUME_FROM_CHUNK_FIELD_NUMBER: _ClassVar[int]
    ref: CubeRef
    capability: CapabilityToken
    recipient_id: str
    chunk_size: int
    resume_from_chunk: int
    def __init__(self, ref: _Optional[_Union[CubeRef, _Mapping]] = ..., capability: _Optional[_Union[CapabilityToken, _Mapping]] = ..., recipient_id: _Optional[str] = ..., chunk_size: _Optional[int] = ..., resume_from_chunk: _Optional[int] = ...) -> None: ...

class CubeStreamMessage(_message.Message):
    __slots__ = ("sealed_header", "plain_manifest", "chunk")
    SEALED_HEADER_FIELD_NUMBER: _ClassVar[int]
    PLAIN_MANIFEST_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    sealed_header: _envelope_pb2.SealedCubeHeader
    plain_manifest: _cube_pb2.SignedManifest
    chunk: _envelope_pb2.Chunk
    def __init__(self, sealed_header: _Optional[_Union[_envelope_pb2.SealedCubeHeader, _Mapping]] = ..., plain_manifest: _Optional[_Union[_cube_pb2.SignedManifest, _Mapping]] = ..., chunk: _Optional[_Union[_envelope_pb2.Chunk, _Mapping]] = ...) -> None: ...

class PushCubeResponse(_message.Message):
    __slots__ = ("stored", "already_present")
    STORED_FIELD_NUMBER: _ClassVar[int]
    ALREADY_PRESENT_FIELD_NUMBER: _ClassVar[int]
    stored: CubeRef
    already_present: bool
    def __init__(self, stored: _Optional[_Union[CubeRef, _Mapping]] = ..., already_present: _Optional[bool] = ...) -> None: ...

class ActivateRequest(_message.Message):
    __slots__ = ("ref", "capability", "pin")
    REF_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    ref: CubeRef
    capability: CapabilityToken
    pin: bool
    def __init__(self, ref: _Optional[_Union[CubeRef, _Mapping]] = ..., capability: _Optional[_Union[CapabilityToken, _Mapping]] = ..., pin: _Optional[bool] = ...) -> None: ...

class ActivateResponse(_message.Message):
    __slots__ = ("state", "seconds")
    STATE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    state: _cube_pb2.LifecycleState
    seconds: float
    def __init__(self, state: _Optional[_Union[_cube_pb2.LifecycleState, str]] = ..., seconds: _Optional[float] = ...) -> None: ...

class DeactivateRequest(_message.Message):
    __slots__ = ("ref",)
    REF_FIELD_NUMBER: _ClassVar[int]
    ref: CubeRef
    def __init__(self, ref: _Optional[_Union[CubeRef, _Mapping]] = ...) -> None: ...

class DeactivateResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: _cube_pb2.LifecycleState
    def __init__(self, state: _Optional[_Union[_cube_pb2.LifecycleState, str]] = ...) -> None: ...

class TransitionRequest(_message.Message):
    __slots__ = ("ref", "target", "reason", "capability")
    REF_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    ref: CubeRef
    target: _cube_pb2.LifecycleState
    reason: str
    capability: CapabilityToken
    def __init__(self, ref: _Optional[_Union[CubeRef, _Mapping]] = ..., target: _Optional[_Union[_cube_pb2.LifecycleState, str]] = ..., reason: _Optional[str] = ..., capability: _Optional[_Union[CapabilityToken, _Mapping]] = ...) -> None: ...

class TransitionResponse(_message.Message):
    __slots__ = ("from_state", "to_state")
    FROM_STATE_FIELD_NUMBER: _ClassVar[int]
    TO_STATE_FIELD_NUMBER: _ClassVar[int]
    from_state: _cube_pb2.LifecycleState
    to_state: _cube_pb2.LifecycleState
    def __init__(self, from_state: _Optional[_Union[_cube_pb2.LifecycleState, str]] = ..., to_state: _Optional[_Union[_cube_pb2.LifecycleState, str]] = ...) -> None: ...

class GenerateRow(_message.Message):
    __slots__ = ("prompt", "modules", "max_new_tokens", "conversation_id", "task")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MODULES_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    modules: _containers.RepeatedCompositeFieldContainer[CubeRef]
    max_new_tokens: int
    conversation_id: str
    task: str
    def __init__(self, prompt: _Optional[str] = ..., modules: _Optional[_Iterable[_Union[CubeRef, _Mapping]]] = ..., max_new_tokens: _Optional[int] = ..., conversation_id: _Optional[str] = ..., task: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("rows", "capability")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[GenerateRow]
    capability: CapabilityToken
    def __init__(self, rows: _Optional[_Iterable[_Union[GenerateRow, _Mapping]]] = ..., capability: _Optional[_Union[CapabilityToken, _Mapping]] = ...) -> None: ...

class GenerateResult(_message.Message):
    __slots__ = ("text", "memory_used")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_FIELD_NUMBER: _ClassVar[int]
    text: str
    memory_used: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, text: _Optional[str] = ..., memory_used: _Optional[_Iterable[str]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[GenerateResult]
    def __init__(self, results: _Optional[_Iterable[_Union[GenerateResult, _Mapping]]] = ...) -> None: ...
