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
    __slots__ = ("node_id", "memfed_version", "base_model", "resident_modules", "active_modules", "device_bytes_used", "device_budget_bytes", "host_bytes_used", "host_budget_bytes", "queued_rows", "device")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    MEMFED_VERSION_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_MODULES_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_MODULES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    DEVICE_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    HOST_BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    HOST_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    QUEUED_ROWS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    memfed_version: str
    base_model: _cube_pb2.BaseModelFingerprint
    resident_modules: int
    active_modules: _containers.RepeatedScalarFieldContainer[str]
    device_bytes_used: int
    device_budget_bytes: int
    host_bytes_used: int
    host_budget_bytes: int
    queued_rows: int
    device: str
    def __init__(self, node_id: _Optional[str] = ..., memfed_version: _Optional[str] = ..., base_model: _Optional[_Union[_cube_pb2.BaseModelFingerprint, _Mapping]] = ..., resident_modules: _Optional[int] = ..., active_modules: _Optional[_Iterable[str]] = ..., device_bytes_used: _Optional[int] = ..., device_budget_bytes: _Optional[int] = ..., host_bytes_used: _Optional[int] = ..., host_budget_bytes: _Optional[int] = ..., queued_rows: _Optional[int] = ..., device: _Optional[str] = ...) -> None: ...

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
    __slots__ = ("state", "seconds", "activated", "active")
    STATE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    ACTIVATED_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    state: _cube_pb2.LifecycleState
    seconds: float
    activated: CubeRef
    active: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, state: _Optional[_Union[_cube_pb2.LifecycleState, str]] = ..., seconds: _Optional[float] = ..., activated: _Optional[_Union[CubeRef, _Mapping]] = ..., active: _Optional[_Iterable[str]] = ...) -> None: ...

class DeactivateRequest(_message.Message):
    __slots__ = ("ref",)
    REF_FIELD_NUMBER: _ClassVar[int]
    ref: CubeRef
    def __init__(self, ref: _Optional[_Union[CubeRef, _Mapping]] = ...) -> None: ...

class DeactivateResponse(_message.Message):
    __slots__ = ("state", "active")
    STATE_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    state: _cube_pb2.LifecycleState
    active: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, state: _Optional[_Union[_cube_pb2.LifecycleState, str]] = ..., active: _Optional[_Iterable[str]] = ...) -> None: ...

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
    __slots__ = ("prompt", "modules", "max_new_tokens", "conversation_id", "task", "base_only")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MODULES_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    BASE_ONLY_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    modules: _containers.RepeatedCompositeFieldContainer[CubeRef]
    max_new_tokens: int
    conversation_id: str
    task: str
    base_only: bool
    def __init__(self, prompt: _Optional[str] = ..., modules: _Optional[_Iterable[_Union[CubeRef, _Mapping]]] = ..., max_new_tokens: _Optional[int] = ..., conversation_id: _Optional[str] = ..., task: _Optional[str] = ..., base_only: _Optional[bool] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("rows", "capability")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[GenerateRow]
    capability: CapabilityToken
    def __init__(self, rows: _Optional[_Iterable[_Union[GenerateRow, _Mapping]]] = ..., capability: _Optional[_Union[CapabilityToken, _Mapping]] = ...) -> None: ...

class GenerateResult(_message.Message):
    __slots__ = ("text", "memory_used", "new_tokens", "reused_tokens", "seconds")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_FIELD_NUMBER: _ClassVar[int]
    NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REUSED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    text: str
    memory_used: _containers.RepeatedScalarFieldContainer[str]
    new_tokens: int
    reused_tokens: int
    seconds: float
    def __init__(self, text: _Optional[str] = ..., memory_used: _Optional[_Iterable[str]] = ..., new_tokens: _Optional[int] = ..., reused_tokens: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("results", "batch_rows")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    BATCH_ROWS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[GenerateResult]
    batch_rows: int
    def __init__(self, results: _Optional[_Iterable[_Union[GenerateResult, _Mapping]]] = ..., batch_rows: _Optional[int] = ...) -> None: ...

class LoadRequest(_message.Message):
    __slots__ = ("ref", "capability", "pin")
    REF_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    ref: CubeRef
    capability: CapabilityToken
    pin: bool
    def __init__(self, ref: _Optional[_Union[CubeRef, _Mapping]] = ..., capability: _Optional[_Union[CapabilityToken, _Mapping]] = ..., pin: _Optional[bool] = ...) -> None: ...

class LoadResponse(_message.Message):
    __slots__ = ("loaded", "size_bytes", "seconds", "device_bytes_used", "device_budget_bytes")
    LOADED_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    DEVICE_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    loaded: CubeRef
    size_bytes: int
    seconds: float
    device_bytes_used: int
    device_budget_bytes: int
    def __init__(self, loaded: _Optional[_Union[CubeRef, _Mapping]] = ..., size_bytes: _Optional[int] = ..., seconds: _Optional[float] = ..., device_bytes_used: _Optional[int] = ..., device_budget_bytes: _Optional[int] = ...) -> None: ...

class EvictRequest(_message.Message):
    __slots__ = ("ref", "tier")
    REF_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    ref: CubeRef
    tier: str
    def __init__(self, ref: _Optional[_Union[CubeRef, _Mapping]] = ..., tier: _Optional[str] = ...) -> None: ...

class EvictResponse(_message.Message):
    __slots__ = ("evicted", "now_in")
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    NOW_IN_FIELD_NUMBER: _ClassVar[int]
    evicted: CubeRef
    now_in: str
    def __init__(self, evicted: _Optional[_Union[CubeRef, _Mapping]] = ..., now_in: _Optional[str] = ...) -> None: ...

class MergeRequest(_message.Message):
    __slots__ = ("sources", "weights", "method", "cube_id", "version", "density", "rank", "seed", "capability")
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    CUBE_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    sources: _containers.RepeatedCompositeFieldContainer[CubeRef]
    weights: _containers.RepeatedScalarFieldContainer[float]
    method: str
    cube_id: str
    version: str
    density: float
    rank: int
    seed: int
    capability: CapabilityToken
    def __init__(self, sources: _Optional[_Iterable[_Union[CubeRef, _Mapping]]] = ..., weights: _Optional[_Iterable[float]] = ..., method: _Optional[str] = ..., cube_id: _Optional[str] = ..., version: _Optional[str] = ..., density: _Optional[float] = ..., rank: _Optional[int] = ..., seed: _Optional[int] = ..., capability: _Optional[_Union[CapabilityToken, _Mapping]] = ...) -> None: ...

class MergeResponse(_message.Message):
    __slots__ = ("merged", "manifest", "seconds")
    MERGED_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    merged: CubeRef
    manifest: _cube_pb2.CubeManifest
    seconds: float
    def __init__(self, merged: _Optional[_Union[CubeRef, _Mapping]] = ..., manifest: _Optional[_Union[_cube_pb2.CubeManifest, _Mapping]] = ..., seconds: _Optional[float] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("cube_id", "to_version", "reason", "capability")
    CUBE_ID_FIELD_NUMBER: _ClassVar[int]
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    cube_id: str
    to_version: str
    reason: str
    capability: CapabilityToken
    def __init__(self, cube_id: _Optional[str] = ..., to_version: _Optional[str] = ..., reason: _Optional[str] = ..., capability: _Optional[_Union[CapabilityToken, _Mapping]] = ...) -> None: ...

class RollbackResponse(_message.Message):
    __slots__ = ("previous", "current")
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    previous: CubeRef
    current: CubeRef
    def __init__(self, previous: _Optional[_Union[CubeRef, _Mapping]] = ..., current: _Optional[_Union[CubeRef, _Mapping]] = ...) -> None: ...

class BindTaskRequest(_message.Message):
    __slots__ = ("task", "ref", "capability")
    TASK_FIELD_NUMBER: _ClassVar[int]
    REF_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    task: str
    ref: CubeRef
    capability: CapabilityToken
    def __init__(self, task: _Optional[str] = ..., ref: _Optional[_Union[CubeRef, _Mapping]] = ..., capability: _Optional[_Union[CapabilityToken, _Mapping]] = ...) -> None: ...

class BindTaskResponse(_message.Message):
    __slots__ = ("task", "module", "bindings")
    TASK_FIELD_NUMBER: _ClassVar[int]
    MODULE_FIELD_NUMBER: _ClassVar[int]
    BINDINGS_FIELD_NUMBER: _ClassVar[int]
    task: str
    module: CubeRef
    bindings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, task: _Optional[str] = ..., module: _Optional[_Union[CubeRef, _Mapping]] = ..., bindings: _Optional[_Iterable[str]] = ...) -> None: ...

class FeedbackRequest(_message.Message):
    __slots__ = ("ref", "prompt", "answer", "good", "correction", "capability", "on_behalf_of")
    REF_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    GOOD_FIELD_NUMBER: _ClassVar[int]
    CORRECTION_FIELD_NUMBER: _ClassVar[int]
    CAPABILITY_FIELD_NUMBER: _ClassVar[int]
    ON_BEHALF_OF_FIELD_NUMBER: _ClassVar[int]
    ref: CubeRef
    prompt: str
    answer: str
    good: bool
    correction: str
    capability: CapabilityToken
    on_behalf_of: str
    def __init__(self, ref: _Optional[_Union[CubeRef, _Mapping]] = ..., prompt: _Optional[str] = ..., answer: _Optional[str] = ..., good: _Optional[bool] = ..., correction: _Optional[str] = ..., capability: _Optional[_Union[CapabilityToken, _Mapping]] = ..., on_behalf_of: _Optional[str] = ...) -> None: ...

class FeedbackResponse(_message.Message):
    __slots__ = ("module", "feedback_id", "pending", "decision", "reason")
    MODULE_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_ID_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    module: CubeRef
    feedback_id: int
    pending: int
    decision: str
    reason: str
    def __init__(self, module: _Optional[_Union[CubeRef, _Mapping]] = ..., feedback_id: _Optional[int] = ..., pending: _Optional[int] = ..., decision: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...
